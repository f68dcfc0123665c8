# cython: language_level=3
"""Split and packed virtqueues, DRIVER side, compiled: what a guest's virtio-net driver does.

Buffer ``i`` always owns the fixed slot ``slots + i * slot_size`` in guest memory, so a used
id names its buffer and every id and length the device writes can be checked against
private bookkeeping (``inflight``, ``free_ids``, ``nslots``, ``fifo``) kept outside shared
memory: the device is untrusted, a bad used entry is dropped and counted, never followed.
TX: one buffer per frame (virtio-net header + frame). RX: buffers of ``buf_len`` bytes,
frames reassembled from ``num_buffers`` of them with mergeable RX buffers.

Split rings: descriptor ``i`` is buffer ``i``; publishing releases avail->idx; kicks honour
used->flags NO_NOTIFY or avail_event (EVENT_IDX). Packed rings (VIRTIO_F_RING_PACKED):
buffers are written into the descriptor ring at ``avail_idx`` with the AVAIL/USED bits of
the avail wrap counter, optionally as a chain of ``chain_seg``-byte descriptors (the header
in its own); the first head of a burst is flagged last, on publish, so the device sees the
burst at once; used descriptors are recognised by the used wrap counter; kicks and
interrupts follow the device / driver event-suppression areas (ENABLE, DISABLE, DESC).
IN_ORDER: a completion of buffer X completes everything posted before X (split: the used
index counts them). An idle driver sleeps in poll() on the call eventfds. Everything per
packet runs without the GIL.

One DriverQueue belongs to one thread at a time. This module knows nothing of sockets,
messages or memory regions: the frontend hands it host addresses, guest addresses and fds.
"""

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free
from libc.string cimport memcpy, memset

from pyvhost._pktpool cimport PacketPool, pkt_t, pktpool_t, pool_get, pool_put, pool_put_many
from pyvhost._vring cimport (
    MAX_BURST, RING_EVENT_FLAGS_DESC, RING_EVENT_FLAGS_DISABLE, RING_EVENT_FLAGS_ENABLE,
    VRING_AVAIL_F_NO_INTERRUPT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    VRING_PACKED_DESC_F_AVAIL, VRING_PACKED_DESC_F_USED, VRING_USED_F_NO_NOTIFY,
    vh_eventfd_drain, vh_eventfd_signal, vh_fence_seq_cst, vh_load_acquire_u16,
    vh_load_relaxed_u16, vh_store_release_u16, vh_store_relaxed_u16, vring_packed_desc_t,
)

cdef extern from "poll.h" nogil:
    cdef struct pollfd:
        int fd
        short events
        short revents
    int poll(pollfd *fds, unsigned long nfds, int timeout)
    enum:
        POLLIN
        POLLHUP
        POLLERR

cdef enum:
    MAX_WAIT_FDS = 257


cdef inline bint need_event(uint16_t event, uint16_t new, uint16_t old) noexcept nogil:
    return <uint16_t>(new - event - 1) < <uint16_t>(new - old)


cdef int drv_used_count(drvq_t *q, uint16_t *used_idx) noexcept nogil:
    """Used entries not yet processed, or -1 when the device moved used->idx further than
    the ring holds (the ring is then marked broken)."""
    cdef uint16_t idx, n
    if q.broken:
        return -1
    if q.packed:
        return pk_used_count(q)
    idx = vh_load_acquire_u16(&q.used[1])
    n = idx - q.last_used_idx
    if n > q.size:
        q.broken = 1
        q.st.ring_errors += 1
        return -1
    used_idx[0] = idx
    return n


cdef inline void give_back(drvq_t *q, uint32_t id) noexcept nogil:
    q.inflight[id] = 0
    q.free_ids[q.nfree] = <uint16_t>id
    q.nfree += 1


cdef inline bint take_used(drvq_t *q, vring_used_elem_t *e) noexcept nogil:
    """Read the next used entry; False (counted) when its id is not one the device owns."""
    memcpy(e, &q.used_ring[q.last_used_idx & (q.size - 1)], sizeof(vring_used_elem_t))
    q.last_used_idx += 1
    if e.id >= q.size or not q.inflight[e.id]:
        q.st.drop_bad_used += 1
        return False
    return True


cdef uint32_t drv_reclaim(drvq_t *q) noexcept nogil:
    """TX: take back the descriptors the device has finished with; returns how many."""
    cdef uint16_t used_idx
    cdef vring_used_elem_t e
    cdef uint32_t n = 0
    if q.packed:
        return pk_reclaim(q)
    if drv_used_count(q, &used_idx) <= 0:
        return 0
    if q.in_order:
        return split_reclaim_in_order(q, used_idx)
    while q.last_used_idx != used_idx:
        if take_used(q, &e):
            give_back(q, e.id)
            n += 1
    return n


cdef int drv_tx_slot(drvq_t *q, uint8_t **frame) noexcept nogil:
    """A free TX buffer (its id) with a zeroed virtio-net header; ``*frame`` is where the
    frame goes (up to buf_len - hdr_len bytes). -1 when all are in flight."""
    cdef uint16_t id
    cdef uint8_t *slot
    if q.nfree == 0 or q.broken or (q.packed and q.ndesc_free < q.tx_max_slots):
        return -1
    q.nfree -= 1
    id = q.free_ids[q.nfree]
    slot = q.slots + <uint64_t>id * q.slot_size
    memset(slot, 0, q.hdr_len)
    frame[0] = slot + q.hdr_len
    return id


cdef void drv_tx_post(drvq_t *q, uint16_t id, uint32_t frame_len) noexcept nogil:
    """Make buffer ``id`` (from drv_tx_slot) available; seen by the device on publish."""
    cdef vring_desc_t *d
    if q.packed:
        pk_post(q, id, q.hdr_len + frame_len, False)
        return
    d = &q.desc[id]
    d.addr = q.slots_gpa + <uint64_t>id * q.slot_size
    d.len = q.hdr_len + frame_len
    d.flags = 0
    d.next = 0
    q.inflight[id] = 1
    if q.in_order:
        fifo_push(q, id)
    vh_store_relaxed_u16(&q.avail[2 + (q.avail_idx & (q.size - 1))], id)
    q.avail_idx += 1


cdef void drv_publish(drvq_t *q) noexcept nogil:
    """Release the new avail index and kick the device unless it suppressed kicks."""
    cdef uint16_t old = q.kicked_idx, new = q.avail_idx
    cdef bint kick
    if q.packed:
        pk_publish(q)
        return
    if old == new:
        return
    vh_store_release_u16(&q.avail[1], new)
    vh_fence_seq_cst()    # the avail idx store before reading the device's suppression state
    if q.event_idx:
        kick = need_event(vh_load_relaxed_u16(&q.used[2 + 4 * q.size]), new, old)
    else:
        kick = not (vh_load_relaxed_u16(&q.used[0]) & VRING_USED_F_NO_NOTIFY)
    q.kicked_idx = new
    if kick:
        vh_eventfd_signal(q.kickfd)
        q.st.kicks += 1
    else:
        q.st.kicks_suppressed += 1


cdef uint32_t drv_send(drvq_t *q, pkt_t **pkts, uint32_t count) noexcept nogil:
    """TX burst: copy frames into free descriptors and publish. Returns how many were taken
    (in order); the caller keeps ownership of every packet."""
    cdef uint32_t i, n = 0
    cdef int id
    cdef uint8_t *frame
    drv_reclaim(q)
    for i in range(count):
        if pkts[i].len > q.buf_len - q.hdr_len:
            break
        id = drv_tx_slot(q, &frame)
        if id < 0:
            q.st.ring_full += count - i
            break
        memcpy(frame, pkts[i].data, pkts[i].len)
        drv_tx_post(q, <uint16_t>id, pkts[i].len)
        q.st.bytes += pkts[i].len
        n += 1
    drv_publish(q)
    q.st.packets += n
    q.st.bursts += 1
    return n


cdef uint32_t drv_refill(drvq_t *q) noexcept nogil:
    """RX: post every descriptor we own as a device-writable buffer, then publish."""
    cdef uint32_t n = 0
    cdef uint16_t id
    cdef vring_desc_t *d
    if q.broken:
        return 0
    if q.packed:
        return pk_refill(q)
    while q.nfree:
        q.nfree -= 1
        id = q.free_ids[q.nfree]
        d = &q.desc[id]
        d.addr = q.slots_gpa + <uint64_t>id * q.slot_size
        d.len = q.buf_len
        d.flags = VRING_DESC_F_WRITE
        d.next = 0
        q.inflight[id] = 1
        vh_store_relaxed_u16(&q.avail[2 + (q.avail_idx & (q.size - 1))], id)
        q.avail_idx += 1
        n += 1
    drv_publish(q)
    return n


cdef uint32_t drv_recv(drvq_t *q, pktpool_t *pool, pkt_t **pkts, uint32_t count) noexcept nogil:
    """RX burst: up to ``count`` frames reassembled into pool packets, buffers re-posted.

    A used entry whose id the device does not own, whose length exceeds the buffer or is
    shorter than the header, or whose num_buffers is 0 or too large is dropped and counted."""
    cdef uint16_t used_idx, have
    cdef int avail
    cdef uint32_t nout = 0, b, nbufs, length
    cdef uint64_t total
    cdef vring_used_elem_t e
    cdef uint8_t *slot
    cdef pkt_t *pkt
    cdef bint bad
    if q.packed:
        return pk_recv(q, pool, pkts, count)
    avail = drv_used_count(q, &used_idx)
    if avail <= 0:
        return 0
    while nout < count and q.last_used_idx != used_idx:
        if not take_used(q, &e):
            continue
        slot = q.slots + <uint64_t>e.id * q.slot_size
        if e.len < q.hdr_len or e.len > q.buf_len:
            q.st.drop_bad_used += 1
            give_back(q, e.id)
            continue
        nbufs = 1
        if q.mrg_rxbuf:
            nbufs = slot[10] | (<uint32_t>slot[11] << 8)
            if nbufs == 0 or nbufs > DRV_MAX_MRG_BUFS or nbufs > q.size:
                q.st.drop_bad_used += 1
                give_back(q, e.id)
                continue
            have = used_idx - q.last_used_idx
            if have < nbufs - 1:
                # the rest of this frame is not published yet: take it with the next burst
                q.last_used_idx -= 1
                break
        pkt = pool_get(pool)
        if pkt == NULL:
            q.st.drop_no_mbuf += 1
            q.last_used_idx -= 1
            break
        length = e.len - q.hdr_len
        memcpy(pkt.vnet_hdr, slot, q.hdr_len)
        total = length
        give_back(q, e.id)
        bad = False
        if length <= pkt.cap:         # buf_len - hdr_len may exceed a packet's capacity
            memcpy(pkt.data, slot + q.hdr_len, length)
        for b in range(1, nbufs):
            if not take_used(q, &e):
                bad = True
                continue
            if e.len > q.buf_len:
                q.st.drop_bad_used += 1
                bad = True
            elif not bad and total + e.len <= pkt.cap:
                memcpy(pkt.data + total, q.slots + <uint64_t>e.id * q.slot_size, e.len)
            total += e.len
            give_back(q, e.id)
        if bad:
            pool_put(pool, pkt)
            continue
        if total > pkt.cap:
            q.st.drop_oversize += 1
            pool_put(pool, pkt)
            continue
        pkt.len = <uint32_t>total
        pkts[nout] = pkt
        nout += 1
        q.st.bytes += total
    drv_refill(q)
    q.st.packets += nout
    q.st.bursts += 1
    return nout


cdef void drv_interrupts(drvq_t *q, bint on) noexcept nogil:
    """Ask the device to signal the call fd for the next used entry (on), or not to (off)."""
    if q.packed:
        if not on:
            vh_store_relaxed_u16(&q.avail[1], RING_EVENT_FLAGS_DISABLE)
        elif q.event_idx:
            vh_store_relaxed_u16(&q.avail[0], q.last_used_idx | (<uint16_t>q.used_wrap << 15))
            vh_store_release_u16(&q.avail[1], RING_EVENT_FLAGS_DESC)
        else:
            vh_store_relaxed_u16(&q.avail[1], RING_EVENT_FLAGS_ENABLE)
        vh_fence_seq_cst()
        return
    if on:
        if q.event_idx:
            vh_store_relaxed_u16(&q.avail[2 + q.size], q.last_used_idx)
        vh_store_relaxed_u16(&q.avail[0], 0)
    else:
        vh_store_relaxed_u16(&q.avail[0], VRING_AVAIL_F_NO_INTERRUPT)
    vh_fence_seq_cst()


cdef int drv_wait(drvq_t **qs, int n, int extra_fd, int timeout_ms) noexcept nogil:
    """Sleep until one of ``qs`` has used entries or ``extra_fd`` is readable (or hung up).

    Turns interrupts on, re-checks the rings (no lost wake-up), polls the call eventfds and
    turns interrupts off again. Returns 1 for ring work, 2 for ``extra_fd``, 0 on timeout."""
    cdef pollfd fds[MAX_WAIT_FDS]
    cdef int i, nfds = 0, r, result = 0
    cdef uint16_t used_idx
    if n > MAX_WAIT_FDS - 1:
        n = MAX_WAIT_FDS - 1
    for i in range(n):
        drv_interrupts(qs[i], True)
    for i in range(n):
        if drv_used_count(qs[i], &used_idx) != 0:
            result = 1
    if not result:
        for i in range(n):
            if qs[i].callfd >= 0:
                fds[nfds].fd = qs[i].callfd
                fds[nfds].events = POLLIN
                fds[nfds].revents = 0
                nfds += 1
        if extra_fd >= 0:
            fds[nfds].fd = extra_fd
            fds[nfds].events = POLLIN
            fds[nfds].revents = 0
            nfds += 1
        if n:
            qs[0].st.waits += 1
        r = poll(fds, nfds, timeout_ms)
        if r > 0:
            result = 1
            if extra_fd >= 0 and fds[nfds - 1].revents & (POLLIN | POLLHUP | POLLERR):
                result = 2
    for i in range(n):
        vh_eventfd_drain(qs[i].callfd)
        drv_interrupts(qs[i], False)
    return result


# -- IN_ORDER bookkeeping ----------------------------------------------------------------

cdef inline void fifo_push(drvq_t *q, uint16_t id) noexcept nogil:
    q.fifo[q.fifo_tail & (q.size - 1)] = id
    q.fifo_tail += 1


cdef uint32_t split_reclaim_in_order(drvq_t *q, uint16_t used_idx) noexcept nogil:
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


# -- packed virtqueues, driver side ------------------------------------------------------

cdef inline void pk_advance(drvq_t *q, uint16_t *idx, uint8_t *wrap, uint32_t n) noexcept nogil:
    cdef uint32_t i = idx[0] + n
    while i >= q.size:
        i -= q.size
        wrap[0] ^= 1
    idx[0] = <uint16_t>i


cdef inline uint16_t pk_slots_for(drvq_t *q, uint32_t length) noexcept nogil:
    """Ring slots a buffer of ``length`` bytes takes: the header, then chain_seg pieces."""
    if not q.chain_seg or length <= q.hdr_len:
        return 1
    return <uint16_t>(1 + (length - q.hdr_len + q.chain_seg - 1) // q.chain_seg)


cdef int pk_peek(drvq_t *q, uint16_t pos, uint8_t wrap, uint16_t *id,
                 uint32_t *length) noexcept nogil:
    """The descriptor in slot ``pos``: 0 when the device has not used it (under used wrap
    counter ``wrap``), 1 when it returns a buffer we have in flight, -1 for a used
    descriptor naming an id we do not have out (out of range, or already back)."""
    cdef uint16_t flags = vh_load_acquire_u16(&q.pdesc[pos].flags)
    cdef uint8_t a = (flags & VRING_PACKED_DESC_F_AVAIL) != 0
    cdef uint8_t u = (flags & VRING_PACKED_DESC_F_USED) != 0
    if a != u or u != wrap:
        return 0
    id[0] = q.pdesc[pos].id
    length[0] = q.pdesc[pos].len
    if id[0] >= q.size or not q.inflight[id[0]]:
        return -1
    return 1


cdef inline void pk_release(drvq_t *q, uint16_t id) noexcept nogil:
    pk_advance(q, &q.last_used_idx, &q.used_wrap, q.nslots[id])
    q.ndesc_free += q.nslots[id]
    give_back(q, id)


cdef uint32_t pk_complete(drvq_t *q, uint16_t id) noexcept nogil:
    """Buffer ``id`` (in flight) is used: take it back and step over its ring slots. With
    IN_ORDER everything posted before it is done too; returns how many of those."""
    cdef uint32_t skipped = 0
    cdef uint16_t p
    if not q.in_order:
        pk_release(q, id)
        return 0
    while q.fifo_head != q.fifo_tail:
        p = q.fifo[q.fifo_head & (q.size - 1)]
        q.fifo_head += 1
        if not q.inflight[p]:
            continue
        pk_release(q, p)
        if p == id:
            break
        skipped += 1
    return skipped


cdef inline void pk_skip_bad(drvq_t *q) noexcept nogil:
    """A used descriptor we cannot account for: count it and step over its one slot."""
    q.st.drop_bad_used += 1
    pk_advance(q, &q.last_used_idx, &q.used_wrap, 1)


cdef int pk_used_count(drvq_t *q) noexcept nogil:
    cdef uint16_t id
    cdef uint32_t length
    return pk_peek(q, q.last_used_idx, q.used_wrap, &id, &length) != 0


cdef void pk_post(drvq_t *q, uint16_t id, uint32_t length, bint write) noexcept nogil:
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
        flags = VRING_PACKED_DESC_F_AVAIL if wrap else VRING_PACKED_DESC_F_USED
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
        pos += 1
        if pos == q.size:
            pos = 0
            wrap ^= 1
        if not left:
            break
    q.nslots[id] = n
    q.ndesc_free -= n
    q.inflight[id] = 1
    if q.in_order:
        fifo_push(q, id)
    q.avail_idx = pos
    q.avail_wrap = wrap
    q.avail_count += n
    if q.pend_head < 0:
        q.pend_head = head
        q.pend_flags = head_flags
    else:
        vh_store_release_u16(&q.pdesc[head].flags, head_flags)


cdef void pk_publish(drvq_t *q) noexcept nogil:
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
    if kick:
        vh_eventfd_signal(q.kickfd)
        q.st.kicks += 1
    else:
        q.st.kicks_suppressed += 1


cdef uint32_t pk_reclaim(drvq_t *q) noexcept nogil:
    """TX: take back every buffer the device has marked used (at most a ring's worth)."""
    cdef uint32_t n = 0, k
    cdef uint16_t id
    cdef uint32_t length
    cdef int r
    for k in range(q.size):
        r = pk_peek(q, q.last_used_idx, q.used_wrap, &id, &length)
        if r == 0:
            break
        if r < 0:
            pk_skip_bad(q)
            continue
        n += 1 + pk_complete(q, id)
    return n


cdef uint32_t pk_refill(drvq_t *q) noexcept nogil:
    """RX: post every buffer we own as device-writable, then publish."""
    cdef uint32_t n = 0
    cdef uint16_t id
    while q.nfree and q.ndesc_free >= q.rx_slots:
        q.nfree -= 1
        id = q.free_ids[q.nfree]
        pk_post(q, id, q.buf_len, True)
        n += 1
    pk_publish(q)
    return n


cdef bint pk_frame_ready(drvq_t *q, uint16_t first, uint32_t nbufs) noexcept nogil:
    """Are the ``nbufs - 1`` buffers after ``first`` (at last_used_idx) used already?"""
    cdef uint16_t pos = q.last_used_idx, id
    cdef uint8_t wrap = q.used_wrap
    cdef uint32_t b, length
    cdef int r
    pk_advance(q, &pos, &wrap, q.nslots[first])
    for b in range(1, nbufs):
        r = pk_peek(q, pos, wrap, &id, &length)
        if r == 0:
            return False
        pk_advance(q, &pos, &wrap, q.nslots[id] if r > 0 else 1)
    return True


cdef uint32_t pk_recv(drvq_t *q, pktpool_t *pool, pkt_t **pkts, uint32_t count) noexcept nogil:
    """RX burst on a packed ring; the same checks as the split ring's drv_recv."""
    cdef uint32_t nout = 0, b, nbufs, length, guard, skipped
    cdef uint64_t total
    cdef uint16_t id
    cdef uint8_t *slot
    cdef pkt_t *pkt
    cdef int r
    cdef bint bad
    for guard in range(q.size):
        if nout >= count:
            break
        r = pk_peek(q, q.last_used_idx, q.used_wrap, &id, &length)
        if r == 0:
            break
        if r < 0:
            pk_skip_bad(q)
            continue
        slot = q.slots + <uint64_t>id * q.slot_size
        nbufs = 1
        if q.mrg_rxbuf and length >= q.hdr_len:
            nbufs = slot[10] | (<uint32_t>slot[11] << 8)
        if length < q.hdr_len or length > q.buf_len or nbufs == 0 or \
                nbufs > DRV_MAX_MRG_BUFS or nbufs > q.size:
            q.st.drop_bad_used += 1 + pk_complete(q, id)
            continue
        if nbufs > 1 and not pk_frame_ready(q, id, nbufs):
            break                 # the rest of this frame is not there yet
        pkt = pool_get(pool)
        if pkt == NULL:
            q.st.drop_no_mbuf += 1
            break
        memcpy(pkt.vnet_hdr, slot, q.hdr_len)
        total = length - q.hdr_len
        if total <= pkt.cap:          # else dropped as oversize below
            memcpy(pkt.data, slot + q.hdr_len, total)
        skipped = pk_complete(q, id)
        q.st.drop_bad_used += skipped
        bad = skipped != 0
        for b in range(1, nbufs):
            r = pk_peek(q, q.last_used_idx, q.used_wrap, &id, &length)
            if r == 0:            # the device took back what it had marked used
                q.st.drop_bad_used += 1
                bad = True
                break
            if r < 0:
                pk_skip_bad(q)
                bad = True
                continue
            if length > q.buf_len:
                q.st.drop_bad_used += 1
                bad = True
            elif not bad and total + length <= pkt.cap:
                memcpy(pkt.data + total, q.slots + <uint64_t>id * q.slot_size, length)
            total += length
            skipped = pk_complete(q, id)
            if skipped:
                q.st.drop_bad_used += skipped
                bad = True
        if bad:
            pool_put(pool, pkt)
            continue
        if total > pkt.cap:
            q.st.drop_oversize += 1
            pool_put(pool, pkt)
            continue
        pkt.len = <uint32_t>total
        pkts[nout] = pkt
        nout += 1
        q.st.bytes += total
    pk_refill(q)
    q.st.packets += nout
    q.st.bursts += 1
    return nout


cdef class DriverQueue:
    """One split or packed virtqueue, driver side, over ring memory the caller laid out.

    Addresses are host pointers (ints) into ``memory`` (any object that keeps the mapping
    alive); ``slots_gpa`` is the guest physical address of ``slots``. ``rx`` selects the
    direction: device-writable buffers of ``buf_len`` bytes, or TX slots of ``buf_len``.
    ``packed``: ``desc`` is the descriptor ring, ``avail`` the driver event-suppression
    area and ``used`` the device's (4 bytes each)."""

    def __cinit__(self, int index, bint rx, uint32_t size, uint64_t desc, uint64_t avail,
                  uint64_t used, uint64_t slots, uint64_t slots_gpa, uint32_t slot_size,
                  uint32_t buf_len, object memory, bint packed=False):
        if size == 0 or size > 32768 or size & (size - 1):
            raise ValueError(f"ring size {size} is not a power of 2 in 1..32768")
        if buf_len > slot_size or buf_len < 64:
            raise ValueError(f"buffer length {buf_len} must be 64..slot size {slot_size}")
        if desc % 16 or avail % 2 or used % 4:
            raise ValueError("ring addresses are misaligned")
        memset(&self.q, 0, sizeof(drvq_t))
        self.index = index
        self.memory = memory
        self.q.free_ids = <uint16_t *>calloc(size, sizeof(uint16_t))
        self.q.inflight = <uint8_t *>calloc(size, 1)
        self.q.fifo = <uint16_t *>calloc(size, sizeof(uint16_t))
        self.q.nslots = <uint16_t *>calloc(size, sizeof(uint16_t))
        if self.q.free_ids == NULL or self.q.inflight == NULL or self.q.fifo == NULL or \
                self.q.nslots == NULL:
            raise MemoryError()
        self.q.packed = packed
        self.q.pdesc = <vring_packed_desc_t *>desc
        self.q.desc = <vring_desc_t *>desc
        self.q.avail = <uint16_t *>avail
        self.q.used = <uint16_t *>used
        self.q.used_ring = <vring_used_elem_t *>(used + 4)
        self.q.slots = <uint8_t *>slots
        self.q.slots_gpa = slots_gpa
        self.q.slot_size = slot_size
        self.q.buf_len = buf_len
        self.q.size = size
        self.q.rx = rx
        self.q.hdr_len = 12
        self.q.kickfd = -1
        self.q.callfd = -1
        self.q.pend_head = -1
        self.q.rx_slots = self.q.tx_max_slots = 1

    def __dealloc__(self):
        free(self.q.free_ids)
        free(self.q.inflight)
        free(self.q.fifo)
        free(self.q.nslots)

    def configure(self, *, bint event_idx, bint mrg_rxbuf, int hdr_len, int kickfd,
                  int callfd, bint in_order=False, uint32_t chain_seg=0):
        """Negotiated features and the eventfds (ours: we write kick, we read call).
        ``chain_seg`` (packed only): post each buffer as a chain, the header in its own
        descriptor and then descriptors of at most ``chain_seg`` bytes."""
        if hdr_len not in (10, 12):
            raise ValueError("virtio-net header is 10 or 12 bytes")
        if mrg_rxbuf and hdr_len != 12:
            raise ValueError("mergeable RX buffers need the 12-byte header")
        if chain_seg and not self.q.packed:
            raise ValueError("chained buffers are for packed rings only")
        self.q.hdr_len = hdr_len
        self.q.chain_seg = chain_seg
        if pk_slots_for(&self.q, self.q.buf_len) > self.q.size:
            raise ValueError(f"a {self.q.buf_len}-byte buffer in {chain_seg}-byte descriptors "
                             f"does not fit a ring of {self.q.size}")
        self.q.rx_slots = self.q.tx_max_slots = pk_slots_for(&self.q, self.q.buf_len)
        self.q.in_order = in_order
        self.q.event_idx = event_idx
        self.q.mrg_rxbuf = mrg_rxbuf
        self.q.hdr_len = hdr_len
        self.q.kickfd = kickfd
        self.q.callfd = callfd

    def reset(self):
        """Empty ring: zeroed shared structures, every descriptor ours, interrupts off.
        Call before handing the ring to a device (base 0); RX buffers are posted by
        ``post_rx``."""
        cdef uint32_t i
        memset(self.q.desc, 0, 16 * self.q.size)
        if self.q.packed:
            memset(self.q.avail, 0, 4)
            memset(self.q.used, 0, 4)
        else:
            memset(self.q.avail, 0, 6 + 2 * self.q.size)
            memset(self.q.used, 0, 6 + 8 * self.q.size)
        memset(self.q.inflight, 0, self.q.size)
        memset(self.q.nslots, 0, self.q.size * sizeof(uint16_t))
        self.q.nfree = 0
        for i in range(self.q.size):
            self.q.free_ids[self.q.size - 1 - i] = <uint16_t>i
        self.q.nfree = self.q.size
        self.q.avail_idx = 0
        self.q.last_used_idx = 0
        self.q.kicked_idx = 0
        self.q.broken = 0
        self.q.fifo_head = self.q.fifo_tail = 0
        self.q.avail_count = 0
        self.q.ndesc_free = self.q.size
        self.q.pend_head = -1
        self.q.avail_wrap = self.q.used_wrap = 1      # a fresh packed ring starts at wrap 1
        if self.q.packed:
            self.q.avail[1] = RING_EVENT_FLAGS_DISABLE
        else:
            self.q.avail[0] = VRING_AVAIL_F_NO_INTERRUPT

    def post_rx(self):
        """RX: offer every free buffer to the device (kicks it if it wants to be told)."""
        if not self.q.rx:
            raise ValueError("post_rx on a TX queue")
        with nogil:
            n = drv_refill(&self.q)
        return n

    @property
    def size(self):
        return self.q.size

    @property
    def rx(self):
        return bool(self.q.rx)

    @property
    def broken(self):
        return bool(self.q.broken)

    @property
    def packed(self):
        return bool(self.q.packed)

    @property
    def in_order(self):
        return bool(self.q.in_order)

    @property
    def base(self):
        """What SET_VRING_BASE says of this ring: split, the avail index; packed, avail
        index (bits 0-14), avail wrap (15), used index (16-30), used wrap (31)."""
        if not self.q.packed:
            return self.q.avail_idx
        cdef uint32_t v = self.q.avail_idx | (<uint32_t>self.q.avail_wrap << 15)
        v |= (<uint32_t>self.q.last_used_idx << 16) | (<uint32_t>self.q.used_wrap << 31)
        return v

    @property
    def capacity(self):
        """Buffers the ring holds at once (fewer than ``size`` with chained buffers)."""
        return self.q.size // (self.q.rx_slots if self.q.rx else self.q.tx_max_slots)

    @property
    def in_flight(self):
        """Buffers the device holds (TX: frames posted and not yet completed, as of the
        last reclaim)."""
        return self.q.size - self.q.nfree

    @property
    def free(self):
        """Buffers we own (TX: room for that many frames after a reclaim)."""
        if self.q.packed:
            return min(self.q.nfree, self.q.ndesc_free // self.q.tx_max_slots)
        return self.q.nfree

    @property
    def avail_idx(self):
        return self.q.avail_idx

    @property
    def max_frame(self):
        """TX: the largest frame one descriptor carries."""
        return self.q.buf_len - self.q.hdr_len

    @property
    def callfd(self):
        return self.q.callfd

    def stats(self):
        """Every counter of the queue: drvq_stats_t as a dict named by its own fields."""
        cdef drvq_stats_t snapshot = self.q.st
        return snapshot

    def reclaim(self):
        cdef uint32_t n
        with nogil:
            n = drv_reclaim(&self.q)
        return n

    def pending(self):
        """Used entries waiting (RX frames or TX completions); -1 when the ring is broken."""
        cdef uint16_t idx
        return drv_used_count(&self.q, &idx)

    def send(self, PacketPool pool, frames):
        """TX: copy frames (bytes-like) into the ring; returns how many were taken, in
        order. Frames larger than ``max_frame`` stop the burst (ValueError if first)."""
        cdef pkt_t *pkts[MAX_BURST]
        cdef uint32_t n, sent, total = 0
        cdef const uint8_t[::1] view
        if self.q.rx:
            raise ValueError("send on an RX queue")
        frames = list(frames)
        while frames:
            n = 0
            for frame in frames[:MAX_BURST]:
                view = frame
                if <uint32_t>view.shape[0] > self.q.buf_len - self.q.hdr_len:
                    if total == 0 and n == 0:
                        raise ValueError(f"frame of {view.shape[0]} bytes exceeds "
                                         f"{self.max_frame}")
                    break
                pkts[n] = pool_get(pool.pool)
                if pkts[n] == NULL:
                    break
                if view.shape[0]:
                    memcpy(pkts[n].data, &view[0], view.shape[0])
                pkts[n].len = view.shape[0]
                n += 1
            with nogil:
                sent = drv_send(&self.q, pkts, n)
            pool_put_many(pool.pool, pkts, n)
            total += sent
            del frames[:MAX_BURST]
            if sent < MAX_BURST:
                break
        return total

    def recv(self, PacketPool pool, uint32_t max_packets=MAX_BURST):
        """RX: up to ``max_packets`` frames (bytes, virtio-net header stripped)."""
        cdef pkt_t *pkts[MAX_BURST]
        cdef uint32_t n, i
        if not self.q.rx:
            raise ValueError("recv on a TX queue")
        if max_packets > MAX_BURST:
            max_packets = MAX_BURST
        with nogil:
            n = drv_recv(&self.q, pool.pool, pkts, max_packets)
        out = [(<char *>pkts[i].data)[:pkts[i].len] for i in range(n)]
        pool_put_many(pool.pool, pkts, n)
        return out

    def set_interrupts(self, bint on):
        drv_interrupts(&self.q, on)


def wait(queues, int extra_fd=-1, int timeout_ms=-1):
    """Sleep (GIL released) until one of ``queues`` has used entries, ``extra_fd`` is
    readable, or ``timeout_ms`` passes. Returns 1 (ring work), 2 (extra_fd) or 0."""
    cdef drvq_t *qs[MAX_WAIT_FDS]
    cdef int n = 0, r
    cdef DriverQueue dq
    for dq in queues:
        if n == MAX_WAIT_FDS - 1:
            raise ValueError("too many queues to wait on")
        qs[n] = &dq.q
        n += 1
    with nogil:
        r = drv_wait(qs, n, extra_fd, timeout_ms)
    return r
