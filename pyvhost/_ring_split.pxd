# The split layout's part of the ring core: the avail index, used elements (kept aside
# during a burst and written at its end), publishing the used index, the guest
# notification (event idx or the NO_INTERRUPT flag) and the hints that start a burst's
# cache misses together (prefetch_chains). Writes only the used ring. Header-only:
# compiled into _vring.
# With VIRTIO_F_IN_ORDER every used element is still written (virtio 1.1 2.6.9 would allow
# one per TX batch): DPDK's in-order TX cleanup and ours go by the used index and read at
# most one element, so the others' stores stay in lines of our own cache, and which slot a
# single element belongs in (the batch's first or last) differs between implementations.
from libc.stdint cimport uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy

from pyvhost._ring_index cimport index_ahead, need_event
from pyvhost._ring_packed cimport SPLIT_SHADOW, used_batch_t
from pyvhost._vring cimport (
    MAX_BURST, VRING_AVAIL_F_NO_INTERRUPT, vh_eventfd_signal,
    vh_fence_seq_cst, vh_load_acquire_u16, vh_load_relaxed_u16, vh_log_write, vh_prefetch,
    vh_prefetch_w, vh_store_release_u16, vq_t,
)


cdef inline void log_used(vq_t *vq, uint64_t offset, uint64_t length) noexcept nogil:
    """Dirty-log a write at ``offset`` into the split used ring (VHOST_VRING_F_LOG)."""
    if vq.log_all and vq.log_used:
        vh_log_write(vq.log, vq.log_size, vq.log_used_gpa + offset, length)


cdef inline void split_used_flush(vq_t *vq, used_batch_t *ub) noexcept nogil:
    """The used elements a burst decided (id, then len, little-endian as virtio 1.0 has
    them), written into the ring together, one 8-byte store each, like DPDK's shadow used
    ring; notify_guest publishes the used index. The guest reads these lines: stores to
    them spread over the burst each waited for the guest's core to give a line up while
    the burst's later stores queued behind. An element the slot already holds (the same
    id and length one lap of the ring ago, as in-order traffic of one frame size gives)
    is not stored again, so its line stays shared with the guest's core (2-3.5 ns a 64 B
    frame in a loop through DPDK's virtio driver); the dirty log still has it."""
    cdef uint32_t k, slot, mask = vq.size - 1
    cdef uint64_t old
    for k in range(ub.nshadow):
        slot = vq.last_used_idx & mask
        memcpy(&old, &vq.used_ring[slot], 8)
        if old != ub.shadow[k]:
            memcpy(&vq.used_ring[slot], &ub.shadow[k], 8)
        log_used(vq, 4 + 8 * <uint64_t>slot, 8)
        vq.last_used_idx += 1
    ub.nshadow = 0


cdef inline void put_used_split(vq_t *vq, used_batch_t *ub, uint32_t head,
                                uint32_t length) noexcept nogil:
    """A used element into the burst's shadow (split_used_flush writes it)."""
    if ub.nshadow == SPLIT_SHADOW:
        split_used_flush(vq, ub)
    ub.shadow[ub.nshadow] = head | (<uint64_t>length << 32)
    ub.nshadow += 1


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


cdef inline void prefetch_chains(vq_t *vq, uint16_t first, uint32_t n) noexcept nogil:
    """Hints before a burst of ``n`` chains from the free-running avail index ``first``:
    the used-ring lines the burst will write and the chains' head descriptors. The guest
    wrote these lines on its own core, and a core in another cache domain answers each in
    hundreds of ns: asked for together, the misses overlap instead of coming one per frame.
    Hints only, on addresses inside the ring: the avail entries read here are not kept.
    The buffers' own lines are not hinted: with the burst's copies batched (rx_copies /
    tx_copies), hinting them (2 x 32 prefetches at a burst's start) measured no gain beyond
    +-5 ns a frame, and in one session's fast seconds a ~5 ns cost (cause not shown)."""
    cdef uint32_t j, mask = vq.size - 1, slot
    cdef uint16_t head
    if n > MAX_BURST:
        n = MAX_BURST
    for j in range(n):
        slot = (vq.last_used_idx + j) & mask
        if j == 0 or (<size_t>&vq.used_ring[slot]) & 63 < 8:     # the first on a line
            vh_prefetch_w(&vq.used_ring[slot])
    for j in range(n):
        head = vh_load_relaxed_u16(&vq.avail[2 + ((first + j) & mask)])
        if head < vq.size:
            vh_prefetch(&vq.desc[head])
