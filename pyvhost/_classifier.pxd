# The compiled rule classifier of a bridge (tuple-space search): rules grouped by mask into
# subtables, each a hash table of masked values; per table the subtables are searched in
# order of their highest priority with early exit. Rules carry compiled datapath ops and
# their counters. Per table, a prefix trie of the rules' nw_src and of their nw_dst lets a
# lookup skip subtables no prefix can match while consulting only the address bits that
# proved it. A rule's match is the flow key and OpenFlow's metadata word; besides its
# apply-actions it may carry write-actions, clear_actions and write_metadata, and a lookup
# gathers the action set (aset_t) it runs at the end. No rule syntax, no MAC table, no
# ports here.
from libc.stdint cimport int8_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t

from pyvhost._flow cimport KEY_WORDS, MAX_ACTION_OPS, MAX_HOPS, action_op_t, flow_key_t
from pyvhost._trie cimport trie_spare_t, trie_t

cdef extern from "pthread.h" nogil:
    ctypedef struct pthread_rwlock_t:
        pass

cdef enum:
    CLS_TABLES = 255
    NO_GOTO = 0xFF
    RULE_NORMAL = 1          # its ops include OP_NORMAL
    RULE_CLEAR = 2           # OpenFlow clear_actions: empty the action set first
    RULE_WRITE_MD = 4        # OpenFlow write_metadata: md_value under md_mask
    TRIE_FIELDS = 2          # nw_src, nw_dst
    CLS_WORDS = KEY_WORDS + 1      # a rule's match: the flow key, then the metadata word
    ASET_SLOTS = 16          # the kinds of action an action set holds one of each

cdef struct aset_t:               # OpenFlow's action set, built along the pipeline
    uint32_t used                  # bit per slot
    uint8_t npre[ASET_SLOTS]       # OP_TUN_HI ops the slot's op takes first (its value's
    action_op_t pre[ASET_SLOTS][2] # high bits)
    action_op_t op[ASET_SLOTS]

cdef struct cls_rule_t:
    uint64_t value[CLS_WORDS]      # already masked by its subtable's mask
    uint64_t n_packets
    uint64_t n_bytes
    uint64_t used_ns               # last packet (0: none yet)
    cls_rule_t *hnext              # next distinct value in the same bucket
    cls_rule_t *pnext              # next rule with this value (lower priority or later)
    void *sub
    uint64_t seq                   # insertion order: ties between equal priorities
    uint32_t id
    uint32_t priority
    uint32_t hash
    uint8_t table
    uint8_t goto_table             # NO_GOTO: none
    uint8_t flags
    uint8_t n_ops
    uint8_t n_apply                # ops[:n_apply]: apply-actions; the rest: write-actions
    uint8_t ops_cap                # ops it has room for: a rule is allocated with room
                                   # for these only (rule_size); a staged one for all
    uint64_t md_value              # write_metadata (RULE_WRITE_MD)
    uint64_t md_mask
    action_op_t ops[MAX_ACTION_OPS]   # (last: see ops_cap)

cdef struct cls_sub_t:
    uint64_t mask[CLS_WORDS]
    uint32_t max_priority
    uint32_t n_max                 # rules at max_priority (recount only when none is left)
    uint32_t n_rules
    uint32_t n_heads
    uint32_t nbuckets              # power of 2
    cls_rule_t **buckets
    int8_t plen[TRIE_FIELDS]       # prefix length of the mask on nw_src, nw_dst (0: not
                                   # matched, -1: not a prefix: the trie cannot help)

cdef struct cls_table_t:
    cls_sub_t **subs               # by max_priority, highest first
    uint32_t nsubs
    uint32_t cap
    uint32_t n_rules
    trie_t tries[TRIE_FIELDS]      # the prefixes of the rules of this table

cdef struct cls_result_t:
    uint32_t n_rules
    cls_rule_t *rules[MAX_HOPS]    # the rule matched in each table visited
    uint32_t n_ops
    action_op_t ops[MAX_ACTION_OPS]
    uint32_t flags                 # RULE_NORMAL if any op is OP_NORMAL
    int overflow                   # more ops than an entry holds: the packet is dropped

cdef struct cls_t:
    pthread_rwlock_t lock          # lookups read, changes write
    uint32_t gen                   # bumped by every change (cached decisions go stale)
    uint64_t next_seq
    cls_table_t *tables[CLS_TABLES]
    cls_rule_t **by_id
    uint32_t id_cap
    uint32_t *free_ids
    uint32_t n_free
    uint32_t next_id
    uint32_t n_rules
    cls_rule_t *graveyard          # removed, freed by reclaim() after a grace period
    trie_spare_t spare             # trie nodes reserved before the write lock
    uint64_t bytes                 # memory held by the rules in the tables (rule_size)


cdef void cls_read_lock(cls_t *c) noexcept nogil
cdef void cls_unlock(cls_t *c) noexcept nogil
cdef void cls_lookup(cls_t *c, const flow_key_t *k, uint64_t *mask, cls_result_t *out) noexcept nogil
cdef void key_run(flow_key_t *k, const action_op_t *ops, uint32_t n, uint64_t *mask) noexcept nogil


cdef class Classifier:
    cdef cls_t *c
    cdef list carried              # (old, new rule address, packets, bytes) until reclaim
    cdef list gone                 # (id, address) of the removed rules, until reclaim
    cdef void _free_graveyard(self) noexcept nogil
    cdef void _bump(self) noexcept nogil
    cdef cls_sub_t *_subtable(self, int table, const uint64_t *mask) except NULL
    cdef uint32_t _new_id(self) except? 0xFFFFFFFF
    cdef cls_rule_t *_rule(self, uint32_t rule_id) except NULL
    cdef int _set_ops(self, cls_rule_t *r, ops, int goto_table, inst) except -1
    cdef cls_rule_t *_build(self, spec, uint64_t *m) except NULL
    cdef uint32_t _link(self, cls_rule_t *r, const uint64_t *m, int64_t rule_id=*) except? 0xFFFFFFFF
    cdef void _remove(self, cls_rule_t *r, bint free_id=*) noexcept nogil
    cdef int _check_spec(self, spec) except -1
