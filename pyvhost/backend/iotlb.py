"""The IOTLB of one connection (VIRTIO_F_ACCESS_PLATFORM): IOVA -> front-end VA mappings.

The front-end (QEMU with a vIOMMU) sends IOTLB_MSG updates and invalidations; this cache
keeps them as sorted, non-overlapping ranges (adjacent ranges with contiguous addresses
and the same permission are merged), bounded in size, and compiles an immutable
``IotlbTable`` that the backend swaps into the rings under their locks. No I/O here.
"""

from __future__ import annotations

import bisect

from pyvhost._memory import IotlbTable

MAX_ENTRIES = 2048          # as DPDK's IOTLB cache; beyond it the oldest entries go
ADDR_END = 1 << 64


class Iotlb:
    """Mutable cache; ``table`` is the compiled snapshot of its current contents."""

    def __init__(self, max_entries: int = MAX_ENTRIES):
        self.max_entries = max_entries
        self._starts: list[int] = []
        self._entries: list[tuple[int, int, int, int]] = []   # (iova, last, uva, perm)
        self._age: dict[int, int] = {}      # iova of an entry -> insertion tick (eviction)
        self._tick = 0
        self.table = IotlbTable()
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def entries(self) -> list[tuple[int, int, int, int]]:
        return list(self._entries)

    def _remove_range(self, iova: int, last: int) -> None:
        """Cut [iova, last] out of every entry (splitting the ones it falls inside)."""
        i = bisect.bisect_right(self._starts, iova) - 1
        if i < 0 or self._entries[i][1] < iova:
            i += 1
        out: list[tuple[int, int, int, int]] = []
        j = i
        while j < len(self._entries) and self._entries[j][0] <= last:
            e_iova, e_last, e_uva, e_perm = self._entries[j]
            tick = self._age.pop(e_iova, self._tick)
            if e_iova < iova:
                out.append((e_iova, iova - 1, e_uva, e_perm))
                self._age[e_iova] = tick
            if e_last > last:
                out.append((last + 1, e_last, e_uva + (last + 1 - e_iova), e_perm))
                self._age[last + 1] = tick
            j += 1
        self._entries[i:j] = out
        self._starts[i:j] = [e[0] for e in out]

    def update(self, iova: int, size: int, uva: int, perm: int) -> None:
        last = iova + size - 1
        self._remove_range(iova, last)
        i = bisect.bisect_left(self._starts, iova)
        entry = (iova, last, uva, perm)
        self._tick += 1
        tick = self._tick
        # merge with neighbours that continue it in both address spaces
        if i > 0:
            p = self._entries[i - 1]
            if p[1] + 1 == iova and p[3] == perm and p[2] + (iova - p[0]) == uva:
                entry = (p[0], last, p[2], perm)
                self._age.pop(p[0], None)
                i -= 1
                del self._entries[i]
                del self._starts[i]
        if i < len(self._entries):
            n = self._entries[i]
            if last + 1 == n[0] and n[3] == perm and entry[2] + (n[0] - entry[0]) == n[2]:
                entry = (entry[0], n[1], entry[2], perm)
                self._age.pop(n[0], None)
                del self._entries[i]
                del self._starts[i]
        self._entries.insert(i, entry)
        self._starts.insert(i, entry[0])
        self._age[entry[0]] = tick
        while len(self._entries) > self.max_entries:
            oldest = min(self._age, key=self._age.__getitem__)
            k = bisect.bisect_left(self._starts, oldest)
            del self._entries[k]
            del self._starts[k]
            del self._age[oldest]
            self.evictions += 1
        self.table = IotlbTable(self._entries)

    def invalidate(self, iova: int, size: int) -> None:
        self._remove_range(iova, iova + size - 1)
        self.table = IotlbTable(self._entries)

    def clear(self) -> None:
        self._entries.clear()
        self._starts.clear()
        self._age.clear()
        self.table = IotlbTable()

    def covers(self, iova: int, perm: int) -> bool:
        """Does an entry map ``iova`` with (at least) ``perm``?"""
        i = bisect.bisect_right(self._starts, iova) - 1
        if i < 0:
            return False
        e = self._entries[i]
        return e[1] >= iova and e[3] & perm == perm


def overlaps(a: int, a_len: int, b: int, b_len: int) -> bool:
    return a < b + b_len and b < a + a_len
