# The split layout's part of the driver side (_driver): the used index read once per burst
# (a runaway one breaks the ring), used entries read once each and checked against the
# books, descriptors and avail entries written, the avail index published with the kick
# decision (NO_NOTIFY, or avail_event with EVENT_IDX), interrupts asked for through the
# avail flags / used_event, and IN_ORDER TX completions counted by the used index. Writes
# only the descriptor table and the avail ring. Header-only: compiled into _driver.
from libc.stdint cimport uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy

from pyvhost._driver cimport drvq_t
from pyvhost._drv_books cimport give_back, kick_if, mark_posted
from pyvhost._ring_index cimport index_ahead, need_event
from pyvhost._vring cimport (
    VRING_AVAIL_F_NO_INTERRUPT, VRING_DESC_F_WRITE, VRING_USED_F_NO_NOTIFY, vh_fence_seq_cst,
    vh_load_acquire_u16, vh_load_relaxed_u16, vh_store_release_u16, vh_store_relaxed_u16,
    vring_desc_t, vring_used_elem_t,
)


cdef inline int sp_used_begin(drvq_t *q, uint16_t *end) noexcept nogil:
    """The device's used index (``*end``), read once for a burst: how many entries it
    holds for us, or -1 (counted, the ring marked broken) when more than the ring holds."""
    cdef uint16_t idx = vh_load_acquire_u16(&q.used[1])
    cdef int n = index_ahead(idx, q.last_used_idx, q.size)
    if n < 0:
        q.broken = 1
        q.st.ring_errors += 1
        return -1
    end[0] = idx
    return n


cdef inline int sp_used_peek(drvq_t *q, uint16_t end, uint16_t *id,
                             uint32_t *length) noexcept nogil:
    """The used entry at last_used_idx: 0 when there is none before ``end``, 1 when it
    names a buffer in flight, -1 when not (out of range, or already back)."""
    cdef vring_used_elem_t e
    if q.last_used_idx == end:
        return 0
    memcpy(&e, &q.used_ring[q.last_used_idx & (q.size - 1)], sizeof(vring_used_elem_t))
    if e.id >= q.size or not q.inflight[e.id]:
        return -1
    id[0] = <uint16_t>e.id
    length[0] = e.len
    return 1


cdef inline void sp_post(drvq_t *q, uint16_t id, uint32_t length, bint write) noexcept nogil:
    """Descriptor ``id`` (always buffer ``id``'s slot) into the avail ring; seen on publish.
    A descriptor or avail entry that already holds what it would be given (the same buffer
    and length, in the same slot one lap ago) is not stored again, as the device side's
    used elements: the device reads those lines, which then stay shared by both cores."""
    cdef vring_desc_t *d = &q.desc[id]
    cdef uint64_t want[2]
    cdef uint64_t have[2]
    cdef uint16_t *slot = &q.avail[2 + (q.avail_idx & (q.size - 1))]
    want[0] = q.slots_gpa + <uint64_t>id * q.slot_size
    want[1] = length | <uint64_t>(VRING_DESC_F_WRITE if write else 0) << 32   # next 0
    memcpy(have, d, 16)
    if have[0] != want[0] or have[1] != want[1]:
        memcpy(d, want, 16)
    mark_posted(q, id)
    if vh_load_relaxed_u16(slot) != id:
        vh_store_relaxed_u16(slot, id)
    q.avail_idx += 1


cdef inline void sp_publish(drvq_t *q) noexcept nogil:
    """Release the new avail index and kick the device unless it suppressed kicks."""
    cdef uint16_t old = q.kicked_idx, new = q.avail_idx
    cdef bint kick
    if old == new:
        return
    vh_store_release_u16(&q.avail[1], new)
    vh_fence_seq_cst()    # the avail idx store before reading the device's suppression state
    if q.event_idx:
        kick = need_event(vh_load_relaxed_u16(&q.used[2 + 4 * q.size]), new, old)
    else:
        kick = not (vh_load_relaxed_u16(&q.used[0]) & VRING_USED_F_NO_NOTIFY)
    q.kicked_idx = new
    kick_if(q, kick)


cdef inline void sp_interrupts(drvq_t *q, bint on) noexcept nogil:
    if on:
        if q.event_idx:
            vh_store_relaxed_u16(&q.avail[2 + q.size], q.last_used_idx)
        vh_store_relaxed_u16(&q.avail[0], 0)
    else:
        vh_store_relaxed_u16(&q.avail[0], VRING_AVAIL_F_NO_INTERRUPT)
    vh_fence_seq_cst()


cdef inline uint32_t sp_reclaim_in_order(drvq_t *q, uint16_t used_idx) noexcept nogil:
    """TX with IN_ORDER: the used index moved by n, so the n oldest buffers are done. The
    device may write only the batch's last entry, so ids are checked only there."""
    cdef uint16_t n = used_idx - q.last_used_idx, id = 0, k
    cdef uint32_t last = q.used_ring[(used_idx - 1) & (q.size - 1)].id
    cdef uint32_t done = 0
    for k in range(n):
        if q.fifo_head == q.fifo_tail:
            q.st.drop_bad_used += n - k       # more completions than buffers in flight
            break
        id = q.fifo[q.fifo_head & (q.size - 1)]
        q.fifo_head += 1
        give_back(q, id)
        done += 1
    if done and last != id:
        q.st.drop_bad_used += 1               # counted; the count is what we go by
    q.last_used_idx = used_idx
    return done
