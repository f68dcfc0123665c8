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

from pyvhost._idle cimport (
    IDLE_NS, idle_free, idle_init, idle_sleep, idle_t, idle_wake, notify_all, now_ns,
)
from pyvhost._offload cimport offload_send
from pyvhost._pktpool cimport PacketPool, pkt_t, pool_get, pool_put_many
from pyvhost._port cimport port_ops_t, rxq_src_t
from pyvhost._vhostport cimport vq_kickfd_locked, vq_notify_locked, vq_pending_locked
from pyvhost._vring cimport (
    MAX_BURST, VirtQueue, vh_eventfd_signal, vh_load_acquire_int, vh_store_release_int,
    vh_trylock, vh_unlock, vq_dequeue, vq_enqueue, vq_pending, vq_t,
)

cdef enum:
    CLOCK_EVERY = 64           # empty polls between clock reads

MODES = {"echo": 0, "sink": 1, "source": 2}


# the idle path sees each polled ring as a one-queue source (dev = the vq_t)
cdef int ring_wait_fd(void *dev, uint16_t q) noexcept nogil:
    return vq_kickfd_locked(<vq_t *>dev)


cdef void ring_set_notify(void *dev, uint16_t q, bint on) noexcept nogil:
    vq_notify_locked(<vq_t *>dev, on)


cdef bint ring_pending(void *dev, uint16_t q) noexcept nogil:
    return vq_pending_locked(<vq_t *>dev)


cdef port_ops_t RING_OPS
RING_OPS.rx_burst = NULL
RING_OPS.tx_burst = NULL
RING_OPS.wait_fd = ring_wait_fd
RING_OPS.set_notify = ring_set_notify
RING_OPS.pending = ring_pending


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
    cdef rxq_src_t *inputs      # the rings whose kick means work
    cdef int npairs
    cdef int mode
    cdef list keep
    cdef PacketPool pool
    cdef pkt_t *templates[MAX_BURST]
    cdef idle_t idle
    cdef int stopping
    cdef readonly uint64_t rx_packets, tx_packets, tx_dropped

    def __cinit__(self, pairs, str mode, PacketPool pool, bytes template=None):
        cdef int i
        cdef VirtQueue r, t
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}")
        self.mode = MODES[mode]
        self.npairs = len(pairs)
        self.rx = <vq_t **>calloc(max(1, self.npairs), sizeof(vq_t *))
        self.tx = <vq_t **>calloc(max(1, self.npairs), sizeof(vq_t *))
        self.inputs = <rxq_src_t *>calloc(max(1, self.npairs), sizeof(rxq_src_t))
        self.keep = list(pairs)
        for i, (r, t) in enumerate(pairs):
            self.rx[i] = &r.vq
            self.tx[i] = &t.vq
            # guest TX carries work; for SOURCE, new guest RX buffers do
            self.inputs[i].ops = &RING_OPS
            self.inputs[i].dev = &r.vq if self.mode == 2 else &t.vq
            self.inputs[i].q = 0
        self.pool = pool
        idle_init(&self.idle)
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
        free(self.inputs)
        idle_free(&self.idle)

    def wake(self):
        """Rings changed (fds, state): re-read them and re-arm the sleep set."""
        idle_wake(&self.idle)

    def stop(self):
        vh_store_release_int(&self.stopping, 1)
        vh_eventfd_signal(self.idle.wakefd)

    def stats(self):
        return {"rx_packets": self.rx_packets, "tx_packets": self.tx_packets,
                "tx_dropped": self.tx_dropped, "sleeps": self.idle.sleeps}

    cdef uint32_t poll_pair(self, int i, pkt_t **pkts) noexcept nogil:
        cdef vq_t *rx = self.rx[i]
        cdef vq_t *tx = self.tx[i]
        cdef uint32_t n = 0, sent = 0, k, failed = 0
        cdef uint64_t sent_bytes = 0
        if self.mode == 2:
            if vh_trylock(&rx.lock):
                if vq_pending(rx):
                    sent = vq_enqueue(rx, self.templates, MAX_BURST, NULL)
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
                sent = offload_send(rx, self.pool.pool, pkts, n, &failed, &sent_bytes)
                vh_unlock(&rx.lock)
            self.tx_packets += sent
            self.tx_dropped += n - sent
        pool_put_many(self.pool.pool, pkts, n)
        return n

    def run(self):
        """The loop; returns after ``stop()``. Call it from a thread of its own."""
        cdef pkt_t *pkts[MAX_BURST]
        cdef uint64_t last_busy
        cdef uint32_t empty = 0, got
        cdef int i
        with nogil:
            last_busy = now_ns()
            notify_all(self.inputs, self.npairs, False)
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
                    idle_sleep(&self.idle, self.inputs, self.npairs, &self.stopping, NULL)
                    notify_all(self.inputs, self.npairs, False)     # our rings never go away
                    empty = 0
