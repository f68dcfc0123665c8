# The driver side's one ring core (_driver): reclaim (TX completions), post and publish,
# refill (RX buffers) and receive (RX frames, mergeable or not) written once for split and
# packed over small per-layout helpers (_drv_split, _drv_packed): where the next used entry
# is (used_begin / used_peek), stepping over a bad one (used_skip_bad), taking one back
# (used_take, IN_ORDER included: _drv_books), whether a merged frame is complete
# (frame_ready), post, publish, interrupts. Every counter of a burst is kept here, once for
# both layouts. The device is untrusted: a bad used entry is dropped and counted, never
# followed. Header-only: compiled into _driver.
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy, memset

from pyvhost._driver cimport DRV_MAX_MRG_BUFS, drvq_t
from pyvhost._drv_books cimport release_through
from pyvhost._drv_packed cimport (
    pk_frame_ready, pk_interrupts, pk_peek, pk_post, pk_publish,
)
from pyvhost._drv_split cimport (
    sp_interrupts, sp_post, sp_publish, sp_reclaim_in_order, sp_used_begin, sp_used_peek,
)
from pyvhost._pktpool cimport pkt_t, pktpool_t, pool_get, pool_put
from pyvhost._ring_index cimport packed_advance
from pyvhost._vring cimport vh_prefetch_w


cdef struct ucur_t:
    # where the used entries of this burst end: split, the device's used index read once
    # (packed: each descriptor's flags say it)
    uint16_t end


cdef inline int used_begin(drvq_t *q, ucur_t *uc) noexcept nogil:
    """Start a burst of used entries: -1 when the ring is (or now proves) broken; else
    split, how many the device published; packed, whether the next descriptor is used."""
    cdef uint16_t id
    cdef uint32_t length
    uc.end = 0
    if q.broken:
        return -1
    if q.packed:
        return pk_peek(q, q.last_used_idx, q.used_wrap, &id, &length) != 0
    return sp_used_begin(q, &uc.end)


cdef inline int used_peek(drvq_t *q, const ucur_t *uc, uint16_t *id,
                          uint32_t *length) noexcept nogil:
    """The next used entry: 0 none, 1 a buffer in flight (``*id``, ``*length``), -1 an id
    we do not have out (step over it with used_skip_bad)."""
    if q.packed:
        return pk_peek(q, q.last_used_idx, q.used_wrap, id, length)
    return sp_used_peek(q, uc.end, id, length)


cdef inline void used_skip_bad(drvq_t *q) noexcept nogil:
    """A used entry we cannot account for: counted, stepped over (packed: its one slot)."""
    q.st.drop_bad_used += 1
    if q.packed:
        packed_advance(&q.last_used_idx, &q.used_wrap, 1, q.size)
    else:
        q.last_used_idx += 1


cdef inline bint next_used(drvq_t *q, const ucur_t *uc, uint16_t *id,
                           uint32_t *length) noexcept nogil:
    """The next used entry that names a buffer in flight (``*id``, ``*length``); the bad
    ones before it are stepped over and counted (at most a ring's worth). False: none."""
    cdef uint32_t k
    cdef int r
    for k in range(q.size):
        r = used_peek(q, uc, id, length)
        if r >= 0:
            return r > 0
        used_skip_bad(q)
    return False


cdef inline uint32_t used_take(drvq_t *q, uint16_t id) noexcept nogil:
    """The used entry at hand names buffer ``id`` (in flight): consume it and take the
    buffer back; with IN_ORDER the ones posted before it too (returns how many)."""
    if not q.packed:
        q.last_used_idx += 1          # packed: release steps over the buffers' slots
    return release_through(q, id)


cdef inline bint frame_ready(drvq_t *q, const ucur_t *uc, uint16_t first,
                             uint32_t nbufs) noexcept nogil:
    """Mergeable RX: are all ``nbufs`` buffers of the frame starting at the next used
    entry (buffer ``first``) used already?"""
    if q.packed:
        return pk_frame_ready(q, first, nbufs)
    return <uint16_t>(uc.end - q.last_used_idx) >= nbufs


cdef inline void post(drvq_t *q, uint16_t id, uint32_t length, bint write) noexcept nogil:
    """Buffer ``id`` (the first ``length`` bytes of its slot) to the device; seen on publish."""
    if q.packed:
        pk_post(q, id, length, write)
    else:
        sp_post(q, id, length, write)


cdef inline void publish(drvq_t *q) noexcept nogil:
    if q.packed:
        pk_publish(q)
    else:
        sp_publish(q)


cdef inline void interrupts(drvq_t *q, bint on) noexcept nogil:
    if q.packed:
        pk_interrupts(q, on)
    else:
        sp_interrupts(q, on)


cdef inline uint32_t reclaim_used(drvq_t *q) noexcept nogil:
    """TX: take back the buffers the device has finished with; returns how many."""
    cdef ucur_t uc
    cdef uint32_t n = 0, length
    cdef uint16_t id
    if used_begin(q, &uc) <= 0:
        return 0
    if q.in_order and not q.packed:
        return sp_reclaim_in_order(q, uc.end)      # the used index counts them
    while next_used(q, &uc, &id, &length):         # each takes >= 1 buffer back
        n += 1 + used_take(q, id)
    return n


cdef inline int tx_slot(drvq_t *q, uint8_t **frame) noexcept nogil:
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


cdef inline void tx_slots_prefetch(drvq_t *q, uint32_t n) noexcept nogil:
    """Hints only: ask to own the lines of the next ``n`` buffers tx_slot hands out (their
    header and the frame's first bytes). The device's core read them last: asked for
    together, those ownership requests overlap instead of each frame's stores waiting for
    its own in turn."""
    cdef uint32_t j
    cdef uint8_t *slot
    if n > q.nfree:
        n = q.nfree
    for j in range(n):
        slot = q.slots + <uint64_t>q.free_ids[q.nfree - 1 - j] * q.slot_size
        vh_prefetch_w(slot)
        vh_prefetch_w(slot + 64)


cdef inline uint32_t send_frames(drvq_t *q, pkt_t **pkts, uint32_t count) noexcept nogil:
    """TX burst: copy frames into free buffers and publish. Returns how many were taken
    (in order); the caller keeps ownership of every packet."""
    cdef uint32_t i, n = 0
    cdef int id
    cdef uint8_t *frame
    reclaim_used(q)
    for i in range(count):
        if pkts[i].len > q.buf_len - q.hdr_len:
            break
        id = tx_slot(q, &frame)
        if id < 0:
            q.st.ring_full += count - i
            break
        memcpy(frame, pkts[i].data, pkts[i].len)
        post(q, <uint16_t>id, q.hdr_len + pkts[i].len, False)
        q.st.bytes += pkts[i].len
        n += 1
    publish(q)
    q.st.packets += n
    q.st.bursts += 1
    return n


cdef inline uint32_t refill_all(drvq_t *q) noexcept nogil:
    """RX: post every buffer we own (that the ring has slots for) as device-writable, then
    publish."""
    cdef uint32_t n = 0
    cdef uint16_t id
    if q.broken:
        return 0
    while q.nfree and (not q.packed or q.ndesc_free >= q.rx_slots):
        q.nfree -= 1
        id = q.free_ids[q.nfree]
        post(q, id, q.buf_len, True)
        n += 1
    publish(q)
    return n


cdef inline uint32_t recv_frames(drvq_t *q, pktpool_t *pool, pkt_t **pkts,
                                 uint32_t count) noexcept nogil:
    """RX burst: up to ``count`` frames reassembled into pool packets, buffers re-posted.
    An empty ring is not a burst.

    A used entry whose id the device does not own, whose length exceeds the buffer or is
    shorter than the header, or whose num_buffers is 0 or too large is dropped and counted;
    so are buffers an IN_ORDER completion skipped (they have no length)."""
    cdef ucur_t uc
    cdef uint32_t nout = 0, b, nbufs, length, skipped, guard
    cdef uint64_t total
    cdef uint16_t id
    cdef uint8_t *slot
    cdef pkt_t *pkt
    cdef int r
    cdef bint bad
    if used_begin(q, &uc) <= 0:
        return 0
    for guard in range(q.size):
        if nout >= count or not next_used(q, &uc, &id, &length):
            break
        slot = q.slots + <uint64_t>id * q.slot_size
        nbufs = 1
        if q.mrg_rxbuf and length >= q.hdr_len:
            nbufs = slot[10] | (<uint32_t>slot[11] << 8)
        if length < q.hdr_len or length > q.buf_len or nbufs == 0 or \
                nbufs > DRV_MAX_MRG_BUFS or nbufs > q.size:
            q.st.drop_bad_used += 1 + used_take(q, id)
            continue
        if nbufs > 1 and not frame_ready(q, &uc, id, nbufs):
            break                 # the rest of this frame is not there yet
        pkt = pool_get(pool)
        if pkt == NULL:
            q.st.drop_no_mbuf += 1
            break
        memcpy(pkt.vnet_hdr, slot, q.hdr_len)
        total = length - q.hdr_len
        if total <= pkt.cap:          # else dropped as oversize below
            memcpy(pkt.data, slot + q.hdr_len, total)
        skipped = used_take(q, id)
        q.st.drop_bad_used += skipped
        bad = skipped != 0
        for b in range(1, nbufs):
            r = used_peek(q, &uc, &id, &length)
            if r == 0:            # the device took back what it had marked used
                q.st.drop_bad_used += 1
                bad = True
                break
            if r < 0:
                used_skip_bad(q)
                bad = True
                continue
            if length > q.buf_len:
                q.st.drop_bad_used += 1
                bad = True
            elif not bad and total + length <= pkt.cap:
                memcpy(pkt.data + total, q.slots + <uint64_t>id * q.slot_size, length)
            total += length
            skipped = used_take(q, id)
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
    refill_all(q)
    q.st.packets += nout
    q.st.bursts += 1
    return nout
