# cython: language_level=3
"""The internal port class of the datapath: a tap device's fd (opened by the control
plane, switch/internal.py, with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR and non-blocking).
Receive = readv into [virtio-net header, frame] until the fd is empty or the burst is
full; send = writev per frame with its header (checksum and TSO metadata pass through;
the kernel completes what it must). Wait fd = the tap fd, until the interface is deleted
under the port (someone ran ``ip link del``): then the fd is dead (EBADFD, or end of file)
and is no longer waited on or read, so an idle PMD does not spin on its error. Without the GIL; it neither
opens nor closes the fd and knows no interface names.
"""

from libc.errno cimport EAGAIN, EBADFD, EINTR, errno
from libc.stdint cimport uint16_t, uint32_t, uint64_t
from posix.uio cimport iovec, readv, writev

from pyvhost._pktpool cimport PKT_HEADROOM, VNET_HDR_MAX, pkt_t, pktpool_t, pool_get, pool_put
from pyvhost._port cimport port_ops_t, tx_result_t

cdef enum:
    ETH_HLEN = 14


cdef uint32_t tap_rx_burst(void *dev, uint16_t q, pktpool_t *pool, pkt_t **pkts,
                           uint32_t count) noexcept nogil:
    cdef tap_dev_t *d = <tap_dev_t *>dev
    cdef iovec iov[2]
    cdef uint32_t n = 0
    cdef long r
    cdef pkt_t *p
    if d.dead:
        return 0
    while n < count:
        p = pool_get(pool)
        if p == NULL:
            break
        iov[0].iov_base = p.vnet_hdr
        iov[0].iov_len = d.hdr_len
        iov[1].iov_base = p.data
        iov[1].iov_len = p.cap
        r = readv(d.fd, iov, 2)
        if r < 0:
            pool_put(pool, p)
            if errno == EBADFD:
                d.dead = 1
            elif errno != EAGAIN and errno != EINTR:
                d.st.rx_errors += 1
            break
        if r == 0:                      # end of file: nothing will ever come
            pool_put(pool, p)
            d.dead = 1
            break
        if r < d.hdr_len + ETH_HLEN:
            pool_put(pool, p)
            d.st.rx_runts += 1
            continue
        p.len = <uint32_t>(r - d.hdr_len)
        pkts[n] = p
        n += 1
    return n


cdef uint32_t tap_tx_burst(void *dev, uint32_t hint, pktpool_t *pool, pkt_t **pkts,
                           uint32_t n, tx_result_t *res) noexcept nogil:
    cdef tap_dev_t *d = <tap_dev_t *>dev
    cdef iovec iov[2]
    cdef uint32_t i, sent = 0
    cdef long r
    if d.dead:
        d.st.tx_gone += n
        return 0
    for i in range(n):
        iov[0].iov_base = pkts[i].vnet_hdr
        iov[0].iov_len = d.hdr_len
        iov[1].iov_base = pkts[i].data
        iov[1].iov_len = pkts[i].len
        r = writev(d.fd, iov, 2)
        if r < 0:
            if errno == EAGAIN:
                break                   # full: the rest is counted as no room
            if errno == EBADFD:
                d.dead = 1
                d.st.tx_gone += n - i
                break
            d.st.tx_errors += 1
            res.refused += 1
            continue
        sent += 1
        res.bytes += pkts[i].len
    return sent


cdef int tap_wait_fd(void *dev, uint16_t q) noexcept nogil:
    cdef tap_dev_t *d = <tap_dev_t *>dev
    return -1 if d.dead else d.fd


cdef port_ops_t TAP_OPS
TAP_OPS.rx_burst = tap_rx_burst
TAP_OPS.tx_burst = tap_tx_burst
TAP_OPS.wait_fd = tap_wait_fd
TAP_OPS.set_notify = NULL            # the fd is readable while frames wait
TAP_OPS.pending = NULL


cdef class TapDev(PortDev):
    """The datapath's view of a tap fd (borrowed: the caller keeps it open while the port
    is in the datapath, and closes it after)."""

    def __init__(self, int fd, int hdr_len=VNET_HDR_MAX):
        if fd < 0:
            raise ValueError("a tap port needs an open fd")
        if not 10 <= hdr_len <= VNET_HDR_MAX:
            raise ValueError(f"virtio-net header of {hdr_len} bytes (10..{VNET_HDR_MAX})")
        self.d.fd = fd
        self.d.hdr_len = hdr_len
        self.nqueues = 1
        self.dev = &self.d
        self.ops = &TAP_OPS

    @property
    def dead(self):
        """The interface was deleted under the port (by someone else)."""
        return bool(self.d.dead)

    def stats(self):
        cdef tap_stats_t snapshot = self.d.st
        return snapshot
