# Offloads done in software when the receiving guest did not agree to take them.
# csum_complete and the TSO helpers serve port classes that send without virtio-net
# headers (afxdp): they finish each frame before it leaves.
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t

from pyvhost._pktpool cimport pkt_t, pktpool_t
from pyvhost._vring cimport vq_t

cdef uint32_t offload_send(vq_t *vq, pktpool_t *pool, pkt_t **pkts, uint32_t n,
                           uint32_t *failed, uint64_t *delivered_bytes) noexcept nogil

cdef enum:
    MAX_SEGS = 64

cdef struct tso_t:           # a TCP super-frame, parsed once
    uint32_t l2
    uint32_t l3
    uint32_t hlen           # all headers
    uint32_t mss
    uint32_t payload
    uint32_t seq
    uint16_t ip_id
    uint8_t flags           # TCP flags of the super-frame
    uint8_t v6


cdef bint csum_complete(pkt_t *p) noexcept nogil
cdef bint tso_parse(pkt_t *p, tso_t *t) noexcept nogil
cdef uint32_t tso_segment(pkt_t *p, const tso_t *t, uint32_t first, pktpool_t *pool,
                          pkt_t **out) noexcept nogil
