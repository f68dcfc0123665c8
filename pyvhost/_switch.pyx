# cython: language_level=3
"""The switch's compiled data path: ports (their rings), bridges (their classifier and MAC
table), PMD poll loops with an exact-match and a megaflow cache each, the upcall on a
cache miss, action execution, QoS token buckets (ingress policing, egress rate limit) and
the counters behind pmd-stats-show. One-copy forwarding: a port class that receives by
reference (rx_burst_ref) leaves a long frame's tail in the sender's memory; a frame whose
cached action is exactly one output to a port class that sends such frames (tx_ref), with
no mirror, shaping or per-remote copies, goes as it is (its tail copied once, by the send);
every other frame is made whole first (vq_materialize) and takes the usual path, and the
input's rx_complete returns the burst's buffers once its batches are flushed.

A port is a device of some port class (_port.pxd: receive burst, send burst, wait fd;
vhost-user, internal/tap, afpacket, ...); nothing here asks which. A PMD thread polls its
assigned RX queues without the GIL: receive a burst, police it, look every frame up in
its caches, execute the cached actions into per-output-port batches, then send each
batch through the output port's send burst. A miss is
an upcall, also without the GIL: the bridge's compiled classifier gives the rules' ops and
the megaflow mask, NORMAL is resolved through the MAC table (learning the source), and
the result is cached with what it depends on: the datapath generation (ports, bridges),
the bridge classifier's generation, and the MAC table entries it used (or the table's add
generation when it flooded an unknown destination). A port that reaches many remotes (a
flow-based tunnel port, PortDev.per_remote) has each MAC learned with the remote it came
from: NORMAL output to it sets tun_dst/tun_id first (the decision depends on that entry,
so a MAC that moves to another remote makes it stale), and a flood sends that port one
copy per remote learned behind it. So a learned, moved or expired MAC
makes stale only the decisions that used it, and a rule change only its bridge's. Cache
hits refresh the source MAC's entry. Upcall time is limited per input port so a miss
storm from one port cannot starve the others. Ports and bridges are freed only after
every PMD has passed a quiescent point (``synchronize``).
This module knows no rule syntax and no sockets.
"""

import time

from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free
from libc.string cimport memcpy, memset
from posix.time cimport nanosleep, timespec
from pyvhost._classifier cimport (
    Classifier, RULE_NORMAL, cls_lookup, cls_read_lock, cls_result_t, cls_rule_t, cls_t,
    cls_unlock, key_run,
)
from pyvhost._fdb cimport FDB_REMOTES, MacTable, fdb_learn, fdb_lookup, fdb_remotes, fdb_t
from pyvhost._flow cimport (
    DEP_LEARN, KEY_WORDS, MAX_ACTION_OPS, MAX_HOPS, NO_FDB, OP_CONTROLLER, OP_FLOOD, OP_GROUP, OP_IN_PORT,
    OP_METER, OP_NORMAL, OP_OUTPUT, OP_SET_TUN_DST, OP_SET_TUN_ID, OP_SET_VLAN, OP_STRIP_VLAN, OP_TUN_HI,
    OP_DEC_TTL, OP_SET_DSCP, OP_SET_ETH_DST, OP_SET_ETH_SRC, OP_SET_NW_DST, OP_SET_NW_SRC,
    OP_SET_PCP, OP_SET_TP_DST, OP_SET_TP_SRC,
    MF_NO_HINT, action_op_t, actions_t, emc_conflict, emc_insert, emc_lookup, emc_may_hold, emc_prefetch,
    emc_t, flow_extract, flow_hash, mf_hint, mf_hint_entry,
    flow_key_t, mf_free, mf_init, mf_insert, mf_entry_t, mf_lookup, mf_lookup_port, mf_matches, mf_t, vlan_set, vlan_strip,
)
from pyvhost._mirror cimport MAX_MIRRORS, mirror_selects, mirror_set_t, mirror_t
from pyvhost._idle cimport (
    IDLE_NS, idle_free, idle_init, idle_sleep, idle_t, idle_wake, notify_all, now_ns,
)
from pyvhost._pktpool cimport PacketPool, pkt_t, pktpool_t, pool_get, pool_put, pool_put_many
from pyvhost._group cimport GroupTable, group_resolve, grp_table_t
from pyvhost._meter cimport MeterTable, meter_admit, mtr_table_t
from pyvhost._edit cimport (
    edit_dec_ttl, edit_dscp, edit_eth, edit_ipv4_addr, edit_l4_port, edit_pcp,
)
from pyvhost._punt cimport PUNT_ACTION, PUNT_INVALID_TTL, PUNT_NO_RULE, PuntQueue, punt_push, punt_t
from pyvhost._port cimport PortDev, port_ops_t, rxq_src_t, tx_result_t
from pyvhost._vring cimport (
    MAX_BURST, vh_eventfd_signal, vh_fence_seq_cst, vh_load_acquire_int, vh_lock,
    vh_prefetch_w, vh_store_release_int, vh_unlock, vq_materialize,
)

cdef extern from "vhost_atomic.h" nogil:
    """
    static inline void vh_add_u64(uint64_t *p, uint64_t v)
    { __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
    static inline uint64_t vh_load_u64(const uint64_t *p)
    { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
    static inline void vh_store_u64(uint64_t *p, uint64_t v)
    { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
    static inline uint32_t vh_load_u32(const uint32_t *p)
    { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
    static inline void vh_store_u32(uint32_t *p, uint32_t v)
    { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
    """
    void vh_add_u64(uint64_t *p, uint64_t v)
    uint64_t vh_load_u64(const uint64_t *p)
    void vh_store_u64(uint64_t *p, uint64_t v)
    uint32_t vh_load_u32(const uint32_t *p)
    void vh_store_u32(uint32_t *p, uint32_t v)

cdef enum:
    MAX_PORTS = 256
    MAX_BRIDGES = 256
    MAX_PORT_QUEUES = 32
    MAX_POLL = 512
    CLOCK_EVERY = 64
    UPCALL_TIMED_EVERY = 8     # upcalls timed exactly; the rest are charged the average
    UPCALL_COST_SLACK_NS = 2000
    EMC_INSERT_EVERY = 16      # by default a wildcard-cache hit is copied into the EMC
                               # this rarely (set-pmd emc-insert-inv-prob=N)
    EMC_WINDOW = 8192          # hits + conflict misses between decisions to keep asking it
    EMC_PROBE_EVERY = 8        # while it is skipped, one poll round in this many asks it
    UPCALL_WINDOW_NS = 10000000
    LOAD_SLEEP_STEP_NS = 1000  # load-based sleeping grows by 1 us a round (as OVS's)
    MAX_LOAD_SLEEP_US = 10000
    THROTTLED_BURST = 4        # frames read per visit from a port over its upcall share
    DEFAULT_FLOW_LIMIT = 200000

cdef uint64_t NO_UPCALL_LIMIT = 0xFFFFFFFFFFFFFFFFULL   # a port alone on its PMD

cdef struct bucket_t:
    int lock
    uint64_t rate            # bytes per second; 0 = no limit
    uint64_t burst           # bytes
    double tokens
    uint64_t last_ns

cdef struct port_counters_t:
    # every counter of a port; port_stats() returns this struct as a dict, so a name is
    # always its field's (nothing lists them a second time)
    uint64_t rx_packets
    uint64_t rx_bytes
    uint64_t tx_packets
    uint64_t tx_bytes
    uint64_t drop_police
    uint64_t drop_qos
    uint64_t drop_tx_full    # the output had no room (guest ring full, socket busy, link down)
    uint64_t drop_tx_error   # the output refused the frame (too large for it, a send error)
    uint64_t drop_action     # dropped by a rule (no output)
    uint64_t drop_offload    # a TCP super-frame that could not be segmented for this port
    uint64_t drop_upcall     # misses over the port's share of upcall time
    uint64_t drop_copy       # input: a copy for one more output failed (no buffer, no room)
    uint64_t drop_no_port    # input: frames for an output port that went away or is down
    uint64_t drop_mirror_port  # received on a mirror's output port (it only sends)
    uint64_t drop_no_recv    # input: frames received while told not to (OpenFlow PORT_MOD)
    uint64_t drop_meter      # input: dropped by an OpenFlow meter's band

cdef struct port_t:
    uint16_t id
    uint16_t bridge
    uint16_t nqueues
    int up                               # sends (0: OpenFlow port down / no-forward)
    uint16_t mirror_rx                   # the bridge's mirrors that select its input,
    uint16_t mirror_tx                   # its output (bits: mirror_set_t indices)
    int mirror_only                      # a mirror's output: nothing else in or out
    int per_remote                       # many remotes (PortDev.per_remote)
    uint8_t no_recv                      # what it receives is dropped (PORT_MOD)
    uint8_t no_flood                     # left out of flooding (PORT_MOD no-flood)
    const port_ops_t *ops                # the port's class
    void *dev                            # its device state (kept alive by a PortDev)
    bucket_t police
    bucket_t shape
    uint64_t rxq_ns[MAX_PORT_QUEUES]     # processing time spent on each RX queue
    uint64_t rxq_packets[MAX_PORT_QUEUES]
    port_counters_t c

cdef struct bridge_t:
    cls_t *cls
    fdb_t *fdb
    mirror_set_t *mirrors                # NULL: none
    int fail_open            # OpenFlow fail-open: NORMAL for every packet, rules unused
    int ttl_punt             # a controller wants INVALID_TTL PACKET_INs (else: dropped)
    grp_table_t *groups      # OpenFlow groups (NULL: none; a group op then drops)
    mtr_table_t *meters      # OpenFlow meters (NULL: none; a meter op then passes)

cdef struct switch_t:
    port_t *ports[MAX_PORTS]
    uint32_t port_end        # 1 + the highest id in ports (loops over ports stop there)
    bridge_t *bridges[MAX_BRIDGES]
    uint32_t gen
    punt_t *punt             # the controller queue (NULL: CONTROLLER drops)

cdef struct rxq_ref_t:
    uint16_t port
    uint16_t queue

cdef struct pmd_stats_t:
    uint64_t busy_ns
    uint64_t idle_ns
    uint64_t packets
    uint64_t bursts
    uint64_t emc_hits
    uint64_t emc_misses
    uint64_t upcalls
    uint64_t upcall_drops
    uint64_t megaflow_hits
    uint64_t upcall_ns
    uint64_t upcall_throttled
    uint64_t load_sleep_ns      # slept while lightly loaded (set_sleep_max), part of idle
    uint64_t onecopy            # frames sent straight from the sender's guest memory
    uint64_t emc_skipped        # frames not asked of the EMC (it lost most to other flows)
    uint64_t simple_match_hits  # of the megaflow hits, frames their burst's first frame's
                                # port-wide megaflow decided (mf_lookup_port)
    uint64_t megaflow_reused    # of the others, frames under the megaflow the frame before
                                # them was found in (mf_matches: no lookup of their own)



cdef struct keymask_t:
    uint64_t w[KEY_WORDS]

cdef keymask_t IN_PORT_MASK        # every megaflow matches its input port exactly
cdef keymask_t NORMAL_MASK         # the fields MAC learning looks at
cdef keymask_t REMOTE_MASK         # and the remote it learns on a per-remote port


cdef void init_masks():
    cdef flow_key_t k
    memset(&k, 0, sizeof(k))
    k.in_port = 0xFFFF
    memcpy(IN_PORT_MASK.w, &k, sizeof(k))
    k.vlan_tci = 0xFFFF
    memset(k.dl_src, 0xFF, 6)
    memset(k.dl_dst, 0xFF, 6)
    memcpy(NORMAL_MASK.w, &k, sizeof(k))
    memset(&k, 0, sizeof(k))
    k.tun_id = 0xFFFFFFFF
    k.tun_src = 0xFFFFFFFF
    memcpy(REMOTE_MASK.w, &k, sizeof(k))


init_masks()


cdef int entry_valid(void *ctx, const actions_t *a) noexcept nogil:
    """Is a cached decision still what the slow path would decide? (see the module doc)"""
    cdef switch_t *sw = <switch_t *>ctx
    cdef bridge_t *b
    if a.gen != vh_load_u32(&sw.gen):
        return 0
    b = sw.bridges[a.bridge]
    if b == NULL or a.rule_gen != vh_load_u32(&b.cls.gen):
        return 0
    if a.flags & DEP_LEARN and a.learn_gen != vh_load_u32(&b.fdb.add_gen):
        return 0
    if a.src_idx != NO_FDB and (a.src_idx >= b.fdb.size or
                                vh_load_u32(&b.fdb.e[a.src_idx].ver) != a.src_ver):
        return 0
    if a.dst_idx != NO_FDB and (a.dst_idx >= b.fdb.size or
                                vh_load_u32(&b.fdb.e[a.dst_idx].ver) != a.dst_ver):
        return 0
    return 1


cdef uint32_t bucket_filter(bucket_t *b, pkt_t **pkts, uint32_t n, pktpool_t *pool,
                            uint64_t *dropped) noexcept nogil:
    """Token-bucket policing in place: frames over the rate are freed; returns the kept."""
    cdef uint64_t t
    cdef uint32_t i, kept = 0
    cdef uint64_t d = 0
    vh_lock(&b.lock)
    t = now_ns()                       # read under the lock: time never runs backwards here
    if b.last_ns and t > b.last_ns:
        b.tokens += (t - b.last_ns) * <double>b.rate / 1e9
    if t > b.last_ns:
        b.last_ns = t
    if b.tokens > b.burst:
        b.tokens = b.burst
    for i in range(n):
        if b.tokens >= pkts[i].len:
            b.tokens -= pkts[i].len
            pkts[kept] = pkts[i]
            kept += 1
        else:
            pool_put(pool, pkts[i])
            d += 1
    vh_unlock(&b.lock)
    if d:
        vh_add_u64(dropped, d)
    return kept


cdef class Datapath:
    """The ports and bridges tables and the generation shared by every PMD thread."""

    cdef switch_t *sw
    cdef dict port_objs            # port id -> its PortDev, kept alive
    cdef dict bridge_objs          # bridge id -> (Classifier, MacTable) kept alive
    cdef list stuck                # tables a stuck PMD may still hold
    cdef readonly list pmds
    cdef object punt_obj           # the PuntQueue behind sw.punt, kept alive
    cdef set fail_open             # ids of the bridges in fail-open mode
    cdef dict group_objs           # bridge id -> its GroupTable, kept alive
    cdef dict meter_objs           # bridge id -> its MeterTable, kept alive

    def __cinit__(self):
        self.sw = <switch_t *>calloc(1, sizeof(switch_t))
        if self.sw == NULL:
            raise MemoryError()
        self.sw.gen = 1
        self.port_objs = {}
        self.bridge_objs = {}
        self.stuck = []
        self.pmds = []
        self.fail_open = set()
        self.group_objs = {}
        self.meter_objs = {}

    def __dealloc__(self):
        cdef int i
        if self.sw != NULL:
            for i in range(MAX_PORTS):
                free(self.sw.ports[i])
            for i in range(MAX_BRIDGES):
                if self.sw.bridges[i] != NULL:
                    free(self.sw.bridges[i].mirrors)
                free(self.sw.bridges[i])
            free(self.sw)

    def set_bridge(self, int bridge_id, Classifier cls, MacTable macs):
        """Bridge ``bridge_id`` looks up in ``cls`` and learns into ``macs`` (a new MAC table
        replaces the old one: every cached decision goes, then the old table may go)."""
        cdef bridge_t *b
        if not 0 <= bridge_id < MAX_BRIDGES:
            raise ValueError(f"bridge id {bridge_id} out of range")
        b = <bridge_t *>calloc(1, sizeof(bridge_t))
        if b == NULL:
            raise MemoryError()
        b.cls = cls.c
        b.fdb = macs.f
        b.fail_open = bridge_id in self.fail_open
        if bridge_id in self.group_objs:
            b.groups = (<GroupTable>self.group_objs[bridge_id]).t
        if bridge_id in self.meter_objs:
            b.meters = (<MeterTable>self.meter_objs[bridge_id]).t
        old = self.sw.bridges[bridge_id]
        if old != NULL:
            b.mirrors = old.mirrors                  # the mirrors stay (now b's)
            b.ttl_punt = old.ttl_punt                # and what the controllers asked for
        old_objs = self.bridge_objs.get(bridge_id)
        self.bridge_objs[bridge_id] = (cls, macs)     # alive before any PMD can see them
        self.sw.bridges[bridge_id] = b
        vh_fence_seq_cst()
        self.invalidate()
        if old != NULL:
            try:
                self.synchronize()
            except TimeoutError:
                self.stuck.append(old_objs)         # a PMD may still use them: never freed
                raise
            free(old)

    def remove_bridge(self, int bridge_id):
        cdef bridge_t *b
        self.fail_open.discard(bridge_id)
        if not 0 <= bridge_id < MAX_BRIDGES or self.sw.bridges[bridge_id] == NULL:
            raise KeyError(bridge_id)
        b = self.sw.bridges[bridge_id]
        self.sw.bridges[bridge_id] = NULL
        vh_fence_seq_cst()
        self.invalidate()
        self.synchronize()
        free(b.mirrors)
        free(b)
        del self.bridge_objs[bridge_id]
        self.group_objs.pop(bridge_id, None)         # (no PMD can be inside it now)
        self.meter_objs.pop(bridge_id, None)

    def set_punt(self, PuntQueue queue):
        """Frames an output to CONTROLLER sends go to ``queue`` (None: they are dropped)."""
        old = self.punt_obj
        self.sw.punt = queue.q if queue is not None else NULL
        self.punt_obj = queue
        vh_fence_seq_cst()
        if old is not None and old is not queue:
            try:
                self.synchronize()                  # no PMD still pushes into the old one
            except TimeoutError:
                self.stuck.append(old)              # a stuck PMD may: never freed
                raise

    def set_groups(self, int bridge_id, GroupTable groups):
        """The bridge's group table (set once; changes to it need ``invalidate()``)."""
        if not 0 <= bridge_id < MAX_BRIDGES or self.sw.bridges[bridge_id] == NULL:
            raise KeyError(bridge_id)
        if self.sw.bridges[bridge_id].groups != NULL:
            raise ValueError(f"bridge {bridge_id} has its group table")
        self.group_objs[bridge_id] = groups
        self.sw.bridges[bridge_id].groups = groups.t
        self.invalidate()

    def set_meters(self, int bridge_id, MeterTable meters):
        """The bridge's meter table (set once; a meter op names a slot of it, so changing
        a meter's bands needs no invalidation; a deleted meter's rules go with it)."""
        if not 0 <= bridge_id < MAX_BRIDGES or self.sw.bridges[bridge_id] == NULL:
            raise KeyError(bridge_id)
        if self.sw.bridges[bridge_id].meters != NULL:
            raise ValueError(f"bridge {bridge_id} has its meter table")
        self.meter_objs[bridge_id] = meters
        self.sw.bridges[bridge_id].meters = meters.t
        self.invalidate()

    def set_fail_open(self, int bridge_id, bint on):
        """Fail-open (OpenFlow's standalone fail mode with no controller): the bridge
        forwards every packet by NORMAL, its rules unused but kept; off: rules again."""
        if not 0 <= bridge_id < MAX_BRIDGES or self.sw.bridges[bridge_id] == NULL:
            raise KeyError(bridge_id)
        if on:
            self.fail_open.add(bridge_id)
        else:
            self.fail_open.discard(bridge_id)
        vh_store_release_int(&self.sw.bridges[bridge_id].fail_open, on)
        self.invalidate()                           # every cached decision goes stale

    def set_invalid_ttl_punt(self, int bridge_id, bint on):
        """Whether a frame whose TTL dec_ttl expires goes to the controller queue (a
        controller asked for INVALID_TTL PACKET_INs) or is only dropped and counted (none
        did: it never takes the bridge's PACKET_IN budget)."""
        if not 0 <= bridge_id < MAX_BRIDGES or self.sw.bridges[bridge_id] == NULL:
            raise KeyError(bridge_id)
        vh_store_release_int(&self.sw.bridges[bridge_id].ttl_punt, on)

    def set_mirrors(self, int bridge_id, list mirrors):
        """The bridge's mirrors from now on, each a dict: ``out`` (port id), ``src`` and
        ``dst`` (the port ids whose input / output it copies), ``vlan`` (-1: any), ``filter``
        (None or (mask, value) as flow-key bytes) and ``carry``: the index of the mirror
        it continues in the previous set (its counters go on), or -1. The old selection
        is withdrawn and every PMD has let go of it before the new one shows."""
        cdef bridge_t *b
        cdef mirror_set_t *ms = NULL
        cdef mirror_set_t *old
        cdef mirror_t *m
        cdef port_t *p
        cdef int i, j
        cdef bytes mask, value
        if not 0 <= bridge_id < MAX_BRIDGES or self.sw.bridges[bridge_id] == NULL:
            raise KeyError(bridge_id)
        if len(mirrors) > MAX_MIRRORS:
            raise ValueError(f"at most {MAX_MIRRORS} mirrors per bridge")
        rx, tx, outs = {}, {}, set()
        for i, spec in enumerate(mirrors):
            for port_id in (spec["out"], *spec["src"], *spec["dst"]):
                p = self._port(port_id)
                if p.bridge != bridge_id:
                    raise ValueError(f"port id {port_id} is not on bridge {bridge_id}")
            outs.add(spec["out"])
            for port_id in spec["src"]:
                rx[port_id] = rx.get(port_id, 0) | 1 << i
            for port_id in spec["dst"]:
                tx[port_id] = tx.get(port_id, 0) | 1 << i
        if mirrors:
            ms = <mirror_set_t *>calloc(1, sizeof(mirror_set_t))
            if ms == NULL:
                raise MemoryError()
            ms.n = len(mirrors)
            for i, spec in enumerate(mirrors):
                m = &ms.m[i]
                m.out_port = spec["out"]
                m.vlan = spec["vlan"]
                if spec["filter"] is not None:
                    mask, value = spec["filter"]
                    if len(mask) != sizeof(m.mask) or len(value) != sizeof(m.value):
                        free(ms)
                        raise ValueError("a mirror filter is a flow key's mask and value")
                    m.has_filter = 1
                    memcpy(m.mask, <const char *>mask, sizeof(m.mask))
                    memcpy(m.value, <const char *>value, sizeof(m.value))
                    for j in range(KEY_WORDS):
                        m.value[j] &= m.mask[j]
        b = self.sw.bridges[bridge_id]
        for i in range(MAX_PORTS):                  # withdraw the old selection first
            p = self.sw.ports[i]
            if p != NULL and p.bridge == bridge_id:
                p.mirror_rx = 0
                p.mirror_tx = 0
        vh_fence_seq_cst()
        try:
            self.synchronize()
        except TimeoutError:
            free(ms)
            raise
        old = b.mirrors
        b.mirrors = ms                              # no PMD can be reading ``old`` now
        if old != NULL:
            for i, spec in enumerate(mirrors):
                j = spec["carry"]
                if 0 <= j < <int>old.n:
                    ms.m[i].tx_packets = old.m[j].tx_packets
                    ms.m[i].tx_bytes = old.m[j].tx_bytes
                    ms.m[i].no_copy = old.m[j].no_copy
            free(old)
        vh_fence_seq_cst()
        for i in range(MAX_PORTS):
            p = self.sw.ports[i]
            if p != NULL and p.bridge == bridge_id:
                p.mirror_only = 2 if p.mirror_only == 2 else i in outs
                p.mirror_rx = rx.get(i, 0)
                p.mirror_tx = tx.get(i, 0)
        self.wake_all()

    def mirror_stats(self, int bridge_id):
        """Per mirror of the bridge, in order: (tx_packets, tx_bytes, no_copy)."""
        cdef bridge_t *b
        cdef mirror_set_t *ms
        if not 0 <= bridge_id < MAX_BRIDGES or self.sw.bridges[bridge_id] == NULL:
            raise KeyError(bridge_id)
        ms = self.sw.bridges[bridge_id].mirrors
        if ms == NULL:
            return []
        return [(vh_load_u64(&ms.m[i].tx_packets), vh_load_u64(&ms.m[i].tx_bytes),
                 vh_load_u64(&ms.m[i].no_copy)) for i in range(ms.n)]

    def invalidate(self):
        """Every cached flow of every bridge is stale (a port or a bridge came or went)."""
        self.sw.gen += 1
        if self.sw.gen == 0:
            self.sw.gen = 1

    @property
    def generation(self):
        return self.sw.gen

    @property
    def port_end(self):
        """1 + the highest port id in use (0: none): where loops over ports stop."""
        return self.sw.port_end

    def add_port(self, int port_id, int bridge, PortDev dev, bint mirror_only=False):
        """Port ``port_id`` on ``bridge``: ``dev`` (of any port class) receives and sends;
        ``mirror_only``: only ever a mirror's output (a capture), from its first moment."""
        cdef port_t *p
        if not 0 <= port_id < MAX_PORTS or self.sw.ports[port_id] != NULL:
            raise ValueError(f"port id {port_id} is taken or out of range")
        if port_id in self.port_objs:       # removed, but a stuck PMD may still be inside
            raise ValueError(f"port id {port_id} is still held by a stuck PMD")
        if dev.ops == NULL or dev.dev == NULL:
            raise ValueError("the port's device is not set up")
        if not 1 <= dev.nqueues <= MAX_PORT_QUEUES:
            raise ValueError(f"a port has 1..{MAX_PORT_QUEUES} queue pairs")
        p = <port_t *>calloc(1, sizeof(port_t))
        if p == NULL:
            raise MemoryError()
        p.id = port_id
        p.bridge = bridge
        p.nqueues = dev.nqueues
        p.ops = dev.ops
        p.dev = dev.dev
        p.per_remote = dev.per_remote
        p.mirror_only = 2 if mirror_only else 0      # 2: for good (set_mirrors keeps it)
        p.up = 1
        self.port_objs[port_id] = dev
        self.sw.ports[port_id] = p
        if port_id >= self.sw.port_end:               # (after the port: a PMD that reads
            vh_store_u32(&self.sw.port_end, port_id + 1)   # it sees the port)
        self.invalidate()
        self.wake_all()

    def remove_port(self, int port_id):
        cdef port_t *p
        cdef uint32_t end
        if not 0 <= port_id < MAX_PORTS or self.sw.ports[port_id] == NULL:
            raise KeyError(port_id)
        p = self.sw.ports[port_id]
        self.sw.ports[port_id] = NULL
        end = self.sw.port_end
        while end and self.sw.ports[end - 1] == NULL:
            end -= 1
        vh_store_u32(&self.sw.port_end, end)
        vh_fence_seq_cst()        # the NULL is visible before we read the PMDs' state
        self.invalidate()
        self.synchronize()
        free(p)
        del self.port_objs[port_id]
        self.wake_all()

    def set_port_config(self, int port_id, bint forward, bint receive, bint flood):
        """OpenFlow's port config (PORT_MOD): whether the port is sent to, whether what it
        receives is taken, whether floods include it."""
        cdef port_t *p = self._port(port_id)
        vh_store_release_int(&p.up, forward)
        p.no_recv = not receive
        p.no_flood = not flood
        self.invalidate()

    def set_police(self, int port_id, uint64_t rate, uint64_t burst):
        """Ingress policing in bytes/s and bytes; rate 0 turns it off."""
        self._set_bucket(&self._port(port_id).police, rate, burst)

    def set_shape(self, int port_id, uint64_t rate, uint64_t burst):
        """Egress rate limit in bytes/s and bytes; rate 0 turns it off."""
        self._set_bucket(&self._port(port_id).shape, rate, burst)

    cdef void _set_bucket(self, bucket_t *b, uint64_t rate, uint64_t burst):
        with nogil:
            vh_lock(&b.lock)
        b.rate = rate
        b.burst = burst
        b.tokens = burst
        b.last_ns = 0
        vh_unlock(&b.lock)

    cdef port_t *_port(self, int port_id) except NULL:
        if not 0 <= port_id < MAX_PORTS or self.sw.ports[port_id] == NULL:
            raise KeyError(port_id)
        return self.sw.ports[port_id]

    def port_stats(self, int port_id):
        """Every counter of the port: port_counters_t, field by field (Cython's struct
        to dict conversion names each value after its own field)."""
        cdef port_t *p = self._port(port_id)
        cdef port_counters_t snapshot = p.c
        return snapshot

    def rxq_load(self, int port_id):
        """Per RX queue: (processing ns, packets) since the port was added."""
        cdef port_t *p = self._port(port_id)
        return [(p.rxq_ns[q], p.rxq_packets[q]) for q in range(p.nqueues)]

    def new_pmd(self, int pmd_id, int pool_size=4096, int buf_size=65600,
                int flow_limit=DEFAULT_FLOW_LIMIT):
        """A PMD whose megaflow cache keeps at most ``flow_limit`` entries."""
        if not 1 <= flow_limit <= 50000000:
            raise ValueError(f"flow-limit {flow_limit} out of range 1..50000000")
        pmd = Pmd(self, pmd_id, PacketPool(pool_size, buf_size), flow_limit)
        self.pmds.append(pmd)
        return pmd

    def remove_pmd(self, Pmd pmd):
        """Forget a PMD whose thread has ended (its pool and caches go with it)."""
        if pmd.running:
            raise RuntimeError(f"PMD {pmd.pmd_id} is still running")
        self.pmds.remove(pmd)

    def wake_all(self):
        for pmd in self.pmds:
            pmd.wake()

    def synchronize(self, double timeout=5.0):
        """Wait until every running PMD has passed a quiescent point."""
        cdef Pmd pmd
        seen = [(pmd, pmd.seq) for pmd in self.pmds]
        deadline = time.monotonic() + timeout
        for pmd, seq in seen:
            pmd.wake()
            while pmd.running and not pmd.quiescent_since(seq):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"PMD {pmd.pmd_id} did not quiesce")
                time.sleep(0.0005)


cdef cls_rule_t *rule_of_op(const actions_t *a, int at, uint16_t op, bint apply) noexcept nogil:
    """The rule of ``a`` that op ``at`` (an ``op``) came from: ``apply``, the one whose
    apply-actions hold the k-th ``op`` of all theirs (``at`` the k-th in ``a``); else the
    last rule whose write-actions hold one (the action set keeps the last written)."""
    cdef int i, h, j, k = 0
    cdef cls_rule_t *r
    cdef cls_rule_t *found = NULL
    for i in range(at):
        if a.ops[i].op == op:
            k += 1
    for h in range(a.n_rules):
        r = <cls_rule_t *>a.rules[h]
        for j in range(r.n_apply if apply else r.n_ops):
            if r.ops[j].op != op:
                continue
            if not apply:
                if j >= r.n_apply:
                    found = r
            elif k == 0:
                return r
            else:
                k -= 1
    return found


cdef class Pmd:
    """One poll-mode thread's state; ``run()`` is its body (call it from its own thread)."""

    cdef Datapath dp
    cdef switch_t *sw
    cdef readonly int pmd_id
    cdef PacketPool pool_obj
    cdef pktpool_t *pool
    cdef emc_t *emc
    cdef mf_t mf
    cdef uint32_t mf_hits_since_insert
    # one wildcard-cache hit (or upcall) in this many is copied into the EMC: OVS's
    # emc-insert-inv-prob (there a probability, here every Nth); 0: the EMC is off
    cdef uint32_t emc_insert_every
    cdef bint emc_missed                   # the last burst had EMC misses: prefetch megaflows
    # the EMC is skipped while it loses most lookups to other flows in its slots (more
    # flows than it holds: 10k flows on 2 megaflows, a 36% hit rate, cost ~13 ns a frame
    # more with it than without); it is still filled as when asked, and asked in one poll
    # round of EMC_PROBE_EVERY, so it comes back when it would answer (emc_decide)
    cdef bint emc_skip
    cdef bint emc_round                    # this poll round asks the EMC
    cdef uint32_t emc_win_hits, emc_win_conflicts, emc_rounds
    # rule counters of a burst's run of frames through the same rules, added once (two
    # locked adds per rule and frame were ~13% of the PMD's time): see account_run
    cdef void *run_rules[MAX_HOPS]
    cdef uint16_t run_n
    cdef uint64_t run_packets, run_bytes
    # per input port: most of its last burst's frames that reached the megaflow cache fell
    # under the megaflow of the frame before them (then no probe hints are made for it)
    cdef uint8_t mf_reusing[MAX_PORTS]
    # finished runs of this burst, added at its end: each rule's counters were asked for
    # (prefetched for writing) when its run ended, so with a rule per frame (many flows,
    # a rule each) the adds no longer wait for each line in turn
    cdef void *done_rules[MAX_BURST * MAX_HOPS]
    cdef uint64_t done_packets[MAX_BURST * MAX_HOPS]
    cdef uint64_t done_bytes[MAX_BURST * MAX_HOPS]
    cdef uint32_t ndone
    cdef uint32_t upcalls_untimed
    cdef uint64_t upcall_cost_ns        # moving average of timed upcalls
    cdef uint32_t now_ms                # the burst's millisecond clock (MAC table ages)
    cdef uint64_t window_start          # upcall fairness: per-port upcall time per window
    cdef uint64_t up_budget_ns
    cdef uint64_t up_ns[MAX_PORTS]
    cdef uint32_t win_packets[MAX_PORTS]
    cdef rxq_ref_t poll[MAX_POLL]
    cdef int npoll
    cdef rxq_ref_t next_poll[MAX_POLL]
    cdef int next_npoll
    cdef int reload
    cdef int lock
    cdef uint64_t seq_
    cdef int running_
    cdef int stopping
    cdef idle_t idle
    cdef uint64_t sleep_max_ns          # load-based sleep bound (0: off; OVS pmd-sleep-max)
    cdef uint64_t sleep_ns              # the current load-based sleep
    cdef rxq_src_t inputs[MAX_POLL]  # the polled queues, for the idle path
    cdef pmd_stats_t st
    cdef pkt_t *batch[MAX_PORTS][MAX_BURST]
    cdef uint32_t nbatch[MAX_PORTS]
    cdef uint16_t touched[MAX_PORTS]
    cdef uint8_t is_touched[MAX_PORTS]
    cdef uint32_t ntouched
    cdef port_t *cur_inp                # the port whose burst is being processed
    cdef port_t ext_port                # inject(): the input of a frame from no port
    # the last clock reading and whether only a burst's receive came after it (then it
    # stands for now: a clock read costs ~70 ns on a VM, more than a frame's lookup)
    cdef uint64_t stamp
    cdef bint stamp_fresh

    def __cinit__(self, Datapath dp, int pmd_id, PacketPool pool, int flow_limit):
        self.dp = dp
        self.sw = dp.sw
        self.pmd_id = pmd_id
        self.pool_obj = pool
        self.pool = pool.pool
        self.emc = <emc_t *>calloc(1, sizeof(emc_t))
        if self.emc == NULL or mf_init(&self.mf, flow_limit) < 0:
            raise MemoryError()
        self.up_budget_ns = NO_UPCALL_LIMIT
        self.emc_insert_every = EMC_INSERT_EVERY
        idle_init(&self.idle)

    def __dealloc__(self):
        free(self.emc)
        mf_free(&self.mf)
        idle_free(&self.idle)

    # -- control side -------------------------------------------------------------------
    @property
    def seq(self):
        return vh_load_u64(&self.seq_)

    @property
    def running(self):
        return bool(vh_load_acquire_int(&self.running_))

    def quiescent_since(self, uint64_t seq):
        return vh_load_u64(&self.seq_) != seq or vh_load_acquire_int(&self.idle.sleeping)

    def set_rxqs(self, rxqs):
        """The (port id, queue) pairs this PMD polls from now on."""
        cdef rxq_ref_t refs[MAX_POLL]
        cdef int n = len(rxqs), i
        if n > MAX_POLL:
            raise ValueError(f"at most {MAX_POLL} RX queues per PMD")
        for i, (port, queue) in enumerate(rxqs):
            if not (0 <= port < MAX_PORTS and 0 <= queue < MAX_PORT_QUEUES):
                raise ValueError(f"no RX queue ({port}, {queue})")
            refs[i].port = port
            refs[i].queue = queue
        with nogil:
            vh_lock(&self.lock)
            memcpy(self.next_poll, refs, sizeof(rxq_ref_t) * n)
            self.next_npoll = n
            vh_store_release_int(&self.reload, 1)
            vh_unlock(&self.lock)
        self.wake()

    def rxqs(self):
        with nogil:
            vh_lock(&self.lock)
        if self.reload:
            out = [(self.next_poll[i].port, self.next_poll[i].queue)
                   for i in range(self.next_npoll)]
        else:
            out = [(self.poll[i].port, self.poll[i].queue) for i in range(self.npoll)]
        vh_unlock(&self.lock)
        return out

    def wake(self):
        idle_wake(&self.idle)

    def set_sleep_max(self, uint32_t us):
        """Load-based sleeping, as OVS's other_config:pmd-sleep-max: while no polled
        queue gives at least half a burst, the loop sleeps a little longer each round
        (1 us more, at most ``us``), giving the core back at the cost of that much
        latency; a busy round (half a burst or more) polls again at once. 0: off."""
        if us > MAX_LOAD_SLEEP_US:
            raise ValueError(f"sleep-max {us} us out of range 0..{MAX_LOAD_SLEEP_US}")
        vh_store_u64(&self.sleep_max_ns, <uint64_t>us * 1000)

    def set_emc_insert_inv_prob(self, n):
        """As OVS's other_config:emc-insert-inv-prob: one wildcard-cache hit in ``n`` is
        copied into the exact-match cache (1: every one); 0 turns the EMC off (never asked,
        never filled: every frame is counted as skipped). PmdSet sets it before the thread
        runs; set later, it counts from the next frame (one aligned word)."""
        if type(n) is not int or not 0 <= n <= 0xFFFFFFFF:
            raise ValueError(f"emc-insert-inv-prob {n!r}: not an int in 0..4294967295")
        self.emc_insert_every = n

    def stop(self):
        vh_store_release_int(&self.stopping, 1)
        vh_eventfd_signal(self.idle.wakefd)

    def stats(self):
        cdef pmd_stats_t snapshot = self.st
        cdef dict out = snapshot               # the struct as a dict, named by its fields
        out["sleeps"] = self.idle.sleeps
        out["emc_skipping"] = bool(self.emc_skip) or self.emc_insert_every == 0
        out["emc_insert_inv_prob"] = self.emc_insert_every
        out["megaflows"] = self.mf.count
        out["megaflow_masks"] = sum(1 for i in range(self.mf.nmasks) if self.mf.masks[i].refs)
        out["megaflow_evictions"] = self.mf.evictions
        out["megaflow_limit"] = self.mf.limit
        out["subtables_per_hit"] = (self.mf.lookups_per_hit_num / self.mf.hits
                                    if self.mf.hits else 0.0)
        return out

    def clear_stats(self):
        memset(&self.st, 0, sizeof(pmd_stats_t))
        self.idle.sleeps = 0


    # -- data path ------------------------------------------------------------------------
    cdef int upcall(self, port_t *inp, const flow_key_t *k, actions_t *a,
                    uint64_t *mask) noexcept nogil:
        """A miss: the bridge's classifier, then NORMAL through its MAC table. 0 with ``a``
        (and what it depends on) and the megaflow ``mask`` filled; -1 to drop."""
        cdef bridge_t *b
        cdef cls_result_t res
        cdef flow_key_t cur
        cdef uint32_t i, n = 0
        cdef int j
        a.gen = vh_load_u32(&self.sw.gen)           # before the bridge: a table swapped
        b = self.sw.bridges[inp.bridge]             # after this read makes the entry stale
        if b == NULL:
            return -1
        memset(mask, 0, KEY_WORDS * sizeof(uint64_t))
        a.bridge = inp.bridge
        a.flags = 0
        a.src_idx = NO_FDB
        a.dst_idx = NO_FDB
        if vh_load_acquire_int(&b.fail_open):
            a.rule_gen = vh_load_u32(&b.cls.gen)
            a.n_rules = 0
            for j in range(KEY_WORDS):
                mask[j] = IN_PORT_MASK.w[j] | NORMAL_MASK.w[j]
                if inp.per_remote:
                    mask[j] |= REMOTE_MASK.w[j]
            j = self.normal(b, inp, k, a, &a.ops[0], MAX_ACTION_OPS)
            if j < 0:
                return -1
            a.n_ops = j
            return 0
        cls_read_lock(b.cls)
        a.rule_gen = b.cls.gen
        cls_lookup(b.cls, k, mask, &res)
        cls_unlock(b.cls)
        if res.overflow:
            return -1
        for j in range(KEY_WORDS):
            mask[j] |= IN_PORT_MASK.w[j]           # a megaflow never crosses ports/bridges
        a.n_rules = res.n_rules
        for i in range(res.n_rules):
            a.rules[i] = res.rules[i]
        for i in range(res.n_ops):
            if res.ops[i].op == OP_NORMAL:
                for j in range(KEY_WORDS):
                    mask[j] |= NORMAL_MASK.w[j]
                    if inp.per_remote:             # the remote it learns
                        mask[j] |= REMOTE_MASK.w[j]
                cur = k[0]                         # as the ops before it left the packet
                key_run(&cur, a.ops, n, mask)      # (OVS: NORMAL sees the edited flow)
                j = self.normal(b, inp, &cur, a, &a.ops[n], MAX_ACTION_OPS - n)
                if j < 0:
                    return -1
                n += j
            elif res.ops[i].op == OP_GROUP:
                cur = k[0]
                key_run(&cur, a.ops, n, mask)
                j = group_resolve(b.groups, res.ops[i].arg, k, cur.vlan_tci, mask,
                                  &a.ops[n], MAX_ACTION_OPS - n)
                if j < 0:
                    return -1                      # more ops than an entry holds: drop
                n += j
            else:
                a.ops[n] = res.ops[i]
                n += 1
        a.n_ops = n
        return 0

    cdef int normal(self, bridge_t *b, port_t *inp, const flow_key_t *k, actions_t *a,
                    action_op_t *op, int room) noexcept nogil:
        """MAC learning: learn the source (with its remote on a per-remote port), then the
        ops for the destination: how many (0: none; -1: more than ``room``, drop)."""
        cdef uint16_t vlan = k.vlan_tci & 0x0FFF if k.vlan_tci else 0
        cdef uint32_t learn_gen = vh_load_u32(&b.fdb.add_gen)
        cdef uint32_t remote = 0, vni = 0, h
        cdef int port
        if inp.per_remote:
            remote = k.tun_src
            vni = k.tun_id if remote else 0
        if inp.id >= MAX_PORTS or (inp.per_remote and remote == 0):
            pass                                   # from no port (inject()), or a frame on a
                                                   # per-remote port without one (PACKET_OUT)
        elif fdb_learn(b.fdb, vlan, k.dl_src, inp.id, remote, vni, self.now_ms,
                       &a.src_idx, &a.src_ver) < 0 and not k.dl_src[0] & 1:
            a.flags |= DEP_LEARN                   # not learned (a group address never is):
                                                   # try again once the table changes
            a.learn_gen = learn_gen
        if room < 1:
            return -1
        op.arg = 0
        if k.dl_dst[0] & 1:
            op.op = OP_FLOOD
            return 1
        port = fdb_lookup(b.fdb, vlan, k.dl_dst, &a.dst_idx, &a.dst_ver, &remote, &vni)
        if port < 0:
            a.flags |= DEP_LEARN                   # unknown: flood until it is learned
            a.learn_gen = learn_gen
            op.op = OP_FLOOD
            return 1
        if port == inp.id:
            return 0
        if remote == 0:
            op.op = OP_OUTPUT
            op.arg = port
            return 1
        if room < 5:                               # to its remote: set tun_id and tun_dst
            return -1
        h = ((remote & 0xFF) << 24) | (((remote >> 8) & 0xFF) << 16) | \
            (((remote >> 16) & 0xFF) << 8) | (remote >> 24)     # host order, as the op's
        op[0].op = OP_TUN_HI
        op[0].arg = vni >> 16
        op[1].op = OP_SET_TUN_ID
        op[1].arg = vni & 0xFFFF
        op[2].op = OP_TUN_HI
        op[2].arg = h >> 16
        op[3].op = OP_SET_TUN_DST
        op[3].arg = h & 0xFFFF
        op[4].op = OP_OUTPUT
        op[4].arg = port
        return 5

    cdef void flush(self, uint16_t port_id) noexcept nogil:
        cdef uint32_t n = self.nbatch[port_id], sent = 0, failed = 0
        cdef port_t *p = self.sw.ports[port_id]
        cdef tx_result_t res
        cdef pkt_t **pkts = self.batch[port_id]
        self.nbatch[port_id] = 0
        if n == 0:
            return
        if p == NULL or not p.up:
            if self.cur_inp != NULL:
                vh_add_u64(&self.cur_inp.c.drop_no_port, n)
            pool_put_many(self.pool, pkts, n)
            return
        if not p.ops.tx_ref or p.shape.rate:
            n = self.make_whole(pkts, n)           # (a port changed since the decision)
        if p.shape.rate:
            n = bucket_filter(&p.shape, pkts, n, self.pool, &p.c.drop_qos)
        if n:
            res.failed = 0
            res.refused = 0
            res.bytes = 0
            res.onecopy = 0
            sent = p.ops.tx_burst(p.dev, self.pmd_id, self.pool, pkts, n, &res)
            failed = res.failed
            self.st.onecopy += res.onecopy
            if sent:
                vh_add_u64(&p.c.tx_packets, sent)
                vh_add_u64(&p.c.tx_bytes, res.bytes)
            if failed:
                vh_add_u64(&p.c.drop_offload, failed)
            if res.refused:
                vh_add_u64(&p.c.drop_tx_error, res.refused)
            if sent + failed + res.refused < n:
                vh_add_u64(&p.c.drop_tx_full, n - sent - failed - res.refused)
            pool_put_many(self.pool, pkts, n)

    cdef uint32_t make_whole(self, pkt_t **pkts, uint32_t n) noexcept nogil:
        """Every frame of ``pkts`` whole in its buffer (vq_materialize); a frame whose
        sender's memory faulted is freed (the sender's ring counts the fault). Returns
        how many are left, in order."""
        cdef uint32_t i, kept = 0
        for i in range(n):
            if pkts[i].ext_len and vq_materialize(pkts[i]) < 0:
                pool_put(self.pool, pkts[i])
                continue
            pkts[kept] = pkts[i]
            kept += 1
        return kept

    cdef inline bint one_copy_ok(self, port_t *inp, const actions_t *a) noexcept nogil:
        """May a frame whose tail is still in its sender's memory follow ``a`` as it is?
        Only exactly one output to a port whose class sends such frames (tx_ref), with
        nothing that reads or copies the whole frame on the way (a mirror of the output,
        shaping, a per-remote port's copies)."""
        cdef port_t *o
        if a.n_ops != 1 or a.ops[0].op != OP_OUTPUT or a.ops[0].arg >= MAX_PORTS or \
                a.ops[0].arg == inp.id:
            return False
        o = self.sw.ports[a.ops[0].arg]
        return o != NULL and o.ops.tx_ref and o.up and o.bridge == inp.bridge and \
            not o.mirror_only and not o.mirror_tx and not o.shape.rate and not o.per_remote

    cdef inline void rx_done(self, port_t *inp, uint16_t q) noexcept nogil:
        """The input's buffers of a by-reference burst go back (after every flush)."""
        if inp.ops.rx_complete != NULL and inp.ops.rx_burst_ref != NULL:
            inp.ops.rx_complete(inp.dev, q)

    cdef inline void output(self, uint16_t port_id, pkt_t *pkt) noexcept nogil:
        cdef port_t *o
        if not self.is_touched[port_id]:          # once per port per burst, however often
            self.is_touched[port_id] = 1          # its batch fills and is flushed
            self.touched[self.ntouched] = port_id
            self.ntouched += 1
            o = self.sw.ports[port_id]            # its send's first loads start now
            if o != NULL and o.ops.tx_prefetch != NULL:
                o.ops.tx_prefetch(o.dev, self.pmd_id)
        self.batch[port_id][self.nbatch[port_id]] = pkt
        self.nbatch[port_id] += 1
        if self.nbatch[port_id] == MAX_BURST:
            self.flush(port_id)

    cdef pkt_t *clone(self, pkt_t *p) noexcept nogil:
        """A copy of ``p`` (frame and virtio-net header), or NULL (no buffer, or ``p`` grew
        past a buffer's room with a VLAN tag pushed into its headroom, or its tail is still
        in its sender's memory: callers make frames whole first, this is the safety net for
        a mirror set that changed in between)."""
        cdef pkt_t *c
        if p.ext_len:
            return NULL
        c = pool_get(self.pool)
        if c == NULL:
            return NULL
        if p.len > c.cap:
            pool_put(self.pool, c)
            return NULL
        memcpy(c.data, p.data, p.len)
        memcpy(c.vnet_hdr, p.vnet_hdr, sizeof(p.vnet_hdr))
        c.len = p.len
        c.tun_id = p.tun_id
        c.tun_src = p.tun_src
        c.tun_dst = p.tun_dst
        return c

    cdef inline bint mirror_takes(self, const mirror_t *m, port_t *inp,
                                  const flow_key_t *k) noexcept nogil:
        """Does mirror ``m`` copy this frame of ``inp``'s (it selects it, and its output
        is another port of the bridge)?"""
        cdef port_t *o
        if m.out_port == inp.id or not mirror_selects(m, k):
            return False
        o = self.sw.ports[m.out_port]
        return o != NULL and o.bridge == inp.bridge

    cdef bint mirrors_take(self, uint16_t bits, port_t *inp, const flow_key_t *k) noexcept nogil:
        """Does any mirror in ``bits`` copy this frame (so that it must be whole first)?"""
        cdef bridge_t *b = self.sw.bridges[inp.bridge]
        cdef uint32_t i
        if b == NULL or b.mirrors == NULL:
            return False
        for i in range(b.mirrors.n):
            if bits & (1 << i) and self.mirror_takes(&b.mirrors.m[i], inp, k):
                return True
        return False

    cdef uint16_t mirror(self, uint16_t bits, port_t *inp, const pkt_t *p,
                         const flow_key_t *k) noexcept nogil:
        """A copy of ``p`` to each mirror in ``bits`` (of ``inp``'s bridge) that takes it;
        the mirrors that took it (a mirror copies a frame once, as OVS's do)."""
        cdef bridge_t *b = self.sw.bridges[inp.bridge]
        cdef mirror_set_t *ms
        cdef mirror_t *m
        cdef pkt_t *c
        cdef uint32_t i
        cdef uint16_t took = 0
        if b == NULL or b.mirrors == NULL:
            return 0
        ms = b.mirrors
        for i in range(ms.n):
            if not bits & (1 << i) or not self.mirror_takes(&ms.m[i], inp, k):
                continue
            m = &ms.m[i]
            took |= 1 << i
            c = self.clone(<pkt_t *>p)
            if c == NULL:
                vh_add_u64(&m.no_copy, 1)
                continue
            vh_add_u64(&m.tx_packets, 1)
            vh_add_u64(&m.tx_bytes, c.len)
            self.output(m.out_port, c)
        return took

    cdef inline void send(self, port_t *inp, port_t *o, pkt_t *p, const flow_key_t *k,
                          uint16_t *mirrored) noexcept nogil:
        """``p`` into ``o``'s batch; first its copies for the mirrors of ``o``'s output
        that have not had this frame yet (``mirrored``)."""
        if o.mirror_tx & ~mirrored[0]:
            mirrored[0] |= self.mirror(o.mirror_tx & ~mirrored[0], inp, p, k)
        self.output(o.id, p)

    cdef void flood_remotes(self, port_t *inp, port_t *o, pkt_t *p, const flow_key_t *k,
                            uint16_t *mirrored) noexcept nogil:
        """A copy of ``p`` into ``o`` for each remote the MAC table learned behind it,
        with that remote's tun_dst and tun_id."""
        cdef uint32_t remotes[2 * FDB_REMOTES]
        cdef uint32_t n, i
        cdef pkt_t *c
        cdef bridge_t *b = self.sw.bridges[inp.bridge]
        if b == NULL:
            return
        n = fdb_remotes(b.fdb, o.id, remotes, FDB_REMOTES)
        for i in range(n):
            c = self.clone(p)
            if c == NULL:
                vh_add_u64(&inp.c.drop_copy, 1)
                continue
            c.tun_dst = remotes[2 * i]
            c.tun_id = remotes[2 * i + 1]
            self.send(inp, o, c, k, mirrored)

    cdef void execute(self, port_t *inp, pkt_t *p, const actions_t *a,
                      const flow_key_t *k, uint16_t mirrored) noexcept nogil:
        """Run ``a`` on ``p`` (whose key is ``k``, which the mirrors in ``mirrored`` have
        had); every output but the final op's last gets a copy. A mirror's output port
        takes no other frames."""
        cdef int i, j
        cdef uint16_t op
        cdef uint64_t hi = 0               # a wide op's high bits (OP_TUN_HI)
        cdef bint owned = True, final
        cdef pkt_t *c
        cdef port_t *o
        cdef port_t *last
        cdef bridge_t *b
        for i in range(a.n_ops):
            op = a.ops[i].op
            final = i == a.n_ops - 1
            if op == OP_OUTPUT:
                if a.ops[i].arg == inp.id or a.ops[i].arg >= MAX_PORTS:
                    continue                   # OpenFlow: never back out of the input port
                o = self.sw.ports[a.ops[i].arg]
                if o == NULL or o.bridge != inp.bridge or o.mirror_only:
                    continue                   # gone, or (an id reused) another bridge's
                if final:
                    self.send(inp, o, p, k, &mirrored)
                    owned = False
                else:
                    c = self.clone(p)
                    if c != NULL:
                        self.send(inp, o, c, k, &mirrored)
                    else:
                        vh_add_u64(&inp.c.drop_copy, 1)
            elif op == OP_FLOOD:
                last = NULL
                for j in range(vh_load_u32(&self.sw.port_end)):
                    o = self.sw.ports[j]
                    if o != NULL and o.up and not o.no_flood and o.bridge == inp.bridge \
                            and j != inp.id and not o.mirror_only:
                        if o.per_remote:           # a copy per remote behind it
                            self.flood_remotes(inp, o, p, k, &mirrored)
                            continue
                        if last != NULL:
                            c = self.clone(p)
                            if c != NULL:
                                self.send(inp, last, c, k, &mirrored)
                            else:
                                vh_add_u64(&inp.c.drop_copy, 1)
                        last = o
                if last != NULL:
                    if final:
                        self.send(inp, last, p, k, &mirrored)
                        owned = False
                    else:
                        c = self.clone(p)
                        if c != NULL:
                            self.send(inp, last, c, k, &mirrored)
                        else:
                            vh_add_u64(&inp.c.drop_copy, 1)
            elif op == OP_CONTROLLER:
                self.to_controller(inp, p, a, i)
            elif op == OP_IN_PORT:
                if inp.id < MAX_PORTS and self.sw.ports[inp.id] == inp:
                    if final:
                        self.send(inp, inp, p, k, &mirrored)
                        owned = False
                    else:
                        c = self.clone(p)
                        if c != NULL:
                            self.send(inp, inp, c, k, &mirrored)
                        else:
                            vh_add_u64(&inp.c.drop_copy, 1)
            elif op == OP_METER:
                b = self.sw.bridges[inp.bridge]
                if b != NULL and not meter_admit(b.meters, a.ops[i].arg, p.len, now_ns()):
                    vh_add_u64(&inp.c.drop_meter, 1)
                    break                          # the rest of the actions: not for it
            elif op == OP_SET_VLAN:
                vlan_set(p, a.ops[i].arg)
            elif op == OP_STRIP_VLAN:
                vlan_strip(p)
            elif op == OP_TUN_HI:
                hi = (hi << 16) | a.ops[i].arg
            elif op == OP_SET_TUN_ID:
                p.tun_id = <uint32_t>((hi << 16) | a.ops[i].arg)
                hi = 0
            elif op == OP_SET_TUN_DST:                 # to network order, as in the key
                p.tun_dst = ((hi >> 8) & 0xFF) | ((hi & 0xFF) << 8) | \
                    ((<uint32_t>a.ops[i].arg >> 8) << 16) | ((<uint32_t>a.ops[i].arg & 0xFF) << 24)
                hi = 0
            elif op >= OP_SET_ETH_SRC and op <= OP_DEC_TTL:
                if self.edit(inp, p, a, i, (hi << 16) | a.ops[i].arg) < 0:
                    break                          # TTL expired: the rest is not for it
                hi = 0
        if owned:
            if a.n_ops == 0:
                vh_add_u64(&inp.c.drop_action, 1)
            pool_put(self.pool, p)

    cdef int edit(self, port_t *inp, pkt_t *p, const actions_t *a, int at,
                  uint64_t v) noexcept nogil:
        """Op ``at`` of ``a``, a set-field or dec_nw_ttl, on ``p`` (``v``: its value with the
        OP_TUN_HI bits before it). -1: dec_nw_ttl found the TTL expired (the frame goes to
        the controller as INVALID_TTL, which drops it unless one asked, and no further)."""
        cdef uint16_t op = a.ops[at].op
        cdef bridge_t *b
        if op == OP_SET_ETH_SRC or op == OP_SET_ETH_DST:
            edit_eth(p, op == OP_SET_ETH_DST, v & 0xFFFFFFFFFFFFULL)
        elif op == OP_SET_NW_SRC or op == OP_SET_NW_DST:
            edit_ipv4_addr(p, op == OP_SET_NW_DST, <uint32_t>v)
        elif op == OP_SET_TP_SRC or op == OP_SET_TP_DST:
            edit_l4_port(p, op == OP_SET_TP_DST, <uint16_t>v)
        elif op == OP_SET_DSCP:
            edit_dscp(p, <uint8_t>v)
        elif op == OP_SET_PCP:
            edit_pcp(p, <uint8_t>v)
        elif op == OP_DEC_TTL and edit_dec_ttl(p) < 0:
            vh_add_u64(&inp.c.drop_action, 1)      # (a drop by the rule's action, punted
            b = self.sw.bridges[inp.bridge]        # or not: it goes no further)
            if b != NULL and vh_load_acquire_int(&b.ttl_punt):
                self.to_controller(inp, p, a, at, PUNT_INVALID_TTL)
            return -1
        return 0

    cdef void to_controller(self, port_t *inp, const pkt_t *p, const actions_t *a,
                            int at, uint8_t reason=PUNT_ACTION) noexcept nogil:
        """Op ``at`` of ``a`` (an OP_CONTROLLER, or for INVALID_TTL an OP_DEC_TTL) hands a
        copy of ``p`` to the controller queue, with the rule whose action it was (the k-th
        such op of the entry is the k-th of its rules' apply-actions, in table order; else
        the action set's, which holds the last one written)."""
        cdef uint16_t op = a.ops[at].op
        cdef cls_rule_t *r = rule_of_op(a, at, op, True)
        if r == NULL:
            r = rule_of_op(a, at, op, False)
        punt_push(self.sw.punt, p, inp.bridge, inp.id,
                  r.id if r != NULL else PUNT_NO_RULE, r.priority if r != NULL else 0,
                  r.table if r != NULL else 0,
                  a.ops[at].arg if reason == PUNT_ACTION else 0xFFFF, reason)

    def inject(self, int bridge_id, int in_port, bytes frame, ops=None):
        """Send ``frame`` as if it came in on port ``in_port`` of bridge ``bridge_id`` (a
        port id, or -1: from no port), run through ``ops`` ([(op, arg)], OP_NORMAL
        resolved through the MAC table) or, when ``ops`` is None, through the bridge's
        tables (OpenFlow's packet-out to TABLE). For a Pmd no thread runs, on the control
        thread only: that is the thread that removes ports and bridges. Returns False if
        the frame was dropped before any action."""
        cdef actions_t a
        cdef port_t *inp = NULL
        cdef pkt_t *p
        cdef int n = 0, rc
        cdef bint table = ops is None
        if self.running_:
            raise RuntimeError("inject() is for a Pmd no thread runs")
        if not 0 <= bridge_id < MAX_BRIDGES or self.sw.bridges[bridge_id] == NULL:
            raise KeyError(f"no bridge {bridge_id}")
        if not 14 <= len(frame) <= self.pool.buf_size:
            raise ValueError(f"a frame of {len(frame)} bytes (14..{self.pool.buf_size})")
        if 0 <= in_port < MAX_PORTS:
            inp = self.sw.ports[in_port]
        if inp != NULL and inp.bridge != bridge_id:
            raise ValueError(f"port {in_port} is not on bridge {bridge_id}")
        if inp == NULL:
            if in_port != -1:
                raise KeyError(f"no port {in_port}")
            memset(&self.ext_port, 0, sizeof(port_t))
            self.ext_port.id = 0xFFFF
            self.ext_port.bridge = bridge_id
            self.ext_port.up = 1
            inp = &self.ext_port
        memset(&a, 0, sizeof(actions_t))
        a.bridge = bridge_id
        a.src_idx = NO_FDB
        a.dst_idx = NO_FDB
        if not table:
            if len(ops) > MAX_ACTION_OPS:
                raise ValueError(f"more than {MAX_ACTION_OPS} actions")
            for op, arg in ops:
                if not (0 < op < 0x10000 and 0 <= arg < 0x10000):
                    raise ValueError(f"bad op ({op}, {arg})")
                a.ops[n].op = op
                a.ops[n].arg = arg
                n += 1
            a.n_ops = n
        p = pool_get(self.pool)
        if p == NULL:
            raise MemoryError("no packet buffer")
        memcpy(p.data, <const char *>frame, len(frame))
        p.len = len(frame)
        p.in_port = inp.id
        with nogil:
            rc = self._inject(inp, p, &a, table)
        return rc == 0

    cdef int _inject(self, port_t *inp, pkt_t *p, actions_t *a, bint table) noexcept nogil:
        cdef flow_key_t key, cur
        cdef uint64_t mask[KEY_WORDS]
        cdef uint64_t t = now_ns()
        cdef bridge_t *b = self.sw.bridges[inp.bridge]
        cdef uint32_t i, n = 0, count
        cdef int rc = 0, j
        cdef action_op_t given[MAX_ACTION_OPS]
        self.now_ms = <uint32_t>(t // 1000000)
        flow_extract(p, inp.id, &key, False)
        self.cur_inp = inp
        if table:
            if self.upcall(inp, &key, a, mask) < 0:
                pool_put(self.pool, p)
                rc = -1
            else:
                self.account(a, p.len, t)
        else:
            # NORMAL may become several ops (a remote's): read the given ones from a copy
            count = a.n_ops
            memcpy(given, a.ops, count * sizeof(action_op_t))
            for i in range(count):
                if given[i].op != OP_NORMAL:
                    if n >= MAX_ACTION_OPS:
                        rc = -1
                        break
                    a.ops[n] = given[i]
                    n += 1
                else:
                    cur = key                      # as the ops before it left the packet
                    key_run(&cur, a.ops, n, mask)
                    j = self.normal(b, inp, &cur, a, &a.ops[n], MAX_ACTION_OPS - n)
                    if j < 0:
                        rc = -1
                        break
                    n += j
            a.n_ops = n
            if rc < 0:
                pool_put(self.pool, p)
        if rc == 0:
            self.execute(inp, p, a, &key, 0)
        for i in range(self.ntouched):
            self.flush(self.touched[i])
            self.is_touched[self.touched[i]] = 0
        self.ntouched = 0
        self.cur_inp = NULL
        return rc

    cdef void roll_window(self, uint64_t t) noexcept nogil:
        """A new upcall-fairness window: with several ports sending on this PMD, each may
        spend at most 1/(4 * active ports) of the window in upcalls; alone, all of it."""
        cdef uint32_t i, active = 0
        for i in range(MAX_PORTS):
            if self.win_packets[i]:
                active += 1
        self.up_budget_ns = NO_UPCALL_LIMIT if active <= 1 else UPCALL_WINDOW_NS // (4 * active)
        memset(self.up_ns, 0, sizeof(self.up_ns))
        memset(self.win_packets, 0, sizeof(self.win_packets))
        self.window_start = t

    cdef inline void account_run(self, const actions_t *a, uint32_t length,
                                 uint64_t t) noexcept nogil:
        """account() for a frame of a burst: the rule counters wait while the next frames
        go through the same rules (the rules themselves, not the cache entry naming them:
        an entry may be overwritten within the burst) and are added by account_flush, which
        the burst calls before it ends (rules are not freed while a PMD is in a round)."""
        cdef uint32_t j
        cdef bridge_t *b
        cdef bint same = a.n_rules == self.run_n
        if same:
            for j in range(a.n_rules):         # (one or two, mostly: no call to memcmp)
                if a.rules[j] != self.run_rules[j]:
                    same = False
                    break
        if not same:
            self.end_run()
            self.run_n = a.n_rules
            memcpy(self.run_rules, a.rules, a.n_rules * sizeof(void *))
        self.run_packets += 1
        self.run_bytes += length
        if a.src_idx != NO_FDB:
            b = self.sw.bridges[a.bridge]
            if b != NULL and a.src_idx < b.fdb.size and b.fdb.e[a.src_idx].used_ms != self.now_ms:
                b.fdb.e[a.src_idx].used_ms = self.now_ms

    cdef inline void end_run(self) noexcept nogil:
        """The current run's counts wait for account_flush; its rules' counters are asked
        for."""
        cdef uint32_t j
        if self.run_packets:
            for j in range(self.run_n):
                if self.ndone == MAX_BURST * MAX_HOPS:
                    self.add_done(now_ns())     # (cannot happen: a run per frame at most)
                vh_prefetch_w(&(<cls_rule_t *>self.run_rules[j]).n_packets)
                vh_prefetch_w(&(<cls_rule_t *>self.run_rules[j]).used_ns)
                self.done_rules[self.ndone] = self.run_rules[j]
                self.done_packets[self.ndone] = self.run_packets
                self.done_bytes[self.ndone] = self.run_bytes
                self.ndone += 1
        self.run_packets = 0
        self.run_bytes = 0
        self.run_n = 0

    cdef inline void add_done(self, uint64_t t) noexcept nogil:
        cdef uint32_t j
        cdef cls_rule_t *r
        for j in range(self.ndone):
            r = <cls_rule_t *>self.done_rules[j]
            vh_add_u64(&r.n_packets, self.done_packets[j])
            vh_add_u64(&r.n_bytes, self.done_bytes[j])
            r.used_ns = t
        self.ndone = 0

    cdef inline bint emc_asked_now(self) noexcept nogil:
        """Does this poll round ask the EMC? Always, unless it is being skipped; then one
        round in EMC_PROBE_EVERY, every queue of it, so that its hit rate stays known (one
        burst in N would land on the same queue round after round)."""
        if self.emc_insert_every == 0:
            return False                       # the EMC is off (emc-insert-inv-prob=0)
        if not self.emc_skip:
            return True
        self.emc_rounds += 1
        return self.emc_rounds % EMC_PROBE_EVERY == 0

    cdef inline void emc_decide(self, uint32_t hits, uint32_t conflicts) noexcept nogil:
        """After a burst that asked the EMC: every EMC_WINDOW hits and conflict misses,
        skip it from now on if under 40% of them were hits, ask it again from 50% (in
        between: as it was). Misses on empty slots or stale entries do not count: a cache
        that is filling (1 miss in emc_insert_every is inserted) or was invalidated is not
        one that thrashes. Only 36% has been measured (skipping won there); the 40/50 pair
        keeps a rate near one bound from switching every window."""
        cdef uint32_t total
        self.emc_win_hits += hits
        self.emc_win_conflicts += conflicts
        total = self.emc_win_hits + self.emc_win_conflicts
        if total >= EMC_WINDOW:
            if self.emc_skip:
                self.emc_skip = 2 * self.emc_win_hits < total
            else:
                self.emc_skip = 5 * self.emc_win_hits < 2 * total
            self.emc_win_hits = 0
            self.emc_win_conflicts = 0

    cdef inline void account_flush(self, uint64_t t) noexcept nogil:
        """Add the burst's rule counts (before it ends: rules are not freed while a PMD is
        in a round)."""
        self.end_run()
        self.add_done(t)

    cdef inline void account(self, const actions_t *a, uint32_t length, uint64_t t) noexcept nogil:
        """Rule counters, and a cache hit keeps the source MAC's entry from aging out."""
        cdef uint32_t j
        cdef cls_rule_t *r
        cdef bridge_t *b
        for j in range(a.n_rules):
            r = <cls_rule_t *>a.rules[j]
            vh_add_u64(&r.n_packets, 1)
            vh_add_u64(&r.n_bytes, length)
            r.used_ns = t
        if a.src_idx != NO_FDB:
            b = self.sw.bridges[a.bridge]
            if b != NULL and a.src_idx < b.fdb.size and b.fdb.e[a.src_idx].used_ms != self.now_ms:
                b.fdb.e[a.src_idx].used_ms = self.now_ms

    cdef uint32_t process_rxq(self, rxq_ref_t *r) noexcept nogil:
        cdef port_t *inp = self.sw.ports[r.port]
        cdef pkt_t *pkts[MAX_BURST]
        cdef uint32_t n = 0, i
        cdef uint64_t t0, tu, dt, bytes_ = 0
        cdef flow_key_t key
        cdef flow_key_t keys[MAX_BURST]
        cdef uint32_t h
        cdef uint32_t hashes[MAX_BURST]
        cdef uint64_t hints[MAX_BURST]
        cdef uint32_t misses = 0               # this burst's frames the EMC did not answer
        cdef uint32_t asked = 0, answered = 0  # frames asked of the EMC, and its hits
        cdef uint32_t conflicts = 0            # misses on a slot another flow holds
        cdef uint32_t skipped = 0              # frames not asked of it
        cdef bint use_emc = self.emc_round
        cdef actions_t *a
        cdef actions_t *port_a                 # the burst's port-wide megaflow, if any
        cdef mf_entry_t *prev_e = NULL         # the megaflow the last lookup found
        cdef uint32_t reused = 0, looked = 0   # frames under prev_e's, and looked up
        cdef actions_t fresh
        cdef uint64_t mask[KEY_WORDS]
        cdef bint timed
        cdef uint16_t mirrored
        cdef const actions_t *valid_a = NULL   # the EMC entry this burst last found valid
        if inp == NULL or r.queue >= inp.nqueues:
            return 0
        self.cur_inp = inp
        # a port over its share of upcall time is also read in small bursts until the
        # window ends: what it sends beyond that waits in its own queue (the sender is
        # slowed down), instead of costing this PMD a copy and a lookup per frame to drop
        if inp.ops.rx_burst_ref != NULL:          # one-copy: tails stay in guest memory
            n = inp.ops.rx_burst_ref(inp.dev, r.queue, self.pool, pkts, THROTTLED_BURST
                                     if self.up_ns[inp.id] >= self.up_budget_ns else MAX_BURST)
        else:
            n = inp.ops.rx_burst(inp.dev, r.queue, self.pool, pkts, THROTTLED_BURST
                                 if self.up_ns[inp.id] >= self.up_budget_ns else MAX_BURST)
        if n == 0:
            self.stamp_fresh = False
            self.cur_inp = NULL
            return 0
        if inp.no_recv:
            vh_add_u64(&inp.c.drop_no_recv, n)
            pool_put_many(self.pool, pkts, n)
            self.rx_done(inp, r.queue)
            self.stamp_fresh = False
            self.cur_inp = NULL
            return n
        # the previous queue's end stands for this one's start when only this burst's
        # receive came between (the queue's time then includes its receive, as OVS's does)
        t0 = self.stamp if self.stamp_fresh else now_ns()
        self.now_ms = <uint32_t>(t0 // 1000000)
        if t0 - self.window_start > UPCALL_WINDOW_NS:
            self.roll_window(t0)
        self.win_packets[inp.id] += n
        for i in range(n):
            bytes_ += pkts[i].len + pkts[i].ext_len
        vh_add_u64(&inp.c.rx_packets, n)
        vh_add_u64(&inp.c.rx_bytes, bytes_)
        self.st.packets += n
        self.st.bursts += 1
        if inp.police.rate:
            n = self.make_whole(pkts, n)
            n = bucket_filter(&inp.police, pkts, n, self.pool, &inp.c.drop_police)
        if inp.mirror_only:                       # a mirror's output: it only sends
            vh_add_u64(&inp.c.drop_mirror_port, n)
            pool_put_many(self.pool, pkts, n)
            n = 0
        # keys and hashes first, each EMC slot's load started: with more flows than the
        # cache holds in the CPU's caches, the lookups below then do not wait in turn
        for i in range(n):
            hashes[i] = flow_extract(pkts[i], inp.id, &keys[i], use_emc)
            if use_emc:
                emc_prefetch(self.emc, hashes[i])
        # while the EMC is not asked: when the first frame's megaflow matches the input
        # port alone, it is every frame's (one lookup for the burst, as OVS's simple match)
        port_a = NULL
        if n and not use_emc and self.mf.count:
            port_a = mf_lookup_port(&self.mf, &keys[0], self.now_ms, entry_valid, self.sw, n)
        # the same one level down when the EMC has been missing (more flows than it holds):
        # each frame it will not answer starts its megaflow probe's load
        # (not while most frames of this port's last burst that reached the megaflow cache
        # fell under the megaflow of the frame before them: their probes are not made)
        if port_a == NULL and not self.mf_reusing[inp.id] and \
                (self.emc_missed or not use_emc) and self.mf.count:
            for i in range(n):
                hints[i] = MF_NO_HINT if use_emc and emc_may_hold(self.emc, hashes[i]) \
                    else mf_hint(&self.mf, &keys[i])
            for i in range(n):                     # the tags are in: now their entries
                mf_hint_entry(&self.mf, hints[i])
        else:
            for i in range(n):
                hints[i] = MF_NO_HINT
        for i in range(n):
            key = keys[i]
            mirrored = 0
            if inp.mirror_rx:
                # a copy needs the whole frame; a frame no mirror selects (a capture whose
                # filter it does not match) keeps its tail and can still go one-copy
                if pkts[i].ext_len and self.mirrors_take(inp.mirror_rx, inp, &key) and \
                        vq_materialize(pkts[i]) < 0:
                    pool_put(self.pool, pkts[i])
                    continue
                mirrored = self.mirror(inp.mirror_rx, inp, pkts[i], &key)
            h = hashes[i]
            a = NULL
            if use_emc:
                asked += 1
                a = emc_lookup(self.emc, &key, h)
            else:
                skipped += 1
            # the entry this burst last found valid is not asked again: only this thread's
            # EMC inserts and upcalls (learning) could change it or its validity meanwhile,
            # and they forget it; another thread's change is seen by the next burst
            if a != NULL and (a == valid_a or entry_valid(self.sw, a)):
                answered += 1
                valid_a = a
            else:
                misses += 1
                if use_emc and emc_conflict(self.emc, h):
                    conflicts += 1
                if port_a != NULL:
                    a = port_a
                    self.st.simple_match_hits += 1
                elif prev_e != NULL and mf_matches(&self.mf, prev_e, &key):
                    a = &prev_e.actions
                    reused += 1
                else:
                    a = mf_lookup(&self.mf, &key, self.now_ms, entry_valid, self.sw, hints[i])
                    prev_e = self.mf.last_hit if a != NULL else NULL
                    looked += 1
                if a != NULL:
                    self.st.megaflow_hits += 1
                    self.mf_hits_since_insert += 1
                    if self.emc_insert_every and \
                            self.mf_hits_since_insert >= self.emc_insert_every:
                        self.mf_hits_since_insert = 0
                        emc_insert(self.emc, &key, h if use_emc else flow_hash(&key), a)
                        valid_a = NULL
                elif self.up_ns[inp.id] >= self.up_budget_ns:
                    self.st.upcall_throttled += 1        # over its share: dropped, counted
                    vh_add_u64(&inp.c.drop_upcall, 1)
                    pool_put(self.pool, pkts[i])
                    continue
                else:
                    self.st.upcalls += 1
                    valid_a = NULL
                    prev_e = NULL                 # (an insert may give its entry away)
                    timed = self.upcalls_untimed == 0
                    if timed:
                        tu = now_ns()
                    if self.upcall(inp, &key, &fresh, mask) < 0:
                        self.st.upcall_drops += 1
                        pool_put(self.pool, pkts[i])
                        a = NULL
                    else:
                        mf_insert(&self.mf, &key, mask, self.now_ms, &fresh)
                        # like a megaflow hit, rarely into the EMC: a flow seen once (a
                        # storm of new flows) must not push busy flows out of it
                        self.mf_hits_since_insert += 1
                        if self.emc_insert_every and \
                                self.mf_hits_since_insert >= self.emc_insert_every:
                            self.mf_hits_since_insert = 0
                            emc_insert(self.emc, &key, h if use_emc else flow_hash(&key),
                                       &fresh)
                        a = &fresh
                    # a clock read costs as much as a short upcall: time one in
                    # UPCALL_TIMED_EVERY, charge the others the moving average
                    if timed:
                        # (a sample the thread was preempted in must neither inflate the
                        # average nor be charged: one counts at most 4 times it and 2 us)
                        dt = min(now_ns() - tu,
                                 4 * self.upcall_cost_ns + UPCALL_COST_SLACK_NS)
                        self.upcall_cost_ns = (self.upcall_cost_ns * 7 + dt) // 8
                        self.upcalls_untimed = UPCALL_TIMED_EVERY - 1
                    else:
                        dt = self.upcall_cost_ns
                        self.upcalls_untimed -= 1
                    self.up_ns[inp.id] += dt
                    self.st.upcall_ns += dt
                    if a == NULL:
                        continue
            if pkts[i].ext_len and not self.one_copy_ok(inp, a) and \
                    vq_materialize(pkts[i]) < 0:
                pool_put(self.pool, pkts[i])      # the sender's memory faulted (counted there)
                continue
            self.account_run(a, pkts[i].len + pkts[i].ext_len, t0)
            self.execute(inp, pkts[i], a, &key, mirrored)
        self.account_flush(t0)
        self.emc_missed = misses != 0
        self.st.emc_hits += answered
        self.st.emc_misses += asked - answered
        self.st.emc_skipped += skipped
        if reused or looked:
            self.st.megaflow_reused += reused
            self.mf_reusing[inp.id] = reused > looked
        if use_emc:
            self.emc_decide(answered, conflicts)
        for i in range(self.ntouched):
            self.flush(self.touched[i])
            self.is_touched[self.touched[i]] = 0
        self.ntouched = 0
        self.rx_done(inp, r.queue)
        self.stamp = now_ns()
        self.stamp_fresh = True
        inp.rxq_ns[r.queue] += self.stamp - t0
        inp.rxq_packets[r.queue] += n
        self.cur_inp = NULL
        return n

    cdef int collect_inputs(self) noexcept nogil:
        """The polled queues as they are now (ports come and go), for the idle path."""
        cdef int i
        cdef port_t *p
        for i in range(self.npoll):
            p = self.sw.ports[self.poll[i].port]
            self.inputs[i].ops = NULL
            if p != NULL and self.poll[i].queue < p.nqueues:
                self.inputs[i].ops = p.ops
                self.inputs[i].dev = p.dev
                self.inputs[i].q = self.poll[i].queue
        return self.npoll

    cdef void do_reload(self) noexcept nogil:
        vh_lock(&self.lock)
        memcpy(self.poll, self.next_poll, sizeof(rxq_ref_t) * self.next_npoll)
        self.npoll = self.next_npoll
        vh_store_release_int(&self.reload, 0)
        vh_unlock(&self.lock)
        self.idle.epoll_generation = -1

    cdef inline void load_sleep(self, uint32_t most) noexcept nogil:
        """Load-based sleeping (set_sleep_max): ``most``, the largest burst a queue gave
        this round, decides whether the next sleep grows or goes."""
        cdef uint64_t limit = vh_load_u64(&self.sleep_max_ns)
        cdef timespec ts
        if limit == 0 or most >= MAX_BURST // 2:
            self.sleep_ns = 0
            return
        self.sleep_ns += LOAD_SLEEP_STEP_NS
        if self.sleep_ns > limit:
            self.sleep_ns = limit
        ts.tv_sec = 0
        ts.tv_nsec = self.sleep_ns
        nanosleep(&ts, NULL)
        self.st.load_sleep_ns += self.sleep_ns

    def run(self):
        """The poll loop; returns after ``stop()``."""
        cdef uint64_t last_busy, t, t_prev
        cdef uint32_t empty = 0, got, n, most
        cdef int i
        vh_store_release_int(&self.running_, 1)
        with nogil:
            t_prev = now_ns()
            last_busy = t_prev
            while not vh_load_acquire_int(&self.stopping):
                vh_store_u64(&self.seq_, self.seq_ + 1)
                if vh_load_acquire_int(&self.reload):
                    self.do_reload()
                    notify_all(self.inputs, self.collect_inputs(), False)
                    self.stamp_fresh = False
                got = 0
                most = 0
                self.emc_round = self.emc_asked_now()
                for i in range(self.npoll):
                    n = self.process_rxq(&self.poll[i])
                    got += n
                    if n > most:
                        most = n
                if self.sleep_max_ns:
                    t = now_ns()                # the round's work is busy, the sleep idle
                    if got:
                        self.st.busy_ns += t - t_prev
                    else:
                        self.st.idle_ns += t - t_prev
                    self.load_sleep(most)
                    t_prev = now_ns()
                    self.st.idle_ns += t_prev - t
                    self.stamp_fresh = False
                # the last queue's end is the round's end when it was the last one polled
                t = self.stamp if got and self.stamp_fresh else now_ns()
                if got:
                    self.st.busy_ns += t - t_prev
                    t_prev = t
                    empty = 0
                    last_busy = t
                    continue
                self.st.idle_ns += t - t_prev
                t_prev = t
                empty += 1
                if t - last_busy > IDLE_NS:
                    idle_sleep(&self.idle, self.inputs, self.collect_inputs(), &self.stopping,
                               &self.reload)
                    # ports may have been freed while we slept: look them up again; a new
                    # set of queues first (woken for it), so notifications go off only on
                    # queues still ours: a queue that moved to a PMD already asleep on it
                    # must keep them (its new owner would sleep through its traffic)
                    vh_store_u64(&self.seq_, self.seq_ + 1)
                    if vh_load_acquire_int(&self.reload):
                        self.do_reload()
                    notify_all(self.inputs, self.collect_inputs(), False)
                    t_prev = now_ns()
                    last_busy = t_prev
                    empty = 0
                    self.stamp_fresh = False
        vh_store_release_int(&self.running_, 0)


def limits():
    return {"ports": MAX_PORTS, "bridges": MAX_BRIDGES, "queues": MAX_PORT_QUEUES,
            "rxqs_per_pmd": MAX_POLL, "actions": MAX_ACTION_OPS,
            "sleep_max_us": MAX_LOAD_SLEEP_US}

