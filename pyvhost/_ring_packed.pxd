# The packed layout's part of the ring core: which descriptor is available (wrap
# counters), used descriptors written back in place, and the guest notification through the
# event-suppression areas. Writes only used descriptors. Header-only: compiled into _vring.
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t

from pyvhost._ring_index cimport need_event, packed_advance, packed_is_avail, packed_used_flags
from pyvhost._vring cimport (
    RING_EVENT_FLAGS_DESC, RING_EVENT_FLAGS_DISABLE, VRING_DESC_F_WRITE, vh_eventfd_signal,
    vh_fence_seq_cst,
    vh_load_acquire_u16, vh_load_relaxed_u16, vh_log_write, vh_store_release_u16, vq_t,
    vring_packed_desc_t,
)


cdef inline bint packed_avail(vq_t *vq, uint16_t idx, uint8_t wrap) noexcept nogil:
    """Is the descriptor at ``idx`` available to us under avail wrap counter ``wrap``?"""
    return packed_is_avail(vh_load_acquire_u16(&vq.pdesc[idx].flags), wrap)


cdef enum:
    # used elements kept aside at most: split's (split_used_flush) and packed TX buffers
    # after a burst's first (packed_shadow_flush). A burst is at most MAX_BURST chains, so a
    # packed TX burst never fills it: a flush in mid-burst would give chains back before
    # the burst's frames are read (what keeping them aside is for)
    SPLIT_SHADOW = 32


cdef struct used_batch_t:
    # the used elements one burst gives back, both layouts (DPDK's batch). Packed: the first
    # one is stored last, flags at the end (packed_used_flush), so the driver, which reads
    # used descriptors in order, takes the burst as one; RX buffers after it are written as
    # they are decided, TX buffers wait in ``shadow`` with split's elements (their bytes are
    # read by then: a frame whose buffer lies in the ring reads it as the driver left it,
    # as the one-copy receive, whose chains go back at vq_rx_complete). Split: elements
    # wait in ``shadow`` and are written together.
    uint32_t n              # used elements decided in this burst
    uint16_t head_slot      # packed: the slot of the first, stored at the burst's end
    uint16_t head_flags
    uint16_t head_id
    uint32_t head_len
    uint8_t written         # packed: the first one is an RX buffer (written, has a length)
    uint32_t nshadow        # elements decided but not yet written (flushed at the end)
    uint64_t shadow[SPLIT_SHADOW]   # split: id | len << 32, a used element's bytes;
                                    # packed TX: slot | id << 16 | flags << 32 (length 0)


cdef inline void packed_used_store(vq_t *vq, uint16_t slot, uint16_t buf_id, uint32_t length,
                                   uint16_t flags) noexcept nogil:
    """One used descriptor: id and length, then its flags (release), then dirty-logged."""
    cdef vring_packed_desc_t *d = &vq.pdesc[slot]
    d.id = buf_id
    d.len = length
    vh_store_release_u16(&d.flags, flags)
    if vq.log_all:
        vh_log_write(vq.log, vq.log_size, vq.desc_gpa + 16 * <uint64_t>slot, 16)


cdef inline void packed_shadow_flush(vq_t *vq, used_batch_t *ub) noexcept nogil:
    """The TX used descriptors kept aside, in order."""
    cdef uint32_t k
    cdef uint64_t e
    for k in range(ub.nshadow):
        e = ub.shadow[k]
        packed_used_store(vq, <uint16_t>e, <uint16_t>(e >> 16), 0, <uint16_t>(e >> 32))
    ub.nshadow = 0


cdef inline void put_used_packed(vq_t *vq, used_batch_t *ub, uint16_t buf_id, uint32_t length,
                                 uint32_t nslots, bint written) noexcept nogil:
    cdef uint16_t flags = packed_used_flags(vq.used_wrap)
    if written:
        flags |= VRING_DESC_F_WRITE
    if ub.n == 0:
        ub.written = written
        ub.head_slot = vq.last_used_idx          # stored by packed_used_flush
        ub.head_flags = flags
        ub.head_id = buf_id
        ub.head_len = length
    elif vq.in_order and not written and not ub.written:
        # IN_ORDER: a batch of TX buffers is completed by one used descriptor in the batch's
        # first slot naming its last buffer; the driver steps over the batch (virtio 1.1
        # 2.7.9). RX buffers each need their length, so they are written one by one.
        ub.head_id = buf_id
    elif written:
        packed_used_store(vq, vq.last_used_idx, buf_id, length, flags)
    else:                                       # a TX buffer (length 0): at the end
        if ub.nshadow == SPLIT_SHADOW:
            packed_shadow_flush(vq, ub)
        ub.shadow[ub.nshadow] = (vq.last_used_idx | (<uint64_t>buf_id << 16)
                                 | (<uint64_t>flags << 32))
        ub.nshadow += 1
    ub.n += 1
    packed_advance(&vq.last_used_idx, &vq.used_wrap, nslots, vq.size)


cdef inline void packed_used_flush(vq_t *vq, used_batch_t *ub) noexcept nogil:
    """The burst's TX used descriptors kept aside, then its first one made visible (its
    flags stored with release: after everything written before it, the rest of the batch
    included), then dirty-logged."""
    cdef vring_packed_desc_t *d = &vq.pdesc[ub.head_slot]
    packed_shadow_flush(vq, ub)
    d.id = ub.head_id
    d.len = ub.head_len
    vh_store_release_u16(&d.flags, ub.head_flags)
    if vq.log_all:
        vh_log_write(vq.log, vq.log_size, vq.desc_gpa + 16 * <uint64_t>ub.head_slot, 16)


cdef inline void notify_guest_packed(vq_t *vq) noexcept nogil:
    """Signal the call fd unless the driver's event-suppression area says not to."""
    cdef uint16_t old = vq.signalled_used, new = vq.last_used_idx, flags, off_wrap, off
    cdef bint fire
    vh_fence_seq_cst()
    flags = vh_load_relaxed_u16(&vq.avail[1])
    if flags != RING_EVENT_FLAGS_DESC or not vq.event_idx:
        fire = flags != RING_EVENT_FLAGS_DISABLE
    else:
        off_wrap = vh_load_relaxed_u16(&vq.avail[0])
        off = off_wrap & 0x7FFF
        if new <= old:
            old -= vq.size
        if vq.used_wrap != off_wrap >> 15:
            off -= vq.size
        fire = need_event(off, new, old) or not vq.signalled_used_valid
    vq.signalled_used = new
    vq.signalled_used_valid = 1
    if fire and vq.callfd >= 0:
        if vh_eventfd_signal(vq.callfd) == 0:
            vq.st.calls += 1
        else:
            vq.st.call_errors += 1
