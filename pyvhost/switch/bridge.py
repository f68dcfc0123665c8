"""A bridge: its ports, its rule table (priority order) and its MAC learning table, and
the slow-path classifier the datapath calls on a flow-cache miss (``classify``), which
turns the first matching rule into datapath ops (output, flood, VLAN edits) and resolves
the ``normal`` action through MAC learning. No packets, rings or sockets here.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass, field

from pyvhost._flow import ACTION_OPS

from .fdb import Fdb
from .flows import Flow, covers, key_matches

OP_OUTPUT, OP_FLOOD, OP_SET_VLAN, OP_STRIP_VLAN = (
    ACTION_OPS[k] for k in ("output", "flood", "set_vlan", "strip_vlan"))
NO_RULE = 0xFFFF          # beyond the datapath's rule slots: matched nothing, counted nowhere


NORMAL_FIELDS = frozenset({"in_port", "dl_src", "dl_dst", "dl_vlan"})


@dataclass
class Rule:
    flow: Flow
    slot: int
    seq: int
    created: float = 0.0
    fields: frozenset = field(default=frozenset())   # key fields this rule looks at

    def __post_init__(self):
        names = set(self.flow.match)
        if names & {"tp_src", "tp_dst"}:
            names.add("nw_proto")
        if any(a[0] == "normal" for a in self.flow.actions):
            names |= NORMAL_FIELDS
        self.fields = frozenset(names)


class Bridge:
    """Rules and learning for one bridge; ``ports`` maps names to objects with ``port_id``,
    ``ofport`` and ``name`` (the switch's Port).

    ``lock`` serialises the slow path (upcalls on PMD threads) with control changes on the
    asyncio thread; it is never held while waiting for a PMD."""

    def __init__(self, name: str, bridge_id: int, on_change, aging: float | None = None):
        self.lock = threading.Lock()
        self.name = name
        self.bridge_id = bridge_id
        self.ports: dict = {}
        self.rules: list[Rule] = []
        self.fdb = Fdb() if aging is None else Fdb(aging)
        self._seq = itertools.count()
        self._on_change = on_change      # the datapath must forget cached decisions

    # -- ports ----------------------------------------------------------------------------
    def next_ofport(self) -> int:
        used = {p.ofport for p in self.ports.values()}
        return next(n for n in itertools.count(1) if n not in used)

    def resolve(self, ref: str):
        """A port by name or OpenFlow port number, or None."""
        if ref in self.ports:
            return self.ports[ref]
        if ref.isdigit():
            for p in self.ports.values():
                if p.ofport == int(ref):
                    return p
        return None

    # -- rules ----------------------------------------------------------------------------
    def add_rule(self, flow: Flow, slot: int, now: float) -> Rule:
        with self.lock:
            return self._add_rule(flow, slot, now)

    def _add_rule(self, flow: Flow, slot: int, now: float) -> Rule:
        for a in flow.actions:
            if a[0] == "output" and self.resolve(a[1]) is None:
                raise ValueError(f"output: no port {a[1]!r} on bridge {self.name}")
        if "in_port" in flow.match and self.resolve(flow.match["in_port"]) is None:
            raise ValueError(f"in_port: no port {flow.match['in_port']!r} on bridge {self.name}")
        rule = Rule(flow, slot, next(self._seq), now)
        # a new list, never one sorted in place: PMD threads read it during upcalls
        self.rules = sorted(self.rules + [rule], key=lambda r: (-r.flow.priority, r.seq))
        self._on_change()
        return rule

    def remove_rules(self, pattern: dict | None) -> list[Rule]:
        """del-flows: every rule whose match covers ``pattern`` (all rules if None)."""
        with self.lock:
            return self._remove_rules(pattern)

    def _remove_rules(self, pattern: dict | None) -> list[Rule]:
        pattern = self._canonical(pattern or {})
        gone = [r for r in self.rules if covers(pattern, self._canonical(r.flow.match))]
        self.rules = [r for r in self.rules if r not in gone]
        self._on_change()
        return gone

    def _canonical(self, match: dict) -> dict:
        if "in_port" not in match:
            return match
        port = self.resolve(match["in_port"])
        return {**match, "in_port": port.name if port else match["in_port"]}

    # -- slow path ------------------------------------------------------------------------
    def classify(self, key: dict, in_port) -> tuple[int, list, frozenset]:
        """(rule slot, datapath ops, key fields the decision depended on) for a flow key
        arriving on ``in_port``. Every packet that agrees on those fields gets the same
        decision, so the datapath may cache it for all of them (a wildcard entry)."""
        with self.lock:
            return self._classify(key, in_port)

    def _classify(self, key: dict, in_port) -> tuple[int, list, frozenset]:
        consulted: frozenset = frozenset()
        for rule in self.rules:
            consulted |= rule.fields
            match = rule.flow.match
            if "in_port" in match:
                port = self.resolve(match["in_port"])
                match = {**match, "in_port": port.port_id if port else -1}
            if key_matches(match, key, in_port.port_id):
                return rule.slot, self._ops(rule.flow.actions, key, in_port), consulted
        return NO_RULE, [], consulted

    def _ops(self, actions: list, key: dict, in_port) -> list[tuple[int, int]]:
        ops = []
        for a in actions:
            if a[0] == "output":
                port = self.resolve(a[1])
                if port is not None:
                    ops.append((OP_OUTPUT, port.port_id))
            elif a[0] == "flood":
                ops.append((OP_FLOOD, 0))
            elif a[0] == "mod_vlan_vid":
                ops.append((OP_SET_VLAN, a[1]))
            elif a[0] == "strip_vlan":
                ops.append((OP_STRIP_VLAN, 0))
            elif a[0] == "normal":
                ops.extend(self._normal(key, in_port))
        return ops

    def _normal(self, key: dict, in_port) -> list[tuple[int, int]]:
        vlan = key["dl_vlan"] or 0
        if self.fdb.learn(vlan, key["dl_src"], in_port.name, in_port.port_id):
            self._on_change()
        if key["dl_dst"][0] & 1:
            return [(OP_FLOOD, 0)]
        out = self.fdb.lookup(vlan, key["dl_dst"])
        if out is None:
            return [(OP_FLOOD, 0)]
        if out == in_port.port_id:
            return []
        return [(OP_OUTPUT, out)]

    def expire(self) -> None:
        with self.lock:
            if self.fdb.expire():
                self._on_change()

    def attach(self, port) -> None:
        with self.lock:
            self.ports = {**self.ports, port.name: port}

    def detach(self, port) -> None:
        with self.lock:
            self.ports = {k: v for k, v in self.ports.items() if k != port.name}
            self.fdb.forget_port(port.port_id)

    def fdb_rows(self) -> list:
        with self.lock:
            return self.fdb.show()
