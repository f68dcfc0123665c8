# RX frames held across an IOTLB miss (ACCESS_PLATFORM): copied aside (hold_frames) and
# delivered in order once the front-end maps the buffer (flush_held). Header-only: compiled
# into _vring.
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memmove

from pyvhost._pktpool cimport pkt_t
from pyvhost._ring_core cimport enqueue_chains
from pyvhost._ring_guard cimport vq_fault
from pyvhost._ring_onecopy cimport gather_try
from pyvhost._vring cimport MAX_HELD, ext_t, vq_t


cdef inline uint32_t hold_frames(vq_t *vq, pkt_t **pkts, uint32_t count) noexcept nogil:
    """Copy up to MAX_HELD - nheld frames aside; the rest are drop_no_buffer."""
    cdef uint32_t i, n = 0
    cdef pkt_t *h
    cdef uint8_t *copy
    cdef uint32_t length
    cdef const ext_t *e
    for i in range(count):
        if vq.nheld >= MAX_HELD:
            break
        length = pkts[i].len + pkts[i].ext_len
        copy = <uint8_t *>malloc(length if length else 1)
        if copy == NULL:
            break
        memcpy(copy, pkts[i].data, pkts[i].len)
        if pkts[i].ext_len:
            e = <const ext_t *>pkts[i].ext
            if gather_try(copy + pkts[i].len, e.seg, e.nseg) < 0:
                vq_fault(e.src)             # the sender's memory: this frame is lost
                free(copy)
                continue
        h = &vq.held[vq.nheld]
        memcpy(h, pkts[i], sizeof(pkt_t))
        h.buf = copy
        h.data = copy
        h.len = length
        h.cap = length
        h.ext_len = 0
        h.ext = NULL
        vq.nheld += 1
        n += 1
    vq.st.drop_no_buffer += count - n
    return n


cdef inline void flush_held(vq_t *vq) noexcept nogil:
    """Deliver held frames (in order) as far as the ring and the IOTLB allow."""
    cdef pkt_t *ptrs[MAX_HELD]
    cdef uint32_t i, n
    cdef uint64_t missed_before = vq.st.drop_no_buffer
    for i in range(vq.nheld):
        ptrs[i] = &vq.held[i]
    enqueue_chains(vq, ptrs, vq.nheld, &n)          # n: the first ones done with
    if vq.iotlb_miss or not vq.ready:
        vq.st.drop_no_buffer = missed_before      # still held, not dropped
    else:
        n = vq.nheld                              # delivered or counted as dropped
    for i in range(n):
        free(vq.held[i].buf)
    memmove(&vq.held[0], &vq.held[n], (vq.nheld - n) * sizeof(pkt_t))
    vq.nheld -= n


cdef inline void drop_held(vq_t *vq) noexcept nogil:
    cdef uint32_t i
    for i in range(vq.nheld):
        free(vq.held[i].buf)
    vq.nheld = 0
