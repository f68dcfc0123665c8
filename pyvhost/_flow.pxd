# Flow keys, their extraction from frames, compiled action lists and the exact-match
# flow cache (EMC) of a PMD thread. No rule language here: the slow path compiles rules
# into ``actions_t``.
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t

from pyvhost._pktpool cimport pkt_t

cdef enum:
    MAX_ACTION_OPS = 16
    OP_OUTPUT = 1          # arg: port id
    OP_FLOOD = 2           # every port of the bridge but the input
    OP_SET_VLAN = 3        # arg: vid (push a tag if none)
    OP_STRIP_VLAN = 4
    EMC_ENTRIES = 8192
    MF_MASKS = 8            # distinct wildcard masks a PMD keeps
    MF_ENTRIES = 4096       # entries per mask (direct-mapped)
    ETH_P_8021Q = 0x8100

cdef struct flow_key_t:
    uint16_t in_port
    uint16_t vlan_tci       # 0: untagged; else the TCI with bit 12 (CFI) forced on
    uint8_t dl_dst[6]
    uint8_t dl_src[6]
    uint16_t dl_type
    uint16_t pad0
    uint32_t nw_src         # network byte order as in the frame
    uint32_t nw_dst
    uint8_t nw_proto
    uint8_t nw_tos
    uint16_t tp_src         # host order
    uint16_t tp_dst
    uint16_t pad1
    uint32_t pad2           # the key is exactly five 64-bit words (flow_hash)

cdef struct action_op_t:
    uint16_t op
    uint16_t arg

cdef struct actions_t:
    uint16_t n_ops
    uint16_t rule          # slot of the rule that matched (for its counters)
    action_op_t ops[MAX_ACTION_OPS]

cdef struct emc_entry_t:
    uint32_t hash
    uint32_t gen
    flow_key_t key
    actions_t actions

cdef struct emc_t:
    emc_entry_t e[EMC_ENTRIES]

cdef struct mf_entry_t:
    uint32_t hash
    uint32_t gen
    uint64_t key[5]         # the key with the mask applied
    actions_t actions

cdef struct mf_sub_t:
    uint64_t mask[5]
    uint32_t gen            # generation the subtable was (re)made in
    uint32_t used
    mf_entry_t e[MF_ENTRIES]

cdef struct mf_t:           # the wildcard ("megaflow") cache behind the EMC
    uint32_t nsub
    uint32_t next_victim
    mf_sub_t sub[MF_MASKS]


cdef void flow_extract(const pkt_t *p, uint16_t in_port, flow_key_t *k) noexcept nogil
cdef uint32_t flow_hash(const flow_key_t *k) noexcept nogil
cdef const actions_t *emc_lookup(emc_t *emc, const flow_key_t *k, uint32_t h, uint32_t gen) noexcept nogil
cdef void emc_insert(emc_t *emc, const flow_key_t *k, uint32_t h, uint32_t gen, const actions_t *a) noexcept nogil
cdef const actions_t *mf_lookup(mf_t *mf, const flow_key_t *k, uint32_t gen) noexcept nogil
cdef void mf_insert(mf_t *mf, const flow_key_t *k, const uint64_t *mask, uint32_t gen,
                    const actions_t *a) noexcept nogil
cdef int vlan_set(pkt_t *p, uint16_t vid) noexcept nogil
cdef void vlan_strip(pkt_t *p) noexcept nogil
