# Guest memory tables for the compiled data path: region structs and bounds-checked
# translation of guest-physical and front-end-virtual addresses to host pointers.
from libc.stdint cimport uint8_t, uint32_t, uint64_t

cdef enum:
    MAX_REGIONS = 509

cdef struct mem_region_t:
    uint64_t gpa        # guest physical address of the first byte
    uint64_t size
    uint64_t uva        # front-end (QEMU) virtual address of the first byte
    uint64_t host       # our address of the first byte

cdef struct memtable_t:
    uint32_t n
    mem_region_t r[MAX_REGIONS]


cdef inline uint8_t *gpa_to_host(const memtable_t *m, uint64_t gpa, uint64_t *length) noexcept nogil:
    """Host pointer for ``gpa``; ``*length`` is cut to the bytes contiguous in that region.

    NULL when ``gpa`` lies in no region."""
    cdef uint32_t i
    cdef const mem_region_t *r
    cdef uint64_t off
    for i in range(m.n):
        r = &m.r[i]
        off = gpa - r.gpa
        if gpa >= r.gpa and off < r.size:
            if length[0] > r.size - off:
                length[0] = r.size - off
            return <uint8_t *>(r.host + off)
    return NULL


cdef inline uint8_t *uva_to_host(const memtable_t *m, uint64_t uva, uint64_t length) noexcept nogil:
    """Host pointer for ``length`` bytes at front-end address ``uva``, all in one region, or NULL."""
    cdef uint32_t i
    cdef const mem_region_t *r
    cdef uint64_t off
    for i in range(m.n):
        r = &m.r[i]
        off = uva - r.uva
        if uva >= r.uva and off < r.size:
            if length > r.size - off:
                return NULL
            return <uint8_t *>(r.host + off)
    return NULL


cdef class Mapping:
    cdef readonly uint64_t addr
    cdef readonly uint64_t length
    cdef readonly bint closed


cdef class MemTable:
    cdef memtable_t *table
    cdef readonly list mappings
    cdef readonly list regions
