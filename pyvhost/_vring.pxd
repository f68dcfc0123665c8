# Split virtqueues, device side, and the virtio-net burst copy on top of them (and the
# one-copy receive: vq_dequeue_ref / vq_rx_complete, ext_t, vq_materialize).
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t

from pyvhost._memory cimport IotlbTable, MemTable, iotlb_t, memtable_t
from pyvhost._pktpool cimport pkt_t, pktpool_t

cdef extern from "vhost_atomic.h" nogil:
    uint16_t vh_load_acquire_u16(const uint16_t *p)
    uint16_t vh_load_relaxed_u16(const uint16_t *p)
    void vh_store_release_u16(uint16_t *p, uint16_t v)
    void vh_store_relaxed_u16(uint16_t *p, uint16_t v)
    void vh_fence_seq_cst()
    void vh_fence_acquire()
    void vh_prefetch(const void *p)
    void vh_prefetch_w(const void *p)
    int vh_load_acquire_int(const int *p)
    void vh_store_release_int(int *p, int v)
    int vh_trylock(int *p)
    void vh_lock(int *p)
    void vh_unlock(int *p)
    int vh_eventfd_signal(int fd)
    void vh_log_write(uint8_t *log, uint64_t log_size, uint64_t gpa, uint64_t len)
    void vh_eventfd_drain(int fd)

cdef enum:
    VRING_DESC_F_NEXT = 1
    VRING_DESC_F_WRITE = 2
    VRING_DESC_F_INDIRECT = 4
    VRING_AVAIL_F_NO_INTERRUPT = 1
    VRING_USED_F_NO_NOTIFY = 1
    MAX_IOV = 64          # segments of one packet's buffers
    MAX_BURST = 32
    MAX_HELD = 64             # RX frames kept per ring while an IOTLB miss is answered
    ONECOPY_HEAD = 128        # vq_dequeue_ref: frame bytes copied (flow_extract reads <= 82)
    VNET_HDR_F_NEEDS_CSUM = 1
    VNET_HDR_GSO_NONE = 0
    VNET_HDR_GSO_TCPV4 = 1
    VNET_HDR_GSO_TCPV6 = 4
    VNET_HDR_GSO_ECN = 0x80
    OFL_CSUM = 1              # partial checksums (NEEDS_CSUM) in this direction
    OFL_TSO4 = 2              # TCPv4 segmentation offload
    OFL_TSO6 = 4
    VRING_PACKED_DESC_F_AVAIL = 1 << 7
    VRING_PACKED_DESC_F_USED = 1 << 15
    RING_EVENT_FLAGS_ENABLE = 0
    RING_EVENT_FLAGS_DISABLE = 1
    RING_EVENT_FLAGS_DESC = 2

cdef struct vring_desc_t:
    uint64_t addr
    uint32_t len
    uint16_t flags
    uint16_t next

cdef struct vring_packed_desc_t:
    uint64_t addr
    uint32_t len
    uint16_t id
    uint16_t flags

cdef struct vring_used_elem_t:
    uint32_t id
    uint32_t len

cdef struct iov_t:
    uint8_t *base
    uint64_t len
    uint64_t gpa              # where it is in guest memory (dirty logging)

cdef struct vq_stats_t:
    # every counter of a ring; VirtQueue.stats() returns this struct as a dict
    uint64_t packets
    uint64_t bytes
    uint64_t bursts
    uint64_t calls            # notifications sent to the guest
    uint64_t drop_bad_desc    # malformed or hostile descriptor chain
    uint64_t drop_no_buffer   # RX: the guest had no (large enough) buffer posted
    uint64_t drop_oversize    # frame larger than the packet buffer
    uint64_t drop_disabled    # consumed while the ring was disabled
    uint64_t drop_no_mbuf     # packet pool empty
    uint64_t ring_errors      # bad avail index or head index: ring marked broken
    uint64_t drop_bad_hdr     # TX: a virtio-net header asking for offloads not agreed or
                              # pointing outside the frame
    uint64_t iotlb_misses     # bursts stopped by an IOVA not in the IOTLB (nothing consumed)
    uint64_t call_errors      # notifications that could not be signalled (call eventfd write failed)
    uint64_t faults           # guest-memory faults (a truncated fd, SIGBUS) caught on this ring

cdef struct vq_t:
    int lock                  # held by the data path around each burst, by control to change
    int ready                 # started, addresses translated, memory present
    int enabled
    int broken
    vring_desc_t *desc
    vring_packed_desc_t *pdesc   # packed: the descriptor ring
    uint16_t *avail           # split: flags, idx, ring[size], used_event; packed: driver event
    uint16_t *used            # split: flags, idx, elems, avail_event; packed: device event
    vring_used_elem_t *used_ring
    uint32_t size
    uint16_t last_avail_idx
    uint16_t last_used_idx
    uint16_t signalled_used
    uint8_t signalled_used_valid
    uint8_t event_idx
    uint8_t indirect
    uint8_t mrg_rxbuf
    uint8_t packed
    uint8_t in_order          # VIRTIO_F_IN_ORDER: packed TX batches complete with one used desc
    uint8_t ofl_rx            # what the guest takes on its RX ring: OFL_* (GUEST_CSUM/TSO)
    uint8_t ofl_tx            # what the guest may send on its TX ring: OFL_* (CSUM/HOST_TSO)
    uint8_t avail_wrap        # packed: the wrap counters of the next avail / used slot
    uint8_t used_wrap
    uint16_t hdr_len
    int kickfd
    int callfd
    const memtable_t *mem
    uint8_t *log              # the shared dirty-page bitmap (SET_LOG_BASE), or NULL
    uint64_t log_size         # its bytes
    uint8_t log_all           # VHOST_F_LOG_ALL negotiated: log every page we write
    uint8_t log_used          # VHOST_VRING_F_LOG: log used-ring writes at log_used_gpa
    uint64_t log_used_gpa
    uint64_t desc_gpa         # packed: where the descriptor ring is (its used entries are logged)
    uint8_t rarp_pending      # SEND_RARP: a RARP frame heads the next dequeue burst
    uint8_t rarp_mac[6]
    const iotlb_t *iotlb      # ACCESS_PLATFORM: descriptor addresses are IOVAs; else NULL
    int iotlb_miss            # a translation missed: bursts stop until a new IOTLB comes
    uint32_t miss_perm
    uint64_t miss_iova
    int missfd                # eventfd signalled on a new miss (the control side sends it)
    uint32_t nheld            # RX frames held (copied) while a miss is answered
    pkt_t held[MAX_HELD]
    int faultfd               # eventfd signalled when guest memory faults (SIGBUS), or -1
    uint32_t dq_taken         # inside vq_dequeue: pkts[0..dq_taken) are ours (a fault frees them)
    vq_stats_t st
    # vq_dequeue_ref: the chains taken in the burst, in order, returned by vq_rx_complete
    uint32_t npend
    uint16_t pend_id[MAX_BURST]           # split: the head; packed: the buffer id
    uint16_t pend_slots[MAX_BURST]        # packed: the slots the chain spans
    uint32_t nref                         # frames of the burst whose tail stays in guest memory
    uint8_t ref_locked                    # the port class keeps the lock until rx_complete
    uint64_t onecopy                      # RX: frames delivered straight from another guest
    uint64_t batched                      # packed: chains taken 4 at a time (_ring_batch)
    uint8_t no_batch                      # test hook: every chain one at a time


cdef struct ext_t:
    # one-copy forwarding: where the rest of a frame lies in the sending guest's memory,
    # translated and bounds-checked at dequeue; valid while the sender's ring stays locked
    # (vq_dequeue_ref .. vq_rx_complete). Kept at the tail of the frame's own pool buffer.
    vq_t *src
    uint32_t nseg
    iov_t seg[MAX_IOV]


cdef uint32_t vq_dequeue(vq_t *vq, pktpool_t *pool, pkt_t **pkts, uint32_t count) noexcept nogil
cdef uint32_t vq_dequeue_ref(vq_t *vq, pktpool_t *pool, pkt_t **pkts,
                            uint32_t count) noexcept nogil
cdef void vq_rx_complete(vq_t *vq) noexcept nogil
cdef int vq_materialize(pkt_t *p) noexcept nogil
cdef uint32_t vq_enqueue(vq_t *vq, pkt_t **pkts, uint32_t count) noexcept nogil
cdef void vq_set_notify(vq_t *vq, bint on) noexcept nogil
cdef bint vq_pending(vq_t *vq) noexcept nogil


cdef class VirtQueue:
    cdef vq_t vq
    cdef readonly MemTable mem
    cdef readonly int index
    cdef readonly uint64_t desc_uva
    cdef readonly uint64_t used_uva
    cdef readonly uint64_t avail_uva
    cdef readonly IotlbTable iotlb
