# cython: language_level=3
"""The afpacket port class of the datapath: frames from an AF_PACKET socket's TPACKET_V3
receive ring (PACKET_MMAP; blocks handed back to the kernel as soon as they are read) and
sent in sendmmsg batches; every frame carries a virtio-net header (PACKET_VNET_HDR), so
partial checksums (TP_STATUS_CSUMNOTREADY, e.g. a local socket's frames over veth) and
GSO super-frames arrive as NEEDS_CSUM / GSO metadata that the output port passes on or
completes in software (_offload). A VLAN tag the kernel took out is put back. Wait fd =
the socket; before a PMD sleeps, a pending socket error (ENETDOWN: the link went down or
the interface away) is read and remembered (``take_lost``), so epoll does not report it
again and again. Without the GIL.

The control plane (switch/afpacket.py) opens and configures the socket and owns it;
``attach`` maps its ring and swaps it in under both locks, ``detach`` takes it out (the
interface went away), so a PMD never sees a ring being unmapped. Knows no interface names.
"""

from libc.errno cimport EAGAIN, EINTR, ENETDOWN, ENOBUFS, ENODEV, ENXIO, errno
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy, memset
from posix.mman cimport MAP_FAILED, MAP_SHARED, PROT_READ, PROT_WRITE, mmap, munmap
from posix.uio cimport iovec

from pyvhost._pktpool cimport pkt_t, pktpool_t, pool_get, pool_put
from pyvhost._port cimport port_ops_t, tx_result_t
from pyvhost._sockets cimport MSG_DONTWAIT, SO_ERROR, SOL_SOCKET, getsockopt, mmsghdr, sendmmsg
from pyvhost._vring cimport MAX_BURST, vh_lock, vh_trylock, vh_unlock

cdef extern from "vhost_atomic.h" nogil:
    """
    static inline uint32_t afp_load_acquire_u32(const volatile uint32_t *p)
    { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
    static inline void afp_store_release_u32(volatile uint32_t *p, uint32_t v)
    { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
    """
    uint32_t afp_load_acquire_u32(const uint32_t *p)
    void afp_store_release_u32(uint32_t *p, uint32_t v)

cdef extern from "<linux/if_packet.h>" nogil:
    struct tpacket_hdr_variant1:
        uint32_t tp_rxhash
        uint32_t tp_vlan_tci
        uint16_t tp_vlan_tpid
    struct tpacket3_hdr:
        uint32_t tp_next_offset
        uint32_t tp_snaplen
        uint32_t tp_len
        uint32_t tp_status
        uint16_t tp_mac
        uint16_t tp_net
        tpacket_hdr_variant1 hv1
    struct tpacket_hdr_v1:
        uint32_t block_status
        uint32_t num_pkts
        uint32_t offset_to_first_pkt
    union tpacket_bd_header_u:
        tpacket_hdr_v1 bh1
    struct tpacket_block_desc:
        tpacket_bd_header_u hdr
    enum:
        TP_STATUS_KERNEL
        TP_STATUS_USER
        TP_STATUS_CSUMNOTREADY
        TP_STATUS_VLAN_VALID
        TP_STATUS_VLAN_TPID_VALID

cdef enum:
    VNET_HDR_LEN = 10          # struct virtio_net_hdr (PACKET_VNET_HDR)
    ETH_HLEN = 14
    VLAN_HLEN = 4
    F_NEEDS_CSUM = 1


cdef inline uint16_t rd_le16(const uint8_t *p) noexcept nogil:
    return p[0] | (<uint16_t>p[1] << 8)


cdef inline void wr_le16(uint8_t *p, uint16_t v) noexcept nogil:
    p[0] = v & 0xFF
    p[1] = v >> 8


cdef bint copy_frame(afp_dev_t *d, tpacket3_hdr *h, pkt_t *p) noexcept nogil:
    """One ring frame into ``p`` (header, frame, the VLAN tag put back); False: dropped."""
    cdef uint8_t *frame = (<uint8_t *>h) + h.tp_mac
    cdef uint32_t len_ = h.tp_snaplen
    cdef bint vlan = (h.tp_status & TP_STATUS_VLAN_VALID) != 0 and len_ >= 12
    cdef uint16_t tpid, tci
    if h.tp_snaplen < h.tp_len or len_ + (VLAN_HLEN if vlan else 0) > p.cap or \
            h.tp_mac < VNET_HDR_LEN:
        d.st.rx_truncated += 1
        return False
    memcpy(p.vnet_hdr, frame - VNET_HDR_LEN, VNET_HDR_LEN)
    if h.tp_status & TP_STATUS_CSUMNOTREADY:
        d.st.rx_csum_partial += 1
    if vlan:
        tpid = h.hv1.tp_vlan_tpid if h.tp_status & TP_STATUS_VLAN_TPID_VALID else 0x8100
        tci = <uint16_t>h.hv1.tp_vlan_tci
        memcpy(p.data, frame, 12)
        p.data[12] = tpid >> 8
        p.data[13] = tpid & 0xFF
        p.data[14] = tci >> 8
        p.data[15] = tci & 0xFF
        memcpy(p.data + 16, frame + 12, len_ - 12)
        p.len = len_ + VLAN_HLEN
        if p.vnet_hdr[0] & F_NEEDS_CSUM:        # its offsets count from the untagged frame
            wr_le16(p.vnet_hdr + 6, rd_le16(p.vnet_hdr + 6) + VLAN_HLEN)
        if p.vnet_hdr[1] != 0:
            wr_le16(p.vnet_hdr + 2, rd_le16(p.vnet_hdr + 2) + VLAN_HLEN)   # hdr_len
        d.st.rx_vlan_restored += 1
    else:
        memcpy(p.data, frame, len_)
        p.len = len_
    return True


cdef uint32_t afp_rx_burst(void *dev, uint16_t q, pktpool_t *pool, pkt_t **pkts,
                           uint32_t count) noexcept nogil:
    cdef afp_dev_t *d = <afp_dev_t *>dev
    cdef tpacket_block_desc *blk
    cdef tpacket3_hdr *h
    cdef uint32_t n = 0
    cdef pkt_t *p
    if not vh_trylock(&d.rx_lock):
        return 0
    if d.fd < 0 or d.ring == NULL:
        vh_unlock(&d.rx_lock)
        return 0
    while n < count:
        blk = <tpacket_block_desc *>(d.ring + <uint64_t>d.cur * d.block_size)
        if not d.in_block:
            if not afp_load_acquire_u32(&blk.hdr.bh1.block_status) & TP_STATUS_USER:
                break
            d.in_block = 1
            d.left = blk.hdr.bh1.num_pkts
            d.next = (<uint8_t *>blk) + blk.hdr.bh1.offset_to_first_pkt
        while d.left and n < count:
            p = pool_get(pool)
            if p == NULL:
                break
            h = <tpacket3_hdr *>d.next
            if copy_frame(d, h, p):
                pkts[n] = p
                n += 1
            else:
                pool_put(pool, p)
            d.left -= 1
            d.next += h.tp_next_offset
        if d.left:
            break                               # the burst is full (or no buffers)
        afp_store_release_u32(&blk.hdr.bh1.block_status, TP_STATUS_KERNEL)
        d.in_block = 0
        d.cur = (d.cur + 1) % d.nblocks
        d.st.rx_blocks += 1
    vh_unlock(&d.rx_lock)
    return n


cdef uint32_t afp_tx_burst(void *dev, uint32_t hint, pktpool_t *pool, pkt_t **pkts,
                           uint32_t n, tx_result_t *res) noexcept nogil:
    cdef afp_dev_t *d = <afp_dev_t *>dev
    cdef mmsghdr msgs[MAX_BURST]
    cdef iovec iov[2 * MAX_BURST]
    cdef uint32_t i, m, done = 0, sent = 0
    cdef int r
    vh_lock(&d.tx_lock)
    if d.fd < 0:
        d.st.tx_down += n
        vh_unlock(&d.tx_lock)
        return 0
    while done < n:
        m = n - done if n - done < MAX_BURST else MAX_BURST
        memset(msgs, 0, sizeof(mmsghdr) * m)
        for i in range(m):
            iov[2 * i].iov_base = pkts[done + i].vnet_hdr
            iov[2 * i].iov_len = VNET_HDR_LEN
            iov[2 * i + 1].iov_base = pkts[done + i].data
            iov[2 * i + 1].iov_len = pkts[done + i].len
            msgs[i].msg_hdr.msg_iov = &iov[2 * i]
            msgs[i].msg_hdr.msg_iovlen = 2
        r = sendmmsg(d.fd, msgs, m, MSG_DONTWAIT)
        if r > 0:
            for i in range(<uint32_t>r):
                res.bytes += pkts[done + i].len
            sent += r
            done += r
            continue
        if r < 0 and (errno == EAGAIN or errno == ENOBUFS or errno == EINTR):
            break                               # busy: the rest is counted as no room
        if r < 0 and (errno == ENETDOWN or errno == ENXIO or errno == ENODEV):   # down, gone
            d.st.tx_down += n - done
            break
        d.st.tx_errors += 1                     # this frame is refused; go on after it
        res.refused += 1
        done += 1
    vh_unlock(&d.tx_lock)
    return sent


cdef int afp_wait_fd(void *dev, uint16_t q) noexcept nogil:
    return (<afp_dev_t *>dev).fd


cdef void afp_set_notify(void *dev, uint16_t q, bint on) noexcept nogil:
    """Before sleeping: read (and so clear) a pending socket error."""
    cdef afp_dev_t *d = <afp_dev_t *>dev
    cdef int err = 0
    cdef unsigned int size = sizeof(int)
    if not on:
        return
    vh_lock(&d.rx_lock)
    if d.fd >= 0 and getsockopt(d.fd, SOL_SOCKET, SO_ERROR, &err, &size) == 0 and err:
        d.lost = 1
    vh_unlock(&d.rx_lock)


cdef void afp_unmap(afp_dev_t *d) noexcept nogil:
    if d.ring != NULL:
        munmap(d.ring, d.ring_size)
        d.ring = NULL


cdef port_ops_t AFP_OPS
AFP_OPS.rx_burst = afp_rx_burst
AFP_OPS.tx_burst = afp_tx_burst
AFP_OPS.wait_fd = afp_wait_fd
AFP_OPS.set_notify = afp_set_notify   # the socket is readable while a block waits for us
AFP_OPS.pending = NULL


cdef class AfPacketDev(PortDev):
    """The datapath's view of an AF_PACKET socket; starts detached (nothing moves)."""

    def __init__(self):
        self.d.fd = -1
        self.nqueues = 1
        self.dev = &self.d
        self.ops = &AFP_OPS

    def __dealloc__(self):
        afp_unmap(&self.d)

    def attach(self, int fd, uint32_t block_size, uint32_t nblocks):
        """Map the TPACKET_V3 ring of ``fd`` (set up with these sizes) and use it from now
        on. The fd stays the caller's: keep it open until ``detach``."""
        cdef uint64_t size = <uint64_t>block_size * nblocks
        cdef void *ring
        if fd < 0 or block_size == 0 or nblocks == 0:
            raise ValueError("attach needs an fd and the ring's geometry")
        ring = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
        if ring == MAP_FAILED:
            import os
            raise OSError(errno, f"mmap of the packet ring: {os.strerror(errno)}")
        self.detach()
        with nogil:
            vh_lock(&self.d.rx_lock)
            vh_lock(&self.d.tx_lock)
        self.d.ring = <uint8_t *>ring
        self.d.ring_size = size
        self.d.block_size = block_size
        self.d.nblocks = nblocks
        self.d.cur = 0
        self.d.in_block = 0
        self.d.left = 0
        self.d.lost = 0
        self.d.fd = fd
        vh_unlock(&self.d.tx_lock)
        vh_unlock(&self.d.rx_lock)

    def detach(self):
        """No PMD uses the socket after this returns; then the caller may close it."""
        with nogil:
            vh_lock(&self.d.rx_lock)
            vh_lock(&self.d.tx_lock)
        self.d.fd = -1
        afp_unmap(&self.d)
        vh_unlock(&self.d.tx_lock)
        vh_unlock(&self.d.rx_lock)

    def take_lost(self):
        """Did the socket report an error since the last call (the link went down, or
        the interface left)? Clears it."""
        cdef int lost
        with nogil:
            vh_lock(&self.d.rx_lock)
        lost = self.d.lost
        self.d.lost = 0
        vh_unlock(&self.d.rx_lock)
        return bool(lost)

    @property
    def attached(self):
        return self.d.fd >= 0

    def stats(self):
        cdef afp_stats_t snapshot = self.d.st
        return snapshot
