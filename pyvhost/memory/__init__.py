"""pyvhost.memory: guest memory regions as a vhost-user back-end sees them.

``GuestMemory`` validates regions (size, overflow, overlap, file bounds), maps each region's
fd, and builds the immutable compiled ``MemTable`` the data path translates through. It
never touches rings: swapping a new table into the rings (under their locks) and closing
the retired mappings afterwards is the backend's job. Depends on pyvhost._memory only.
"""

from __future__ import annotations

import fcntl
import logging
import os
import stat
from dataclasses import dataclass

from pyvhost._memory import Mapping, MemTable

MAX_SLOTS = 509
log = logging.getLogger("pyvhost.memory")

_strict_fds = False


def set_strict_fds(strict: bool) -> None:
    """The process-wide default (``--strict-fds``): refuse memory and dirty-log fds that
    cannot be sealed against shrinking. Without it they are taken, and a truncation is
    survived (the rings catch the SIGBUS and the device is dropped)."""
    global _strict_fds
    _strict_fds = bool(strict)


def strict_fds() -> bool:
    return _strict_fds


class GuestMemoryError(ValueError):
    """A region that cannot be accepted; the message says which and why."""


@dataclass(frozen=True)
class Region:
    guest_phys_addr: int
    size: int
    userspace_addr: int
    mmap_offset: int
    mapping: Mapping

    @property
    def gpa_end(self) -> int:
        return self.guest_phys_addr + self.size

    @property
    def uva_end(self) -> int:
        return self.userspace_addr + self.size

    def describe(self) -> str:
        return (f"gpa {self.guest_phys_addr:#x}+{self.size:#x} uva {self.userspace_addr:#x} "
                f"offset {self.mmap_offset:#x}")


def seal_against_shrinking(fd: int) -> bool:
    """Seal ``fd`` against shrinking; True when it can no longer shrink (sealed now, or
    sealed already: QEMU seals its memfds with F_SEAL_SEAL too, so adding fails there).

    A front-end that truncated a file we map would make our next access to it raise
    SIGBUS. Only memfds created with MFD_ALLOW_SEALING can be sealed; hugetlbfs and tmpfs
    files, plain files and other memfds cannot (False)."""
    try:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    except OSError:
        pass
    try:
        return bool(fcntl.fcntl(fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK)
    except OSError:
        return False            # not a memfd: no seals at all


def check_sealed(fd: int, what: str, strict: bool | None = None) -> None:
    """Seal ``fd`` (a region or the dirty log); one that cannot be sealed is refused with
    GuestMemoryError when ``strict`` (default: the ``--strict-fds`` setting), else logged
    and taken: the rings survive its truncation and the device is dropped then."""
    if seal_against_shrinking(fd):
        return
    if _strict_fds if strict is None else strict:
        raise GuestMemoryError(f"{what} fd cannot be sealed against shrinking (not a memfd "
                               "created with MFD_ALLOW_SEALING); refused (--strict-fds)")
    log.info("%s fd cannot be sealed against shrinking: a truncation will drop the device",
             what)


def _map_fd(fd: int, size: int, mmap_offset: int, strict: bool | None = None) -> Mapping:
    """Map [0, mmap_offset + size) of ``fd`` rounded up to its block size; closes ``fd``."""
    try:
        st = os.fstat(fd)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            raise GuestMemoryError(f"memory fd is not a file (mode {st.st_mode:#o})")
        check_sealed(fd, "memory region", strict)   # sealed first, then the size is final
        st = os.fstat(fd)
        end = mmap_offset + size
        if stat.S_ISREG(st.st_mode) and end > st.st_size:
            raise GuestMemoryError(
                f"region ends at file offset {end:#x}, past the file's {st.st_size:#x} bytes")
        block = max(st.st_blksize, os.sysconf("SC_PAGE_SIZE"))
        length = (end + block - 1) // block * block
        try:
            return Mapping(fd, length)
        except OSError as e:
            raise GuestMemoryError(f"cannot map region: {e}") from None
    finally:
        os.close(fd)


def _overlaps(a0: int, a1: int, b0: int, b1: int) -> bool:
    return a0 < b1 and b0 < a1


class GuestMemory:
    """The regions of one front-end connection, and the table built from them."""

    def __init__(self, max_regions: int = MAX_SLOTS, strict_fds: bool | None = None):
        self.max_regions = max_regions
        self.strict_fds = strict_fds        # None: the process-wide set_strict_fds()
        self.regions: list[Region] = []
        self._refs: dict[int, int] = {}     # ADD_MEM_REG count per region
        self.table = MemTable([])

    def _check_new(self, gpa: int, size: int, uva: int, others: list[Region]) -> None:
        if size == 0:
            raise GuestMemoryError("region of size 0")
        if gpa + size > 1 << 64 or uva + size > 1 << 64:
            raise GuestMemoryError("region overflows the address space")
        for r in others:
            if _overlaps(gpa, gpa + size, r.guest_phys_addr, r.gpa_end):
                raise GuestMemoryError(f"guest range {gpa:#x}+{size:#x} overlaps {r.describe()}")
            if _overlaps(uva, uva + size, r.userspace_addr, r.uva_end):
                raise GuestMemoryError(f"user range {uva:#x}+{size:#x} overlaps {r.describe()}")
        if len(others) >= self.max_regions:
            raise GuestMemoryError(f"more than {self.max_regions} regions")

    def _make_region(self, desc, fd: int, others: list[Region]) -> Region:
        try:
            self._check_new(desc.guest_phys_addr, desc.size, desc.userspace_addr, others)
        except GuestMemoryError:
            os.close(fd)
            raise
        mapping = _map_fd(fd, desc.size, desc.mmap_offset, self.strict_fds)
        return Region(desc.guest_phys_addr, desc.size, desc.userspace_addr, desc.mmap_offset,
                      mapping)

    def _rebuild(self, regions: list[Region]) -> MemTable:
        self.regions = regions
        self._refs = {id(r): self._refs.get(id(r), 1) for r in regions}
        self.table = MemTable([(r.guest_phys_addr, r.size, r.userspace_addr, r.mapping,
                                r.mmap_offset) for r in regions])
        return self.table

    def replace(self, descs, fds: list[int]) -> list[Mapping]:
        """SET_MEM_TABLE: map the new regions (all or none); returns the retired mappings.

        Takes ownership of ``fds`` (one per region) in every case."""
        fds = list(fds)
        new: list[Region] = []
        try:
            for desc in descs:
                new.append(self._make_region(desc, fds.pop(0), new))
        except GuestMemoryError:
            for fd in fds:
                os.close(fd)
            for r in new:
                r.mapping.close()
            raise
        retired = [r.mapping for r in self.regions]
        self._rebuild(new)
        return retired

    def _find(self, desc) -> Region | None:
        key = (desc.guest_phys_addr, desc.size, desc.userspace_addr)
        for r in self.regions:
            if (r.guest_phys_addr, r.size, r.userspace_addr) == key:
                return r
        return None

    def add(self, desc, fd: int) -> list[Mapping]:
        """ADD_MEM_REG: one more region.

        QEMU sends the same region once per vhost device sharing the socket (one per
        queue pair): an identical region is counted, not mapped twice."""
        same = self._find(desc)
        if same is not None:
            os.close(fd)
            self._refs[id(same)] += 1
            return []
        region = self._make_region(desc, fd, self.regions)
        self._refs[id(region)] = 1
        self._rebuild(self.regions + [region])
        return []

    def remove(self, desc) -> list[Mapping]:
        """REM_MEM_REG: the region with this guest address, size and user address; it goes
        when every ADD_MEM_REG of it has been matched by a removal."""
        r = self._find(desc)
        if r is None:
            raise GuestMemoryError(f"no region at gpa {desc.guest_phys_addr:#x}+{desc.size:#x}")
        self._refs[id(r)] -= 1
        if self._refs[id(r)] > 0:
            return []
        self._rebuild([x for x in self.regions if x is not r])
        return [r.mapping]

    def clear(self) -> list[Mapping]:
        retired = [r.mapping for r in self.regions]
        self._rebuild([])
        return retired


__all__ = ["GuestMemory", "GuestMemoryError", "MAX_SLOTS", "MemTable", "Region",
           "check_sealed", "seal_against_shrinking", "set_strict_fds", "strict_fds"]
