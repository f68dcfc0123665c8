# The one ring core: dequeue_chains (guest TX -> packets) and enqueue_chains (packets ->
# guest RX, mergeable or not) for split and packed alike, over small per-layout helpers
# (ring_begin/next_chain/ring_commit: the next available chain; mark_used; ring_notify);
# packed rings take four single-descriptor chains at once where they can (_ring_batch).
# The copies of a burst's frames in one segment wait for its end and go together
# (tx_copies, rx_copies), as DPDK's batch copy: lines another core holds are then asked
# for many at once, not one between each frame's other work (packed RX batches too; the
# packed TX batch path copies at once: deferring it measured no gain). Every counter of a
# burst is kept here, once for both layouts. Runs inside the caller's SIGBUS guard with
# the ring locked. Header-only: compiled into _vring.
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t

from pyvhost._pktpool cimport pkt_t, pktpool_t, pool_get, pool_put
from pyvhost._ring_batch cimport PACKED_BATCH, batch_read
from pyvhost._ring_copy cimport (
    copy_head, copy_out, fill_iovs, log_iovs, put_header, tx_header_ok,
)
from pyvhost._ring_guard cimport vh_compiler_barrier
from pyvhost._ring_onecopy cimport fill_ext
from pyvhost._ring_index cimport packed_advance
from pyvhost._ring_packed cimport (
    notify_guest_packed, packed_avail, packed_used_flush, put_used_packed, used_batch_t,
)
from pyvhost._ring_split cimport (
    avail_count, notify_guest, prefetch_chains, put_used_split, split_used_flush,
)
from pyvhost._ring_walk cimport MAX_BUFS_PER_PKT, walk_chain, walk_packed
from pyvhost._vring cimport (
    MAX_BURST, MAX_IOV, ONECOPY_HEAD, ext_t, iov_t, vh_load_relaxed_u16, vh_prefetch, vq_t,
)


cdef struct tx_copy_t:
    # a chain dequeue_chains has taken a packet for and copies at the burst's end
    const uint8_t *src      # its one segment: header and frame
    uint64_t total
    uint32_t at             # the packet's place in pkts


cdef inline void tx_copy_one(vq_t *vq, pkt_t *pkt, const iov_t *iov, uint32_t niov,
                             uint64_t total, bint ref) noexcept nogil:
    if ref and total - vq.hdr_len > ONECOPY_HEAD and \
            pkt.cap >= ONECOPY_HEAD + sizeof(ext_t) + 8:
        copy_head(vq, iov, niov, total, vq.hdr_len, pkt)
    else:
        copy_out(iov, niov, total, vq.hdr_len, pkt)


cdef inline bint tx_accept(vq_t *vq, pktpool_t *pool, pkt_t *pkt) noexcept nogil:
    """The copied frame's header checked: counted, or dropped (its packet given back)."""
    if tx_header_ok(vq, pkt):
        vq.st.bytes += pkt.len + pkt.ext_len
        if pkt.ext_len:
            vq.nref += 1
        return True
    vq.st.drop_bad_hdr += 1
    vq.dq_taken -= 1
    pool_put(pool, pkt)
    return False


cdef inline uint32_t tx_copies(vq_t *vq, pktpool_t *pool, pkt_t **pkts, uint32_t nout,
                               tx_copy_t *dc, uint32_t n) noexcept nogil:
    """The burst's deferred chains copied into their packets one after another (DPDK's
    batch copy: the loads of lines the guest wrote go out together), then each header
    checked; a packet whose header is refused leaves ``pkts``, the others keep their
    order. Before ring_notify, so no chain is given back before it is copied (the used
    elements are written there; one-copy: at vq_rx_complete). Returns the new count. A
    fault in a copy unwinds with every packet still in ``pkts``. Also called mid-burst
    when the pool runs dry (receive_chain's -2): a refused packet's buffer then serves the
    next chain, as if each had been settled at once."""
    cdef iov_t one
    cdef uint32_t k, j, w = 0, d = 0
    if n == 0:
        return nout
    for k in range(n):
        one.base = <uint8_t *>dc[k].src
        one.len = dc[k].total
        one.gpa = 0
        copy_out(&one, 1, dc[k].total, vq.hdr_len, pkts[dc[k].at])
    for j in range(nout):               # no guest memory from here on
        if d < n and dc[d].at == j:
            d += 1
            if not tx_accept(vq, pool, pkts[j]):
                continue
        pkts[w] = pkts[j]
        w += 1
    return w


cdef inline int receive_chain(vq_t *vq, pktpool_t *pool, const iov_t *iov, uint32_t niov,
                              uint64_t total, bint bad, pkt_t **pkts,
                              uint32_t *nout, bint ref, tx_copy_t *dc,
                              uint32_t *ndc) noexcept nogil:
    """One guest TX chain (split or packed) into a packet appended to ``pkts``, or counted
    as dropped. -1 when no packet buffer is free: the chain must stay in the ring; -2 when
    none is free while chains noted in ``dc`` are not settled (tx_copies, then again).
    ``ref``: a frame longer than ONECOPY_HEAD keeps its tail in guest memory (copy_head).
    With ``dc``, a frame in one segment that is copied whole is only noted there:
    tx_copies copies and checks it before the burst ends."""
    cdef uint32_t hdr = vq.hdr_len
    cdef pkt_t *pkt
    if bad or total < hdr:
        vq.st.drop_bad_desc += 1
    elif not vq.enabled:
        vq.st.drop_disabled += 1
    elif total - hdr > pool.buf_size:
        vq.st.drop_oversize += 1
    else:
        pkt = pool_get(pool)
        if pkt == NULL:
            if ndc != NULL and ndc[0]:
                return -2           # settle the deferred first: a refused one frees its buffer
            vq.st.drop_no_mbuf += 1
            return -1
        pkts[nout[0]] = pkt
        vq.dq_taken += 1                # a fault in the copy gives it back (vq_dequeue)
        vh_compiler_barrier()
        if dc != NULL and niov == 1 and not (ref and total - hdr > ONECOPY_HEAD):
            dc[ndc[0]].src = iov[0].base
            dc[ndc[0]].total = iov[0].len   # (one segment: all of the chain)
            dc[ndc[0]].at = nout[0]
            ndc[0] += 1
            nout[0] += 1
            return 0
        tx_copy_one(vq, pkt, iov, niov, total, ref)
        if tx_accept(vq, pool, pkt):
            nout[0] += 1
    return 0


cdef enum:
    CHAIN_OK = 0
    CHAIN_BAD = -1          # a hostile chain: it is consumed (given back untouched) and dropped
    CHAIN_BROKEN = -2       # the ring's own structure is bad (head index, endless chain)
    CHAIN_MISS = -3         # an IOTLB miss: nothing may be consumed
    CHAIN_NONE = -4         # nothing (more) available


cdef struct cursor_t:
    # where the next available chain is: split, the free-running avail index and the guest's
    # avail idx read once per burst; packed, the slot and its wrap counter
    uint16_t idx
    uint16_t avail_idx
    uint8_t wrap
    uint32_t room           # packed: slots a chain may span from idx, up to the first one
                            # not given back (consumed in this burst or pending, ref)


cdef struct chain_t:
    uint16_t id             # split: the head index; packed: the buffer id
    uint16_t nslots         # packed: the ring slots the chain spans; split: 1
    uint64_t total          # bytes of its buffers


cdef inline int ring_begin(vq_t *vq, cursor_t *cur) noexcept nogil:
    """A cursor at the next available chain; -1 when the ring proves broken (split: an
    avail idx more than a ring ahead, counted in ring_errors)."""
    cur.idx = vq.last_avail_idx
    cur.wrap = vq.avail_wrap
    cur.avail_idx = 0
    cur.room = 0
    if vq.packed:
        cur.room = vq.size - ((vq.last_avail_idx + vq.size - vq.last_used_idx) % vq.size)
        if cur.room == vq.size and vq.avail_wrap != vq.used_wrap:
            cur.room = 0                  # the whole ring is taken and not given back
        return 0
    return -1 if avail_count(vq, &cur.avail_idx) < 0 else 0


cdef inline void ring_commit(vq_t *vq, const cursor_t *cur) noexcept nogil:
    """The chains up to ``cur`` are consumed."""
    vq.last_avail_idx = cur.idx
    vq.avail_wrap = cur.wrap


cdef inline bint ring_has_chain(vq_t *vq, const cursor_t *cur) noexcept nogil:
    if vq.packed:
        return packed_avail(vq, cur.idx, cur.wrap)
    return cur.avail_idx != cur.idx


cdef inline void prefetch_ahead(vq_t *vq, uint16_t slot) noexcept nogil:
    """The descriptor line after ``slot``'s into the cache while ``slot``'s chain is read
    and copied (a driver posts chains in consecutive descriptors most of the time: then
    the next chains' descriptors, which it wrote on its own core, are on that line). A hint
    on an address we compute, never on a value read from the guest."""
    cdef uint32_t ahead = slot + PACKED_BATCH
    if ahead >= vq.size:
        ahead -= vq.size
    if ahead < vq.size:
        vh_prefetch(&vq.desc[ahead])


cdef inline int next_chain(vq_t *vq, cursor_t *cur, bint writable, iov_t *iov,
                           uint32_t *niov, chain_t *ch) noexcept nogil:
    """Read the chain at ``cur`` into iov[*niov..] and step ``cur`` past it: CHAIN_OK,
    CHAIN_BAD (``ch`` still names it, so it can be given back), or CHAIN_BROKEN,
    CHAIN_MISS, CHAIN_NONE (``cur`` is then not to be committed)."""
    cdef uint32_t nslots = 1
    cdef uint16_t head
    cdef int rc
    ch.total = 0
    if not ring_has_chain(vq, cur):
        return CHAIN_NONE
    if vq.packed:
        prefetch_ahead(vq, cur.idx)
        rc = walk_packed(vq, cur.idx, cur.room, writable, iov, niov, &ch.total, &nslots,
                         &ch.id)
        if rc == -2:
            return CHAIN_BROKEN
        if rc == -3:
            return CHAIN_MISS
        packed_advance(&cur.idx, &cur.wrap, nslots, vq.size)
        cur.room -= nslots
    else:
        head = vh_load_relaxed_u16(&vq.avail[2 + (cur.idx & (vq.size - 1))])
        if head >= vq.size:
            return CHAIN_BROKEN
        prefetch_ahead(vq, head)
        rc = walk_chain(vq, head, writable, iov, niov, &ch.total)
        if rc == -3:
            return CHAIN_MISS
        ch.id = head
        cur.idx += 1
    ch.nslots = <uint16_t>nslots
    return CHAIN_BAD if rc < 0 else CHAIN_OK


cdef inline void ring_broken(vq_t *vq) noexcept nogil:
    """The ring cannot be trusted any more: control resets it."""
    vq.broken = 1
    vq.st.ring_errors += 1


cdef inline void mark_used(vq_t *vq, used_batch_t *ub, uint16_t id, uint16_t nslots,
                           uint32_t length, bint written) noexcept nogil:
    """A used element into the burst's batch ``ub`` (its n, nshadow and head_slot set to 0
    at the burst's start); the guest sees the batch in ring_notify. Split, and packed TX:
    the element waits in the shadow (written when 32 wait, or there); split's used index
    is published once there."""
    if vq.packed:
        put_used_packed(vq, ub, id, length, nslots, written)
    else:
        put_used_split(vq, ub, id, length)
        ub.n += 1


cdef inline void ring_notify(vq_t *vq, used_batch_t *ub) noexcept nogil:
    """Publish the used elements the burst wrote (our own count: never the used index in
    guest memory, which the guest can write) and notify unless suppressed."""
    if ub.n == 0:
        return
    if vq.packed:
        packed_used_flush(vq, ub)
        notify_guest_packed(vq)
    else:
        split_used_flush(vq, ub)
        notify_guest(vq)


cdef inline void step_one(vq_t *vq, cursor_t *cur) noexcept nogil:
    """A batch's chain (one slot) is consumed: the cursor past it, committed."""
    packed_advance(&cur.idx, &cur.wrap, 1, vq.size)
    cur.room -= 1
    ring_commit(vq, cur)


cdef inline void tx_complete(vq_t *vq, used_batch_t *ub, bint ref, uint16_t id,
                             uint16_t nslots) noexcept nogil:
    """A TX chain taken: back to the guest with the burst's used elements (ring_notify),
    or (ref) at vq_rx_complete."""
    if ref:
        vq.pend_id[vq.npend] = id
        vq.pend_slots[vq.npend] = nslots
        vq.npend += 1
    else:
        mark_used(vq, ub, id, nslots, 0, False)


cdef inline int dequeue_batch(vq_t *vq, pktpool_t *pool, cursor_t *cur, used_batch_t *ub,
                              pkt_t **pkts, uint32_t *nout, bint ref, tx_copy_t *dc,
                              uint32_t *ndc) noexcept nogil:
    """Packed: the next PACKED_BATCH chains at once when they form a batch (_ring_batch):
    PACKED_BATCH when all were consumed, 0 when they are not a batch, -1 - k when the
    packet pool ran dry after k (the rest stay in the ring: the burst stops). The burst's
    deferred copies (``dc``, ``ndc``: chains taken one at a time before) are settled first
    when the pool runs dry, as one at a time: a refused one gives its buffer back."""
    cdef uint16_t ids[PACKED_BATCH]
    cdef iov_t biov[PACKED_BATCH]
    cdef int k, rc
    if not batch_read(vq, cur.idx, cur.wrap, cur.room, False, ids, biov):
        return 0
    for k in range(PACKED_BATCH):
        if k + 1 < PACKED_BATCH:
            vh_prefetch(biov[k + 1].base + 64)
        rc = receive_chain(vq, pool, &biov[k], 1, biov[k].len, False, pkts, nout, ref,
                           NULL, ndc)
        if rc == -2:
            nout[0] = tx_copies(vq, pool, pkts, nout[0], dc, ndc[0])
            ndc[0] = 0
            rc = receive_chain(vq, pool, &biov[k], 1, biov[k].len, False, pkts, nout, ref,
                               NULL, ndc)
        if rc < 0:
            vq.batched += k
            return -1 - k
        tx_complete(vq, ub, ref, ids[k], 1)
        step_one(vq, cur)
    vq.batched += PACKED_BATCH
    return PACKED_BATCH


cdef inline uint32_t dequeue_chains(vq_t *vq, pktpool_t *pool, pkt_t **pkts, uint32_t count,
                                    bint ref) noexcept nogil:
    """Guest TX chains into packets, split or packed. An empty ring is not a burst. Packed:
    four at a time where they form a batch (dequeue_batch), else one at a time."""
    cdef cursor_t cur
    cdef chain_t ch
    cdef uint32_t i = 0, nout = 0, niov
    cdef used_batch_t ub
    cdef iov_t iov[MAX_IOV]
    cdef tx_copy_t dc[MAX_BURST]
    cdef uint32_t ndc = 0
    cdef int rc
    cdef bint bad
    ub.n = 0
    ub.nshadow = 0
    ub.head_slot = 0
    if ring_begin(vq, &cur) < 0 or not ring_has_chain(vq, &cur):
        return 0
    if not vq.packed:
        prefetch_chains(vq, cur.idx, min(count, <uint16_t>(cur.avail_idx - cur.idx)))
    while i < count:
        if vq.packed and count - i >= PACKED_BATCH:
            rc = dequeue_batch(vq, pool, &cur, &ub, pkts, &nout, ref, dc, &ndc)
            if rc == PACKED_BATCH:
                i += PACKED_BATCH
                continue
            if rc < 0:
                break                       # out of packet buffers
        niov = 0
        rc = next_chain(vq, &cur, False, iov, &niov, &ch)
        if rc == CHAIN_NONE or rc == CHAIN_MISS:
            break                           # a miss: not mapped yet, stays in the ring
        if rc == CHAIN_BROKEN:
            ring_broken(vq)
            break
        bad = rc < 0
        rc = receive_chain(vq, pool, iov, niov, ch.total, bad, pkts, &nout, ref,
                           dc if ndc < MAX_BURST else NULL, &ndc)
        if rc == -2:                        # the pool ran dry with copies outstanding:
            nout = tx_copies(vq, pool, pkts, nout, dc, ndc)     # as if each had been
            ndc = 0                                             # settled at once
            rc = receive_chain(vq, pool, iov, niov, ch.total, bad, pkts, &nout, ref,
                               dc, &ndc)
        if rc < 0:
            break                           # no packet buffer: it stays in the ring
        tx_complete(vq, &ub, ref, ch.id, ch.nslots)
        ring_commit(vq, &cur)
        i += 1
    nout = tx_copies(vq, pool, pkts, nout, dc, ndc)
    ring_notify(vq, &ub)
    vq.st.packets += nout
    vq.st.bursts += 1
    return nout


cdef struct rx_copy_t:
    # a frame enqueue_chains has found its buffer for and copies at the burst's end
    uint8_t *dst            # the buffer: one segment, room for header and frame
    uint64_t gpa
    pkt_t *pkt
    uint32_t need           # header and frame bytes
    uint32_t nbufs          # num_buffers of the header


cdef inline uint32_t enqueue_batch(vq_t *vq, pkt_t **pkts, cursor_t *cur, used_batch_t *ub,
                                   uint32_t *nsent, uint64_t *nbytes, rx_copy_t *cp,
                                   uint32_t *ncp) noexcept nogil:
    """Packed: PACKED_BATCH packets into the next PACKED_BATCH buffers at once when those
    form a batch (_ring_batch) and each frame fits its buffer (one buffer per frame,
    num_buffers 1). A whole frame is only noted in ``cp`` (``ncp``): rx_copies copies it at
    the burst's end with the others, before ring_notify makes the first used descriptor of
    the burst visible; their bytes go to ``nbytes`` (counted at the burst's end). Returns
    how many of ``pkts`` were dealt with: 0 when not a batch (take them one at a time);
    fewer than PACKED_BATCH when a one-copy frame's sender faulted (that frame is lost, its
    buffer and the rest stay the guest's, as one at a time)."""
    cdef uint16_t ids[PACKED_BATCH]
    cdef iov_t biov[PACKED_BATCH]
    cdef uint32_t k, i_iov
    cdef uint64_t need, off
    cdef pkt_t *pkt
    if not batch_read(vq, cur.idx, cur.wrap, cur.room, True, ids, biov):
        return 0
    for k in range(PACKED_BATCH):
        if vq.hdr_len + pkts[k].len + pkts[k].ext_len > biov[k].len:
            return 0                        # a frame needs more than its buffer
    for k in range(PACKED_BATCH):
        pkt = pkts[k]
        need = vq.hdr_len + pkt.len + pkt.ext_len
        if pkt.ext_len == 0 and ncp[0] < MAX_BURST:
            cp[ncp[0]].dst = biov[k].base
            cp[ncp[0]].gpa = biov[k].gpa
            cp[ncp[0]].pkt = pkt
            cp[ncp[0]].need = <uint32_t>need
            cp[ncp[0]].nbufs = 1
            ncp[0] += 1
        else:
            if k + 1 < PACKED_BATCH:
                vh_prefetch(pkts[k + 1].data)
            i_iov = 0
            off = 0
            put_header(&biov[k], &i_iov, &off, vq, 1, pkt)
            fill_iovs(&biov[k], &i_iov, &off, pkt.data, pkt.len)
            if pkt.ext_len and fill_ext(&biov[k], &i_iov, &off, pkt) < 0:
                vq.batched += k
                return k + 1
            log_iovs(vq, &biov[k], 1, need)
        mark_used(vq, ub, ids[k], 1, <uint32_t>need, True)
        step_one(vq, cur)
        nbytes[0] += pkt.len + pkt.ext_len
        if pkt.ext_len:
            vq.onecopy += 1
        nsent[0] += 1
    vq.batched += PACKED_BATCH
    return PACKED_BATCH


cdef inline void rx_copies(vq_t *vq, rx_copy_t *cp, uint32_t n) noexcept nogil:
    """The burst's deferred frames into their buffers, header, frame, dirty log, one after
    another (DPDK's batch copy): stores to lines the guest holds are then side by side and
    the CPU asks for many of those lines at once; between other work, each waited its turn.
    Before ring_notify: the guest sees none of these buffers before then."""
    cdef iov_t one
    cdef uint32_t k, i_iov
    cdef uint64_t off
    for k in range(n):
        one.base = cp[k].dst
        one.len = cp[k].need
        one.gpa = cp[k].gpa
        i_iov = 0
        off = 0
        put_header(&one, &i_iov, &off, vq, cp[k].nbufs, cp[k].pkt)
        fill_iovs(&one, &i_iov, &off, cp[k].pkt.data, cp[k].pkt.len)
        log_iovs(vq, &one, 1, cp[k].need)


cdef inline uint32_t enqueue_chains(vq_t *vq, pkt_t **pkts, uint32_t count,
                                    uint32_t *taken) noexcept nogil:
    """Packets into guest RX buffers, split or packed, mergeable or not. Packed: four at a
    time where the buffers form a batch (enqueue_batch), else one at a time. Returns how
    many were delivered; ``*taken``: how many of the first frames are done with (delivered,
    or dropped and counted: too big for a buffer, a hostile buffer, the sender's memory
    faulting, no buffers left), which is more than the delivered ones when a frame in the
    middle was dropped. The frames after ``*taken`` (an IOTLB miss, the ring not ready) are
    untouched: the caller may hold or retry them."""
    cdef cursor_t cur, nxt
    cdef chain_t chains[MAX_BUFS_PER_PKT]
    cdef uint32_t i = 0, b, nb, nbufs, niov, i_iov, nsent = 0
    cdef used_batch_t ub
    cdef uint64_t need, cap, total, off, w
    cdef iov_t iov[MAX_IOV]
    cdef rx_copy_t cp[MAX_BURST]
    cdef uint32_t ncp = 0
    cdef uint64_t nbytes = 0
    cdef pkt_t *pkt
    cdef bint miss = False
    cdef int rc
    ub.n = 0
    ub.nshadow = 0
    ub.head_slot = 0
    taken[0] = 0
    if not vq.ready:
        return 0
    if not vq.enabled:
        vq.st.drop_disabled += count
        taken[0] = count
        return 0
    if vq.iotlb_miss:                     # waiting for the front-end to map a buffer
        return 0                          # (vq_enqueue holds or counts them)
    if vq.broken or ring_begin(vq, &cur) < 0:
        vq.st.drop_no_buffer += count     # a broken ring has no usable buffers
        taken[0] = count
        return 0
    if not vq.packed:
        prefetch_chains(vq, cur.idx, min(count, <uint16_t>(cur.avail_idx - cur.idx)))
    while i < count:
        if vq.packed and count - i >= PACKED_BATCH:
            nb = enqueue_batch(vq, pkts + i, &cur, &ub, &nsent, &nbytes, cp, &ncp)
            if nb:
                i += nb
                continue
        pkt = pkts[i]
        need = vq.hdr_len + pkt.len + pkt.ext_len
        nbufs = niov = 0
        cap = 0
        rc = CHAIN_OK
        nxt = cur
        while cap < need and nbufs < MAX_BUFS_PER_PKT:
            rc = next_chain(vq, &nxt, True, iov, &niov, &chains[nbufs])
            if rc == CHAIN_NONE or rc == CHAIN_MISS or rc == CHAIN_BROKEN:
                break
            nbufs += 1
            if rc == CHAIN_BAD:
                break
            cap += chains[nbufs - 1].total
            if not vq.mrg_rxbuf:
                break
        if rc == CHAIN_MISS:
            miss = True
            break                           # not mapped yet: nothing consumed
        if rc == CHAIN_BROKEN:
            ring_broken(vq)                 # one ring error; the frames left: drop_no_buffer
            break
        if rc == CHAIN_BAD:
            # a hostile buffer: give back what this frame took, untouched, and drop it
            vq.st.drop_bad_desc += 1
            for b in range(nbufs):
                mark_used(vq, &ub, chains[b].id, chains[b].nslots, 0, True)
            cur = nxt
            ring_commit(vq, &cur)
            i += 1
            continue
        if cap < need:
            if nbufs and not vq.mrg_rxbuf:
                vq.st.drop_oversize += 1    # the guest's buffer is too small for it
                i += 1
                continue
            break                           # out of buffers: the rest are not delivered
        if niov == 1 and pkt.ext_len == 0 and ncp < MAX_BURST:
            cp[ncp].dst = iov[0].base       # the common case: copied with the others
            cp[ncp].gpa = iov[0].gpa        # at the burst's end (rx_copies)
            cp[ncp].pkt = pkt
            cp[ncp].need = <uint32_t>need
            cp[ncp].nbufs = nbufs
            ncp += 1
        else:
            i_iov = 0
            off = 0
            put_header(iov, &i_iov, &off, vq, nbufs, pkt)
            fill_iovs(iov, &i_iov, &off, pkt.data, pkt.len)
            if pkt.ext_len and fill_ext(iov, &i_iov, &off, pkt) < 0:
                i += 1                      # the sender's memory faulted: the frame is
                continue                    # lost, the buffers stay the guest's
            log_iovs(vq, iov, niov, need)
        w = need
        for b in range(nbufs):
            total = chains[b].total if chains[b].total < w else w
            mark_used(vq, &ub, chains[b].id, chains[b].nslots, <uint32_t>total, True)
            w -= total
        cur = nxt
        ring_commit(vq, &cur)
        nbytes += pkt.len + pkt.ext_len
        if pkt.ext_len:
            vq.onecopy += 1
        nsent += 1
        i += 1
    if i < count and not miss:
        vq.st.drop_no_buffer += count - i
        i = count
    taken[0] = i
    rx_copies(vq, cp, ncp)
    ring_notify(vq, &ub)
    vq.st.packets += nsent
    vq.st.bytes += nbytes               # (a fault unwinds before: neither counted)
    vq.st.bursts += 1
    return nsent
