# cython: language_level=3
"""The traffic generator's per-packet work, compiled: build UDP test frames straight into
TX descriptors, parse received frames, and keep the counters and the latency histogram.

A test frame is Ethernet/IPv4/UDP; its payload starts with MAGIC (u32), the run id (u16),
the queue (u16), a per-queue sequence number (u64) and the low 32 bits of the CLOCK_MONOTONIC
send time in ns (u32): 62 bytes with headers. ``--flows`` varies the UDP source port.
``Gen.run`` loops over the queues without the GIL for a bounded time, pacing by rate and by
a window of frames in flight (so an echoing peer's RX ring never overflows), and sleeps on
the call eventfds when there is nothing to do. The CLI (pyvhost.cli.gen) owns everything
else: options, sockets, progress and the summary. No sockets or messages here.
"""

from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free
from libc.string cimport memcpy, memset
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, nanosleep, timespec

from pyvhost._driver cimport (
    DriverQueue, drv_publish, drv_reclaim, drv_recv, drv_tx_post, drv_tx_prefetch, drv_tx_slot,
    drv_wait, drvq_t,
)
from pyvhost._pktpool cimport PacketPool, pkt_t, pool_put_many
from pyvhost._vring cimport MAX_BURST

cdef enum:
    MAX_QUEUES = 128
    PAYLOAD_OFF = 42
    MIN_FRAME = 62
    HIST_US = 100000         # 1 us buckets up to 100 ms, then one overflow bucket
    STALL_NS = 200000000     # window full and nothing back for 200 ms: count those lost
    SRC_PORT_BASE = 1024
    VARY_SPORT = 0          # flows differ in the UDP source port
    VARY_SRC_MAC = 1        # ... in the source MAC (02:00:00 + 24 bits)
    VARY_DST_IP = 2         # ... in the destination address (its low 24 bits + the flow)
    MAX_FLOWS_24 = 1 << 24
    R_DEADLINE = 0
    R_DONE = 1
    R_CONTROL = 2
    R_BROKEN = 3

cdef uint32_t MAGIC = 0x50564731

MAX_FLOWS = 65535 - SRC_PORT_BASE
VARY = {"sport": VARY_SPORT, "src-mac": VARY_SRC_MAC, "dst-ip": VARY_DST_IP}
MAX_FLOWS_BY_VARY = {"sport": MAX_FLOWS, "src-mac": MAX_FLOWS_24, "dst-ip": MAX_FLOWS_24}
MIN_SIZE = MIN_FRAME
STOP_DEADLINE = R_DEADLINE
STOP_DONE = R_DONE
STOP_CONTROL = R_CONTROL
STOP_BROKEN = R_BROKEN


cdef inline uint64_t now_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <uint64_t>ts.tv_sec * 1000000000 + ts.tv_nsec


cdef inline void put_be16(uint8_t *p, uint16_t v) noexcept nogil:
    p[0] = v >> 8
    p[1] = v & 0xff


cdef inline uint16_t get_be16(const uint8_t *p) noexcept nogil:
    return (<uint16_t>p[0] << 8) | p[1]


cdef uint16_t ip_checksum(const uint8_t *p, int n) noexcept nogil:
    cdef uint32_t s = 0
    cdef int i
    for i in range(0, n, 2):
        s += get_be16(p + i)
    while s >> 16:
        s = (s & 0xffff) + (s >> 16)
    return <uint16_t>(~s & 0xffff)


cdef class Gen:
    """Counters and per-packet code of one generator run over ``txqs``/``rxqs``."""

    cdef drvq_t *tx[MAX_QUEUES]
    cdef drvq_t *rx[MAX_QUEUES]
    cdef int ntx, nrx
    cdef list keep
    cdef PacketPool pool
    cdef uint8_t *template
    cdef uint32_t size
    cdef uint32_t flows
    cdef uint32_t next_flow
    cdef int vary
    cdef uint16_t run_id
    cdef bint any_run
    cdef uint64_t seq[MAX_QUEUES]
    cdef uint64_t max_seq[MAX_QUEUES]
    cdef uint8_t seen_queue[MAX_QUEUES]
    cdef uint64_t *hist
    cdef uint64_t t0
    cdef uint64_t last_rx_ns         # for the window's stall detection
    cdef uint64_t last_tx_ns, last_got_ns
    cdef readonly uint64_t sent, received, reordered, rx_other, rx_bytes, written_off
    cdef readonly uint64_t lat_max_ns, lat_sum_ns, window_stalls
    cdef public uint64_t tx_target      # frames to send in all (0: unlimited)
    cdef public uint64_t rx_target      # stop once this many test frames came back (0: no)
    cdef public double rate             # frames per second in all (0: as fast as possible)
    cdef public uint64_t window         # frames in flight at most (0: no window)

    def __cinit__(self, txqs, rxqs, PacketPool pool, bytes src_mac, bytes dst_mac,
                  bytes src_ip, bytes dst_ip, uint32_t size, uint32_t flows, uint16_t run_id,
                  bint any_run=False, int vary=VARY_SPORT):
        cdef DriverQueue dq
        cdef uint8_t *p
        if len(txqs) > MAX_QUEUES or len(rxqs) > MAX_QUEUES:
            raise ValueError(f"at most {MAX_QUEUES} queues")
        if size < MIN_FRAME:
            raise ValueError(f"frames are at least {MIN_FRAME} bytes")
        if vary not in (VARY_SPORT, VARY_SRC_MAC, VARY_DST_IP):
            raise ValueError(f"no such variation {vary}")
        if not 1 <= flows <= (MAX_FLOWS_24 if vary != VARY_SPORT else 65535 - SRC_PORT_BASE):
            raise ValueError("too many flows for this variation")
        if len(src_mac) != 6 or len(dst_mac) != 6 or len(src_ip) != 4 or len(dst_ip) != 4:
            raise ValueError("MACs are 6 bytes, IPv4 addresses 4")
        for dq in txqs:
            if size > dq.max_frame:
                raise ValueError(f"{size}-byte frames do not fit TX buffers ({dq.max_frame})")
        self.ntx = 0
        for dq in txqs:
            self.tx[self.ntx] = &dq.q
            self.ntx += 1
        self.nrx = 0
        for dq in rxqs:
            self.rx[self.nrx] = &dq.q
            self.nrx += 1
        self.keep = [list(txqs), list(rxqs)]
        self.pool = pool
        self.size = size
        self.flows = flows
        self.vary = vary
        self.run_id = run_id
        self.any_run = any_run
        self.hist = <uint64_t *>calloc(HIST_US + 1, sizeof(uint64_t))
        self.template = <uint8_t *>calloc(size, 1)
        if self.hist == NULL or self.template == NULL:
            raise MemoryError()
        p = self.template
        memcpy(p, <const char *>dst_mac, 6)
        memcpy(p + 6, <const char *>src_mac, 6)
        put_be16(p + 12, 0x0800)
        p += 14
        p[0] = 0x45
        put_be16(p + 2, size - 14)
        p[8] = 64
        p[9] = 17
        memcpy(p + 12, <const char *>src_ip, 4)
        memcpy(p + 16, <const char *>dst_ip, 4)
        put_be16(p + 10, ip_checksum(p, 20))
        p += 20
        put_be16(p + 2, 5001)
        put_be16(p + 4, size - 34)     # UDP length; checksum 0 (none) is valid for IPv4
        self.reset()

    def __dealloc__(self):
        free(self.hist)
        free(self.template)

    def reset(self):
        """Zero the counters and restart the clock (a new measurement)."""
        memset(self.seq, 0, sizeof(self.seq))
        memset(self.max_seq, 0, sizeof(self.max_seq))
        memset(self.seen_queue, 0, sizeof(self.seen_queue))
        memset(self.hist, 0, (HIST_US + 1) * sizeof(uint64_t))
        self.sent = self.received = self.reordered = self.rx_other = self.rx_bytes = 0
        self.written_off = self.lat_max_ns = self.lat_sum_ns = self.window_stalls = 0
        self.next_flow = 0
        self.t0 = now_ns()
        self.last_rx_ns = self.last_tx_ns = self.last_got_ns = self.t0

    cdef inline void build(self, uint8_t *frame, int q, uint64_t t) noexcept nogil:
        cdef uint8_t *pl = frame + PAYLOAD_OFF
        cdef uint32_t ts32 = <uint32_t>t
        cdef uint16_t qq = <uint16_t>q
        cdef uint32_t v
        memcpy(frame, self.template, self.size)
        if self.vary == VARY_SPORT:
            put_be16(frame + 34, <uint16_t>(SRC_PORT_BASE + self.next_flow))
        elif self.vary == VARY_SRC_MAC:
            frame[9] = (self.next_flow >> 16) & 0xFF
            frame[10] = (self.next_flow >> 8) & 0xFF
            frame[11] = self.next_flow & 0xFF
        else:
            v = ((<uint32_t>frame[31] << 16) | (<uint32_t>frame[32] << 8) | frame[33]) + \
                self.next_flow
            frame[31] = (v >> 16) & 0xFF
            frame[32] = (v >> 8) & 0xFF
            frame[33] = v & 0xFF
            put_be16(frame + 24, 0)
            put_be16(frame + 24, ip_checksum(frame + 14, 20))
        self.next_flow += 1
        if self.next_flow == self.flows:
            self.next_flow = 0
        (<uint32_t *>pl)[0] = MAGIC
        memcpy(pl + 4, &self.run_id, 2)
        memcpy(pl + 6, &qq, 2)
        memcpy(pl + 8, &self.seq[q], 8)
        memcpy(pl + 16, &ts32, 4)
        self.seq[q] += 1

    cdef inline void parse(self, pkt_t *pkt, uint32_t now32) noexcept nogil:
        cdef const uint8_t *f = pkt.data
        cdef const uint8_t *pl = f + PAYLOAD_OFF
        cdef uint32_t magic, ts32, lat
        cdef uint16_t run, q
        cdef uint64_t seq, us
        self.rx_bytes += pkt.len
        if pkt.len < MIN_FRAME or get_be16(f + 12) != 0x0800 or f[23] != 17:
            self.rx_other += 1
            return
        memcpy(&magic, pl, 4)
        memcpy(&run, pl + 4, 2)
        memcpy(&q, pl + 6, 2)
        memcpy(&seq, pl + 8, 8)
        memcpy(&ts32, pl + 16, 4)
        if magic != MAGIC or q >= MAX_QUEUES or (run != self.run_id and not self.any_run):
            self.rx_other += 1
            return
        self.received += 1
        if self.seen_queue[q] and seq < self.max_seq[q]:
            self.reordered += 1
        else:
            self.max_seq[q] = seq
            self.seen_queue[q] = 1
        lat = now32 - ts32
        self.lat_sum_ns += lat
        if lat > self.lat_max_ns:
            self.lat_max_ns = lat
        us = lat // 1000
        self.hist[us if us < HIST_US else HIST_US] += 1

    cdef uint32_t tx_budget(self, uint64_t t) noexcept nogil:
        """Frames we may send now: the rate, the window and the target allow."""
        cdef uint64_t allowed = MAX_BURST, outstanding
        cdef int64_t r
        if self.tx_target and self.sent >= self.tx_target:
            return 0
        if self.tx_target and self.tx_target - self.sent < allowed:
            allowed = self.tx_target - self.sent
        if self.rate > 0:
            r = <int64_t>(self.rate * <double>(t - self.t0) / 1e9) - <int64_t>self.sent
            if r <= 0:
                return 0
            if <uint64_t>r < allowed:
                allowed = r
        if self.window:
            outstanding = self.sent - self.received - self.written_off
            if outstanding >= self.window:
                if t - self.last_rx_ns > STALL_NS:
                    self.written_off += outstanding   # the peer lost them
                    self.window_stalls += 1
                    self.last_rx_ns = t
                return 0
            if self.window - outstanding < allowed:
                allowed = self.window - outstanding
        return <uint32_t>allowed

    cdef uint32_t tx_queue(self, int q, uint32_t budget, uint64_t t) noexcept nogil:
        cdef drvq_t *dq = self.tx[q]
        cdef uint32_t n = 0
        cdef int id
        cdef uint8_t *frame
        drv_reclaim(dq)
        drv_tx_prefetch(dq, budget)         # the burst's buffers: their lines asked for at once
        while n < budget:
            id = drv_tx_slot(dq, &frame)
            if id < 0:
                dq.st.ring_full += 1
                break
            self.build(frame, q, t)
            drv_tx_post(dq, <uint16_t>id, self.size)
            n += 1
        drv_publish(dq)
        dq.st.packets += n
        dq.st.bytes += <uint64_t>n * self.size
        dq.st.bursts += 1
        self.sent += n
        if n:
            self.last_tx_ns = t
        return n

    cdef uint32_t rx_queue(self, int q, pkt_t **pkts) noexcept nogil:
        cdef uint32_t n, i, now32
        n = drv_recv(self.rx[q], self.pool.pool, pkts, MAX_BURST)
        if n:
            now32 = <uint32_t>now_ns()
            for i in range(n):
                self.parse(pkts[i], now32)
            pool_put_many(self.pool.pool, pkts, n)
        return n

    cdef bint any_broken(self) noexcept nogil:
        cdef int i
        for i in range(self.ntx):
            if self.tx[i].broken:
                return True
        for i in range(self.nrx):
            if self.rx[i].broken:
                return True
        return False

    def run(self, double seconds, int control_fd=-1):
        """Send and receive for up to ``seconds``. Returns STOP_DONE when the targets are
        met, STOP_CONTROL when ``control_fd`` became readable (the backend went away or
        wrote to us), STOP_BROKEN when the backend broke a ring, else STOP_DEADLINE."""
        cdef pkt_t *pkts[MAX_BURST]
        cdef uint64_t t = now_ns()
        cdef uint64_t until = t + <uint64_t>(seconds * 1e9)
        cdef uint32_t budget, sent, got
        cdef int q, w, result = R_DEADLINE
        cdef timespec nap
        with nogil:
            while t < until:
                sent = got = 0
                for q in range(self.ntx):
                    budget = self.tx_budget(t)
                    if budget:
                        sent += self.tx_queue(q, budget, t)
                for q in range(self.nrx):
                    got += self.rx_queue(q, pkts)
                t = now_ns()
                if got:
                    self.last_rx_ns = self.last_got_ns = t
                if sent or got:
                    continue
                if self.any_broken():
                    result = R_BROKEN
                    break
                if self.rx_target and self.received >= self.rx_target:
                    result = R_DONE
                    break
                if (self.ntx and not self.rx_target and self.tx_target
                        and self.sent >= self.tx_target):
                    result = R_DONE
                    break
                if self.nrx:
                    w = drv_wait(self.rx, self.nrx, control_fd, 1)
                    if w == 2:
                        result = R_CONTROL
                        break
                elif self.rate > 0:
                    nap.tv_sec = 0
                    nap.tv_nsec = 50000
                    nanosleep(&nap, NULL)
                t = now_ns()
        return result

    def latency_us(self):
        """{p50, p99, max, mean} in microseconds over the test frames received."""
        cdef uint64_t n = 0, acc = 0, i
        cdef uint64_t p50 = 0, p99 = 0
        cdef bint got50 = False
        for i in range(HIST_US + 1):
            n += self.hist[i]
        if n == 0:
            return {"p50": None, "p99": None, "max": None, "mean": None}
        for i in range(HIST_US + 1):
            acc += self.hist[i]
            if not got50 and acc * 2 >= n:
                p50 = i
                got50 = True
            if acc * 100 >= n * 99:
                p99 = i
                break
        return {"p50": p50, "p99": p99, "max": self.lat_max_ns // 1000,
                "mean": round(self.lat_sum_ns / n / 1000.0, 1)}

    @property
    def elapsed(self):
        return (now_ns() - self.t0) / 1e9

    @property
    def tx_seconds(self):
        """From the start to the last frame sent."""
        return (self.last_tx_ns - self.t0) / 1e9

    @property
    def rx_seconds(self):
        """From the start to the last frame received."""
        return (self.last_got_ns - self.t0) / 1e9
