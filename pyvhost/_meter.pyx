# cython: language_level=3
"""Compiled OpenFlow meters (see _meter.pxd): per packet, every band's token bucket is
refilled for the time since the meter's last packet and charged the frame (its bytes, or
one packet); the frame is dropped when a band's bucket lacks the tokens (OpenFlow applies
the exceeded band of highest rate: every band here is DROP, so any exceeded band drops;
the highest-rate exceeded band counts the drop), as Open vSwitch's userspace meters do.
Python fills the table (``MeterTable.set``/``clear``) and reads its counters."""

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free
from libc.string cimport memset
from pyvhost._idle cimport now_ns
from pyvhost._vring cimport vh_lock, vh_unlock


cdef int meter_admit(mtr_table_t *t, uint16_t slot, uint32_t length,
                     uint64_t now) noexcept nogil:
    cdef mtr_entry_t *e
    cdef mtr_band_t *b
    cdef int i, exceeded = -1
    cdef double amount, dt
    if t == NULL or slot >= METER_SLOTS:
        return 1
    vh_lock(&t.lock)
    e = &t.e[slot]
    if not e.in_use:
        vh_unlock(&t.lock)
        return 1
    amount = 1.0 if e.pktps else <double>length
    dt = (now - e.last_ns) / 1e9 if now > e.last_ns else 0.0
    if now > e.last_ns:
        e.last_ns = now
    e.packets += 1
    e.bytes += length
    for i in range(e.n_bands):
        b = &e.b[i]
        b.tokens += dt * <double>b.rate
        if b.tokens > <double>b.burst:
            b.tokens = <double>b.burst
        if b.tokens >= amount:
            b.tokens -= amount
        elif exceeded < 0 or b.rate > e.b[exceeded].rate:
            exceeded = i
    if exceeded >= 0:
        e.b[exceeded].packets += 1
        e.b[exceeded].bytes += length
    vh_unlock(&t.lock)
    return exceeded < 0


cdef class MeterTable:
    """A bridge's meters by slot (0..METER_SLOTS-1)."""

    def __cinit__(self):
        self.t = <mtr_table_t *>calloc(1, sizeof(mtr_table_t))
        if self.t == NULL:
            raise MemoryError()

    def __dealloc__(self):
        free(self.t)

    def set(self, int slot, bint pktps, bands, bint keep_counters=False):
        """Meter ``slot`` with ``bands``: [(rate, burst)] in units per second and units
        (bytes or, ``pktps``, packets); buckets start full. ``keep_counters``: a modified
        meter keeps its packet and byte counts (band counts too, band by band)."""
        cdef mtr_entry_t e
        cdef int i
        if not 0 <= slot < METER_SLOTS:
            raise ValueError(f"meter slot {slot} out of range")
        if not 1 <= len(bands) <= METER_BANDS:
            raise ValueError(f"{len(bands)} bands (1..{METER_BANDS})")
        memset(&e, 0, sizeof(e))
        e.in_use = 1
        e.pktps = pktps
        e.n_bands = len(bands)
        for i, (rate, burst) in enumerate(bands):
            if not 0 < rate < (1 << 48) or not 0 < burst < (1 << 48):
                raise ValueError(f"band rate {rate}, burst {burst}")
            e.b[i].rate = rate
            e.b[i].burst = burst
            e.b[i].tokens = burst
        with nogil:
            vh_lock(&self.t.lock)
            if keep_counters and self.t.e[slot].in_use:
                e.packets = self.t.e[slot].packets
                e.bytes = self.t.e[slot].bytes
                for i in range(e.n_bands):
                    if i < self.t.e[slot].n_bands:
                        e.b[i].packets = self.t.e[slot].b[i].packets
                        e.b[i].bytes = self.t.e[slot].b[i].bytes
            e.last_ns = now_ns()
            self.t.e[slot] = e
            vh_unlock(&self.t.lock)

    def clear(self, int slot):
        if not 0 <= slot < METER_SLOTS:
            raise ValueError(f"meter slot {slot} out of range")
        with nogil:
            vh_lock(&self.t.lock)
            self.t.e[slot].in_use = 0
            vh_unlock(&self.t.lock)

    def stats(self, int slot):
        """(packets, bytes, [(band packets, band bytes)]) of meter ``slot``."""
        cdef mtr_entry_t e
        if not 0 <= slot < METER_SLOTS:
            raise ValueError(f"meter slot {slot} out of range")
        with nogil:
            vh_lock(&self.t.lock)
            e = self.t.e[slot]
            vh_unlock(&self.t.lock)
        return e.packets, e.bytes, [(e.b[i].packets, e.b[i].bytes) for i in range(e.n_bands)]

    def admit(self, int slot, int length, uint64_t now):
        """What the datapath decides for a frame at ``now`` (ns; tests)."""
        return bool(meter_admit(self.t, slot, length, now))


SLOTS = METER_SLOTS
BANDS = METER_BANDS
