# OpenFlow meters of a bridge, compiled: a table of meters, each with DROP bands that are
# token buckets (bytes or packets per second, a burst), run per packet by the datapath
# when an action list reaches a meter op (the op names a slot, so a cached decision stays
# right when the meter's rates change: the bucket is looked up at every packet). No rules,
# ports, packets or OpenFlow here; Python fills the table.
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t

cdef enum:
    METER_SLOTS = 1024         # meters a bridge holds
    METER_BANDS = 4            # bands of a meter

cdef struct mtr_band_t:
    uint64_t rate              # units (bytes or packets) per second
    uint64_t burst             # units the bucket holds
    double tokens
    uint64_t packets           # frames this band dropped
    uint64_t bytes

cdef struct mtr_entry_t:
    uint8_t in_use
    uint8_t pktps              # units: packets (else bytes)
    uint8_t n_bands
    uint64_t last_ns
    uint64_t packets           # frames that reached the meter
    uint64_t bytes
    mtr_band_t b[METER_BANDS]

cdef struct mtr_table_t:
    int lock                   # writers (control thread) and PMDs, held per packet
    mtr_entry_t e[METER_SLOTS]

# may a frame of ``length`` bytes pass meter ``slot`` at time ``now``? 1: yes, 0: a band
# dropped it (counted). A meter that is not there (NULL table, free slot) passes it.
cdef int meter_admit(mtr_table_t *t, uint16_t slot, uint32_t length,
                     uint64_t now) noexcept nogil


cdef class MeterTable:
    cdef mtr_table_t *t
