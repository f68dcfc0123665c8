# OpenFlow groups of a bridge, compiled: a table of groups (ALL, SELECT, INDIRECT,
# FAST_FAILOVER), each with buckets of datapath ops, that the upcall resolves into plain
# ops (so a cached decision holds no group): ALL runs every bucket (each on the packet as
# it came to the group: a bucket's VLAN edit is undone before the next), INDIRECT its one
# bucket, SELECT one live bucket by a hash of the 5-tuple (weights), FAST_FAILOVER the
# first live bucket. No rules, ports or packets here; liveness is set from Python.
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t

from pyvhost._flow cimport action_op_t, flow_key_t

cdef enum:
    GROUP_SLOTS = 1024         # groups a bridge holds
    GROUP_BUCKETS = 16         # buckets of a group
    GROUP_BUCKET_OPS = 8       # ops of a bucket
    GROUP_ALL = 0
    GROUP_SELECT = 1
    GROUP_INDIRECT = 2
    GROUP_FF = 3

cdef struct grp_bucket_t:
    uint16_t n_ops
    uint16_t weight
    uint8_t live
    action_op_t ops[GROUP_BUCKET_OPS]

cdef struct grp_entry_t:
    uint8_t in_use
    uint8_t type
    uint8_t n_buckets
    grp_bucket_t b[GROUP_BUCKETS]

cdef struct grp_table_t:
    int lock                   # writers (control thread) and upcalls, held briefly
    grp_entry_t e[GROUP_SLOTS]

# the ops group ``slot`` resolves to for key ``k`` appended at ``out`` (room for ``room``),
# the megaflow ``mask`` widened by what the choice consulted; ``vlan`` is the packet's TCI
# at the group (0: untagged). Returns the number of ops, or -1 (no room: drop).
cdef int group_resolve(grp_table_t *t, uint16_t slot, const flow_key_t *k, uint16_t vlan,
                       uint64_t *mask, action_op_t *out, int room) noexcept nogil


cdef class GroupTable:
    cdef grp_table_t *t
