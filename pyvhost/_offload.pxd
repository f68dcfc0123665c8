# Offloads done in software when the receiving guest did not agree to take them.
from libc.stdint cimport uint32_t, uint64_t

from pyvhost._pktpool cimport pkt_t, pktpool_t
from pyvhost._vring cimport vq_t

cdef uint32_t offload_send(vq_t *vq, pktpool_t *pool, pkt_t **pkts, uint32_t n,
                           uint32_t *failed, uint64_t *delivered_bytes) noexcept nogil
