# The controller queue: frames the datapath hands to OpenFlow controllers (an output to
# CONTROLLER), copied by PMD threads into a bounded ring that the control thread drains.
# A PMD never blocks on it: a busy lock, a full ring or a frame over its bridge's rate
# is dropped and counted. No rules, no sockets, no OpenFlow encoding here.
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t

from pyvhost._pktpool cimport pkt_t

cdef enum:
    PUNT_SLOTS = 128           # frames waiting for the control thread, at most
    PUNT_SLOT_BYTES = 9216     # bytes of a frame a slot keeps (a jumbo frame whole)
    PUNT_NO_RULE = 0xFFFFFFFF  # rule id of a frame no rule sent (a packet-out)
    PUNT_BRIDGES = 256         # bridges with a rate of their own (the datapath's MAX_BRIDGES)
    PUNT_ACTION = 0            # why a frame was sent: a rule's (or packet-out's) action
    PUNT_INVALID_TTL = 1       # dec_nw_ttl found the TTL expired

cdef struct punt_rate_t:       # a bridge's token bucket (OVS: controller_rate_limit/burst)
    uint64_t rate              # frames per second (0: no limit)
    uint64_t burst
    double tokens
    uint64_t last_ns
    uint64_t drop_rate

cdef struct punt_slot_t:
    uint16_t bridge
    uint16_t in_port           # switch port id (0xFFFF: none, a packet-out's)
    uint32_t rule_id           # the classifier rule whose action sent it
    uint32_t rule_priority
    uint8_t table
    uint8_t reason             # PUNT_ACTION, or PUNT_INVALID_TTL (dec_nw_ttl reached 0)
    uint16_t max_len           # the action's max_len (0xFFFF: the whole frame)
    uint32_t total_len         # the frame's length
    uint32_t len               # bytes kept in data
    uint8_t data[PUNT_SLOT_BYTES]

cdef struct punt_t:
    int lock
    int efd                    # signalled when the ring stops being empty
    uint32_t head              # next slot to read (control thread)
    uint32_t count
    uint64_t queued
    uint64_t drop_full
    uint64_t drop_busy
    uint64_t drop_rate         # all bridges'
    punt_rate_t rates[PUNT_BRIDGES]
    punt_slot_t slots[PUNT_SLOTS]

cdef void punt_push(punt_t *q, const pkt_t *p, uint16_t bridge, uint16_t in_port,
                    uint32_t rule_id, uint32_t priority, uint8_t table,
                    uint16_t max_len, uint8_t reason=*) noexcept nogil


cdef class PuntQueue:
    cdef punt_t *q
