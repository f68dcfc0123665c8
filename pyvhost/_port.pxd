# The port class of the compiled datapath: what every port type (vhost-user, internal/tap,
# afpacket, ...) supplies, as DPDK's eth_dev_ops or OVS's netdev_class do. The PMD loop,
# the flow caches, QoS and the counters call these and never ask which type a port is.
# Declarations only: each type implements them in a module of its own.
from libc.stdint cimport uint16_t, uint32_t, uint64_t

from pyvhost._pktpool cimport pkt_t, pktpool_t

cdef struct tx_result_t:
    uint32_t failed           # frames that could not be made ready (software offloads)
    uint32_t refused          # frames the device refused (too large, a send error)
    uint64_t bytes            # bytes of the delivered frames
    uint32_t onecopy          # of the delivered, frames copied straight from a sender's memory

# receive at most ``count`` frames from queue ``q`` into ``pkts`` (buffers from ``pool``);
# returns how many. Never blocks; may return 0 when another thread holds the queue.
ctypedef uint32_t (*rx_burst_fn)(void *dev, uint16_t q, pktpool_t *pool, pkt_t **pkts,
                                 uint32_t count) noexcept nogil
# send ``pkts`` (the caller keeps and frees them); ``hint`` picks the queue (a PMD's id);
# returns how many were delivered, in order (the rest found no room or failed, see res).
ctypedef uint32_t (*tx_burst_fn)(void *dev, uint32_t hint, pktpool_t *pool, pkt_t **pkts,
                                 uint32_t n, tx_result_t *res) noexcept nogil
# one-copy forwarding (NULL: the class cannot): rx_burst, except that a frame may keep its
# tail in the sender's memory (pkt.ext_len, pkt.ext: see _vring.vq_dequeue_ref) and nothing
# goes back to the sender until rx_complete(dev, q), which the caller must call, in the same
# thread, after every rx_burst_ref that returned frames, once they are sent or freed (one
# that returned 0 holds nothing); rx_complete in a thread that holds no burst of the queue
# (another PMD polling it for a moment while it moves) does nothing
ctypedef void (*rx_complete_fn)(void *dev, uint16_t q) noexcept nogil
# the fd that becomes readable when queue ``q`` has work (for epoll in the idle path), -1
ctypedef int (*wait_fd_fn)(void *dev, uint16_t q) noexcept nogil
# notifications on (before sleeping) / off (while polling); NULL when not needed
ctypedef void (*set_notify_fn)(void *dev, uint16_t q, bint on) noexcept nogil
# work waiting that the wait fd may not show (checked after notifications are on); or NULL
ctypedef bint (*pending_fn)(void *dev, uint16_t q) noexcept nogil
# hints only (NULL: none): start loading the lines the next tx_burst with ``hint`` reads
# first. The PMD calls it when a burst queues its first frame for the port, so those
# misses (lines the peer writes on its own core) overlap the burst's other frames' work
# instead of starting when the batch is sent. Reads no peer memory, never faults.
ctypedef void (*tx_prefetch_fn)(void *dev, uint32_t hint) noexcept nogil

cdef struct port_ops_t:
    rx_burst_fn rx_burst
    tx_burst_fn tx_burst
    wait_fd_fn wait_fd
    set_notify_fn set_notify
    pending_fn pending
    rx_burst_fn rx_burst_ref         # NULL: not offered
    rx_complete_fn rx_complete
    tx_prefetch_fn tx_prefetch
    int tx_ref                       # tx_burst takes frames whose tail is in a sender's
                                     # memory (0: the caller materializes them first)

cdef struct rxq_src_t:        # one polled queue, for the idle path (ops NULL: none)
    const port_ops_t *ops
    void *dev
    uint16_t q


cdef class PortDev:
    """A port's device as the datapath sees it: its class (ops) and its state (dev).
    Subclasses (one module per type) set both; the object keeps ``dev`` alive."""
    cdef const port_ops_t *ops
    cdef void *dev
    cdef readonly int nqueues
    # 1: one port for many remotes (a flow-based tunnel port): it sends each frame to the
    # frame's tun_dst with its tun_id, so NORMAL learns the remote of each MAC seen on it
    # and a flood sends a copy to each remote learned (the switch sets both)
    cdef readonly int per_remote
