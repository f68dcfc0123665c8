# The packed layout's part of the driver side (_driver): used descriptors recognised by the
# used wrap counter and checked against the books, buffers written into the descriptor
# ring (one descriptor, or a chain of chain_seg-byte pieces after the header) with the
# burst's first head flagged last, on publish, so the device sees the burst at once; kicks
# and interrupts through the device / driver event-suppression areas (ENABLE, DISABLE,
# DESC). Writes only available descriptors and the driver area. Header-only: compiled into
# _driver.
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t

from pyvhost._driver cimport drvq_t
from pyvhost._drv_books cimport kick_if, mark_posted
from pyvhost._ring_index cimport need_event, packed_advance, packed_avail_flags, packed_is_used
from pyvhost._vring cimport (
    RING_EVENT_FLAGS_DESC, RING_EVENT_FLAGS_DISABLE, RING_EVENT_FLAGS_ENABLE, VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE, vh_fence_seq_cst, vh_load_acquire_u16, vh_load_relaxed_u16,
    vh_store_release_u16, vh_store_relaxed_u16, vring_packed_desc_t,
)


cdef inline uint16_t pk_slots_for(drvq_t *q, uint32_t length) noexcept nogil:
    """Ring slots a buffer of ``length`` bytes takes: the header, then chain_seg pieces."""
    if not q.chain_seg or length <= q.hdr_len:
        return 1
    return <uint16_t>(1 + (length - q.hdr_len + q.chain_seg - 1) // q.chain_seg)


cdef inline int pk_peek(drvq_t *q, uint16_t pos, uint8_t wrap, uint16_t *id,
                        uint32_t *length) noexcept nogil:
    """The descriptor in slot ``pos``: 0 when the device has not used it (under used wrap
    counter ``wrap``), 1 when it returns a buffer we have in flight, -1 for a used
    descriptor naming an id we do not have out (out of range, or already back)."""
    if not packed_is_used(vh_load_acquire_u16(&q.pdesc[pos].flags), wrap):
        return 0
    id[0] = q.pdesc[pos].id
    length[0] = q.pdesc[pos].len
    if id[0] >= q.size or not q.inflight[id[0]]:
        return -1
    return 1


cdef inline bint pk_frame_ready(drvq_t *q, uint16_t first, uint32_t nbufs) noexcept nogil:
    """Are the ``nbufs - 1`` buffers after ``first`` (at last_used_idx) used already?"""
    cdef uint16_t pos = q.last_used_idx, id
    cdef uint8_t wrap = q.used_wrap
    cdef uint32_t b, length
    cdef int r
    packed_advance(&pos, &wrap, q.nslots[first], q.size)
    for b in range(1, nbufs):
        r = pk_peek(q, pos, wrap, &id, &length)
        if r == 0:
            return False
        packed_advance(&pos, &wrap, q.nslots[id] if r > 0 else 1, q.size)
    return True


cdef inline void pk_post(drvq_t *q, uint16_t id, uint32_t length, bint write) noexcept nogil:
    """Make buffer ``id`` (the first ``length`` bytes of its slot) available at avail_idx:
    one descriptor, or a chain (header, then chain_seg pieces). Every descriptor carries the
    id; the chain's head is flagged last (and the burst's first head only on publish)."""
    cdef uint64_t addr = q.slots_gpa + <uint64_t>id * q.slot_size
    cdef uint16_t pos = q.avail_idx, head = q.avail_idx, flags, head_flags = 0, n = 0
    cdef uint8_t wrap = q.avail_wrap
    cdef uint32_t chunk, left = length
    cdef vring_packed_desc_t *d
    while True:
        chunk = left
        if q.chain_seg:
            if n == 0:
                chunk = left if left < q.hdr_len else q.hdr_len
            elif chunk > q.chain_seg:
                chunk = q.chain_seg
        left -= chunk
        d = &q.pdesc[pos]
        d.addr = addr
        d.len = chunk
        d.id = id
        flags = packed_avail_flags(wrap)
        if write:
            flags |= VRING_DESC_F_WRITE
        if left:
            flags |= VRING_DESC_F_NEXT
        if n == 0:
            head_flags = flags
        else:
            d.flags = flags             # published by the head's release store
        n += 1
        addr += chunk
        packed_advance(&pos, &wrap, 1, q.size)
        if not left:
            break
    q.nslots[id] = n
    q.ndesc_free -= n
    mark_posted(q, id)
    q.avail_idx = pos
    q.avail_wrap = wrap
    q.avail_count += n
    if q.pend_head < 0:
        q.pend_head = head
        q.pend_flags = head_flags
    else:
        vh_store_release_u16(&q.pdesc[head].flags, head_flags)


cdef inline void pk_publish(drvq_t *q) noexcept nogil:
    """Flag the burst's first head, then kick unless the device's event area says not to."""
    cdef uint16_t added = q.avail_count - q.kicked_idx, new, old, off_wrap, event, flags
    cdef bint kick
    if q.pend_head >= 0:
        vh_store_release_u16(&q.pdesc[q.pend_head].flags, q.pend_flags)
        q.pend_head = -1
    if added == 0:
        return
    vh_fence_seq_cst()    # the flags store before reading the device's suppression state
    flags = vh_load_relaxed_u16(&q.used[1])
    if flags == RING_EVENT_FLAGS_DESC and q.event_idx:
        off_wrap = vh_load_relaxed_u16(&q.used[0])
        event = off_wrap & 0x7FFF
        if (off_wrap >> 15) != q.avail_wrap:
            event -= q.size
        new = q.avail_idx
        old = new - added
        kick = need_event(event, new, old)
    else:
        kick = flags != RING_EVENT_FLAGS_DISABLE
    q.kicked_idx = q.avail_count
    kick_if(q, kick)


cdef inline void pk_interrupts(drvq_t *q, bint on) noexcept nogil:
    if not on:
        vh_store_relaxed_u16(&q.avail[1], RING_EVENT_FLAGS_DISABLE)
    elif q.event_idx:
        vh_store_relaxed_u16(&q.avail[0], q.last_used_idx | (<uint16_t>q.used_wrap << 15))
        vh_store_release_u16(&q.avail[1], RING_EVENT_FLAGS_DESC)
    else:
        vh_store_relaxed_u16(&q.avail[1], RING_EVENT_FLAGS_ENABLE)
    vh_fence_seq_cst()
