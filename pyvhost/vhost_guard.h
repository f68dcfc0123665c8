/* The SIGBUS guard of the ring code (_ring_guard.pxd): a per-thread stack of sigjmp_bufs
   the handler jumps back to when guest memory faults. Only _vring includes it (its static
   state must exist once in the process). */
/* -- SIGBUS guard --------------------------------------------------------------------------
   A front-end's memory and dirty-log fds are sealed against shrinking when they allow it
   (pyvhost.memory). One that cannot be sealed (hugetlbfs, tmpfs files, a memfd created
   without MFD_ALLOW_SEALING) can be truncated under us: the next access to the lost pages
   raises SIGBUS. Every entry point of the ring code (_vring) that touches guest memory or the dirty
   log runs under a guard (a per-thread sigjmp_buf): the handler jumps back to the guard,
   which marks the ring broken and faulted and signals its faultfd; the control side then
   drops that front-end. A SIGBUS outside a guard goes to the previous handler (or the
   default action: the process dies, as it would have without us). */
#ifndef VHOST_GUARD_H
#define VHOST_GUARD_H
#include <stdint.h>
#include <setjmp.h>
#include <signal.h>
#include <string.h>
#include <pthread.h>

typedef struct vh_guard { sigjmp_buf jb; struct vh_guard *prev; } vh_guard_t;
static __thread vh_guard_t *vh_guard_top = NULL;
static struct sigaction vh_bus_prev;
static volatile sig_atomic_t vh_bus_chaining = 0;
static uint64_t vh_bus_caught = 0;

/* sigsetjmp must be called from the frame that stays live: a macro, not a function.
   No signal mask is saved (cheap); SA_NODEFER keeps SIGBUS unblocked in the handler. */
#define VH_GUARD_ENTER(g) ((g)->prev = vh_guard_top, vh_guard_top = (g), sigsetjmp((g)->jb, 0))
static inline void vh_guard_leave(vh_guard_t *g) { vh_guard_top = g->prev; }

static void vh_bus_handler(int sig, siginfo_t *si, void *uc)
{
    vh_guard_t *g = vh_guard_top;
    if (g != NULL) {
        vh_guard_top = g->prev;
        __atomic_fetch_add(&vh_bus_caught, 1, __ATOMIC_RELAXED);
        siglongjmp(g->jb, 1);
    }
    if (!vh_bus_chaining) {
        struct sigaction dfl;
        vh_bus_chaining = 1;
        memset(&dfl, 0, sizeof dfl);
        dfl.sa_handler = SIG_DFL;
        sigaction(SIGBUS, &dfl, NULL);
        if ((vh_bus_prev.sa_flags & SA_SIGINFO) && vh_bus_prev.sa_sigaction != NULL &&
                vh_bus_prev.sa_sigaction != vh_bus_handler)
            vh_bus_prev.sa_sigaction(sig, si, uc);        /* e.g. faulthandler */
        else if (!(vh_bus_prev.sa_flags & SA_SIGINFO) &&
                 vh_bus_prev.sa_handler != SIG_DFL && vh_bus_prev.sa_handler != SIG_IGN)
            vh_bus_prev.sa_handler(sig);
    }
    {
        struct sigaction dfl;
        memset(&dfl, 0, sizeof dfl);
        dfl.sa_handler = SIG_DFL;
        sigaction(SIGBUS, &dfl, NULL);
    }
    if (si == NULL || si->si_code <= 0)
        raise(sig);         /* sent, not a fault: returning would not re-raise it */
    /* a fault: returning re-runs the access under the default action (core dump) */
}

/* Install the handler unless it is installed; the one found is chained to. Called at
   import and whenever a ring gets memory or a log, so that a handler installed later
   (faulthandler.enable()) does not see our faults first. */
static int vh_bus_install(void)
{
    struct sigaction cur, sa;
    if (sigaction(SIGBUS, NULL, &cur) != 0) return -1;
    if ((cur.sa_flags & SA_SIGINFO) && cur.sa_sigaction == vh_bus_handler) return 0;
    vh_bus_prev = cur;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = vh_bus_handler;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    return sigaction(SIGBUS, &sa, NULL);
}

static inline void vh_bus_recovered(void)
{
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGBUS);
    pthread_sigmask(SIG_UNBLOCK, &set, NULL);   /* in case a chained handler blocked it */
}

static inline void vh_compiler_barrier(void) { __asm__ __volatile__("" ::: "memory"); }

static inline uint8_t vh_touch(const uint8_t *p) { return *(const volatile uint8_t *)p; }

#endif
