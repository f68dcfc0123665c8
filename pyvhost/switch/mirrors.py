"""Port mirrors (OVS's Mirror table) of the switch's bridges: their definitions as
``pyvhost ctl add-mirror`` gives them (select-src, select-dst, select-all, select-vlan, a
filter in the flow-match syntax, output), kept per bridge in the store's settings, and the
selection each bridge's datapath applies, resolved from port names to ids again whenever
ports or mirrors change: a mirror whose output port is absent is inactive, absent selected
ports are skipped, and a port that appears later is selected from then on. Also the
transient mirrors of captures (never stored; their output is a port no bridge lists).

No frames here (the datapath copies them: _switch, _mirror) and no commands parsing
beyond the options of one mirror.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from .flows import FlowSyntaxError, parse_match

log = logging.getLogger("pyvhost.switch")
MAX_MIRRORS = 16                     # per bridge, captures included (_mirror.pxd)
SETTING = "mirrors:{}"               # the store's settings key of a bridge's mirrors
OPTIONS = ("select-src", "select-dst", "select-all", "select-vlan", "filter", "output")


@dataclass
class Mirror:
    name: str
    output: str                                  # a port name
    src: tuple[str, ...] = ()                    # ports whose received frames it copies
    dst: tuple[str, ...] = ()                    # ports whose sent frames it copies
    select_all: bool = False                     # every port but the output, both ways
    vlan: int | None = None                      # only frames tagged with this VID
    filter: str | None = None                    # only frames matching (flow syntax)
    transient: bool = False                      # a capture's: never stored
    out_id: int | None = field(default=None, repr=False)   # a capture's hidden port

    @classmethod
    def parse(cls, name: str, args: list[str]) -> Mirror:
        """From ctl's ``KEY=VALUE`` words (``select-all`` alone); ValueError says what is
        wrong."""
        opts: dict[str, str] = {}
        for a in args:
            k, eq, v = a.partition("=")
            if k not in OPTIONS or (k == "select-all") == bool(eq):
                raise ValueError(f"expected select-src=P,.. select-dst=P,.. select-all "
                                 f"select-vlan=N filter=MATCH output=PORT, got {a!r}")
            if k in opts:
                raise ValueError(f"{k} given twice")
            opts[k] = v
        return cls.from_options(name, {
            "output": opts.get("output"),
            "src": [p for p in opts.get("select-src", "").split(",") if p],
            "dst": [p for p in opts.get("select-dst", "").split(",") if p],
            "select_all": "select-all" in opts,
            "vlan": opts.get("select-vlan"),
            "filter": opts.get("filter")})

    @classmethod
    def from_options(cls, name: str, o: dict) -> Mirror:
        """From the store's (or parse's) dict, every value checked."""
        if not isinstance(o, dict):
            raise ValueError(f"mirror {name}: options {o!r} are not an object")
        output = o.get("output")
        if not isinstance(output, str) or not output:
            raise ValueError(f"mirror {name} needs output=PORT")
        src, dst = o.get("src", []), o.get("dst", [])
        for ports in (src, dst):
            if not isinstance(ports, list) or not all(isinstance(p, str) and p for p in ports):
                raise ValueError(f"mirror {name}: select-src/select-dst are port names")
        select_all = o.get("select_all", False)
        if not isinstance(select_all, bool):
            raise ValueError(f"mirror {name}: select-all is a flag")
        if not (src or dst or select_all):
            raise ValueError(f"mirror {name} selects nothing: give select-src=, select-dst= "
                             "or select-all")
        if output in src or output in dst:
            raise ValueError(f"mirror {name}: its output {output} cannot be selected too")
        vlan = o.get("vlan")
        if vlan is not None:
            try:
                vlan = int(vlan)
            except (TypeError, ValueError):
                raise ValueError(f"mirror {name}: select-vlan={vlan!r} is not a number") \
                    from None
            if not 0 <= vlan <= 4095:
                raise ValueError(f"mirror {name}: select-vlan={vlan} out of range 0..4095")
        filt = o.get("filter")
        if filt is not None:
            if not isinstance(filt, str):
                raise ValueError(f"mirror {name}: filter is flow-match text")
            try:
                parse_match(filt)
            except FlowSyntaxError as e:
                raise ValueError(f"mirror {name}: filter: {e}") from None
        return cls(name, output, tuple(src), tuple(dst), select_all, vlan, filt or None)

    def options(self) -> dict:
        return {"output": self.output, "src": list(self.src), "dst": list(self.dst),
                "select_all": self.select_all, "vlan": self.vlan, "filter": self.filter}


class Mirrors:
    """Every bridge's mirrors, in the order they were added; ``apply`` puts a bridge's
    into the datapath. Control thread only."""

    def __init__(self, datapath, store):
        self.datapath = datapath
        self.store = store
        self.defs: dict[str, dict[str, Mirror]] = {}     # bridge -> name -> mirror
        self.applied: dict[str, list[str]] = {}          # bridge -> names in datapath order

    def restore(self, bridge) -> list[str]:
        """The stored mirrors of ``bridge`` (after its ports); the errors of the ones that
        do not load (they stay stored)."""
        errors = []
        stored = self.store.settings().get(SETTING.format(bridge.name), [])
        mine = self.defs.setdefault(bridge.name, {})
        for item in stored if isinstance(stored, list) else [stored]:
            try:
                name, opts = item
                mine[name] = Mirror.from_options(name, opts)
            except (TypeError, ValueError) as e:
                errors.append(f"{item!r}: {e}")
        self.apply(bridge)
        return errors

    def _save(self, bridge_name: str) -> None:
        self.store.set_setting(SETTING.format(bridge_name), [
            [m.name, m.options()] for m in self.defs.get(bridge_name, {}).values()
            if not m.transient])

    def add(self, bridge, mirror: Mirror) -> None:
        mine = self.defs.setdefault(bridge.name, {})
        if mirror.name in mine:
            raise ValueError(f"mirror {mirror.name} already exists on {bridge.name}")
        if len(mine) >= MAX_MIRRORS:
            raise ValueError(f"at most {MAX_MIRRORS} mirrors per bridge (captures included)")
        mine[mirror.name] = mirror
        try:
            if not mirror.transient:
                self._save(bridge.name)
            self.apply(bridge)
        except BaseException:
            del mine[mirror.name]
            if not mirror.transient:
                self._save(bridge.name)
            raise

    def remove(self, bridge, name: str) -> None:
        mine = self.defs.get(bridge.name, {})
        if name not in mine:
            raise ValueError(f"no mirror {name} on {bridge.name}")
        mirror = mine.pop(name)
        if not mirror.transient:
            try:
                self._save(bridge.name)
            except BaseException:
                mine[name] = mirror
                raise
        self.apply(bridge)

    def forget(self, bridge_name: str) -> None:
        """The bridge is gone (the store dropped its row with it)."""
        self.defs.pop(bridge_name, None)
        self.applied.pop(bridge_name, None)

    def _resolve(self, bridge, m: Mirror, filter_key) -> dict | None:
        ports = bridge.ports
        if m.out_id is not None:
            out = m.out_id
        elif m.output in ports:
            out = ports[m.output].port_id
        else:
            return None                                  # inactive until it exists
        if m.select_all:
            every = [p.port_id for p in ports.values() if p.port_id != out]
            src, dst = every, every
        else:
            src = [ports[n].port_id for n in m.src if n in ports]
            dst = [ports[n].port_id for n in m.dst if n in ports]
        filt = None
        if m.filter:
            filt = filter_key(parse_match(m.filter))
        return {"out": out, "src": [i for i in src if i != out],
                "dst": [i for i in dst if i != out],
                "vlan": -1 if m.vlan is None else m.vlan, "filter": filt}

    def apply(self, bridge) -> None:
        """Resolve the bridge's mirrors against its ports now and hand them to the
        datapath (the counters of a mirror that stays active go on)."""
        specs, names = [], []
        before = self.applied.get(bridge.name, [])
        for m in self.defs.get(bridge.name, {}).values():
            spec = self._resolve(bridge, m, bridge.match_of)
            if spec is None:
                continue
            spec["carry"] = before.index(m.name) if m.name in before else -1
            specs.append(spec)
            names.append(m.name)
        if not specs and not before:
            return
        self.datapath.set_mirrors(bridge.bridge_id, specs)
        self.applied[bridge.name] = names

    def rows(self, bridge) -> list[dict]:
        """What list-mirrors shows: every mirror, active or not, with its counters."""
        stats = dict(zip(self.applied.get(bridge.name, []),
                         self.datapath.mirror_stats(bridge.bridge_id), strict=True))
        out = []
        for m in self.defs.get(bridge.name, {}).values():
            if m.transient:
                continue
            tx_packets, tx_bytes, no_copy = stats.get(m.name, (0, 0, 0))
            out.append({"bridge": bridge.name, "name": m.name, **m.options(),
                        "active": m.name in stats, "tx_packets": tx_packets,
                        "tx_bytes": tx_bytes, "no_copy": no_copy})
        return out
