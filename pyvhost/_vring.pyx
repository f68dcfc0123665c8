# cython: language_level=3
"""Split and packed virtqueues, device side: the entry points of the compiled ring code and
``VirtQueue``, the ring's control object. What they call lives in header-only helpers
compiled into this module, one job each: _ring_core.pxd (the one dequeue and enqueue for
both layouts), _ring_split.pxd and _ring_packed.pxd (the per-layout parts), _ring_batch.pxd
(packed: four descriptors read at once), _ring_walk.pxd (reading descriptor chains, every
hostile-chain limit), _ring_copy.pxd (bytes and the virtio-net header), _ring_onecopy.pxd
(reads of another guest's memory), _ring_held.pxd (RX frames held over an IOTLB miss),
_ring_guard.pxd (the SIGBUS guard), _ring_index.pxd (index arithmetic shared with the
driver side, _driver). One-copy forwarding: vq_dequeue_ref copies only a frame's head and
keeps the rest as translated, bounds-checked segments of the guest's buffers (ext_t) until
vq_rx_complete returns them; vq_enqueue copies such a tail straight from the sender's
buffers (a fault there is the sender's), vq_materialize makes the frame whole for every
other use.

Every entry point that touches guest memory runs under the SIGBUS guard. Everything per
packet runs without the GIL. A ring is only touched with its ``lock`` held (the data path
try-locks around a burst; control code locks to change a ring). This module knows nothing
of sockets, messages or the vhost-user state machine: ``VirtQueue`` is told addresses, fds
and features by the backend.
"""

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy, memset

from pyvhost._memory cimport IotlbTable, MemTable, uva_to_host, uva_to_host_gpa
from pyvhost._pktpool cimport PacketPool, pkt_t, pktpool_t, pool_get, pool_put_many
from pyvhost._ring_copy cimport make_rarp
from pyvhost._ring_core cimport dequeue_chains, enqueue_chains, mark_used, ring_notify
from pyvhost._ring_guard cimport (
    VH_GUARD_ENTER, vh_bus_caught, vh_bus_install, vh_guard_leave, vh_guard_t, vq_fault,
)
from pyvhost._ring_held cimport drop_held, flush_held, hold_frames
from pyvhost._ring_onecopy cimport gather_try
from pyvhost._ring_packed cimport packed_avail, used_batch_t
from pyvhost._ring_split cimport log_used


def install_sigbus_guard():
    """(Re)install the SIGBUS handler of the ring guards; OSError if sigaction fails."""
    if vh_bus_install() != 0:
        raise OSError("cannot install the SIGBUS handler")


def sigbus_caught():
    """How many SIGBUS faults the guards caught in this process."""
    return vh_bus_caught


install_sigbus_guard()


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
    cdef used_batch_t ub
    cdef uint32_t k, n = vq.npend
    vq.npend = 0
    vq.nref = 0
    if n == 0 or not vq.ready:
        return                            # nothing taken, or the ring faulted meanwhile
    if VH_GUARD_ENTER(&g):
        vq_fault(vq)
        return
    ub.n = 0
    ub.nshadow = 0
    ub.head_slot = 0
    for k in range(n):
        mark_used(vq, &ub, vq.pend_id[k], vq.pend_slots[k], 0, False)
    ring_notify(vq, &ub)
    vh_guard_leave(&g)


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


cdef uint32_t vq_enqueue(vq_t *vq, pkt_t **pkts, uint32_t count,
                         uint32_t *taken) noexcept nogil:
    """Packets -> guest RX: returns how many of ``pkts`` were delivered (in order);
    ``*taken`` (NULL: not wanted) how many of the first ones are done with: delivered, held
    or dropped and counted. A frame dropped in the middle (too big for a buffer, a hostile
    buffer, a fault in its sender's memory) makes the two differ: the frames after
    ``*taken`` found no room and may be tried again.

    The caller keeps ownership of every packet. Frames not delivered for lack of guest
    buffers are counted in drop_no_buffer. With ACCESS_PLATFORM, frames that meet an IOTLB
    miss are copied and held (up to MAX_HELD, counted as delivered) and go into the ring
    once the front-end has mapped the buffer: a Linux guest maps every RX buffer afresh, so
    dropping them would lose the first frame after each mapping change.

    A fault in guest memory or the dirty log (SIGBUS) returns 0: nothing delivered."""
    cdef vh_guard_t g
    cdef uint32_t n, t = 0
    if taken == NULL:
        taken = &t
    taken[0] = 0
    if VH_GUARD_ENTER(&g):
        vq_fault(vq)
        taken[0] = count                     # the ring is gone: none will go
        return 0
    n = enqueue_guarded(vq, pkts, count, taken)
    vh_guard_leave(&g)
    return n


cdef uint32_t enqueue_guarded(vq_t *vq, pkt_t **pkts, uint32_t count,
                              uint32_t *taken) noexcept nogil:
    cdef uint32_t n
    if vq.iotlb == NULL:
        return enqueue_chains(vq, pkts, count, taken)
    if vq.nheld:
        flush_held(vq)
        if vq.nheld:
            taken[0] = count                         # held or counted as dropped
            return hold_frames(vq, pkts, count)     # in order, behind the held ones
    n = enqueue_chains(vq, pkts, count, taken)
    if taken[0] < count and vq.iotlb_miss and vq.enabled and not vq.broken:
        # the frames from the one that missed on: held (the frames before it that were
        # dropped in the ring stay dropped; none delivered is held again)
        n += hold_frames(vq, pkts + taken[0], count - taken[0])
        taken[0] = count
    return n




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
    def batched(self):
        """Packed: chains (TX) or buffers (RX) this ring took four at a time (_ring_batch)."""
        return self.vq.batched

    property batching:
        """Take packed descriptors four at a time where they form a batch (the default);
        False: always one at a time (tests compare the two)."""
        def __get__(self):
            return not self.vq.no_batch

        def __set__(self, bint on):
            self.vq.no_batch = not on

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
                     bint packed=False, int ofl_rx=0, int ofl_tx=0, bint in_order=False):
        if hdr_len not in (10, 12):
            raise ValueError("virtio-net header is 10 or 12 bytes")
        if self.vq.ready and (packed != self.vq.packed or hdr_len != self.vq.hdr_len or
                              mrg_rxbuf != self.vq.mrg_rxbuf or event_idx != self.vq.event_idx):
            raise ValueError("the ring layout cannot change while the ring runs")
        if packed and not self.vq.packed:
            self.vq.avail_wrap = 1          # a fresh packed ring starts at wrap 1
            self.vq.used_wrap = 1
        self.vq.packed = packed
        self.vq.in_order = in_order
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
        self.vq.in_order = 0
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
                sent = vq_enqueue(&dst.vq, pkts, n, NULL)
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
                sent = vq_enqueue(&self.vq, pkts, n, NULL)
                vh_unlock(&self.vq.lock)
            pool_put_many(pool.pool, pkts, n)
            total += sent
        return total
