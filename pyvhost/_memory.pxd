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


# -- IOTLB (VIRTIO_F_ACCESS_PLATFORM): I/O virtual address -> front-end virtual address --------

cdef enum:
    IOTLB_PERM_RO = 1       # the device may read
    IOTLB_PERM_WO = 2       # the device may write
    IOTLB_PERM_RW = 3

cdef struct iotlb_entry_t:
    uint64_t iova       # first byte
    uint64_t last       # last byte (iova + size - 1): a range may end at 2^64 - 1
    uint64_t uva        # front-end virtual address of ``iova``
    uint32_t perm       # IOTLB_PERM_*

cdef struct iotlb_t:
    uint32_t n
    iotlb_entry_t *e    # sorted by iova, non-overlapping (so ``last`` is sorted too)


cdef inline const iotlb_entry_t *iotlb_find(const iotlb_t *t, uint64_t iova) noexcept nogil:
    """The entry holding ``iova`` (binary search), or NULL."""
    cdef uint32_t lo = 0, hi = t.n, mid
    while lo < hi:
        mid = (lo + hi) >> 1
        if t.e[mid].last < iova:
            lo = mid + 1
        else:
            hi = mid
    if lo < t.n and t.e[lo].iova <= iova:
        return &t.e[lo]
    return NULL


cdef inline uint8_t *uva_to_host_gpa(const memtable_t *m, uint64_t uva, uint64_t *length,
                                     uint64_t *gpa) noexcept nogil:
    """Like gpa_to_host for a front-end address: ``*length`` cut to the region, ``*gpa`` set."""
    cdef uint32_t i
    cdef const mem_region_t *r
    cdef uint64_t off
    for i in range(m.n):
        r = &m.r[i]
        off = uva - r.uva
        if uva >= r.uva and off < r.size:
            if length[0] > r.size - off:
                length[0] = r.size - off
            gpa[0] = r.gpa + off
            return <uint8_t *>(r.host + off)
    return NULL


cdef class IotlbTable:
    cdef iotlb_t t
    cdef readonly tuple entries
