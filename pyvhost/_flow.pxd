# Flow keys and their extraction from frames, the compiled action lists the caches hold
# (with the dependencies that say when a cached decision is stale), the exact-match cache
# (EMC) and the megaflow cache of a PMD thread. No rule language, no rules, no MAC table:
# the classifier (_classifier) and the switch (_switch) fill ``actions_t``.
from libc.string cimport memcpy
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t

from pyvhost._pktpool cimport pkt_t

cdef enum:
    KEY_WORDS = 8
    MAX_ACTION_OPS = 32
    MAX_HOPS = 8           # rules one lookup may pass through (goto_table)
    OP_OUTPUT = 1          # arg: port id
    OP_FLOOD = 2           # every port of the bridge but the input
    OP_SET_VLAN = 3        # arg: vid (push a tag if none)
    OP_STRIP_VLAN = 4
    OP_NORMAL = 5          # MAC learning: resolved by the upcall, never cached
    OP_TUN_HI = 6          # arg: 16 more high bits of the next wide op's value (OP_SET_TUN_*,
                           # OP_SET_ETH_*, OP_SET_NW_*)
    OP_SET_TUN_ID = 7      # arg: the low 16 bits; tun_id = hi << 16 | arg
    OP_SET_TUN_DST = 8     # arg: the low 16 bits; tun_dst (IPv4, host order as an int)
    OP_CONTROLLER = 9      # arg: max_len (0xFFFF: whole frame): to the controller queue
    OP_IN_PORT = 10        # back out of the input port (OpenFlow IN_PORT)
    OP_GROUP = 11          # arg: group slot: resolved by the upcall, never cached
    OP_METER = 12          # arg: meter slot: run per packet (a band may drop the frame)
    # set-field: the value is (the OP_TUN_HI args before it, each shifting 16 bits in) << 16
    # | arg; an edit of a frame that lacks the header does nothing (the match ensures it)
    OP_SET_ETH_SRC = 13    # 48 bits: two OP_TUN_HI first
    OP_SET_ETH_DST = 14
    OP_SET_NW_SRC = 15     # 32 bits (host order as a number): one OP_TUN_HI first
    OP_SET_NW_DST = 16
    OP_SET_TP_SRC = 17     # TCP/UDP port
    OP_SET_TP_DST = 18
    OP_SET_DSCP = 19       # arg: DSCP 0..63 (ECN kept)
    OP_SET_PCP = 20        # arg: 802.1Q priority 0..7 (a tagged frame)
    OP_DEC_TTL = 21        # IPv4 TTL - 1; one that would reach 0: the frame goes no further
                           # (to the controller as INVALID_TTL, if it asked)
    EMC_ENTRIES = 8192
    MF_MAX_MASKS = 256     # distinct wildcard masks a PMD's megaflow cache keeps
    MF_PROBE = 8           # slots an entry may sit from its home slot
    MF_MIN_SLOTS = 4096
    MF_SLOTS_PER_ENTRY = 4 # the table stops growing at the first power of 2 >= this * limit
    MF_CHUNK_SHIFT = 12    # entries are allocated MF_CHUNK at a time and never move
    MF_CHUNK = 4096
    MF_NO_SLOT = 0xFFFFFFFF
    ETH_P_8021Q = 0x8100
    NO_FDB = 0xFFFFFFFF
    DEP_LEARN = 1          # stale when the bridge learns a new MAC (flooded: unknown dst)

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
    uint32_t tun_id         # tunnel metadata (pkt_t's): 0 when not from a tunnel
    uint32_t tun_src        # network order
    uint32_t tun_dst
    uint8_t arp_sha[6]      # ARP: the sender's and target's hardware addresses
    uint8_t arp_tha[6]
    uint32_t pad2           # the key is exactly KEY_WORDS 64-bit words

cdef struct action_op_t:
    uint16_t op
    uint16_t arg

cdef struct actions_t:
    # what to do
    uint16_t n_ops
    uint16_t n_rules
    action_op_t ops[MAX_ACTION_OPS]
    void *rules[MAX_HOPS]   # the classifier rules whose counters this entry feeds
    # when it stops being true (checked by the switch on every cache hit)
    uint16_t bridge
    uint16_t flags          # DEP_LEARN
    uint32_t gen            # the datapath's generation (ports, bridges)
    uint32_t rule_gen       # the bridge classifier's generation
    uint32_t learn_gen      # the bridge MAC table's add generation (DEP_LEARN)
    uint32_t src_idx        # MAC table entries the decision used, NO_FDB if none
    uint32_t src_ver
    uint32_t dst_idx
    uint32_t dst_ver

ctypedef int (*valid_fn)(void *ctx, const actions_t *a) noexcept nogil

cdef struct emc_entry_t:       # its hash is emc_t.hashes[its slot]
    flow_key_t key
    actions_t actions

cdef struct emc_t:
    # each slot's hash, apart from the entries: a probe that misses (most of them when the
    # flows outnumber the slots) reads 4 bytes of this 32 KiB array, not a ~300-byte entry
    # 2.4 MiB away in the cache hierarchy (31% of the PMD's time with 10,000 flows)
    uint32_t hashes[EMC_ENTRIES]
    emc_entry_t e[EMC_ENTRIES]

cdef struct mf_mask_t:
    uint64_t mask[KEY_WORDS]
    uint32_t refs           # live entries under this mask
    uint32_t in_use
    uint32_t port_only      # it matches the input port and nothing else (mf_lookup_port)
    uint64_t hits

cdef struct mf_tag_t:       # a slot: its entry's hash, mask and place, apart from the entry
    uint32_t hash           # (as the EMC's hashes): a probe reads 12 bytes a slot and an
    uint32_t idx            # entry only when its tag matches; growing the table moves tags,
    uint16_t mask_id        # never entries. 0xFFFF: an empty slot
    uint16_t pad

cdef struct mf_entry_t:     # in chunks of MF_CHUNK, allocated as needed, up to the limit
    uint64_t key[KEY_WORDS] # the key with the mask applied
    uint32_t last_used      # the PMD's millisecond clock
    uint32_t next_free      # a free entry: the next free one (MF_NO_SLOT: none)
    uint32_t mask_id        # the mask its key is under
    actions_t actions

cdef struct mf_t:           # the megaflow cache: one hash table, entries tagged by mask
    uint32_t nslots         # power of 2; grows (tags only) to the first >= MF_SLOTS_PER_ENTRY * limit
    uint32_t limit          # most entries kept (eviction prefers the least recently used)
    uint32_t count
    uint32_t nmasks
    mf_tag_t *tags          # nslots
    mf_entry_t **chunks     # limit / MF_CHUNK + 1 pointers, each chunk allocated when needed
    uint32_t nchunks        # chunks allocated
    uint32_t high           # entries ever handed out (above it: never used)
    uint32_t free_head      # the first free entry below ``high`` (MF_NO_SLOT: none)
    uint16_t order[MF_MAX_MASKS]   # masks in lookup order (most hit first)
    mf_mask_t masks[MF_MAX_MASKS]
    uint64_t evictions      # entries dropped to make room (at the limit or a full neighbourhood)
    uint32_t hand           # where the next eviction search starts
    uint64_t lookups_per_hit_num   # subtables searched, summed over hits
    uint64_t hits
    mf_entry_t *last_hit    # the entry mf_lookup / mf_lookup_port found last (mf_matches)


cdef inline mf_entry_t *mf_entry(mf_t *mf, uint32_t idx) noexcept nogil:
    return &mf.chunks[idx >> MF_CHUNK_SHIFT][idx & (MF_CHUNK - 1)]


cdef inline bint mf_matches(mf_t *mf, mf_entry_t *e, const flow_key_t *k) noexcept nogil:
    """Does ``k`` fall under entry ``e`` (one an earlier frame of this burst was decided
    by: found valid then, and not given to another flow since, which only an insert
    does)? Counted as a hit (of no subtable search) when it does."""
    cdef const uint64_t *mask = mf.masks[e.mask_id].mask
    cdef uint64_t w
    cdef int j
    for j in range(KEY_WORDS):
        memcpy(&w, <const char *>k + 8 * j, 8)
        if (w & mask[j]) != e.key[j]:
            return False
    mf.masks[e.mask_id].hits += 1
    mf.hits += 1
    return True


cdef uint32_t flow_extract(const pkt_t *p, uint16_t in_port, flow_key_t *k,
                           bint hashed) noexcept nogil  # its hash (0 if not ``hashed``)
cdef uint32_t flow_hash(const flow_key_t *k) noexcept nogil
cdef uint32_t masked_hash(const uint64_t *w, const uint64_t *mask, uint64_t *out) noexcept nogil
cdef extern from *:
    void __builtin_prefetch(const void *addr) nogil


cdef inline void emc_prefetch(emc_t *emc, uint32_t h) noexcept nogil:
    """Start loading what emc_lookup(h) will read (the slot's hash, the entry's key and its
    validity words), so a burst's lookups do not each wait for memory in turn."""
    cdef uint32_t i = h & (EMC_ENTRIES - 1)
    __builtin_prefetch(&emc.hashes[i])
    __builtin_prefetch(&emc.e[i].key)
    __builtin_prefetch(&emc.e[i].actions.gen)
    __builtin_prefetch(&emc.e[i].actions.rules)


cdef inline bint emc_may_hold(emc_t *emc, uint32_t h) noexcept nogil:
    """False when emc_lookup(h) will miss (its slot holds another hash)."""
    return emc.hashes[h & (EMC_ENTRIES - 1)] == h


cdef inline bint emc_conflict(emc_t *emc, uint32_t h) noexcept nogil:
    """Does the slot of ``h`` hold another flow (a hash neither ``h`` nor 0, an empty
    slot's)? A miss there is the cache's own: more flows than slots. A miss on an empty
    slot (still filling) or on this flow's stale entry (rules changed) is not."""
    cdef uint32_t held = emc.hashes[h & (EMC_ENTRIES - 1)]
    return held != h and held != 0


cdef actions_t *emc_lookup(emc_t *emc, const flow_key_t *k, uint32_t h) noexcept nogil
cdef void emc_insert(emc_t *emc, const flow_key_t *k, uint32_t h, const actions_t *a) noexcept nogil
cdef int mf_init(mf_t *mf, uint32_t limit) noexcept nogil
cdef void mf_free(mf_t *mf) noexcept nogil
cdef enum:
    MF_NO_HINT = 0         # mf_hint's answer when no mask is in use (else (id + 1) << 32 | hash)
cdef uint64_t mf_hint(mf_t *mf, const flow_key_t *k) noexcept nogil
cdef void mf_hint_entry(mf_t *mf, uint64_t hint) noexcept nogil
cdef actions_t *mf_lookup_port(mf_t *mf, const flow_key_t *k, uint32_t now_ms,
                               valid_fn valid, void *ctx, uint32_t n) noexcept nogil
cdef actions_t *mf_lookup(mf_t *mf, const flow_key_t *k, uint32_t now_ms, valid_fn valid,
                          void *ctx, uint64_t hint) noexcept nogil
cdef void mf_insert(mf_t *mf, const flow_key_t *k, const uint64_t *mask, uint32_t now_ms,
                    const actions_t *a) noexcept nogil
cdef void mf_flush(mf_t *mf) noexcept nogil
cdef int vlan_set(pkt_t *p, uint16_t vid) noexcept nogil
cdef void vlan_strip(pkt_t *p) noexcept nogil
