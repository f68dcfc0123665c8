# One-copy forwarding's reads of the sending guest's memory (a frame's tail, ext_t), each
# under its own guard so a fault there is the sender's, not the receiving ring's.
# Header-only: compiled into _vring.
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy

from pyvhost._pktpool cimport pkt_t
from pyvhost._ring_copy cimport fill_iovs
from pyvhost._ring_guard cimport VH_GUARD_ENTER, vh_guard_leave, vh_guard_t, vh_touch, vq_fault
from pyvhost._vring cimport ext_t, iov_t


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


cdef inline int probe_src(const ext_t *e) noexcept nogil:
    """Read a byte of every page of the sender's segments: -1 when that memory faults."""
    cdef vh_guard_t g
    cdef uint32_t j
    cdef uint64_t o
    if VH_GUARD_ENTER(&g):
        return -1
    for j in range(e.nseg):
        o = 0
        while o < e.seg[j].len:
            vh_touch(e.seg[j].base + o)
            o += 4096
        vh_touch(e.seg[j].base + e.seg[j].len - 1)
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
    A fault in this guest's memory is retried outside the inner guard, so the caller's
    guard marks this ring faulted, as for a frame from a packet buffer."""
    cdef const ext_t *e = <const ext_t *>p.ext
    cdef uint32_t i0 = i_iov[0], j
    cdef uint64_t o0 = off[0]
    if fill_ext_try(iov, i_iov, off, e) == 0:
        return 0
    if probe_src(e) < 0:
        vq_fault(e.src)
        return -1
    i_iov[0] = i0
    off[0] = o0
    for j in range(e.nseg):
        fill_iovs(iov, i_iov, off, e.seg[j].base, e.seg[j].len)
    return 0
