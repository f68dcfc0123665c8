# cython: language_level=3
"""The compiled classifier of a bridge: tuple-space search over rules given as (table,
priority, mask, value, ops). Rules with the same mask share a subtable (a hash table of
masked values, each value heading a chain of its rules by priority); a table's subtables
are searched highest ``max_priority`` first and the search stops as soon as no remaining
subtable can beat the best match. The union of the masks of the subtables actually
searched is the megaflow mask: every packet that agrees with the looked-up key on those
bits gets the same answer. ``goto_table`` continues the lookup in a later table.
A subtable matching a CIDR prefix of nw_src or nw_dst is first asked of the table's
prefix trie (``_trie``): when no rule has that prefix length on the packet's address it is
skipped, and the megaflow takes only the address bits the trie walk looked at.
OpenFlow's pipeline state travels with the lookup: a metadata word after the key (0 at
table 0, changed by write_metadata, matched like a key field but never part of the
megaflow: it is a function of the key), the apply-actions' edits of the key a later table
sees (VLAN, set-field), and the action set (write/clear actions) appended, in the spec's
order, when a rule without goto_table ends the pipeline.

PMD threads call ``cls_lookup`` without the GIL under the read lock; control changes take
the write lock and bump ``gen``. Removed rules are kept until ``reclaim()`` (called once
no PMD can still hold them); a rule compiled again (``carry``) takes over the old one's
id and counters, and reclaim() adds to it what PMDs still counted into the old one meanwhile (as
OVS forwards a replaced rule's late stats to its successor). No rule syntax, no MAC
learning, no ports here.
"""

from libc.stdint cimport int8_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc, realloc
from libc.string cimport memcmp, memcpy, memset

from pyvhost._flow cimport (
    KEY_WORDS, MAX_ACTION_OPS, MAX_HOPS, OP_CONTROLLER, OP_DEC_TTL, OP_FLOOD, OP_GROUP,
    OP_IN_PORT, OP_METER, OP_NORMAL, OP_OUTPUT, OP_SET_DSCP, OP_SET_ETH_DST, OP_SET_ETH_SRC,
    OP_SET_NW_DST, OP_SET_NW_SRC, OP_SET_PCP, OP_SET_TP_DST, OP_SET_TP_SRC, OP_SET_TUN_DST,
    OP_SET_TUN_ID, OP_SET_VLAN, OP_STRIP_VLAN, OP_TUN_HI,
)
from pyvhost._trie cimport (
    TRIE_NODES_PER_INSERT, prefix_len, prefix_mask, spare_move, spare_reserve, spare_trim,
    trie_free, trie_insert, trie_lookup, trie_node_t, trie_remove, trie_spare_t,
)

cdef extern from *:
    """
    static inline void cls_add_u64(uint64_t *p, uint64_t v)
    { __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }   /* PMDs add to it at the same time */
    """
    void cls_add_u64(uint64_t *p, uint64_t v) noexcept nogil

cdef extern from "pthread.h" nogil:
    ctypedef struct pthread_rwlockattr_t:
        pass
    int pthread_rwlock_init(pthread_rwlock_t *l, const pthread_rwlockattr_t *a)
    int pthread_rwlock_destroy(pthread_rwlock_t *l)
    int pthread_rwlock_rdlock(pthread_rwlock_t *l)
    int pthread_rwlock_wrlock(pthread_rwlock_t *l)
    int pthread_rwlock_unlock(pthread_rwlock_t *l)
    int pthread_rwlockattr_init(pthread_rwlockattr_t *a)
    int pthread_rwlockattr_setkind_np(pthread_rwlockattr_t *a, int pref)
    enum:
        PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP

cdef enum:
    MIN_BUCKETS = 16
    KEY_BYTES = KEY_WORDS * 8
    CLS_BYTES = CLS_WORDS * 8     # a rule's value or mask: the key and the metadata word
    NW_SRC_OFFSET = 20       # flow_key_t.nw_src; nw_dst follows (both network order)
    SPARE_KEEP = 256         # trie nodes kept for the next change
    MIN_OPS_CAP = 4          # ops a rule has room for at least (see ops_room)


cdef size_t _rule_head() noexcept nogil:
    cdef cls_rule_t r
    return <size_t>(<char *>&r.ops[0] - <char *>&r)


# A rule is allocated with room for its own ops only (rule_size): the whole array is 128
# bytes, most rules use one or two ops, and a 100k-rule table held 12 MiB of unused ones.
# A change that gives a rule more ops than it has room for replaces it (sub_replace).
cdef size_t RULE_HEAD = _rule_head()


cdef inline uint32_t ops_room(uint32_t n_ops) noexcept nogil:
    """Room for ``n_ops``, rounded up to 4 ops (16 bytes: malloc's step, so the room is
    there anyway; RULE_HEAD + 8 is a multiple of 16), at most MAX_ACTION_OPS."""
    cdef uint32_t cap = (n_ops + 3) & ~(<uint32_t>3)
    if cap < MIN_OPS_CAP:
        return MIN_OPS_CAP
    return cap if cap < MAX_ACTION_OPS else MAX_ACTION_OPS


cdef inline size_t rule_size(uint32_t cap) noexcept nogil:
    return RULE_HEAD + cap * sizeof(action_op_t)


# -- the address fields the tries cover -------------------------------------------------------

cdef inline uint32_t addr_of(const uint64_t *w, int f) noexcept nogil:
    """nw_src (f=0) or nw_dst (f=1) of a key or mask, as a host-order number."""
    cdef const uint8_t *b = (<const uint8_t *>w) + NW_SRC_OFFSET + 4 * f
    return (<uint32_t>b[0] << 24) | (<uint32_t>b[1] << 16) | (<uint32_t>b[2] << 8) | b[3]


cdef inline void addr_or(uint64_t *w, int f, uint32_t v) noexcept nogil:
    cdef uint8_t *b = (<uint8_t *>w) + NW_SRC_OFFSET + 4 * f
    b[0] |= v >> 24
    b[1] |= (v >> 16) & 0xFF
    b[2] |= (v >> 8) & 0xFF
    b[3] |= v & 0xFF


cdef void cls_read_lock(cls_t *c) noexcept nogil:
    pthread_rwlock_rdlock(&c.lock)


cdef void cls_unlock(cls_t *c) noexcept nogil:
    pthread_rwlock_unlock(&c.lock)


# -- subtables ----------------------------------------------------------------------------

cdef inline uint64_t mix(uint64_t h, uint64_t w) noexcept nogil:
    h ^= w
    h *= 0xFF51AFD7ED558CCDULL
    return h ^ (h >> 32)


cdef inline uint32_t cls_masked_hash(const uint64_t *w, const uint64_t *mask,
                                     uint64_t *out) noexcept nogil:
    """Hash of the CLS_WORDS of ``w & mask`` (key and metadata), written to ``out``."""
    cdef uint64_t h = 0x9E3779B97F4A7C15ULL
    cdef int i
    for i in range(CLS_WORDS):
        out[i] = w[i] & mask[i]
        h = mix(h, out[i])
    return <uint32_t>h


cdef inline uint32_t value_hash(const uint64_t *value) noexcept nogil:
    cdef uint64_t all_ones[CLS_WORDS]
    cdef uint64_t scratch[CLS_WORDS]
    memset(all_ones, 0xFF, sizeof(all_ones))
    return cls_masked_hash(value, all_ones, scratch)


cdef inline bint covers_mask(const uint64_t *outer, const uint64_t *inner) noexcept nogil:
    """Every bit of ``inner`` is in ``outer``."""
    cdef int i
    for i in range(CLS_WORDS):
        if inner[i] & ~outer[i]:
            return False
    return True


cdef cls_rule_t *sub_find_head(cls_sub_t *s, const uint64_t *value, uint32_t h) noexcept nogil:
    cdef cls_rule_t *r = s.buckets[h & (s.nbuckets - 1)]
    while r != NULL:
        if r.hash == h and memcmp(r.value, value, CLS_BYTES) == 0:
            return r
        r = r.hnext
    return NULL


cdef inline bint ranks_before(const cls_rule_t *a, const cls_rule_t *b) noexcept nogil:
    return a.priority > b.priority or (a.priority == b.priority and a.seq < b.seq)


cdef int sub_grow(cls_sub_t *s) noexcept nogil:
    cdef uint32_t n = s.nbuckets * 2, i
    cdef cls_rule_t **b = <cls_rule_t **>calloc(n, sizeof(cls_rule_t *))
    cdef cls_rule_t *r
    cdef cls_rule_t *nxt
    if b == NULL:
        return -1
    for i in range(s.nbuckets):
        r = s.buckets[i]
        while r != NULL:
            nxt = r.hnext
            r.hnext = b[r.hash & (n - 1)]
            b[r.hash & (n - 1)] = r
            r = nxt
    free(s.buckets)
    s.buckets = b
    s.nbuckets = n
    return 0


cdef cls_rule_t **head_link(cls_sub_t *s, const cls_rule_t *r) noexcept nogil:
    """The link (a bucket or a head's ``hnext``) that holds the head of ``r``'s value, or
    the NULL ending its bucket's chain."""
    cdef cls_rule_t **link = &s.buckets[r.hash & (s.nbuckets - 1)]
    while link[0] != NULL and not (link[0].hash == r.hash and
                                   memcmp(link[0].value, r.value, CLS_BYTES) == 0):
        link = &link[0].hnext
    return link


cdef void sub_insert(cls_sub_t *s, cls_rule_t *r) noexcept nogil:
    cdef cls_rule_t **link = head_link(s, r)
    cdef cls_rule_t *head = link[0]
    cdef cls_rule_t *cur
    r.sub = s
    s.n_rules += 1
    if r.priority > s.max_priority or s.n_rules == 1:
        s.max_priority = r.priority
        s.n_max = 1
    elif r.priority == s.max_priority:
        s.n_max += 1
    if head == NULL:                                   # a new value
        r.hnext = NULL
        r.pnext = NULL
        link[0] = r
        s.n_heads += 1
        if s.n_heads > s.nbuckets:
            sub_grow(s)
        return
    if ranks_before(r, head):                          # the new head of its chain
        r.hnext = head.hnext
        head.hnext = NULL
        r.pnext = head
        link[0] = r
        return
    cur = head
    while cur.pnext != NULL and not ranks_before(r, cur.pnext):
        cur = cur.pnext
    r.pnext = cur.pnext
    r.hnext = NULL
    cur.pnext = r


cdef void sub_remove(cls_sub_t *s, cls_rule_t *r) noexcept nogil:
    cdef cls_rule_t **link = head_link(s, r)
    cdef cls_rule_t *head = link[0]
    cdef cls_rule_t *cur
    if head == NULL:
        return
    s.n_rules -= 1
    if head == r:
        if r.pnext != NULL:                            # the next rule heads the chain
            r.pnext.hnext = r.hnext
            link[0] = r.pnext
        else:
            link[0] = r.hnext
            s.n_heads -= 1
    else:
        cur = head
        while cur.pnext != NULL and cur.pnext != r:
            cur = cur.pnext
        if cur.pnext == r:
            cur.pnext = r.pnext
    r.hnext = NULL
    r.pnext = NULL


cdef void sub_replace(cls_sub_t *s, cls_rule_t *old, cls_rule_t *new) noexcept nogil:
    """``new`` (a copy of ``old``: the same value, hash, priority and seq) takes old's
    place in its subtable; old is left out of it (its own links as they were)."""
    cdef cls_rule_t **link = head_link(s, old)
    cdef cls_rule_t *cur = link[0]
    new.sub = s
    new.hnext = old.hnext
    new.pnext = old.pnext
    if cur == old:
        link[0] = new
        return
    while cur != NULL and cur.pnext != old:
        cur = cur.pnext
    if cur != NULL:
        cur.pnext = new


cdef void sub_recompute_max(cls_sub_t *s) noexcept nogil:
    """max_priority and how many rules have it: a walk of every rule, done only when the
    last rule at the old maximum goes (so removing n rules costs O(n) in all, not O(n^2))."""
    cdef uint32_t i, m = 0, n = 0
    cdef cls_rule_t *head
    cdef cls_rule_t *r
    for i in range(s.nbuckets):
        head = s.buckets[i]
        while head != NULL:
            r = head
            while r != NULL and r.priority >= m:
                if r.priority > m:
                    m = r.priority
                    n = 0
                n += 1
                r = r.pnext
            head = head.hnext
    s.max_priority = m
    s.n_max = n


cdef void table_sort(cls_table_t *t) noexcept nogil:
    cdef uint32_t i, j
    cdef cls_sub_t *x
    for i in range(1, t.nsubs):
        x = t.subs[i]
        j = i
        while j > 0 and t.subs[j - 1].max_priority < x.max_priority:
            t.subs[j] = t.subs[j - 1]
            j -= 1
        t.subs[j] = x


# -- one lookup -----------------------------------------------------------------------------

cdef cls_rule_t *table_lookup(cls_table_t *t, const uint64_t *w, uint64_t *mask) noexcept nogil:
    cdef uint64_t m[CLS_WORDS]
    cdef uint64_t plens[TRIE_FIELDS]
    cdef uint32_t check[TRIE_FIELDS]
    cdef uint32_t need[TRIE_FIELDS]                    # address bits the misses relied on
    cdef uint32_t i, h, bits
    cdef int j, f, looked = 0, plen
    cdef bint proved
    cdef cls_sub_t *s
    cdef cls_rule_t *best = NULL
    cdef cls_rule_t *r
    need[0] = need[1] = check[0] = check[1] = 0
    plens[0] = plens[1] = 0
    for i in range(t.nsubs):
        s = t.subs[i]
        if best != NULL and s.max_priority < best.priority:
            break                                      # nothing further can win
        if s.n_rules == 0:
            continue
        h = cls_masked_hash(w, s.mask, m)             # == value_hash of the masked key
        r = sub_find_head(s, m, h)
        if r != NULL:
            for j in range(KEY_WORDS):
                mask[j] |= s.mask[j]
            if best == NULL or ranks_before(r, best):
                best = r
            continue
        # a miss: when no rule of this subtable has its prefix on the packet's address,
        # a few leading address bits prove it (the trie walk); else every bit counts
        proved = False
        for f in range(TRIE_FIELDS):
            plen = s.plen[f]
            if plen <= 0:
                continue
            if not looked & (1 << f):
                plens[f] = trie_lookup(&t.tries[f], addr_of(w, f), &check[f])
                looked |= 1 << f
            if not (plens[f] >> plen) & 1:
                bits = check[f] if check[f] < <uint32_t>plen else <uint32_t>plen
                if bits > need[f]:
                    need[f] = bits
                proved = True
                break
        if not proved:
            for j in range(KEY_WORDS):
                mask[j] |= s.mask[j]
    for f in range(TRIE_FIELDS):
        if need[f]:
            addr_or(mask, f, prefix_mask(need[f]))
    return best


# -- the action set (OpenFlow write_actions / clear_actions) ------------------------------------
# One action of each kind, run when the pipeline ends, in the spec's order (5.10): pop,
# push/set VLAN, dec TTL, set-field (one per field), group, then output (not when a group
# is set).

cdef enum:
    ASET_POP_VLAN = 0
    ASET_SET_VLAN = 1
    ASET_DEC_TTL = 2
    ASET_TUN_ID = 3            # set-field: OP_SET_TUN_ID .. ; one slot per field
    ASET_TUN_DST = 4
    ASET_ETH_SRC = 5
    ASET_ETH_DST = 6
    ASET_NW_SRC = 7
    ASET_NW_DST = 8
    ASET_TP_SRC = 9
    ASET_TP_DST = 10
    ASET_DSCP = 11
    ASET_PCP = 12
    ASET_GROUP = 14
    ASET_OUTPUT = 15


cdef inline int wide_ops(uint16_t op) noexcept nogil:
    """How many OP_TUN_HI an op's value takes (its high bits)."""
    if op == OP_SET_ETH_SRC or op == OP_SET_ETH_DST:
        return 2
    if op == OP_SET_TUN_ID or op == OP_SET_TUN_DST or op == OP_SET_NW_SRC or \
            op == OP_SET_NW_DST:
        return 1
    return 0


cdef inline int aset_slot_of(uint16_t op) noexcept nogil:
    """The action-set slot of an op (-1: none, e.g. a meter: an instruction)."""
    if op == OP_STRIP_VLAN:
        return ASET_POP_VLAN
    if op == OP_SET_VLAN:
        return ASET_SET_VLAN
    if op == OP_DEC_TTL:
        return ASET_DEC_TTL
    if op == OP_SET_TUN_ID:
        return ASET_TUN_ID
    if op == OP_SET_TUN_DST:
        return ASET_TUN_DST
    if op == OP_SET_ETH_SRC:
        return ASET_ETH_SRC
    if op == OP_SET_ETH_DST:
        return ASET_ETH_DST
    if op == OP_SET_NW_SRC:
        return ASET_NW_SRC
    if op == OP_SET_NW_DST:
        return ASET_NW_DST
    if op == OP_SET_TP_SRC:
        return ASET_TP_SRC
    if op == OP_SET_TP_DST:
        return ASET_TP_DST
    if op == OP_SET_DSCP:
        return ASET_DSCP
    if op == OP_SET_PCP:
        return ASET_PCP
    if op == OP_GROUP:
        return ASET_GROUP
    if op == OP_OUTPUT or op == OP_FLOOD or op == OP_NORMAL or op == OP_CONTROLLER or \
            op == OP_IN_PORT:
        return ASET_OUTPUT
    return -1


cdef void aset_write(aset_t *s, const cls_rule_t *r) noexcept nogil:
    """Merge the rule's write-actions into the set (an action replaces its kind's)."""
    cdef uint32_t i, first
    cdef int slot, j
    for i in range(r.n_apply, r.n_ops):
        if r.ops[i].op == OP_TUN_HI:
            continue                                   # (taken with the op after it)
        slot = aset_slot_of(r.ops[i].op)
        if slot < 0:
            continue                                   # (refused when the rule was built)
        s.op[slot] = r.ops[i]
        s.npre[slot] = wide_ops(r.ops[i].op)
        first = i - s.npre[slot]                       # (_set_ops checked they are there)
        for j in range(s.npre[slot]):
            s.pre[slot][j] = r.ops[first + j]
        s.used |= (<uint32_t>1) << slot


cdef int aset_emit(const aset_t *s, cls_result_t *out) noexcept nogil:
    """Append the set's actions in the spec's order; -1 if they do not fit."""
    cdef int slot, j
    for slot in range(ASET_SLOTS):
        if not (s.used >> slot) & 1:
            continue
        if slot == ASET_OUTPUT and (s.used >> ASET_GROUP) & 1:
            continue                                   # a group replaces the output
        if out.n_ops + 1 + s.npre[slot] > MAX_ACTION_OPS:
            return -1
        for j in range(s.npre[slot]):
            out.ops[out.n_ops] = s.pre[slot][j]
            out.n_ops += 1
        out.ops[out.n_ops] = s.op[slot]
        out.n_ops += 1
    return 0


cdef void key_apply(flow_key_t *k, uint16_t op, uint64_t v, uint64_t *mask) noexcept nogil:
    """What an apply-action set-field does to the key a later table matches (``v``: its
    value with its OP_TUN_HI bits); only where the key has that header. Whether it has
    is a decision on bits of the key (tagged, dl_type, nw_proto): those go into ``mask``
    (the megaflow's), so a packet differing there never reuses the outcome."""
    cdef int j
    cdef uint8_t *b
    cdef flow_key_t *m = <flow_key_t *>mask
    if op == OP_SET_VLAN:
        k.vlan_tci = (k.vlan_tci & 0xE000) | 0x1000 | (v & 0xFFF)
    elif op == OP_STRIP_VLAN:
        k.vlan_tci = 0
    elif op == OP_SET_PCP:
        m.vlan_tci |= 0x1000
        if k.vlan_tci & 0x1000:                        # tagged (the key's CFI bit is on)
            k.vlan_tci = (k.vlan_tci & 0x1FFF) | ((v & 7) << 13)
    elif op == OP_SET_ETH_SRC or op == OP_SET_ETH_DST:
        b = &k.dl_src[0] if op == OP_SET_ETH_SRC else &k.dl_dst[0]
        for j in range(6):
            b[j] = (v >> (40 - 8 * j)) & 0xFF
    elif op == OP_SET_TUN_ID:
        k.tun_id = <uint32_t>v
    elif op == OP_SET_TUN_DST:                         # (network order in the key)
        b = <uint8_t *>&k.tun_dst
        for j in range(4):
            b[j] = (v >> (24 - 8 * j)) & 0xFF
    elif op == OP_SET_NW_SRC or op == OP_SET_NW_DST or op == OP_SET_DSCP or \
            op == OP_SET_TP_SRC or op == OP_SET_TP_DST:
        m.dl_type = 0xFFFF
        if k.dl_type != 0x0800:
            return
        if op == OP_SET_NW_SRC or op == OP_SET_NW_DST:
            b = <uint8_t *>&k.nw_src if op == OP_SET_NW_SRC else <uint8_t *>&k.nw_dst
            for j in range(4):
                b[j] = (v >> (24 - 8 * j)) & 0xFF
        elif op == OP_SET_DSCP:
            k.nw_tos = (k.nw_tos & 3) | ((v & 0x3F) << 2)
        else:
            m.nw_proto = 0xFF
            if k.nw_proto == 6 or k.nw_proto == 17:
                if op == OP_SET_TP_SRC:
                    k.tp_src = <uint16_t>v
                else:
                    k.tp_dst = <uint16_t>v


cdef void key_run(flow_key_t *k, const action_op_t *ops, uint32_t n,
                  uint64_t *mask) noexcept nogil:
    """``key_apply`` of ``n`` ops in order (an op's OP_TUN_HI bits before it)."""
    cdef uint64_t hi = 0
    cdef uint32_t i
    for i in range(n):
        if ops[i].op == OP_TUN_HI:
            hi = (hi << 16) | ops[i].arg
        else:
            key_apply(k, ops[i].op, (hi << 16) | ops[i].arg, mask)
            hi = 0


cdef void cls_lookup(cls_t *c, const flow_key_t *k, uint64_t *mask, cls_result_t *out) noexcept nogil:
    """Run the tables from table 0 (the caller holds the read lock): the rules matched,
    their ops in order, and the mask of every bit consulted OR-ed into ``mask``. A later
    table sees the packet as the earlier tables' VLAN ops left it (OpenFlow: apply-actions
    change the packet the next table matches); the bits it consults are masked in the
    packet's own key, which those ops' outcome is a function of (conservative, correct).
    The metadata word (after the key) starts at 0 and changes only by write_metadata of
    the rules matched, so it is a function of the key too and never in the megaflow.
    Write-actions gather in an action set, run (appended) when a rule without
    goto_table ends the pipeline; a table miss drops the packet and the set with it."""
    cdef uint64_t w[CLS_WORDS]
    cdef flow_key_t *key = <flow_key_t *>w
    cdef int table = 0
    cdef uint32_t i
    cdef cls_rule_t *r
    cdef aset_t aset
    aset.used = 0
    memcpy(w, k, sizeof(flow_key_t))
    w[KEY_WORDS] = 0
    out.n_rules = 0
    out.n_ops = 0
    out.flags = 0
    out.overflow = 0
    while out.n_rules < MAX_HOPS and c.tables[table] != NULL:
        r = table_lookup(c.tables[table], w, mask)
        if r == NULL:
            break                                      # table miss: drop
        out.rules[out.n_rules] = r
        out.n_rules += 1
        if out.n_ops + r.n_apply > MAX_ACTION_OPS:
            out.overflow = 1
            break
        memcpy(&out.ops[out.n_ops], r.ops, r.n_apply * sizeof(action_op_t))
        out.n_ops += r.n_apply
        key_run(key, r.ops, r.n_apply, mask)           # a later table sees their edits
        out.flags |= r.flags
        if r.flags & RULE_CLEAR:
            aset.used = 0
        if r.n_ops > r.n_apply:
            aset_write(&aset, r)
        if r.flags & RULE_WRITE_MD:
            w[KEY_WORDS] = (w[KEY_WORDS] & ~r.md_mask) | r.md_value
        if r.goto_table == NO_GOTO or r.goto_table <= table:
            if aset.used and aset_emit(&aset, out) < 0:
                out.overflow = 1
            break
        if out.n_rules == MAX_HOPS:
            out.overflow = 1                           # a longer chain than an entry holds
            break
        table = r.goto_table


# -- the Python face ------------------------------------------------------------------------

cdef inline void key_words(bytes raw, uint64_t *out) except *:
    """A rule's value or mask (CLS_WORDS words): given as a flow key (KEY_BYTES, the
    metadata word then 0: not matched) or a flow key and the metadata (CLS_BYTES)."""
    if len(raw) != KEY_BYTES and len(raw) != CLS_BYTES:
        raise ValueError(f"a key or mask is {KEY_BYTES} bytes ({CLS_BYTES} with metadata)")
    out[KEY_WORDS] = 0
    memcpy(out, <const char *>raw, len(raw))


def key_after(bytes key, ops):
    """(the flow key ``key`` as the datapath ops ``ops``, (op, arg) pairs, leave it, the
    bits of ``key`` that outcome depends on as a mask): what NORMAL after set_field sees
    (trace)."""
    cdef uint64_t w[KEY_WORDS]
    cdef uint64_t m[KEY_WORDS]
    cdef action_op_t op[1]
    cdef uint64_t hi = 0
    if len(key) != KEY_BYTES:
        raise ValueError(f"a flow key is {KEY_BYTES} bytes")
    memcpy(w, <const char *>key, KEY_BYTES)
    memset(m, 0, KEY_BYTES)
    for code, arg in ops:
        if code == OP_TUN_HI:
            hi = (hi << 16) | <uint16_t>arg
        else:
            key_apply(<flow_key_t *>w, <uint16_t>code, (hi << 16) | <uint16_t>arg, m)
            hi = 0
    return (<char *>w)[:KEY_BYTES], (<char *>m)[:KEY_BYTES]


cdef class Classifier:
    """One bridge's rules. Rule ids are small integers chosen here (reused after removal)."""

    def __cinit__(self):
        cdef pthread_rwlockattr_t attr
        self.c = <cls_t *>calloc(1, sizeof(cls_t))
        if self.c == NULL:
            raise MemoryError()
        pthread_rwlockattr_init(&attr)
        pthread_rwlockattr_setkind_np(&attr, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP)
        pthread_rwlock_init(&self.c.lock, &attr)
        self.c.gen = 1
        self.carried = []
        self.gone = []

    def __dealloc__(self):
        cdef uint32_t t, i, b
        cdef cls_table_t *tab
        cdef cls_rule_t *r
        cdef cls_rule_t *nxt
        if self.c == NULL:
            return
        self._free_graveyard()
        for i in range(self.c.next_id):
            free(self.c.by_id[i])
        for t in range(CLS_TABLES):
            tab = self.c.tables[t]
            if tab == NULL:
                continue
            for i in range(tab.nsubs):
                free(tab.subs[i].buckets)
                free(tab.subs[i])
            for i in range(TRIE_FIELDS):
                trie_free(&tab.tries[i])
            free(tab.subs)
            free(tab)
        spare_trim(&self.c.spare, 0)
        free(self.c.by_id)
        free(self.c.free_ids)
        pthread_rwlock_destroy(&self.c.lock)
        free(self.c)

    cdef void _free_graveyard(self) noexcept nogil:
        cdef cls_rule_t *r = self.c.graveyard
        cdef cls_rule_t *nxt
        while r != NULL:
            nxt = r.hnext
            free(r)
            r = nxt
        self.c.graveyard = NULL

    # -- changes (write lock) -------------------------------------------------------------
    cdef void _bump(self) noexcept nogil:
        self.c.gen += 1
        if self.c.gen == 0:
            self.c.gen = 1

    cdef cls_sub_t *_subtable(self, int table, const uint64_t *mask) except NULL:
        cdef cls_table_t *t = self.c.tables[table]
        cdef cls_sub_t *s
        cdef cls_sub_t **subs
        cdef uint32_t i
        if t == NULL:
            t = <cls_table_t *>calloc(1, sizeof(cls_table_t))
            if t == NULL:
                raise MemoryError()
            self.c.tables[table] = t
        for i in range(t.nsubs):
            if memcmp(t.subs[i].mask, mask, CLS_BYTES) == 0:
                return t.subs[i]
        if t.nsubs == t.cap:
            subs = <cls_sub_t **>realloc(t.subs, (t.cap * 2 + 8) * sizeof(cls_sub_t *))
            if subs == NULL:
                raise MemoryError()
            t.subs = subs
            t.cap = t.cap * 2 + 8
        s = <cls_sub_t *>calloc(1, sizeof(cls_sub_t))
        if s == NULL:
            raise MemoryError()
        s.buckets = <cls_rule_t **>calloc(MIN_BUCKETS, sizeof(cls_rule_t *))
        if s.buckets == NULL:
            free(s)
            raise MemoryError()
        s.nbuckets = MIN_BUCKETS
        memcpy(s.mask, mask, CLS_BYTES)
        for i in range(TRIE_FIELDS):
            s.plen[i] = <int8_t>prefix_len(addr_of(mask, i))
        t.subs[t.nsubs] = s
        t.nsubs += 1
        return s

    cdef uint32_t _new_id(self) except? 0xFFFFFFFF:
        cdef cls_rule_t **by_id
        cdef uint32_t *free_ids
        cdef uint32_t cap
        if self.c.n_free:
            self.c.n_free -= 1
            return self.c.free_ids[self.c.n_free]
        if self.c.next_id == self.c.id_cap:
            cap = self.c.id_cap * 2 + 64
            by_id = <cls_rule_t **>realloc(self.c.by_id, cap * sizeof(cls_rule_t *))
            if by_id == NULL:
                raise MemoryError()
            self.c.by_id = by_id
            free_ids = <uint32_t *>realloc(self.c.free_ids, cap * sizeof(uint32_t))
            if free_ids == NULL:
                raise MemoryError()
            self.c.free_ids = free_ids
            self.c.id_cap = cap
        self.c.by_id[self.c.next_id] = NULL
        self.c.next_id += 1
        return self.c.next_id - 1

    cdef cls_rule_t *_rule(self, uint32_t rule_id) except NULL:
        if rule_id >= self.c.next_id or self.c.by_id[rule_id] == NULL:
            raise KeyError(rule_id)
        return self.c.by_id[rule_id]

    cdef int _set_ops(self, cls_rule_t *r, ops, int goto_table, inst) except -1:
        """The rule's apply-actions ``ops``, goto_table and, in ``inst`` (None: none), its
        other OpenFlow instructions: (write-actions ops, clear_actions, None or
        write_metadata's (value, mask))."""
        cdef int i = 0, n_apply
        write, clear, md = ((), False, None) if inst is None else inst
        if len(ops) + len(write) > MAX_ACTION_OPS:
            raise ValueError(f"more than {MAX_ACTION_OPS} actions")
        if not (goto_table == NO_GOTO or r.table < goto_table < CLS_TABLES):
            raise ValueError(f"goto_table:{goto_table} must name a later table "
                             f"(after {r.table}, below {CLS_TABLES})")
        r.flags = 0
        for op, arg in ops:
            if not (0 < op < 0x10000 and 0 <= arg < 0x10000):
                raise ValueError(f"bad op ({op}, {arg})")
            r.ops[i].op = op
            r.ops[i].arg = arg
            if op == OP_NORMAL:
                r.flags |= RULE_NORMAL
            i += 1
        n_apply = i
        pending = 0                                    # OP_TUN_HI ops waiting for their op
        for op, arg in write:
            if not (0 < op < 0x10000 and 0 <= arg < 0x10000):
                raise ValueError(f"bad op ({op}, {arg})")
            if op == OP_TUN_HI:
                pending += 1
            elif aset_slot_of(op) < 0:
                raise ValueError(f"write-actions: op {op} has no place in an action set")
            elif pending != wide_ops(op):
                raise ValueError(f"write-actions: op {op} takes {wide_ops(op)} high-bits "
                                 f"ops first, not {pending}")
            else:
                pending = 0
            r.ops[i].op = op
            r.ops[i].arg = arg
            if op == OP_NORMAL:
                r.flags |= RULE_NORMAL
            i += 1
        if pending:
            raise ValueError("write-actions end in a high-bits op")
        r.n_ops = i
        r.n_apply = n_apply
        r.md_value = r.md_mask = 0
        if clear:
            r.flags |= RULE_CLEAR
        if md is not None:
            if not (0 <= md[0] < 1 << 64 and 0 <= md[1] < 1 << 64):
                raise ValueError(f"write_metadata {md!r}: 64-bit value and mask")
            r.flags |= RULE_WRITE_MD
            r.md_mask = md[1]
            r.md_value = md[0] & md[1]
        r.goto_table = goto_table
        return 0

    cdef cls_rule_t *_build(self, spec, uint64_t *m) except NULL:
        """A rule made from a spec, not linked anywhere yet; its mask written to ``m``."""
        cdef cls_rule_t tmp                            # (room for every op)
        cdef cls_rule_t *r
        cdef uint32_t i, cap
        table, priority, mask, value, ops, goto_table = spec[:6]
        memset(&tmp, 0, RULE_HEAD)
        key_words(mask, m)
        key_words(value, tmp.value)
        for i in range(CLS_WORDS):
            tmp.value[i] &= m[i]
        tmp.table = table
        tmp.priority = priority
        self._set_ops(&tmp, ops, goto_table, spec[6] if len(spec) > 6 else None)
        tmp.hash = value_hash(tmp.value)
        cap = ops_room(tmp.n_ops)
        r = <cls_rule_t *>calloc(1, rule_size(cap))
        if r == NULL:
            raise MemoryError()
        memcpy(r, &tmp, rule_size(tmp.n_ops))
        r.ops_cap = cap
        return r

    cdef uint32_t _link(self, cls_rule_t *r, const uint64_t *m,
                        int64_t rule_id=-1) except? 0xFFFFFFFF:
        """Put a built rule into its table (write lock held); its id: ``rule_id`` when
        given (a removed rule's, kept out of the free ids for it), else a free one."""
        cdef cls_sub_t *s = self._subtable(r.table, m)
        cdef cls_table_t *t = self.c.tables[r.table]
        cdef uint32_t old_max = s.max_priority
        cdef int i
        r.id = self._new_id() if rule_id < 0 else <uint32_t>rule_id
        r.seq = self.c.next_seq
        self.c.next_seq += 1
        self.c.by_id[r.id] = r
        self.c.bytes += rule_size(r.ops_cap)
        sub_insert(s, r)
        for i in range(TRIE_FIELDS):
            if s.plen[i] > 0:
                trie_insert(&t.tries[i], &self.c.spare, addr_of(r.value, i), s.plen[i])
        t.n_rules += 1
        self.c.n_rules += 1
        if s.n_rules == 1 or s.max_priority != old_max:
            table_sort(t)
        return r.id

    cdef void _remove(self, cls_rule_t *r, bint free_id=True) noexcept nogil:
        cdef cls_sub_t *s = <cls_sub_t *>r.sub
        cdef cls_table_t *t = self.c.tables[r.table]
        cdef uint32_t i, prio = r.priority
        sub_remove(s, r)
        for i in range(TRIE_FIELDS):
            if s.plen[i] > 0:
                trie_remove(&t.tries[i], &self.c.spare, addr_of(r.value, i), s.plen[i])
        t.n_rules -= 1
        self.c.n_rules -= 1
        self.c.bytes -= rule_size(r.ops_cap)
        self.c.by_id[r.id] = NULL
        if free_id:
            self.c.free_ids[self.c.n_free] = r.id
            self.c.n_free += 1
        r.hnext = self.c.graveyard                     # a PMD may still hold it
        self.c.graveyard = r
        if s.n_rules == 0:                             # drop the empty subtable
            for i in range(t.nsubs):
                if t.subs[i] == s:
                    t.subs[i] = t.subs[t.nsubs - 1]
                    t.nsubs -= 1
                    break
            free(s.buckets)
            free(s)
            table_sort(t)
        elif prio == s.max_priority:
            s.n_max -= 1
            if s.n_max == 0:
                sub_recompute_max(s)
                table_sort(t)

    def insert(self, int table, uint32_t priority, bytes mask, bytes value, ops,
               int goto_table=NO_GOTO, inst=None):
        """Add a rule; returns its id. ``ops``: (op, arg) pairs as the datapath runs them
        (apply-actions); ``inst``: (write-actions ops, clear_actions, write_metadata's
        (value, mask) or None) or None."""
        return self.apply([(table, priority, mask, value, ops, goto_table, inst)])[0]

    def remove(self, uint32_t rule_id):
        self.apply(removes=[rule_id])

    cdef int _check_spec(self, spec) except -1:
        cdef cls_rule_t tmp
        if len(spec) not in (6, 7):
            raise ValueError("a rule is (table, priority, mask, value, ops, goto_table"
                             "[, instructions])")
        table, priority, mask, value, ops, goto_table = spec[:6]
        if not 0 <= table < CLS_TABLES:
            raise ValueError(f"table {table} out of range 0..{CLS_TABLES - 1}")
        if not 0 <= priority <= 0xFFFFFFFF:
            raise ValueError(f"priority {priority} out of range")
        if len(mask) not in (KEY_BYTES, CLS_BYTES) or len(value) != len(mask):
            raise ValueError(f"a key or mask is {KEY_BYTES} bytes ({CLS_BYTES} with metadata)")
        tmp.table = table
        self._set_ops(&tmp, ops, goto_table, spec[6] if len(spec) > 6 else None)
        return 0

    def apply(self, specs=(), changes=(), removes=(), carry=()):
        """One change that lookups see whole, all or nothing (everything is checked and
        built before the write lock is taken, so PMD upcalls wait only for the linking):
        remove rules by id, give rules new actions ((id, ops, goto_table); counters stay),
        then add rules given as (table, priority, mask, value, ops, goto_table[, inst])
        (``inst`` as ``insert`` takes it; a change may carry one as its fourth item).
        ``carry``: (removed id, index in specs) pairs, the same rule compiled again: the
        new one keeps its id (what others know it by), counters and last-used time.
        Returns the new rules' ids."""
        cdef uint32_t rid, n = len(specs), nc = len(changes), i = 0
        cdef cls_rule_t **built = NULL
        cdef uint64_t *masks = NULL
        cdef cls_rule_t *staged = NULL
        cdef cls_rule_t **bigger = NULL          # a changed rule's successor with more room
        cdef cls_rule_t *old
        cdef cls_rule_t *new
        cdef trie_spare_t nodes
        nodes.head = NULL
        nodes.n = 0
        gone = set()
        for rid in removes:
            self._rule(rid)
            if rid in gone:
                raise ValueError(f"rule {rid} removed twice")
            gone.add(rid)
        for spec in specs:
            self._check_spec(spec)
        keep_id = {}                             # a rule compiled again keeps its id
        for old_id, index in carry:
            if old_id not in gone or not 0 <= index < n:
                raise ValueError(f"carry ({old_id}, {index}): not a removed rule and a new one")
            if index not in keep_id and old_id not in keep_id.values():
                keep_id[index] = old_id
        kept = set(keep_id.values())
        built = <cls_rule_t **>calloc(n + 1, sizeof(cls_rule_t *))
        masks = <uint64_t *>calloc(n + 1, CLS_BYTES)
        staged = <cls_rule_t *>calloc(nc + 1, sizeof(cls_rule_t))
        bigger = <cls_rule_t **>calloc(nc + 1, sizeof(cls_rule_t *))
        ids = []
        try:
            if built == NULL or masks == NULL or staged == NULL or bigger == NULL:
                raise MemoryError()
            for i, change in enumerate(changes):
                rid, ops, goto_table = change[:3]
                if rid in gone:
                    raise ValueError(f"rule {rid} both removed and modified")
                staged[i].table = self._rule(rid).table
                self._set_ops(&staged[i], ops, goto_table,
                              change[3] if len(change) > 3 else None)
                if staged[i].n_ops > self.c.by_id[rid].ops_cap:
                    bigger[i] = <cls_rule_t *>calloc(1, rule_size(ops_room(staged[i].n_ops)))
                    if bigger[i] == NULL:
                        raise MemoryError()
            for i, spec in enumerate(specs):
                built[i] = self._build(spec, &masks[i * CLS_WORDS])
            olds = {rid: <size_t>self.c.by_id[rid] for rid, _ in carry}
            # the tries' nodes for the new rules, allocated before the lock is taken
            if spare_reserve(&nodes, n * TRIE_FIELDS * TRIE_NODES_PER_INSERT) < 0:
                raise MemoryError()
            with nogil:
                pthread_rwlock_wrlock(&self.c.lock)
                spare_move(&nodes, &self.c.spare, 0)
                self.c.spare = nodes
                nodes.head = NULL
                nodes.n = 0
            try:
                for rid in removes:
                    self.gone.append((rid, <size_t>self.c.by_id[rid]))
                    self._remove(self.c.by_id[rid], rid not in kept)
                for i, change in enumerate(changes):
                    new = self.c.by_id[<uint32_t>change[0]]
                    if bigger[i] != NULL:          # its successor, with room for the ops
                        old = new
                        new = bigger[i]
                        memcpy(new, old, RULE_HEAD)
                        new.ops_cap = ops_room(staged[i].n_ops)
                        # (a PMD may still be counting into old: read once, the rest at
                        # reclaim, as a rule compiled again; the Python part first: what
                        # raises leaves the successor unlinked, freed below)
                        packets, nbytes = old.n_packets, old.n_bytes
                        self.carried.append((<size_t>old, <size_t>new, packets, nbytes))
                        new.n_packets = packets
                        new.n_bytes = nbytes
                        sub_replace(<cls_sub_t *>old.sub, old, new)
                        self.c.by_id[new.id] = new
                        self.c.bytes += rule_size(new.ops_cap) - rule_size(old.ops_cap)
                        old.hnext = self.c.graveyard
                        self.c.graveyard = old
                        bigger[i] = NULL
                    memcpy(new.ops, staged[i].ops, staged[i].n_ops * sizeof(action_op_t))
                    new.n_ops = staged[i].n_ops
                    new.n_apply = staged[i].n_apply
                    new.md_value = staged[i].md_value
                    new.md_mask = staged[i].md_mask
                    new.flags = staged[i].flags
                    new.goto_table = staged[i].goto_table
                for i in range(n):
                    ids.append(self._link(built[i], &masks[i * CLS_WORDS],
                                          keep_id.get(i, -1)))
                    built[i] = NULL
                for old_id, index in carry:       # the removed rules wait in the graveyard
                    old = <cls_rule_t *><size_t>olds[old_id]
                    new = self.c.by_id[<uint32_t>ids[index]]
                    # (a PMD may still be counting into old: read once, the rest at reclaim)
                    packets, nbytes = old.n_packets, old.n_bytes
                    new.n_packets = packets
                    new.n_bytes = nbytes
                    new.used_ns = old.used_ns
                    self.carried.append((<size_t>old, <size_t>new, packets, nbytes))
            finally:
                self._bump()
                spare_move(&nodes, &self.c.spare, SPARE_KEEP)
                pthread_rwlock_unlock(&self.c.lock)
        finally:
            if built != NULL:
                for i in range(n):
                    free(built[i])                # those never linked
            free(built)
            free(masks)
            free(staged)
            if bigger != NULL:
                for i in range(nc):
                    free(bigger[i])               # those never used
            free(bigger)
            spare_trim(&nodes, 0)                 # the nodes left over, freed unlocked
        return ids

    @property
    def reclaimable(self):
        """Removed rules wait for reclaim()."""
        return self.c.graveyard != NULL

    def reclaim(self):
        """Free removed rules: call only when no PMD can still hold one (after a grace
        period: Datapath.synchronize()). A rule compiled again first gets what PMDs counted
        into its old self after the carry (in carry order: a rule carried twice passes the
        late counts of the first on to the last; a successor since removed is still in
        the graveyard, so it is still there to add to). Returns the freed rules' final
        counters, [(id, (packets, bytes, ns of the last packet))] in removal order (an id
        removed, reused and removed again is there twice: the last is the latest)."""
        cdef cls_rule_t *old
        cdef cls_rule_t *new
        cdef cls_rule_t *r
        with nogil:
            pthread_rwlock_wrlock(&self.c.lock)
        try:
            carried, self.carried = self.carried, []     # (never added twice)
            gone, self.gone = self.gone, []
            for old_addr, new_addr, packets, nbytes in carried:
                old = <cls_rule_t *><size_t>old_addr
                new = <cls_rule_t *><size_t>new_addr
                cls_add_u64(&new.n_packets, old.n_packets - <uint64_t>packets)
                cls_add_u64(&new.n_bytes, old.n_bytes - <uint64_t>nbytes)
                # (not atomic with a PMD's store of a newer time: the later of two
                # nearly equal times may be lost, which no timeout can tell)
                if old.used_ns > new.used_ns:
                    new.used_ns = old.used_ns
            finals = []
            for rid, addr in gone:
                r = <cls_rule_t *><size_t>addr
                finals.append((rid, (r.n_packets, r.n_bytes, r.used_ns)))
            self._free_graveyard()
        finally:
            pthread_rwlock_unlock(&self.c.lock)
        return finals

    # -- queries ----------------------------------------------------------------------------
    def find_strict(self, int table, uint32_t priority, bytes mask, bytes value):
        """The id of the rule with exactly this table, priority and match, or -1."""
        cdef uint64_t m[CLS_WORDS]
        cdef uint64_t v[CLS_WORDS]
        cdef cls_table_t *t
        cdef cls_rule_t *r = NULL
        cdef uint32_t i
        cdef long found = -1
        if not 0 <= table < CLS_TABLES:
            return -1
        key_words(mask, m)
        key_words(value, v)
        for i in range(CLS_WORDS):
            v[i] &= m[i]
        with nogil:
            pthread_rwlock_rdlock(&self.c.lock)
            t = self.c.tables[table]
            if t != NULL:
                for i in range(t.nsubs):
                    if memcmp(t.subs[i].mask, m, CLS_BYTES) == 0:
                        r = sub_find_head(t.subs[i], v, value_hash(v))
                        break
            while r != NULL:
                if r.priority == priority:
                    found = r.id
                    break
                r = r.pnext
            pthread_rwlock_unlock(&self.c.lock)
        return found

    def select(self, int table, bytes mask, bytes value):
        """Ids of the rules (in ``table``, or every table if -1) whose match is at least as
        specific as (mask, value): ovs-ofctl's non-strict matching for del-flows/dump-flows."""
        cdef uint64_t m[CLS_WORDS]
        cdef uint64_t v[CLS_WORDS]
        cdef cls_table_t *t
        cdef cls_sub_t *s
        cdef cls_rule_t *head
        cdef cls_rule_t *r
        cdef uint32_t ti, i, b
        cdef int j
        cdef bint ok
        key_words(mask, m)
        key_words(value, v)
        out = []
        with nogil:
            pthread_rwlock_rdlock(&self.c.lock)
        try:
            for ti in range(CLS_TABLES):
                t = self.c.tables[ti]
                if t == NULL or (table >= 0 and <int>ti != table):
                    continue
                for i in range(t.nsubs):
                    s = t.subs[i]
                    if not covers_mask(s.mask, m):
                        continue
                    for b in range(s.nbuckets):
                        head = s.buckets[b]
                        while head != NULL:
                            ok = True
                            for j in range(CLS_WORDS):
                                if (head.value[j] & m[j]) != (v[j] & m[j]):
                                    ok = False
                            if ok:
                                r = head
                                while r != NULL:
                                    out.append(r.id)
                                    r = r.pnext
                            head = head.hnext
        finally:
            pthread_rwlock_unlock(&self.c.lock)
        return out

    def stats(self, uint32_t rule_id):
        """(packets, bytes, ns of the last packet or 0) of one rule."""
        cdef cls_rule_t *r = self._rule(rule_id)
        return r.n_packets, r.n_bytes, r.used_ns

    def top(self, int n):
        """Ids of the ``n`` rules that counted the most packets, most first (one pass over
        the rules, no lock: counters are read as they are; for metrics)."""
        cdef uint32_t i, j
        cdef int k, have = 0
        cdef cls_rule_t *r
        cdef uint64_t best_packets[64]
        cdef uint32_t best_ids[64]
        if n > 64:
            n = 64
        if n <= 0:
            return []
        with nogil:
            pthread_rwlock_rdlock(&self.c.lock)
            for i in range(self.c.next_id):
                r = self.c.by_id[i]
                if r == NULL or r.n_packets == 0:
                    continue
                if have == n and r.n_packets <= best_packets[have - 1]:
                    continue
                k = have if have < n else n - 1            # insertion into the sorted top
                while k > 0 and best_packets[k - 1] < r.n_packets:
                    if k < n:
                        best_packets[k] = best_packets[k - 1]
                        best_ids[k] = best_ids[k - 1]
                    k -= 1
                best_packets[k] = r.n_packets
                best_ids[k] = r.id
                if have < n:
                    have += 1
            pthread_rwlock_unlock(&self.c.lock)
        return [best_ids[j] for j in range(have)]

    def place(self, uint32_t rule_id):
        """(table, -priority) of one rule: the order dump-flows lists rules in."""
        cdef cls_rule_t *r = self._rule(rule_id)
        return r.table, -<long>r.priority

    def tables(self):
        """The tables that hold rules, in order."""
        return [t for t in range(CLS_TABLES)
                if self.c.tables[t] != NULL and self.c.tables[t].n_rules]

    def rule(self, uint32_t rule_id):
        """(table, priority, mask, value) of one rule: CLS_BYTES each, the flow key's
        bytes then the metadata word (native order)."""
        cdef cls_rule_t *r = self._rule(rule_id)
        return (r.table, r.priority, (<char *>(<cls_sub_t *>r.sub).mask)[:CLS_BYTES],
                (<char *>r.value)[:CLS_BYTES])

    def lookup(self, bytes key):
        """What the datapath's lookup finds for a raw key: ([(table, rule id), ...],
        [(op, arg), ...], mask bytes, overflow). The same code PMDs run (ovs trace)."""
        cdef uint64_t mask[KEY_WORDS]
        cdef cls_result_t res
        cdef flow_key_t k
        cdef uint32_t i
        if len(key) != sizeof(flow_key_t):
            raise ValueError("not a flow key")
        memcpy(&k, <const char *>key, sizeof(flow_key_t))
        memset(mask, 0, sizeof(mask))
        with nogil:
            pthread_rwlock_rdlock(&self.c.lock)
            cls_lookup(self.c, &k, mask, &res)
        try:
            rules = [(res.rules[i].table, res.rules[i].id) for i in range(res.n_rules)]
            ops = [(res.ops[i].op, res.ops[i].arg) for i in range(res.n_ops)]
        finally:
            pthread_rwlock_unlock(&self.c.lock)
        return rules, ops, (<char *>mask)[:KEY_BYTES], bool(res.overflow)

    @property
    def generation(self):
        return self.c.gen

    def __len__(self):
        return self.c.n_rules

    def subtables(self, int table=0):
        t = self.c.tables[table] if 0 <= table < CLS_TABLES else NULL
        return 0 if t == NULL else t.nsubs

    def trie_nodes(self, int table=0):
        """Nodes of the table's nw_src and nw_dst prefix tries."""
        cdef cls_table_t *t = self.c.tables[table] if 0 <= table < CLS_TABLES else NULL
        if t == NULL:
            return 0, 0
        return t.tries[0].n_nodes, t.tries[1].n_nodes

    def memory(self):
        """Bytes this classifier holds in C: rules, subtables, buckets, the id map."""
        cdef uint64_t total = sizeof(cls_t) + self.c.id_cap * (sizeof(void *) + 4)
        total += self.c.spare.n * sizeof(trie_node_t)
        cdef uint32_t t, i
        cdef cls_table_t *tab
        total += self.c.bytes
        for t in range(CLS_TABLES):
            tab = self.c.tables[t]
            if tab == NULL:
                continue
            total += sizeof(cls_table_t) + tab.cap * sizeof(void *)
            total += (tab.tries[0].n_nodes + tab.tries[1].n_nodes) * sizeof(trie_node_t)
            for i in range(tab.nsubs):
                total += sizeof(cls_sub_t) + tab.subs[i].nbuckets * sizeof(void *)
        return total


NO_GOTO_TABLE = NO_GOTO
TABLES = CLS_TABLES
