# cython: language_level=3
"""Compiled guest-memory tables: fd mappings (mmap/munmap) and immutable region tables.

A ``Mapping`` is one mmap of a front-end's memory fd. A ``MemTable`` is an immutable list
of regions over mappings; the data path reads it through the inline translators of
_memory.pxd. Replacing a table is the backend's job (under the ring locks); this module
only maps, unmaps and translates. It knows nothing of rings or messages.
"""

from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free
from libc.errno cimport errno
from libc.string cimport memcpy, strerror
from posix.mman cimport MAP_FAILED, MAP_SHARED, PROT_READ, PROT_WRITE, mmap, munmap


cdef class Mapping:
    """A shared read-write mmap of ``length`` bytes of ``fd`` from file offset 0."""

    def __cinit__(self, int fd, uint64_t length):
        cdef void *p
        self.closed = True
        if length == 0:
            raise ValueError("cannot map 0 bytes")
        p = mmap(NULL, length, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
        if p == MAP_FAILED:
            err = errno
            raise OSError(err, f"mmap of {length} bytes failed: {strerror(err).decode()}")
        self.addr = <uint64_t>p
        self.length = length
        self.closed = False

    def close(self):
        if not self.closed:
            munmap(<void *>self.addr, self.length)
            self.closed = True

    def __dealloc__(self):
        self.close()


cdef class MemTable:
    """An immutable table of regions, each ``(gpa, size, uva, mapping, offset)``.

    ``offset`` is where the region starts inside ``mapping``; the mapping must hold it."""

    def __cinit__(self, regions=()):
        cdef Mapping m
        cdef uint64_t gpa, size, uva, offset
        self.table = <memtable_t *>calloc(1, sizeof(memtable_t))
        if self.table == NULL:
            raise MemoryError()
        self.mappings = []
        self.regions = []
        if len(regions) > MAX_REGIONS:
            raise ValueError(f"{len(regions)} regions, at most {MAX_REGIONS}")
        for gpa, size, uva, m, offset in regions:
            if m.closed or offset > m.length or size > m.length - offset:
                raise ValueError("region does not fit in its mapping")
            self.table.r[self.table.n].gpa = gpa
            self.table.r[self.table.n].size = size
            self.table.r[self.table.n].uva = uva
            self.table.r[self.table.n].host = m.addr + offset
            self.table.n += 1
            self.mappings.append(m)
            self.regions.append((gpa, size, uva, m, offset))

    def __dealloc__(self):
        free(self.table)

    def __len__(self):
        return self.table.n

    def gpa_to_host(self, uint64_t gpa, uint64_t length=1):
        """(host address, contiguous bytes) for a guest physical address; KeyError if unmapped."""
        cdef uint64_t n = length
        cdef uint8_t *p = gpa_to_host(self.table, gpa, &n)
        if p == NULL:
            raise KeyError(f"guest address {gpa:#x} is in no region")
        return <uint64_t>p, n

    def uva_to_host(self, uint64_t uva, uint64_t length):
        """Host address of ``length`` bytes at a front-end virtual address, in one region."""
        cdef uint8_t *p = uva_to_host(self.table, uva, length)
        if p == NULL:
            raise KeyError(f"front-end address {uva:#x}+{length} is not inside one region")
        return <uint64_t>p

    def read(self, uint64_t gpa, uint64_t length):
        """Copy ``length`` bytes of guest memory out (may cross regions); KeyError if unmapped."""
        out = bytearray(length)
        cdef uint8_t[::1] view = out
        cdef uint64_t done = 0, n
        cdef uint8_t *p
        while done < length:
            n = length - done
            p = gpa_to_host(self.table, gpa + done, &n)
            if p == NULL:
                raise KeyError(f"guest address {gpa + done:#x} is in no region")
            memcpy(&view[done], p, n)
            done += n
        return bytes(out)

    def write(self, uint64_t gpa, const uint8_t[::1] data):
        """Copy ``data`` into guest memory (may cross regions); KeyError if unmapped."""
        cdef uint64_t length = data.shape[0], done = 0, n
        cdef uint8_t *p
        while done < length:
            n = length - done
            p = gpa_to_host(self.table, gpa + done, &n)
            if p == NULL:
                raise KeyError(f"guest address {gpa + done:#x} is in no region")
            memcpy(p, &data[done], n)
            done += n


class IotlbMiss(KeyError):
    """An IOVA with no IOTLB entry: ask the front-end (``iova``, ``perm``)."""

    def __init__(self, iova, perm):
        super().__init__(f"IOVA {iova:#x} (perm {perm}) is not in the IOTLB")
        self.iova = iova
        self.perm = perm


cdef class IotlbTable:
    """An immutable IOTLB: ``(iova, last, uva, perm)`` entries, sorted and non-overlapping.

    The data path reads it through iotlb_find (_memory.pxd); the backend builds a new one for
    every change and swaps it into the rings under their locks."""

    def __cinit__(self, entries=()):
        cdef uint32_t i = 0
        cdef uint64_t prev_last = 0
        entries = tuple(entries)
        self.t.n = 0
        self.t.e = NULL
        if entries:
            self.t.e = <iotlb_entry_t *>calloc(len(entries), sizeof(iotlb_entry_t))
            if self.t.e == NULL:
                raise MemoryError()
        for iova, last, uva, perm in entries:
            if last < iova or (i and iova <= prev_last) or not 1 <= perm <= 3:
                raise ValueError("IOTLB entries must be sorted, non-overlapping, perm 1..3")
            self.t.e[i].iova = iova
            self.t.e[i].last = last
            self.t.e[i].uva = uva
            self.t.e[i].perm = perm
            prev_last = last
            i += 1
        self.t.n = i
        self.entries = entries

    def __dealloc__(self):
        free(self.t.e)

    def __len__(self):
        return self.t.n

    def translate(self, uint64_t iova, uint64_t length, uint32_t perm):
        """Front-end address of ``length`` bytes at ``iova``, all inside one entry that grants
        ``perm``. IotlbMiss when some byte has no entry; PermissionError when not granted;
        ValueError when the range spans entries whose addresses are not contiguous."""
        cdef const iotlb_entry_t *e
        cdef uint64_t pos = iova, end_last, uva = 0, expect = 0
        if length == 0:
            raise ValueError("zero-length translation")
        end_last = iova + length - 1
        if end_last < iova:
            raise ValueError("range wraps around 2^64")
        while True:
            e = iotlb_find(&self.t, pos)
            if e == NULL:
                raise IotlbMiss(pos, perm)
            if e.perm & perm != perm:
                raise PermissionError(f"IOVA {pos:#x}: perm {e.perm} does not grant {perm}")
            if pos == iova:
                uva = e.uva + (pos - e.iova)
            elif e.uva + (pos - e.iova) != expect:
                raise ValueError(f"IOVA range {iova:#x}+{length} is not contiguous")
            if e.last >= end_last:
                return uva
            expect = e.uva + (e.last - e.iova) + 1
            pos = e.last + 1
