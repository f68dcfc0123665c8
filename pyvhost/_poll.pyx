# cython: language_level=3
"""A compiled poll loop over a fixed set of virtio-net queue pairs (the reflector's PMD).

Modes: ECHO sends each frame the guest transmits back on the same queue pair with the MACs
swapped; SINK counts and drops; SOURCE fills the guest's RX buffers with a template frame
(for benchmarks). The loop runs without the GIL, busy-polls with guest notifications off
while there is traffic, and after IDLE_NS without any turns notifications back on and
sleeps in epoll on the kick eventfds. Control code calls ``wake()`` after changing a ring.
This module knows nothing of sockets or of the vhost-user state machine.
"""

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free
from libc.string cimport memcpy
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec
from posix.unistd cimport close

from pyvhost._offload cimport offload_send
from pyvhost._pktpool cimport PacketPool, pkt_t, pool_get, pool_put_many
from pyvhost._vring cimport (
    MAX_BURST, VirtQueue, vh_eventfd_drain, vh_eventfd_signal, vh_load_acquire_int, vh_lock,
    vh_store_release_int, vh_trylock, vh_unlock, vq_dequeue, vq_enqueue, vq_pending,
    vq_set_notify, vq_t,
)

cdef extern from "sys/epoll.h" nogil:
    cdef union epoll_data_t:
        int fd
        uint64_t u64
    cdef struct epoll_event:
        uint32_t events
        epoll_data_t data
    int epoll_create1(int flags)
    int epoll_ctl(int epfd, int op, int fd, epoll_event *event)
    int epoll_wait(int epfd, epoll_event *events, int maxevents, int timeout)
    enum:
        EPOLLIN
        EPOLL_CTL_ADD
        EPOLL_CLOEXEC

cdef extern from "sys/eventfd.h" nogil:
    int eventfd(unsigned int initval, int flags)
    enum:
        EFD_NONBLOCK
        EFD_CLOEXEC

cdef enum:
    IDLE_NS = 1000000          # no traffic for 1 ms: sleep
    SLEEP_MS = 200             # bound on one sleep, so a missed wake costs little
    CLOCK_EVERY = 64           # empty polls between clock reads

MODES = {"echo": 0, "sink": 1, "source": 2}


cdef inline uint64_t now_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <uint64_t>ts.tv_sec * 1000000000 + ts.tv_nsec


cdef inline void swap_macs(pkt_t *p) noexcept nogil:
    cdef uint8_t tmp[6]
    if p.len >= 12:
        memcpy(tmp, p.data, 6)
        memcpy(p.data, p.data + 6, 6)
        memcpy(p.data + 6, tmp, 6)


cdef class Poller:
    """Polls ``pairs`` (a list of (rx VirtQueue, tx VirtQueue), guest's view) in ``mode``."""

    cdef vq_t **rx
    cdef vq_t **tx
    cdef int npairs
    cdef int mode
    cdef list keep
    cdef PacketPool pool
    cdef pkt_t *templates[MAX_BURST]
    cdef int wakefd
    cdef int epfd
    cdef int stopping
    cdef int generation
    cdef int epoll_generation
    cdef readonly uint64_t rx_packets, tx_packets, tx_dropped, sleeps, wakeups

    def __cinit__(self, pairs, str mode, PacketPool pool, bytes template=None):
        cdef int i
        cdef VirtQueue r, t
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}")
        self.mode = MODES[mode]
        self.npairs = len(pairs)
        self.rx = <vq_t **>calloc(max(1, self.npairs), sizeof(vq_t *))
        self.tx = <vq_t **>calloc(max(1, self.npairs), sizeof(vq_t *))
        self.keep = list(pairs)
        for i, (r, t) in enumerate(pairs):
            self.rx[i] = &r.vq
            self.tx[i] = &t.vq
        self.pool = pool
        self.wakefd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
        self.epfd = -1
        self.epoll_generation = -1
        if self.mode == 2:
            if not template or len(template) > pool.buf_size:
                raise ValueError("source mode needs a template frame that fits a buffer")
            for i in range(MAX_BURST):
                self.templates[i] = pool_get(pool.pool)
                memcpy(self.templates[i].data, <const char *>template, len(template))
                self.templates[i].len = len(template)

    def __dealloc__(self):
        free(self.rx)
        free(self.tx)
        if self.wakefd >= 0:
            close(self.wakefd)
        if self.epfd >= 0:
            close(self.epfd)

    def wake(self):
        """Rings changed (fds, state): re-read them and re-arm the sleep set."""
        self.generation += 1
        vh_eventfd_signal(self.wakefd)

    def stop(self):
        vh_store_release_int(&self.stopping, 1)
        vh_eventfd_signal(self.wakefd)

    def stats(self):
        return {"rx_packets": self.rx_packets, "tx_packets": self.tx_packets,
                "tx_dropped": self.tx_dropped, "sleeps": self.sleeps, "wakeups": self.wakeups}

    cdef inline vq_t *input_vq(self, int i) noexcept nogil:
        """The ring whose kick means work: guest TX, or guest RX buffers for SOURCE."""
        return self.rx[i] if self.mode == 2 else self.tx[i]

    cdef uint32_t poll_pair(self, int i, pkt_t **pkts) noexcept nogil:
        cdef vq_t *rx = self.rx[i]
        cdef vq_t *tx = self.tx[i]
        cdef uint32_t n = 0, sent = 0, k
        if self.mode == 2:
            if vh_trylock(&rx.lock):
                if vq_pending(rx):
                    sent = vq_enqueue(rx, self.templates, MAX_BURST)
                vh_unlock(&rx.lock)
            self.tx_packets += sent
            return sent
        if vh_trylock(&tx.lock):
            n = vq_dequeue(tx, self.pool.pool, pkts, MAX_BURST)
            vh_unlock(&tx.lock)
        if n == 0:
            return 0
        self.rx_packets += n
        if self.mode == 0:
            for k in range(n):
                swap_macs(pkts[k])
            if vh_trylock(&rx.lock):
                sent = offload_send(rx, self.pool.pool, pkts, n, &self.tx_dropped)
                vh_unlock(&rx.lock)
            self.tx_packets += sent
            self.tx_dropped += n - sent
        pool_put_many(self.pool.pool, pkts, n)
        return n

    cdef void set_notify_all(self, bint on) noexcept nogil:
        cdef vq_t *q
        cdef int i
        for i in range(self.npairs):
            q = self.input_vq(i)
            vh_lock(&q.lock)
            if on:
                vh_eventfd_drain(q.kickfd)
            vq_set_notify(q, on)
            vh_unlock(&q.lock)

    cdef bint any_pending(self) noexcept nogil:
        cdef vq_t *q
        cdef bint r = False
        cdef int i
        for i in range(self.npairs):
            q = self.input_vq(i)
            vh_lock(&q.lock)
            r = vq_pending(q)
            vh_unlock(&q.lock)
            if r:
                return True
        return False

    cdef void rearm(self) noexcept nogil:
        """A fresh epoll set: the wake fd and every input ring's current kick fd."""
        cdef epoll_event ev
        cdef vq_t *q
        cdef int gen = self.generation
        cdef int i
        if self.epfd >= 0:
            close(self.epfd)
        self.epfd = epoll_create1(EPOLL_CLOEXEC)
        ev.events = EPOLLIN
        ev.data.fd = self.wakefd
        epoll_ctl(self.epfd, EPOLL_CTL_ADD, self.wakefd, &ev)
        for i in range(self.npairs):
            q = self.input_vq(i)
            vh_lock(&q.lock)
            if q.kickfd >= 0:
                ev.data.fd = q.kickfd
                epoll_ctl(self.epfd, EPOLL_CTL_ADD, q.kickfd, &ev)
            vh_unlock(&q.lock)
        self.epoll_generation = gen

    cdef void sleep(self) noexcept nogil:
        cdef epoll_event events[16]
        self.set_notify_all(True)
        if self.any_pending():
            self.set_notify_all(False)
            return
        if self.epoll_generation != self.generation:
            self.rearm()
        self.sleeps += 1
        epoll_wait(self.epfd, events, 16, SLEEP_MS)
        vh_eventfd_drain(self.wakefd)
        self.wakeups += 1
        self.set_notify_all(False)

    def run(self):
        """The loop; returns after ``stop()``. Call it from a thread of its own."""
        cdef pkt_t *pkts[MAX_BURST]
        cdef uint64_t last_busy
        cdef uint32_t empty = 0, got
        cdef int i
        with nogil:
            last_busy = now_ns()
            self.set_notify_all(False)
            while not vh_load_acquire_int(&self.stopping):
                got = 0
                for i in range(self.npairs):
                    got += self.poll_pair(i, pkts)
                if got:
                    empty = 0
                    continue
                empty += 1
                if empty % CLOCK_EVERY:
                    continue
                if empty == CLOCK_EVERY:
                    last_busy = now_ns()
                elif now_ns() - last_busy > IDLE_NS:
                    self.sleep()
                    empty = 0
