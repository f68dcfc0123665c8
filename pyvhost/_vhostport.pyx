# cython: language_level=3
"""The vhost-user port class of the datapath: receive = dequeue from the guest's TX ring,
send = enqueue into its RX ring (with the offloads it did not agree to done in software,
_offload), wait fd = the TX ring's kick eventfd, notifications = the ring's flags. Per
queue locks as the rings define them. One-copy forwarding: receive by reference
(vq_dequeue_ref) keeps the TX ring locked from the burst to rx_complete, so no memory table
can change under the frames' tails; send takes such frames (vq_enqueue copies the tail
straight from the sender's buffers). Knows nothing of the vhost-user protocol or sockets.
"""

from libc.stdint cimport uint16_t, uint32_t, uint64_t

from pyvhost._offload cimport offload_send
from pyvhost._pktpool cimport PacketPool, pkt_t, pktpool_t, pool_put_many
from pyvhost._port cimport port_ops_t, tx_result_t
from pyvhost._vring cimport (
    MAX_BURST, VirtQueue, vh_lock, vh_prefetch, vh_trylock, vh_unlock, vq_dequeue, vq_dequeue_ref,
    vq_rx_complete, vq_t,
)

cdef extern from *:
    """
    #include <pthread.h>
    static inline uint64_t vh_thread_id(void) { return (uint64_t)pthread_self(); }
    static inline uint64_t vh_owner_load(const uint64_t *p)
    { return __atomic_load_n(p, __ATOMIC_RELAXED); }
    static inline void vh_owner_store(uint64_t *p, uint64_t v)
    { __atomic_store_n(p, v, __ATOMIC_RELAXED); }
    """
    uint64_t vh_thread_id() nogil
    uint64_t vh_owner_load(const uint64_t *p) nogil
    void vh_owner_store(uint64_t *p, uint64_t v) nogil


cdef inline vq_t *rx_ring_locked(void *dev, uint16_t q) noexcept nogil:
    """Queue ``q``'s TX ring, locked; NULL when there is none or another thread has it."""
    cdef vhost_dev_t *d = <vhost_dev_t *>dev
    cdef vq_t *vq
    if q >= d.nqueues:
        return NULL
    vq = d.guest_tx[q]
    return vq if vh_trylock(&vq.lock) else NULL


cdef uint32_t vhost_rx_burst(void *dev, uint16_t q, pktpool_t *pool, pkt_t **pkts,
                             uint32_t count) noexcept nogil:
    cdef vq_t *vq = rx_ring_locked(dev, q)
    cdef uint32_t n
    if vq == NULL:
        return 0
    n = vq_dequeue(vq, pool, pkts, count if count < MAX_BURST else MAX_BURST)
    vh_unlock(&vq.lock)
    return n


cdef uint32_t vhost_rx_burst_ref(void *dev, uint16_t q, pktpool_t *pool, pkt_t **pkts,
                                 uint32_t count) noexcept nogil:
    """Receive by reference: the ring stays locked until vhost_rx_complete while any frame
    of the burst keeps its tail in the guest's buffers."""
    cdef vq_t *vq = rx_ring_locked(dev, q)
    cdef uint32_t n
    if vq == NULL:
        return 0
    n = vq_dequeue_ref(vq, pool, pkts, count if count < MAX_BURST else MAX_BURST)
    if vq.nref:
        vh_owner_store(&(<vhost_dev_t *>dev).ref_owner[q], vh_thread_id())
        return n
    vq_rx_complete(vq)                      # every frame whole: as vq_dequeue
    vh_unlock(&vq.lock)
    return n


cdef void vhost_rx_complete(void *dev, uint16_t q) noexcept nogil:
    cdef vhost_dev_t *d = <vhost_dev_t *>dev
    cdef vq_t *vq
    if q >= d.nqueues:
        return
    vq = d.guest_tx[q]
    # only the thread that holds the lock for a burst by reference: it wrote its id there
    # after taking the lock and clears it before unlocking, and no other thread writes that
    # id, so reading its own id means it holds the lock (another PMD polling the same queue
    # for a moment reads 0 or the holder's id, and leaves the burst alone)
    if vh_owner_load(&d.ref_owner[q]) != vh_thread_id():
        return
    vh_owner_store(&d.ref_owner[q], 0)
    vq_rx_complete(vq)
    vh_unlock(&vq.lock)


cdef inline vq_t *tx_ring(vhost_dev_t *d, uint32_t hint) noexcept nogil:
    """The guest RX ring a send with ``hint`` goes to (queue 0 while that one is off)."""
    cdef vq_t *vq = d.guest_rx[hint % d.nqueues]
    return vq if vq.ready and vq.enabled else d.guest_rx[0]


cdef uint32_t vhost_tx_burst(void *dev, uint32_t hint, pktpool_t *pool, pkt_t **pkts,
                             uint32_t n, tx_result_t *res) noexcept nogil:
    cdef vq_t *vq = tx_ring(<vhost_dev_t *>dev, hint)
    cdef uint32_t sent
    cdef uint64_t onecopy
    vh_lock(&vq.lock)
    onecopy = vq.onecopy
    sent = offload_send(vq, pool, pkts, n, &res.failed, &res.bytes)
    res.onecopy = <uint32_t>(vq.onecopy - onecopy)
    vh_unlock(&vq.lock)
    return sent


cdef void vhost_tx_prefetch(void *dev, uint32_t hint) noexcept nogil:
    """The guest RX ring's avail index and next entry (split), or its next descriptor
    (packed): what vq_enqueue reads first. Unlocked: the ring's fields are only read for
    addresses, and a prefetch of a ring that is going away (or of any address) is harmless.
    Measured in-run (toggled each second, 64 B NORMAL, flowgen and in_port loops, 1500 B
    in_port, host in its slow cross-core mode): -3.2 to -4.4 ns a frame."""
    cdef vq_t *vq = tx_ring(<vhost_dev_t *>dev, hint)
    if not vq.ready:
        return
    if vq.packed:                       # (a slot number: a packed ring need not be 2^n)
        vh_prefetch(&vq.pdesc[vq.last_avail_idx])
    else:
        vh_prefetch(&vq.avail[1])
        vh_prefetch(&vq.avail[2 + (vq.last_avail_idx & (vq.size - 1))])


cdef int vhost_wait_fd(void *dev, uint16_t q) noexcept nogil:
    cdef vhost_dev_t *d = <vhost_dev_t *>dev
    return vq_kickfd_locked(d.guest_tx[q]) if q < d.nqueues else -1


cdef void vhost_set_notify(void *dev, uint16_t q, bint on) noexcept nogil:
    cdef vhost_dev_t *d = <vhost_dev_t *>dev
    if q < d.nqueues:
        vq_notify_locked(d.guest_tx[q], on)


cdef bint vhost_pending(void *dev, uint16_t q) noexcept nogil:
    cdef vhost_dev_t *d = <vhost_dev_t *>dev
    return q < d.nqueues and vq_pending_locked(d.guest_tx[q])


cdef port_ops_t VHOST_OPS
VHOST_OPS.rx_burst = vhost_rx_burst
VHOST_OPS.tx_burst = vhost_tx_burst
VHOST_OPS.wait_fd = vhost_wait_fd
VHOST_OPS.set_notify = vhost_set_notify
VHOST_OPS.pending = vhost_pending
VHOST_OPS.rx_burst_ref = vhost_rx_burst_ref
VHOST_OPS.rx_complete = vhost_rx_complete
VHOST_OPS.tx_prefetch = vhost_tx_prefetch
VHOST_OPS.tx_ref = 1


cdef class VhostDev(PortDev):
    """A vhost-user port's device: the guest's RX rings (we send into) and TX rings."""

    def __init__(self, list rx_vqs, list tx_vqs):
        cdef VirtQueue vq
        cdef int q
        if not 1 <= len(rx_vqs) == len(tx_vqs) <= VHOST_MAX_QUEUES:
            raise ValueError(f"a vhost-user port has 1..{VHOST_MAX_QUEUES} queue pairs")
        self.d.nqueues = len(rx_vqs)
        for q in range(self.d.nqueues):
            vq = rx_vqs[q]
            self.d.guest_rx[q] = &vq.vq
            vq = tx_vqs[q]
            self.d.guest_tx[q] = &vq.vq
        self.keep = rx_vqs + tx_vqs
        self.nqueues = self.d.nqueues
        self.dev = &self.d
        self.ops = &VHOST_OPS

    def _test_rx_ref(self, uint16_t q, PacketPool pool):
        """Tests: a burst of queue ``q`` received by reference in the calling thread, as a
        PMD does (its frames go back to ``pool`` at once; their tails stay referenced, the
        ring locked, until that thread's _test_rx_complete). How many frames."""
        cdef pkt_t *pkts[MAX_BURST]
        cdef uint32_t n
        with nogil:
            n = vhost_rx_burst_ref(&self.d, q, pool.pool, pkts, MAX_BURST)
            pool_put_many(pool.pool, pkts, n)
        return n

    def _test_rx_complete(self, uint16_t q):
        """Tests: rx_complete of queue ``q`` in the calling thread."""
        with nogil:
            vhost_rx_complete(&self.d, q)
