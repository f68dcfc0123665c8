# The tunnel port class (VXLAN, Geneve): frames encapsulated in UDP datagrams that the
# host's own IP stack sends and receives. One receiving socket per (local address, UDP
# port) is shared by every tunnel port on it (TunSocket); each port sends through a few
# sockets of its own (the outer UDP source port: the inner flow's hash picks one).
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t

from pyvhost._port cimport PortDev

cdef enum:
    TUN_VXLAN = 1
    TUN_GENEVE = 2
    TUN_HDR = 8                # the VXLAN header; the Geneve header without options
    TUN_OVERHEAD = 36          # outer IPv4 (20) + UDP (8) + tunnel header (8): MTU - frame
    TUN_MAX_PORTS = 64         # tunnel ports on one receiving socket
    TUN_TX_SOCKS = 8           # sending sockets per port (outer source ports)
    INBOX_SLOTS = 64           # frames one port received for another, waiting for it
    INBOX_SLOT = 16384         # bytes per waiting frame (larger: dropped, drop_too_big)
    # why a datagram was dropped (index into tun_sock_t.drops; names in _tunnel.pyx)
    DROP_SHORT = 0             # shorter than the tunnel header and an Ethernet header
    DROP_VXLAN_FLAGS = 1       # VXLAN: the I (valid VNI) flag is not set
    DROP_VXLAN_RESERVED = 2    # VXLAN: a reserved bit is set
    DROP_GENEVE_VERSION = 3    # Geneve: version is not 0
    DROP_GENEVE_PROTO = 4      # Geneve: the protocol type is not Ethernet (0x6558)
    DROP_GENEVE_CRITICAL = 5   # Geneve: the C flag or a critical option (none understood)
    DROP_GENEVE_OAM = 6        # Geneve: an OAM frame (the O flag): not data
    DROP_GENEVE_OPTS = 7       # Geneve: an option runs past the option length
    DROP_TOO_BIG = 8           # the datagram did not fit a buffer
    DROP_UNKNOWN_REMOTE = 9    # from an address no tunnel port on the socket has
    DROP_UNKNOWN_VNI = 10      # from a known remote, a VNI none of its ports has
    DROP_INBOX_FULL = 11       # for a port whose waiting frames were not taken yet
    N_DROPS = 12

cdef struct tun_dev_stats_t:
    # one port's own counters; TunnelDev.stats() returns them as a dict
    uint64_t rx_geneve_options  # frames with (non-critical) Geneve options: ignored
    uint64_t rx_via_inbox       # frames another port's poll received for this one
    uint64_t rx_csum_partial    # inner checksums left to an offload by the sender: marked
    uint64_t tx_datagrams       # datagrams handed to the kernel
    uint64_t tx_segmented       # TSO super-frames cut into segments before encapsulation
    uint64_t tx_csum            # inner checksums completed before encapsulation
    uint64_t tx_drop_mtu        # frames too large for the underlay MTU
    uint64_t tx_errors          # datagrams the kernel refused (no route, ...)
    uint64_t tx_busy            # datagrams not sent: the socket's buffer was full
    uint64_t tx_no_remote       # flow-based: a frame without tun_dst (set_field) to go to

cdef struct tun_dev_t:
    void *sock                 # the tun_sock_t it receives on
    uint8_t kind
    uint32_t remote            # network order
    uint32_t vni
    uint8_t flow_remote        # remote_ip=flow: any sender; sends to each frame's tun_dst
    uint8_t flow_key           # key=flow: any VNI; sends each frame's tun_id
    uint32_t max_frame         # the largest inner frame the underlay MTU takes
    uint8_t hdr[TUN_HDR]       # the tunnel header it sends (the VNI in it)
    uint8_t dst[16]            # struct sockaddr_in: remote, UDP port
    int ntx
    int tx_fd[TUN_TX_SOCKS]
    int tx_lock
    int wake_fd                # eventfd: a frame waits in the inbox
    int wait_fd                # epoll over the receiving socket and wake_fd
    uint8_t *inbox
    uint32_t inbox_len[INBOX_SLOTS]
    uint32_t inbox_vni[INBOX_SLOTS]       # the tunnel metadata of each waiting frame
    uint32_t inbox_src[INBOX_SLOTS]
    uint32_t inbox_head
    uint32_t inbox_count
    tun_dev_stats_t st

cdef struct tun_sock_t:
    int lock                   # receiving, the inboxes, the port list
    int fd
    uint8_t kind
    uint32_t local             # the address it is bound to (network order; 0: any)
    uint32_t nports
    tun_dev_t *ports[TUN_MAX_PORTS]
    uint64_t datagrams
    uint64_t drops[N_DROPS]


cdef int tun_decap(uint8_t kind, const uint8_t *b, uint32_t n, uint32_t *vni,
                   uint32_t *opts) noexcept nogil


cdef class TunSocket:
    cdef tun_sock_t s


cdef class TunnelDev(PortDev):
    cdef tun_dev_t d
    cdef TunSocket sock_obj
