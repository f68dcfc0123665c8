# Port mirrors of one bridge as the data path applies them (OVS's Mirror table): which
# frames a mirror selects (a VLAN, a match on the flow key of the frame as received) and
# its output port, with its counters. The ports a mirror selects are bits on the ports
# (_switch's port_t), so a bridge without mirrors costs one test per frame and output.
# No rule syntax, no ports table, no sending: _switch does that.
from libc.stdint cimport int32_t, uint16_t, uint32_t, uint64_t

from pyvhost._flow cimport KEY_WORDS, flow_key_t

cdef enum:
    MAX_MIRRORS = 16          # per bridge (a port's selection is a 16-bit mask)

cdef struct mirror_t:
    uint16_t out_port         # port id; its own input is discarded, floods skip it
    int32_t vlan              # -1: every frame; else only frames tagged with this VID
    uint32_t has_filter
    uint64_t mask[KEY_WORDS]  # the filter: key & mask == value
    uint64_t value[KEY_WORDS]
    uint64_t tx_packets       # copies handed to the output port
    uint64_t tx_bytes
    uint64_t no_copy          # selected but no buffer for the copy

cdef struct mirror_set_t:
    uint32_t n
    mirror_t m[MAX_MIRRORS]


cdef inline bint mirror_selects(const mirror_t *m, const flow_key_t *k) noexcept nogil:
    """Whether ``m`` takes a frame with key ``k`` (from a port it selects)."""
    cdef const uint64_t *w = <const uint64_t *>k
    cdef int i
    if m.vlan >= 0 and (k.vlan_tci == 0 or (k.vlan_tci & 0x0FFF) != m.vlan):
        return False
    if m.has_filter:
        for i in range(KEY_WORDS):
            if w[i] & m.mask[i] != m.value[i]:
                return False
    return True
