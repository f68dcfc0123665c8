# Reading a guest's descriptor chains, split (walk_chain) and packed (walk_packed), into
# translated, bounds-checked host segments (iov_t), through the IOTLB when there is one.
# Every limit on a hostile chain lives here. Reads the descriptor ring and indirect tables;
# writes nothing of the guest's. Header-only: compiled into _vring.
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy

from pyvhost._memory cimport (
    IOTLB_PERM_RO, IOTLB_PERM_WO, gpa_to_host, iotlb_entry_t, iotlb_find, uva_to_host_gpa,
)
from pyvhost._vring cimport (
    MAX_IOV, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, iov_t,
    vh_eventfd_signal, vq_t, vring_desc_t, vring_packed_desc_t,
)


cdef enum:
    MAX_CHAIN_BYTES = 1 << 24      # a guest buffer chain larger than this is malformed
    MAX_BUFS_PER_PKT = 64
    MAX_INDIRECT_COPY = 1024       # (MAX_IOV * 16) an indirect table split across mappings is copied


cdef inline uint8_t *iotlb_translate(vq_t *vq, uint64_t iova, uint64_t *length, uint32_t perm,
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


cdef inline int read_table(vq_t *vq, uint64_t addr, uint32_t length, uint8_t *buf,
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


cdef inline int walk_chain(vq_t *vq, uint16_t head, bint writable, iov_t *iov, uint32_t *niov,
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


cdef inline int walk_packed(vq_t *vq, uint16_t idx, uint32_t room, bint writable, iov_t *iov,
                            uint32_t *niov, uint64_t *total, uint32_t *nslots,
                            uint16_t *buf_id) noexcept nogil:
    """Translate the chain starting in slot ``idx``. Returns 0; -1 when its contents are bad
    (``*nslots`` still says how many slots it spans, so it can be given back); -2 when its
    shape is (a chain running past ``room`` slots: longer than the ring, or on into slots
    taken and not given back yet, which the driver cannot have posted again): the ring
    cannot be trusted any more; -3 on an IOTLB miss (nothing may be consumed)."""
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
        if slots >= room:
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


cdef inline int add_segments(vq_t *vq, uint64_t addr, uint64_t length, iov_t *iov, uint32_t *n,
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
