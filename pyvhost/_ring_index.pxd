# Ring index arithmetic both sides of a virtqueue share: the device (_ring_*, compiled into
# _vring) and the driver (_drv_*, compiled into _driver). The event-index test, how far a
# free-running split index moved, the packed wrap counters and what a packed descriptor's
# AVAIL/USED bits say under a wrap counter. Pure functions of their arguments: they touch
# no ring memory. Header-only.
from libc.stdint cimport uint8_t, uint16_t, uint32_t

from pyvhost._vring cimport VRING_PACKED_DESC_F_AVAIL, VRING_PACKED_DESC_F_USED


cdef inline bint need_event(uint16_t event, uint16_t new, uint16_t old) noexcept nogil:
    """EVENT_IDX: did the index moving from ``old`` to ``new`` pass ``event``?"""
    return <uint16_t>(new - event - 1) < <uint16_t>(new - old)


cdef inline int index_ahead(uint16_t idx, uint16_t last, uint32_t size) noexcept nogil:
    """How many entries a free-running split index ``idx`` (the other side's) is ahead of
    ``last`` (ours); -1 when more than the ring holds: the other side is broken or hostile."""
    cdef uint16_t n = idx - last
    return -1 if n > size else <int>n


cdef inline void packed_advance(uint16_t *idx, uint8_t *wrap, uint32_t n,
                                uint32_t size) noexcept nogil:
    """Step a packed ring position ``n`` (<= size) slots on, flipping its wrap counter at
    the ring's end."""
    cdef uint32_t i = idx[0] + n
    if i >= size:
        i -= size
        wrap[0] ^= 1
    idx[0] = <uint16_t>i


cdef inline bint packed_is_avail(uint16_t flags, uint8_t wrap) noexcept nogil:
    """The driver made this descriptor available in the lap of avail wrap counter ``wrap``."""
    return ((flags & VRING_PACKED_DESC_F_AVAIL) != 0) == wrap and \
        ((flags & VRING_PACKED_DESC_F_USED) != 0) != wrap


cdef inline bint packed_is_used(uint16_t flags, uint8_t wrap) noexcept nogil:
    """The device marked this descriptor used in the lap of used wrap counter ``wrap``."""
    return ((flags & VRING_PACKED_DESC_F_AVAIL) != 0) == wrap and \
        ((flags & VRING_PACKED_DESC_F_USED) != 0) == wrap


cdef inline uint16_t packed_avail_flags(uint8_t wrap) noexcept nogil:
    """The AVAIL/USED bits a driver writes to make a descriptor available."""
    return VRING_PACKED_DESC_F_AVAIL if wrap else VRING_PACKED_DESC_F_USED


cdef inline uint16_t packed_used_flags(uint8_t wrap) noexcept nogil:
    """The AVAIL/USED bits a device writes to mark a descriptor used."""
    return (VRING_PACKED_DESC_F_AVAIL | VRING_PACKED_DESC_F_USED) if wrap else 0
