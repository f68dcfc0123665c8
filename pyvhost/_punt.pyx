# cython: language_level=3
"""The controller queue (see _punt.pxd): PMD threads push frames an output to CONTROLLER
sent, the control thread (asyncio, woken through an eventfd) pops them and makes
PACKET_INs. Bounded three ways so a guest cannot flood the control plane: PUNT_SLOTS
frames at most (all bridges), a frames-per-second token bucket per bridge (the rate
and burst OVS calls controller_rate_limit and controller_burst_limit), and a try-lock (a PMD that finds the
queue busy drops the frame instead of waiting). Each way of dropping has its counter.
No OpenFlow encoding and no rules here."""

import os

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free
from libc.string cimport memcpy
from pyvhost._idle cimport now_ns
from pyvhost._vring cimport vh_eventfd_drain, vh_eventfd_signal, vh_lock, vh_trylock, vh_unlock

cdef extern from *:
    """
    static inline void punt_count_one(uint64_t *p) { __atomic_fetch_add(p, 1, __ATOMIC_RELAXED); }
    """
    void punt_count_one(uint64_t *p) nogil

DEFAULT_RATE = 1000        # PACKET_INs per second (OVS's controller-rate-limit default)
DEFAULT_BURST = 100


cdef void punt_push(punt_t *q, const pkt_t *p, uint16_t bridge, uint16_t in_port,
                    uint32_t rule_id, uint32_t priority, uint8_t table,
                    uint16_t max_len, uint8_t reason=PUNT_ACTION) noexcept nogil:
    cdef uint64_t t
    cdef punt_slot_t *s
    cdef punt_rate_t *r
    cdef uint32_t n
    cdef bint wake
    if q == NULL:
        return
    if not vh_trylock(&q.lock):
        punt_count_one(&q.drop_busy)
        return
    if bridge >= PUNT_BRIDGES:
        q.drop_rate += 1
        vh_unlock(&q.lock)
        return
    r = &q.rates[bridge]
    if r.rate:
        t = now_ns()
        if r.last_ns and t > r.last_ns:
            r.tokens += (t - r.last_ns) * <double>r.rate / 1e9
        if t > r.last_ns:
            r.last_ns = t
        if r.tokens > r.burst:
            r.tokens = r.burst
        if r.tokens < 1:
            r.drop_rate += 1
            q.drop_rate += 1
            vh_unlock(&q.lock)
            return
        r.tokens -= 1
    if q.count >= PUNT_SLOTS:
        q.drop_full += 1
        vh_unlock(&q.lock)
        return
    s = &q.slots[(q.head + q.count) % PUNT_SLOTS]
    n = p.len
    if max_len != 0xFFFF and n > max_len:
        n = max_len
    if n > PUNT_SLOT_BYTES:
        n = PUNT_SLOT_BYTES
    memcpy(s.data, p.data, n)
    s.len = n
    s.total_len = p.len
    s.bridge = bridge
    s.in_port = in_port
    s.rule_id = rule_id
    s.rule_priority = priority
    s.table = table
    s.max_len = max_len
    s.reason = reason
    wake = q.count == 0
    q.count += 1
    q.queued += 1
    vh_unlock(&q.lock)
    if wake:
        vh_eventfd_signal(q.efd)


cdef class PuntQueue:
    """The queue (its memory, about 1.2 MB, is taken when it is made) and its eventfd."""

    def __cinit__(self, uint64_t rate=DEFAULT_RATE, uint64_t burst=DEFAULT_BURST):
        self.q = <punt_t *>calloc(1, sizeof(punt_t))
        if self.q == NULL:
            raise MemoryError()
        self.q.efd = -1                 # (calloc's 0 is stdin: never closed by mistake)
        self.q.efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.set_rate(rate, burst)

    def __dealloc__(self):
        if self.q != NULL:
            if self.q.efd >= 0:
                os.close(self.q.efd)
            free(self.q)

    @property
    def fd(self):
        """Readable when frames wait (drain it with ``pop``)."""
        return self.q.efd

    def set_rate(self, uint64_t rate, uint64_t burst, int bridge=-1):
        """At most ``rate`` frames per second, ``burst`` at once (rate 0: no limit) from
        bridge ``bridge`` (-1: every bridge)."""
        cdef int i
        if rate and not burst:
            raise ValueError("a rate needs a burst of at least 1")
        if not -1 <= bridge < PUNT_BRIDGES:
            raise ValueError(f"bridge {bridge} out of range")
        with nogil:
            vh_lock(&self.q.lock)
        for i in range(PUNT_BRIDGES):
            if bridge == -1 or i == bridge:
                self.q.rates[i].rate = rate
                self.q.rates[i].burst = burst
                self.q.rates[i].tokens = burst
                self.q.rates[i].last_ns = 0
        vh_unlock(&self.q.lock)

    def pop(self, int most=PUNT_SLOTS):
        """The waiting frames, oldest first, at most ``most``: a list of dicts (bridge,
        in_port, rule_id, priority, table, max_len, total_len, data)."""
        cdef punt_slot_t *s
        cdef uint32_t head, n, i, more
        out = []
        vh_eventfd_drain(self.q.efd)
        # the lock is held only to read and to advance the ring, not while the frames are
        # copied out (PMDs that find it held drop their frame): slots head..head+n-1 stay
        # as they are until head moves, since PMDs write only past head + count
        with nogil:
            vh_lock(&self.q.lock)
            head = self.q.head
            n = self.q.count
            vh_unlock(&self.q.lock)
        if n > <uint32_t>max(most, 0):
            n = max(most, 0)
        for i in range(n):
            s = &self.q.slots[(head + i) % PUNT_SLOTS]
            out.append({"bridge": s.bridge, "in_port": s.in_port, "rule_id": s.rule_id,
                        "priority": s.rule_priority, "table": s.table,
                        "max_len": s.max_len, "total_len": s.total_len,
                        "invalid_ttl": s.reason == PUNT_INVALID_TTL,
                        "data": (<char *>s.data)[:s.len]})
        with nogil:
            vh_lock(&self.q.lock)
            self.q.head = (head + n) % PUNT_SLOTS
            self.q.count -= n
            more = self.q.count
            vh_unlock(&self.q.lock)
        if more:
            vh_eventfd_signal(self.q.efd)       # the rest on the next turn of the loop
        return out

    def stats(self):
        return {"queued": self.q.queued, "waiting": self.q.count,
                "drop_full": self.q.drop_full, "drop_busy": self.q.drop_busy,
                "drop_rate": self.q.drop_rate}

    def bridge_stats(self, int bridge):
        """Bridge ``bridge``'s rate, burst and frames over its rate."""
        if not 0 <= bridge < PUNT_BRIDGES:
            raise ValueError(f"bridge {bridge} out of range")
        cdef punt_rate_t *r = &self.q.rates[bridge]
        return {"rate": r.rate, "burst": r.burst, "drop_rate": r.drop_rate}


NO_RULE = PUNT_NO_RULE
SLOT_BYTES = PUNT_SLOT_BYTES
SLOTS = PUNT_SLOTS
