"""Guest memory owned by a frontend: memfd regions mapped into this process, and a bump
allocator that places rings and packet buffers in them.

Region ``i`` is one memfd of ``size`` bytes at guest physical address ``gpa``; its
"frontend virtual address" (what SET_VRING_ADDR and SET_MEM_TABLE speak of) is simply where
we mapped it. Allocations go round-robin over the regions so that rings and buffers of a
multi-region memory really are spread over several regions. No sockets and no rings here.
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass

from pyvhost._memory import Mapping
from pyvhost.protocol import payloads as P

PAGE = 4096
REGION_GPA_STRIDE = 1 << 32      # region i starts at guest physical address i * 4 GiB


class MemoryFull(MemoryError):
    """No region has room for an allocation: give the frontend more memory."""


@dataclass
class MemfdRegion:
    fd: int
    gpa: int
    size: int
    mapping: Mapping
    used: int = 0

    @property
    def uva(self) -> int:
        return self.mapping.addr

    def describe(self) -> P.MemRegion:
        return P.MemRegion(self.gpa, self.size, self.uva, 0)


class FrontendMemory:
    """``regions`` memfd regions of ``size`` bytes each (rounded up to whole pages)."""

    def __init__(self, size: int = 64 << 20, regions: int = 1):
        if not 1 <= regions <= 8:
            raise ValueError("a memory table holds 1..8 regions")
        if size < PAGE:
            raise ValueError(f"region size {size} is smaller than a page")
        size = (size + PAGE - 1) // PAGE * PAGE
        self.regions: list[MemfdRegion] = []
        self._next = 0
        try:
            for i in range(regions):
                fd = os.memfd_create(f"pyvhost-frontend-{i}",
                                     os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
                try:
                    os.ftruncate(fd, size)
                    # sealed against resizing: a back-end that refuses unsealable fds
                    # (pyvhost switch --strict-fds) takes these
                    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
                    mapping = Mapping(fd, size)
                except BaseException:
                    os.close(fd)
                    raise
                self.regions.append(MemfdRegion(fd, i * REGION_GPA_STRIDE, size, mapping))
        except BaseException:
            self.close()
            raise

    def alloc(self, nbytes: int, align: int = 64) -> tuple[int, int]:
        """``nbytes`` zeroed bytes in one region: (host address, guest physical address)."""
        n = len(self.regions)
        for k in range(n):
            r = self.regions[(self._next + k) % n]
            start = (r.used + align - 1) // align * align
            if start + nbytes <= r.size:
                r.used = start + nbytes
                self._next = (self._next + k + 1) % n
                return r.uva + start, r.gpa + start
        raise MemoryFull(f"no region has {nbytes} free bytes "
                         f"({n} region(s) of {self.regions[0].size} bytes)")

    def uva(self, host: int) -> int:
        """The frontend virtual address of a host address: the same (we mapped it)."""
        return host

    def table(self) -> P.MemTable:
        return P.MemTable(tuple(r.describe() for r in self.regions))

    def fds(self) -> list[int]:
        return [r.fd for r in self.regions]

    def close(self) -> None:
        for r in self.regions:
            r.mapping.close()
            os.close(r.fd)
        self.regions = []
