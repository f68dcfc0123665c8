"""The MAC learning table of a bridge (the "normal" action): (VLAN, MAC) -> port, with
aging. Plain Python on the slow path; the datapath caches its answers and is invalidated
by the bridge whenever an entry is added, moves or expires."""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass

DEFAULT_AGING = 300.0
MAX_ENTRIES = 8192


@dataclass
class FdbEntry:
    port: str
    port_id: int
    last_seen: float


class Fdb:
    def __init__(self, aging: float = DEFAULT_AGING, max_entries: int = MAX_ENTRIES):
        self.aging = aging
        self.max_entries = max_entries
        self.entries: OrderedDict[tuple[int, bytes], FdbEntry] = OrderedDict()   # LRU first

    def learn(self, vlan: int, mac: bytes, port: str, port_id: int,
              now: float | None = None) -> bool:
        """Record that ``mac`` is behind ``port``; True when that is new or moved."""
        if mac[0] & 1:                      # group addresses are never learned
            return False
        now = time.monotonic() if now is None else now
        key = (vlan, mac)
        entry = self.entries.get(key)
        if entry is not None and entry.port_id == port_id:
            entry.last_seen = now
            self.entries.move_to_end(key)
            return False
        if entry is None and len(self.entries) >= self.max_entries:
            self.entries.popitem(last=False)            # the least recently seen
        self.entries[key] = FdbEntry(port, port_id, now)
        self.entries.move_to_end(key)
        return True

    def lookup(self, vlan: int, mac: bytes) -> int | None:
        entry = self.entries.get((vlan, mac))
        return None if entry is None else entry.port_id

    def expire(self, now: float | None = None) -> int:
        """Drop entries older than the aging time; returns how many went."""
        now = time.monotonic() if now is None else now
        old = [k for k, e in self.entries.items() if now - e.last_seen > self.aging]
        for k in old:
            del self.entries[k]
        return len(old)

    def forget_port(self, port_id: int) -> int:
        gone = [k for k, e in self.entries.items() if e.port_id == port_id]
        for k in gone:
            del self.entries[k]
        return len(gone)

    def show(self, now: float | None = None) -> list[tuple[str, int, str, int]]:
        """(port, vlan, mac, age seconds) rows, as ovs-appctl fdb/show prints them."""
        now = time.monotonic() if now is None else now
        return [(e.port, vlan, mac.hex(":"), int(now - e.last_seen))
                for (vlan, mac), e in sorted(self.entries.items(),
                                             key=lambda kv: (kv[1].port, kv[0]))]
