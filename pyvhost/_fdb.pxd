# The MAC learning table of a bridge (the NORMAL action), compiled so that PMD threads learn
# and look up without the GIL: (VLAN, MAC) -> port with aging, a size limit whose eviction
# prefers idle entries, per-port limits and damping of MACs that flap between ports. Each
# entry has a version that changes when it moves or goes, so cached decisions can depend on
# one entry instead of the whole table. An entry learned on a port that reaches many
# remotes (a flow-based tunnel port) also keeps the remote it came from (address, VNI), and
# the table keeps which remotes each such port has (what a flood sends a copy to). No
# rules, no ports, no packets here.
from libc.stdint cimport int32_t, uint8_t, uint16_t, uint32_t, uint64_t

cdef enum:
    FDB_PORTS = 256
    FDB_SAMPLE = 8           # entries sampled for the least recently used on eviction
    MOVE_WINDOW_MS = 1000
    MOVE_LIMIT = 4           # moves per window beyond which a MAC's moves are ignored
    FDB_REMOTES = 1024       # distinct (port, remote, VNI) of learned entries
    FDB_PORT_REMOTES = 256   # of them behind one port: a flood copies a frame this often

cdef struct fdb_entry_t:
    uint8_t mac[6]
    uint16_t vlan
    uint16_t port
    uint16_t in_use
    uint32_t remote          # the remote it came from (IPv4, network order; 0: none)
    uint32_t vni             # and its VNI (with a remote only)
    uint32_t ver             # changes whenever the entry moves, goes or is reused
    uint32_t used_ms         # last seen (misses and cache hits)
    uint32_t window_ms       # start of the current move window
    uint32_t moves
    int32_t next             # hash chain, or free list

cdef struct fdb_remote_t:   # a remote behind a port, and how many entries it has
    uint16_t port
    uint16_t pad
    uint32_t remote
    uint32_t vni
    uint32_t refs

cdef struct fdb_t:
    int lock
    uint32_t size
    uint32_t count
    uint32_t nbuckets
    int32_t *buckets
    fdb_entry_t *e
    int32_t free_head
    uint32_t add_gen         # a MAC was added or went: decisions that flooded an unknown
                             # dst or could not learn their source go stale
    uint32_t aging_ms
    uint32_t rng
    uint32_t port_limit[FDB_PORTS]     # 0: none
    uint32_t port_count[FDB_PORTS]
    uint64_t learned
    uint64_t moved
    uint64_t evicted
    uint64_t expired
    uint64_t refused         # over a port's limit
    uint64_t damped          # moves ignored (flapping)
    uint8_t damped_mac[6]
    uint16_t damped_vlan
    uint32_t nremotes
    uint32_t port_remotes[FDB_PORTS]   # distinct (remote, VNI) listed behind each port
    uint64_t remotes_full    # entries not learned: their remote found no room in the list
                             # (or its port has FDB_PORT_REMOTES already)
    fdb_remote_t remotes[FDB_REMOTES]

cdef uint32_t now_ms() noexcept nogil
cdef int fdb_learn(fdb_t *f, uint16_t vlan, const uint8_t *mac, uint16_t port,
                   uint32_t remote, uint32_t vni, uint32_t now,
                   uint32_t *idx, uint32_t *ver) noexcept nogil
cdef int fdb_lookup(fdb_t *f, uint16_t vlan, const uint8_t *mac, uint32_t *idx,
                    uint32_t *ver, uint32_t *remote, uint32_t *vni) noexcept nogil
cdef uint32_t fdb_remotes(fdb_t *f, uint16_t port, uint32_t *out, uint32_t room) noexcept nogil

cdef class MacTable:
    cdef fdb_t *f
