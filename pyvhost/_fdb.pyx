# cython: language_level=3
"""The compiled MAC learning table (see _fdb.pxd): a chained hash table over a fixed array
of entries, guarded by a spinlock that PMD threads take for a few instructions per upcall
and the control thread takes to expire, show (a copy, formatted outside the lock) and
forget ports. Entries learned with a remote (a flow-based tunnel port's) are counted per
(port, remote, VNI) in a small list that a flood reads. No rules, no ports, no packets
here.
"""

from libc.stdint cimport int32_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memcmp, memcpy
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

from pyvhost._vring cimport vh_lock, vh_unlock

DEFAULT_SIZE = 8192
DEFAULT_AGING = 300
FDB_PORT_REMOTES_MAX = FDB_PORT_REMOTES     # remotes listed behind one port, at most


cdef uint32_t now_ms() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <uint32_t>(<uint64_t>ts.tv_sec * 1000 + ts.tv_nsec // 1000000)


cdef inline uint32_t mac_hash(uint16_t vlan, const uint8_t *mac) noexcept nogil:
    cdef uint64_t h = vlan
    cdef int i
    for i in range(6):
        h = (h << 8) | mac[i]
    h *= 0x9E3779B97F4A7C15ULL
    return <uint32_t>(h >> 32)


cdef inline uint32_t age(uint32_t now, uint32_t then) noexcept nogil:
    """ms since ``then``; 0 if another thread stamped it after ``now`` was read."""
    cdef int32_t d = <int32_t>(now - then)
    return d if d > 0 else 0


cdef inline bint age_gt(uint32_t now, uint32_t then, uint32_t ms) noexcept nogil:
    return age(now, then) > ms


cdef int32_t find(fdb_t *f, uint16_t vlan, const uint8_t *mac) noexcept nogil:
    cdef int32_t i = f.buckets[mac_hash(vlan, mac) & (f.nbuckets - 1)]
    while i >= 0:
        if f.e[i].vlan == vlan and memcmp(f.e[i].mac, mac, 6) == 0:
            return i
        i = f.e[i].next
    return -1


cdef int32_t remote_find(fdb_t *f, uint16_t port, uint32_t remote, uint32_t vni) noexcept nogil:
    cdef uint32_t i
    for i in range(f.nremotes):
        if f.remotes[i].port == port and f.remotes[i].remote == remote and \
                f.remotes[i].vni == vni:
            return i
    return -1


cdef bint remote_room(fdb_t *f, uint16_t port, uint32_t remote, uint32_t vni) noexcept nogil:
    """Whether an entry behind (port, remote, vni) can be counted: no remote, one listed
    already, or room for one more (in the table, and behind the port: every remote is a
    copy of each flood, and a remote is whoever sends a datagram, so their number is
    bounded). An entry that cannot be counted is not learned (every entry is counted)."""
    if remote == 0 or remote_find(f, port, remote, vni) >= 0:
        return True
    return f.nremotes < FDB_REMOTES and (port >= FDB_PORTS or
                                        f.port_remotes[port] < FDB_PORT_REMOTES)


cdef void remote_ref(fdb_t *f, uint16_t port, uint32_t remote, uint32_t vni) noexcept nogil:
    """One more entry behind (port, remote, vni) (none without a remote); the caller made
    sure there is room (remote_room)."""
    cdef int32_t i
    if remote == 0:
        return
    i = remote_find(f, port, remote, vni)
    if i >= 0:
        f.remotes[i].refs += 1
        return
    if f.nremotes == FDB_REMOTES:                  # (never: remote_room said so)
        return
    if port < FDB_PORTS:
        f.port_remotes[port] += 1
    f.remotes[f.nremotes].port = port
    f.remotes[f.nremotes].remote = remote
    f.remotes[f.nremotes].vni = vni
    f.remotes[f.nremotes].refs = 1
    f.nremotes += 1


cdef void remote_unref(fdb_t *f, uint16_t port, uint32_t remote, uint32_t vni) noexcept nogil:
    cdef int32_t i = remote_find(f, port, remote, vni) if remote else -1
    if i < 0:                                      # none
        return
    f.remotes[i].refs -= 1
    if f.remotes[i].refs == 0:                     # its last entry went: the last one's slot
        if port < FDB_PORTS and f.port_remotes[port]:
            f.port_remotes[port] -= 1
        f.nremotes -= 1
        f.remotes[i] = f.remotes[f.nremotes]


cdef void unlink(fdb_t *f, int32_t idx) noexcept nogil:
    cdef fdb_entry_t *e = &f.e[idx]
    cdef int32_t *link = &f.buckets[mac_hash(e.vlan, e.mac) & (f.nbuckets - 1)]
    while link[0] >= 0 and link[0] != idx:
        link = &f.e[link[0]].next
    if link[0] == idx:
        link[0] = e.next
    e.in_use = 0
    remote_unref(f, e.port, e.remote, e.vni)
    e.remote = 0
    e.vni = 0
    e.ver += 1
    f.add_gen += 1                 # decisions that could not learn may now (see fdb_t)
    e.next = f.free_head
    f.free_head = idx
    f.count -= 1
    if e.port < FDB_PORTS and f.port_count[e.port]:
        f.port_count[e.port] -= 1


cdef int32_t evict_one(fdb_t *f, uint32_t now) noexcept nogil:
    """Drop the least recently used of a few sampled entries (an idle one, almost surely)."""
    cdef int32_t best = -1, i
    cdef int n
    for n in range(FDB_SAMPLE * 4):
        f.rng = f.rng * 1103515245 + 12345
        i = (f.rng >> 8) % f.size
        if not f.e[i].in_use:
            continue
        if best < 0 or age(now, f.e[i].used_ms) > age(now, f.e[best].used_ms):
            best = i
        if n >= FDB_SAMPLE and best >= 0:
            break
    if best >= 0:
        unlink(f, best)
        f.evicted += 1
    return best


cdef int fdb_learn(fdb_t *f, uint16_t vlan, const uint8_t *mac, uint16_t port,
                   uint32_t remote, uint32_t vni, uint32_t now,
                   uint32_t *idx, uint32_t *ver) noexcept nogil:
    """Record ``mac`` behind ``port`` (and ``remote``/``vni`` on it, remote 0: none): 0 seen
    again, 1 new, 2 moved (another port, or another remote of the same port), -1 not
    learned (group address, the port's limit, a damped move). ``idx``/``ver`` name the
    entry the decision depends on (0xFFFFFFFF if none)."""
    cdef int32_t i
    cdef fdb_entry_t *e
    cdef uint32_t h
    cdef int rc
    idx[0] = 0xFFFFFFFF
    ver[0] = 0
    if mac[0] & 1 or port >= FDB_PORTS:
        return -1
    vh_lock(&f.lock)
    i = find(f, vlan, mac)
    if i >= 0:
        e = &f.e[i]
        idx[0] = i
        ver[0] = e.ver
        if e.port == port and e.remote == remote and e.vni == vni:
            e.used_ms = now
            vh_unlock(&f.lock)
            return 0
        if age_gt(now, e.window_ms, MOVE_WINDOW_MS):
            e.window_ms = now
            e.moves = 0
        if e.moves >= MOVE_LIMIT or (e.port != port and f.port_limit[port] and
                                     f.port_count[port] >= f.port_limit[port]):
            if e.moves >= MOVE_LIMIT:
                f.damped += 1
                memcpy(f.damped_mac, mac, 6)
                f.damped_vlan = vlan
            else:
                f.refused += 1
            idx[0] = 0xFFFFFFFF            # not learned here: nothing to refresh or follow
            ver[0] = 0
            vh_unlock(&f.lock)
            return -1
        if not remote_room(f, port, remote, vni):
            f.remotes_full += 1
            idx[0] = 0xFFFFFFFF
            ver[0] = 0
            vh_unlock(&f.lock)
            return -1
        e.moves += 1
        if e.port != port:
            if f.port_count[e.port]:
                f.port_count[e.port] -= 1
            f.port_count[port] += 1
        remote_unref(f, e.port, e.remote, e.vni)
        remote_ref(f, port, remote, vni)
        e.port = port
        e.remote = remote
        e.vni = vni
        e.used_ms = now
        e.ver += 1
        ver[0] = e.ver
        f.moved += 1
        vh_unlock(&f.lock)
        return 2
    if f.port_limit[port] and f.port_count[port] >= f.port_limit[port]:
        f.refused += 1
        vh_unlock(&f.lock)
        return -1
    if not remote_room(f, port, remote, vni):
        f.remotes_full += 1
        vh_unlock(&f.lock)
        return -1
    if f.free_head < 0:
        evict_one(f, now)
    if f.free_head < 0:
        vh_unlock(&f.lock)
        return -1
    i = f.free_head
    e = &f.e[i]
    f.free_head = e.next
    memcpy(e.mac, mac, 6)
    e.vlan = vlan
    e.port = port
    e.remote = remote
    e.vni = vni
    remote_ref(f, port, remote, vni)
    e.in_use = 1
    e.used_ms = now
    e.window_ms = now
    e.moves = 0
    e.ver += 1
    h = mac_hash(vlan, mac) & (f.nbuckets - 1)
    e.next = f.buckets[h]
    f.buckets[h] = i
    f.count += 1
    f.port_count[port] += 1
    f.learned += 1
    f.add_gen += 1
    idx[0] = i
    ver[0] = e.ver
    vh_unlock(&f.lock)
    return 1


cdef int fdb_lookup(fdb_t *f, uint16_t vlan, const uint8_t *mac, uint32_t *idx,
                    uint32_t *ver, uint32_t *remote, uint32_t *vni) noexcept nogil:
    """The port ``mac`` was learned on, or -1 (``idx``/``ver`` name the entry; ``remote``
    and ``vni`` the remote on that port it came from, remote 0: none)."""
    cdef int32_t i
    cdef int port = -1
    idx[0] = 0xFFFFFFFF
    ver[0] = 0
    remote[0] = 0
    vni[0] = 0
    vh_lock(&f.lock)
    i = find(f, vlan, mac)
    if i >= 0:
        port = f.e[i].port
        idx[0] = i
        ver[0] = f.e[i].ver
        remote[0] = f.e[i].remote
        vni[0] = f.e[i].vni
    vh_unlock(&f.lock)
    return port


cdef uint32_t fdb_remotes(fdb_t *f, uint16_t port, uint32_t *out, uint32_t room) noexcept nogil:
    """The remotes learned behind ``port``: (remote, vni) pairs into ``out`` (at most
    ``room`` pairs); how many."""
    cdef uint32_t i, n = 0
    vh_lock(&f.lock)
    for i in range(f.nremotes):
        if f.remotes[i].port == port and n < room:
            out[2 * n] = f.remotes[i].remote
            out[2 * n + 1] = f.remotes[i].vni
            n += 1
    vh_unlock(&f.lock)
    return n


cdef class MacTable:
    """One bridge's MAC table of ``size`` entries aging after ``aging`` seconds."""

    def __cinit__(self, uint32_t size=DEFAULT_SIZE, uint32_t aging=DEFAULT_AGING):
        cdef uint32_t i, nb = 16
        if not 1 <= size <= (1 << 24):
            raise ValueError(f"mac-table-size {size} out of range 1..{1 << 24}")
        if not 1 <= aging <= 1000000:
            raise ValueError(f"mac-aging-time {aging} out of range 1..1000000")
        while nb < size:
            nb *= 2
        self.f = <fdb_t *>calloc(1, sizeof(fdb_t))
        if self.f == NULL:
            raise MemoryError()
        self.f.e = <fdb_entry_t *>calloc(size, sizeof(fdb_entry_t))
        self.f.buckets = <int32_t *>malloc(nb * sizeof(int32_t))
        if self.f.e == NULL or self.f.buckets == NULL:
            raise MemoryError()
        for i in range(nb):
            self.f.buckets[i] = -1
        for i in range(size):
            self.f.e[i].next = i + 1 if i + 1 < size else -1
        self.f.size = size
        self.f.nbuckets = nb
        self.f.aging_ms = aging * 1000
        self.f.rng = 2463534242

    def __dealloc__(self):
        if self.f != NULL:
            free(self.f.e)
            free(self.f.buckets)
            free(self.f)

    @property
    def size(self):
        return self.f.size

    @property
    def aging(self):
        return self.f.aging_ms // 1000

    def set_aging(self, uint32_t aging):
        if not 1 <= aging <= 1000000:
            raise ValueError(f"mac-aging-time {aging} out of range 1..1000000")
        self.f.aging_ms = aging * 1000

    def set_port_limit(self, int port, uint32_t limit):
        """At most ``limit`` MACs learned on ``port`` (0: no limit)."""
        if not 0 <= port < FDB_PORTS:
            raise ValueError(f"port id {port} out of range")
        self.f.port_limit[port] = limit

    def learn(self, int vlan, bytes mac, int port, now=None, bytes remote=None,
              uint32_t vni=0):
        """As a PMD learns (tests and tools): 0 seen, 1 new, 2 moved, -1 not learned.
        ``remote`` (4 bytes, IPv4) and ``vni``: the remote on ``port`` it came from."""
        cdef uint32_t idx, ver, r = 0
        if len(mac) != 6 or not 0 <= vlan < 4096 or not 0 <= port < 0xFFFF:
            raise ValueError("bad vlan, mac or port")
        if remote is not None:
            if len(remote) != 4 or remote == bytes(4):
                raise ValueError("a remote is a non-zero IPv4 address (4 bytes)")
            memcpy(&r, <const char *>remote, 4)
        return fdb_learn(self.f, vlan, mac, port, r, vni if r else 0,
                         now_ms() if now is None else now, &idx, &ver)

    def remotes(self, int port):
        """The (remote address bytes, vni) learned behind ``port``, as a flood reaches them."""
        cdef uint32_t out[2 * FDB_REMOTES]
        cdef uint32_t n, i
        if not 0 <= port < FDB_PORTS:
            raise ValueError(f"port id {port} out of range")
        n = fdb_remotes(self.f, port, out, FDB_REMOTES)
        return sorted(((<char *>&out[2 * i])[:4], out[2 * i + 1]) for i in range(n))

    def lookup(self, int vlan, bytes mac):
        cdef uint32_t idx, ver, remote, vni
        cdef int port
        if len(mac) != 6 or not 0 <= vlan < 4096:
            raise ValueError("bad vlan or mac")
        port = fdb_lookup(self.f, vlan, mac, &idx, &ver, &remote, &vni)
        return None if port < 0 else port

    def expire(self, now=None):
        """Drop entries idle for longer than the aging time; returns how many went."""
        cdef uint32_t t, i, n = 0
        cdef bint given = now is not None
        cdef uint32_t t_given = now if given else 0
        with nogil:
            vh_lock(&self.f.lock)
            t = t_given if given else now_ms()       # read under the lock
            for i in range(self.f.size):
                if self.f.e[i].in_use and age_gt(t, self.f.e[i].used_ms, self.f.aging_ms):
                    unlink(self.f, i)
                    n += 1
            self.f.expired += n
            vh_unlock(&self.f.lock)
        return n

    def forget_port(self, int port):
        cdef uint32_t i, n = 0
        with nogil:
            vh_lock(&self.f.lock)
            for i in range(self.f.size):
                if self.f.e[i].in_use and self.f.e[i].port == port:
                    unlink(self.f, i)
                    n += 1
            vh_unlock(&self.f.lock)
        return n

    def rows(self, now=None):
        """(port id, vlan, mac bytes, age seconds, remote bytes or None, vni) of every entry:
        a copy taken in one short hold of the lock, formatted after it (forwarding never
        waits on a show)."""
        cdef uint32_t t = now_ms() if now is None else now, i
        cdef fdb_entry_t *snap = <fdb_entry_t *>malloc(self.f.size * sizeof(fdb_entry_t))
        if snap == NULL:
            raise MemoryError()
        with nogil:
            vh_lock(&self.f.lock)
            memcpy(snap, self.f.e, self.f.size * sizeof(fdb_entry_t))
            vh_unlock(&self.f.lock)
        try:
            return [(snap[i].port, snap[i].vlan, (<char *>snap[i].mac)[:6],
                     age(t, snap[i].used_ms) // 1000,
                     (<char *>&snap[i].remote)[:4] if snap[i].remote else None, snap[i].vni)
                    for i in range(self.f.size) if snap[i].in_use]
        finally:
            free(snap)

    def stats(self):
        return {"entries": self.f.count, "size": self.f.size, "learned": self.f.learned,
                "moved": self.f.moved, "evicted": self.f.evicted, "expired": self.f.expired,
                "refused": self.f.refused, "damped": self.f.damped,
                "remotes": self.f.nremotes, "remotes_full": self.f.remotes_full}

    def last_damped(self):
        """(vlan, mac) of the last MAC whose move was ignored."""
        return self.f.damped_vlan, (<char *>self.f.damped_mac)[:6]

    def __len__(self):
        return self.f.count


def clock_ms():
    """The millisecond clock entries are stamped with (CLOCK_MONOTONIC, wrapping at 2^32)."""
    return now_ms()
