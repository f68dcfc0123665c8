# cython: language_level=3
"""Split virtqueues, DRIVER side, compiled: what a guest's virtio-net driver does.

Descriptor ``i`` always owns the fixed buffer ``slots + i * slot_size`` in guest memory, so a
used id names its buffer and every id and length the device writes can be checked against
private bookkeeping (``inflight``, ``free_ids``) kept outside shared memory: the device is
untrusted, a bad used entry is dropped and counted, never followed. TX: one descriptor per
frame (virtio-net header + frame). RX: descriptors of ``buf_len`` bytes, frames reassembled
from ``num_buffers`` of them with mergeable RX buffers. Publishing uses release stores, kicks
honour used->flags NO_NOTIFY or avail_event (EVENT_IDX), and an idle driver sleeps in poll()
on the call eventfds. Everything per packet runs without the GIL.

One DriverQueue belongs to one thread at a time. This module knows nothing of sockets,
messages or memory regions: the frontend hands it host addresses, guest addresses and fds.
"""

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free
from libc.string cimport memcpy, memset

from pyvhost._pktpool cimport PacketPool, pkt_t, pktpool_t, pool_get, pool_put, pool_put_many
from pyvhost._vring cimport (
    MAX_BURST, VRING_AVAIL_F_NO_INTERRUPT, VRING_DESC_F_WRITE, VRING_USED_F_NO_NOTIFY,
    vh_eventfd_drain, vh_eventfd_signal, vh_fence_seq_cst, vh_load_acquire_u16,
    vh_load_relaxed_u16, vh_store_release_u16, vh_store_relaxed_u16,
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
    if drv_used_count(q, &used_idx) <= 0:
        return 0
    while q.last_used_idx != used_idx:
        if take_used(q, &e):
            give_back(q, e.id)
            n += 1
    return n


cdef int drv_tx_slot(drvq_t *q, uint8_t **frame) noexcept nogil:
    """A free TX descriptor (its id) with a zeroed virtio-net header; ``*frame`` is where the
    frame goes (up to buf_len - hdr_len bytes). -1 when all are in flight."""
    cdef uint16_t id
    cdef uint8_t *slot
    if q.nfree == 0 or q.broken:
        return -1
    q.nfree -= 1
    id = q.free_ids[q.nfree]
    slot = q.slots + <uint64_t>id * q.slot_size
    memset(slot, 0, q.hdr_len)
    frame[0] = slot + q.hdr_len
    return id


cdef void drv_tx_post(drvq_t *q, uint16_t id, uint32_t frame_len) noexcept nogil:
    """Make descriptor ``id`` (from drv_tx_slot) available; seen by the device on publish."""
    cdef vring_desc_t *d = &q.desc[id]
    d.addr = q.slots_gpa + <uint64_t>id * q.slot_size
    d.len = q.hdr_len + frame_len
    d.flags = 0
    d.next = 0
    q.inflight[id] = 1
    vh_store_relaxed_u16(&q.avail[2 + (q.avail_idx & (q.size - 1))], id)
    q.avail_idx += 1


cdef void drv_publish(drvq_t *q) noexcept nogil:
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
        memcpy(pkt.data, slot + q.hdr_len, length)
        total = length
        give_back(q, e.id)
        bad = False
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


STAT_NAMES = ("packets", "bytes", "bursts", "kicks", "kicks_suppressed", "waits", "ring_full",
              "drop_bad_used", "drop_oversize", "drop_no_mbuf", "ring_errors")


cdef class DriverQueue:
    """One split virtqueue, driver side, over ring memory the caller laid out.

    Addresses are host pointers (ints) into ``memory`` (any object that keeps the mapping
    alive); ``slots_gpa`` is the guest physical address of ``slots``. ``rx`` selects the
    direction: device-writable buffers of ``buf_len`` bytes, or TX slots of ``buf_len``."""

    def __cinit__(self, int index, bint rx, uint32_t size, uint64_t desc, uint64_t avail,
                  uint64_t used, uint64_t slots, uint64_t slots_gpa, uint32_t slot_size,
                  uint32_t buf_len, object memory):
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
        if self.q.free_ids == NULL or self.q.inflight == NULL:
            raise MemoryError()
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

    def __dealloc__(self):
        free(self.q.free_ids)
        free(self.q.inflight)

    def configure(self, *, bint event_idx, bint mrg_rxbuf, int hdr_len, int kickfd,
                  int callfd):
        """Negotiated features and the eventfds (ours: we write kick, we read call)."""
        if hdr_len not in (10, 12):
            raise ValueError("virtio-net header is 10 or 12 bytes")
        if mrg_rxbuf and hdr_len != 12:
            raise ValueError("mergeable RX buffers need the 12-byte header")
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
        memset(self.q.avail, 0, 6 + 2 * self.q.size)
        memset(self.q.used, 0, 6 + 8 * self.q.size)
        memset(self.q.inflight, 0, self.q.size)
        self.q.nfree = 0
        for i in range(self.q.size):
            self.q.free_ids[self.q.size - 1 - i] = <uint16_t>i
        self.q.nfree = self.q.size
        self.q.avail_idx = 0
        self.q.last_used_idx = 0
        self.q.kicked_idx = 0
        self.q.broken = 0
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
    def free(self):
        """Descriptors we own (TX: room for that many frames after a reclaim)."""
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
        cdef uint64_t *s = <uint64_t *>&self.q.st
        return {name: s[i] for i, name in enumerate(STAT_NAMES)}

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
