# One-copy forwarding's reads of the sending guest's memory (a frame's tail, ext_t), each
# under its own guard so a fault there is the sender's, not the receiving ring's.
# Header-only: compiled into _vring.
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy

from pyvhost._pktpool cimport pkt_t
from pyvhost._ring_copy cimport fill_iovs
from pyvhost._ring_guard cimport VH_GUARD_ENTER, vh_guard_leave, vh_guard_t, vq_fault
from pyvhost._vring cimport ext_t, iov_t


cdef extern from *:
    """
    /* fill_ext's retry after a fault: the tail copied out of the sender under its guard */
    #define VH_BOUNCE_SIZE (1u << 17)
    static __thread unsigned char vh_bounce[VH_BOUNCE_SIZE];
    static inline unsigned char *vh_bounce_buf(void) { return vh_bounce; }
    """
    uint32_t VH_BOUNCE_SIZE
    uint8_t *vh_bounce_buf() nogil


cdef inline int gather_try(uint8_t *dst, const iov_t *seg, uint32_t nseg) noexcept nogil:
    """Copy the sender's segments to ``dst`` (ours); -1 when the sender's memory faulted."""
    cdef vh_guard_t g
    cdef uint32_t j
    if VH_GUARD_ENTER(&g):
        return -1
    for j in range(nseg):
        memcpy(dst, seg[j].base, seg[j].len)
        dst += seg[j].len
    vh_guard_leave(&g)
    return 0


cdef inline int fill_ext_try(iov_t *iov, uint32_t *i_iov, uint64_t *off,
                             const ext_t *e) noexcept nogil:
    cdef vh_guard_t g
    cdef uint32_t j
    if VH_GUARD_ENTER(&g):
        return -1
    for j in range(e.nseg):
        fill_iovs(iov, i_iov, off, e.seg[j].base, e.seg[j].len)
    vh_guard_leave(&g)
    return 0


cdef inline int fill_ext(iov_t *iov, uint32_t *i_iov, uint64_t *off, const pkt_t *p) noexcept nogil:
    """One-copy: a frame's tail from the sender's guest memory into this guest's buffers.
    0; -1 when the sender's memory faulted (its ring is marked faulted, the frame is lost).
    After a fault the tail is copied again in two steps: out of the sender's memory into
    this thread's bounce buffer under the sender's guard (a sender that truncates its
    memory again in between faults itself, not this ring), then into this guest's buffers
    outside the inner guard, so a fault in this guest's memory is caught by the caller's
    guard and marks this ring faulted, as for a frame from a packet buffer."""
    cdef const ext_t *e = <const ext_t *>p.ext
    cdef uint32_t i0 = i_iov[0]
    cdef uint64_t o0 = off[0]
    cdef uint8_t *bounce
    cdef uint32_t j
    if fill_ext_try(iov, i_iov, off, e) == 0:
        return 0
    i_iov[0] = i0
    off[0] = o0
    if p.ext_len > VH_BOUNCE_SIZE:          # (no pool makes such frames: straight again)
        for j in range(e.nseg):
            fill_iovs(iov, i_iov, off, e.seg[j].base, e.seg[j].len)
        return 0
    bounce = vh_bounce_buf()
    if gather_try(bounce, e.seg, e.nseg) < 0:
        vq_fault(e.src)
        return -1
    fill_iovs(iov, i_iov, off, bounce, p.ext_len)
    return 0
