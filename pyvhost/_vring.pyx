# cython: language_level=3
"""Split virtqueues, device side, compiled: descriptor-chain walking with limits, the burst
copy between guest buffers and packet-pool buffers, the virtio-net header, mergeable RX
buffers, used-ring updates with release ordering, and guest notification.

Everything per packet runs without the GIL. A ring is only touched with its ``lock`` held
(the data path try-locks around a burst; control code locks to change a ring). This module
knows nothing of sockets, messages or the vhost-user state machine: ``VirtQueue`` is told
addresses, fds and features by the backend.
"""

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy, memset

from pyvhost._memory cimport MemTable, gpa_to_host, uva_to_host
from pyvhost._pktpool cimport PacketPool, pkt_t, pktpool_t, pool_get, pool_put, pool_put_many


cdef enum:
    MAX_CHAIN_BYTES = 1 << 24      # a guest buffer chain larger than this is malformed
    MAX_BUFS_PER_PKT = 64


cdef inline bint need_event(uint16_t event, uint16_t new, uint16_t old) noexcept nogil:
    return <uint16_t>(new - event - 1) < <uint16_t>(new - old)


cdef int walk_chain(vq_t *vq, uint16_t head, bint writable, iov_t *iov, uint32_t *niov,
                    uint64_t *total) noexcept nogil:
    """Translate the chain at ``head`` into host segments appended at iov[*niov].

    Returns 0, or -1 for a malformed chain: index out of range, a loop (more descriptors
    than the table holds), nested or misformed indirect table, wrong direction, an address
    in no region, too many segments or too many bytes."""
    cdef const vring_desc_t *table = vq.desc
    cdef uint32_t table_size = vq.size
    cdef uint32_t idx = head
    cdef uint32_t seen = 0
    cdef uint32_t n = niov[0]
    cdef bint in_indirect = False
    cdef vring_desc_t d
    cdef uint64_t addr, left, chunk, tot = 0
    cdef uint8_t *p
    while True:
        if idx >= table_size or seen >= table_size:
            return -1
        seen += 1
        memcpy(&d, &table[idx], sizeof(vring_desc_t))   # read guest memory once
        if d.flags & VRING_DESC_F_INDIRECT:
            if in_indirect or not vq.indirect or d.flags & VRING_DESC_F_NEXT:
                return -1
            if d.len == 0 or d.len % sizeof(vring_desc_t) or d.len > 32768 * sizeof(vring_desc_t):
                return -1
            chunk = d.len
            p = gpa_to_host(vq.mem, d.addr, &chunk)
            if p == NULL or chunk < d.len:
                return -1
            table = <const vring_desc_t *>p
            table_size = d.len // sizeof(vring_desc_t)
            idx = 0
            seen = 0
            in_indirect = True
            continue
        if (d.flags & VRING_DESC_F_WRITE != 0) != writable:
            return -1
        tot += d.len
        if tot > MAX_CHAIN_BYTES:
            return -1
        addr = d.addr
        left = d.len
        while left:
            if n >= MAX_IOV:
                return -1
            chunk = left
            p = gpa_to_host(vq.mem, addr, &chunk)
            if p == NULL:
                return -1
            iov[n].base = p
            iov[n].len = chunk
            n += 1
            addr += chunk
            left -= chunk
        if not d.flags & VRING_DESC_F_NEXT:
            break
        idx = d.next
    niov[0] = n
    total[0] = tot
    return 0


cdef inline void put_used(vq_t *vq, uint32_t head, uint32_t length) noexcept nogil:
    cdef vring_used_elem_t *e = &vq.used_ring[vq.last_used_idx & (vq.size - 1)]
    e.id = head
    e.len = length
    vq.last_used_idx += 1


cdef void notify_guest(vq_t *vq) noexcept nogil:
    """Publish the used index and signal the call fd unless the guest suppressed it."""
    cdef uint16_t old, ev
    cdef bint fire
    vh_store_release_u16(&vq.used[1], vq.last_used_idx)
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
        vh_eventfd_signal(vq.callfd)
        vq.st.calls += 1


cdef inline int avail_count(vq_t *vq, uint16_t *avail_idx) noexcept nogil:
    """Entries the guest has made available, or -1 (ring broken) if more than the ring holds."""
    cdef uint16_t idx = vh_load_acquire_u16(&vq.avail[1])
    cdef uint16_t count = idx - vq.last_avail_idx
    if count > vq.size:
        vq.broken = 1
        vq.st.ring_errors += 1
        return -1
    avail_idx[0] = idx
    return count


cdef uint32_t vq_dequeue(vq_t *vq, pktpool_t *pool, pkt_t **pkts, uint32_t count) noexcept nogil:
    """Guest TX -> packets: up to ``count`` frames copied out of the guest's buffers."""
    cdef uint16_t avail_idx, head
    cdef int avail
    cdef uint32_t i, j, nout = 0, niov, hdr, take
    cdef uint64_t total, skip
    cdef iov_t iov[MAX_IOV]
    cdef pkt_t *pkt
    cdef uint8_t *dst
    if not vq.ready or vq.broken:
        return 0
    avail = avail_count(vq, &avail_idx)
    if avail <= 0:
        return 0
    if <uint32_t>avail < count:
        count = avail
    hdr = vq.hdr_len
    for i in range(count):
        head = vh_load_relaxed_u16(&vq.avail[2 + ((vq.last_avail_idx) & (vq.size - 1))])
        if head >= vq.size:
            vq.broken = 1
            vq.st.ring_errors += 1
            break
        niov = 0
        if walk_chain(vq, head, False, iov, &niov, &total) < 0 or total < hdr:
            vq.st.drop_bad_desc += 1
        elif not vq.enabled:
            vq.st.drop_disabled += 1
        elif total - hdr > pool.buf_size:
            vq.st.drop_oversize += 1
        else:
            pkt = pool_get(pool)
            if pkt == NULL:
                vq.st.drop_no_mbuf += 1
                break                       # leave it in the ring for the next burst
            # the virtio-net header first, then the frame
            skip = 0
            dst = pkt.data
            for j in range(niov):
                take = iov[j].len
                if skip < hdr:
                    if take > hdr - skip:
                        take = hdr - skip
                    memcpy(&pkt.vnet_hdr[skip], iov[j].base, take)
                    skip += take
                    if take < iov[j].len:
                        memcpy(dst, iov[j].base + take, iov[j].len - take)
                        dst += iov[j].len - take
                else:
                    memcpy(dst, iov[j].base, take)
                    dst += take
            pkt.len = <uint32_t>(total - hdr)
            pkts[nout] = pkt
            nout += 1
            vq.st.bytes += pkt.len
        put_used(vq, head, 0)
        vq.last_avail_idx += 1
    if vq.last_used_idx != vh_load_relaxed_u16(&vq.used[1]):
        notify_guest(vq)
    vq.st.packets += nout
    vq.st.bursts += 1
    return nout


cdef inline void fill_iovs(iov_t *iov, uint32_t *i_iov, uint64_t *off, const uint8_t *src,
                           uint64_t length) noexcept nogil:
    cdef uint64_t take
    while length:
        take = iov[i_iov[0]].len - off[0]
        if take > length:
            take = length
        memcpy(iov[i_iov[0]].base + off[0], src, take)
        src += take
        length -= take
        off[0] += take
        if off[0] == iov[i_iov[0]].len:
            i_iov[0] += 1
            off[0] = 0


cdef uint32_t vq_enqueue(vq_t *vq, pkt_t **pkts, uint32_t count) noexcept nogil:
    """Packets -> guest RX: returns how many of ``pkts`` were delivered (in order).

    The caller keeps ownership of every packet. Frames not delivered for lack of guest
    buffers are counted in drop_no_buffer."""
    cdef uint16_t avail_idx, head, used_before
    cdef int avail
    cdef uint32_t i, b, nbufs, niov, i_iov, nsent = 0
    cdef uint64_t need, cap, total, off, w
    cdef iov_t iov[MAX_IOV]
    cdef uint16_t heads[MAX_BUFS_PER_PKT]
    cdef uint64_t caps[MAX_BUFS_PER_PKT]
    cdef uint8_t hdr[12]
    cdef pkt_t *pkt
    cdef bint bad
    if not vq.ready:
        return 0
    if not vq.enabled:
        vq.st.drop_disabled += count
        return 0
    if vq.broken or avail_count(vq, &avail_idx) < 0:
        vq.st.drop_no_buffer += count     # a broken ring has no usable buffers
        return 0
    used_before = vq.last_used_idx
    i = 0
    while i < count:
        pkt = pkts[i]
        need = vq.hdr_len + pkt.len
        nbufs = 0
        niov = 0
        cap = 0
        bad = False
        while cap < need:
            if <uint16_t>(avail_idx - vq.last_avail_idx) == nbufs or nbufs == MAX_BUFS_PER_PKT:
                break
            head = vh_load_relaxed_u16(&vq.avail[2 + ((vq.last_avail_idx + nbufs) & (vq.size - 1))])
            if head >= vq.size:
                vq.broken = 1
                vq.st.ring_errors += 1
                bad = True
                break
            if walk_chain(vq, head, True, iov, &niov, &total) < 0:
                bad = True
                heads[nbufs] = head
                nbufs += 1
                break
            heads[nbufs] = head
            caps[nbufs] = total
            nbufs += 1
            cap += total
            if not vq.mrg_rxbuf:
                break
        if bad:
            # a hostile chain: give the buffers back untouched, drop this frame
            vq.st.drop_bad_desc += 1
            if vq.broken:
                i += 1                      # counted once; the rest: drop_no_buffer
                break
            for b in range(nbufs):
                put_used(vq, heads[b], 0)
            vq.last_avail_idx += nbufs
            i += 1
            continue
        if cap < need:
            if nbufs and not vq.mrg_rxbuf:
                vq.st.drop_oversize += 1    # the guest's buffer is too small for it
                i += 1
                continue
            break                           # out of buffers: the rest are not delivered
        memset(hdr, 0, sizeof(hdr))
        if vq.hdr_len == 12:
            hdr[10] = <uint8_t>(nbufs & 0xff)
            hdr[11] = <uint8_t>(nbufs >> 8)
        i_iov = 0
        off = 0
        fill_iovs(iov, &i_iov, &off, hdr, vq.hdr_len)
        fill_iovs(iov, &i_iov, &off, pkt.data, pkt.len)
        w = need
        for b in range(nbufs):
            total = caps[b] if caps[b] < w else w
            put_used(vq, heads[b], <uint32_t>total)
            w -= total
        vq.last_avail_idx += nbufs
        vq.st.bytes += pkt.len
        nsent += 1
        i += 1
    if i < count:
        vq.st.drop_no_buffer += count - i
    if vq.last_used_idx != used_before:
        notify_guest(vq)
    vq.st.packets += nsent
    vq.st.bursts += 1
    return nsent


cdef void vq_set_notify(vq_t *vq, bint on) noexcept nogil:
    """Ask the guest to kick (on) or not to bother (off) when it adds buffers."""
    if not vq.ready:
        return
    if vq.event_idx:
        if on:
            vh_store_relaxed_u16(&vq.used[2 + 4 * vq.size], vq.last_avail_idx)
    else:
        vh_store_relaxed_u16(&vq.used[0], 0 if on else VRING_USED_F_NO_NOTIFY)
    vh_fence_seq_cst()


cdef bint vq_pending(vq_t *vq) noexcept nogil:
    """True when the guest has made buffers available that we have not consumed."""
    if not vq.ready or vq.broken:
        return False
    return vh_load_acquire_u16(&vq.avail[1]) != vq.last_avail_idx


STAT_NAMES = ("packets", "bytes", "bursts", "calls", "drop_bad_desc", "drop_no_buffer",
              "drop_oversize", "drop_disabled", "drop_no_mbuf", "ring_errors")


cdef class VirtQueue:
    """One split virtqueue, device side. Control methods require ``lock()`` to be held."""

    def __cinit__(self, int index):
        memset(&self.vq, 0, sizeof(vq_t))
        self.index = index
        self.vq.kickfd = -1
        self.vq.callfd = -1

    # -- locking (control side) -------------------------------------------------------
    def lock(self):
        with nogil:
            vh_lock(&self.vq.lock)

    def unlock(self):
        vh_unlock(&self.vq.lock)

    def __enter__(self):
        self.lock()
        return self

    def __exit__(self, *exc):
        self.unlock()

    # -- configuration (lock held) ----------------------------------------------------
    def set_memory(self, MemTable mem):
        """A new memory table: the ring addresses are translated again by ``start``."""
        self.mem = mem
        self.vq.mem = mem.table if mem is not None else NULL
        self.vq.ready = 0

    def set_size(self, uint32_t size):
        if size == 0 or size > 32768 or size & (size - 1):
            raise ValueError(f"ring size {size} is not a power of 2 in 1..32768")
        self.vq.size = size
        self.vq.ready = 0

    def set_addresses(self, uint64_t desc, uint64_t used, uint64_t avail):
        self.desc_uva = desc
        self.used_uva = used
        self.avail_uva = avail
        self.vq.ready = 0

    def set_features(self, *, bint event_idx, bint indirect, bint mrg_rxbuf, int hdr_len):
        if hdr_len not in (10, 12):
            raise ValueError("virtio-net header is 10 or 12 bytes")
        self.vq.event_idx = event_idx
        self.vq.indirect = indirect
        self.vq.mrg_rxbuf = mrg_rxbuf
        self.vq.hdr_len = hdr_len

    property base:
        """The next avail index to process (SET/GET_VRING_BASE)."""
        def __get__(self):
            return self.vq.last_avail_idx

        def __set__(self, uint16_t value):
            self.vq.last_avail_idx = value
            self.vq.last_used_idx = value
            self.vq.signalled_used_valid = 0

    property enabled:
        def __get__(self):
            return bool(self.vq.enabled)

        def __set__(self, bint value):
            self.vq.enabled = value

    property kickfd:
        def __get__(self):
            return self.vq.kickfd

        def __set__(self, int fd):
            self.vq.kickfd = fd

    property callfd:
        def __get__(self):
            return self.vq.callfd

        def __set__(self, int fd):
            self.vq.callfd = fd

    @property
    def size(self):
        return self.vq.size

    @property
    def ready(self):
        return bool(self.vq.ready)

    @property
    def broken(self):
        return bool(self.vq.broken)

    def start(self):
        """Translate the ring addresses and let the data path in; ValueError says why not.

        Returns a warning string when the used index in guest memory disagreed with the
        base we were given (after a reconnect) and was taken instead, else None."""
        cdef uint64_t n = self.vq.size
        cdef uint8_t *desc
        cdef uint8_t *avail
        cdef uint8_t *used
        cdef uint16_t used_idx
        self.vq.ready = 0
        if self.mem is None:
            raise ValueError("no memory table")
        if n == 0:
            raise ValueError("ring size not set")
        desc = uva_to_host(self.vq.mem, self.desc_uva, 16 * n)
        avail = uva_to_host(self.vq.mem, self.avail_uva, 6 + 2 * n)
        used = uva_to_host(self.vq.mem, self.used_uva, 6 + 8 * n)
        if desc == NULL or avail == NULL or used == NULL:
            raise ValueError(f"ring addresses desc={self.desc_uva:#x} avail={self.avail_uva:#x} "
                             f"used={self.used_uva:#x} are not inside guest memory")
        if (<uint64_t>desc) % 16 or (<uint64_t>avail) % 2 or (<uint64_t>used) % 4:
            raise ValueError("ring addresses are misaligned")
        self.vq.desc = <vring_desc_t *>desc
        self.vq.avail = <uint16_t *>avail
        self.vq.used = <uint16_t *>used
        self.vq.used_ring = <vring_used_elem_t *>(used + 4)
        self.vq.broken = 0
        self.vq.signalled_used_valid = 0
        warning = None
        used_idx = vh_load_acquire_u16(&self.vq.used[1])
        if used_idx != self.vq.last_used_idx:
            warning = (f"used idx {used_idx} in guest memory differs from base "
                       f"{self.vq.last_used_idx}; resuming from the used idx")
            self.vq.last_used_idx = used_idx
            self.vq.last_avail_idx = used_idx
        vh_store_release_int(&self.vq.ready, 1)
        return warning

    def stop(self):
        """Keep the data path out (GET_VRING_BASE, reset, disconnect)."""
        self.vq.ready = 0

    def stats(self):
        cdef uint64_t *s = <uint64_t *>&self.vq.st
        return {name: s[i] for i, name in enumerate(STAT_NAMES)}

    def reset_stats(self):
        memset(&self.vq.st, 0, sizeof(vq_stats_t))

    # -- data path for Python callers (the Python device API and tests) ---------------
    def set_notify(self, bint on):
        with nogil:
            vh_lock(&self.vq.lock)
            vq_set_notify(&self.vq, on)
            vh_unlock(&self.vq.lock)

    def pending(self):
        cdef bint r
        with nogil:
            vh_lock(&self.vq.lock)
            r = vq_pending(&self.vq)
            vh_unlock(&self.vq.lock)
        return r

    def drain_kick(self):
        with nogil:
            vh_lock(&self.vq.lock)
            vh_eventfd_drain(self.vq.kickfd)
            vh_unlock(&self.vq.lock)

    def recv_burst(self, PacketPool pool, uint32_t max_packets=MAX_BURST):
        """Dequeue up to ``max_packets`` frames the guest sent; a list of bytes."""
        cdef pkt_t *pkts[MAX_BURST]
        cdef uint32_t n, i
        if max_packets > MAX_BURST:
            max_packets = MAX_BURST
        with nogil:
            vh_lock(&self.vq.lock)
            n = vq_dequeue(&self.vq, pool.pool, pkts, max_packets)
            vh_unlock(&self.vq.lock)
        out = [(<char *>pkts[i].data)[:pkts[i].len] for i in range(n)]
        pool_put_many(pool.pool, pkts, n)
        return out

    def send_burst(self, PacketPool pool, frames):
        """Enqueue frames (bytes-like) to the guest; returns how many were delivered."""
        cdef pkt_t *pkts[MAX_BURST]
        cdef uint32_t n = 0, sent, total = 0, oversize, no_mbuf
        cdef const uint8_t[::1] view
        frames = list(frames)
        while frames:
            n = 0
            oversize = 0
            no_mbuf = 0
            try:
                for frame in frames[:MAX_BURST]:
                    if frame is None:
                        raise TypeError("a frame must be bytes-like, not None")
                    view = frame
                    if view.shape[0] > pool.pool.buf_size:
                        oversize += 1
                        continue
                    pkts[n] = pool_get(pool.pool)
                    if pkts[n] == NULL:
                        no_mbuf += 1
                        continue
                    if view.shape[0]:
                        memcpy(pkts[n].data, &view[0], view.shape[0])
                    pkts[n].len = view.shape[0]
                    n += 1
            except BaseException:
                pool_put_many(pool.pool, pkts, n)   # not bytes-like: give the buffers back
                raise
            del frames[:MAX_BURST]
            # every batch goes to the ring, which counts what it cannot deliver
            with nogil:
                vh_lock(&self.vq.lock)
                self.vq.st.drop_oversize += oversize
                self.vq.st.drop_no_mbuf += no_mbuf
                sent = vq_enqueue(&self.vq, pkts, n)
                vh_unlock(&self.vq.lock)
            pool_put_many(pool.pool, pkts, n)
            total += sent
        return total
