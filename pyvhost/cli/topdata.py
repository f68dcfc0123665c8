"""What ``pyvhost top`` shows, without the screen: one ``Sample`` of a running switch read
over its control socket with the ctl commands' ``--json`` answers (show, dump-ports,
pmd-stats-show, pmd-rxq-show, top-flows), and the rates between two samples (``diff``).
A counter that went down (the switch restarted, pmd-stats-clear) gives no rate for that
interval, never a negative one. Imports only the wire format; no curses, no switch code.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from pyvhost.switch.wire import request

TOP_FLOWS = 64                  # rules asked per bridge (the most the switch gives)


class SwitchGone(OSError):
    """The switch could not be read (not running, went away, or answered nonsense)."""


@dataclass
class Sample:
    at: float                                        # time.monotonic() when it was read
    ports: dict[tuple[str, str], dict] = field(default_factory=dict)   # (bridge, port)
    states: dict[tuple[str, str], str] = field(default_factory=dict)
    pmds: list[dict] = field(default_factory=list)   # pmd-stats-show --json
    rxqs: list[dict] = field(default_factory=list)   # pmd-rxq-show --json
    flows: dict[tuple[str, str], dict] = field(default_factory=dict)   # (bridge, rule text)


def _ask(control: str, argv: list[str], timeout: float):
    try:
        answer = request(control, argv, timeout=timeout)
    except (OSError, ValueError) as e:                  # ValueError: a reply not JSON
        raise SwitchGone(f"cannot reach the switch at {control}: {e}") from None
    if not answer.get("ok"):
        raise SwitchGone(f"{' '.join(argv)}: {answer.get('error')}")
    try:
        return json.loads(answer.get("output") or "null")
    except ValueError as e:
        raise SwitchGone(f"{' '.join(argv)}: not JSON ({e})") from None


def read(control: str, timeout: float = 5.0) -> Sample:
    """One sample of the switch on ``control`` (SwitchGone if it cannot be read). A bridge
    deleted between the requests is left out of this sample."""
    show = _ask(control, ["show", "--json"], timeout)
    s = Sample(at=time.monotonic())
    for bridge, b in sorted(show.get("bridges", {}).items()):
        try:
            counters = _ask(control, ["dump-ports", "--json", bridge], timeout)
            top = _ask(control, ["top-flows", "--json", bridge, str(TOP_FLOWS)], timeout)
        except SwitchGone as e:
            if "no bridge named" in str(e):
                continue
            raise
        for port, c in counters.items():
            s.ports[bridge, port] = c
            s.states[bridge, port] = b.get("ports", {}).get(port, {}).get("state", "")
        for r in top:
            s.flows[bridge, r["flow"]] = r
    s.pmds = _ask(control, ["pmd-stats-show", "--json"], timeout)
    s.rxqs = _ask(control, ["pmd-rxq-show", "--json"], timeout)
    return s


def _rate(new: int, old: int | None, dt: float) -> float | None:
    if old is None or new < old or dt <= 0:
        return None
    return (new - old) / dt


def drops(counters: dict) -> dict[str, int]:
    """A port's drop counters by reason: the datapath's (``police``, ``tx_full``, ...), its
    rings' or device's prefixed with the side (``rx_no_buffer``, ``tx_bad_desc``, ...)."""
    out = {k[5:]: v for k, v in counters.get("datapath", {}).items() if k.startswith("drop_")}
    for side in ("rx", "tx"):
        for k, v in counters.get(f"{side}_rings", {}).items():
            if k.startswith("drop_"):
                out[f"{side}_{k[5:]}"] = v
    return out


@dataclass
class PortRow:
    bridge: str
    port: str
    type: str
    state: str
    rx_pps: float | None
    rx_bps: float | None
    tx_pps: float | None
    tx_bps: float | None
    drop_rates: dict[str, float | None]             # reason -> drops/s (None: no rate yet)
    drop_totals: dict[str, int]


@dataclass
class PmdRow:
    pmd: int
    cpu: int | None
    busy: float | None                              # share of the interval, 0..1
    pps: float | None
    upcalls: float | None                           # per second
    hit: float | None                               # cache hits / packets in the interval
    megaflows: int
    queues: list[str]                               # "port/queue usage%"


@dataclass
class FlowRow:
    bridge: str
    flow: str
    pps: float | None
    bps: float | None
    packets: int


@dataclass
class View:
    at: float
    interval: float | None
    ports: list[PortRow]
    pmds: list[PmdRow]
    flows: list[FlowRow]                            # busiest first


def diff(old: Sample | None, new: Sample) -> View:
    """The rates between ``old`` and ``new`` (``old`` None: totals only, no rates)."""
    dt = new.at - old.at if old is not None else 0.0
    ports = []
    for key, c in new.ports.items():
        d = c.get("datapath", {})
        o = old.ports.get(key, {}) if old is not None else {}
        od = o.get("datapath", {})
        ndrops, odrops = drops(c), drops(o) if o else {}
        rates = []
        for k in ("rx_packets", "rx_bytes", "tx_packets", "tx_bytes"):
            r = _rate(d.get(k, 0), od.get(k), dt)
            rates.append(None if r is None else r * (8 if k.endswith("bytes") else 1))
        ports.append(PortRow(
            key[0], key[1], c.get("type", ""), new.states.get(key, ""), *rates,
            drop_rates={r: _rate(v, odrops.get(r), dt) for r, v in ndrops.items()},
            drop_totals=ndrops))
    rxq = {q["pmd"]: q for q in new.rxqs}
    opmds = {p["pmd"]: p for p in old.pmds} if old is not None else {}
    pmds = []
    for p in new.pmds:
        o = opmds.get(p["pmd"], {})
        busy = _rate(p.get("busy_ns", 0), o.get("busy_ns"), dt * 1e9)
        pps = _rate(p.get("packets", 0), o.get("packets"), dt)
        hits = [_rate(p.get(k, 0), o.get(k), 1.0) for k in ("emc_hits", "megaflow_hits")]
        got = _rate(p.get("packets", 0), o.get("packets"), 1.0)
        hit = (sum(hits) / got if got and None not in hits else None)
        q = rxq.get(p["pmd"], {})
        pmds.append(PmdRow(p["pmd"], q.get("cpu"), None if busy is None else min(busy, 1.0),
                           pps, _rate(p.get("upcalls", 0), o.get("upcalls"), dt), hit,
                           p.get("megaflows", 0),
                           [f"{r['port']}/{r['queue']} {r['usage']}%" +
                            ("" if r.get("enabled", True) else " (off)")
                            for r in q.get("rxqs", [])]))
    flows = []
    for key, f in new.flows.items():
        o = old.flows.get(key) if old is not None else None
        pps = _rate(f["n_packets"], o["n_packets"] if o else None, dt)
        bps = _rate(f["n_bytes"], o["n_bytes"] if o else None, dt)
        flows.append(FlowRow(key[0], key[1], pps, None if bps is None else bps * 8,
                             f["n_packets"]))
    flows.sort(key=lambda f: (f.pps or 0.0, f.packets), reverse=True)
    return View(new.at, dt or None, ports, pmds, flows)
