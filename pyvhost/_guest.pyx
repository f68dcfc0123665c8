# cython: language_level=3
"""The data path of ``pyvhost guest``: a tap fd bridged to one queue pair of a frontend
(pyvhost.frontend's VirtioUser), compiled and run without the GIL.

tap -> device: readv straight into a free TX buffer of the driver's TX ring ([virtio-net
header, frame]: the tap has IFF_VNET_HDR and a 12-byte header, the ring's header length),
fix the header for the device (DATA_VALID is the device's flag only; num_buffers 0),
complete a partial checksum in software when the device did not take NET_CSUM, drop (and
count) a GSO frame of a kind the device did not take, post; one publish per burst.
device -> tap: drv_recv a burst (frames reassembled into pool packets with the header the
device wrote) and writev each one with its header to the tap: the kernel takes partial
checksums and GSO frames as they are.

Idle: after SPIN_NS without work, turn RX interrupts on (and TX ones while the TX ring is
full), re-check, and sleep in poll() on the tap fd (or, while the TX ring is full, the TX
call eventfd), the RX call eventfd, the control socket (the backend going away) and a wake
eventfd (stop). No busy waiting.

Only the fds and driver queues the caller hands over: it opens and closes nothing but its
own wake eventfd, knows no interface names, namespaces or vhost-user messages. The driver
queue internals it touches beyond pyvhost._driver's functions: giving back a TX buffer that
drv_tx_slot handed out when the tap had nothing to read (free_ids/nfree).
"""

from libc.errno cimport EAGAIN, EBADFD, EINTR, errno
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec
from posix.uio cimport iovec, readv, writev
from posix.unistd cimport close

from pyvhost._driver cimport (
    DriverQueue, drv_interrupts, drv_publish, drv_reclaim, drv_recv, drv_tx_post,
    drv_tx_slot, drv_used_count, drvq_t,
)
from pyvhost._offload cimport csum_complete
from pyvhost._pktpool cimport PacketPool, pkt_t, pktpool_t, pool_put
from pyvhost._vring cimport (
    MAX_BURST, vh_eventfd_drain, vh_eventfd_signal, vh_load_acquire_int, vh_store_release_int,
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

cdef extern from "sys/eventfd.h" nogil:
    int eventfd(unsigned int initval, int flags)
    enum:
        EFD_NONBLOCK
        EFD_CLOEXEC

cdef enum:
    HDR_LEN = 12               # virtio-net header on the tap and in the rings (VERSION_1)
    ETH_HLEN = 14
    F_NEEDS_CSUM = 1
    F_DATA_VALID = 2
    GSO_NONE = 0
    GSO_TCPV4 = 1
    GSO_UDP = 3
    GSO_TCPV6 = 4
    GSO_ECN = 0x80
    SLEEP_MS = 500             # bound on one sleep (the caller's timeout is checked after)

cdef enum:
    SPIN_NS = 50000            # poll this long after the last work before sleeping

cdef enum:                     # why run() returned
    R_STOPPED = 0              # stop() was called
    R_CONTROL = 1              # the control socket is readable: the backend went away
    R_BROKEN = 2               # the backend broke a ring
    R_TIMEOUT = 3              # timeout_ms passed
    R_TAP_GONE = 4             # the interface was deleted under us

STOP_STOPPED, STOP_CONTROL, STOP_BROKEN, STOP_TIMEOUT, STOP_TAP_GONE = range(5)

cdef struct guest_stats_t:
    uint64_t to_device_packets   # frames read from the tap and posted on the TX ring
    uint64_t to_device_bytes
    uint64_t to_tap_packets      # frames from the RX ring written to the tap
    uint64_t to_tap_bytes
    uint64_t tap_read_errors     # reads that failed other than "nothing to read"
    uint64_t tap_write_errors    # writes the kernel refused (bad header, too big)
    uint64_t runts               # tap frames shorter than an Ethernet header
    uint64_t csum_sw             # partial checksums completed here (no NET_CSUM)
    uint64_t drop_csum           # partial checksums that could not be completed
    uint64_t drop_gso            # GSO frames of a kind the device did not take
    uint64_t tx_ring_full        # times every TX buffer was in flight
    uint64_t sleeps
    uint64_t wakeups


cdef inline uint64_t now_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <uint64_t>ts.tv_sec * 1000000000 + ts.tv_nsec


cdef inline void tx_unslot(drvq_t *q, int id) noexcept nogil:
    """Give back a buffer drv_tx_slot handed out and that was not posted."""
    q.free_ids[q.nfree] = <uint16_t>id
    q.nfree += 1


cdef struct guest_t:
    int tapfd
    int wakefd
    int stop
    int tap_dead
    int tx_full                  # the last tap -> device pass found no free TX buffer
    uint8_t dev_csum             # the device takes partial checksums (NET_CSUM)
    uint8_t dev_tso4             # ... TCPv4 / TCPv6 GSO frames (HOST_TSO4/6)
    uint8_t dev_tso6
    uint8_t dev_ecn
    guest_stats_t st


cdef bint fix_for_device(guest_t *g, uint8_t *slot, uint8_t *frame,
                         uint32_t length) noexcept nogil:
    """Make the header of a frame read from the tap one the device accepts; False: drop."""
    cdef pkt_t p
    cdef uint8_t gso = slot[1] & ~GSO_ECN
    slot[0] &= ~F_DATA_VALID
    slot[10] = 0
    slot[11] = 0
    if gso != GSO_NONE:
        if (gso == GSO_TCPV4 and not g.dev_tso4) or (gso == GSO_TCPV6 and not g.dev_tso6) or \
                (gso != GSO_TCPV4 and gso != GSO_TCPV6) or \
                (slot[1] & GSO_ECN and not g.dev_ecn):
            g.st.drop_gso += 1
            return False
    if slot[0] & F_NEEDS_CSUM and not g.dev_csum:
        p.data = frame
        p.len = length
        p.cap = length
        memcpy(p.vnet_hdr, slot, HDR_LEN)
        if not csum_complete(&p):
            g.st.drop_csum += 1
            return False
        slot[0] = p.vnet_hdr[0]
        g.st.csum_sw += 1
    return True


cdef uint32_t tap_to_device(guest_t *g, drvq_t *txq) noexcept nogil:
    """Up to a burst of frames from the tap into the TX ring; returns how many."""
    cdef iovec iov[2]
    cdef uint32_t n = 0, length
    cdef uint8_t *frame
    cdef uint8_t *slot
    cdef long r
    cdef int id
    g.tx_full = 0
    if g.tap_dead:
        return 0
    drv_reclaim(txq)
    while n < MAX_BURST:
        id = drv_tx_slot(txq, &frame)
        if id < 0:
            g.tx_full = 1
            g.st.tx_ring_full += 1
            break
        slot = frame - HDR_LEN
        iov[0].iov_base = slot
        iov[0].iov_len = HDR_LEN
        iov[1].iov_base = frame
        iov[1].iov_len = txq.buf_len - HDR_LEN
        r = readv(g.tapfd, iov, 2)
        if r < 0:
            tx_unslot(txq, id)
            if errno == EBADFD:
                g.tap_dead = 1
            elif errno != EAGAIN and errno != EINTR:
                g.st.tap_read_errors += 1
            break
        if r == 0:
            tx_unslot(txq, id)
            g.tap_dead = 1
            break
        if r < HDR_LEN + ETH_HLEN:
            tx_unslot(txq, id)
            g.st.runts += 1
            continue
        length = <uint32_t>(r - HDR_LEN)
        if not fix_for_device(g, slot, frame, length):
            tx_unslot(txq, id)
            continue
        drv_tx_post(txq, <uint16_t>id, length)
        g.st.to_device_bytes += length
        txq.st.bytes += length
        n += 1
    if n:
        drv_publish(txq)
        g.st.to_device_packets += n
        txq.st.packets += n
        txq.st.bursts += 1
    return n


cdef uint32_t device_to_tap(guest_t *g, drvq_t *rxq, pktpool_t *pool) noexcept nogil:
    """A burst of frames from the RX ring written to the tap; returns how many."""
    cdef pkt_t *pkts[MAX_BURST]
    cdef iovec iov[2]
    cdef uint32_t n, i
    cdef long r
    n = drv_recv(rxq, pool, pkts, MAX_BURST)
    for i in range(n):
        if not g.tap_dead:
            iov[0].iov_base = pkts[i].vnet_hdr
            iov[0].iov_len = HDR_LEN
            iov[1].iov_base = pkts[i].data
            iov[1].iov_len = pkts[i].len
            r = writev(g.tapfd, iov, 2)
            if r < 0:
                if errno == EBADFD:
                    g.tap_dead = 1
                g.st.tap_write_errors += 1
            else:
                g.st.to_tap_packets += 1
                g.st.to_tap_bytes += pkts[i].len
        pool_put(pool, pkts[i])
    return n


cdef int guest_sleep(guest_t *g, drvq_t *rxq, drvq_t *txq, int ctlfd,
                     int timeout_ms) noexcept nogil:
    """Interrupts on, re-check, sleep. Returns 1 when the control fd woke us, else 0."""
    cdef pollfd fds[4]
    cdef int nfds = 0, result = 0, r
    cdef uint16_t idx
    cdef bint tx_wait = g.tx_full
    drv_interrupts(rxq, True)
    if tx_wait:
        drv_interrupts(txq, True)
    if drv_used_count(rxq, &idx) == 0 and not (tx_wait and drv_used_count(txq, &idx) != 0) \
            and not vh_load_acquire_int(&g.stop):
        fds[0].fd = g.wakefd
        fds[1].fd = ctlfd
        fds[2].fd = rxq.callfd
        nfds = 3
        if tx_wait:
            fds[nfds].fd = txq.callfd
            nfds += 1
        elif not g.tap_dead:
            fds[nfds].fd = g.tapfd
            nfds += 1
        for r in range(nfds):
            fds[r].events = POLLIN
            fds[r].revents = 0
        g.st.sleeps += 1
        r = poll(fds, nfds, timeout_ms)
        if r > 0:
            g.st.wakeups += 1
            if fds[1].revents & (POLLIN | POLLHUP | POLLERR):
                result = 1
    vh_eventfd_drain(g.wakefd)
    vh_eventfd_drain(rxq.callfd)
    drv_interrupts(rxq, False)
    if tx_wait:
        vh_eventfd_drain(txq.callfd)
        drv_interrupts(txq, False)
    return result


cdef int guest_run(guest_t *g, drvq_t *rxq, drvq_t *txq, pktpool_t *pool, int ctlfd,
                   int timeout_ms) noexcept nogil:
    cdef uint64_t start = now_ns(), last_work, t
    cdef uint64_t limit = <uint64_t>timeout_ms * 1000000 if timeout_ms >= 0 else 0
    cdef uint32_t work
    cdef int left
    last_work = start
    while not vh_load_acquire_int(&g.stop):
        work = tap_to_device(g, txq)
        work += device_to_tap(g, rxq, pool)
        if rxq.broken or txq.broken:
            return R_BROKEN
        if g.tap_dead:
            return R_TAP_GONE
        t = now_ns()
        if limit and t - start >= limit:
            return R_TIMEOUT
        if work:
            last_work = t
            continue
        if t - last_work < SPIN_NS:
            continue
        left = SLEEP_MS
        if limit and (limit - (t - start)) // 1000000 + 1 < <uint64_t>left:
            left = <int>((limit - (t - start)) // 1000000 + 1)
        if guest_sleep(g, rxq, txq, ctlfd, left):
            return R_CONTROL
        last_work = now_ns() - SPIN_NS      # woken: look once, sleep again if nothing
    return R_STOPPED


cdef class GuestLoop:
    """The tap <-> queue pair loop. ``tapfd``: non-blocking, IFF_VNET_HDR with a 12-byte
    header (borrowed: the caller closes it after the loop has returned). ``pool``: packets
    large enough for the biggest frame the device may deliver (64 KiB and more with GSO).
    One thread runs ``run``; any thread may call ``stop`` and ``stats``."""

    cdef guest_t g
    cdef PacketPool pool

    def __cinit__(self, int tapfd, PacketPool pool):
        if tapfd < 0:
            raise ValueError("the guest loop needs an open tap fd")
        self.g.tapfd = tapfd
        self.g.stop = 0
        self.g.tap_dead = 0
        self.g.tx_full = 0
        self.pool = pool
        self.g.wakefd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
        if self.g.wakefd < 0:
            raise OSError(errno, "eventfd")

    def __dealloc__(self):
        if self.g.wakefd >= 0:
            close(self.g.wakefd)
            self.g.wakefd = -1

    def configure(self, *, bint csum, bint tso4, bint tso6, bint ecn=False):
        """What the device takes from the driver (negotiated NET_CSUM, HOST_TSO4/6/ECN)."""
        self.g.dev_csum = csum
        self.g.dev_tso4 = tso4
        self.g.dev_tso6 = tso6
        self.g.dev_ecn = ecn

    def run(self, DriverQueue rxq, DriverQueue txq, int ctlfd, int timeout_ms=-1):
        """Move frames until stop(), the control fd turns readable, a ring breaks, the tap
        goes away or ``timeout_ms`` passes (-1: no limit). Returns a STOP_* code."""
        cdef int r
        if not rxq.rx or txq.rx:
            raise ValueError("run(rx queue, tx queue, ...)")
        with nogil:
            r = guest_run(&self.g, &rxq.q, &txq.q, self.pool.pool, ctlfd, timeout_ms)
        return r

    def stop(self):
        """Make run() return (now, or at once if it is called later): reset() undoes it."""
        vh_store_release_int(&self.g.stop, 1)
        vh_eventfd_signal(self.g.wakefd)

    def reset(self):
        vh_store_release_int(&self.g.stop, 0)

    @property
    def tap_dead(self):
        return bool(self.g.tap_dead)

    def stats(self):
        cdef guest_stats_t snapshot = self.g.st
        return snapshot
