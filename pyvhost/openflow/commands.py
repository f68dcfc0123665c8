"""The ctl commands of OpenFlow: ``set-controller BRIDGE TARGET... [inactivity_probe=MS]
[controller_rate_limit=N] [controller_burst_limit=N]``,
``del-controller BRIDGE``, ``set-dpid BRIDGE N``,
``set-fail-mode BRIDGE standalone|secure``; and ``show`` listing each bridge's
controllers, ``del-br`` dropping them. They are added to the switch's command table
(pyvhost.switch.commands.COMMANDS) by ``register()``, so the switch package needs no
knowledge of OpenFlow; each finds the switch's ``OpenFlow`` (``manager.enable``)."""

from __future__ import annotations

import json

from pyvhost.switch import commands as base
from pyvhost.switch.commands import CommandError, _int, _need

SET_USAGE = ("set-controller BRIDGE TARGET... (tcp:IP[:PORT], ptcp:PORT[:IP], punix:PATH) "
             "[inactivity_probe=MS] [controller_rate_limit=N (PACKET_INs/s, 0: no limit)] "
             "[controller_burst_limit=N]")
MAX_RATE = 10_000_000


def _of(sw):
    from .manager import enable
    return enable(sw)


async def set_controller(sw, args):
    _need(args, 2, 12, SET_USAGE)
    targets, probe, rate, burst = [], None, None, None
    for a in args[1:]:
        if a.startswith("inactivity_probe="):
            probe = _int(a.partition("=")[2], "inactivity_probe", 0, 3_600_000)
        elif a.startswith("controller_rate_limit="):
            rate = _int(a.partition("=")[2], "controller_rate_limit", 0, MAX_RATE)
        elif a.startswith("controller_burst_limit="):
            burst = _int(a.partition("=")[2], "controller_burst_limit", 1, MAX_RATE)
        elif "=" in a.partition(":")[0]:
            raise CommandError(f"unknown option {a!r}; usage: {SET_USAGE}")
        else:
            targets.append(a)
    if not targets:
        raise CommandError(f"usage: {SET_USAGE}")
    await _of(sw).set_controller(args[0], targets, probe, rate, burst)
    return ""


async def del_controller(sw, args):
    _need(args, 1, 1, "del-controller BRIDGE")
    await _of(sw).del_controller(args[0])
    return ""


async def set_fail_mode(sw, args):
    _need(args, 2, 2, "set-fail-mode BRIDGE standalone|secure")
    _of(sw).set_fail_mode(args[0], args[1])
    return ""


async def set_dpid(sw, args):
    _need(args, 2, 2, "set-dpid BRIDGE N (decimal, 0x..., or 16 hex digits)")
    text = args[1]
    if len(text) == 16 and all(c in "0123456789abcdefABCDEF" for c in text):
        dpid = int(text, 16)
    else:
        dpid = _int(text, "dpid", 0, (1 << 64) - 1, 0)
    if not dpid:
        raise CommandError("dpid: 0 is not a datapath id")
    _of(sw).set_dpid(args[0], dpid)
    return ""


def _with_controllers(show):
    async def show_(sw, args):
        text = await show(sw, args)
        of = getattr(sw, "openflow", None)
        if of is None:
            return text
        if "--json" in args:
            data = json.loads(text)
            for name, bridge in data["bridges"].items():
                bridge["controllers"] = [line.strip() for line in of.show_lines(name)]
            return json.dumps(data)
        out = []
        for line in text.split("\n"):
            out.append(line)
            if line.startswith("Bridge ") and line[7:] in sw.bridges:
                out += of.show_lines(line[7:])
        return "\n".join(out)
    show_.openflow = True
    return show_


def _forgetting(del_br):
    async def del_br_(sw, args):
        of = getattr(sw, "openflow", None)
        name = args[0] if len(args) == 1 else None
        if of is None or name not in sw.bridges:
            return await del_br(sw, args)
        await of.pause(name)             # no FLOW_MOD for the bridge while it goes
        try:
            text = await del_br(sw, args)
        except BaseException:
            await of.restore()
            raise
        await of.forget(name)
        return text
    del_br_.openflow = True
    return del_br_


def register(table: dict | None = None) -> None:
    """Add the OpenFlow commands to ``table`` (the switch's); idempotent."""
    table = base.COMMANDS if table is None else table
    table.update({"set-controller": set_controller, "del-controller": del_controller,
                  "set-dpid": set_dpid, "set-fail-mode": set_fail_mode})
    if not getattr(table["show"], "openflow", False):
        table["show"] = _with_controllers(table["show"])
    if not getattr(table["del-br"], "openflow", False):
        table["del-br"] = _forgetting(table["del-br"])
