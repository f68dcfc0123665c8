# The afxdp port class: an existing interface's queue through an AF_XDP socket (libxdp's
# xsk API: a UMEM with fill/completion rings, RX and TX rings), copy mode where only that
# is possible (veth). No virtio-net headers: frames leave complete (_offload helpers).
from libc.stdint cimport uint8_t, uint32_t, uint64_t

from pyvhost._port cimport PortDev

cdef extern from "<xdp/xsk.h>" nogil:
    struct xsk_ring_prod:
        uint32_t size
        void *ring
    struct xsk_ring_cons:
        uint32_t size
        void *ring
    struct xsk_umem:
        pass
    struct xsk_socket:
        pass

cdef enum:
    XDP_FRAMES = 4096         # UMEM frames: half for receiving, half for sending
    XDP_FRAME_SIZE = 4096

cdef struct xdp_stats_t:
    # the socket's own counters; AfXdpDev.stats() returns this struct as a dict
    uint64_t rx_oversize      # frames larger than a packet buffer: dropped
    uint64_t rx_no_buffer     # frames received while the PMD's packet pool was empty: dropped
    uint64_t tx_oversize      # frames larger than a UMEM frame (and not TSO): dropped
    uint64_t tx_segmented     # TSO super-frames cut into segments here
    uint64_t tx_csum          # partial checksums completed here
    uint64_t tx_errors        # frames that could not be finished or sent
    uint64_t tx_down          # frames not sent: detached (the interface is gone)
    uint64_t tx_kicks         # sendto() calls that had the kernel send from the TX ring
    uint64_t tx_kick_errors   # kicks that left frames in the ring (an error, or no end)

cdef struct xdp_dev_t:
    int rx_lock
    int tx_lock
    int fd                    # -1: detached
    int epfd                  # the wait fd: an epoll set holding fd while a PMD sleeps
    int watched               # the socket fd in epfd (-1: none)
    int notify                # a PMD sleeps on epfd (set_notify on): new sockets join it
    uint8_t *area             # the UMEM
    xsk_umem *umem
    xsk_socket *xsk
    xsk_ring_prod *fill
    xsk_ring_cons *comp
    xsk_ring_cons *rx
    xsk_ring_prod *tx
    uint32_t nfree            # TX frames not in flight
    uint64_t free_frames[XDP_FRAMES]
    uint8_t ring_room[256]    # the four ring structs (opaque to Cython) live here
    xdp_stats_t st


cdef class AfXdpDev(PortDev):
    cdef xdp_dev_t *d
