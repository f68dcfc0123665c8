# Preallocated fixed-size packet buffers (like DPDK mbufs) for the compiled data path.
from libc.stdint cimport uint8_t, uint16_t, uint32_t
from libc.string cimport memset

cdef enum:
    PKT_HEADROOM = 128
    VNET_HDR_MAX = 12

cdef struct pkt_t:
    uint8_t *data           # first byte of the frame
    uint32_t len            # frame length
    uint32_t cap            # bytes available from data to the end of the buffer
    uint16_t in_port        # set by whoever received it (switch port id)
    uint16_t in_queue
    uint32_t hash
    uint8_t vnet_hdr[VNET_HDR_MAX]   # the virtio-net header it arrived with
    uint8_t *buf            # start of the buffer (headroom before data)
    # tunnel metadata (0: none): set by a tunnel port's receive or a set_field action,
    # read by the flow key and by a flow-based tunnel port's send
    uint32_t tun_id         # the VNI
    uint32_t tun_src        # IPv4, network order
    uint32_t tun_dst
    # one-copy forwarding (_vring's ext_t): the frame's bytes past ``len`` still in the
    # sending guest's memory (0: the whole frame is in ``data``), and where they are
    uint32_t ext_len
    void *ext

cdef struct pktpool_t:
    pkt_t **free_list
    uint32_t nfree
    uint32_t count
    uint32_t buf_size       # data room per packet, headroom excluded
    pkt_t *pkts
    uint8_t *mem


cdef inline pkt_t *pool_get(pktpool_t *p) noexcept nogil:
    cdef pkt_t *k
    if p.nfree == 0:
        return NULL
    p.nfree -= 1
    k = p.free_list[p.nfree]
    k.data = k.buf + PKT_HEADROOM
    k.len = 0
    k.cap = p.buf_size
    memset(k.vnet_hdr, 0, VNET_HDR_MAX)
    k.tun_id = 0
    k.tun_src = 0
    k.tun_dst = 0
    k.ext_len = 0
    k.ext = NULL
    return k


cdef inline void pool_put(pktpool_t *p, pkt_t *k) noexcept nogil:
    p.free_list[p.nfree] = k
    p.nfree += 1


cdef inline void pool_put_many(pktpool_t *p, pkt_t **ks, uint32_t n) noexcept nogil:
    cdef uint32_t i
    for i in range(n):
        p.free_list[p.nfree] = ks[i]
        p.nfree += 1


cdef class PacketPool:
    cdef pktpool_t *pool
