/* Memory-ordering helpers for the compiled data path (Cython cannot spell __atomic builtins).
 * Only barriers, atomic loads/stores, prefetch hints and the eventfd signal live here; all ring logic is in
 * the .pyx modules. */
#ifndef PYVHOST_VHOST_ATOMIC_H
#define PYVHOST_VHOST_ATOMIC_H
#include <stdint.h>
#include <unistd.h>
#include <sched.h>

static inline uint16_t vh_load_acquire_u16(const volatile uint16_t *p)
{ return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline uint16_t vh_load_relaxed_u16(const volatile uint16_t *p)
{ return __atomic_load_n(p, __ATOMIC_RELAXED); }
static inline void vh_store_release_u16(volatile uint16_t *p, uint16_t v)
{ __atomic_store_n(p, v, __ATOMIC_RELEASE); }
static inline void vh_store_relaxed_u16(volatile uint16_t *p, uint16_t v)
{ __atomic_store_n(p, v, __ATOMIC_RELAXED); }
static inline void vh_fence_seq_cst(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
static inline void vh_fence_acquire(void) { __atomic_thread_fence(__ATOMIC_ACQUIRE); }
static inline void vh_fence_release(void) { __atomic_thread_fence(__ATOMIC_RELEASE); }
/* a hint only: read p into the cache ahead of its use (never faults, even unmapped) */
static inline void vh_prefetch(const void *p) { __builtin_prefetch(p, 0, 3); }
/* for writing: the line comes in owned, so the store does not wait for another core to give
 * it up. GCC spells __builtin_prefetch(p, 1) as a read prefetch unless built for PRFCHW,
 * so PREFETCHW is spelled here, where the CPU says it has it (CPUID 0x80000001 ECX bit 8:
 * AMD since K8, Intel since Broadwell), checked once when the module is loaded. */
#if defined(__x86_64__)
#include <cpuid.h>
static int vh_has_prefetchw;
__attribute__((constructor)) static void vh_detect_prefetchw(void)
{
    unsigned int a, b, c, d;
    if (__get_cpuid(0x80000001, &a, &b, &c, &d))
        vh_has_prefetchw = (c >> 8) & 1;
}
#endif
static inline void vh_prefetch_w(const void *p)
{
#if defined(__x86_64__)
    if (vh_has_prefetchw) {
        __asm__ __volatile__("prefetchw (%0)" : : "r"(p));   /* no memory operand: a hint */
        return;
    }
#endif
    __builtin_prefetch(p, 1, 3);
}

static inline int vh_load_acquire_int(const volatile int *p)
{ return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline void vh_store_release_int(volatile int *p, int v)
{ __atomic_store_n(p, v, __ATOMIC_RELEASE); }
/* try-lock: 1 when taken */
static inline int vh_trylock(volatile int *p)
{ return __atomic_exchange_n(p, 1, __ATOMIC_ACQUIRE) == 0; }
static inline void vh_unlock(volatile int *p) { __atomic_store_n(p, 0, __ATOMIC_RELEASE); }
static inline void vh_lock(volatile int *p)
{
    while (!vh_trylock(p)) {
        while (__atomic_load_n(p, __ATOMIC_RELAXED)) sched_yield();
    }
}

/* eventfd signal: the value written is meaningless, any non-zero 8 bytes */
static inline int vh_eventfd_signal(int fd)
{
    uint64_t one = 1;
    if (fd < 0) return 0;
    return write(fd, &one, sizeof one) == (ssize_t)sizeof one ? 0 : -1;
}
static inline void vh_eventfd_drain(int fd)
{
    uint64_t v;
    if (fd >= 0) { ssize_t r = read(fd, &v, sizeof v); (void)r; }
}
/* dirty-page log for live migration: one bit per 4 KiB guest page, set with an atomic OR
 * (the front-end reads and clears the shared bitmap concurrently) */
static inline void vh_log_write(uint8_t *log, uint64_t log_size, uint64_t gpa, uint64_t len)
{
    uint64_t page, last;
    if (!log || !len) return;
    page = gpa >> 12;
    last = (gpa + len - 1) >> 12;
    for (; page <= last; page++) {
        if ((page >> 3) >= log_size) return;
        __atomic_fetch_or(&log[page >> 3], (uint8_t)(1u << (page & 7)), __ATOMIC_RELAXED);
    }
}
#endif
