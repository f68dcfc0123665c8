# The idle path of a poll loop, shared by the reflector's Poller and the switch's PMDs:
# after IDLE_NS without work, turn guest notifications on, re-check the rings, and sleep in
# epoll on their wait fds (kick eventfds, tap and packet sockets; and a wake eventfd for
# control) for at most SLEEP_MS. Header-only (inline): it knows queues only through the
# port class's ops (_port.pxd): set_notify, pending, wait_fd.
from libc.stdint cimport uint32_t, uint64_t
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec
from posix.unistd cimport close

from pyvhost._port cimport rxq_src_t
from pyvhost._vring cimport (
    vh_eventfd_drain, vh_eventfd_signal, vh_fence_seq_cst, vh_load_acquire_int,
    vh_store_release_int,
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
    IDLE_MAX_FDS = 512         # wait fds remembered to notice one that changed

cdef struct idle_t:
    int wakefd                 # control writes it after changing rings (idle_wake)
    int epfd
    int generation             # bumped by idle_wake: the epoll set must be rebuilt
    int epoll_generation
    int sleeping               # 1 while in epoll_wait (a quiescent point)
    uint64_t sleeps
    int narmed                 # the wait fds in the epoll set, per source (-1: none)
    int armed[IDLE_MAX_FDS]


cdef inline uint64_t now_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <uint64_t>ts.tv_sec * 1000000000 + ts.tv_nsec


cdef inline int idle_init(idle_t *s) noexcept nogil:
    s.wakefd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
    s.epfd = -1
    s.generation = 0
    s.epoll_generation = -1
    s.sleeping = 0
    s.sleeps = 0
    s.narmed = -1
    return s.wakefd


cdef inline void idle_free(idle_t *s) noexcept nogil:
    if s.wakefd >= 0:
        close(s.wakefd)
        s.wakefd = -1
    if s.epfd >= 0:
        close(s.epfd)
        s.epfd = -1


cdef inline void idle_wake(idle_t *s) noexcept nogil:
    """Rings changed (fds, state): re-read them and re-arm the sleep set."""
    s.generation += 1
    vh_eventfd_signal(s.wakefd)


cdef inline void notify_all(rxq_src_t *srcs, int n, bint on) noexcept nogil:
    """Notifications on (stale ones drained first) or off, for every queue in ``srcs``."""
    cdef int i
    for i in range(n):
        if srcs[i].ops != NULL and srcs[i].ops.set_notify != NULL:
            srcs[i].ops.set_notify(srcs[i].dev, srcs[i].q, on)


cdef inline bint any_pending(rxq_src_t *srcs, int n) noexcept nogil:
    cdef int i
    for i in range(n):
        if srcs[i].ops != NULL and srcs[i].ops.pending != NULL and \
                srcs[i].ops.pending(srcs[i].dev, srcs[i].q):
            return True
    return False


cdef inline int src_fd(rxq_src_t *src) noexcept nogil:
    return src.ops.wait_fd(src.dev, src.q) if src.ops != NULL else -1


cdef inline bint fds_changed(idle_t *s, rxq_src_t *srcs, int n) noexcept nogil:
    """Has a queue's wait fd changed since the epoll set was made? (A port class may
    drop a dead fd, e.g. a tap deleted under it, or swap in a new socket.)"""
    cdef int i
    if n != s.narmed:
        return True
    for i in range(n if n < IDLE_MAX_FDS else IDLE_MAX_FDS):
        if src_fd(&srcs[i]) != s.armed[i]:
            return True
    return False


cdef inline void rearm(idle_t *s, rxq_src_t *srcs, int n) noexcept nogil:
    """A fresh epoll set: the wake fd and every queue's current wait fd."""
    cdef epoll_event ev
    cdef int i, fd, gen = s.generation
    if s.epfd >= 0:
        close(s.epfd)
    s.epfd = epoll_create1(EPOLL_CLOEXEC)
    ev.events = EPOLLIN
    ev.data.fd = s.wakefd
    epoll_ctl(s.epfd, EPOLL_CTL_ADD, s.wakefd, &ev)
    for i in range(n):
        fd = src_fd(&srcs[i])
        if i < IDLE_MAX_FDS:
            s.armed[i] = fd
        if fd >= 0:
            ev.data.fd = fd
            epoll_ctl(s.epfd, EPOLL_CTL_ADD, fd, &ev)     # EEXIST (a shared fd): fine
    s.narmed = n
    s.epoll_generation = gen


cdef inline void idle_sleep(idle_t *s, rxq_src_t *srcs, int n, int *stop,
                            int *reload) noexcept nogil:
    """Notifications on, re-check, sleep until a kick, a wake or SLEEP_MS. Returns at once
    when work is pending or ``*stop``/``*reload`` is set.

    While ``sleeping`` is 1 the caller is at a quiescent point: control may free any queue
    of ``srcs`` then. So after waking this touches none of them: the caller turns
    notifications off again on queues it looks up afresh."""
    cdef epoll_event events[16]
    notify_all(srcs, n, True)
    if any_pending(srcs, n):
        return
    if s.epoll_generation != s.generation or fds_changed(s, srcs, n):
        rearm(s, srcs, n)
    s.sleeps += 1
    vh_store_release_int(&s.sleeping, 1)
    if not vh_load_acquire_int(stop) and (reload == NULL or not vh_load_acquire_int(reload)):
        epoll_wait(s.epfd, events, 16, SLEEP_MS)
    vh_store_release_int(&s.sleeping, 0)
    vh_fence_seq_cst()          # no ring may be read before control can see we are awake
    vh_eventfd_drain(s.wakefd)
