"""The control commands of ``pyvhost ctl`` (the conventions OVS users know), parsed from an
argv list and run against a ``Switch``; each returns the text to print or raises
``CommandError``. Also the seed/config file format: one command per line, # comments."""

from __future__ import annotations

import json
import shlex

from .bulk import collector_paused
from .flows import FlowSyntaxError, parse_flow, parse_match, parse_selector
from .wire import MAX_FLOW_FILE

MAX_RATE_KBPS = 10 ** 9          # 1 Tbit/s: rates and bursts (kbit) beyond are refused
__all__ = ["MAX_FLOW_FILE", "CommandError", "read_config", "run_command"]


class CommandError(ValueError):
    """Bad syntax or an unknown name: the message is for the user."""


def _kv(args: list[str], allowed: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for a in args:
        k, eq, v = a.partition("=")
        if not eq or k not in allowed:
            raise CommandError(f"expected one of {', '.join(a + '=' for a in allowed)}, "
                               f"got {a!r}")
        out[k] = v
    return out


def _int(value: str, name: str, lo: int, hi: int, base: int = 10) -> int:
    """Every integer option goes through here: a number in lo..hi or a CommandError."""
    try:
        if len(value) > 24:
            raise ValueError
        n = int(value, base)
    except ValueError:
        raise CommandError(f"{name}: {value!r} is not a number") from None
    if not lo <= n <= hi:
        raise CommandError(f"{name}: {n} out of range {lo}..{hi}")
    return n


def usable_cpus() -> set[int]:
    import os
    return os.sched_getaffinity(0)


def _need(args: list[str], lo: int, hi: int, usage: str) -> None:
    if not lo <= len(args) <= hi:
        raise CommandError(f"usage: {usage}")


async def run_command(sw, argv: list[str]) -> str:
    """Run one command; the caller persists nothing: the switch does."""
    if not argv:
        raise CommandError("no command (try: show)")
    cmd, args = argv[0], argv[1:]
    handler = COMMANDS.get(cmd)
    if handler is None:
        raise CommandError(f"unknown command {cmd!r}; commands: {', '.join(sorted(COMMANDS))}")
    try:
        return await handler(sw, args)
    except FlowSyntaxError as e:
        raise CommandError(str(e)) from None


async def add_br(sw, args):
    _need(args, 1, 2, "add-br BRIDGE [internal=true] (the bridge's own internal port)")
    opts = _kv(args[1:], ("internal",))
    if opts.get("internal", "false") not in ("true", "false"):
        raise CommandError("internal: true or false")
    sw.add_bridge(args[0])
    if opts.get("internal") == "true":
        try:
            await sw.add_port(args[0], args[0], "internal")
        except BaseException:
            await sw.del_bridge(args[0])         # all or nothing
            raise
    return ""


async def del_br(sw, args):
    _need(args, 1, 1, "del-br BRIDGE")
    await sw.del_bridge(args[0])
    return ""


ADD_PORT_USAGE = ("add-port BRIDGE PORT type=vhostuser|vhostuserclient|internal|afpacket|"
                  "afxdp|vxlan|geneve [path=P (client only)] [queues=N] [ofport_request=N] "
                  "[socket-mode=0660] [socket-group=G] [mtu=N (internal)] "
                  "[dev=IFNAME (afpacket, afxdp)] [remote_ip=IP [local_ip=IP] [key=VNI] "
                  "[dst_port=N] [csum=true|false] [tos=N] [ttl=N] (vxlan, geneve)]")
TUNNEL_OPTIONS = ("remote_ip", "local_ip", "key", "dst_port", "csum", "tos", "ttl")


async def add_port(sw, args):
    _need(args, 3, 12, ADD_PORT_USAGE)
    opts = _kv(args[2:], ("type", "path", "queues", "ofport_request", "socket-mode",
                          "socket-group", "mtu", "dev") + TUNNEL_OPTIONS)
    if "type" not in opts:
        raise CommandError("add-port needs type=vhostuser, vhostuserclient, internal, "
                           "afpacket, afxdp, vxlan or geneve")
    tunnel = {k: opts[k] for k in TUNNEL_OPTIONS if k in opts}
    from pyvhost._switch import limits
    queues = _int(opts["queues"], "queues", 1, limits()["queues"]) if "queues" in opts else None
    ofport = _int(opts["ofport_request"], "ofport_request", 1, 0xFEFF) \
        if "ofport_request" in opts else None
    mode = _int(opts["socket-mode"], "socket-mode", 0, 0o777, 8) \
        if "socket-mode" in opts else None
    mtu = _int(opts["mtu"], "mtu", 68, 65521) if "mtu" in opts else None
    await sw.add_port(args[0], args[1], opts["type"], opts.get("path"), queues,
                      ofport=ofport, socket_mode=mode, socket_group=opts.get("socket-group"),
                      mtu=mtu, dev=opts.get("dev"), tunnel=tunnel or None)
    return ""


async def del_port(sw, args):
    _need(args, 1, 2, "del-port [BRIDGE] PORT")
    await sw.del_port(args[-1], args[0] if len(args) == 2 else None)
    return ""


async def show(sw, args):
    args, flags = _flags(args, ("--json",))
    _need(args, 0, 0, "show [--json]")
    return json.dumps(sw.show_data()) if "--json" in flags else sw.show()


def _flags(args: list[str], allowed: tuple[str, ...]) -> tuple[list[str], set[str]]:
    flags = {a for a in args if a.startswith("--")}
    for f in flags - set(allowed):
        raise CommandError(f"unknown option {f} (have: {', '.join(allowed) or 'none'})")
    return [a for a in args if not a.startswith("--")], flags


def parse_flow_file(text: str) -> list:
    """One flow per line, # comments and blank lines skipped; the first bad line rejects
    the whole file with its number."""
    if len(text) > MAX_FLOW_FILE:
        raise CommandError(f"a flow file of {len(text)} bytes (at most {MAX_FLOW_FILE})")
    flows = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            flows.append(parse_flow(line))
        except FlowSyntaxError as e:
            raise CommandError(f"line {n}: {e}") from None
    return flows


async def add_flow(sw, args):
    _need(args, 2, 2, 'add-flow BRIDGE "FLOW"')
    sw.add_flow(args[0], parse_flow(args[1]))
    return ""


async def add_flows(sw, args):
    _need(args, 2, 2, "add-flows BRIDGE FILE (ctl sends the file's text; - for stdin)")
    with collector_paused():
        n = sw.add_flows(args[0], parse_flow_file(args[1]))
    return f"{n} flows added"


async def replace_flows(sw, args):
    _need(args, 2, 2, "replace-flows BRIDGE FILE (ctl sends the file's text; - for stdin)")
    with collector_paused():
        done = sw.replace_flows(args[0], parse_flow_file(args[1]))
    return "{added} added, {modified} modified, {deleted} deleted".format(**done)


async def del_flows(sw, args):
    args, flags = _flags(args, ("--strict",))
    _need(args, 1, 2, 'del-flows [--strict] BRIDGE ["MATCH"]')
    selector = parse_selector(args[1]) if len(args) == 2 else None
    if "--strict" in flags and selector is None:
        raise CommandError("del-flows --strict needs a match")
    n = sw.del_flows(args[0], selector, strict="--strict" in flags)
    return f"{n} flows deleted"


async def dump_flows(sw, args):
    args, flags = _flags(args, ("--no-stats", "--json"))
    _need(args, 1, 2, 'dump-flows [--no-stats] [--json] BRIDGE ["MATCH"]')
    selector = parse_selector(args[1]) if len(args) == 2 else None
    if "--json" in flags:
        return json.dumps(sw.dump_flows_data(args[0], selector))
    return sw.dump_flows(args[0], selector, stats="--no-stats" not in flags)


TOP_FLOWS_MAX = 64               # the classifier's one-pass top keeps at most this many


async def top_flows(sw, args):
    args, flags = _flags(args, ("--json",))
    _need(args, 1, 2, f"top-flows [--json] BRIDGE [N (1..{TOP_FLOWS_MAX}, default 10)]")
    n = _int(args[1], "N", 1, TOP_FLOWS_MAX) if len(args) == 2 else 10
    rows = sw.top_flows_data(args[0], n)
    if "--json" in flags:
        return json.dumps(rows)
    return "\n".join(f" n_packets={r['n_packets']}, n_bytes={r['n_bytes']}, {r['flow']}"
                     for r in rows)


async def trace(sw, args):
    args, flags = _flags(args, ("--json",))
    _need(args, 2, 2, 'trace [--json] BRIDGE "in_port=P,dl_src=..,dl_dst=..,ip,..."')
    text, summary = sw.trace_report(args[0], parse_match(args[1]), args[1])
    return text + ("\n" + json.dumps(summary) if "--json" in flags else "")


async def set_bridge(sw, args):
    _need(args, 2, 3, "set-bridge BRIDGE [mac-table-size=N] [mac-aging-time=SECONDS]")
    opts = _kv(args[1:], ("mac-table-size", "mac-aging-time"))
    sw.set_bridge(args[0],
                  _int(opts["mac-table-size"], "mac-table-size", 1, 1 << 24)
                  if "mac-table-size" in opts else None,
                  _int(opts["mac-aging-time"], "mac-aging-time", 1, 1000000)
                  if "mac-aging-time" in opts else None)
    return ""


async def set_port(sw, args):
    _need(args, 2, 2, "set-port PORT mac-limit=N (0: no limit)")
    opts = _kv(args[1:], ("mac-limit",))
    sw.set_mac_limit(args[0], _int(opts["mac-limit"], "mac-limit", 0, 1 << 24))
    return ""


async def set_policing(sw, args):
    _need(args, 2, 3, "set-policing PORT rate=KBPS [burst=KBITS]")
    opts = _kv(args[1:], ("rate", "burst"))
    rate = _int(opts.get("rate", "0"), "rate", 0, MAX_RATE_KBPS)
    burst = _int(opts.get("burst", "0"), "burst", 0, MAX_RATE_KBPS)
    sw.set_policing(args[0], rate, burst)
    return ""


async def set_qos(sw, args):
    _need(args, 2, 2, "set-qos PORT max-rate=KBPS")
    opts = _kv(args[1:], ("max-rate",))
    sw.set_qos(args[0], _int(opts["max-rate"], "max-rate", 0, MAX_RATE_KBPS))
    return ""


async def dump_ports(sw, args):
    args, flags = _flags(args, ("--json",))
    _need(args, 1, 1, "dump-ports [--json] BRIDGE")
    return sw.dump_ports(args[0], as_json="--json" in flags)


async def fdb_show(sw, args):
    args, flags = _flags(args, ("--json",))
    _need(args, 1, 1, "fdb-show [--json] BRIDGE")
    return json.dumps(sw.fdb_data(args[0])) if "--json" in flags else sw.fdb_show(args[0])


async def pmd_rxq_show(sw, args):
    args, flags = _flags(args, ("--json",))
    _need(args, 0, 0, "pmd-rxq-show [--json]")
    return json.dumps(sw.pmd_rxq_data()) if "--json" in flags else sw.pmd_rxq_show()


async def pmd_stats_show(sw, args):
    args, flags = _flags(args, ("--json",))
    _need(args, 0, 0, "pmd-stats-show [--json]")
    return json.dumps(sw.pmd_stats_data()) if "--json" in flags else sw.pmd_stats_show()


async def pmd_stats_clear(sw, args):
    _need(args, 0, 0, "pmd-stats-clear")
    for pmd in sw.pmds.pmds:
        pmd.clear_stats()
    return ""


async def pmd_rebalance(sw, args):
    _need(args, 0, 0, "pmd-rebalance")
    sw.pmds.rebalance()
    return sw.pmd_rxq_show()


async def set_pmd(sw, args):
    _need(args, 1, 7, "set-pmd [threads=N] [assign=roundrobin|cycles] [auto-lb=true|false] "
                      "[cpus=0,1|auto|any] [flow-limit=N] [sleep-max=US] "
                      "[emc-insert-inv-prob=N]")
    opts = _kv(args, ("threads", "assign", "auto-lb", "cpus", "flow-limit", "sleep-max",
                      "emc-insert-inv-prob"))
    settings = {}
    if "emc-insert-inv-prob" in opts:       # OVS's: 1 in N cache hits into the EMC; 0: off
        settings["emc_insert_inv_prob"] = _int(opts["emc-insert-inv-prob"],
                                               "emc-insert-inv-prob", 0, 0xFFFFFFFF)
    if "flow-limit" in opts:
        settings["flow_limit"] = _int(opts["flow-limit"], "flow-limit", 1, 50000000)
    if "sleep-max" in opts:
        from pyvhost._switch import limits
        settings["sleep_max"] = _int(opts["sleep-max"], "sleep-max", 0,
                                     limits()["sleep_max_us"])
    if "threads" in opts:
        settings["threads"] = _int(opts["threads"], "threads", 1, len(usable_cpus()))
    if "assign" in opts:
        if opts["assign"] not in ("roundrobin", "cycles"):
            raise CommandError("assign: roundrobin or cycles")
        settings["assign"] = opts["assign"]
    if "auto-lb" in opts:
        if opts["auto-lb"] not in ("true", "false"):
            raise CommandError("auto-lb: true or false")
        settings["auto_lb"] = opts["auto-lb"] == "true"
    if opts.get("cpus") in ("any", "auto"):             # floating; chosen at start (default)
        settings["cpus"] = "any" if opts["cpus"] == "any" else []
    elif "cpus" in opts:
        cpus = [_int(c, "cpus", 0, 4095) for c in opts["cpus"].split(",") if c]
        bad = sorted(set(cpus) - usable_cpus())
        if bad:
            raise CommandError(f"cpus: {bad} not usable by this process "
                               f"(usable: {sorted(usable_cpus())})")
        settings["cpus"] = cpus
    sw.set_pmd(**settings)
    return ""


async def add_mirror(sw, args):
    _need(args, 3, 8, "add-mirror BRIDGE NAME [select-src=P,..] [select-dst=P,..] [select-all] "
                      "[select-vlan=N] [filter=MATCH] output=PORT")
    sw.add_mirror(args[0], args[1], args[2:])
    return ""


async def del_mirror(sw, args):
    _need(args, 2, 2, "del-mirror BRIDGE NAME")
    sw.del_mirror(args[0], args[1])
    return ""


async def list_mirrors(sw, args):
    args, flags = _flags(args, ("--json",))
    _need(args, 0, 1, "list-mirrors [--json] [BRIDGE]")
    rows = sw.mirrors_data(args[0] if args else None)
    if "--json" in flags:
        return json.dumps(rows)
    lines = []
    for r in rows:
        sel = (["select-all"] if r["select_all"] else []) + \
            ([f"select-src={','.join(r['src'])}"] if r["src"] else []) + \
            ([f"select-dst={','.join(r['dst'])}"] if r["dst"] else []) + \
            ([f"select-vlan={r['vlan']}"] if r["vlan"] is not None else []) + \
            ([f"filter={r['filter']}"] if r["filter"] else [])
        lines.append(f"{r['bridge']} {r['name']}: {' '.join(sel)} output={r['output']}"
                     f"{'' if r['active'] else ' (inactive: no such output port)'}"
                     f" tx_packets={r['tx_packets']} tx_bytes={r['tx_bytes']}"
                     f" no_copy={r['no_copy']}")
    return "\n".join(lines)


COMMANDS = {
    "add-br": add_br, "del-br": del_br, "add-port": add_port, "del-port": del_port,
    "show": show, "add-flow": add_flow, "add-flows": add_flows, "replace-flows": replace_flows,
    "del-flows": del_flows, "dump-flows": dump_flows, "top-flows": top_flows, "trace": trace,
    "set-bridge": set_bridge, "set-port": set_port,
    "set-policing": set_policing, "set-qos": set_qos, "dump-ports": dump_ports,
    "fdb-show": fdb_show, "pmd-rxq-show": pmd_rxq_show, "pmd-stats-show": pmd_stats_show,
    "pmd-stats-clear": pmd_stats_clear, "pmd-rebalance": pmd_rebalance, "set-pmd": set_pmd,
    "add-mirror": add_mirror, "del-mirror": del_mirror, "list-mirrors": list_mirrors,
}


def read_config(text: str) -> list[list[str]]:
    """A config/seed file: one ctl command per line (shell quoting), # comments."""
    return [shlex.split(line, comments=True) for line in text.splitlines()
            if shlex.split(line, comments=True)]
