"""A bridge: its ports, its rules (kept in a compiled classifier, by id) and its compiled MAC
table. Turns parsed flows into classifier entries (ports resolved to datapath ids, actions
to datapath ops), re-resolves rules when the ports they name come or go, applies batches
of changes all or nothing, and answers dump/del selections and ``trace``. The per-packet
path never comes here: PMDs use the classifier and MAC table directly. No packets, rings
or sockets here.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from dataclasses import dataclass

from pyvhost._classifier import NO_GOTO_TABLE, Classifier, key_after
from pyvhost._fdb import MacTable
from pyvhost._flow import ACTION_OPS, key_dict, pack_key

from .flows import Flow, Selector, key_fields, match_key, metadata_key, parse_flow

log = logging.getLogger("pyvhost.switch")

OP_OUTPUT, OP_FLOOD, OP_SET_VLAN, OP_STRIP_VLAN, OP_NORMAL, OP_CONTROLLER, OP_IN_PORT, \
    OP_GROUP = (ACTION_OPS[k] for k in ("output", "flood", "set_vlan", "strip_vlan", "normal",
                                        "controller", "in_port", "group"))
OP_METER = ACTION_OPS["meter"]
OP_TUN_HI, OP_SET_TUN_ID, OP_SET_TUN_DST = (
    ACTION_OPS[k] for k in ("tun_hi", "set_tun_id", "set_tun_dst"))
OP_DEC_TTL = ACTION_OPS["dec_ttl"]
SET_FIELD_OPS = {"eth_src": ACTION_OPS["set_eth_src"], "eth_dst": ACTION_OPS["set_eth_dst"],
                 "ip_src": ACTION_OPS["set_nw_src"], "ip_dst": ACTION_OPS["set_nw_dst"],
                 "tcp_src": ACTION_OPS["set_tp_src"], "tcp_dst": ACTION_OPS["set_tp_dst"],
                 "udp_src": ACTION_OPS["set_tp_src"], "udp_dst": ACTION_OPS["set_tp_dst"],
                 "ip_dscp": ACTION_OPS["set_dscp"], "vlan_pcp": ACTION_OPS["set_pcp"]}
NO_PORT = 0xFFFF          # an in_port no packet has: the rule's port is gone
NO_PACKET_PORT = 0xFFFE   # trace of a packet given without in_port (matches no in_port rule)
IN_PORT_MASK = pack_key({"in_port": 0xFFFF})
NORMAL_MASK = pack_key({"vlan_tci": 0xFFFF, "dl_src": b"\xff" * 6, "dl_dst": b"\xff" * 6})
REMOTE_MASK = pack_key({"tun_id": 0xFFFFFFFF, "tun_src": b"\xff" * 4})   # per-remote ports
DEFAULT_MAC_TABLE_SIZE = 8192
DEFAULT_MAC_AGING = 300


@dataclass(slots=True)
class Rule:
    """A rule of the bridge. Its text (``Flow.format()``, what the store keeps) is the only
    copy on this side: a parsed Flow costs ~500 bytes and a bridge holds 100k rules, so
    ``flow`` parses it again when asked (the classifier has the compiled rule)."""

    text: str
    id: int               # the classifier's id
    created: float        # time.monotonic()
    row: int = 0          # the store's row
    final: tuple | None = None    # once removed and reclaimed: its last counters

    @property
    def flow(self) -> Flow:
        return parse_flow(self.text)


class Bridge:
    """Rules and learning for one bridge; ``ports`` maps names to objects with ``port_id``,
    ``ofport`` and ``name`` (the switch's Port). Control-thread only; ``lock`` guards the
    Python maps against readers on other threads."""

    def __init__(self, name: str, bridge_id: int, mac_table_size: int = DEFAULT_MAC_TABLE_SIZE,
                 mac_aging: int = DEFAULT_MAC_AGING):
        self.lock = threading.Lock()
        self.pmd_stuck = False        # the last grace period timed out (see reclaim)
        self.name = name
        self.bridge_id = bridge_id
        self.ports: dict = {}
        self.rules: dict[int, Rule] = {}
        self.timed: set[int] = set()                   # ids of rules with timeouts
        self._by_priority: dict[tuple[int, int], set[int]] | None = None   # see same_priority
        self._priority_of: dict[int, tuple[int, int]] = {}
        self.cls = Classifier()
        self.macs = MacTable(mac_table_size, mac_aging)
        self.mac_limits: dict[str, int] = {}           # port name -> MAC limit
        self.groups = None                             # switch.groups.Groups, made on use
        self.meters = None                             # switch.meters.Meters, made on use

    # -- ports ----------------------------------------------------------------------------
    def resolve(self, ref: str):
        """A port by name or OpenFlow port number, or None."""
        if ref in self.ports:
            return self.ports[ref]
        if ref.isdigit():
            for p in self.ports.values():
                if p.ofport == int(ref):
                    return p
        return None

    def ofport_number(self, ref: str) -> int:
        """The OpenFlow number a port reference stands for: its port's, or, for a port
        that went, the number it names (0: a name, whose number went with the port)."""
        port = self.resolve(ref)
        return port.ofport if port is not None else int(ref) if ref.isdigit() else 0

    def attach(self, port) -> None:
        with self.lock:
            self.ports = {**self.ports, port.name: port}
            if port.name in self.mac_limits:
                self.macs.set_port_limit(port.port_id, self.mac_limits[port.name])
        self._reresolve({port.name, str(port.ofport)})
        if self.groups is not None:
            self.groups.recompile()

    def detach(self, port) -> None:
        with self.lock:
            self.ports = {k: v for k, v in self.ports.items() if k != port.name}
        self._reresolve({port.name, str(port.ofport)})
        if self.groups is not None:
            self.groups.recompile()

    def forget(self, port) -> None:
        """The port is out of the datapath (no PMD polls it): drop what it taught."""
        self.macs.forget_port(port.port_id)
        self.macs.set_port_limit(port.port_id, 0)

    def reresolve(self, refs: set[str]) -> None:
        """Rules naming these ports (or ``group:N``, ``meter:N``) compile again."""
        self._reresolve(refs)

    def _reresolve(self, refs: set[str]) -> None:
        """Rules naming these ports compile again (a port came or went)."""
        # a walk of every rule (ports come and go rarely; an index would cost ~80 bytes
        # per rule, and rules are what a bridge holds 100k of)
        maybe = [r for r in self.rules.values() if any(ref in r.text for ref in refs)]
        pairs = [(r, f) for r, f in ((r, r.flow) for r in maybe)
                 if not refs.isdisjoint(self._refs(f))]
        if not pairs:
            return
        self.apply(add=[f for _, f in pairs], remove=[r for r, _ in pairs], same_rules=True)

    # -- compiling rules ------------------------------------------------------------------
    def _refs(self, flow: Flow) -> set[str]:
        actions = flow.all_actions()
        refs = {a[1] for a in actions if a[0] == "output"} | \
            {f"{a[0]}:{a[1]}" for a in actions if a[0] in ("group", "meter")}
        if "in_port" in flow.match:
            refs.add(flow.match["in_port"])
        return refs

    def port_refs(self, flow: Flow) -> set[str]:
        """The ports (names or numbers, as written) a flow's outputs and in_port name."""
        refs = {a[1] for a in flow.all_actions() if a[0] == "output"}
        if "in_port" in flow.match:
            refs.add(flow.match["in_port"])
        return refs

    def check(self, flow: Flow, match: bool = True) -> None:
        """ValueError if the flow names a port this bridge does not have (in its actions;
        and, ``match``, in its in_port: not for a rule given new actions, whose in_port may
        name a port that went since)."""
        for a in flow.all_actions():
            if a[0] == "output" and self.resolve(a[1]) is None:
                raise ValueError(f"output: no port {a[1]!r} on bridge {self.name}")
        if match and "in_port" in flow.match and self.resolve(flow.match["in_port"]) is None:
            raise ValueError(f"in_port: no port {flow.match['in_port']!r} on bridge {self.name}")

    def match_of(self, match: dict) -> tuple[bytes, bytes]:
        in_port = NO_PORT
        if "in_port" in match:
            port = self.resolve(match["in_port"])
            in_port = port.port_id if port is not None else NO_PORT
        return match_key(match, in_port)

    def _ops(self, flow: Flow) -> list[tuple[int, int]]:
        return self.action_ops(flow.actions)

    def _inst(self, flow: Flow) -> tuple | None:
        """The classifier's form of the flow's other instructions (None: none)."""
        inst = flow.inst
        if inst is None:
            return None
        write = self.action_ops(inst.write_actions) if inst.write_actions else []
        return write, inst.clear_actions, inst.write_metadata

    def rule_match(self, match: dict) -> tuple[bytes, bytes]:
        """(mask, value) of a match as a rule's: the flow key's bytes, then metadata."""
        mask, value = self.match_of(match)
        md_mask, md_value = metadata_key(match)
        return mask + md_mask, value + md_value

    def action_ops(self, actions: tuple) -> list[tuple[int, int]]:
        """Model actions as datapath ops (ports resolved; a port that is gone: nothing)."""
        ops = []
        for a in actions:
            if a[0] == "output":
                port = self.resolve(a[1])
                if port is not None:                   # a port that went: nothing
                    ops.append((OP_OUTPUT, port.port_id))
            elif a[0] == "flood":
                ops.append((OP_FLOOD, 0))
            elif a[0] == "mod_vlan_vid":
                ops.append((OP_SET_VLAN, a[1]))
            elif a[0] == "strip_vlan":
                ops.append((OP_STRIP_VLAN, 0))
            elif a[0] == "normal":
                ops.append((OP_NORMAL, 0))
            elif a[0] in ("set_tun_id", "set_tun_dst"):     # 32 bits: two 16-bit ops
                v = a[1] if a[0] == "set_tun_id" else int.from_bytes(a[1].addr, "big")
                ops.append((OP_TUN_HI, v >> 16))
                ops.append((OP_SET_TUN_ID if a[0] == "set_tun_id" else OP_SET_TUN_DST,
                            v & 0xFFFF))
            elif a[0] == "set_field":               # wide values: 16 bits per op, high first
                v = int.from_bytes(a[2], "big") if isinstance(a[2], bytes) else a[2]
                for shift in range(16 * (len(a[2]) // 2 - 1) if isinstance(a[2], bytes) else 0,
                                   0, -16):
                    ops.append((OP_TUN_HI, (v >> shift) & 0xFFFF))
                ops.append((SET_FIELD_OPS[a[1]], v & 0xFFFF))
            elif a[0] == "dec_ttl":
                ops.append((OP_DEC_TTL, 0))
            elif a[0] == "controller":
                ops.append((OP_CONTROLLER, a[1]))
            elif a[0] == "in_port":
                ops.append((OP_IN_PORT, 0))
            elif a[0] == "group":
                slot = self.groups.slot(a[1]) if self.groups is not None else None
                if slot is not None:                   # a group that does not exist: nothing
                    ops.append((OP_GROUP, slot))
            elif a[0] == "meter":
                slot = self.meters.slot(a[1]) if self.meters is not None else None
                if slot is not None:                   # a meter that does not exist: none
                    ops.append((OP_METER, slot))
        return ops

    def spec(self, flow: Flow) -> tuple:
        """The flow as the classifier takes it: (table, priority, mask, value, ops, goto,
        other instructions)."""
        mask, value = self.rule_match(flow.match)
        goto = NO_GOTO_TABLE if flow.goto_table is None else flow.goto_table
        return flow.table, flow.priority, mask, value, self._ops(flow), goto, self._inst(flow)

    def find(self, spec: tuple) -> Rule | None:
        """The rule with the spec's table, priority and match, if any."""
        rid = self.cls.find_strict(*spec[:4])
        return self.rules.get(rid) if rid >= 0 else None

    def identity(self, spec: tuple) -> tuple:
        """What makes two rules the same rule (OpenFlow: table, priority and match), as
        compiled: in_port=1 and in_port=vm1 are one match when vm1 is OpenFlow port 1.
        (table, priority, mask, value): a spec's value has no bits outside its mask
        (match_key, metadata_key), as the classifier keeps a rule's."""
        return spec[:4]

    def rule_identity(self, rule: Rule) -> tuple:
        """``identity`` of a rule in the classifier."""
        return self.cls.rule(rule.id)

    # -- changes --------------------------------------------------------------------------
    def apply(self, add: list[Flow] = (), remove: list[Rule] = (), modify: list = (),
              same_rules: bool = False, now: float | None = None,
              specs: list[tuple] | None = None) -> list[Rule]:
        """One change that lookups see whole: add flows, remove rules, give rules new
        actions ((rule, flow) pairs; counters stay). All or nothing: ValueError before
        anything changes. Returns the added rules (in ``add`` order). ``same_rules``: each
        added flow is the removed rule at its index compiled again (its id, age and store
        row carry over: what knows a rule by id, as OpenFlow's flags, still does).
        ``specs``: those of ``add`` when the caller has them already."""
        now = time.monotonic() if now is None else now
        specs = [self.spec(f) for f in add] if specs is None else specs
        changes = [(r.id, self._ops(f), NO_GOTO_TABLE if f.goto_table is None else f.goto_table,
                    self._inst(f)) for r, f in modify]
        before = dict(zip(map(id, add), remove, strict=True)) if same_rules else {}
        carry = [(r.id, i) for i, r in enumerate(remove)] if same_rules else []
        ids = self.cls.apply(specs, changes, [r.id for r in remove], carry)
        with self.lock:
            for r in remove:
                self._forget(r)
            for r, f in modify:
                r.text = f.format()
                self._index(r, f)
            added = []
            for f, rid in zip(add, ids, strict=True):
                old = before.get(id(f))
                text = f.format()
                rule = Rule(text, rid, now) if old is None else \
                    Rule(text, rid, old.created, old.row)
                self.rules[rid] = rule
                self._index(rule, f)
                added.append(rule)
        return added

    def _index(self, rule: Rule, flow: Flow) -> None:
        if flow.idle_timeout or flow.hard_timeout:
            self.timed.add(rule.id)
        else:
            self.timed.discard(rule.id)
        if self._by_priority is not None:
            self._unlist(rule.id)
            self._list(rule.id, (flow.table, flow.priority))

    def _forget(self, rule: Rule) -> None:
        self.rules.pop(rule.id, None)
        self.timed.discard(rule.id)
        if self._by_priority is not None:
            self._unlist(rule.id)

    def _list(self, rule_id: int, key: tuple[int, int]) -> None:
        self._by_priority.setdefault(key, set()).add(rule_id)
        self._priority_of[rule_id] = key

    def _unlist(self, rule_id: int) -> None:
        key = self._priority_of.pop(rule_id, None)
        if key is not None:
            ids = self._by_priority[key]
            ids.discard(rule_id)
            if not ids:
                del self._by_priority[key]

    def same_priority(self, table: int, priority: int) -> list[Rule]:
        """The rules of ``table`` with ``priority`` (OpenFlow's CHECK_OVERLAP compares
        only those): an index made on the first question and kept from then on, so a
        bridge that is never asked pays nothing for it."""
        if self._by_priority is None:
            self._by_priority, self._priority_of = {}, {}
            for rule_id in self.rules:
                self._list(rule_id, tuple(self.cls.rule(rule_id)[:2]))
        return [self.rules[i] for i in self._by_priority.get((table, priority), ())]

    # -- selections -----------------------------------------------------------------------
    def select(self, sel: Selector | None, strict: bool = False) -> list[Rule]:
        """The rules a del-flows/dump-flows selector names (all if None), in table and
        priority order."""
        if sel is None:
            found = list(self.rules.values())
        else:
            mask, value = self.rule_match(sel.match)
            port = sel.match.get("in_port")
            if port is not None and self.resolve(port) is None:
                # a port that went: rules naming it are compiled to match no port, as the
                # selector is; of those, the ones that name it as the selector does
                table = -1 if sel.table is None else sel.table
                found = [self.rules[i] for i in self.cls.select(table, mask, value)
                         if not strict or self.cls.rule(i)[1:] == (sel.priority, mask, value)]
                found = [r for r in found if r.flow.match.get("in_port") == port]
            elif strict:
                tables = [sel.table] if sel.table is not None else self.cls.tables()
                ids = [self.cls.find_strict(t, sel.priority, mask, value) for t in tables]
                found = [self.rules[i] for i in ids if i >= 0]
            else:
                table = -1 if sel.table is None else sel.table
                found = [self.rules[i] for i in self.cls.select(table, mask, value)]
            if sel.cookie_mask:
                found = [r for r in found
                         if (r.flow.cookie ^ sel.cookie) & sel.cookie_mask == 0]
        place = self.cls.place
        return sorted(found, key=lambda r: (*place(r.id), r.created, r.id))

    def counters(self, rule: Rule) -> tuple[int, int, int]:
        """(packets, bytes, ns of the last packet or 0); of a removed rule, what it had
        counted when it was reclaimed (no PMD could count into it any more)."""
        if rule.final is not None:
            return rule.final
        return self.cls.stats(rule.id)

    def reclaim(self, datapath, removed: list[Rule] = (), timeout: float = 5.0,
                synchronized: bool = False) -> None:
        """Free removed rules once no PMD of ``datapath`` can still be counting into them
        (``synchronized``: the caller has just waited for that); what PMDs counted into a
        rule compiled again after it was goes to its successor, and the ``removed`` rules
        take their final counters (by id: the last of an id is the latest removal). If
        the PMDs cannot be waited for, the rules stay in memory (logged)."""
        if not self.cls.reclaimable:
            return
        if not synchronized:
            try:
                # (a PMD that did not answer last time: asked briefly, not waited for again)
                datapath.synchronize(0.1 if self.pmd_stuck else timeout)
            except TimeoutError as e:
                if not self.pmd_stuck:
                    log.error("bridge %s: removed rules kept in memory: %s", self.name, e)
                self.pmd_stuck = True
                return
        self.pmd_stuck = False
        last = dict(self.cls.reclaim())
        for r in removed:
            if r.id in last:
                r.final = last[r.id]

    def expired(self, now_ns: int) -> list[Rule]:
        """Rules whose idle or hard timeout has passed."""
        out = []
        for rid in list(self.timed):
            rule = self.rules[rid]
            f = rule.flow
            created_ns = int(rule.created * 1e9)
            used = max(self.cls.stats(rid)[2], created_ns)
            if (f.hard_timeout and now_ns - created_ns >= f.hard_timeout * 1_000_000_000) or \
                    (f.idle_timeout and now_ns - used >= f.idle_timeout * 1_000_000_000):
                out.append(rule)
        return out

    # -- trace ----------------------------------------------------------------------------
    def trace(self, match: dict) -> dict:
        """What the datapath would do with a packet given in flow syntax: the rules it meets
        in each table (the same classifier lookup PMDs run), the actions, the output port
        names (NORMAL and flood resolved without learning, a group to the buckets it picks
        for this packet, CONTROLLER by that name) and the megaflow mask."""
        port = self.resolve(match["in_port"]) if "in_port" in match else None
        if "in_port" in match and port is None:
            raise ValueError(f"in_port: no port {match['in_port']!r} on bridge {self.name}")
        fields = key_fields(match)
        fields["in_port"] = port.port_id if port is not None else NO_PACKET_PORT
        key = pack_key(fields)
        hops, ops, mask, overflow = self.cls.lookup(key)
        by_id = {p.port_id: p for p in self.ports.values()}
        outputs: list[str] = []
        if self.groups is not None and any(op == OP_GROUP for op, _ in ops):
            resolved = []
            for op, arg in ops:                      # as the upcall resolves them
                if op == OP_GROUP:
                    group_ops, group_mask = self.groups.table.resolve(arg, key)
                    resolved += group_ops
                    mask = bytes(a | b for a, b in zip(mask, group_mask, strict=True))
                else:
                    resolved.append((op, arg))
            ops = resolved
        for i, (op, arg) in enumerate(ops):
            if op == OP_CONTROLLER:
                outputs.append("CONTROLLER")
            elif op == OP_IN_PORT and port is not None:
                outputs.append(port.name)
            if op == OP_OUTPUT and (port is None or arg != port.port_id) and arg in by_id:
                outputs.append(by_id[arg].name)
            elif op == OP_FLOOD:
                outputs += [p.name for p in self.ports.values() if p is not port]
            elif op == OP_NORMAL:                       # on the packet as edited so far
                edited, decided = key_after(key, ops[:i])
                mask = bytes(a | b for a, b in zip(mask, decided, strict=True))
                outputs += self._normal_outputs(key_dict(edited), port)
        if any(op == OP_NORMAL for op, _ in ops):        # as the datapath widens it
            mask = bytes(a | b for a, b in zip(mask, NORMAL_MASK, strict=True))
            if port is not None and port.per_remote:     # the remote it learns
                mask = bytes(a | b for a, b in zip(mask, REMOTE_MASK, strict=True))
        mask = bytes(a | b for a, b in zip(mask, IN_PORT_MASK, strict=True))
        rules = [(t, self.rules[rid]) for t, rid in hops]
        seen = set()
        outputs = [o for o in outputs if not (o in seen or seen.add(o))]
        return {"rules": rules, "outputs": outputs, "mask": mask, "overflow": overflow}

    def _normal_outputs(self, fields: dict, port) -> list[str]:
        dst = fields.get("dl_dst", bytes(6))
        tci = fields.get("vlan_tci", 0)
        others = [p.name for p in self.ports.values() if p is not port]
        if dst[0] & 1:
            return others
        out = self.macs.lookup(tci & 0xFFF if tci else 0, dst)
        if out is None:
            return others
        hit = [p.name for p in self.ports.values() if p.port_id == out and p is not port]
        return hit

    # -- MAC learning ---------------------------------------------------------------------
    def set_mac_limit(self, port, limit: int) -> None:
        self.mac_limits[port.name] = limit
        self.macs.set_port_limit(port.port_id, limit)

    def fdb_rows(self) -> list[tuple[str, int, str, int, str | None, int | None]]:
        """(port, vlan, mac, age, remote, key) rows, as ovs-appctl fdb/show prints them;
        remote and key (the VNI) are None but for MACs behind a per-remote port."""
        names = {p.port_id: p.name for p in self.ports.values()}
        rows = [(names.get(pid, str(pid)), vlan, mac.hex(":"), age,
                 None if remote is None else socket.inet_ntoa(remote),
                 None if remote is None else vni)
                for pid, vlan, mac, age, remote, vni in self.macs.rows()]
        return sorted(rows, key=lambda r: r[:4])
