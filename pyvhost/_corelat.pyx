# The cross-core round trip: two threads pinned to two CPUs pass one cache line back and
# forth; how long a round trip takes tells how far apart the host has put those CPUs
# (a VM's vCPUs can move between cache domains while it runs, and a PMD's rate with them).
# The benchmarks read it before each round. Touches no ring, no port, no packet: only its
# own line, the calling thread's CPU affinity (restored) and one thread it starts and joins.
from libc.stdint cimport uint64_t

import os
import threading
import time

cdef extern from *:
    """
    #include <stdint.h>
    #include <time.h>
    typedef struct { volatile uint64_t v; char pad[56]; } __attribute__((aligned(64))) corelat_line_t;
    static inline uint64_t corelat_load(corelat_line_t *l) { return __atomic_load_n(&l->v, __ATOMIC_ACQUIRE); }
    static inline void corelat_store(corelat_line_t *l, uint64_t x) { __atomic_store_n(&l->v, x, __ATOMIC_RELEASE); }
    static inline uint64_t corelat_now_ns(void) {
        struct timespec ts; clock_gettime(CLOCK_MONOTONIC, &ts);
        return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
    }
    static corelat_line_t corelat_line;
    #define CORELAT_STOP UINT64_MAX
    """
    ctypedef struct corelat_line_t:
        uint64_t v
    uint64_t corelat_load(corelat_line_t *l) nogil
    void corelat_store(corelat_line_t *l, uint64_t x) nogil
    uint64_t corelat_now_ns() nogil
    corelat_line_t corelat_line
    uint64_t STOP "CORELAT_STOP"

cdef enum:
    CHECK_EVERY = 4096          # spins between clock readings while waiting


_lock = threading.Lock()        # one measurement at a time: they share the line


cdef bint wait_for(corelat_line_t *line, uint64_t want, uint64_t deadline) noexcept nogil:
    """Spin until the line holds ``want`` (True) or the clock passes ``deadline``."""
    cdef uint64_t spins = 0
    while corelat_load(line) != want:
        spins += 1
        if spins % CHECK_EVERY == 0 and corelat_now_ns() > deadline:
            return False
    return True


cdef void answer(corelat_line_t *line, uint64_t deadline) noexcept nogil:
    """The partner: each odd value seen is answered with the next even one, until STOP."""
    cdef uint64_t v, spins = 0
    while True:
        v = corelat_load(line)
        if v == STOP:
            return
        if v & 1:
            corelat_store(line, v + 1)
            continue
        spins += 1
        if spins % CHECK_EVERY == 0 and corelat_now_ns() > deadline:
            return


def _partner(int cpu, double give_up_s, ready):
    os.sched_setaffinity(0, {cpu})      # 0: this thread
    ready.set()
    cdef uint64_t deadline = corelat_now_ns() + <uint64_t>(give_up_s * 1e9)
    with nogil:
        answer(&corelat_line, deadline)


def round_trip_ns(int cpu_a, int cpu_b, double seconds=0.5) -> float:
    """Mean ns for one round trip of a cache line between ``cpu_a`` (this thread, pinned
    there for the measurement, its affinity restored after) and ``cpu_b`` (a thread started
    here), measured for ``seconds``. Both CPUs should be otherwise idle: the number is the
    machine's, not a switch's. ValueError for a CPU this process may not use, the same CPU
    twice or ``seconds`` outside (0, 10]; RuntimeError if the partner never answered."""
    allowed = os.sched_getaffinity(0)
    if cpu_a == cpu_b:
        raise ValueError(f"two different CPUs are needed, got {cpu_a} twice")
    for cpu in (cpu_a, cpu_b):
        if cpu not in allowed:
            raise ValueError(f"CPU {cpu} is not one this process may run on "
                             f"({sorted(allowed)})")
    if not 0 < seconds <= 10:
        raise ValueError(f"seconds must be in (0, 10], got {seconds}")
    cdef corelat_line_t *line = &corelat_line
    cdef uint64_t i = 0, start = 0, end = 0, deadline
    cdef bint ok = True
    with _lock:
        ready = threading.Event()
        corelat_store(line, 0)
        partner = threading.Thread(target=_partner, args=(cpu_b, seconds + 2.0, ready),
                                   name="corelat", daemon=True)
        try:
            os.sched_setaffinity(0, {cpu_a})
            partner.start()
            if not ready.wait(2.0):
                raise RuntimeError(f"the partner thread on CPU {cpu_b} did not start")
            with nogil:
                start = corelat_now_ns()
                end = start + <uint64_t>(seconds * 1e9)
                deadline = end + 1000000000
                while True:
                    corelat_store(line, 2 * i + 1)
                    if not wait_for(line, 2 * i + 2, deadline):
                        ok = False
                        break
                    i += 1
                    if i % 1024 == 0 and corelat_now_ns() >= end:
                        break
                end = corelat_now_ns()
        finally:
            corelat_store(line, STOP)
            if partner.ident is not None:
                partner.join(seconds + 3.0)
            os.sched_setaffinity(0, allowed)
        if not ok or i == 0:
            raise RuntimeError(f"no answer from CPU {cpu_b} within a second")
    return <double>(end - start) / i
