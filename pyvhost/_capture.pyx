# cython: language_level=3
"""The capture port class of the datapath: the output of the mirror behind a ``pyvhost
capture``. Send = append each frame as a pcap record (16-byte header with the burst's wall
clock time, then at most ``snaplen`` bytes of the frame) to a byte ring in this process's
memory, under a spinlock (several PMDs may send to it); a frame that does not fit is not
written and the datapath counts it (drop_tx_full: the reader is too slow), so a slow
reader never slows a PMD. Receive = nothing. An eventfd says the ring went from empty to
not empty; the control thread drains whole records from the ring (``drain``).
No sockets, no pcap file header, no Python in the send path.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy
from posix.time cimport CLOCK_REALTIME, clock_gettime, timespec
from posix.unistd cimport close, read

from pyvhost._pktpool cimport pkt_t, pktpool_t
from pyvhost._port cimport PortDev, port_ops_t, tx_result_t
from pyvhost._vring cimport vh_eventfd_signal, vh_lock, vh_unlock

cdef extern from "sys/eventfd.h" nogil:
    int eventfd(unsigned int initval, int flags)
    int EFD_NONBLOCK
    int EFD_CLOEXEC

cdef enum:
    RECORD_HEADER = 16
    MIN_RING = 1 << 16
    MAX_RING = 1 << 30

cdef struct cap_dev_t:
    int lock
    uint8_t *ring
    uint64_t size
    uint64_t head                 # bytes ever written (the next write at head % size)
    uint64_t tail                 # bytes ever read
    uint32_t snaplen
    int efd
    uint64_t frames               # records written
    uint64_t bytes                # frame bytes they carried (before snaplen)


cdef inline void ring_put(cap_dev_t *d, const void *src, uint64_t n) noexcept nogil:
    cdef uint64_t at = d.head % d.size
    cdef uint64_t first = d.size - at if d.size - at < n else n
    memcpy(d.ring + at, src, first)
    if first < n:
        memcpy(d.ring, <const uint8_t *>src + first, n - first)
    d.head += n


cdef inline void ring_get(cap_dev_t *d, uint64_t pos, void *dst, uint64_t n) noexcept nogil:
    cdef uint64_t at = pos % d.size
    cdef uint64_t first = d.size - at if d.size - at < n else n
    memcpy(dst, d.ring + at, first)
    if first < n:
        memcpy(<uint8_t *>dst + first, d.ring, n - first)


cdef uint32_t cap_rx_burst(void *dev, uint16_t q, pktpool_t *pool, pkt_t **pkts,
                           uint32_t count) noexcept nogil:
    return 0


cdef uint32_t cap_tx_burst(void *dev, uint32_t hint, pktpool_t *pool, pkt_t **pkts,
                           uint32_t n, tx_result_t *res) noexcept nogil:
    cdef cap_dev_t *d = <cap_dev_t *>dev
    cdef uint32_t i, caplen, done = 0
    cdef uint32_t hdr[4]
    cdef timespec ts
    cdef bint was_empty
    clock_gettime(CLOCK_REALTIME, &ts)
    hdr[0] = <uint32_t>ts.tv_sec
    hdr[1] = <uint32_t>(ts.tv_nsec // 1000)
    vh_lock(&d.lock)
    was_empty = d.head == d.tail
    for i in range(n):
        caplen = pkts[i].len if pkts[i].len < d.snaplen else d.snaplen
        if d.size - (d.head - d.tail) < RECORD_HEADER + caplen:
            break                                  # the reader is behind: the rest drop
        hdr[2] = caplen
        hdr[3] = pkts[i].len
        ring_put(d, hdr, RECORD_HEADER)
        ring_put(d, pkts[i].data, caplen)
        d.frames += 1
        d.bytes += pkts[i].len
        res.bytes += pkts[i].len
        done += 1
    vh_unlock(&d.lock)
    if was_empty and done:
        vh_eventfd_signal(d.efd)
    return done


cdef int cap_wait_fd(void *dev, uint16_t q) noexcept nogil:
    return -1                                      # never received from


cdef port_ops_t CAPTURE_OPS
CAPTURE_OPS.rx_burst = cap_rx_burst
CAPTURE_OPS.tx_burst = cap_tx_burst
CAPTURE_OPS.wait_fd = cap_wait_fd
CAPTURE_OPS.set_notify = NULL
CAPTURE_OPS.pending = NULL


cdef class CaptureDev(PortDev):
    """A capture port's ring of ``ring_bytes`` (a power of 2) for records of at most
    ``snaplen`` frame bytes. ``fileno()`` becomes readable when records wait."""

    cdef cap_dev_t d

    def __cinit__(self, uint64_t ring_bytes=4 << 20, uint32_t snaplen=262144):
        self.d.efd = -1
        self.d.ring = NULL

    def __init__(self, uint64_t ring_bytes=4 << 20, uint32_t snaplen=262144):
        if not MIN_RING <= ring_bytes <= MAX_RING or ring_bytes & (ring_bytes - 1):
            raise ValueError(f"a capture ring is a power of 2 in {MIN_RING}..{MAX_RING} bytes")
        if not 14 <= snaplen or snaplen + RECORD_HEADER > ring_bytes:
            raise ValueError(f"snaplen {snaplen}: 14 .. the ring's size")
        self.d.ring = <uint8_t *>malloc(ring_bytes)
        if self.d.ring == NULL:
            raise MemoryError()
        self.d.efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
        if self.d.efd < 0:
            raise OSError("eventfd failed")
        self.d.size = ring_bytes
        self.d.snaplen = snaplen
        self.nqueues = 1
        self.dev = &self.d
        self.ops = &CAPTURE_OPS

    def __dealloc__(self):
        free(self.d.ring)
        if self.d.efd >= 0:
            close(self.d.efd)

    def fileno(self):
        return self.d.efd

    def drain(self, uint64_t max_bytes=1 << 20):
        """Whole records waiting (at most ``max_bytes`` of them, but at least one), as
        the bytes of a pcap file's records; b"" if none. Clears the wake-up."""
        cdef uint64_t n = 0, pos, head, rec
        cdef uint32_t hdr[4]
        cdef uint64_t counter
        cdef bytes out
        cdef char *dst
        with nogil:
            read(self.d.efd, &counter, 8)
            vh_lock(&self.d.lock)
            head = self.d.head
            vh_unlock(&self.d.lock)
        # [tail, head) is the reader's: senders write past head and never wrap onto it
        # until tail moves, so it is copied without the lock (a PMD never waits on this)
        pos = self.d.tail
        while pos < head:
            ring_get(&self.d, pos, hdr, RECORD_HEADER)
            rec = RECORD_HEADER + hdr[2]
            if n and n + rec > max_bytes:
                break
            n += rec
            pos += rec
        out = PyBytes_FromStringAndSize(NULL, n)
        dst = PyBytes_AS_STRING(out)
        with nogil:
            ring_get(&self.d, self.d.tail, dst, n)
            vh_lock(&self.d.lock)
            self.d.tail = pos
            vh_unlock(&self.d.lock)
        return out

    @property
    def pending(self):
        """Bytes of records not drained yet."""
        return self.d.head - self.d.tail

    def stats(self):
        return {"frames": self.d.frames, "bytes": self.d.bytes}
