# cython: language_level=3
"""Split and packed virtqueues, DRIVER side, compiled: what a guest's virtio-net driver does.
This module holds the entry points other modules cimport (drv_*), the idle wait and the
``DriverQueue`` control object; the ring work lives in header-only helpers compiled into
it, one job each: _drv_core.pxd (the one reclaim / send / refill / receive for both
layouts), _drv_split.pxd and _drv_packed.pxd (the per-layout parts), _drv_books.pxd (the
private books: free ids, in flight, IN_ORDER posting order), _ring_index.pxd (index
arithmetic shared with the device side).

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
IN_ORDER: a completion of buffer X completes everything posted before X, on both layouts
(split TX: the used index counts them; RX buffers it skipped have no length: dropped and
counted). An idle driver sleeps in poll() on the call eventfds. Everything per
packet runs without the GIL.

One DriverQueue belongs to one thread at a time. This module knows nothing of sockets,
messages or memory regions: the frontend hands it host addresses, guest addresses and fds.
"""

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free
from libc.string cimport memcpy, memset

from pyvhost._drv_core cimport (
    interrupts, post, publish, recv_frames, reclaim_used, refill_all, send_frames, tx_slot,
    tx_slots_prefetch,
    ucur_t, used_begin,
)
from pyvhost._drv_packed cimport pk_slots_for
from pyvhost._pktpool cimport PacketPool, pkt_t, pktpool_t, pool_get, pool_put_many
from pyvhost._vring cimport (
    MAX_BURST, RING_EVENT_FLAGS_DISABLE, VRING_AVAIL_F_NO_INTERRUPT, vh_eventfd_drain,
    vring_desc_t, vring_packed_desc_t, vring_used_elem_t,
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


# -- the entry points other modules cimport (_gen, _guest): the ring core's functions ------

cdef int drv_used_count(drvq_t *q, uint16_t *used_idx) noexcept nogil:
    """Used entries waiting, or -1 when the ring is broken (split: the device moved
    used->idx further than the ring holds; it is then marked broken). Split counts them
    (``*used_idx``: the used index read); packed says 1 when the next descriptor is used
    (counting them would walk the ring)."""
    cdef ucur_t uc
    cdef int n = used_begin(q, &uc)
    used_idx[0] = uc.end
    return n


cdef uint32_t drv_reclaim(drvq_t *q) noexcept nogil:
    """TX: take back the descriptors the device has finished with; returns how many."""
    return reclaim_used(q)


cdef int drv_tx_slot(drvq_t *q, uint8_t **frame) noexcept nogil:
    """A free TX buffer (its id) with a zeroed virtio-net header; ``*frame`` is where the
    frame goes (up to buf_len - hdr_len bytes). -1 when all are in flight."""
    return tx_slot(q, frame)


cdef void drv_tx_prefetch(drvq_t *q, uint32_t n) noexcept nogil:
    """Hints only, before a burst of up to ``n`` drv_tx_slot calls: start owning the lines
    of the buffers they will hand out."""
    tx_slots_prefetch(q, n)


cdef void drv_tx_post(drvq_t *q, uint16_t id, uint32_t frame_len) noexcept nogil:
    """Make buffer ``id`` (from drv_tx_slot) available; seen by the device on publish."""
    post(q, id, q.hdr_len + frame_len, False)


cdef void drv_publish(drvq_t *q) noexcept nogil:
    """Make what was posted visible and kick the device unless it suppressed kicks."""
    publish(q)


cdef uint32_t drv_send(drvq_t *q, pkt_t **pkts, uint32_t count) noexcept nogil:
    """TX burst: copy frames into free descriptors and publish. Returns how many were taken
    (in order); the caller keeps ownership of every packet."""
    return send_frames(q, pkts, count)


cdef uint32_t drv_refill(drvq_t *q) noexcept nogil:
    """RX: post every descriptor we own as a device-writable buffer, then publish."""
    return refill_all(q)


cdef uint32_t drv_recv(drvq_t *q, pktpool_t *pool, pkt_t **pkts, uint32_t count) noexcept nogil:
    """RX burst: up to ``count`` frames reassembled into pool packets, buffers re-posted."""
    return recv_frames(q, pool, pkts, count)


cdef void drv_interrupts(drvq_t *q, bint on) noexcept nogil:
    """Ask the device to signal the call fd for the next used entry (on), or not to (off)."""
    interrupts(q, on)


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
        """Used entries waiting (RX frames or TX completions): split, how many; packed, 1
        when there is one (counting would walk the ring); -1 when the ring is broken."""
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
