# cython: language_level=3
"""The tunnel port class of the datapath (VXLAN, Geneve) over the host's own UDP sockets:
the kernel does the outer IP and UDP headers, routing, ARP and fragmentation; here only
the tunnel header and the inner frame. Without the GIL.

Receive: the ports on one (local address, UDP port) share one socket (``TunSocket``);
whichever of them is polled reads a recvmmsg batch straight into packet buffers, checks
each tunnel header strictly (``tun_decap``: every length bounded by what arrived, every
reserved bit, Geneve critical options), and finds the port by the sender's address and
the VNI. Its own frames it returns; another port's it copies into that port's inbox and
wakes it (each port's wait fd is an epoll over the shared socket and its inbox eventfd).
Every dropped datagram is counted by reason on the socket.

Send: checksum and TSO the inner frame asked for are done first (_offload's helpers); a
frame the underlay MTU cannot take is dropped and counted; the rest go out in sendmmsg
batches through one of the port's sending sockets, picked by the inner flow's hash, so
the outer UDP source port follows the flow (entropy for ECMP), as the kernel's VXLAN
does with its source port range.

The control plane (switch/tunnel.py) opens, configures and closes the sockets; this
module only reads and writes them. It knows no bridges, no rules, no port names.
"""

from libc.errno cimport EAGAIN, EINTR, EMSGSIZE, ENOBUFS, errno
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memset
from posix.unistd cimport close
from posix.uio cimport iovec

from pyvhost._flow cimport flow_extract, flow_key_t
from pyvhost._idle cimport (
    EFD_CLOEXEC, EFD_NONBLOCK, EPOLL_CLOEXEC, EPOLL_CTL_ADD, EPOLLIN, epoll_create1, epoll_ctl,
    epoll_event, eventfd,
)
from pyvhost._offload cimport MAX_SEGS, csum_complete, tso_parse, tso_segment, tso_t
from pyvhost._pktpool cimport PacketPool, pkt_t, pktpool_t, pool_get, pool_put, pool_put_many
from pyvhost._port cimport port_ops_t, tx_result_t
from pyvhost._sockets cimport MSG_DONTWAIT, MSG_TRUNC, mmsghdr, recvmmsg, sendmmsg
from pyvhost._vring cimport (
    MAX_BURST, vh_eventfd_drain, vh_eventfd_signal, vh_lock, vh_trylock, vh_unlock,
)

cdef enum:
    ETH_HLEN = 14
    GENEVE_ETH = 0x6558
    SOCKADDR_IN = 16
    TX_CHUNK = MAX_BURST

DROP_NAMES = ("drop_short", "drop_vxlan_flags", "drop_vxlan_reserved",
              "drop_geneve_version", "drop_geneve_proto", "drop_geneve_critical",
              "drop_geneve_oam", "drop_geneve_opts", "drop_too_big", "drop_unknown_remote",
              "drop_unknown_vni", "drop_inbox_full")
KINDS = {"vxlan": TUN_VXLAN, "geneve": TUN_GENEVE}


cdef inline uint32_t rd24(const uint8_t *p) noexcept nogil:
    return (<uint32_t>p[0] << 16) | (<uint32_t>p[1] << 8) | p[2]


cdef int tun_decap(uint8_t kind, const uint8_t *b, uint32_t n, uint32_t *vni,
                   uint32_t *opts) noexcept nogil:
    """The tunnel header at ``b`` (``n`` bytes arrived): its length (the inner frame
    follows), the VNI in ``*vni`` and the Geneve option bytes in ``*opts``; or -1 - the
    DROP_* reason. Reads nothing at or past ``b + n``."""
    cdef uint32_t hlen, off, olen
    opts[0] = 0
    if n < TUN_HDR + ETH_HLEN:
        return -1 - DROP_SHORT
    if kind == TUN_VXLAN:
        # flags (I = 0x08) | 24 reserved bits | VNI (24 bits) | 8 reserved bits
        if not b[0] & 0x08:
            return -1 - DROP_VXLAN_FLAGS
        if b[0] != 0x08 or b[1] or b[2] or b[3] or b[7]:
            return -1 - DROP_VXLAN_RESERVED
        vni[0] = rd24(b + 4)
        return TUN_HDR
    # Geneve: Ver(2) OptLen(6) | O C Rsvd(6) | Protocol Type(16) | VNI(24) | Rsvd(8)
    if b[0] >> 6 != 0:
        return -1 - DROP_GENEVE_VERSION
    olen = (b[0] & 0x3F) * 4
    hlen = TUN_HDR + olen
    if n < hlen + ETH_HLEN:
        return -1 - DROP_SHORT
    if b[1] & 0x40:
        return -1 - DROP_GENEVE_CRITICAL
    if b[1] & 0x80:
        return -1 - DROP_GENEVE_OAM
    if ((<uint32_t>b[2] << 8) | b[3]) != GENEVE_ETH:
        return -1 - DROP_GENEVE_PROTO
    off = TUN_HDR
    while off < hlen:                  # TLVs: class(16) type(8) rsvd(3) len(5) data
        if off + 4 > hlen or off + 4 + (b[off + 3] & 0x1F) * 4 > hlen:
            return -1 - DROP_GENEVE_OPTS
        if b[off + 2] & 0x80:
            return -1 - DROP_GENEVE_CRITICAL
        off += 4 + (b[off + 3] & 0x1F) * 4
    vni[0] = rd24(b + 4)
    opts[0] = olen
    return hlen


cdef inline uint16_t rd16(const uint8_t *p) noexcept nogil:
    return (<uint16_t>p[0] << 8) | p[1]


cdef bint mark_partial(pkt_t *p) noexcept nogil:
    """An inner TCP/UDP checksum field that holds only the pseudo-header sum (a sender
    whose kernel left the checksum to an offload: CHECKSUM_PARTIAL over veth arrives at
    a UDP socket like that) gets a NEEDS_CSUM virtio-net header, so whoever takes the
    frame completes it. Safe for a complete checksum that happens to equal that sum:
    completing it gives the same value. True if marked."""
    cdef const uint8_t *d = p.data
    cdef uint32_t l3, l4, l4len, sum_ = 0, i, nwords, field_at
    cdef uint8_t proto
    if p.len < 14 + 20:
        return False
    l3 = 14
    if rd16(d + 12) == 0x0800:
        if d[l3] >> 4 != 4 or (rd16(d + l3 + 6) & 0x3FFF) != 0:    # a fragment: no
            return False
        l4 = l3 + (d[l3] & 0x0F) * 4
        if l4 < l3 + 20 or rd16(d + l3 + 2) < l4 - l3:
            return False
        l4len = rd16(d + l3 + 2) - (l4 - l3)
        proto = d[l3 + 9]
        i = l3 + 12
        nwords = 4
    elif rd16(d + 12) == 0x86DD:
        if p.len < 14 + 40 or d[l3] >> 4 != 6:
            return False
        l4 = l3 + 40
        l4len = rd16(d + l3 + 4)
        proto = d[l3 + 6]
        i = l3 + 8
        nwords = 16
    else:
        return False
    if proto == 6:
        field_at = l4 + 16
    elif proto == 17:
        field_at = l4 + 6
    else:
        return False
    if field_at + 2 > p.len or l4 + l4len > p.len or l4len < field_at + 2 - l4:
        return False
    while nwords:
        sum_ += rd16(d + i)
        i += 2
        nwords -= 1
    sum_ += proto + l4len
    while sum_ >> 16:
        sum_ = (sum_ & 0xFFFF) + (sum_ >> 16)
    if rd16(d + field_at) != sum_:
        return False
    p.len = l4 + l4len                       # Ethernet padding is not summed
    p.vnet_hdr[0] = 1                        # VIRTIO_NET_HDR_F_NEEDS_CSUM
    p.vnet_hdr[6] = l4 & 0xFF
    p.vnet_hdr[7] = l4 >> 8
    p.vnet_hdr[8] = field_at - l4
    p.vnet_hdr[9] = 0
    return True


cdef tun_dev_t *find_port(tun_sock_t *s, uint32_t remote, uint32_t vni,
                          int *reason) noexcept nogil:
    """The port for a datagram from ``remote`` with ``vni``: the most specific one (fixed
    remote and key, then fixed remote with key=flow, then remote_ip=flow with its key,
    then both flow)."""
    cdef uint32_t i
    cdef int score, best_score = -1
    cdef tun_dev_t *d
    cdef tun_dev_t *best = NULL
    reason[0] = DROP_UNKNOWN_REMOTE
    for i in range(s.nports):
        d = s.ports[i]
        if not d.flow_remote and d.remote != remote:
            continue
        if not d.flow_key and d.vni != vni:
            reason[0] = DROP_UNKNOWN_VNI
            continue
        score = (0 if d.flow_remote else 2) + (0 if d.flow_key else 1)
        if score > best_score:
            best, best_score = d, score
    return best


cdef void inbox_put(tun_sock_t *s, tun_dev_t *d, const uint8_t *frame,
                    uint32_t n, uint32_t vni, uint32_t remote) noexcept nogil:
    cdef uint32_t slot
    if n > INBOX_SLOT:
        s.drops[DROP_TOO_BIG] += 1
        return
    if d.inbox_count == INBOX_SLOTS:
        s.drops[DROP_INBOX_FULL] += 1
        return
    slot = (d.inbox_head + d.inbox_count) % INBOX_SLOTS
    memcpy(d.inbox + <uint64_t>slot * INBOX_SLOT, frame, n)
    d.inbox_len[slot] = n
    d.inbox_vni[slot] = vni
    d.inbox_src[slot] = remote
    d.inbox_count += 1
    vh_eventfd_signal(d.wake_fd)


cdef uint32_t tun_rx_burst(void *dev, uint16_t q, pktpool_t *pool, pkt_t **pkts,
                           uint32_t count) noexcept nogil:
    cdef tun_dev_t *d = <tun_dev_t *>dev
    cdef tun_sock_t *s = <tun_sock_t *>d.sock
    cdef tun_dev_t *to
    cdef mmsghdr msgs[MAX_BURST]
    cdef iovec iov[MAX_BURST]
    cdef uint8_t names[MAX_BURST][SOCKADDR_IN]
    cdef pkt_t *bufs[MAX_BURST]
    cdef uint32_t n = 0, m = 0, i, vni, opts, remote, got
    cdef int r, hl, reason
    cdef pkt_t *p
    if s == NULL or not vh_trylock(&s.lock):
        return 0
    if d.sock == NULL:                          # detached while we waited
        vh_unlock(&s.lock)
        return 0
    while d.inbox_count and n < count:          # what another port's poll read for us
        p = pool_get(pool)
        if p == NULL:
            break
        if d.inbox_len[d.inbox_head] > p.cap:      # this PMD's buffers are smaller
            s.drops[DROP_TOO_BIG] += 1
            d.inbox_head = (d.inbox_head + 1) % INBOX_SLOTS
            d.inbox_count -= 1
            pool_put(pool, p)
            continue
        p.len = d.inbox_len[d.inbox_head]
        memcpy(p.data, d.inbox + <uint64_t>d.inbox_head * INBOX_SLOT, p.len)
        p.tun_id = d.inbox_vni[d.inbox_head]
        p.tun_src = d.inbox_src[d.inbox_head]
        p.tun_dst = s.local
        d.inbox_head = (d.inbox_head + 1) % INBOX_SLOTS
        d.inbox_count -= 1
        d.st.rx_via_inbox += 1
        if mark_partial(p):
            d.st.rx_csum_partial += 1
        pkts[n] = p
        n += 1
    if d.inbox_count == 0:
        vh_eventfd_drain(d.wake_fd)
    while m < count - n and m < MAX_BURST:
        p = pool_get(pool)
        if p == NULL:
            break
        bufs[m] = p
        m += 1
    if m == 0 or s.fd < 0:
        pool_put_many(pool, bufs, m)
        vh_unlock(&s.lock)
        return n
    memset(msgs, 0, sizeof(mmsghdr) * m)
    for i in range(m):
        iov[i].iov_base = bufs[i].data
        iov[i].iov_len = bufs[i].cap
        msgs[i].msg_hdr.msg_iov = &iov[i]
        msgs[i].msg_hdr.msg_iovlen = 1
        msgs[i].msg_hdr.msg_name = names[i]
        msgs[i].msg_hdr.msg_namelen = SOCKADDR_IN
    r = recvmmsg(s.fd, msgs, m, MSG_DONTWAIT, NULL)
    got = <uint32_t>r if r > 0 else 0
    for i in range(got):
        p = bufs[i]
        s.datagrams += 1
        if msgs[i].msg_hdr.msg_flags & MSG_TRUNC or msgs[i].msg_len > p.cap:
            s.drops[DROP_TOO_BIG] += 1
            pool_put(pool, p)
            continue
        hl = tun_decap(s.kind, p.data, msgs[i].msg_len, &vni, &opts)
        if hl < 0:
            s.drops[-1 - hl] += 1
            pool_put(pool, p)
            continue
        memcpy(&remote, names[i] + 4, 4)        # sin_addr, network order
        to = find_port(s, remote, vni, &reason)
        if to == NULL:
            s.drops[reason] += 1
            pool_put(pool, p)
            continue
        if opts:
            to.st.rx_geneve_options += 1
        if to == d and n < count:
            p.data += hl
            p.len = msgs[i].msg_len - hl
            p.cap -= hl
            p.tun_id = vni
            p.tun_src = remote
            p.tun_dst = s.local
            if mark_partial(p):
                d.st.rx_csum_partial += 1
            pkts[n] = p
            n += 1
        else:
            inbox_put(s, to, p.data + hl, msgs[i].msg_len - hl, vni, remote)
            pool_put(pool, p)
    for i in range(got, m):
        pool_put(pool, bufs[i])
    vh_unlock(&s.lock)
    return n


cdef uint32_t send_all(tun_dev_t *d, int fd, pkt_t **pkts, uint32_t n,
                       uint64_t *bytes_, uint32_t *refused) noexcept nogil:
    """Encapsulate and send ``pkts`` through ``fd``: how many went out (``refused``: how
    many the kernel refused, not counting those a busy socket left)."""
    cdef mmsghdr msgs[TX_CHUNK]
    cdef iovec iov[2 * TX_CHUNK]
    cdef uint8_t hdrs[TX_CHUNK][TUN_HDR]
    cdef uint8_t names[TX_CHUNK][SOCKADDR_IN]
    cdef uint32_t i, m, done = 0, sent = 0, vni
    cdef int r
    cdef pkt_t *p
    while done < n:
        m = n - done if n - done < TX_CHUNK else TX_CHUNK
        memset(msgs, 0, sizeof(mmsghdr) * m)
        for i in range(m):
            p = pkts[done + i]
            iov[2 * i].iov_base = d.hdr
            msgs[i].msg_hdr.msg_name = d.dst
            if d.flow_key:                        # each frame's own VNI
                memcpy(hdrs[i], d.hdr, TUN_HDR)
                vni = p.tun_id
                hdrs[i][4] = (vni >> 16) & 0xFF
                hdrs[i][5] = (vni >> 8) & 0xFF
                hdrs[i][6] = vni & 0xFF
                iov[2 * i].iov_base = hdrs[i]
            if d.flow_remote:                     # and its own destination
                memcpy(names[i], d.dst, SOCKADDR_IN)
                memcpy(names[i] + 4, &p.tun_dst, 4)
                msgs[i].msg_hdr.msg_name = names[i]
            iov[2 * i].iov_len = TUN_HDR
            iov[2 * i + 1].iov_base = p.data
            iov[2 * i + 1].iov_len = p.len
            msgs[i].msg_hdr.msg_iov = &iov[2 * i]
            msgs[i].msg_hdr.msg_iovlen = 2
            msgs[i].msg_hdr.msg_namelen = SOCKADDR_IN
        r = sendmmsg(fd, msgs, m, MSG_DONTWAIT)
        if r > 0:
            for i in range(<uint32_t>r):
                bytes_[0] += pkts[done + i].len
            sent += r
            done += r
            continue
        if r < 0 and (errno == EAGAIN or errno == ENOBUFS or errno == EINTR):
            d.st.tx_busy += n - done
            break
        if r < 0 and errno == EMSGSIZE:       # the route's MTU is smaller than we knew
            d.st.tx_drop_mtu += 1
        else:
            d.st.tx_errors += 1
        refused[0] += 1
        done += 1                               # that one is refused; go on after it
    d.st.tx_datagrams += sent
    return sent


cdef inline int pick_fd(tun_dev_t *d, pkt_t *p) noexcept nogil:
    cdef flow_key_t k
    if d.ntx == 1:
        return d.tx_fd[0]
    return d.tx_fd[flow_extract(p, 0, &k, True) % <uint32_t>d.ntx]


cdef bint send_segmented(tun_dev_t *d, pktpool_t *pool, pkt_t *p, uint64_t *bytes_) noexcept nogil:
    """A TSO super-frame cut into MSS segments, each checked against the MTU and sent."""
    cdef tso_t t
    cdef pkt_t *segs[MAX_SEGS]
    cdef uint32_t first = 0, nseg, k
    cdef int fd
    cdef uint64_t ignored = 0
    cdef uint32_t ignored_refused = 0
    if not tso_parse(p, &t):
        return False
    if t.hlen + t.mss > d.max_frame:
        d.st.tx_drop_mtu += 1
        return False
    fd = pick_fd(d, p)
    while True:
        nseg = tso_segment(p, &t, first, pool, segs)
        if nseg == 0:
            break
        for k in range(nseg):                   # the segments go where the frame goes
            segs[k].tun_id = p.tun_id
            segs[k].tun_dst = p.tun_dst
        k = send_all(d, fd, segs, nseg, &ignored, &ignored_refused)
        pool_put_many(pool, segs, nseg)
        if k < nseg:
            return False
        first += nseg
    if first == 0 or first * t.mss < t.payload:
        return False
    d.st.tx_segmented += 1
    bytes_[0] += p.len
    return True


cdef uint32_t tun_tx_burst(void *dev, uint32_t hint, pktpool_t *pool, pkt_t **pkts,
                           uint32_t n, tx_result_t *res) noexcept nogil:
    cdef tun_dev_t *d = <tun_dev_t *>dev
    cdef pkt_t *ready[TX_CHUNK]
    cdef int fds[TX_CHUNK]
    cdef pkt_t *group[TX_CHUNK]
    cdef uint32_t i, j, k, nready = 0, ngroup, sent = 0
    cdef int fd
    cdef pkt_t *p
    vh_lock(&d.tx_lock)
    if d.ntx == 0:                                  # detached
        vh_unlock(&d.tx_lock)
        return 0
    i = 0
    while i <= n:
        if i == n or nready == TX_CHUNK:            # send what is ready, one socket at a time
            for j in range(nready):
                if ready[j] == NULL:
                    continue
                fd = fds[j]
                ngroup = 0
                for k in range(j, nready):
                    if ready[k] != NULL and fds[k] == fd:
                        group[ngroup] = ready[k]
                        ngroup += 1
                        ready[k] = NULL
                sent += send_all(d, fd, group, ngroup, &res.bytes, &res.refused)
            nready = 0
            if i == n:
                break
        p = pkts[i]
        i += 1
        if d.flow_remote and p.tun_dst == 0:        # nowhere to send it
            d.st.tx_no_remote += 1
            res.refused += 1
            continue
        if p.vnet_hdr[1] != 0:                      # TSO: segments, each complete
            if send_segmented(d, pool, p, &res.bytes):
                sent += 1
            else:
                res.failed += 1
            continue
        if p.vnet_hdr[0] & 1:                       # NEEDS_CSUM
            if not csum_complete(p):
                res.refused += 1
                continue
            d.st.tx_csum += 1
        if p.len > d.max_frame:
            d.st.tx_drop_mtu += 1
            res.refused += 1
            continue
        ready[nready] = p
        fds[nready] = pick_fd(d, p)
        nready += 1
    vh_unlock(&d.tx_lock)
    return sent


cdef int tun_wait_fd(void *dev, uint16_t q) noexcept nogil:
    return (<tun_dev_t *>dev).wait_fd


cdef bint tun_pending(void *dev, uint16_t q) noexcept nogil:
    return (<tun_dev_t *>dev).inbox_count != 0


cdef port_ops_t TUN_OPS
TUN_OPS.rx_burst = tun_rx_burst
TUN_OPS.tx_burst = tun_tx_burst
TUN_OPS.wait_fd = tun_wait_fd
TUN_OPS.set_notify = NULL            # the socket and the eventfd are readable while work waits
TUN_OPS.pending = tun_pending


cdef class TunSocket:
    """One receiving UDP socket (borrowed fd: the caller keeps it open until every port
    on it is detached) and the tunnel ports that share it."""

    def __init__(self, str kind, int fd, bytes local=bytes(4)):
        if kind not in KINDS:
            raise ValueError(f"tunnel type {kind!r} (have: {', '.join(KINDS)})")
        if fd < 0 or len(local) != 4:
            raise ValueError("a tunnel socket needs an open fd (and an IPv4 local address)")
        self.s.kind = KINDS[kind]
        self.s.fd = fd
        memcpy(&self.s.local, <const char *>local, 4)     # tun_dst of what it receives

    @property
    def nports(self):
        return self.s.nports

    def stats(self):
        """The socket's counters: datagrams read and the drops by reason."""
        out = {"datagrams": self.s.datagrams}
        for i, name in enumerate(DROP_NAMES):
            out[name] = self.s.drops[i]
        return out


cdef class TunnelDev(PortDev):
    """The datapath's view of one tunnel port: it receives through ``sock`` (attached at
    once) and sends through ``tx_fds`` (borrowed; kept open by the caller until
    ``detach``) to ``remote`` (an IPv4 address as 4 bytes; None: remote_ip=flow, each
    frame's tun_dst) and ``dst_port`` with ``vni`` (-1: key=flow, each frame's tun_id)."""

    def __cinit__(self):
        self.d.wake_fd = -1
        self.d.wait_fd = -1

    def __init__(self, TunSocket sock, remote, int dst_port, long vni, list tx_fds,
                 int max_frame):
        cdef epoll_event ev
        cdef int fd
        cdef tun_dev_t *other
        if remote is None:
            self.d.flow_remote = 1
            remote = bytes(4)
        if vni == -1:
            self.d.flow_key = 1
            vni = 0
        if len(remote) != 4 or not 0 < dst_port < 65536 or not 0 <= vni < 1 << 24:
            raise ValueError("a tunnel port needs an IPv4 remote, a UDP port and a 24-bit VNI")
        if not 1 <= len(tx_fds) <= TUN_TX_SOCKS or any(f < 0 for f in tx_fds):
            raise ValueError(f"1 to {TUN_TX_SOCKS} open sending sockets")
        self.sock_obj = sock
        self.per_remote = self.d.flow_remote or self.d.flow_key   # NORMAL learns remotes
        self.d.kind = sock.s.kind
        memcpy(&self.d.remote, <const char *>remote, 4)
        self.d.vni = vni
        self.set_max_frame(max_frame)
        self.d.ntx = len(tx_fds)
        for i, fd in enumerate(tx_fds):
            self.d.tx_fd[i] = fd
        self.d.hdr[0] = 0x08 if self.d.kind == TUN_VXLAN else 0
        if self.d.kind == TUN_GENEVE:
            self.d.hdr[2] = GENEVE_ETH >> 8
            self.d.hdr[3] = GENEVE_ETH & 0xFF
        self.d.hdr[4] = (vni >> 16) & 0xFF
        self.d.hdr[5] = (vni >> 8) & 0xFF
        self.d.hdr[6] = vni & 0xFF
        self.d.dst[0] = 2                          # AF_INET, little-endian sa_family_t
        self.d.dst[2] = dst_port >> 8
        self.d.dst[3] = dst_port & 0xFF
        memcpy(self.d.dst + 4, <const char *>remote, 4)
        self.d.inbox = <uint8_t *>malloc(<size_t>INBOX_SLOTS * INBOX_SLOT)
        self.d.wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
        self.d.wait_fd = epoll_create1(EPOLL_CLOEXEC)
        if self.d.inbox == NULL or self.d.wake_fd < 0 or self.d.wait_fd < 0:
            raise MemoryError("a tunnel port's inbox, eventfd or epoll")
        for fd in (sock.s.fd, self.d.wake_fd):
            ev.events = EPOLLIN
            ev.data.fd = fd
            if epoll_ctl(self.d.wait_fd, EPOLL_CTL_ADD, fd, &ev) != 0:
                raise OSError(errno, "epoll_ctl on a tunnel port's fds")
        self.nqueues = 1
        self.dev = &self.d
        self.ops = &TUN_OPS
        with nogil:
            vh_lock(&sock.s.lock)
        try:
            for i in range(sock.s.nports):
                other = sock.s.ports[i]
                if other.flow_remote == self.d.flow_remote and \
                        other.flow_key == self.d.flow_key and \
                        (self.d.flow_remote or other.remote == self.d.remote) and \
                        (self.d.flow_key or other.vni == vni):
                    raise ValueError("a tunnel port with this remote and key exists on "
                                     "the socket")
            if sock.s.nports == TUN_MAX_PORTS:
                raise ValueError(f"at most {TUN_MAX_PORTS} tunnel ports on one socket")
            sock.s.ports[sock.s.nports] = &self.d
            sock.s.nports += 1
            self.d.sock = &sock.s
        finally:
            vh_unlock(&sock.s.lock)

    def set_max_frame(self, int max_frame):
        """The largest inner frame to send (the underlay MTU minus TUN_OVERHEAD)."""
        if not ETH_HLEN <= max_frame <= 65535:
            raise ValueError(f"max frame {max_frame} out of range")
        self.d.max_frame = max_frame

    def detach(self):
        """Off the shared socket: no poll reads for this port after this returns, and no
        send uses its sending sockets (the caller may close them then)."""
        cdef tun_sock_t *s = <tun_sock_t *>self.d.sock
        cdef uint32_t i, j
        if s == NULL:
            return
        with nogil:
            vh_lock(&s.lock)
            vh_lock(&self.d.tx_lock)
        for i in range(s.nports):
            if s.ports[i] == &self.d:
                for j in range(i + 1, s.nports):
                    s.ports[j - 1] = s.ports[j]
                s.nports -= 1
                break
        self.d.sock = NULL
        self.d.ntx = 0
        vh_unlock(&self.d.tx_lock)
        vh_unlock(&s.lock)

    def __dealloc__(self):
        if self.d.sock != NULL:
            self.detach()
        if self.d.wake_fd >= 0:
            close(self.d.wake_fd)
        if self.d.wait_fd >= 0:
            close(self.d.wait_fd)
        free(self.d.inbox)

    @property
    def max_frame(self):
        return self.d.max_frame

    def stats(self):
        cdef tun_dev_stats_t snapshot = self.d.st
        return snapshot


def partial_checksum(bytes frame):
    """The virtio-net header the receive path gives ``frame`` (tests, tools): 12 zero
    bytes, or NEEDS_CSUM with its start and offset when the L4 checksum field holds only
    the pseudo-header sum."""
    pool_obj = PacketPool(1, 65600)
    cdef pktpool_t *pool = (<PacketPool>pool_obj).pool
    cdef pkt_t *p = pool_get(pool)
    cdef uint32_t n = len(frame)
    if n > p.cap:
        pool_put(pool, p)
        raise ValueError("frame larger than a packet buffer")
    memcpy(p.data, <const char *>frame, n)
    p.len = n
    mark_partial(p)
    out = (<char *>p.vnet_hdr)[:12]
    pool_put(pool, p)
    return out


def decap(str kind, bytes datagram):
    """Check one datagram's tunnel header as the receive path does (tests, tools):
    (vni, option bytes, inner frame), or the name of the reason it is dropped."""
    cdef uint32_t vni = 0, opts = 0
    cdef int hl
    cdef uint8_t *copy
    cdef uint32_t n = len(datagram)
    if kind not in KINDS:
        raise ValueError(f"tunnel type {kind!r} (have: {', '.join(KINDS)})")
    copy = <uint8_t *>malloc(n if n else 1)     # exactly its bytes: ASan sees any overread
    if copy == NULL:
        raise MemoryError()
    memcpy(copy, <const char *>datagram, n)
    hl = tun_decap(KINDS[kind], copy, n, &vni, &opts)
    free(copy)
    if hl < 0:
        return DROP_NAMES[-1 - hl]
    return vni, opts, datagram[hl:]
