# cython: language_level=3
"""Split and packed virtqueues, device side, compiled: descriptor-chain walking with limits, the burst
copy between guest buffers and packet-pool buffers, the virtio-net header, mergeable RX
buffers, used-ring updates with release ordering, and guest notification. One-copy
forwarding: vq_dequeue_ref copies only a frame's head and keeps the rest as translated,
bounds-checked segments of the guest's buffers (ext_t) until vq_rx_complete returns them;
vq_enqueue copies such a tail straight from the sender's buffers (a fault there is the
sender's), vq_materialize makes the frame whole for every other use.

Everything per packet runs without the GIL. A ring is only touched with its ``lock`` held
(the data path try-locks around a burst; control code locks to change a ring). This module
knows nothing of sockets, messages or the vhost-user state machine: ``VirtQueue`` is told
addresses, fds and features by the backend.
"""

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memmove, memset

from pyvhost._memory cimport (
    IOTLB_PERM_RO, IOTLB_PERM_RW, IOTLB_PERM_WO, IotlbTable, MemTable, gpa_to_host, iotlb_entry_t,
    iotlb_find, uva_to_host, uva_to_host_gpa,
)
from pyvhost._pktpool cimport PacketPool, pkt_t, pktpool_t, pool_get, pool_put, pool_put_many

# -- SIGBUS guard --------------------------------------------------------------------------
# A front-end's memory and dirty-log fds are sealed against shrinking when they allow it
# (pyvhost.memory). One that cannot be sealed (hugetlbfs, tmpfs files, a memfd created
# without MFD_ALLOW_SEALING) can be truncated under us: the next access to the lost pages
# raises SIGBUS. Every entry point of this module that touches guest memory or the dirty
# log runs under a guard (a per-thread sigjmp_buf): the handler jumps back to the guard,
# which marks the ring broken and faulted and signals its faultfd; the control side then
# drops that front-end. A SIGBUS outside a guard goes to the previous handler (or the
# default action: the process dies, as it would have without us).
cdef extern from *:
    """
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
    """
    ctypedef struct vh_guard_t:
        pass
    int VH_GUARD_ENTER(vh_guard_t *g) nogil
    void vh_guard_leave(vh_guard_t *g) nogil
    int vh_bus_install() nogil
    void vh_bus_recovered() nogil
    void vh_compiler_barrier() nogil
    uint64_t vh_bus_caught

cdef extern from *:
    """
    static inline uint8_t vh_touch(const uint8_t *p) { return *(const volatile uint8_t *)p; }
    """
    uint8_t vh_touch(const uint8_t *p) nogil


cdef void vq_fault(vq_t *vq) noexcept nogil:
    """Guest memory under ``vq`` faulted: keep the data path out until control resets it."""
    vh_bus_recovered()
    vh_store_release_int(&vq.ready, 0)
    vq.broken = 1
    vq.st.faults += 1
    if vq.faultfd >= 0:
        vh_eventfd_signal(vq.faultfd)


def install_sigbus_guard():
    """(Re)install the SIGBUS handler of the ring guards; OSError if sigaction fails."""
    if vh_bus_install() != 0:
        raise OSError("cannot install the SIGBUS handler")


def sigbus_caught():
    """How many SIGBUS faults the guards caught in this process."""
    return vh_bus_caught


install_sigbus_guard()


cdef enum:
    MAX_CHAIN_BYTES = 1 << 24      # a guest buffer chain larger than this is malformed
    MAX_BUFS_PER_PKT = 64
    MAX_INDIRECT_COPY = MAX_IOV * 16   # an indirect table split across mappings is copied


cdef inline bint need_event(uint16_t event, uint16_t new, uint16_t old) noexcept nogil:
    return <uint16_t>(new - event - 1) < <uint16_t>(new - old)


cdef uint8_t *iotlb_translate(vq_t *vq, uint64_t iova, uint64_t *length, uint32_t perm,
                              uint64_t *gpa) noexcept nogil:
    """IOVA -> front-end VA (IOTLB) -> host (memory table); ``*length`` cut to what is
    contiguous. A miss is recorded (and the control side woken) once; NULL either way."""
    cdef const iotlb_entry_t *e = iotlb_find(vq.iotlb, iova)
    if e == NULL:
        if not vq.iotlb_miss:
            vq.miss_iova = iova
            vq.miss_perm = perm
            vq.iotlb_miss = 1
            vq.st.iotlb_misses += 1
            if vq.missfd >= 0:
                vh_eventfd_signal(vq.missfd)
        return NULL
    if e.perm & perm != perm:
        return NULL                       # the guest did not grant this access
    if length[0] == 0 or length[0] - 1 > e.last - iova:
        length[0] = e.last - iova + 1
    return uva_to_host_gpa(vq.mem, e.uva + (iova - e.iova), length, gpa)


cdef inline uint8_t *vq_translate(vq_t *vq, uint64_t addr, uint64_t *length, uint32_t perm,
                                  uint64_t *gpa) noexcept nogil:
    """A descriptor address to a host pointer; ``*gpa`` is its guest-physical address (for
    dirty logging). Without ACCESS_PLATFORM addresses are GPAs: one predictable branch."""
    if vq.iotlb == NULL:
        gpa[0] = addr
        return gpa_to_host(vq.mem, addr, length)
    return iotlb_translate(vq, addr, length, perm, gpa)


cdef int read_table(vq_t *vq, uint64_t addr, uint32_t length, uint8_t *buf,
                    const uint8_t **out) noexcept nogil:
    """An indirect descriptor table: in place when contiguous in our memory, else (IOVAs
    mapped page by page) gathered into ``buf`` (MAX_INDIRECT_COPY bytes). 0, -1 (unmapped,
    too big) or -3 (IOTLB miss)."""
    cdef uint64_t chunk = length, done = 0, gpa
    cdef uint8_t *p = vq_translate(vq, addr, &chunk, IOTLB_PERM_RO, &gpa)
    if p == NULL:
        return -3 if vq.iotlb_miss else -1
    if chunk >= length:
        out[0] = p
        return 0
    if length > MAX_INDIRECT_COPY or vq.iotlb == NULL:
        return -1       # without an IOMMU a table must lie in one region (a known limit)
    while True:
        memcpy(buf + done, p, chunk)
        done += chunk
        if done >= length:
            break
        chunk = length - done
        p = vq_translate(vq, addr + done, &chunk, IOTLB_PERM_RO, &gpa)
        if p == NULL:
            return -3 if vq.iotlb_miss else -1
    out[0] = buf
    return 0


cdef int walk_chain(vq_t *vq, uint16_t head, bint writable, iov_t *iov, uint32_t *niov,
                    uint64_t *total) noexcept nogil:
    """Translate the chain at ``head`` into host segments appended at iov[*niov].

    Returns 0, or -1 for a malformed chain: index out of range, a loop (more descriptors
    than the table holds), nested or misformed indirect table, wrong direction, an address
    in no region, too many segments or too many bytes; -3 for an IOTLB miss (nothing may
    be consumed: the burst stops until the front-end maps it)."""
    cdef const vring_desc_t *table = vq.desc
    cdef uint32_t table_size = vq.size
    cdef uint32_t idx = head
    cdef uint32_t seen = 0
    cdef uint32_t n = niov[0]
    cdef bint in_indirect = False
    cdef vring_desc_t d
    cdef uint64_t addr, left, chunk, tot = 0, gpa
    cdef uint8_t *p
    cdef const uint8_t *tp
    cdef uint8_t tbuf[MAX_INDIRECT_COPY]
    cdef uint32_t perm = IOTLB_PERM_WO if writable else IOTLB_PERM_RO
    cdef int rc
    while True:
        if idx >= table_size or seen >= table_size:
            return -1
        seen += 1
        memcpy(&d, &table[idx], sizeof(vring_desc_t))   # read guest memory once
        if d.flags & VRING_DESC_F_INDIRECT:
            if in_indirect or not vq.indirect or d.flags & VRING_DESC_F_NEXT:
                return -1
            if d.len == 0 or d.len % sizeof(vring_desc_t) or d.len > 32768 * sizeof(vring_desc_t):
                return -1
            rc = read_table(vq, d.addr, d.len, tbuf, &tp)
            if rc < 0:
                return rc
            table = <const vring_desc_t *>tp
            table_size = d.len // sizeof(vring_desc_t)
            idx = 0
            seen = 0
            in_indirect = True
            continue
        if (d.flags & VRING_DESC_F_WRITE != 0) != writable:
            return -1
        tot += d.len
        if tot > MAX_CHAIN_BYTES:
            return -1
        addr = d.addr
        left = d.len
        while left:
            if n >= MAX_IOV:
                return -1
            chunk = left
            p = vq_translate(vq, addr, &chunk, perm, &gpa)
            if p == NULL:
                return -3 if vq.iotlb_miss else -1
            iov[n].base = p
            iov[n].len = chunk
            iov[n].gpa = gpa
            n += 1
            addr += chunk
            left -= chunk
        if not d.flags & VRING_DESC_F_NEXT:
            break
        idx = d.next
    niov[0] = n
    total[0] = tot
    return 0


cdef inline void log_used(vq_t *vq, uint64_t offset, uint64_t length) noexcept nogil:
    """Dirty-log a write at ``offset`` into the split used ring (VHOST_VRING_F_LOG)."""
    if vq.log_all and vq.log_used:
        vh_log_write(vq.log, vq.log_size, vq.log_used_gpa + offset, length)


cdef inline void log_iovs(vq_t *vq, const iov_t *iov, uint32_t niov,
                          uint64_t written) noexcept nogil:
    """Dirty-log the guest pages of the first ``written`` bytes of ``iov``."""
    cdef uint32_t j
    cdef uint64_t n
    if not vq.log_all:
        return
    for j in range(niov):
        if written == 0:
            break
        n = iov[j].len if iov[j].len < written else written
        vh_log_write(vq.log, vq.log_size, iov[j].gpa, n)
        written -= n


cdef inline void put_used(vq_t *vq, uint32_t head, uint32_t length) noexcept nogil:
    cdef uint32_t slot = vq.last_used_idx & (vq.size - 1)
    cdef vring_used_elem_t *e = &vq.used_ring[slot]
    e.id = head
    e.len = length
    log_used(vq, 4 + 8 * <uint64_t>slot, 8)
    vq.last_used_idx += 1


cdef void notify_guest(vq_t *vq) noexcept nogil:
    """Publish the used index and signal the call fd unless the guest suppressed it."""
    cdef uint16_t old, ev
    cdef bint fire
    vh_store_release_u16(&vq.used[1], vq.last_used_idx)
    log_used(vq, 2, 2)
    vh_fence_seq_cst()   # the used idx store before reading the guest's suppression state
    if vq.event_idx:
        old = vq.signalled_used
        ev = vh_load_relaxed_u16(&vq.avail[2 + vq.size])
        fire = need_event(ev, vq.last_used_idx, old) or not vq.signalled_used_valid
        vq.signalled_used = vq.last_used_idx
        vq.signalled_used_valid = 1
    else:
        fire = not (vh_load_relaxed_u16(&vq.avail[0]) & VRING_AVAIL_F_NO_INTERRUPT)
    if fire and vq.callfd >= 0:
        if vh_eventfd_signal(vq.callfd) == 0:
            vq.st.calls += 1
        else:
            vq.st.call_errors += 1


cdef inline int avail_count(vq_t *vq, uint16_t *avail_idx) noexcept nogil:
    """Entries the guest has made available, or -1 (ring broken) if more than the ring holds."""
    cdef uint16_t idx = vh_load_acquire_u16(&vq.avail[1])
    cdef uint16_t count = idx - vq.last_avail_idx
    if count > vq.size:
        vq.broken = 1
        vq.st.ring_errors += 1
        return -1
    avail_idx[0] = idx
    return count


cdef inline void copy_out(const iov_t *iov, uint32_t niov, uint64_t total, uint32_t hdr,
                          pkt_t *pkt) noexcept nogil:
    """The virtio-net header into pkt.vnet_hdr, the rest (the frame) into pkt.data."""
    cdef uint64_t skip = 0, take
    cdef uint8_t *dst = pkt.data
    cdef uint32_t j
    for j in range(niov):
        take = iov[j].len
        if skip < hdr:
            if take > hdr - skip:
                take = hdr - skip
            memcpy(&pkt.vnet_hdr[skip], iov[j].base, take)
            skip += take
            if take < iov[j].len:
                memcpy(dst, iov[j].base + take, iov[j].len - take)
                dst += iov[j].len - take
        else:
            memcpy(dst, iov[j].base, take)
            dst += take
    pkt.len = <uint32_t>(total - hdr)


cdef inline uint16_t rd_le16(const uint8_t *p) noexcept nogil:
    return p[0] | (<uint16_t>p[1] << 8)


cdef bint tx_header_ok(vq_t *vq, pkt_t *p) noexcept nogil:
    """Check the header a guest sent with a frame against what it negotiated; never trust
    it blindly (it decides where the switch writes a checksum)."""
    cdef uint8_t flags = p.vnet_hdr[0], gso = p.vnet_hdr[1] & ~VNET_HDR_GSO_ECN
    cdef uint32_t start, offset
    p.vnet_hdr[0] = flags & VNET_HDR_F_NEEDS_CSUM        # DATA_VALID etc. mean nothing here
    if vq.hdr_len < 12:
        p.vnet_hdr[10] = 0
        p.vnet_hdr[11] = 0
    if flags & VNET_HDR_F_NEEDS_CSUM:
        start = rd_le16(p.vnet_hdr + 6)
        offset = rd_le16(p.vnet_hdr + 8)
        if not vq.ofl_tx & OFL_CSUM or start + offset + 2 > p.len + p.ext_len:
            return False
    if gso == VNET_HDR_GSO_NONE:
        p.vnet_hdr[1] = 0
        return True
    if gso == VNET_HDR_GSO_TCPV4 and vq.ofl_tx & OFL_TSO4 or \
            gso == VNET_HDR_GSO_TCPV6 and vq.ofl_tx & OFL_TSO6:
        return rd_le16(p.vnet_hdr + 4) > 0 and flags & VNET_HDR_F_NEEDS_CSUM
    return False


cdef inline void copy_head(vq_t *vq, const iov_t *iov, uint32_t niov, uint64_t total,
                           uint32_t hdr, pkt_t *pkt) noexcept nogil:
    """One-copy receive: the virtio-net header into pkt.vnet_hdr, the frame's first
    ONECOPY_HEAD bytes into pkt.data (all a decision may read), the rest left where it is:
    its (already translated) segments recorded in an ext_t at the tail of pkt's buffer."""
    cdef ext_t *e = <ext_t *>((<size_t>(pkt.data + pkt.cap - sizeof(ext_t))) & ~(<size_t>7))
    cdef uint64_t pos = 0, take, left
    cdef uint64_t head_end = hdr + ONECOPY_HEAD
    cdef const uint8_t *b
    cdef uint32_t j
    e.src = vq
    e.nseg = 0
    for j in range(niov):
        b = iov[j].base
        left = iov[j].len
        if pos < hdr:
            take = left if left < hdr - pos else hdr - pos
            memcpy(&pkt.vnet_hdr[pos], b, take)
            b += take
            left -= take
            pos += take
        if left and pos < head_end:
            take = left if left < head_end - pos else head_end - pos
            memcpy(pkt.data + (pos - hdr), b, take)
            b += take
            left -= take
            pos += take
        if left:
            e.seg[e.nseg].base = <uint8_t *>b
            e.seg[e.nseg].len = left
            e.seg[e.nseg].gpa = 0
            e.nseg += 1
            pos += left
    pkt.len = ONECOPY_HEAD
    pkt.ext_len = <uint32_t>(total - hdr - ONECOPY_HEAD)
    pkt.ext = e


cdef inline int receive_chain(vq_t *vq, pktpool_t *pool, const iov_t *iov, uint32_t niov,
                              uint64_t total, bint bad, pkt_t **pkts,
                              uint32_t *nout, bint ref) noexcept nogil:
    """One guest TX chain (split or packed) into a packet appended to ``pkts``, or counted
    as dropped. -1 when no packet buffer is free: the chain must stay in the ring. ``ref``:
    a frame longer than ONECOPY_HEAD keeps its tail in guest memory (copy_head)."""
    cdef uint32_t hdr = vq.hdr_len
    cdef pkt_t *pkt
    if bad or total < hdr:
        vq.st.drop_bad_desc += 1
    elif not vq.enabled:
        vq.st.drop_disabled += 1
    elif total - hdr > pool.buf_size:
        vq.st.drop_oversize += 1
    else:
        pkt = pool_get(pool)
        if pkt == NULL:
            vq.st.drop_no_mbuf += 1
            return -1
        pkts[nout[0]] = pkt
        vq.dq_taken += 1                # a fault in the copy gives it back (vq_dequeue)
        vh_compiler_barrier()
        if ref and total - hdr > ONECOPY_HEAD and \
                pkt.cap >= ONECOPY_HEAD + sizeof(ext_t) + 8:
            copy_head(vq, iov, niov, total, hdr, pkt)
        else:
            copy_out(iov, niov, total, hdr, pkt)
        if tx_header_ok(vq, pkt):
            nout[0] += 1
            vq.st.bytes += pkt.len + pkt.ext_len
            if pkt.ext_len:
                vq.nref += 1
        else:
            vq.st.drop_bad_hdr += 1
            vq.dq_taken -= 1
            pool_put(pool, pkt)
    return 0


cdef uint32_t vq_dequeue(vq_t *vq, pktpool_t *pool, pkt_t **pkts, uint32_t count) noexcept nogil:
    """Guest TX -> packets: up to ``count`` frames copied out of the guest's buffers.
    A fault in guest memory (SIGBUS) gives back every packet taken and returns 0."""
    return dequeue_guarded(vq, pool, pkts, count, False)


cdef uint32_t vq_dequeue_ref(vq_t *vq, pktpool_t *pool, pkt_t **pkts,
                            uint32_t count) noexcept nogil:
    """vq_dequeue for one-copy forwarding: a frame longer than ONECOPY_HEAD has only its
    head copied, the rest stays in the guest's buffers (pkt.ext, see copy_head), and no
    chain of the burst goes back to the guest until vq_rx_complete, which the caller must
    call, with the ring still locked, before anything may change the guest's memory; the
    frames' tails are read (vq_materialize, vq_enqueue) only until then. ``vq.nref``: the
    frames of the burst that kept their tails."""
    vq.npend = 0
    vq.nref = 0
    return dequeue_guarded(vq, pool, pkts, count, True)


cdef uint32_t dequeue_guarded(vq_t *vq, pktpool_t *pool, pkt_t **pkts, uint32_t count,
                              bint ref) noexcept nogil:
    cdef vh_guard_t g
    cdef uint32_t n
    if not vq.ready or vq.broken or vq.iotlb_miss:
        return 0
    vq.dq_taken = 0
    if VH_GUARD_ENTER(&g):
        pool_put_many(pool, pkts, vq.dq_taken)
        vq.dq_taken = 0
        vq.npend = 0
        vq.nref = 0
        vq_fault(vq)
        return 0
    n = dequeue_core(vq, pool, pkts, count, ref)
    vh_guard_leave(&g)
    return n


cdef void vq_rx_complete(vq_t *vq) noexcept nogil:
    """The chains a vq_dequeue_ref burst took go back to the guest (in the order taken, as
    vq_dequeue returns them) and the guest is notified as vq_dequeue would have."""
    cdef vh_guard_t g
    cdef uint32_t k, n = vq.npend
    vq.npend = 0
    vq.nref = 0
    if n == 0 or not vq.ready:
        return                            # nothing taken, or the ring faulted meanwhile
    if VH_GUARD_ENTER(&g):
        vq_fault(vq)
        return
    for k in range(n):
        mark_used(vq, vq.pend_id[k], vq.pend_slots[k], 0, False)
    ring_notify(vq, n)
    vh_guard_leave(&g)


cdef int gather_try(uint8_t *dst, const iov_t *seg, uint32_t nseg) noexcept nogil:
    """Copy the sender's segments to ``dst`` (ours); -1 when the sender's memory faulted."""
    cdef vh_guard_t g
    cdef uint32_t j
    if VH_GUARD_ENTER(&g):
        return -1
    for j in range(nseg):
        memcpy(dst, seg[j].base, seg[j].len)
        dst += seg[j].len
    vh_guard_leave(&g)
    return 0


cdef int vq_materialize(pkt_t *p) noexcept nogil:
    """A frame of vq_dequeue_ref whole into its packet buffer, as vq_dequeue would have
    left it: 0, or -1 when the sender's guest memory faulted (its ring is marked faulted,
    the frame keeps only its head: drop it)."""
    cdef ext_t *e = <ext_t *>p.ext
    cdef iov_t seg[MAX_IOV]
    cdef uint32_t nseg
    cdef vq_t *src
    if p.ext_len == 0:
        return 0
    src = e.src
    nseg = e.nseg
    memcpy(seg, e.seg, nseg * sizeof(iov_t))    # the frame may grow over the ext_t
    p.ext = NULL
    if gather_try(p.data + p.len, seg, nseg) < 0:
        p.ext_len = 0
        vq_fault(src)
        return -1
    p.len += p.ext_len
    p.ext_len = 0
    return 0


cdef int probe_src(const ext_t *e) noexcept nogil:
    """Read a byte of every page of the sender's segments: -1 when that memory faults."""
    cdef vh_guard_t g
    cdef uint32_t j
    cdef uint64_t o
    if VH_GUARD_ENTER(&g):
        return -1
    for j in range(e.nseg):
        o = 0
        while o < e.seg[j].len:
            vh_touch(e.seg[j].base + o)
            o += 4096
        vh_touch(e.seg[j].base + e.seg[j].len - 1)
    vh_guard_leave(&g)
    return 0


cdef int fill_ext_try(iov_t *iov, uint32_t *i_iov, uint64_t *off,
                      const ext_t *e) noexcept nogil:
    cdef vh_guard_t g
    cdef uint32_t j
    if VH_GUARD_ENTER(&g):
        return -1
    for j in range(e.nseg):
        fill_iovs(iov, i_iov, off, e.seg[j].base, e.seg[j].len)
    vh_guard_leave(&g)
    return 0


cdef int fill_ext(iov_t *iov, uint32_t *i_iov, uint64_t *off, const pkt_t *p) noexcept nogil:
    """One-copy: a frame's tail from the sender's guest memory into this guest's buffers.
    0; -1 when the sender's memory faulted (its ring is marked faulted, the frame is lost).
    A fault in this guest's memory is retried outside the inner guard, so the caller's
    guard marks this ring faulted, as for a frame from a packet buffer."""
    cdef const ext_t *e = <const ext_t *>p.ext
    cdef uint32_t i0 = i_iov[0], j
    cdef uint64_t o0 = off[0]
    if fill_ext_try(iov, i_iov, off, e) == 0:
        return 0
    if probe_src(e) < 0:
        vq_fault(e.src)
        return -1
    i_iov[0] = i0
    off[0] = o0
    for j in range(e.nseg):
        fill_iovs(iov, i_iov, off, e.seg[j].base, e.seg[j].len)
    return 0


cdef uint32_t dequeue_core(vq_t *vq, pktpool_t *pool, pkt_t **pkts, uint32_t count,
                           bint ref) noexcept nogil:
    cdef uint32_t lead = 0
    if vq.rarp_pending and vq.enabled and count:
        pkts[0] = pool_get(pool)
        if pkts[0] != NULL:
            vq.dq_taken = 1
            make_rarp(pkts[0], vq.rarp_mac)
            vq.rarp_pending = 0
            lead = 1
    return lead + dequeue_chains(vq, pool, pkts + lead, count - lead, ref)


cdef void make_rarp(pkt_t *p, const uint8_t *mac) noexcept nogil:
    """The RARP request a migrated guest's new location announces itself with."""
    cdef uint8_t *d = p.data
    memset(d, 0, 60)
    memset(d, 0xFF, 6)
    memcpy(d + 6, mac, 6)
    d[12] = 0x80                                  # ethertype RARP 0x8035
    d[13] = 0x35
    d[15] = 1                                     # htype Ethernet
    d[16] = 0x08                                  # ptype IPv4
    d[18] = 6                                     # hlen
    d[19] = 4                                     # plen
    d[21] = 3                                     # op: reverse request
    memcpy(d + 22, mac, 6)                        # sender MAC
    memcpy(d + 32, mac, 6)                        # target MAC
    memset(p.vnet_hdr, 0, 12)
    p.len = 60


cdef inline void fill_iovs(iov_t *iov, uint32_t *i_iov, uint64_t *off, const uint8_t *src,
                           uint64_t length) noexcept nogil:
    cdef uint64_t take
    while length:
        take = iov[i_iov[0]].len - off[0]
        if take > length:
            take = length
        memcpy(iov[i_iov[0]].base + off[0], src, take)
        src += take
        length -= take
        off[0] += take
        if off[0] == iov[i_iov[0]].len:
            i_iov[0] += 1
            off[0] = 0


cdef uint32_t vq_enqueue(vq_t *vq, pkt_t **pkts, uint32_t count) noexcept nogil:
    """Packets -> guest RX: returns how many of ``pkts`` were delivered (in order).

    The caller keeps ownership of every packet. Frames not delivered for lack of guest
    buffers are counted in drop_no_buffer. With ACCESS_PLATFORM, frames that meet an IOTLB
    miss are copied and held (up to MAX_HELD, counted as delivered) and go into the ring
    once the front-end has mapped the buffer: a Linux guest maps every RX buffer afresh, so
    dropping them would lose the first frame after each mapping change.

    A fault in guest memory or the dirty log (SIGBUS) returns 0: nothing delivered."""
    cdef vh_guard_t g
    cdef uint32_t n
    if VH_GUARD_ENTER(&g):
        vq_fault(vq)
        return 0
    n = enqueue_guarded(vq, pkts, count)
    vh_guard_leave(&g)
    return n


cdef uint32_t enqueue_guarded(vq_t *vq, pkt_t **pkts, uint32_t count) noexcept nogil:
    cdef uint32_t n
    if vq.iotlb == NULL:
        return enqueue_core(vq, pkts, count)
    if vq.nheld:
        flush_held(vq)
        if vq.nheld:
            return hold_frames(vq, pkts, count)     # in order, behind the held ones
    n = enqueue_core(vq, pkts, count)
    if n < count and vq.iotlb_miss and vq.enabled and not vq.broken:
        n += hold_frames(vq, pkts + n, count - n)
    return n


cdef inline uint32_t enqueue_core(vq_t *vq, pkt_t **pkts, uint32_t count) noexcept nogil:
    return enqueue_chains(vq, pkts, count)


cdef uint32_t hold_frames(vq_t *vq, pkt_t **pkts, uint32_t count) noexcept nogil:
    """Copy up to MAX_HELD - nheld frames aside; the rest are drop_no_buffer."""
    cdef uint32_t i, n = 0
    cdef pkt_t *h
    cdef uint8_t *copy
    cdef uint32_t length
    cdef const ext_t *e
    for i in range(count):
        if vq.nheld >= MAX_HELD:
            break
        length = pkts[i].len + pkts[i].ext_len
        copy = <uint8_t *>malloc(length if length else 1)
        if copy == NULL:
            break
        memcpy(copy, pkts[i].data, pkts[i].len)
        if pkts[i].ext_len:
            e = <const ext_t *>pkts[i].ext
            if gather_try(copy + pkts[i].len, e.seg, e.nseg) < 0:
                vq_fault(e.src)             # the sender's memory: this frame is lost
                free(copy)
                continue
        h = &vq.held[vq.nheld]
        memcpy(h, pkts[i], sizeof(pkt_t))
        h.buf = copy
        h.data = copy
        h.len = length
        h.cap = length
        h.ext_len = 0
        h.ext = NULL
        vq.nheld += 1
        n += 1
    vq.st.drop_no_buffer += count - n
    return n


cdef void flush_held(vq_t *vq) noexcept nogil:
    """Deliver held frames (in order) as far as the ring and the IOTLB allow."""
    cdef pkt_t *ptrs[MAX_HELD]
    cdef uint32_t i, n, missed_before = vq.st.drop_no_buffer
    for i in range(vq.nheld):
        ptrs[i] = &vq.held[i]
    n = enqueue_core(vq, ptrs, vq.nheld)
    if vq.iotlb_miss or not vq.ready:
        vq.st.drop_no_buffer = missed_before      # still held, not dropped
    else:
        n = vq.nheld                              # delivered or counted as dropped
    for i in range(n):
        free(vq.held[i].buf)
    memmove(&vq.held[0], &vq.held[n], (vq.nheld - n) * sizeof(pkt_t))
    vq.nheld -= n


cdef void drop_held(vq_t *vq) noexcept nogil:
    cdef uint32_t i
    for i in range(vq.nheld):
        free(vq.held[i].buf)
    vq.nheld = 0


cdef inline void fill_header(uint8_t *hdr, vq_t *vq, uint32_t nbufs, pkt_t *pkt) noexcept nogil:
    """The RX header: the frame's offload state where this guest agreed to take it."""
    cdef uint8_t gso = pkt.vnet_hdr[1]
    memset(hdr, 0, 12)
    if pkt.vnet_hdr[0] & VNET_HDR_F_NEEDS_CSUM and vq.ofl_rx & OFL_CSUM:
        memcpy(hdr, pkt.vnet_hdr, 10)
        if not (gso == VNET_HDR_GSO_TCPV4 and vq.ofl_rx & OFL_TSO4 or
                gso == VNET_HDR_GSO_TCPV6 and vq.ofl_rx & OFL_TSO6):
            hdr[1] = 0                       # no (acceptable) GSO: a plain partial checksum
            hdr[2] = hdr[3] = hdr[4] = hdr[5] = 0
    if vq.hdr_len == 12:
        hdr[10] = <uint8_t>(nbufs & 0xff)
        hdr[11] = <uint8_t>(nbufs >> 8)


# -- packed virtqueues -------------------------------------------------------------------

cdef inline bint packed_avail(vq_t *vq, uint16_t idx, uint8_t wrap) noexcept nogil:
    """Is the descriptor at ``idx`` available to us under avail wrap counter ``wrap``?"""
    cdef uint16_t flags = vh_load_acquire_u16(&vq.pdesc[idx].flags)
    cdef uint8_t avail = (flags & VRING_PACKED_DESC_F_AVAIL) != 0
    cdef uint8_t used = (flags & VRING_PACKED_DESC_F_USED) != 0
    return avail == wrap and used != wrap


cdef inline void packed_advance(uint16_t *idx, uint8_t *wrap, uint32_t n,
                                uint32_t size) noexcept nogil:
    cdef uint32_t i = idx[0] + n
    if i >= size:
        i -= size
        wrap[0] ^= 1
    idx[0] = <uint16_t>i


cdef int walk_packed(vq_t *vq, uint16_t idx, bint writable, iov_t *iov, uint32_t *niov,
                     uint64_t *total, uint32_t *nslots, uint16_t *buf_id) noexcept nogil:
    """Translate the chain starting in slot ``idx``. Returns 0; -1 when its contents are bad
    (``*nslots`` still says how many slots it spans, so it can be given back); -2 when its
    shape is (a chain longer than the ring): the ring cannot be trusted any more; -3 on an
    IOTLB miss (nothing may be consumed)."""
    cdef uint32_t slots = 0, n = niov[0], i, k, count
    cdef vring_packed_desc_t d
    cdef uint16_t ring_flags
    cdef const vring_packed_desc_t *table
    cdef uint64_t tot = 0
    cdef const uint8_t *tp
    cdef uint8_t tbuf[MAX_INDIRECT_COPY]
    cdef int rc
    cdef bint bad = False
    while True:
        if slots >= vq.size:
            return -2
        i = idx + slots
        if i >= vq.size:
            i -= vq.size
        memcpy(&d, &vq.pdesc[i], sizeof(vring_packed_desc_t))
        slots += 1
        buf_id[0] = d.id
        ring_flags = d.flags
        if d.flags & VRING_DESC_F_INDIRECT:
            rc = -1
            if not bad and vq.indirect and d.len and d.len % sizeof(vring_packed_desc_t) == 0 \
                    and d.len <= 32768 * sizeof(vring_packed_desc_t) and \
                    not d.flags & VRING_DESC_F_NEXT:
                rc = read_table(vq, d.addr, d.len, tbuf, &tp)
            if rc == -3:
                return -3
            if rc < 0:
                bad = True
            else:
                table = <const vring_packed_desc_t *>tp
                count = d.len // sizeof(vring_packed_desc_t)
                for k in range(count):
                    memcpy(&d, &table[k], sizeof(vring_packed_desc_t))
                    if d.flags & VRING_DESC_F_INDIRECT or \
                            (d.flags & VRING_DESC_F_WRITE != 0) != writable:
                        bad = True
                        break
                    rc = add_segments(vq, d.addr, d.len, iov, &n, &tot, writable)
                    if rc == -3:
                        return -3
                    if rc < 0:
                        bad = True
                        break
            if not ring_flags & VRING_DESC_F_NEXT:       # the ring slot's flag, not the table's
                break
            continue
        if not bad:
            if (d.flags & VRING_DESC_F_WRITE != 0) != writable:
                bad = True
            else:
                rc = add_segments(vq, d.addr, d.len, iov, &n, &tot, writable)
                if rc == -3:
                    return -3
                if rc < 0:
                    bad = True
        if not d.flags & VRING_DESC_F_NEXT:
            break
    nslots[0] = slots
    if bad:
        return -1
    niov[0] = n
    total[0] = tot
    return 0


cdef int add_segments(vq_t *vq, uint64_t addr, uint64_t length, iov_t *iov, uint32_t *n,
                      uint64_t *tot, bint writable) noexcept nogil:
    """Append the host segments of [addr, addr+length) to iov; -1 if unmapped or too many,
    -3 on an IOTLB miss."""
    cdef uint64_t chunk, gpa
    cdef uint8_t *p
    tot[0] += length
    if tot[0] > MAX_CHAIN_BYTES:
        return -1
    while length:
        if n[0] >= MAX_IOV:
            return -1
        chunk = length
        p = vq_translate(vq, addr, &chunk, IOTLB_PERM_WO if writable else IOTLB_PERM_RO, &gpa)
        if p == NULL:
            return -3 if vq.iotlb_miss else -1
        iov[n[0]].base = p
        iov[n[0]].len = chunk
        iov[n[0]].gpa = gpa
        n[0] += 1
        addr += chunk
        length -= chunk
    return 0


cdef inline void put_used_packed(vq_t *vq, uint16_t buf_id, uint32_t length, uint32_t nslots,
                                 bint written) noexcept nogil:
    cdef vring_packed_desc_t *d = &vq.pdesc[vq.last_used_idx]
    cdef uint16_t flags = (VRING_PACKED_DESC_F_AVAIL | VRING_PACKED_DESC_F_USED) \
        if vq.used_wrap else 0
    if written:
        flags |= VRING_DESC_F_WRITE
    d.id = buf_id
    d.len = length
    vh_store_release_u16(&d.flags, flags)
    if vq.log_all:
        vh_log_write(vq.log, vq.log_size, vq.desc_gpa + 16 * <uint64_t>vq.last_used_idx, 16)
    packed_advance(&vq.last_used_idx, &vq.used_wrap, nslots, vq.size)


cdef void notify_guest_packed(vq_t *vq) noexcept nogil:
    """Signal the call fd unless the driver's event-suppression area says not to."""
    cdef uint16_t old = vq.signalled_used, new = vq.last_used_idx, flags, off_wrap, off
    cdef bint fire
    vh_fence_seq_cst()
    flags = vh_load_relaxed_u16(&vq.avail[1])
    if flags != RING_EVENT_FLAGS_DESC or not vq.event_idx:
        fire = flags != RING_EVENT_FLAGS_DISABLE
    else:
        off_wrap = vh_load_relaxed_u16(&vq.avail[0])
        off = off_wrap & 0x7FFF
        if new <= old:
            old -= vq.size
        if vq.used_wrap != off_wrap >> 15:
            off -= vq.size
        fire = need_event(off, new, old) or not vq.signalled_used_valid
    vq.signalled_used = new
    vq.signalled_used_valid = 1
    if fire and vq.callfd >= 0:
        if vh_eventfd_signal(vq.callfd) == 0:
            vq.st.calls += 1
        else:
            vq.st.call_errors += 1


# -- one ring core: split and packed through the same dequeue and enqueue ------------------
# The two layouts differ only in how the next available chain is found and read, how a used
# element is written and how the guest is told; everything else (counters, limits, the
# copy, the header, logging) is the core's, so a fault is counted the same on both.

cdef enum:
    CHAIN_OK = 0
    CHAIN_BAD = -1          # a hostile chain: it is consumed (given back untouched) and dropped
    CHAIN_BROKEN = -2       # the ring's own structure is bad (head index, endless chain)
    CHAIN_MISS = -3         # an IOTLB miss: nothing may be consumed
    CHAIN_NONE = -4         # nothing (more) available


cdef struct cursor_t:
    # where the next available chain is: split, the free-running avail index and the guest's
    # avail idx read once per burst; packed, the slot and its wrap counter
    uint16_t idx
    uint16_t avail_idx
    uint8_t wrap


cdef struct chain_t:
    uint16_t id             # split: the head index; packed: the buffer id
    uint16_t nslots         # packed: the ring slots the chain spans; split: 1
    uint64_t total          # bytes of its buffers


cdef inline int ring_begin(vq_t *vq, cursor_t *cur) noexcept nogil:
    """A cursor at the next available chain; -1 when the ring proves broken (split: an
    avail idx more than a ring ahead, counted in ring_errors)."""
    cur.idx = vq.last_avail_idx
    cur.wrap = vq.avail_wrap
    if vq.packed:
        return 0
    return -1 if avail_count(vq, &cur.avail_idx) < 0 else 0


cdef inline void ring_commit(vq_t *vq, const cursor_t *cur) noexcept nogil:
    """The chains up to ``cur`` are consumed."""
    vq.last_avail_idx = cur.idx
    vq.avail_wrap = cur.wrap


cdef inline bint ring_has_chain(vq_t *vq, const cursor_t *cur) noexcept nogil:
    if vq.packed:
        return packed_avail(vq, cur.idx, cur.wrap)
    return cur.avail_idx != cur.idx


cdef inline int next_chain(vq_t *vq, cursor_t *cur, bint writable, iov_t *iov,
                           uint32_t *niov, chain_t *ch) noexcept nogil:
    """Read the chain at ``cur`` into iov[*niov..] and step ``cur`` past it: CHAIN_OK,
    CHAIN_BAD (``ch`` still names it, so it can be given back), or CHAIN_BROKEN,
    CHAIN_MISS, CHAIN_NONE (``cur`` is then not to be committed)."""
    cdef uint32_t nslots = 1
    cdef uint16_t head
    cdef int rc
    ch.total = 0
    if not ring_has_chain(vq, cur):
        return CHAIN_NONE
    if vq.packed:
        rc = walk_packed(vq, cur.idx, writable, iov, niov, &ch.total, &nslots, &ch.id)
        if rc == -2:
            return CHAIN_BROKEN
        if rc == -3:
            return CHAIN_MISS
        packed_advance(&cur.idx, &cur.wrap, nslots, vq.size)
    else:
        head = vh_load_relaxed_u16(&vq.avail[2 + (cur.idx & (vq.size - 1))])
        if head >= vq.size:
            return CHAIN_BROKEN
        rc = walk_chain(vq, head, writable, iov, niov, &ch.total)
        if rc == -3:
            return CHAIN_MISS
        ch.id = head
        cur.idx += 1
    ch.nslots = <uint16_t>nslots
    return CHAIN_BAD if rc < 0 else CHAIN_OK


cdef inline void ring_broken(vq_t *vq) noexcept nogil:
    """The ring cannot be trusted any more: control resets it."""
    vq.broken = 1
    vq.st.ring_errors += 1


cdef inline void mark_used(vq_t *vq, uint16_t id, uint16_t nslots, uint32_t length,
                           bint written) noexcept nogil:
    if vq.packed:
        put_used_packed(vq, id, length, nslots, written)
    else:
        put_used(vq, id, length)


cdef inline void ring_notify(vq_t *vq, uint32_t nused) noexcept nogil:
    """Publish the ``nused`` used elements just written (our own count: never the used
    index in guest memory, which the guest can write) and notify unless suppressed."""
    if nused == 0:
        return
    if vq.packed:
        notify_guest_packed(vq)
    else:
        notify_guest(vq)


cdef uint32_t dequeue_chains(vq_t *vq, pktpool_t *pool, pkt_t **pkts, uint32_t count,
                             bint ref) noexcept nogil:
    """Guest TX chains into packets, split or packed. An empty ring is not a burst."""
    cdef cursor_t cur
    cdef chain_t ch
    cdef uint32_t i, nout = 0, niov, nused = 0
    cdef iov_t iov[MAX_IOV]
    cdef int rc
    if ring_begin(vq, &cur) < 0 or not ring_has_chain(vq, &cur):
        return 0
    for i in range(count):
        niov = 0
        rc = next_chain(vq, &cur, False, iov, &niov, &ch)
        if rc == CHAIN_NONE or rc == CHAIN_MISS:
            break                           # a miss: not mapped yet, stays in the ring
        if rc == CHAIN_BROKEN:
            ring_broken(vq)
            break
        if receive_chain(vq, pool, iov, niov, ch.total, rc < 0, pkts, &nout, ref) < 0:
            break                           # no packet buffer: it stays in the ring
        if ref:
            vq.pend_id[vq.npend] = ch.id      # back to the guest in vq_rx_complete
            vq.pend_slots[vq.npend] = ch.nslots
            vq.npend += 1
        else:
            mark_used(vq, ch.id, ch.nslots, 0, False)
            nused += 1
        ring_commit(vq, &cur)
    ring_notify(vq, nused)
    vq.st.packets += nout
    vq.st.bursts += 1
    return nout


cdef uint32_t enqueue_chains(vq_t *vq, pkt_t **pkts, uint32_t count) noexcept nogil:
    """Packets into guest RX buffers, split or packed, mergeable or not."""
    cdef cursor_t cur, nxt
    cdef chain_t chains[MAX_BUFS_PER_PKT]
    cdef uint32_t i = 0, b, nbufs, niov, i_iov, nsent = 0, nused = 0
    cdef uint64_t need, cap, total, off, w
    cdef iov_t iov[MAX_IOV]
    cdef uint8_t hdr[12]
    cdef pkt_t *pkt
    cdef bint miss = False
    cdef int rc
    if not vq.ready:
        return 0
    if not vq.enabled:
        vq.st.drop_disabled += count
        return 0
    if vq.iotlb_miss:                     # waiting for the front-end to map a buffer
        return 0                          # (vq_enqueue holds or counts them)
    if vq.broken or ring_begin(vq, &cur) < 0:
        vq.st.drop_no_buffer += count     # a broken ring has no usable buffers
        return 0
    while i < count:
        pkt = pkts[i]
        need = vq.hdr_len + pkt.len + pkt.ext_len
        nbufs = niov = 0
        cap = 0
        rc = CHAIN_OK
        nxt = cur
        while cap < need and nbufs < MAX_BUFS_PER_PKT:
            rc = next_chain(vq, &nxt, True, iov, &niov, &chains[nbufs])
            if rc == CHAIN_NONE or rc == CHAIN_MISS or rc == CHAIN_BROKEN:
                break
            nbufs += 1
            if rc == CHAIN_BAD:
                break
            cap += chains[nbufs - 1].total
            if not vq.mrg_rxbuf:
                break
        if rc == CHAIN_MISS:
            miss = True
            break                           # not mapped yet: nothing consumed
        if rc == CHAIN_BROKEN:
            ring_broken(vq)                 # one ring error; the frames left: drop_no_buffer
            break
        if rc == CHAIN_BAD:
            # a hostile buffer: give back what this frame took, untouched, and drop it
            vq.st.drop_bad_desc += 1
            for b in range(nbufs):
                mark_used(vq, chains[b].id, chains[b].nslots, 0, True)
            nused += nbufs
            cur = nxt
            ring_commit(vq, &cur)
            i += 1
            continue
        if cap < need:
            if nbufs and not vq.mrg_rxbuf:
                vq.st.drop_oversize += 1    # the guest's buffer is too small for it
                i += 1
                continue
            break                           # out of buffers: the rest are not delivered
        fill_header(hdr, vq, nbufs, pkt)
        i_iov = 0
        off = 0
        fill_iovs(iov, &i_iov, &off, hdr, vq.hdr_len)
        fill_iovs(iov, &i_iov, &off, pkt.data, pkt.len)
        if pkt.ext_len and fill_ext(iov, &i_iov, &off, pkt) < 0:
            i += 1                          # the sender's memory faulted: the frame is
            continue                        # lost, the buffers stay the guest's
        log_iovs(vq, iov, niov, need)
        w = need
        for b in range(nbufs):
            total = chains[b].total if chains[b].total < w else w
            mark_used(vq, chains[b].id, chains[b].nslots, <uint32_t>total, True)
            w -= total
        nused += nbufs
        cur = nxt
        ring_commit(vq, &cur)
        vq.st.bytes += pkt.len + pkt.ext_len
        if pkt.ext_len:
            vq.onecopy += 1
        nsent += 1
        i += 1
    if i < count and not miss:
        vq.st.drop_no_buffer += count - i
    ring_notify(vq, nused)
    vq.st.packets += nsent
    vq.st.bursts += 1
    return nsent


cdef void vq_set_notify(vq_t *vq, bint on) noexcept nogil:
    """Ask the guest to kick (on) or not to bother (off) when it adds buffers."""
    cdef vh_guard_t g
    if not vq.ready:
        return
    if VH_GUARD_ENTER(&g):
        vq_fault(vq)
        return
    set_notify_core(vq, on)
    vh_guard_leave(&g)


cdef void set_notify_core(vq_t *vq, bint on) noexcept nogil:
    if vq.packed:
        vh_store_relaxed_u16(&vq.used[1],
                             RING_EVENT_FLAGS_ENABLE if on else RING_EVENT_FLAGS_DISABLE)
        log_used(vq, 2, 2)                   # the device area is the "used" address
    elif vq.event_idx:
        if on:
            vh_store_relaxed_u16(&vq.used[2 + 4 * vq.size], vq.last_avail_idx)
            log_used(vq, 4 + 8 * <uint64_t>vq.size, 2)
    else:
        vh_store_relaxed_u16(&vq.used[0], 0 if on else VRING_USED_F_NO_NOTIFY)
        log_used(vq, 0, 2)
    vh_fence_seq_cst()


cdef bint vq_pending(vq_t *vq) noexcept nogil:
    """True when the guest has made buffers available that we have not consumed."""
    cdef vh_guard_t g
    cdef bint r
    if not vq.ready or vq.broken or vq.iotlb_miss:
        return False                      # a miss: the IOTLB update wakes the poll threads
    if VH_GUARD_ENTER(&g):
        vq_fault(vq)
        return False
    if vq.packed:
        r = packed_avail(vq, vq.last_avail_idx, vq.avail_wrap)
    else:
        r = vh_load_acquire_u16(&vq.avail[1]) != vq.last_avail_idx
    vh_guard_leave(&g)
    return r


cdef uint32_t flush_held_guarded(vq_t *vq) noexcept nogil:
    """flush_held for the control side; returns the frames still held."""
    cdef vh_guard_t g
    if VH_GUARD_ENTER(&g):
        vq_fault(vq)
        return vq.nheld
    flush_held(vq)
    vh_guard_leave(&g)
    return vq.nheld


cdef int read_used_idx(vq_t *vq, uint16_t *idx) noexcept nogil:
    """The used index in guest memory; -1 (ring faulted) when the memory is gone."""
    cdef vh_guard_t g
    if VH_GUARD_ENTER(&g):
        vq_fault(vq)
        return -1
    idx[0] = vh_load_acquire_u16(&vq.used[1])
    vh_guard_leave(&g)
    return 0


OFFLOAD_BITS = {"csum": OFL_CSUM, "tso4": OFL_TSO4, "tso6": OFL_TSO6}



cdef class VirtQueue:
    """One split virtqueue, device side. Control methods require ``lock()`` to be held."""

    def __cinit__(self, int index):
        memset(&self.vq, 0, sizeof(vq_t))
        self.index = index
        self.vq.kickfd = -1
        self.vq.callfd = -1
        self.vq.missfd = -1
        self.vq.faultfd = -1

    def __dealloc__(self):
        drop_held(&self.vq)

    # -- locking (control side) -------------------------------------------------------
    def lock(self):
        with nogil:
            vh_lock(&self.vq.lock)

    def unlock(self):
        vh_unlock(&self.vq.lock)

    def __enter__(self):
        self.lock()
        return self

    def __exit__(self, *exc):
        self.unlock()

    # -- configuration (lock held) ----------------------------------------------------
    def set_memory(self, MemTable mem):
        """A new memory table: the ring addresses are translated again by ``start``."""
        if mem is not None:
            install_sigbus_guard()
        self.mem = mem
        self.vq.mem = mem.table if mem is not None else NULL
        self.vq.ready = 0

    def set_iotlb(self, IotlbTable table):
        """ACCESS_PLATFORM: descriptor addresses go through ``table`` (None: they are GPAs).
        A new table clears a recorded miss, so the next burst tries again."""
        self.iotlb = table
        self.vq.iotlb = &table.t if table is not None else NULL
        self.vq.iotlb_miss = 0
        if table is None:
            drop_held(&self.vq)

    def wait_iotlb(self, uint64_t iova, uint32_t perm):
        """The ring addresses missed (the ring is stopped): record it like a data-path miss,
        so RX frames are held until the update restarts the ring."""
        self.vq.miss_iova = iova
        self.vq.miss_perm = perm
        self.vq.iotlb_miss = 1

    def flush_held(self):
        """Deliver RX frames held across an IOTLB miss; returns how many are still held."""
        if self.vq.nheld and self.vq.iotlb != NULL:
            with nogil:
                flush_held_guarded(&self.vq)
        return self.vq.nheld

    def drop_held(self):
        drop_held(&self.vq)

    def take_miss(self):
        """(iova, perm) of the translation the data path is waiting for, or None."""
        if self.vq.iotlb_miss:
            return self.vq.miss_iova, self.vq.miss_perm
        return None

    property missfd:
        """An eventfd signalled when the data path records a new IOTLB miss (-1: none)."""
        def __get__(self):
            return self.vq.missfd

        def __set__(self, int fd):
            self.vq.missfd = fd

    property faultfd:
        """An eventfd signalled when guest memory or the dirty log faulted (SIGBUS: the
        front-end truncated an fd it handed over); -1: none."""
        def __get__(self):
            return self.vq.faultfd

        def __set__(self, int fd):
            self.vq.faultfd = fd

    @property
    def faults(self):
        """Guest-memory faults caught on this ring since its last reset."""
        return self.vq.st.faults

    def set_size(self, uint32_t size):
        if size == 0 or size > 32768 or (size & (size - 1) and not self.vq.packed):
            raise ValueError(f"ring size {size} is not a power of 2 in 1..32768")
        self.vq.size = size
        self.vq.ready = 0

    def set_addresses(self, uint64_t desc, uint64_t used, uint64_t avail):
        self.desc_uva = desc
        self.used_uva = used
        self.avail_uva = avail
        self.vq.ready = 0

    def set_features(self, *, bint event_idx, bint indirect, bint mrg_rxbuf, int hdr_len,
                     bint packed=False, int ofl_rx=0, int ofl_tx=0):
        if hdr_len not in (10, 12):
            raise ValueError("virtio-net header is 10 or 12 bytes")
        if self.vq.ready and (packed != self.vq.packed or hdr_len != self.vq.hdr_len or
                              mrg_rxbuf != self.vq.mrg_rxbuf or event_idx != self.vq.event_idx):
            raise ValueError("the ring layout cannot change while the ring runs")
        if packed and not self.vq.packed:
            self.vq.avail_wrap = 1          # a fresh packed ring starts at wrap 1
            self.vq.used_wrap = 1
        self.vq.packed = packed
        self.vq.ofl_rx = ofl_rx
        self.vq.ofl_tx = ofl_tx
        self.vq.event_idx = event_idx
        self.vq.indirect = indirect
        self.vq.mrg_rxbuf = mrg_rxbuf
        self.vq.hdr_len = hdr_len

    property base:
        """SET/GET_VRING_BASE: split, the next avail index; packed, avail index (bits 0-14),
        avail wrap (15), used index (16-30), used wrap (31)."""
        def __get__(self):
            cdef uint32_t v = self.vq.last_avail_idx
            if self.vq.packed:
                v |= (<uint32_t>self.vq.avail_wrap) << 15
                v |= (<uint32_t>self.vq.last_used_idx) << 16
                v |= (<uint32_t>self.vq.used_wrap) << 31
            return v

        def __set__(self, uint32_t value):
            self.vq.ready = 0           # a new position takes effect through start()
            if self.vq.packed:
                # we use buffers in order, so used equals avail whenever a ring stops;
                # some front-ends (DPDK's) send only the avail half
                self.vq.last_avail_idx = value & 0x7FFF
                self.vq.avail_wrap = (value >> 15) & 1
                self.vq.last_used_idx = self.vq.last_avail_idx
                self.vq.used_wrap = self.vq.avail_wrap
            else:
                self.vq.last_avail_idx = value & 0xFFFF
                self.vq.last_used_idx = value & 0xFFFF
            self.vq.signalled_used_valid = 0

    property enabled:
        def __get__(self):
            return bool(self.vq.enabled)

        def __set__(self, bint value):
            self.vq.enabled = value

    property kickfd:
        def __get__(self):
            return self.vq.kickfd

        def __set__(self, int fd):
            self.vq.kickfd = fd

    property callfd:
        def __get__(self):
            return self.vq.callfd

        def __set__(self, int fd):
            self.vq.callfd = fd

    @property
    def size(self):
        return self.vq.size

    @property
    def ready(self):
        return bool(self.vq.ready)

    @property
    def broken(self):
        return bool(self.vq.broken)

    def start(self, uvas=None):
        """Translate the ring addresses and let the data path in; ValueError says why not.

        ``uvas``: the (desc, used, avail) front-end addresses when the ring addresses were
        IOVAs already translated through the IOTLB by the caller.
        Returns a warning string when the used index in guest memory disagreed with the
        base we were given (after a reconnect) and was taken instead, else None."""
        cdef uint64_t n = self.vq.size
        cdef uint64_t desc_uva = self.desc_uva, used_uva = self.used_uva
        cdef uint64_t avail_uva = self.avail_uva
        cdef uint8_t *desc
        cdef uint8_t *avail
        cdef uint8_t *used
        cdef uint16_t used_idx
        cdef uint64_t gpa_len
        self.vq.ready = 0
        if self.mem is None:
            raise ValueError("no memory table")
        if n == 0:
            raise ValueError("ring size not set")
        if n & (n - 1) and not self.vq.packed:
            raise ValueError(f"split ring size {n} is not a power of 2")
        if uvas is not None:
            desc_uva, used_uva, avail_uva = uvas
        desc = uva_to_host(self.vq.mem, desc_uva, 16 * n)
        if self.vq.packed:          # the two event-suppression areas
            avail = uva_to_host(self.vq.mem, avail_uva, 4)
            used = uva_to_host(self.vq.mem, used_uva, 4)
        else:
            avail = uva_to_host(self.vq.mem, avail_uva, 6 + 2 * n)
            used = uva_to_host(self.vq.mem, used_uva, 6 + 8 * n)
        if desc == NULL or avail == NULL or used == NULL:
            raise ValueError(f"ring addresses desc={desc_uva:#x} avail={avail_uva:#x} "
                             f"used={used_uva:#x} are not inside guest memory")
        if (<uint64_t>desc) % 16 or (<uint64_t>avail) % 2 or (<uint64_t>used) % 4:
            raise ValueError("ring addresses are misaligned")
        if self.vq.packed and (self.vq.last_avail_idx >= n or self.vq.last_used_idx >= n):
            raise ValueError("packed ring base beyond the ring size")
        gpa_len = 16 * n
        if uva_to_host_gpa(self.vq.mem, desc_uva, &gpa_len, &self.vq.desc_gpa) == NULL:
            self.vq.desc_gpa = 0
        self.vq.desc = <vring_desc_t *>desc
        self.vq.pdesc = <vring_packed_desc_t *>desc
        self.vq.avail = <uint16_t *>avail
        self.vq.used = <uint16_t *>used
        self.vq.used_ring = <vring_used_elem_t *>(used + 4)
        self.vq.broken = 0
        self.vq.signalled_used_valid = 0
        warning = None
        if read_used_idx(&self.vq, &used_idx) < 0:
            raise ValueError("guest memory under the ring is gone (SIGBUS: a truncated fd)")
        if not self.vq.packed and used_idx != self.vq.last_used_idx:
            warning = (f"used idx {used_idx} in guest memory differs from base "
                       f"{self.vq.last_used_idx}; resuming from the used idx")
            self.vq.last_used_idx = used_idx
            self.vq.last_avail_idx = used_idx
        vh_store_release_int(&self.vq.ready, 1)
        return warning

    def stop(self):
        """Keep the data path out (GET_VRING_BASE, reset, disconnect)."""
        self.vq.ready = 0

    def reset_layout(self):
        """Back to a fresh split ring at index 0 (a new connection negotiates again)."""
        self.vq.ready = 0
        self.vq.packed = 0
        self.vq.avail_wrap = 1
        self.vq.used_wrap = 1
        self.vq.last_avail_idx = 0
        self.vq.last_used_idx = 0
        self.vq.signalled_used_valid = 0
        self.vq.broken = 0
        self.vq.rarp_pending = 0
        self.vq.st.faults = 0

    def set_log(self, uint64_t addr, uint64_t size):
        """The dirty-page bitmap (host address, bytes); 0 for none."""
        if addr:
            install_sigbus_guard()
        self.vq.log = <uint8_t *>addr
        self.vq.log_size = size if addr else 0

    def set_log_flags(self, *, bint log_all, bint log_used, uint64_t log_used_gpa=0):
        self.vq.log_all = log_all
        self.vq.log_used = log_used
        self.vq.log_used_gpa = log_used_gpa

    def inject_rarp(self, bytes mac):
        """SEND_RARP: a RARP request from ``mac`` heads the next burst taken from this ring."""
        if len(mac) != 6:
            raise ValueError("a MAC address is 6 bytes")
        memcpy(self.vq.rarp_mac, <const char *>mac, 6)
        self.vq.rarp_pending = 1

    def stats(self):
        """Every counter of the ring: vq_stats_t as a dict named by its own fields."""
        cdef vq_stats_t snapshot = self.vq.st
        return snapshot

    # -- data path for Python callers (the Python device API and tests) ---------------
    def set_notify(self, bint on):
        with nogil:
            vh_lock(&self.vq.lock)
            vq_set_notify(&self.vq, on)
            vh_unlock(&self.vq.lock)

    def pending(self):
        cdef bint r
        with nogil:
            vh_lock(&self.vq.lock)
            r = vq_pending(&self.vq)
            vh_unlock(&self.vq.lock)
        return r

    def drain_kick(self):
        with nogil:
            vh_lock(&self.vq.lock)
            vh_eventfd_drain(self.vq.kickfd)
            vh_unlock(&self.vq.lock)

    def recv_burst(self, PacketPool pool, uint32_t max_packets=MAX_BURST):
        """Dequeue up to ``max_packets`` frames the guest sent; a list of bytes."""
        cdef pkt_t *pkts[MAX_BURST]
        cdef uint32_t n, i
        if max_packets > MAX_BURST:
            max_packets = MAX_BURST
        with nogil:
            vh_lock(&self.vq.lock)
            n = vq_dequeue(&self.vq, pool.pool, pkts, max_packets)
            vh_unlock(&self.vq.lock)
        out = [(<char *>pkts[i].data)[:pkts[i].len] for i in range(n)]
        pool_put_many(pool.pool, pkts, n)
        return out

    def recv_burst_ref(self, PacketPool pool, uint32_t max_packets=MAX_BURST):
        """recv_burst through the one-copy receive (vq_dequeue_ref, vq_materialize,
        vq_rx_complete), for tests: a list of bytes; a frame whose tail could not be
        read (the guest's memory faulted) is left out."""
        cdef pkt_t *pkts[MAX_BURST]
        cdef uint32_t n, i
        cdef int ok[MAX_BURST]
        if max_packets > MAX_BURST:
            max_packets = MAX_BURST
        with nogil:
            vh_lock(&self.vq.lock)
            n = vq_dequeue_ref(&self.vq, pool.pool, pkts, max_packets)
            for i in range(n):
                ok[i] = vq_materialize(pkts[i]) == 0
            vq_rx_complete(&self.vq)
            vh_unlock(&self.vq.lock)
        out = [(<char *>pkts[i].data)[:pkts[i].len] for i in range(n) if ok[i]]
        pool_put_many(pool.pool, pkts, n)
        return out

    def forward_burst(self, PacketPool pool, VirtQueue dst, uint32_t max_packets=MAX_BURST):
        """One-copy forwarding without a switch, for tests: up to ``max_packets`` frames
        from this (TX) ring straight into ``dst`` (an RX ring); (taken, delivered)."""
        cdef pkt_t *pkts[MAX_BURST]
        cdef uint32_t n, sent = 0
        if max_packets > MAX_BURST:
            max_packets = MAX_BURST
        if dst is self:
            raise ValueError("a ring cannot forward into itself")
        with nogil:
            vh_lock(&self.vq.lock)
            n = vq_dequeue_ref(&self.vq, pool.pool, pkts, max_packets)
            if n:
                vh_lock(&dst.vq.lock)
                sent = vq_enqueue(&dst.vq, pkts, n)
                vh_unlock(&dst.vq.lock)
            vq_rx_complete(&self.vq)
            vh_unlock(&self.vq.lock)
        pool_put_many(pool.pool, pkts, n)
        return n, sent

    def send_burst(self, PacketPool pool, frames):
        """Enqueue frames (bytes-like) to the guest; returns how many were delivered."""
        cdef pkt_t *pkts[MAX_BURST]
        cdef uint32_t n = 0, sent, total = 0, oversize, no_mbuf
        cdef const uint8_t[::1] view
        frames = list(frames)
        while frames:
            n = 0
            oversize = 0
            no_mbuf = 0
            try:
                for frame in frames[:MAX_BURST]:
                    if frame is None:
                        raise TypeError("a frame must be bytes-like, not None")
                    view = frame
                    if view.shape[0] > pool.pool.buf_size:
                        oversize += 1
                        continue
                    pkts[n] = pool_get(pool.pool)
                    if pkts[n] == NULL:
                        no_mbuf += 1
                        continue
                    if view.shape[0]:
                        memcpy(pkts[n].data, &view[0], view.shape[0])
                    pkts[n].len = view.shape[0]
                    n += 1
            except BaseException:
                pool_put_many(pool.pool, pkts, n)   # not bytes-like: give the buffers back
                raise
            del frames[:MAX_BURST]
            # every batch goes to the ring, which counts what it cannot deliver
            with nogil:
                vh_lock(&self.vq.lock)
                self.vq.st.drop_oversize += oversize
                self.vq.st.drop_no_mbuf += no_mbuf
                sent = vq_enqueue(&self.vq, pkts, n)
                vh_unlock(&self.vq.lock)
            pool_put_many(pool.pool, pkts, n)
            total += sent
        return total
