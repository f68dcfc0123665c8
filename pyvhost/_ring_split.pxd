# The split layout's part of the ring core: the avail index, used elements, publishing
# the used index and the guest notification (event idx or the NO_INTERRUPT flag). Writes
# only the used ring. Header-only: compiled into _vring.
# With VIRTIO_F_IN_ORDER every used element is still written (virtio 1.1 2.6.9 would allow
# one per TX batch): DPDK's in-order TX cleanup and ours go by the used index and read at
# most one element, so the others' stores stay in lines of our own cache, and which slot a
# single element belongs in (the batch's first or last) differs between implementations.
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t

from pyvhost._ring_index cimport index_ahead, need_event
from pyvhost._vring cimport (
    VRING_AVAIL_F_NO_INTERRUPT, vh_eventfd_signal, vh_fence_seq_cst, vh_load_acquire_u16,
    vh_load_relaxed_u16, vh_log_write, vh_store_release_u16, vq_t, vring_used_elem_t,
)


cdef inline void log_used(vq_t *vq, uint64_t offset, uint64_t length) noexcept nogil:
    """Dirty-log a write at ``offset`` into the split used ring (VHOST_VRING_F_LOG)."""
    if vq.log_all and vq.log_used:
        vh_log_write(vq.log, vq.log_size, vq.log_used_gpa + offset, length)


cdef inline void put_used(vq_t *vq, uint32_t head, uint32_t length) noexcept nogil:
    cdef uint32_t slot = vq.last_used_idx & (vq.size - 1)
    cdef vring_used_elem_t *e = &vq.used_ring[slot]
    e.id = head
    e.len = length
    log_used(vq, 4 + 8 * <uint64_t>slot, 8)
    vq.last_used_idx += 1


cdef inline void notify_guest(vq_t *vq) noexcept nogil:
    """Publish the used index and signal the call fd unless the guest suppressed it."""
    cdef uint16_t old, ev
    cdef bint fire
    vh_store_release_u16(&vq.used[1], vq.last_used_idx)
    log_used(vq, 2, 2)
    vh_fence_seq_cst()   # the used idx store before reading the guest's suppression state
    if vq.event_idx:
        old = vq.signalled_used
        ev = vh_load_relaxed_u16(&vq.avail[2 + vq.size])
        fire = need_event(ev, vq.last_used_idx, old) or not vq.signalled_used_valid
        vq.signalled_used = vq.last_used_idx
        vq.signalled_used_valid = 1
    else:
        fire = not (vh_load_relaxed_u16(&vq.avail[0]) & VRING_AVAIL_F_NO_INTERRUPT)
    if fire and vq.callfd >= 0:
        if vh_eventfd_signal(vq.callfd) == 0:
            vq.st.calls += 1
        else:
            vq.st.call_errors += 1


cdef inline int avail_count(vq_t *vq, uint16_t *avail_idx) noexcept nogil:
    """Entries the guest has made available, or -1 (ring broken) if more than the ring holds."""
    cdef uint16_t idx = vh_load_acquire_u16(&vq.avail[1])
    cdef int count = index_ahead(idx, vq.last_avail_idx, vq.size)
    if count < 0:
        vq.broken = 1
        vq.st.ring_errors += 1
        return -1
    avail_idx[0] = idx
    return count
