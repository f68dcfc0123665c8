# Packed rings, device side: four available descriptors read at once (as DPDK's packed batch
# dequeue/enqueue does): when the next PACKED_BATCH slots are all available single-descriptor
# buffers in the wanted direction, their four flags are checked, one acquire fence orders
# the bodies after them, and the four bodies are read (each once) and translated. Anything
# else (one not available yet, a NEXT or INDIRECT flag, the ring's end inside the batch, a
# slot not given back, an address that is not one contiguous mapped piece, a zero length,
# an IOMMU) is not a batch: the caller takes the one-at-a-time path, which decides on its
# own reads, so a batch attempt never changes what the ring core does, only how fast.
# Reads the descriptor ring; writes nothing of the guest's. Header-only: compiled into _vring.
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy

from pyvhost._memory cimport IOTLB_PERM_RO, IOTLB_PERM_WO
from pyvhost._ring_index cimport packed_avail_flags
from pyvhost._ring_walk cimport MAX_CHAIN_BYTES, vq_translate
from pyvhost._vring cimport (
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_PACKED_DESC_F_AVAIL,
    VRING_PACKED_DESC_F_USED, iov_t, vh_fence_acquire, vh_load_relaxed_u16, vh_prefetch,
    vh_prefetch_w, vq_t, vring_packed_desc_t,
)

cdef enum:
    PACKED_BATCH = 4                # descriptors of one batch: 64 bytes, a cache line


cdef inline bint batch_read(vq_t *vq, uint16_t idx, uint8_t wrap, uint32_t room,
                            bint writable, uint16_t *ids, iov_t *iov) noexcept nogil:
    """The PACKED_BATCH descriptors from slot ``idx`` (avail wrap counter ``wrap``; ``room``
    slots not taken) when they form a batch: buffer k's id in ids[k], its one mapped segment
    in iov[k]. False otherwise (nothing of the ring changed: take them one at a time)."""
    cdef uint16_t flags[PACKED_BATCH]
    cdef uint16_t want = packed_avail_flags(wrap)
    cdef uint16_t mask = VRING_PACKED_DESC_F_AVAIL | VRING_PACKED_DESC_F_USED | \
        VRING_DESC_F_NEXT | VRING_DESC_F_INDIRECT | VRING_DESC_F_WRITE
    cdef uint32_t k, perm = IOTLB_PERM_WO if writable else IOTLB_PERM_RO
    cdef vring_packed_desc_t d
    cdef uint64_t chunk, gpa
    cdef uint8_t *p
    if vq.no_batch or vq.iotlb != NULL or room < PACKED_BATCH or \
            <uint32_t>idx + PACKED_BATCH > vq.size:
        return False
    if writable:
        want |= VRING_DESC_F_WRITE
    for k in range(PACKED_BATCH):
        flags[k] = vh_load_relaxed_u16(&vq.pdesc[idx + k].flags)
    for k in range(PACKED_BATCH):
        if flags[k] & mask != want:
            return False
    vh_fence_acquire()              # the bodies are read after the flags that made them ours
    for k in range(PACKED_BATCH):
        memcpy(&d, &vq.pdesc[idx + k], sizeof(vring_packed_desc_t))   # once; its flags unused
        if d.len == 0 or d.len > MAX_CHAIN_BYTES:
            return False
        chunk = d.len
        p = vq_translate(vq, d.addr, &chunk, perm, &gpa)
        if p == NULL or chunk < d.len:
            return False
        ids[k] = d.id
        iov[k].base = p
        iov[k].len = d.len
        iov[k].gpa = gpa
        if writable:
            vh_prefetch_w(p)            # the frame lands here: ask for the line to own
        else:
            vh_prefetch(p)
    return True
