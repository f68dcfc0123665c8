"""OpenFlow-style groups of a bridge (ALL, SELECT, INDIRECT, FAST_FAILOVER), as the rule
model has them (buckets of model actions, ports by name or number, a watch port), compiled
into the bridge's GroupTable (pyvhost._group) that the datapath's upcall resolves. Rules
name a group as ``group:N``; a rule naming a group that does not exist (yet) compiles to
no op, and compiles again when the group comes, as a rule naming a missing port does.
A bucket is live when it watches no port or its port is there and connected; liveness is
looked at again whenever ``refresh()`` is called (port changes, a periodic look).
No OpenFlow encoding here, no store: whoever makes groups keeps them."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from pyvhost import _group

TYPES = {"all": _group.ALL, "select": _group.SELECT, "indirect": _group.INDIRECT,
         "ff": _group.FAST_FAILOVER}


@dataclass
class Bucket:
    actions: tuple
    weight: int = 0
    watch_port: str | None = None


@dataclass
class Group:
    id: int
    type: str                                   # a key of TYPES
    buckets: list[Bucket]
    created: float = field(default_factory=time.monotonic)


class Groups:
    """A bridge's groups; made on the first group (the table costs ~0.6 MB)."""

    def __init__(self, bridge, datapath):
        self.bridge = bridge
        self.datapath = datapath
        self.table = _group.GroupTable()
        datapath.set_groups(bridge.bridge_id, self.table)
        self.groups: dict[int, Group] = {}
        self.slots: dict[int, int] = {}
        self._live: dict[int, list[bool]] = {}

    def slot(self, gid: int) -> int | None:
        return self.slots.get(gid)

    def _port_live(self, ref: str | None) -> bool:
        if ref is None:
            return True
        port = self.bridge.resolve(ref)
        return port is not None and bool(port.connected)

    def _compile(self, g: Group) -> None:
        live = [self._port_live(b.watch_port) for b in g.buckets]
        self.table.set(self.slots[g.id], TYPES[g.type],
                       [(b.weight, ok, self.bridge.action_ops(b.actions))
                        for b, ok in zip(g.buckets, live, strict=True)])
        self._live[g.id] = live

    def set(self, g: Group) -> None:
        """Add or replace group ``g.id`` (ValueError: too many groups, buckets, actions)."""
        new = g.id not in self.slots
        if new:
            used = set(self.slots.values())
            free = next((s for s in range(_group.SLOTS) if s not in used), None)
            if free is None:
                raise ValueError(f"at most {_group.SLOTS} groups")
            self.slots[g.id] = free
        try:
            self._compile(g)
        except ValueError:
            if new:
                del self.slots[g.id]
            raise
        self.groups[g.id] = g
        self.datapath.invalidate()
        if new:
            self.bridge.reresolve({f"group:{g.id}"})
            self.bridge.reclaim(self.datapath)     # the rules naming it, compiled again

    def delete(self, gid: int) -> None:
        slot = self.slots.pop(gid, None)
        if slot is None:
            return
        self.table.clear(slot)
        del self.groups[gid]
        self._live.pop(gid, None)
        self.datapath.invalidate()

    def recompile(self) -> None:
        """Ports came or went: buckets resolve their ports again."""
        for g in self.groups.values():
            self._compile(g)
        self.datapath.invalidate()

    def refresh(self) -> bool:
        """Look at the watched ports again; True (and caches invalidated) if a bucket's
        liveness changed."""
        changed = False
        for g in self.groups.values():
            live = [self._port_live(b.watch_port) for b in g.buckets]
            for i, (old, now) in enumerate(zip(self._live.get(g.id, []), live, strict=True)):
                if old != now:
                    self.table.set_live(self.slots[g.id], i, now)
                    changed = True
            self._live[g.id] = live
        if changed:
            self.datapath.invalidate()
        return changed

    def users(self, gid: int) -> list[tuple]:
        """(rule, how many times it names group ``gid``) for the bridge's rules that name
        it, in apply-actions or in write_actions."""
        ref = f"group:{gid}"
        out = []
        for r in self.bridge.rules.values():
            if ref in r.text:
                n = r.flow.all_actions().count(("group", gid))
                if n:
                    out.append((r, n))
        return out


def groups_of(bridge, datapath) -> Groups:
    """The bridge's Groups, made on first use."""
    if bridge.groups is None:
        bridge.groups = Groups(bridge, datapath)
    return bridge.groups
