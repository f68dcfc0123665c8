# The driver side's private books (_driver): which buffers the device holds (``inflight``),
# the ones we own (``free_ids``), the posting order under IN_ORDER (``fifo``), what giving
# a buffer back means on either layout, and a publish's kick (signalled and counted). Kept
# outside shared memory: every id the device writes is checked against them. Touches no
# ring memory. Header-only: compiled into _driver.
from libc.stdint cimport uint16_t, uint32_t

from pyvhost._driver cimport drvq_t
from pyvhost._ring_index cimport packed_advance
from pyvhost._vring cimport vh_eventfd_signal


cdef inline void kick_if(drvq_t *q, bint kick) noexcept nogil:
    """A publish decided whether the device wants a kick: send it, or count it saved."""
    if kick:
        vh_eventfd_signal(q.kickfd)
        q.st.kicks += 1
    else:
        q.st.kicks_suppressed += 1


cdef inline void give_back(drvq_t *q, uint32_t id) noexcept nogil:
    """Buffer ``id`` is ours again."""
    q.inflight[id] = 0
    q.free_ids[q.nfree] = <uint16_t>id
    q.nfree += 1


cdef inline void fifo_push(drvq_t *q, uint16_t id) noexcept nogil:
    """IN_ORDER: buffer ``id`` was posted after every one in the fifo."""
    q.fifo[q.fifo_tail & (q.size - 1)] = id
    q.fifo_tail += 1


cdef inline void mark_posted(drvq_t *q, uint16_t id) noexcept nogil:
    """Buffer ``id`` now belongs to the device."""
    q.inflight[id] = 1
    if q.in_order:
        fifo_push(q, id)


cdef inline void release(drvq_t *q, uint16_t id) noexcept nogil:
    """Buffer ``id`` (in flight) comes back; packed: the used position steps over its
    ring slots (a used descriptor, or one of a batch an IN_ORDER one completed)."""
    if q.packed:
        packed_advance(&q.last_used_idx, &q.used_wrap, q.nslots[id], q.size)
        q.ndesc_free += q.nslots[id]
    give_back(q, id)


cdef inline uint32_t release_through(drvq_t *q, uint16_t id) noexcept nogil:
    """Buffer ``id`` (in flight) is used. With IN_ORDER everything posted before it is
    done too (virtio 1.1 2.6.9 / 2.7.9), the same on both layouts: they come back as well;
    returns how many of those (TX: completions; RX: buffers without a length, dropped)."""
    cdef uint32_t skipped = 0
    cdef uint16_t p
    if not q.in_order:
        release(q, id)
        return 0
    while q.fifo_head != q.fifo_tail:
        p = q.fifo[q.fifo_head & (q.size - 1)]
        q.fifo_head += 1
        if not q.inflight[p]:
            continue
        release(q, p)
        if p == id:
            break
        skipped += 1
    return skipped
