# cython: language_level=3
"""The afxdp port class of the datapath: one queue of an existing interface through an
AF_XDP socket made with libxdp (which loads its default XDP program redirecting the queue
to the socket). The UMEM is split in two: receive frames cycle between the fill ring and
the RX ring (each frame is copied out and handed straight back), send frames between a
free list and the TX/completion rings; a send burst kicks the kernel until the TX ring
is empty (copy mode sends a batch per kick). AF_XDP carries no virtio-net header, so a
frame that asks for a checksum or TSO is completed or segmented here (_offload's helpers)
before it leaves; frames received carry none either (a sender over veth must not leave partial
checksums: ``ethtool -K PEER tx off``, as OVS documents for its afxdp ports). Wait fd =
an epoll set of the device's own that holds the socket only while the PMD sleeps
(set_notify). Without the GIL.

``open`` creates the socket and ``close`` deletes it under both locks (the control plane,
switch/afxdp.py, decides when: the interface went away or came back). Knows no switch.
"""

from libc.errno cimport EAGAIN, EBUSY, ENOBUFS, errno
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free
from libc.string cimport memcpy, memset
from posix.unistd cimport close
from posix.mman cimport MAP_ANONYMOUS, MAP_FAILED, MAP_PRIVATE, PROT_READ, PROT_WRITE, mmap, munmap

from pyvhost._offload cimport MAX_SEGS, csum_complete, tso_parse, tso_segment, tso_t
from pyvhost._pktpool cimport pkt_t, pktpool_t, pool_get, pool_put, pool_put_many
from pyvhost._port cimport port_ops_t, tx_result_t
from pyvhost._vring cimport vh_lock, vh_trylock, vh_unlock

cdef extern from "<xdp/xsk.h>" nogil:
    struct xdp_desc:
        uint64_t addr
        uint32_t len
        uint32_t options
    struct xsk_umem_config:
        uint32_t fill_size
        uint32_t comp_size
        uint32_t frame_size
        uint32_t frame_headroom
        uint32_t flags
    struct xsk_socket_config:
        uint32_t rx_size
        uint32_t tx_size
        uint32_t libxdp_flags
        uint32_t xdp_flags
        uint16_t bind_flags
    int xsk_umem__create(xsk_umem **umem, void *area, uint64_t size, xsk_ring_prod *fill,
                         xsk_ring_cons *comp, const xsk_umem_config *config)
    int xsk_umem__delete(xsk_umem *umem)
    int xsk_socket__create(xsk_socket **xsk, const char *ifname, uint32_t queue,
                           xsk_umem *umem, xsk_ring_cons *rx, xsk_ring_prod *tx,
                           const xsk_socket_config *config)
    void xsk_socket__delete(xsk_socket *xsk)
    int xsk_socket__fd(const xsk_socket *xsk)
    int xsk_umem__fd(const xsk_umem *umem)
    uint32_t xsk_ring_cons__peek(xsk_ring_cons *c, uint32_t nb, uint32_t *idx)
    void xsk_ring_cons__release(xsk_ring_cons *c, uint32_t nb)
    const xdp_desc *xsk_ring_cons__rx_desc(const xsk_ring_cons *rx, uint32_t idx)
    const uint64_t *xsk_ring_cons__comp_addr(const xsk_ring_cons *comp, uint32_t idx)
    uint32_t xsk_ring_prod__reserve(xsk_ring_prod *p, uint32_t nb, uint32_t *idx)
    uint32_t xsk_prod_nb_free(xsk_ring_prod *p, uint32_t nb)
    void xsk_ring_prod__submit(xsk_ring_prod *p, uint32_t nb)
    uint64_t *xsk_ring_prod__fill_addr(xsk_ring_prod *fill, uint32_t idx)
    xdp_desc *xsk_ring_prod__tx_desc(xsk_ring_prod *tx, uint32_t idx)
    void *xsk_umem__get_data(void *area, uint64_t addr)
    enum:
        XSK_LIBXDP_FLAGS__INHIBIT_PROG_LOAD

cdef extern from "<linux/if_link.h>":
    enum:
        XDP_FLAGS_SKB_MODE
        XDP_FLAGS_DRV_MODE

cdef extern from "<linux/if_xdp.h>":
    enum:
        XDP_COPY
        XDP_MMAP_OFFSETS
    struct xdp_ring_offset:
        uint64_t desc
    struct xdp_mmap_offsets:
        xdp_ring_offset fr
        xdp_ring_offset cr

cdef extern from "<sys/epoll.h>" nogil:
    union epoll_data_t:
        int fd
    struct epoll_event:
        uint32_t events
        epoll_data_t data
    int epoll_create1(int flags)
    int epoll_ctl(int epfd, int op, int fd, epoll_event *event)
    enum:
        EPOLLIN
        EPOLL_CTL_ADD
        EPOLL_CTL_DEL
        EPOLL_CLOEXEC

cdef extern from "<sys/socket.h>" nogil:
    int getsockopt(int fd, int level, int name, void *val, unsigned int *len)
    long sendto(int fd, const void *buf, size_t n, int flags, const void *addr,
                unsigned int addrlen)
    enum:
        MSG_DONTWAIT

cdef enum:
    RING_SIZE = 2048           # each of fill, completion, RX and TX
    SOL_XDP = 283
    MAX_KICKS = RING_SIZE // 32 + 2     # sendto()s for one full TX ring, and some
    RX_FRAMES = XDP_FRAMES // 2
    MAX_TX = 32


cdef inline uint64_t frame_of(uint64_t addr) noexcept nogil:
    return addr - addr % XDP_FRAME_SIZE


cdef uint32_t xdp_rx_burst(void *dev, uint16_t q, pktpool_t *pool, pkt_t **pkts,
                           uint32_t count) noexcept nogil:
    cdef xdp_dev_t *d = <xdp_dev_t *>dev
    cdef uint32_t idx = 0, fidx = 0, got, i, n = 0, room
    cdef const xdp_desc *desc
    cdef pkt_t *p
    if not vh_trylock(&d.rx_lock):
        return 0
    if d.fd < 0:
        vh_unlock(&d.rx_lock)
        return 0
    room = xsk_prod_nb_free(d.fill, count)     # each frame read goes back to the fill ring
    got = xsk_ring_cons__peek(d.rx, count if count < room else room, &idx)
    if got:
        xsk_ring_prod__reserve(d.fill, got, &fidx)
    for i in range(got):
        desc = xsk_ring_cons__rx_desc(d.rx, idx + i)
        p = pool_get(pool)
        if p == NULL:
            d.st.rx_no_buffer += 1
        elif desc.len > p.cap or desc.len > XDP_FRAME_SIZE:
            pool_put(pool, p)
            d.st.rx_oversize += 1
        else:
            memcpy(p.data, xsk_umem__get_data(d.area, desc.addr), desc.len)
            p.len = desc.len
            pkts[n] = p
            n += 1
        xsk_ring_prod__fill_addr(d.fill, fidx + i)[0] = frame_of(desc.addr)
    if got:
        xsk_ring_prod__submit(d.fill, got)
        xsk_ring_cons__release(d.rx, got)
    vh_unlock(&d.rx_lock)
    return n


cdef void reclaim(xdp_dev_t *d) noexcept nogil:
    cdef uint32_t idx = 0, done, i
    done = xsk_ring_cons__peek(d.comp, RING_SIZE, &idx)
    if done > XDP_FRAMES - RX_FRAMES - d.nfree:        # never more than are in flight
        done = XDP_FRAMES - RX_FRAMES - d.nfree
    for i in range(done):
        d.free_frames[d.nfree] = frame_of(xsk_ring_cons__comp_addr(d.comp, idx + i)[0])
        d.nfree += 1
    if done:
        xsk_ring_cons__release(d.comp, done)


cdef uint32_t put_frames(xdp_dev_t *d, pkt_t **pkts, uint32_t n, uint64_t *bytes_) noexcept nogil:
    """Copy complete frames into TX slots; returns how many went (in order): never a
    frame larger than a slot (the callers refuse those first)."""
    cdef uint32_t idx = 0, i, k
    cdef xdp_desc *desc
    k = n if n < d.nfree else d.nfree
    for i in range(k):
        if pkts[i].len > XDP_FRAME_SIZE:
            k = i
            break
    if k == 0:
        return 0
    k = xsk_ring_prod__reserve(d.tx, k, &idx)
    for i in range(k):
        d.nfree -= 1
        desc = xsk_ring_prod__tx_desc(d.tx, idx + i)
        desc.addr = d.free_frames[d.nfree]
        desc.len = pkts[i].len
        desc.options = 0
        memcpy(xsk_umem__get_data(d.area, desc.addr), pkts[i].data, pkts[i].len)
        bytes_[0] += pkts[i].len
    if k:
        xsk_ring_prod__submit(d.tx, k)
    return k


cdef uint32_t xdp_tx_burst(void *dev, uint32_t hint, pktpool_t *pool, pkt_t **pkts,
                           uint32_t n, tx_result_t *res) noexcept nogil:
    cdef xdp_dev_t *d = <xdp_dev_t *>dev
    cdef pkt_t *ready[MAX_TX]
    cdef pkt_t *segs[MAX_SEGS]
    cdef uint32_t i, nready = 0, sent = 0, nseg, first, put
    cdef tso_t t
    cdef pkt_t *p
    cdef bint ok, full
    vh_lock(&d.tx_lock)
    if d.fd < 0:
        d.st.tx_down += n
        vh_unlock(&d.tx_lock)
        return 0
    reclaim(d)
    for i in range(n):
        p = pkts[i]
        if p.vnet_hdr[1] != 0:                         # TSO: segments, each complete
            if nready:                                 # the frames before it go first
                put = put_frames(d, ready, nready, &res.bytes)
                sent += put
                full = put < nready
                nready = 0
                if full:
                    break
            ok = tso_parse(p, &t) and t.hlen < XDP_FRAME_SIZE
            if ok and t.hlen + t.mss > XDP_FRAME_SIZE:
                t.mss = XDP_FRAME_SIZE - t.hlen        # segments must fit a UMEM frame
            first = 0
            while ok:
                nseg = tso_segment(p, &t, first, pool, segs)
                if nseg == 0:
                    ok = first > 0 and first * t.mss >= t.payload
                    break
                put = put_frames(d, segs, nseg, &res.bytes)
                pool_put_many(pool, segs, nseg)
                if put < nseg:
                    ok = False
                    break
                first += nseg
            if ok:
                sent += 1
                d.st.tx_segmented += 1
            else:
                res.failed += 1
                if d.nfree == 0 or xsk_prod_nb_free(d.tx, 1) == 0:
                    break                              # no room: later frames must not pass
            continue
        if p.vnet_hdr[0] & 1:                          # NEEDS_CSUM
            if not csum_complete(p):
                d.st.tx_errors += 1
                res.refused += 1
                continue
            d.st.tx_csum += 1
        if p.len > XDP_FRAME_SIZE:
            d.st.tx_oversize += 1
            res.refused += 1
            continue
        ready[nready] = p
        nready += 1
        if nready == MAX_TX:
            put = put_frames(d, ready, nready, &res.bytes)
            sent += put
            full = put < nready
            nready = 0
            if full:
                break                                  # the ring is full: the rest waits
    if nready:
        sent += put_frames(d, ready, nready, &res.bytes)
    kick(d)
    vh_unlock(&d.tx_lock)
    return sent


cdef void kick(xdp_dev_t *d) noexcept nogil:
    """Copy mode: the kernel sends from the TX ring in sendto(), at most a batch (32 on
    this kernel) per call, and says EAGAIN while frames are left: kick again until the
    ring is empty (no frame may wait for the port's next burst: a TCP sender would stall
    on it), reclaiming completions in between so the completion ring never fills."""
    cdef int tries
    for tries in range(MAX_KICKS):
        d.st.tx_kicks += 1
        if sendto(d.fd, NULL, 0, MSG_DONTWAIT, NULL, 0) >= 0:
            return
        if errno != EAGAIN and errno != EBUSY and errno != ENOBUFS:
            d.st.tx_kick_errors += 1
            return
        reclaim(d)
    d.st.tx_kick_errors += 1                           # the device keeps refusing: later


cdef int xdp_wait_fd(void *dev, uint16_t q) noexcept nogil:
    """The device's own epoll fd, holding the socket only while the PMD sleeps."""
    cdef xdp_dev_t *d = <xdp_dev_t *>dev
    return d.epfd if d.fd >= 0 else -1


cdef void watch(xdp_dev_t *d, bint on) noexcept nogil:
    """The socket into (on) or out of the device's epoll set; under rx_lock. While it is in
    a set, the kernel wakes that set for every frame it copies in (generic XDP signals each
    frame: sock_def_readable, ~4% of the sender's CPU for 64-byte frames): so only while
    the PMD sleeps, as virtio drivers turn interrupts off while they poll."""
    cdef epoll_event ev
    if on and d.fd >= 0 and d.watched != d.fd:
        if d.watched >= 0:
            epoll_ctl(d.epfd, EPOLL_CTL_DEL, d.watched, &ev)
        ev.events = EPOLLIN
        ev.data.fd = d.fd
        d.watched = d.fd if epoll_ctl(d.epfd, EPOLL_CTL_ADD, d.fd, &ev) == 0 else -1
    elif not on and d.watched >= 0:
        epoll_ctl(d.epfd, EPOLL_CTL_DEL, d.watched, &ev)
        d.watched = -1


cdef void xdp_set_notify(void *dev, uint16_t q, bint on) noexcept nogil:
    cdef xdp_dev_t *d = <xdp_dev_t *>dev
    vh_lock(&d.rx_lock)
    d.notify = on
    watch(d, on)
    vh_unlock(&d.rx_lock)


cdef void unmap_umem_rings(xdp_dev_t *d) noexcept:
    """The UMEM's fill and completion rings, mapped from its socket by xsk_umem__create:
    xsk_socket__delete unmaps them, but when xsk_socket__create failed (e.g. the driver
    refused the XDP program, after the socket was bound to the queue) libxdp 1.3 keeps them
    for a next try on the same UMEM, and xsk_umem__delete leaves them mapped: without this
    every refused attempt would leave two mappings of a closed socket behind. (Right after
    a refused attempt a new socket on the queue still gets EBUSY for a moment: the kernel
    releases the old one's hold on the queue asynchronously. Callers retry.)"""
    cdef xdp_mmap_offsets off
    cdef unsigned int n = sizeof(off)
    if getsockopt(xsk_umem__fd(d.umem), SOL_XDP, XDP_MMAP_OFFSETS, &off, &n) != 0:
        return
    if d.fill.ring != NULL:
        munmap(<uint8_t *>d.fill.ring - off.fr.desc, off.fr.desc + d.fill.size * sizeof(uint64_t))
    if d.comp.ring != NULL:
        munmap(<uint8_t *>d.comp.ring - off.cr.desc, off.cr.desc + d.comp.size * sizeof(uint64_t))
    memset(d.ring_room, 0, 128)


cdef void xdp_delete(xdp_dev_t *d) noexcept:
    watch(d, False)                  # before its fd closes (or its number is reused)
    if d.xsk != NULL:
        xsk_socket__delete(d.xsk)
        d.xsk = NULL
    elif d.umem != NULL:
        unmap_umem_rings(d)
    if d.umem != NULL:
        xsk_umem__delete(d.umem)
        d.umem = NULL
    if d.area != NULL:
        munmap(d.area, <size_t>XDP_FRAMES * XDP_FRAME_SIZE)
        d.area = NULL


cdef port_ops_t XDP_OPS
XDP_OPS.rx_burst = xdp_rx_burst
XDP_OPS.tx_burst = xdp_tx_burst
XDP_OPS.wait_fd = xdp_wait_fd
XDP_OPS.set_notify = xdp_set_notify
XDP_OPS.pending = NULL


cdef class AfXdpDev(PortDev):
    """The datapath's view of an AF_XDP socket; starts closed (nothing moves)."""

    def __cinit__(self):
        self.d = <xdp_dev_t *>calloc(1, sizeof(xdp_dev_t))
        if self.d == NULL:
            raise MemoryError()
        self.d.fd = -1
        self.d.watched = -1
        self.d.epfd = epoll_create1(EPOLL_CLOEXEC)
        if self.d.epfd < 0:
            raise OSError(errno, "epoll_create1")
        self.d.fill = <xsk_ring_prod *>(self.d.ring_room)
        self.d.comp = <xsk_ring_cons *>(self.d.ring_room + 64)
        self.d.rx = <xsk_ring_cons *>(self.d.ring_room + 128)
        self.d.tx = <xsk_ring_prod *>(self.d.ring_room + 192)
        self.nqueues = 1
        self.dev = self.d
        self.ops = &XDP_OPS

    def __dealloc__(self):
        if self.d != NULL:
            xdp_delete(self.d)
            if self.d.epfd >= 0:
                close(self.d.epfd)
            free(self.d)

    def open(self, str ifname, int queue=0, str mode="skb"):
        """An AF_XDP socket on ``ifname``'s ``queue`` in copy mode, its XDP program attached
        in ``mode``: "skb" (generic XDP, any interface) or "drv" (the driver's own XDP:
        veth has it, for peers whose MTU fits a page); used from now on. OSError (errno as
        libxdp said) if it cannot be made, and then nothing of it is left (unmap_umem_rings)
        and a new ``open`` starts from a fresh UMEM; for a moment after a refused attempt
        the queue still answers EBUSY (the kernel lets go of it asynchronously)."""
        if mode not in ("skb", "drv"):
            raise ValueError(f"AF_XDP mode {mode!r}: skb or drv")
        cdef xsk_umem_config ucfg
        cdef xsk_socket_config scfg
        cdef uint64_t size = <uint64_t>XDP_FRAMES * XDP_FRAME_SIZE
        cdef uint32_t idx = 0, i
        cdef int r
        cdef bytes name = ifname.encode()
        self.close()
        with nogil:
            vh_lock(&self.d.rx_lock)
            vh_lock(&self.d.tx_lock)
        try:
            # libxdp fills in only some of a ring struct's fields (the completion ring's
            # cached indexes it takes as zero): fresh, zeroed structs for every socket
            memset(self.d.ring_room, 0, sizeof(self.d.ring_room))
            self.d.area = <uint8_t *>mmap(NULL, size, PROT_READ | PROT_WRITE,
                                          MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
            if <void *>self.d.area == MAP_FAILED:
                self.d.area = NULL
                raise MemoryError()
            memset(&ucfg, 0, sizeof(ucfg))
            ucfg.fill_size = RING_SIZE
            ucfg.comp_size = RING_SIZE
            ucfg.frame_size = XDP_FRAME_SIZE
            r = xsk_umem__create(&self.d.umem, self.d.area, size, self.d.fill, self.d.comp,
                                 &ucfg)
            if r:
                self.d.umem = NULL
                raise OSError(-r, f"AF_XDP UMEM: {_strerror(-r)}")
            memset(&scfg, 0, sizeof(scfg))
            scfg.rx_size = RING_SIZE
            scfg.tx_size = RING_SIZE
            scfg.xdp_flags = XDP_FLAGS_SKB_MODE if mode == "skb" else XDP_FLAGS_DRV_MODE
            scfg.bind_flags = XDP_COPY
            r = xsk_socket__create(&self.d.xsk, name, queue, self.d.umem, self.d.rx,
                                   self.d.tx, &scfg)
            if r:
                self.d.xsk = NULL
                raise OSError(-r, f"AF_XDP socket on {ifname} queue {queue} ({mode} mode): "
                                  f"{_strerror(-r)}")
            if xsk_ring_prod__reserve(self.d.fill, RX_FRAMES, &idx) != RX_FRAMES:
                raise OSError(12, "AF_XDP fill ring")
            for i in range(RX_FRAMES):
                xsk_ring_prod__fill_addr(self.d.fill, idx + i)[0] = <uint64_t>i * XDP_FRAME_SIZE
            xsk_ring_prod__submit(self.d.fill, RX_FRAMES)
            self.d.nfree = 0
            for i in range(RX_FRAMES, XDP_FRAMES):
                self.d.free_frames[self.d.nfree] = <uint64_t>i * XDP_FRAME_SIZE
                self.d.nfree += 1
            self.d.fd = xsk_socket__fd(self.d.xsk)
            if self.d.notify:                   # a PMD sleeps on the set: the new socket
                watch(self.d, True)
        except BaseException:
            xdp_delete(self.d)
            raise
        finally:
            vh_unlock(&self.d.tx_lock)
            vh_unlock(&self.d.rx_lock)

    def close(self):
        """No PMD uses the socket after this; libxdp removes its XDP program with it."""
        with nogil:
            vh_lock(&self.d.rx_lock)
            vh_lock(&self.d.tx_lock)
        self.d.fd = -1
        xdp_delete(self.d)
        vh_unlock(&self.d.tx_lock)
        vh_unlock(&self.d.rx_lock)

    @property
    def attached(self):
        return self.d.fd >= 0

    @property
    def wait_fd(self):
        """What a sleeping PMD waits on (-1 when closed): the device's epoll set."""
        return self.d.epfd if self.d.fd >= 0 else -1

    @property
    def fd(self):
        """The AF_XDP socket's fd (-1 when closed), for its kernel statistics."""
        return self.d.fd

    def stats(self):
        cdef xdp_stats_t snapshot = self.d.st
        return snapshot


def _strerror(int code):
    import os
    return os.strerror(code)
