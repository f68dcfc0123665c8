# The vhost-user port class: a guest's virtqueues behind the port ops of _port.pxd. The
# inline helpers on one ring are shared with the reflector's poll loop (_poll).
from libc.stdint cimport uint16_t, uint64_t

from pyvhost._port cimport PortDev
from pyvhost._vring cimport (
    vh_eventfd_drain, vh_lock, vh_unlock, vq_pending, vq_set_notify, vq_t,
)

cdef enum:
    VHOST_MAX_QUEUES = 32

cdef struct vhost_dev_t:
    uint16_t nqueues
    vq_t *guest_tx[VHOST_MAX_QUEUES]      # rings we receive from
    vq_t *guest_rx[VHOST_MAX_QUEUES]      # rings we send into
    # the thread holding guest_tx[q]'s lock for a burst received by reference (0: none);
    # only rx_complete in that thread gives the burst back and unlocks (a queue moving
    # between PMDs is briefly polled by both: the other one must not release it)
    uint64_t ref_owner[VHOST_MAX_QUEUES]


cdef inline void vq_notify_locked(vq_t *vq, bint on) noexcept nogil:
    """Guest kicks on (draining stale ones first) or off."""
    vh_lock(&vq.lock)
    if on:
        vh_eventfd_drain(vq.kickfd)
    vq_set_notify(vq, on)
    vh_unlock(&vq.lock)


cdef inline bint vq_pending_locked(vq_t *vq) noexcept nogil:
    cdef bint r
    vh_lock(&vq.lock)
    r = vq_pending(vq)
    vh_unlock(&vq.lock)
    return r


cdef inline int vq_kickfd_locked(vq_t *vq) noexcept nogil:
    cdef int fd
    vh_lock(&vq.lock)
    fd = vq.kickfd
    vh_unlock(&vq.lock)
    return fd


cdef class VhostDev(PortDev):
    cdef vhost_dev_t d
    cdef list keep
