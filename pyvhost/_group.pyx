# cython: language_level=3
"""Compiled OpenFlow groups (see _group.pxd): the upcall resolves a group op into the ops
of the buckets it picks; Python fills the table (``GroupTable.set``/``clear``/``set_live``)
and invalidates the datapath's caches after a change."""

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free
from libc.string cimport memset
from pyvhost._flow cimport (
    KEY_WORDS, OP_SET_VLAN, OP_STRIP_VLAN, action_op_t, flow_key_t, masked_hash,
)
from pyvhost._vring cimport vh_lock, vh_unlock

cdef flow_key_t FIVE_TUPLE         # the fields SELECT hashes (and the megaflow keeps)


cdef void _init_mask():
    memset(&FIVE_TUPLE, 0, sizeof(flow_key_t))
    FIVE_TUPLE.dl_type = 0xFFFF
    FIVE_TUPLE.nw_src = 0xFFFFFFFF
    FIVE_TUPLE.nw_dst = 0xFFFFFFFF
    FIVE_TUPLE.nw_proto = 0xFF
    FIVE_TUPLE.tp_src = 0xFFFF
    FIVE_TUPLE.tp_dst = 0xFFFF


_init_mask()


cdef int _copy(const grp_bucket_t *b, action_op_t *out, int n, int room,
               uint16_t vlan) noexcept nogil:
    """A bucket's ops at ``out[n]``; a bucket that edits the VLAN tag is followed by an op
    that puts it back as it was (``vlan``): OpenFlow runs buckets on copies of the packet,
    so neither the next bucket nor the actions after the group see the edit."""
    cdef int i
    cdef bint edits = False
    for i in range(b.n_ops):
        edits |= b.ops[i].op == OP_SET_VLAN or b.ops[i].op == OP_STRIP_VLAN
    if n + b.n_ops + edits > room:
        return -1
    for i in range(b.n_ops):
        out[n + i] = b.ops[i]
    n += b.n_ops
    if edits:
        out[n].op = OP_SET_VLAN if vlan else OP_STRIP_VLAN
        out[n].arg = vlan & 0x0FFF
        n += 1
    return n


cdef int group_resolve(grp_table_t *t, uint16_t slot, const flow_key_t *k, uint16_t vlan,
                       uint64_t *mask, action_op_t *out, int room) noexcept nogil:
    cdef grp_entry_t *e
    cdef int i, n = 0
    cdef uint32_t total = 0, pick
    cdef uint64_t words[KEY_WORDS]
    cdef const uint64_t *m5 = <const uint64_t *>&FIVE_TUPLE
    if t == NULL or slot >= GROUP_SLOTS:
        return 0
    vh_lock(&t.lock)
    e = &t.e[slot]
    if not e.in_use or e.n_buckets == 0:
        n = 0
    elif e.type == GROUP_ALL:
        for i in range(e.n_buckets):
            n = _copy(&e.b[i], out, n, room, vlan)
            if n < 0:
                break
    elif e.type == GROUP_INDIRECT:
        n = _copy(&e.b[0], out, 0, room, vlan)
    elif e.type == GROUP_FF:
        for i in range(e.n_buckets):
            if e.b[i].live:
                n = _copy(&e.b[i], out, 0, room, vlan)
                break
    else:                                                    # SELECT
        for i in range(e.n_buckets):
            if e.b[i].live:
                total += e.b[i].weight
        if total:
            for i in range(KEY_WORDS):
                mask[i] |= m5[i]
            pick = masked_hash(<const uint64_t *>k, m5, words) % total
            for i in range(e.n_buckets):
                if e.b[i].live:
                    if pick < e.b[i].weight:
                        n = _copy(&e.b[i], out, 0, room, vlan)
                        break
                    pick -= e.b[i].weight
    vh_unlock(&t.lock)
    return n


cdef class GroupTable:
    """A bridge's groups by slot (0..GROUP_SLOTS-1); about 0.3 MB, taken when made."""

    def __cinit__(self):
        self.t = <grp_table_t *>calloc(1, sizeof(grp_table_t))
        if self.t == NULL:
            raise MemoryError()

    def __dealloc__(self):
        free(self.t)

    def set(self, int slot, int type_, buckets):
        """Group ``slot`` becomes ``type_`` with ``buckets``: [(weight, live, [(op, arg)])]."""
        cdef grp_entry_t e
        cdef int i, j
        if not 0 <= slot < GROUP_SLOTS:
            raise ValueError(f"group slot {slot} out of range")
        if type_ not in (GROUP_ALL, GROUP_SELECT, GROUP_INDIRECT, GROUP_FF):
            raise ValueError(f"group type {type_}")
        if len(buckets) > GROUP_BUCKETS:
            raise ValueError(f"more than {GROUP_BUCKETS} buckets")
        memset(&e, 0, sizeof(e))
        e.in_use = 1
        e.type = type_
        e.n_buckets = len(buckets)
        for i, (weight, live, ops) in enumerate(buckets):
            if len(ops) > GROUP_BUCKET_OPS:
                raise ValueError(f"more than {GROUP_BUCKET_OPS} actions in a bucket")
            if not 0 <= weight < 0x10000:
                raise ValueError(f"weight {weight}")
            e.b[i].weight = weight
            e.b[i].live = bool(live)
            e.b[i].n_ops = len(ops)
            for j, (op, arg) in enumerate(ops):
                if not (0 < op < 0x10000 and 0 <= arg < 0x10000):
                    raise ValueError(f"bad op ({op}, {arg})")
                e.b[i].ops[j].op = op
                e.b[i].ops[j].arg = arg
        with nogil:
            vh_lock(&self.t.lock)
            self.t.e[slot] = e
            vh_unlock(&self.t.lock)

    def clear(self, int slot):
        if not 0 <= slot < GROUP_SLOTS:
            raise ValueError(f"group slot {slot} out of range")
        with nogil:
            vh_lock(&self.t.lock)
            self.t.e[slot].in_use = 0
            vh_unlock(&self.t.lock)

    def set_live(self, int slot, int bucket, bint live):
        if not 0 <= slot < GROUP_SLOTS or not 0 <= bucket < GROUP_BUCKETS:
            raise ValueError("group slot or bucket out of range")
        with nogil:
            vh_lock(&self.t.lock)
            self.t.e[slot].b[bucket].live = live
            vh_unlock(&self.t.lock)

    def resolve(self, int slot, bytes key, int vlan=0):
        """(ops, mask) the upcall would take for a raw flow key (tests, trace)."""
        cdef flow_key_t k
        cdef uint64_t mask[KEY_WORDS]
        cdef action_op_t out[64]
        cdef int n
        if len(key) != sizeof(flow_key_t):
            raise ValueError("a raw flow key")
        memset(mask, 0, sizeof(mask))
        k = (<const flow_key_t *><const char *>key)[0]
        n = group_resolve(self.t, slot, &k, vlan, mask, out, 64)
        return [(out[i].op, out[i].arg) for i in range(max(n, 0))], \
            (<char *>mask)[:sizeof(mask)]


SLOTS = GROUP_SLOTS
BUCKETS = GROUP_BUCKETS
BUCKET_OPS = GROUP_BUCKET_OPS
ALL, SELECT, INDIRECT, FAST_FAILOVER = GROUP_ALL, GROUP_SELECT, GROUP_INDIRECT, GROUP_FF
