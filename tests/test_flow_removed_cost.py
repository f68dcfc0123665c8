"""A removed rule's text is parsed again (Rule.flow) only for a FLOW_REMOVED a controller
asked for (SEND_FLOW_REM): deleting a big table nobody asked about parses none of it, and
the rule that asked still gets its message's fields from its own text. In process: a
switch with OpenFlow enabled, rules added as FLOW_MODs, removed by ctl's del-flows and by a
FLOW_MOD DELETE."""

from __future__ import annotations

import asyncio
import socket
import struct

import pytest

from pyvhost.openflow import codec as C
from pyvhost.openflow.handler import Handler
from pyvhost.openflow.manager import enable
from pyvhost.switch import bridge as bridge_mod
from pyvhost.switch.commands import run_command
from pyvhost.switch.switch import Switch
from tests.harness import openflow as H

SEND_FLOW_REM = 1
RULES = 200


def body(i: int, flags: int = 0) -> bytes:
    m = H.match(H.oxm(0, struct.pack("!I", 1)), H.oxm(5, struct.pack("!H", 0x800)),
                H.oxm(12, socket.inet_aton(f"10.0.{i >> 8 & 255}.{i & 255}")))
    return H.flow_mod(H.ADD, m, H.apply_actions(H.output(2)), priority=10, cookie=i,
                      flags=flags)[8:]


@pytest.mark.parametrize("how", ["ctl del-flows", "FLOW_MOD DELETE"])
def test_only_rules_that_asked_for_flow_removed_are_parsed_again(tmp_path, monkeypatch, how):
    parsed: list[str] = []
    real = bridge_mod.parse_flow

    def counting(text):
        parsed.append(text)
        return real(text)

    sent: list[tuple] = []

    async def main():
        sw = Switch(tmp_path / "run")
        of = enable(sw)
        await sw.start()
        of.events.start()                  # as `pyvhost switch` starts it (OpenFlow.restore)
        try:
            for argv in (["add-br", "br0"], ["add-port", "br0", "p1", "type=vhostuser"],
                         ["add-port", "br0", "p2", "type=vhostuser"]):
                await run_command(sw, argv)
            h = Handler(sw, "br0", of._state("br0"), 1, of.events)
            bodies = [body(i, SEND_FLOW_REM if i == 7 else 0) for i in range(RULES)]
            assert h.flow_mods(bodies) == [None] * RULES
            monkeypatch.setattr(bridge_mod, "parse_flow", counting)
            monkeypatch.setattr(of.events, "_send",
                                lambda bridge, t, reason, msg: sent.append((t, msg)) or 1)
            if how == "ctl del-flows":
                await run_command(sw, ["del-flows", "br0"])
            else:
                assert h.flow_mods([H.flow_mod(H.DELETE, table=0xFF)[8:]]) == [None]
            assert sw.bridges["br0"].rules == {}
        finally:
            await of.close()                   # then the switch, as `pyvhost switch` does
            await sw.stop()

    asyncio.run(main())
    assert len(parsed) == 1 and "nw_dst=10.0.0.7" in parsed[0], parsed
    [(msg_type, msg)] = sent
    assert msg_type == C.FLOW_REMOVED
    cookie, priority = struct.unpack_from("!QH", msg, 8)
    assert (cookie, priority) == (7, 10)
