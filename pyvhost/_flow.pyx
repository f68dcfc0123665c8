# cython: language_level=3
"""Compiled flow handling for the switch's fast path: parse a frame into a ``flow_key_t``
(in_port, VLAN, Ethernet, IPv4/ARP (with its hardware addresses), TCP/UDP/ICMP, and the
tunnel metadata the frame
carries: tun_id, tun_src, tun_dst), hash it, the PMD's exact-match cache
and megaflow cache, and the VLAN rewrites actions need. Also the Python view of a key
(``key_dict``, ``pack_key``). No rules, no MAC table, no ports, no rings here.
"""

from libc.stdint cimport int32_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free
from libc.string cimport memcmp, memcpy, memmove, memset

from pyvhost._pktpool cimport PacketPool, pkt_t, pool_get, pool_put


if sizeof(flow_key_t) != KEY_WORDS * 8 or KEY_WORDS != 8:
    raise ImportError("flow_key_t must be 8 64-bit words (flow_extract and flow_hash)")


cdef extern from *:
    """
    /* A field of ``size`` bytes (a host-order integer, so its bytes in memory are the
       field's) at byte ``off`` of a key word: the word, stored as a host-order uint64,
       has the field's bytes at that offset, on either byte order. */
    #if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    #define PV_AT(v, off, size) ((uint64_t)(v) << (8 * (8 - (off) - (size))))
    #else
    #define PV_AT(v, off, size) ((uint64_t)(v) << (8 * (off)))
    #endif
    /* The 128-bit product of two words folded to 64 bits (low half xor high half): the
       high half carries every input bit into the low bits a cache indexes by. */
    static inline uint64_t pv_fold_mul(uint64_t a, uint64_t b)
    {
        __uint128_t r = (__uint128_t)a * b;
        return (uint64_t)r ^ (uint64_t)(r >> 64);
    }
    """
    uint64_t PV_AT(uint64_t v, int off, int size) noexcept nogil
    uint64_t pv_fold_mul(uint64_t a, uint64_t b) noexcept nogil


cdef inline uint16_t rd16(const uint8_t *p) noexcept nogil:
    return (<uint16_t>p[0] << 8) | p[1]


cdef inline uint64_t raw16(const uint8_t *p) noexcept nogil:
    """2 frame bytes as a host-order integer whose bytes in memory are these (PV_AT)."""
    cdef uint16_t v
    memcpy(&v, p, 2)
    return v


cdef inline uint64_t raw32(const uint8_t *p) noexcept nogil:
    cdef uint32_t v
    memcpy(&v, p, 4)
    return v


cdef inline uint32_t hash_words(uint64_t w0, uint64_t w1, uint64_t w2, uint64_t w3,
                                uint64_t w4, uint64_t w5, uint64_t w6,
                                uint64_t w7) noexcept nogil:
    """The EMC's hash of a key's 8 words: 4 independent pairs (each pair one folded
    128-bit multiply of the words xored with fixed constants), combined and folded once
    more. Four multiplies that run side by side instead of 8 that wait on each other.
    Not keyed: a crafted collision costs a cache slot, never a false hit (the EMC compares
    whole keys)."""
    cdef uint64_t h
    h = (pv_fold_mul(w0 ^ 0xA0761D6478BD642FULL, w1 ^ 0xE7037ED1A0B428DBULL) ^
         pv_fold_mul(w2 ^ 0x8EBC6AF09C88C6E3ULL, w3 ^ 0x589965CC75374CC3ULL)) + \
        (pv_fold_mul(w4 ^ 0x1D8E4E27C47D124FULL, w5 ^ 0x9E3779B97F4A7C15ULL) ^
         pv_fold_mul(w6 ^ 0xC2B2AE3D27D4EB4FULL, w7 ^ 0x165667B19E3779F9ULL))
    return <uint32_t>pv_fold_mul(h, 0xFF51AFD7ED558CCDULL)


cdef uint32_t flow_extract(const pkt_t *p, uint16_t in_port, flow_key_t *k,
                           bint hashed) noexcept nogil:
    """``k`` := the key of ``p`` received on ``in_port``; returns its flow_hash if
    ``hashed``, else 0 (an EMC that is not asked: flow_hash later if it needs it). The key's
    8 words are built in registers (scalars, not an array the compiler would spill), stored
    whole and hashed from the registers: a key written field by field (2-, 4- and 6-byte
    stores) and read back as words stalls every read on store forwarding (perf: the hash's
    first load of the key took 1/6 of the hash's time)."""
    cdef const uint8_t *d = p.data
    cdef uint32_t n = p.len, off = 14, ihl
    cdef uint16_t dl_type = 0, tci = 0, tp_src = 0, tp_dst = 0
    cdef uint8_t proto = 0, tos = 0
    cdef uint64_t w0 = 0, w1 = 0, w2 = 0, w3 = 0, w6 = 0, w7 = 0, w4, w5
    cdef uint8_t *out = <uint8_t *>k
    if n >= 14:
        w0 = PV_AT(raw32(d), 4, 4)                              # dl_dst
        w1 = PV_AT(raw16(d + 4), 0, 2) | PV_AT(raw32(d + 6), 2, 4) | \
            PV_AT(raw16(d + 10), 6, 2)                          # dl_dst, dl_src
        dl_type = rd16(d + 12)
        if dl_type == ETH_P_8021Q and n >= 18:
            tci = rd16(d + 14) | 0x1000
            dl_type = rd16(d + 16)
            off = 18
        if dl_type == 0x0806 and n >= off + 28:                 # ARP: opcode, sender/target
            proto = d[off + 7]
            w2 = PV_AT(raw32(d + off + 14), 4, 4)               # nw_src
            w3 = PV_AT(raw32(d + off + 24), 0, 4)               # nw_dst
            w6 = PV_AT(raw32(d + off + 8), 0, 4) | PV_AT(raw16(d + off + 12), 4, 2) | \
                PV_AT(raw16(d + off + 18), 6, 2)                # arp_sha, arp_tha
            w7 = PV_AT(raw32(d + off + 20), 0, 4)
        elif dl_type == 0x0800 and n >= off + 20 and d[off] >> 4 == 4:
            ihl = (d[off] & 0x0F) * 4
            tos = d[off + 1]
            proto = d[off + 9]
            w2 = PV_AT(raw32(d + off + 12), 4, 4)
            w3 = PV_AT(raw32(d + off + 16), 0, 4)
            if ihl >= 20 and (rd16(d + off + 6) & 0x1FFF) == 0 and n >= off + ihl + 4:
                off += ihl
                if proto == 6 or proto == 17:
                    tp_src = rd16(d + off)
                    tp_dst = rd16(d + off + 2)
                elif proto == 1:                                # ICMP type and code
                    tp_src = d[off]
                    tp_dst = d[off + 1]
    w0 |= PV_AT(in_port, 0, 2) | PV_AT(tci, 2, 2)
    w2 |= PV_AT(dl_type, 0, 2)
    w3 |= PV_AT(proto, 4, 1) | PV_AT(tos, 5, 1) | PV_AT(tp_src, 6, 2)
    w4 = PV_AT(tp_dst, 0, 2) | PV_AT(p.tun_id, 4, 4)
    w5 = PV_AT(p.tun_src, 0, 4) | PV_AT(p.tun_dst, 4, 4)
    memcpy(out, &w0, 8)
    memcpy(out + 8, &w1, 8)
    memcpy(out + 16, &w2, 8)
    memcpy(out + 24, &w3, 8)
    memcpy(out + 32, &w4, 8)
    memcpy(out + 40, &w5, 8)
    memcpy(out + 48, &w6, 8)
    memcpy(out + 56, &w7, 8)
    if not hashed:
        return 0
    return hash_words(w0, w1, w2, w3, w4, w5, w6, w7)


cdef uint32_t flow_hash(const flow_key_t *k) noexcept nogil:
    """The hash flow_extract returned for ``k``."""
    cdef uint64_t w[KEY_WORDS]
    memcpy(w, k, sizeof(flow_key_t))
    return hash_words(w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7])


cdef inline uint64_t mix(uint64_t h, uint64_t w) noexcept nogil:
    h ^= w
    h *= 0xFF51AFD7ED558CCDULL
    return h ^ (h >> 32)


cdef uint32_t masked_hash(const uint64_t *w, const uint64_t *mask, uint64_t *out) noexcept nogil:
    """Hash of ``w & mask`` (hash_words of the masked words: flow_hash when the mask is all
    ones), the masked words written to ``out``."""
    cdef uint64_t m0 = w[0] & mask[0], m1 = w[1] & mask[1], m2 = w[2] & mask[2]
    cdef uint64_t m3 = w[3] & mask[3], m4 = w[4] & mask[4], m5 = w[5] & mask[5]
    cdef uint64_t m6 = w[6] & mask[6], m7 = w[7] & mask[7]
    out[0] = m0
    out[1] = m1
    out[2] = m2
    out[3] = m3
    out[4] = m4
    out[5] = m5
    out[6] = m6
    out[7] = m7
    return hash_words(m0, m1, m2, m3, m4, m5, m6, m7)


# -- exact-match cache ------------------------------------------------------------------------

cdef inline uint64_t word(const flow_key_t *k, int i) noexcept nogil:
    cdef uint64_t v
    memcpy(&v, <const uint8_t *>k + 8 * i, 8)
    return v


cdef inline bint key_eq(const flow_key_t *a, const flow_key_t *b) noexcept nogil:
    """Are two keys equal in every word? Word by word with 8-byte loads, the width
    flow_extract stores a key with: a wider load (memcmp's, or a vectorized compare) of a
    key just stored stalls on store forwarding (perf: a third of emc_lookup)."""
    cdef int i
    for i in range(KEY_WORDS):
        if word(a, i) != word(b, i):
            return False
    return True


cdef inline bint words_eq(const uint64_t *a, const uint64_t *b) noexcept nogil:
    """key_eq for keys held as words (the megaflow cache's masked keys)."""
    cdef int i
    for i in range(KEY_WORDS):
        if a[i] != b[i]:
            return False
    return True


cdef actions_t *emc_lookup(emc_t *emc, const flow_key_t *k, uint32_t h) noexcept nogil:
    """The entry for exactly this key, or NULL; the caller checks it is still valid. The
    slot's hash is compared first, in the compact array: the entry itself is read only when
    the hash matches."""
    cdef uint32_t i = h & (EMC_ENTRIES - 1)
    cdef emc_entry_t *e
    if emc.hashes[i] != h:
        return NULL
    e = &emc.e[i]
    if e.actions.gen != 0 and key_eq(&e.key, k):
        return &e.actions
    return NULL


cdef void emc_insert(emc_t *emc, const flow_key_t *k, uint32_t h, const actions_t *a) noexcept nogil:
    cdef uint32_t i = h & (EMC_ENTRIES - 1)
    cdef emc_entry_t *e = &emc.e[i]
    emc.hashes[i] = h
    memcpy(&e.key, k, sizeof(flow_key_t))
    memcpy(&e.actions, a, sizeof(actions_t))


# -- megaflow cache ---------------------------------------------------------------------------
# One open-addressing table per PMD; an entry is (mask id, masked key) -> actions. Each
# slot is a tag (hash, mask id, entry index) in a compact array; the entries sit in chunks
# that never move. A probe walks tags and reads an entry only when its tag matches. A
# lookup tries the masks most-hit first; an entry that is no longer valid is freed where
# it is found. A full neighbourhood grows the table (tags only: cheap, and bounded by
# about MF_SLOTS_PER_ENTRY slots per entry of the limit) before it evicts a live entry; at the
# limit, the least recently used entry there (or near a clock hand) goes. Only its PMD
# thread touches it. mf_hint and mf_hint_entry let a burst start every frame's probe
# before the lookups (the EMC's prefetch, one level down).

cdef inline uint32_t mf_hash(uint32_t h, uint32_t mask_id) noexcept nogil:
    return <uint32_t>mix(h, mask_id + 1)


cdef inline void mf_clear_tags(mf_tag_t *tags, uint32_t n) noexcept nogil:
    cdef uint32_t i
    for i in range(n):
        tags[i].mask_id = 0xFFFF


cdef int mf_init(mf_t *mf, uint32_t limit) noexcept nogil:
    memset(mf, 0, sizeof(mf_t))
    mf.limit = limit if limit > 0 else 1
    mf.nslots = MF_MIN_SLOTS
    mf.free_head = MF_NO_SLOT
    mf.tags = <mf_tag_t *>calloc(mf.nslots, sizeof(mf_tag_t))
    mf.chunks = <mf_entry_t **>calloc((mf.limit >> MF_CHUNK_SHIFT) + 1, sizeof(mf_entry_t *))
    if mf.tags == NULL or mf.chunks == NULL:
        mf_free(mf)
        return -1
    mf_clear_tags(mf.tags, mf.nslots)
    return 0


cdef void mf_free(mf_t *mf) noexcept nogil:
    cdef uint32_t i
    if mf.chunks != NULL:
        for i in range(mf.nchunks):
            free(mf.chunks[i])
    free(mf.chunks)
    free(mf.tags)
    mf.chunks = NULL
    mf.tags = NULL
    mf.nchunks = 0


cdef void mf_flush(mf_t *mf) noexcept nogil:
    cdef uint32_t i
    mf_clear_tags(mf.tags, mf.nslots)
    for i in range(mf.nmasks):
        mf.masks[i].refs = 0
    mf.count = 0
    mf.high = 0                      # every entry free again (the chunks are kept)
    mf.free_head = MF_NO_SLOT


cdef inline uint32_t mf_alloc(mf_t *mf) noexcept nogil:
    """A free entry's index, or MF_NO_SLOT (no memory for a new chunk). The caller keeps
    count below the limit, so one is always free but for memory."""
    cdef uint32_t idx = mf.free_head
    cdef uint32_t c
    if idx != MF_NO_SLOT:
        mf.free_head = mf_entry(mf, idx).next_free
        return idx
    if mf.high >= mf.limit:
        return MF_NO_SLOT
    c = mf.high >> MF_CHUNK_SHIFT
    if c >= mf.nchunks:
        mf.chunks[c] = <mf_entry_t *>calloc(MF_CHUNK, sizeof(mf_entry_t))
        if mf.chunks[c] == NULL:
            return MF_NO_SLOT
        mf.nchunks = c + 1
    mf.high += 1
    return mf.high - 1


cdef inline void mf_drop(mf_t *mf, uint32_t slot) noexcept nogil:
    """Free a slot and its entry."""
    cdef uint32_t idx = mf.tags[slot].idx
    mf.masks[mf.tags[slot].mask_id].refs -= 1
    mf.count -= 1
    mf.tags[slot].mask_id = 0xFFFF
    mf_entry(mf, idx).next_free = mf.free_head
    mf.free_head = idx


cdef inline bint mf_can_grow(mf_t *mf) noexcept nogil:
    return mf.nslots < (<uint32_t>1 << 30) and \
        <uint64_t>mf.nslots < <uint64_t>MF_SLOTS_PER_ENTRY * mf.limit


cdef void mf_grow(mf_t *mf) noexcept nogil:
    """Double the table: tags only, the entries stay where they are (a tag that finds no
    slot in its neighbourhood drops its entry: counted as an eviction)."""
    cdef uint32_t n = mf.nslots * 2, i, j, s
    cdef mf_tag_t *tags = <mf_tag_t *>calloc(n, sizeof(mf_tag_t))
    cdef mf_tag_t *old = mf.tags
    cdef uint32_t old_n = mf.nslots
    if tags == NULL:
        return
    mf_clear_tags(tags, n)
    mf.tags = tags
    mf.nslots = n
    for i in range(old_n):
        if old[i].mask_id == 0xFFFF:
            continue
        for j in range(MF_PROBE):
            s = (old[i].hash + j) & (n - 1)
            if tags[s].mask_id == 0xFFFF:
                tags[s] = old[i]
                break
        else:
            mf.masks[old[i].mask_id].refs -= 1
            mf.count -= 1
            mf_entry(mf, old[i].idx).next_free = mf.free_head
            mf.free_head = old[i].idx
            mf.evictions += 1
    free(old)


cdef void mf_sort(mf_t *mf) noexcept nogil:
    """Masks in order of hits (insertion sort over a few hundred ids), then age the hits."""
    cdef uint32_t i, j
    cdef uint16_t t
    for i in range(1, mf.nmasks):
        t = mf.order[i]
        j = i
        while j > 0 and mf.masks[mf.order[j - 1]].hits < mf.masks[t].hits:
            mf.order[j] = mf.order[j - 1]
            j -= 1
        mf.order[j] = t
    for i in range(mf.nmasks):
        mf.masks[i].hits >>= 1


cdef inline bint older(uint32_t now_ms, uint32_t a, uint32_t b) noexcept nogil:
    """Was ``a`` last used longer ago than ``b``? (wrapping millisecond clock)"""
    return <int32_t>(now_ms - a) > <int32_t>(now_ms - b)


cdef inline uint32_t slot_used(mf_t *mf, uint32_t s) noexcept nogil:
    return mf_entry(mf, mf.tags[s].idx).last_used


cdef bint mf_evict_one(mf_t *mf, uint32_t now_ms) noexcept nogil:
    """Drop the least recently used of the next few entries a clock hand finds (the cache
    is at its limit and the new entry's neighbourhood has room but nothing to evict)."""
    cdef uint32_t i, s, found = 0, victim = MF_NO_SLOT
    for i in range(mf.nslots):
        s = mf.hand & (mf.nslots - 1)
        mf.hand += 1
        if mf.tags[s].mask_id == 0xFFFF:
            continue
        if victim == MF_NO_SLOT or older(now_ms, slot_used(mf, s), slot_used(mf, victim)):
            victim = s
        found += 1
        if found == MF_PROBE:
            break
    if victim == MF_NO_SLOT:
        return False
    mf_drop(mf, victim)
    mf.evictions += 1
    return True


cdef inline void key_words(const flow_key_t *k, uint64_t *w) noexcept nogil:
    """The key's words, loaded at the width they were stored (see key_eq)."""
    cdef int i
    for i in range(KEY_WORDS):
        w[i] = word(k, i)


cdef inline uint32_t mf_first_mask(mf_t *mf) noexcept nogil:
    """The most-hit mask that has entries, or 0xFFFF."""
    cdef uint32_t i
    for i in range(mf.nmasks):
        if mf.masks[mf.order[i]].refs:
            return mf.order[i]
    return 0xFFFF


cdef uint64_t mf_hint(mf_t *mf, const flow_key_t *k) noexcept nogil:
    """Start loading the tags mf_lookup(k) probes first (under the most-hit mask) and
    return that probe's hash for it, or MF_NO_HINT. A burst calls this for each frame the
    EMC will not answer, then mf_hint_entry for each, then looks them up: the probes'
    memory arrives while the other frames are hashed."""
    cdef uint64_t w[KEY_WORDS]
    cdef uint32_t id_ = mf_first_mask(mf), h
    if id_ == 0xFFFF:
        return MF_NO_HINT
    key_words(k, w)
    h = mf_hash(masked_hash(w, mf.masks[id_].mask, w), id_)
    __builtin_prefetch(&mf.tags[h & (mf.nslots - 1)])
    return (<uint64_t>(id_ + 1) << 32) | h


cdef void mf_hint_entry(mf_t *mf, uint64_t hint) noexcept nogil:
    """The second step of a hint: the tags have arrived; start loading the lines a hit on
    the entry they name reads (its key, n_rules and ops, rules, validity words)."""
    cdef uint32_t h = <uint32_t>hint, id_ = <uint32_t>(hint >> 32) - 1, j, s
    cdef mf_entry_t *e
    if hint == MF_NO_HINT:
        return
    for j in range(MF_PROBE):
        s = (h + j) & (mf.nslots - 1)
        if mf.tags[s].hash == h and mf.tags[s].mask_id == id_:
            e = mf_entry(mf, mf.tags[s].idx)
            __builtin_prefetch(&e.key)
            __builtin_prefetch(&e.actions)
            __builtin_prefetch(&e.actions.rules)
            __builtin_prefetch(&e.actions.gen)
            return


cdef inline uint32_t mf_probe(mf_t *mf, uint32_t h, uint32_t id_,
                              const uint64_t *m) noexcept nogil:
    """The slot of the entry holding masked key ``m`` under mask ``id_`` (probe hash
    ``h``), or MF_NO_SLOT."""
    cdef uint32_t j, s
    for j in range(MF_PROBE):
        s = (h + j) & (mf.nslots - 1)
        if mf.tags[s].hash == h and mf.tags[s].mask_id == id_ and \
                words_eq(mf_entry(mf, mf.tags[s].idx).key, m):
            return s
    return MF_NO_SLOT


cdef actions_t *mf_lookup(mf_t *mf, const flow_key_t *k, uint32_t now_ms, valid_fn valid,
                          void *ctx, uint64_t hint) noexcept nogil:
    """The valid cached actions of the first mask whose masked key is cached, or NULL.
    ``hint`` (mf_hint's, or MF_NO_HINT) is the probe hash of its mask: not computed again.
    A stale hint (its mask id reused since) only costs a miss: entries match on mask id
    and masked key, never on the hash alone."""
    cdef uint64_t w[KEY_WORDS]
    cdef uint64_t m[KEY_WORDS]
    cdef uint32_t i, j, h, s, id_
    cdef uint32_t hint_id = <uint32_t>(hint >> 32) - 1
    cdef mf_mask_t *mk
    cdef mf_entry_t *e
    key_words(k, w)
    for i in range(mf.nmasks):
        id_ = mf.order[i]
        mk = &mf.masks[id_]
        if mk.refs == 0:
            continue
        if id_ == hint_id:
            for j in range(KEY_WORDS):
                m[j] = w[j] & mk.mask[j]
            h = <uint32_t>hint
        else:
            h = mf_hash(masked_hash(w, mk.mask, m), id_)
        s = mf_probe(mf, h, id_, m)
        if s == MF_NO_SLOT:
            continue
        e = mf_entry(mf, mf.tags[s].idx)
        if valid(ctx, &e.actions):
            e.last_used = now_ms
            mk.hits += 1
            mf.hits += 1
            mf.lookups_per_hit_num += i + 1
            mf.last_hit = e
            return &e.actions
        mf_drop(mf, s)
    return NULL


cdef actions_t *mf_lookup_port(mf_t *mf, const flow_key_t *k, uint32_t now_ms,
                               valid_fn valid, void *ctx, uint32_t n) noexcept nogil:
    """The valid cached actions of ``k``'s input port when they are cached under the mask
    that matches the input port and nothing else, or NULL. They are then the actions of
    every frame from that port: a burst of ``n`` frames from one port is looked up once
    (``n`` hits of one search), as OVS's simple match does for such flows. Another valid
    entry a frame also matches cannot disagree: both were decided in the current
    generation of the rules (entries of an older one are invalid)."""
    cdef uint64_t w[KEY_WORDS]
    cdef uint64_t m[KEY_WORDS]
    cdef uint32_t i, s, id_
    cdef mf_mask_t *mk
    cdef mf_entry_t *e
    for i in range(mf.nmasks):
        id_ = mf.order[i]
        mk = &mf.masks[id_]
        if mk.refs == 0 or not mk.port_only:
            continue
        key_words(k, w)
        s = mf_probe(mf, mf_hash(masked_hash(w, mk.mask, m), id_), id_, m)
        if s == MF_NO_SLOT:
            return NULL                              # (only one mask can be this one)
        e = mf_entry(mf, mf.tags[s].idx)
        if not valid(ctx, &e.actions):
            mf_drop(mf, s)
            return NULL
        e.last_used = now_ms
        mk.hits += n
        mf.hits += n
        mf.lookups_per_hit_num += i + 1              # (searched once for the n)
        mf.last_hit = e
        return &e.actions
    return NULL


cdef inline bint is_port_only(const uint64_t *mask) noexcept nogil:
    """The mask of the input port alone (in_port: the key's first 16 bits)."""
    cdef int i
    if mask[0] != 0xFFFF:
        return False
    for i in range(1, KEY_WORDS):
        if mask[i]:
            return False
    return True


cdef inline bint mf_place(mf_t *mf, uint32_t h, uint32_t id_, const uint64_t *w,
                          uint32_t now_ms, const actions_t *a, uint32_t *slot,
                          uint32_t *victim) noexcept nogil:
    """Probe the neighbourhood of ``h`` for the masked key ``w``: True when it was cached
    (its decision replaced); else ``slot`` is the first free slot there, ``victim`` the
    least recently used entry (either MF_NO_SLOT if none)."""
    cdef uint32_t i, s
    cdef mf_entry_t *e
    for i in range(MF_PROBE):
        s = (h + i) & (mf.nslots - 1)
        if mf.tags[s].mask_id == 0xFFFF:
            if slot[0] == MF_NO_SLOT:
                slot[0] = s
        elif mf.tags[s].mask_id == id_ and mf.tags[s].hash == h and \
                words_eq(mf_entry(mf, mf.tags[s].idx).key, w):
            e = mf_entry(mf, mf.tags[s].idx)
            memcpy(&e.actions, a, sizeof(actions_t))   # the same flow: new decision
            e.last_used = now_ms
            return True
        elif victim[0] == MF_NO_SLOT or older(now_ms, slot_used(mf, s),
                                              slot_used(mf, victim[0])):
            victim[0] = s
    return False


cdef void mf_insert(mf_t *mf, const flow_key_t *k, const uint64_t *mask, uint32_t now_ms,
                    const actions_t *a) noexcept nogil:
    cdef uint64_t w[KEY_WORDS]
    cdef uint32_t i, h, idx, id_ = 0xFFFF, free_id = 0xFFFF
    cdef uint32_t slot = MF_NO_SLOT, victim = MF_NO_SLOT
    cdef mf_entry_t *e
    for i in range(mf.nmasks):
        if memcmp(mf.masks[i].mask, mask, sizeof(w)) == 0:
            id_ = i
            break
        if free_id == 0xFFFF and mf.masks[i].refs == 0:
            free_id = i
    if id_ == 0xFFFF:
        if free_id == 0xFFFF:
            if mf.nmasks == MF_MAX_MASKS:
                return                               # every mask in use: not cached
            free_id = mf.nmasks
            mf.order[mf.nmasks] = free_id
            mf.nmasks += 1
        id_ = free_id
        memcpy(mf.masks[id_].mask, mask, sizeof(w))
        mf.masks[id_].hits = 0
        mf.masks[id_].in_use = 1
        mf.masks[id_].port_only = is_port_only(mask)
    if mf.count + 1 > mf.nslots // 2 and mf_can_grow(mf):
        mf_grow(mf)
    key_words(k, w)
    h = mf_hash(masked_hash(w, mf.masks[id_].mask, w), id_)
    if mf_place(mf, h, id_, w, now_ms, a, &slot, &victim):
        return
    # a full neighbourhood: room (the table grows: tags only) rather than evict a live
    # entry (9 busy flows in 8 slots would re-upcall each other forever)
    while slot == MF_NO_SLOT and mf_can_grow(mf):
        i = mf.nslots
        mf_grow(mf)
        if mf.nslots == i:
            break                                    # no memory: evict instead
        victim = MF_NO_SLOT
        if mf_place(mf, h, id_, w, now_ms, a, &slot, &victim):
            return
    if slot == MF_NO_SLOT or (mf.count >= mf.limit and victim != MF_NO_SLOT):
        if victim == MF_NO_SLOT:
            return                                   # a full neighbourhood of nothing
        mf_drop(mf, victim)
        mf.evictions += 1
        slot = victim
    elif mf.count >= mf.limit and not mf_evict_one(mf, now_ms):
        return
    idx = mf_alloc(mf)
    if idx == MF_NO_SLOT:
        return                                       # no memory for the entry: not cached
    e = mf_entry(mf, idx)
    mf.tags[slot].hash = h
    mf.tags[slot].mask_id = id_
    mf.tags[slot].idx = idx
    e.last_used = now_ms
    e.mask_id = id_
    memcpy(e.key, w, sizeof(w))
    memcpy(&e.actions, a, sizeof(actions_t))
    mf.masks[id_].refs += 1
    mf.count += 1
    if (mf.count & 1023) == 0:
        mf_sort(mf)


cdef int mf_check(mf_t *mf) noexcept nogil:
    """0 when the cache is consistent (tests): occupied slots = count = the masks' refs,
    each names a distinct entry below ``high``, none of them free."""
    cdef uint32_t i, used = 0, refs = 0, idx
    cdef uint8_t *seen = <uint8_t *>calloc(mf.high + 1, 1)
    if seen == NULL:
        return -1
    for i in range(mf.nslots):
        if mf.tags[i].mask_id == 0xFFFF:
            continue
        used += 1
        idx = mf.tags[i].idx
        if idx >= mf.high or seen[idx] or mf.tags[i].mask_id >= mf.nmasks:
            free(seen)
            return 1
        seen[idx] = 1
    idx = mf.free_head
    while idx != MF_NO_SLOT:
        if idx >= mf.high or seen[idx]:
            free(seen)
            return 2                                 # a free entry in use, or a loop
        seen[idx] = 2
        idx = mf_entry(mf, idx).next_free
    for i in range(mf.high):
        if not seen[i]:
            free(seen)
            return 4                                 # an entry neither in use nor free
    for i in range(mf.nmasks):
        refs += mf.masks[i].refs
    free(seen)
    return 0 if used == mf.count and refs == mf.count else 3


cdef inline void shift_offload_offsets(pkt_t *p, int delta) noexcept nogil:
    """A tag pushed (+4) or popped (-4) moves the L3/L4 headers: so must the virtio-net
    header's csum_start (partial checksum) and hdr_len (segmentation)."""
    cdef uint16_t v
    if p.vnet_hdr[0] & 1:                                   # NEEDS_CSUM
        v = p.vnet_hdr[6] | (<uint16_t>p.vnet_hdr[7] << 8)
        v = <uint16_t>(v + delta)
        p.vnet_hdr[6] = v & 0xFF
        p.vnet_hdr[7] = v >> 8
    if p.vnet_hdr[1]:                                       # a GSO type
        v = p.vnet_hdr[2] | (<uint16_t>p.vnet_hdr[3] << 8)
        v = <uint16_t>(v + delta)
        p.vnet_hdr[2] = v & 0xFF
        p.vnet_hdr[3] = v >> 8


cdef int vlan_set(pkt_t *p, uint16_t vid) noexcept nogil:
    """Set the VLAN id, pushing an 802.1Q tag if the frame has none. -1: no room."""
    cdef uint16_t tci
    if p.len >= 18 and rd16(p.data + 12) == ETH_P_8021Q:
        tci = (rd16(p.data + 14) & 0xF000) | (vid & 0x0FFF)
    else:
        if p.len < 14 or p.data - p.buf < 4:
            return -1
        memmove(p.data - 4, p.data, 12)
        p.data -= 4
        p.len += 4
        p.cap += 4
        p.data[12] = ETH_P_8021Q >> 8
        p.data[13] = ETH_P_8021Q & 0xFF
        tci = vid & 0x0FFF
        shift_offload_offsets(p, 4)
    p.data[14] = tci >> 8
    p.data[15] = tci & 0xFF
    return 0


cdef void vlan_strip(pkt_t *p) noexcept nogil:
    if p.len >= 18 and rd16(p.data + 12) == ETH_P_8021Q:
        memmove(p.data + 4, p.data, 12)
        p.data += 4
        p.len -= 4
        p.cap -= 4
        shift_offload_offsets(p, -4)


def key_dict(bytes raw):
    """The fields of a ``flow_key_t`` given as raw bytes (the slow path's view)."""
    cdef flow_key_t k
    if len(raw) != sizeof(flow_key_t):
        raise ValueError("not a flow key")
    memcpy(&k, <const char *>raw, sizeof(flow_key_t))
    return {
        "in_port": k.in_port,
        "vlan_tci": k.vlan_tci,
        "dl_vlan": (k.vlan_tci & 0x0FFF) if k.vlan_tci else None,
        "dl_dst": bytes(k.dl_dst[:6]),
        "dl_src": bytes(k.dl_src[:6]),
        "dl_type": k.dl_type,
        "nw_src": (<uint8_t *>&k.nw_src)[:4],
        "nw_dst": (<uint8_t *>&k.nw_dst)[:4],
        "nw_proto": k.nw_proto,
        "nw_tos": k.nw_tos,
        "tp_src": k.tp_src,
        "tp_dst": k.tp_dst,
        "tun_id": k.tun_id,
        "tun_src": (<uint8_t *>&k.tun_src)[:4],
        "tun_dst": (<uint8_t *>&k.tun_dst)[:4],
        "arp_sha": bytes(k.arp_sha[:6]),
        "arp_tha": bytes(k.arp_tha[:6]),
    }


def frame_key(bytes frame, uint16_t in_port=0):
    """The raw ``flow_key_t`` of an Ethernet frame (tests and tools)."""
    cdef pkt_t p
    cdef flow_key_t k
    memset(&p, 0, sizeof(pkt_t))
    p.data = <uint8_t *><const char *>frame
    p.len = len(frame)
    flow_extract(&p, in_port, &k, False)
    return (<char *>&k)[:sizeof(flow_key_t)]


def frame_key_hash(bytes frame, uint16_t in_port=0, uint32_t tun_id=0, uint32_t tun_src=0,
                   uint32_t tun_dst=0):
    """(raw key, the hash flow_extract gave with it) of a frame with tunnel metadata (tests)."""
    cdef pkt_t p
    cdef flow_key_t k
    cdef uint32_t h
    memset(&p, 0, sizeof(pkt_t))
    p.data = <uint8_t *><const char *>frame
    p.len = len(frame)
    p.tun_id = tun_id
    p.tun_src = tun_src
    p.tun_dst = tun_dst
    h = flow_extract(&p, in_port, &k, True)
    return (<char *>&k)[:sizeof(flow_key_t)], h


def key_hash(bytes raw):
    """flow_hash of a raw ``flow_key_t`` (tests and tools)."""
    cdef flow_key_t k
    if len(raw) != sizeof(flow_key_t):
        raise ValueError("not a flow key")
    memcpy(&k, <const char *>raw, sizeof(flow_key_t))
    return flow_hash(&k)


def emc_probe(bytes stored, bytes probe, h=None):
    """Does an exact-match cache holding the raw key ``stored`` (inserted under hash ``h``,
    by default its flow_hash) answer a lookup of ``probe`` under the same hash? (tests:
    a probe that differs anywhere must miss, whatever the hash says)"""
    cdef flow_key_t ks, kp
    cdef actions_t a
    cdef emc_t *emc
    cdef uint32_t hv
    cdef bint found
    if len(stored) != sizeof(flow_key_t) or len(probe) != sizeof(flow_key_t):
        raise ValueError("not a flow key")
    memcpy(&ks, <const char *>stored, sizeof(flow_key_t))
    memcpy(&kp, <const char *>probe, sizeof(flow_key_t))
    hv = flow_hash(&ks) if h is None else <uint32_t>h
    memset(&a, 0, sizeof(a))
    a.gen = 1                                   # (0 marks an empty entry)
    emc = <emc_t *>calloc(1, sizeof(emc_t))
    if emc == NULL:
        raise MemoryError()
    emc_insert(emc, &ks, hv, &a)
    found = emc_lookup(emc, &kp, hv) != NULL
    free(emc)
    return found


cdef int _valid_unless_marked(void *ctx, const actions_t *a) noexcept nogil:
    return not (<const uint8_t *>ctx)[a.ops[0].arg]


def megaflow_hash(bytes key, bytes mask):
    """The probe hash of ``key`` under ``mask`` as mask id 0 (tests: keys that share a
    home slot)."""
    cdef uint64_t w[KEY_WORDS]
    cdef uint64_t m[KEY_WORDS]
    if len(key) != sizeof(flow_key_t) or len(mask) != sizeof(flow_key_t):
        raise ValueError("not a flow key")
    memcpy(w, <const char *>key, sizeof(w))
    memcpy(m, <const char *>mask, sizeof(m))
    return mf_hash(masked_hash(w, m, w), 0)


def megaflow_run(list ops, uint32_t limit=100000):
    """Run ``ops`` on a fresh megaflow cache (tests), checking its consistency (mf_check)
    after each: ("insert", key, mask, tag) caches ``tag`` (0..65535) for the key under the
    mask; ("lookup", key, hinted) answers the tag found or None, with mf_hint's (and
    mf_hint_entry's) hint for that key computed just before (hinted) or none;
    ("hint", key) computes a hint and keeps it, ("lookup_kept", key) looks up with the
    kept hint (stale by then, if inserts came between); ("lookup_raw", key, hint) with any
    64-bit hint; ("invalidate", tag): entries with that tag are no longer valid (a lookup
    that finds one frees it). Returns the lookups' answers and the cache's (entries, slots,
    masks in use, evictions) at the end."""
    cdef mf_t mf
    cdef flow_key_t k
    cdef uint64_t mask[KEY_WORDS]
    cdef uint64_t kept = MF_NO_HINT, hint
    cdef actions_t a
    cdef actions_t *found
    cdef uint32_t now_ms = 0
    cdef int bad
    cdef uint8_t *invalid = <uint8_t *>calloc(65536, 1)
    if invalid == NULL:
        raise MemoryError()
    if mf_init(&mf, limit) < 0:
        free(invalid)
        raise MemoryError()
    answers = []
    try:
        for n, op in enumerate(ops):
            now_ms += 1
            if op[0] == "invalidate":
                invalid[<uint16_t>op[1]] = 1
                continue
            if len(op[1]) != sizeof(flow_key_t):
                raise ValueError("not a flow key")
            memcpy(&k, <const char *>op[1], sizeof(flow_key_t))
            if op[0] == "insert":
                if len(op[2]) != sizeof(flow_key_t):
                    raise ValueError("not a flow key mask")
                memcpy(mask, <const char *>op[2], sizeof(mask))
                memset(&a, 0, sizeof(a))
                a.gen = 1
                a.n_ops = 1
                a.ops[0].arg = op[3]
                mf_insert(&mf, &k, mask, now_ms, &a)
            elif op[0] == "hint":
                kept = mf_hint(&mf, &k)
            elif op[0] in ("lookup", "lookup_kept", "lookup_raw"):
                if op[0] == "lookup_kept":
                    hint = kept
                elif op[0] == "lookup_raw":
                    hint = op[2]
                else:
                    hint = mf_hint(&mf, &k) if op[2] else MF_NO_HINT
                    mf_hint_entry(&mf, hint)
                found = mf_lookup(&mf, &k, now_ms, _valid_unless_marked, invalid, hint)
                answers.append(None if found == NULL else found.ops[0].arg)
            else:
                raise ValueError(f"no megaflow op {op[0]!r}")
            bad = mf_check(&mf)
            if bad:
                raise AssertionError(f"megaflow cache inconsistent ({bad}) after op {n}: {op[0]}")
        masks = sum(1 for i in range(mf.nmasks) if mf.masks[i].refs)
        return answers, (mf.count, mf.nslots, masks, mf.evictions)
    finally:
        mf_free(&mf)
        free(invalid)


KEY_FIELDS = ("in_port", "vlan_tci", "dl_dst", "dl_src", "dl_type", "nw_src", "nw_dst",
              "nw_proto", "nw_tos", "tp_src", "tp_dst", "tun_id", "tun_src", "tun_dst",
              "arp_sha", "arp_tha")


def pack_key(dict fields):
    """A raw ``flow_key_t`` (or a mask of one) from {field: value}: integers for in_port,
    vlan_tci, dl_type, nw_proto, nw_tos, tp_src, tp_dst, tun_id; 6 bytes for dl_src/dl_dst,
    arp_sha/arp_tha;
    4 bytes (network order) for nw_src/nw_dst/tun_src/tun_dst. Absent fields are 0."""
    cdef flow_key_t k
    memset(&k, 0, sizeof(flow_key_t))
    for name, v in fields.items():
        if name == "in_port":
            k.in_port = v
        elif name == "vlan_tci":
            k.vlan_tci = v
        elif name == "dl_type":
            k.dl_type = v
        elif name == "nw_proto":
            k.nw_proto = v
        elif name == "nw_tos":
            k.nw_tos = v
        elif name == "tp_src":
            k.tp_src = v
        elif name == "tp_dst":
            k.tp_dst = v
        elif name == "tun_id":
            k.tun_id = v
        elif name in ("tun_src", "tun_dst"):
            if len(v) != 4:
                raise ValueError(f"{name}: 4 bytes expected")
            memcpy(&k.tun_src if name == "tun_src" else &k.tun_dst, <const char *>v, 4)
        elif name in ("arp_sha", "arp_tha"):
            if len(v) != 6:
                raise ValueError(f"{name}: 6 bytes expected")
            memcpy(&k.arp_sha[0] if name == "arp_sha" else &k.arp_tha[0], <const char *>v, 6)
        elif name in ("dl_src", "dl_dst", "nw_src", "nw_dst"):
            size = 6 if name[0] == "d" else 4
            if len(v) != size:
                raise ValueError(f"{name}: {size} bytes expected")
            if name == "dl_src":
                memcpy(k.dl_src, <const char *>v, 6)
            elif name == "dl_dst":
                memcpy(k.dl_dst, <const char *>v, 6)
            elif name == "nw_src":
                memcpy(&k.nw_src, <const char *>v, 4)
            else:
                memcpy(&k.nw_dst, <const char *>v, 4)
        else:
            raise ValueError(f"no key field {name!r}")
    return (<char *>&k)[:sizeof(flow_key_t)]


KEY_SIZE = sizeof(flow_key_t)
ACTION_OPS = {"output": OP_OUTPUT, "flood": OP_FLOOD, "set_vlan": OP_SET_VLAN,
              "strip_vlan": OP_STRIP_VLAN, "normal": OP_NORMAL, "tun_hi": OP_TUN_HI,
              "set_tun_id": OP_SET_TUN_ID, "set_tun_dst": OP_SET_TUN_DST,
              "controller": OP_CONTROLLER, "in_port": OP_IN_PORT, "group": OP_GROUP,
              "meter": OP_METER, "set_eth_src": OP_SET_ETH_SRC, "set_eth_dst": OP_SET_ETH_DST,
              "set_nw_src": OP_SET_NW_SRC, "set_nw_dst": OP_SET_NW_DST,
              "set_tp_src": OP_SET_TP_SRC, "set_tp_dst": OP_SET_TP_DST,
              "set_dscp": OP_SET_DSCP, "set_pcp": OP_SET_PCP, "dec_ttl": OP_DEC_TTL}
MAX_OPS = MAX_ACTION_OPS
MAX_TABLE_HOPS = MAX_HOPS
EMC_SIZE = EMC_ENTRIES


def vlan_edit(bytes frame, bytes vnet_hdr, int vid=-1):
    """Push/set VLAN ``vid`` (or strip the tag when ``vid`` is -1) on a frame with its
    virtio-net header, as an action does (tests and tools): the new (frame, header)."""
    pool_obj = PacketPool(1, max(len(frame) + 64, 64))
    cdef PacketPool pool = pool_obj
    cdef pkt_t *p = pool_get(pool.pool)
    memcpy(p.data, <const char *>frame, len(frame))
    p.len = len(frame)
    memcpy(p.vnet_hdr, <const char *>vnet_hdr, 12)
    if vid < 0:
        vlan_strip(p)
    elif vlan_set(p, vid) < 0:
        pool_put(pool.pool, p)
        raise ValueError("no headroom for a tag")
    out = ((<char *>p.data)[:p.len], (<char *>p.vnet_hdr)[:12])
    pool_put(pool.pool, p)
    return out
