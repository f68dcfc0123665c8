# Split and packed virtqueues, DRIVER side (the frontend's half): post buffers, publish, kick,
# reclaim.
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t

from pyvhost._pktpool cimport pkt_t, pktpool_t
from pyvhost._vring cimport vring_desc_t, vring_packed_desc_t, vring_used_elem_t

cdef enum:
    DRV_MAX_MRG_BUFS = 256     # num_buffers above this is treated as a device error

cdef struct drvq_stats_t:
    uint64_t packets
    uint64_t bytes
    uint64_t bursts
    uint64_t kicks            # notifications sent to the device
    uint64_t kicks_suppressed # publishes the device asked us not to notify
    uint64_t waits            # sleeps on the call eventfd
    uint64_t ring_full        # TX: frames refused because every descriptor was in flight
    uint64_t drop_bad_used    # the device returned an id/length/num_buffers out of range
    uint64_t drop_oversize    # RX: a reassembled frame larger than a packet buffer
    uint64_t drop_no_mbuf     # RX: the packet pool was empty
    uint64_t ring_errors      # the used index moved more than the ring holds: ring broken

cdef struct drvq_t:
    vring_desc_t *desc
    vring_packed_desc_t *pdesc  # packed: the descriptor ring (same memory as desc)
    uint16_t *avail           # split: flags, idx, ring[size], used_event; packed: driver area
    uint16_t *used            # split: flags, idx, elems, avail_event; packed: device area
    vring_used_elem_t *used_ring
    uint8_t *slots            # host address of descriptor 0's buffer; desc i owns slot i
    uint64_t slots_gpa        # guest physical address of the same byte
    uint32_t slot_size        # bytes between slots
    uint32_t buf_len          # bytes a descriptor offers (RX) or may carry (TX)
    uint32_t size
    uint16_t avail_idx        # split: next avail index (free-running); packed: next slot
    uint16_t last_used_idx    # split: free-running; packed: the slot of the next used entry
    uint16_t kicked_idx       # avail idx (packed: avail_count) when we last decided to kick
    uint16_t avail_count      # packed: free-running count of descriptors made available
    uint16_t ndesc_free       # packed: ring slots we may write
    uint16_t rx_slots         # packed: ring slots one RX buffer takes (1, or a chain)
    uint16_t tx_max_slots     # packed: ring slots the largest TX frame takes
    uint32_t chain_seg        # packed: bytes per chained descriptor (0: one per buffer)
    int pend_head             # packed: slot of the first head whose flags wait for publish
    uint16_t pend_flags
    uint8_t packed
    uint8_t in_order          # VIRTIO_F_IN_ORDER: the device completes in posting order
    uint8_t avail_wrap        # packed wrap counters of the next avail / used slot
    uint8_t used_wrap
    uint32_t fifo_head        # IN_ORDER: ids in posting order (private), head/tail counters
    uint32_t fifo_tail
    uint16_t *fifo
    uint16_t *nslots          # private, packed: ring slots buffer i spans
    uint16_t nfree
    uint16_t *free_ids        # private (not in shared memory): descriptors we own
    uint8_t *inflight         # private: 1 while the device owns descriptor i
    uint8_t rx
    uint8_t event_idx
    uint8_t mrg_rxbuf
    uint8_t broken
    uint16_t hdr_len
    int kickfd
    int callfd
    drvq_stats_t st


cdef int drv_used_count(drvq_t *q, uint16_t *used_idx) noexcept nogil
cdef uint32_t drv_reclaim(drvq_t *q) noexcept nogil
cdef int drv_tx_slot(drvq_t *q, uint8_t **frame) noexcept nogil
cdef void drv_tx_prefetch(drvq_t *q, uint32_t n) noexcept nogil
cdef void drv_tx_post(drvq_t *q, uint16_t id, uint32_t frame_len) noexcept nogil
cdef void drv_publish(drvq_t *q) noexcept nogil
cdef uint32_t drv_send(drvq_t *q, pkt_t **pkts, uint32_t count) noexcept nogil
cdef uint32_t drv_refill(drvq_t *q) noexcept nogil
cdef uint32_t drv_recv(drvq_t *q, pktpool_t *pool, pkt_t **pkts, uint32_t count) noexcept nogil
cdef void drv_interrupts(drvq_t *q, bint on) noexcept nogil
cdef int drv_wait(drvq_t **qs, int n, int extra_fd, int timeout_ms) noexcept nogil


cdef class DriverQueue:
    cdef drvq_t q
    cdef readonly int index
    cdef readonly object memory       # keeps the mapping holding the ring alive
