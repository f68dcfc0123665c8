# cython: language_level=3
"""The switch's compiled data path: ports (their rings), PMD poll loops, per-PMD exact-match
flow cache, upcalls to the Python slow path on a miss, action execution, QoS token
buckets (ingress policing, egress rate limit) and the counters behind pmd-stats-show.

A PMD thread polls its assigned RX queues (a guest's TX rings) without the GIL: receive a
burst, police it, look every frame up in its cache, execute the cached actions into
per-output-port batches, then send each batch into the output guest's RX ring. A cache
miss takes the GIL and calls the slow path (``upcall``), which returns the actions as
(op, arg) pairs; they are installed in the cache under the current generation.
``Datapath.invalidate()`` bumps the generation, which empties every cache at once.
Ports are freed only after every PMD has passed a quiescent point (``synchronize``).
This module knows no rule syntax, no MAC table and no sockets.
"""

import time

from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free
from libc.string cimport memcpy, memset
from pyvhost._flow cimport (
    MAX_ACTION_OPS, OP_FLOOD, OP_OUTPUT, OP_SET_VLAN, OP_STRIP_VLAN, actions_t, emc_insert,
    emc_lookup, emc_t, flow_extract, flow_hash, flow_key_t, mf_insert, mf_lookup, mf_t,
    vlan_set, vlan_strip,
)
from pyvhost._idle cimport (
    IDLE_NS, idle_free, idle_init, idle_sleep, idle_t, idle_wake, notify_all, now_ns,
)
from pyvhost._offload cimport offload_send
from pyvhost._pktpool cimport PacketPool, pkt_t, pktpool_t, pool_get, pool_put, pool_put_many
from pyvhost._vring cimport (
    MAX_BURST, VirtQueue, vh_eventfd_signal, vh_fence_seq_cst, vh_load_acquire_int, vh_lock,
    vh_store_release_int, vh_trylock, vh_unlock, vq_dequeue, vq_t,
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
    """
    void vh_add_u64(uint64_t *p, uint64_t v)
    uint64_t vh_load_u64(const uint64_t *p)
    void vh_store_u64(uint64_t *p, uint64_t v)
    uint32_t vh_load_u32(const uint32_t *p)

cdef enum:
    MAX_PORTS = 256
    MAX_PORT_QUEUES = 32
    MAX_RULES = 4096
    MAX_POLL = 512
    CLOCK_EVERY = 64
    EMC_INSERT_EVERY = 16      # a wildcard-cache hit is copied into the EMC this rarely

cdef struct bucket_t:
    int lock
    uint64_t rate            # bytes per second; 0 = no limit
    uint64_t burst           # bytes
    double tokens
    uint64_t last_ns

cdef struct port_t:
    uint16_t id
    uint16_t bridge
    uint16_t nqueues
    int up
    vq_t *guest_tx[MAX_PORT_QUEUES]      # rings we receive from
    vq_t *guest_rx[MAX_PORT_QUEUES]      # rings we send into
    bucket_t police
    bucket_t shape
    uint64_t rxq_ns[MAX_PORT_QUEUES]     # processing time spent on each RX queue
    uint64_t rxq_packets[MAX_PORT_QUEUES]
    uint64_t rx_packets
    uint64_t rx_bytes
    uint64_t tx_packets
    uint64_t tx_bytes
    uint64_t drop_police
    uint64_t drop_qos
    uint64_t drop_tx_full    # the guest had no room
    uint64_t drop_action     # dropped by a rule (no output)
    uint64_t drop_offload    # a TCP super-frame that could not be segmented for this port

cdef struct switch_t:
    port_t *ports[MAX_PORTS]
    uint32_t gen

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
    """The ports table and flow-cache generation shared by every PMD thread."""

    cdef switch_t *sw
    cdef dict port_objs            # port id -> list of VirtQueues kept alive
    cdef readonly list pmds
    cdef public object upcall      # callable(bridge, in_port, key bytes) -> (rule, ops) | None

    def __cinit__(self):
        self.sw = <switch_t *>calloc(1, sizeof(switch_t))
        if self.sw == NULL:
            raise MemoryError()
        self.sw.gen = 1
        self.port_objs = {}
        self.pmds = []

    def __dealloc__(self):
        cdef int i
        if self.sw != NULL:
            for i in range(MAX_PORTS):
                free(self.sw.ports[i])
            free(self.sw)

    def invalidate(self):
        """Every cached flow is stale (rules, learned MACs or ports changed)."""
        self.sw.gen += 1
        if self.sw.gen == 0:
            self.sw.gen = 1

    @property
    def generation(self):
        return self.sw.gen

    def add_port(self, int port_id, int bridge, list rx_vqs, list tx_vqs):
        """Port ``port_id`` with the guest's RX rings (we send into) and TX rings."""
        cdef port_t *p
        cdef VirtQueue vq
        cdef int q
        if not 0 <= port_id < MAX_PORTS or self.sw.ports[port_id] != NULL:
            raise ValueError(f"port id {port_id} is taken or out of range")
        if not 1 <= len(rx_vqs) == len(tx_vqs) <= MAX_PORT_QUEUES:
            raise ValueError(f"a port has 1..{MAX_PORT_QUEUES} queue pairs")
        p = <port_t *>calloc(1, sizeof(port_t))
        if p == NULL:
            raise MemoryError()
        p.id = port_id
        p.bridge = bridge
        p.nqueues = len(rx_vqs)
        for q in range(p.nqueues):
            vq = rx_vqs[q]
            p.guest_rx[q] = &vq.vq
            vq = tx_vqs[q]
            p.guest_tx[q] = &vq.vq
        p.up = 1
        self.port_objs[port_id] = rx_vqs + tx_vqs
        self.sw.ports[port_id] = p
        self.invalidate()
        self.wake_all()

    def remove_port(self, int port_id):
        cdef port_t *p
        if not 0 <= port_id < MAX_PORTS or self.sw.ports[port_id] == NULL:
            raise KeyError(port_id)
        p = self.sw.ports[port_id]
        self.sw.ports[port_id] = NULL
        vh_fence_seq_cst()        # the NULL is visible before we read the PMDs' state
        self.invalidate()
        self.synchronize()
        free(p)
        del self.port_objs[port_id]
        self.wake_all()

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
        cdef port_t *p = self._port(port_id)
        return {"rx_packets": p.rx_packets, "rx_bytes": p.rx_bytes,
                "tx_packets": p.tx_packets, "tx_bytes": p.tx_bytes,
                "drop_police": p.drop_police, "drop_qos": p.drop_qos,
                "drop_tx_full": p.drop_tx_full, "drop_action": p.drop_action,
                "drop_offload": p.drop_offload}

    def rxq_load(self, int port_id):
        """Per RX queue: (processing ns, packets) since the port was added."""
        cdef port_t *p = self._port(port_id)
        return [(p.rxq_ns[q], p.rxq_packets[q]) for q in range(p.nqueues)]

    def new_pmd(self, int pmd_id, int pool_size=4096, int buf_size=65600):
        pmd = Pmd(self, pmd_id, PacketPool(pool_size, buf_size))
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


cdef class Pmd:
    """One poll-mode thread's state; ``run()`` is its body (call it from its own thread)."""

    cdef Datapath dp
    cdef switch_t *sw
    cdef readonly int pmd_id
    cdef PacketPool pool_obj
    cdef pktpool_t *pool
    cdef emc_t *emc
    cdef mf_t *mf
    cdef uint32_t mf_hits_since_insert
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
    cdef vq_t *inputs[MAX_POLL]     # the polled rings, for the idle path
    cdef pmd_stats_t st
    cdef uint64_t *rule_packets
    cdef uint64_t *rule_bytes
    cdef pkt_t *batch[MAX_PORTS][MAX_BURST]
    cdef uint32_t nbatch[MAX_PORTS]
    cdef uint16_t touched[MAX_PORTS]
    cdef uint32_t ntouched

    def __cinit__(self, Datapath dp, int pmd_id, PacketPool pool):
        self.dp = dp
        self.sw = dp.sw
        self.pmd_id = pmd_id
        self.pool_obj = pool
        self.pool = pool.pool
        self.emc = <emc_t *>calloc(1, sizeof(emc_t))
        self.mf = <mf_t *>calloc(1, sizeof(mf_t))
        self.rule_packets = <uint64_t *>calloc(MAX_RULES, sizeof(uint64_t))
        self.rule_bytes = <uint64_t *>calloc(MAX_RULES, sizeof(uint64_t))
        if self.emc == NULL or self.mf == NULL or self.rule_packets == NULL or self.rule_bytes == NULL:
            raise MemoryError()
        idle_init(&self.idle)

    def __dealloc__(self):
        free(self.emc)
        free(self.mf)
        free(self.rule_packets)
        free(self.rule_bytes)
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

    def stop(self):
        vh_store_release_int(&self.stopping, 1)
        vh_eventfd_signal(self.idle.wakefd)

    def stats(self):
        cdef uint64_t *s = <uint64_t *>&self.st
        names = ("busy_ns", "idle_ns", "packets", "bursts", "emc_hits", "emc_misses",
                 "upcalls", "upcall_drops", "megaflow_hits")
        out = {name: s[i] for i, name in enumerate(names)}
        out["sleeps"] = self.idle.sleeps
        return out

    def clear_stats(self):
        memset(&self.st, 0, sizeof(pmd_stats_t))
        self.idle.sleeps = 0

    def rule_counters(self, int slot):
        if not 0 <= slot < MAX_RULES:
            raise IndexError(slot)
        return self.rule_packets[slot], self.rule_bytes[slot]

    def reset_rule(self, int slot):
        if 0 <= slot < MAX_RULES:
            self.rule_packets[slot] = 0
            self.rule_bytes[slot] = 0

    # -- data path ------------------------------------------------------------------------
    cdef int upcall(self, flow_key_t *k, actions_t *a, uint64_t *mask) noexcept with gil:
        """Ask the slow path; 0 with ``a`` and the wildcard ``mask`` filled, -1 to drop."""
        cdef int i = 0
        cdef const uint8_t[::1] m
        try:
            result = self.dp.upcall((<char *>k)[:sizeof(flow_key_t)])
            if result is None:
                return -1
            rule, ops, mask_bytes = result
            m = mask_bytes
            if m.shape[0] != sizeof(flow_key_t):
                raise ValueError("wildcard mask of the wrong size")
            memcpy(mask, &m[0], sizeof(flow_key_t))
            if len(ops) > MAX_ACTION_OPS:
                ops = ops[:MAX_ACTION_OPS]
            a.rule = rule
            for op, arg in ops:
                a.ops[i].op = op
                a.ops[i].arg = arg
                i += 1
            a.n_ops = i
            return 0
        except BaseException:
            import logging
            logging.getLogger("pyvhost.switch").exception("upcall failed")
            return -1

    cdef void flush(self, uint16_t port_id) noexcept nogil:
        cdef uint32_t n = self.nbatch[port_id], sent = 0, q, failed = 0
        cdef port_t *p = self.sw.ports[port_id]
        cdef vq_t *vq
        cdef uint64_t bytes_ = 0
        cdef pkt_t **pkts = self.batch[port_id]
        self.nbatch[port_id] = 0
        if n == 0:
            return
        if p == NULL or not p.up:
            pool_put_many(self.pool, pkts, n)
            return
        if p.shape.rate:
            n = bucket_filter(&p.shape, pkts, n, self.pool, &p.drop_qos)
        if n:
            q = self.pmd_id % p.nqueues
            vq = p.guest_rx[q]
            if not (vq.ready and vq.enabled):
                vq = p.guest_rx[0]
            vh_lock(&vq.lock)
            sent = offload_send(vq, self.pool, pkts, n, &failed, &bytes_)
            vh_unlock(&vq.lock)
            if sent:
                vh_add_u64(&p.tx_packets, sent)
                vh_add_u64(&p.tx_bytes, bytes_)
            if failed:
                vh_add_u64(&p.drop_offload, failed)
            if sent + failed < n:
                vh_add_u64(&p.drop_tx_full, n - sent - failed)
            pool_put_many(self.pool, pkts, n)

    cdef inline void output(self, uint16_t port_id, pkt_t *pkt) noexcept nogil:
        if self.nbatch[port_id] == 0:
            self.touched[self.ntouched] = port_id
            self.ntouched += 1
        self.batch[port_id][self.nbatch[port_id]] = pkt
        self.nbatch[port_id] += 1
        if self.nbatch[port_id] == MAX_BURST:
            self.flush(port_id)

    cdef pkt_t *clone(self, pkt_t *p) noexcept nogil:
        """A copy of ``p`` (frame and virtio-net header), or NULL (no buffer, or ``p`` grew
        past a buffer's room with a VLAN tag pushed into its headroom)."""
        cdef pkt_t *c = pool_get(self.pool)
        if c == NULL:
            return NULL
        if p.len > c.cap:
            pool_put(self.pool, c)
            return NULL
        memcpy(c.data, p.data, p.len)
        memcpy(c.vnet_hdr, p.vnet_hdr, sizeof(p.vnet_hdr))
        c.len = p.len
        return c

    cdef void execute(self, port_t *inp, pkt_t *p, const actions_t *a) noexcept nogil:
        """Run ``a`` on ``p``; every output but the final op's last gets a copy."""
        cdef int i, j, last_port
        cdef uint16_t op
        cdef bint owned = True, final
        cdef pkt_t *c
        cdef port_t *o
        for i in range(a.n_ops):
            op = a.ops[i].op
            final = i == a.n_ops - 1
            if op == OP_OUTPUT:
                if a.ops[i].arg == inp.id:
                    continue                   # OpenFlow: never back out of the input port
                if final:
                    self.output(a.ops[i].arg, p)
                    owned = False
                else:
                    c = self.clone(p)
                    if c != NULL:
                        self.output(a.ops[i].arg, c)
            elif op == OP_FLOOD:
                last_port = -1
                for j in range(MAX_PORTS):
                    o = self.sw.ports[j]
                    if o != NULL and o.up and o.bridge == inp.bridge and j != inp.id:
                        if last_port >= 0:
                            c = self.clone(p)
                            if c != NULL:
                                self.output(last_port, c)
                        last_port = j
                if last_port >= 0:
                    if final:
                        self.output(last_port, p)
                        owned = False
                    else:
                        c = self.clone(p)
                        if c != NULL:
                            self.output(last_port, c)
            elif op == OP_SET_VLAN:
                vlan_set(p, a.ops[i].arg)
            elif op == OP_STRIP_VLAN:
                vlan_strip(p)
        if owned:
            if a.n_ops == 0:
                vh_add_u64(&inp.drop_action, 1)
            pool_put(self.pool, p)

    cdef uint32_t process_rxq(self, rxq_ref_t *r) noexcept nogil:
        cdef port_t *inp = self.sw.ports[r.port]
        cdef vq_t *vq
        cdef pkt_t *pkts[MAX_BURST]
        cdef uint32_t n = 0, i, gen
        cdef uint64_t t0, bytes_ = 0
        cdef flow_key_t key
        cdef uint32_t h
        cdef const actions_t *a
        cdef actions_t fresh
        cdef uint64_t mask[5]
        if inp == NULL or r.queue >= inp.nqueues:
            return 0
        vq = inp.guest_tx[r.queue]
        if not vh_trylock(&vq.lock):
            return 0
        n = vq_dequeue(vq, self.pool, pkts, MAX_BURST)
        vh_unlock(&vq.lock)
        if n == 0:
            return 0
        t0 = now_ns()
        for i in range(n):
            bytes_ += pkts[i].len
        vh_add_u64(&inp.rx_packets, n)
        vh_add_u64(&inp.rx_bytes, bytes_)
        self.st.packets += n
        self.st.bursts += 1
        if inp.police.rate:
            n = bucket_filter(&inp.police, pkts, n, self.pool, &inp.drop_police)
        for i in range(n):
            flow_extract(pkts[i], inp.id, &key)
            h = flow_hash(&key)
            gen = vh_load_u32(&self.sw.gen)
            a = emc_lookup(self.emc, &key, h, gen)
            if a != NULL:
                self.st.emc_hits += 1
            else:
                self.st.emc_misses += 1
                a = mf_lookup(self.mf, &key, gen)
                if a != NULL:
                    self.st.megaflow_hits += 1
                    self.mf_hits_since_insert += 1
                    if self.mf_hits_since_insert >= EMC_INSERT_EVERY:
                        self.mf_hits_since_insert = 0
                        emc_insert(self.emc, &key, h, gen, a)
                else:
                    self.st.upcalls += 1
                    if self.upcall(&key, &fresh, mask) < 0:
                        self.st.upcall_drops += 1
                        pool_put(self.pool, pkts[i])
                        continue
                    mf_insert(self.mf, &key, mask, gen, &fresh)
                    emc_insert(self.emc, &key, h, gen, &fresh)
                    a = &fresh
            if a.rule < MAX_RULES:
                self.rule_packets[a.rule] += 1
                self.rule_bytes[a.rule] += pkts[i].len
            self.execute(inp, pkts[i], a)
        for i in range(self.ntouched):
            self.flush(self.touched[i])
        self.ntouched = 0
        inp.rxq_ns[r.queue] += now_ns() - t0
        inp.rxq_packets[r.queue] += n
        return n

    cdef int collect_inputs(self) noexcept nogil:
        """The polled rings as they are now (ports come and go), for the idle path."""
        cdef int i
        cdef port_t *p
        for i in range(self.npoll):
            p = self.sw.ports[self.poll[i].port]
            self.inputs[i] = NULL
            if p != NULL and self.poll[i].queue < p.nqueues:
                self.inputs[i] = p.guest_tx[self.poll[i].queue]
        return self.npoll

    cdef void do_reload(self) noexcept nogil:
        vh_lock(&self.lock)
        memcpy(self.poll, self.next_poll, sizeof(rxq_ref_t) * self.next_npoll)
        self.npoll = self.next_npoll
        vh_store_release_int(&self.reload, 0)
        vh_unlock(&self.lock)
        self.idle.epoll_generation = -1

    def run(self):
        """The poll loop; returns after ``stop()``."""
        cdef uint64_t last_busy, t, t_prev
        cdef uint32_t empty = 0, got
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
                got = 0
                for i in range(self.npoll):
                    got += self.process_rxq(&self.poll[i])
                t = now_ns()
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
                    # ports may have been freed while we slept: look them up again
                    vh_store_u64(&self.seq_, self.seq_ + 1)
                    notify_all(self.inputs, self.collect_inputs(), False)
                    t_prev = now_ns()
                    last_busy = t_prev
                    empty = 0
        vh_store_release_int(&self.running_, 0)


def limits():
    return {"ports": MAX_PORTS, "queues": MAX_PORT_QUEUES, "rules": MAX_RULES,
            "rxqs_per_pmd": MAX_POLL}
