# The cross-core round trip: two threads pinned to two CPUs pass one cache line back and
# forth; how long a round trip takes says how far apart those CPUs are now (on a VM the
# host may move its vCPUs between cache domains while it runs). The benchmarks read it
# before each system's round. Touches no ring, no port, no packet: only its own memory,
# the calling thread's CPU affinity (given back) and one thread it starts and joins.
from libc.stdint cimport uint64_t
from libc.stdlib cimport free

import os
import statistics
import threading

cdef extern from *:
    """
    #include <stdint.h>
    #include <stdlib.h>
    #include <time.h>
    /* [0]: the ball (odd: this thread's serve, even: the partner's answer); [1]: stop */
    typedef struct { volatile uint64_t v; char pad[56]; } __attribute__((aligned(64))) corelat_line_t;
    static inline corelat_line_t *corelat_new(void) {
        corelat_line_t *l = aligned_alloc(64, 2 * sizeof(corelat_line_t));
        if (l) { l[0].v = 0; l[1].v = 0; }
        return l;
    }
    static inline uint64_t corelat_load(corelat_line_t *l) { return __atomic_load_n(&l->v, __ATOMIC_ACQUIRE); }
    static inline void corelat_store(corelat_line_t *l, uint64_t x) { __atomic_store_n(&l->v, x, __ATOMIC_RELEASE); }
    static inline uint64_t corelat_now_ns(void) {
        struct timespec ts; clock_gettime(CLOCK_MONOTONIC, &ts);
        return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
    }
    """
    ctypedef struct corelat_line_t:
        uint64_t v
    corelat_line_t *corelat_new() nogil
    uint64_t corelat_load(corelat_line_t *l) nogil
    void corelat_store(corelat_line_t *l, uint64_t x) nogil
    uint64_t corelat_now_ns() nogil

cdef enum:
    CHECK_EVERY = 4096          # spins between clock readings while waiting
    BATCH = 256                 # round trips timed together


cdef bint wait_for(corelat_line_t *ball, uint64_t want, uint64_t deadline) noexcept nogil:
    """Spin until the ball holds ``want`` (True) or the clock passes ``deadline``."""
    cdef uint64_t spins = 0
    while corelat_load(ball) != want:
        spins += 1
        if spins % CHECK_EVERY == 0 and corelat_now_ns() > deadline:
            return False
    return True


cdef void answer(corelat_line_t *lines, uint64_t deadline) noexcept nogil:
    """The partner: each odd value on the ball is answered with the next even one, until
    the stop line is set (its own line: an answer can never overwrite it) or the deadline."""
    cdef uint64_t v, spins = 0
    while True:
        v = corelat_load(&lines[0])
        if v & 1:
            corelat_store(&lines[0], v + 1)
            continue
        spins += 1
        if spins % CHECK_EVERY == 0:
            if corelat_load(&lines[1]) or corelat_now_ns() > deadline:
                return


def _partner(size_t lines, int cpu, double give_up_s, ready, failed):
    """The partner thread's body; ``lines``: the address of the call's two lines."""
    try:
        os.sched_setaffinity(0, {cpu})      # 0: this thread
    except OSError as e:
        failed.append(e)
        ready.set()
        return
    ready.set()
    cdef uint64_t deadline = corelat_now_ns() + <uint64_t>(give_up_s * 1e9)
    with nogil:
        answer(<corelat_line_t *>lines, deadline)


def round_trip_ns(cpu_a, cpu_b, double seconds=0.5) -> float:
    """ns for one round trip of a cache line between ``cpu_a`` (this thread, pinned there
    for the measurement, its affinity given back after) and ``cpu_b`` (a thread started
    here), measured for ``seconds``: the median over batches of 256 round trips, so a
    thread descheduled for a while spoils a few batches, not the number. Both CPUs should
    be otherwise idle. ValueError for a CPU that is not an int or that this thread may not
    run on, the same CPU twice or ``seconds`` outside (0, 10]; RuntimeError if the partner
    did not start or stopped answering (nothing is left running: a partner that could not
    be joined is reported and its memory left to it)."""
    allowed = os.sched_getaffinity(0)
    for cpu in (cpu_a, cpu_b):
        if type(cpu) is not int:
            raise ValueError(f"a CPU is an int, got {cpu!r}")
    if cpu_a == cpu_b:
        raise ValueError(f"two different CPUs are needed, got {cpu_a} twice")
    for cpu in (cpu_a, cpu_b):
        if cpu not in allowed:
            raise ValueError(f"CPU {cpu} is not one this thread may run on "
                             f"({sorted(allowed)})")
    if not 0 < seconds <= 10:
        raise ValueError(f"seconds must be in (0, 10], got {seconds}")
    cdef corelat_line_t *lines = corelat_new()
    if lines == NULL:
        raise MemoryError("no memory for the round trip's cache lines")
    cdef uint64_t t0 = 0, t1 = 0, end = 0, deadline = 0, serve = 0
    cdef int k
    cdef bint answered = True
    batches = []
    failed = []
    ready = threading.Event()
    partner = threading.Thread(target=_partner, name="corelat", daemon=True,
                               args=(<size_t>lines, <int>cpu_b, seconds + 2.0, ready, failed))
    try:
        os.sched_setaffinity(0, {cpu_a})
        try:
            partner.start()
            if not ready.wait(2.0) or failed:
                why = failed[0] if failed else "it did not start within 2 s"
                raise RuntimeError(f"the partner thread on CPU {cpu_b}: {why}")
            end = corelat_now_ns() + <uint64_t>(seconds * 1e9)
            while answered:
                with nogil:
                    t0 = corelat_now_ns()
                    deadline = t0 + 1000000000
                    for k in range(BATCH):
                        serve += 2
                        corelat_store(&lines[0], serve - 1)
                        if not wait_for(&lines[0], serve, deadline):
                            answered = False
                            break
                    t1 = corelat_now_ns()
                if answered:
                    batches.append((t1 - t0) / <double>BATCH)
                if t1 >= end:
                    break
        finally:
            corelat_store(&lines[1], 1)
            os.sched_setaffinity(0, allowed)
            if partner.ident is not None:
                partner.join(seconds + 3.0)
    finally:
        if partner.ident is not None and partner.is_alive():
            partner.join(0.5)           # (the join above may have been interrupted)
        if partner.is_alive():
            # still spinning on these lines (a host that stopped its vCPU for seconds):
            # they stay allocated for it, and the caller hears of it
            raise RuntimeError(f"the partner thread on CPU {cpu_b} did not stop")
        free(lines)
    if not answered or not batches:
        raise RuntimeError(f"the partner thread on CPU {cpu_b} stopped answering "
                           f"(no answer within 1 s)")
    return float(statistics.median(batches))
