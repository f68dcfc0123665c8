# The SIGBUS guard of the ring code (vhost_guard.h) and what a caught fault does to a ring
# (vq_fault). cimported only by _vring and the _ring_* helpers compiled into it: the guard's
# per-thread state must exist once. Touches no ring memory.
from libc.stdint cimport uint8_t, uint64_t

from pyvhost._vring cimport vh_eventfd_signal, vh_store_release_int, vq_t

cdef extern from "vhost_guard.h" nogil:
    ctypedef struct vh_guard_t:
        pass
    int VH_GUARD_ENTER(vh_guard_t *g)
    void vh_guard_leave(vh_guard_t *g)
    int vh_bus_install()
    void vh_bus_recovered()
    void vh_compiler_barrier()
    uint8_t vh_touch(const uint8_t *p)
    uint64_t vh_bus_caught


cdef inline void vq_fault(vq_t *vq) noexcept nogil:
    """Guest memory under ``vq`` faulted: keep the data path out until control resets it."""
    vh_bus_recovered()
    vh_store_release_int(&vq.ready, 0)
    vq.broken = 1
    vq.st.faults += 1
    if vq.faultfd >= 0:
        vh_eventfd_signal(vq.faultfd)
