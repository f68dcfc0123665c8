# cython: language_level=3
"""Checksum and TCP segmentation offloads in software, for frames whose sender left them to
the device (VIRTIO_NET_F_CSUM, HOST_TSO4/6) going to a guest that did not agree to take
them as they are (GUEST_CSUM, GUEST_TSO4/6). Frames the receiver can take pass through
with their virtio-net header (the enqueue copies it). Compiled, without the GIL; it knows
rings only through vq_enqueue.
"""

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy

from pyvhost._pktpool cimport PacketPool, pkt_t, pktpool_t, pool_get, pool_put, pool_put_many
from pyvhost._vring cimport (
    OFL_CSUM, OFL_TSO4, OFL_TSO6, VNET_HDR_F_NEEDS_CSUM, VNET_HDR_GSO_ECN, VNET_HDR_GSO_NONE,
    VNET_HDR_GSO_TCPV4, VNET_HDR_GSO_TCPV6, vq_enqueue, vq_materialize, vq_t,
)

cdef inline uint16_t rd16(const uint8_t *p) noexcept nogil:
    return (<uint16_t>p[0] << 8) | p[1]


cdef inline void wr16(uint8_t *p, uint16_t v) noexcept nogil:
    p[0] = v >> 8
    p[1] = v & 0xFF


cdef inline uint16_t le16(const uint8_t *p) noexcept nogil:
    return p[0] | (<uint16_t>p[1] << 8)


cdef uint16_t ENDIAN_PROBE = 1
cdef bint LITTLE_ENDIAN = (<uint8_t *>&ENDIAN_PROBE)[0] == 1


cdef uint64_t csum_add(const uint8_t *p, uint32_t n, uint64_t sum) noexcept nogil:
    """``sum`` plus the 16-bit big-endian words of ``p[:n]`` (an odd last byte is a high
    byte). The words are summed 4 bytes at a time in the CPU's byte order (a one's-
    complement sum of byte-swapped words is the byte-swapped sum), folded, then swapped
    once on a little-endian CPU: a few ns for a frame's headers."""
    cdef uint64_t acc = 0
    cdef uint32_t w, i = 0
    cdef uint16_t h
    while i + 16 <= n:
        memcpy(&w, p + i, 4)
        acc += w
        memcpy(&w, p + i + 4, 4)
        acc += w
        memcpy(&w, p + i + 8, 4)
        acc += w
        memcpy(&w, p + i + 12, 4)
        acc += w
        i += 16
    while i + 4 <= n:
        memcpy(&w, p + i, 4)
        acc += w
        i += 4
    if i + 2 <= n:
        h = p[i] | (<uint16_t>p[i + 1] << 8)
        acc += h
        i += 2
    if i < n:
        acc += p[i] if LITTLE_ENDIAN else <uint32_t>p[i] << 8   # a word's high byte
    while acc >> 16:
        acc = (acc & 0xFFFF) + (acc >> 16)
    if LITTLE_ENDIAN:
        acc = ((acc & 0xFF) << 8) | (acc >> 8)
    return sum + acc


cdef inline uint16_t csum_fold(uint64_t sum) noexcept nogil:
    while sum >> 16:
        sum = (sum & 0xFFFF) + (sum >> 16)
    return <uint16_t>sum


cdef bint csum_complete(pkt_t *p) noexcept nogil:
    """NEEDS_CSUM: the one's-complement sum from csum_start to the end (the field already
    holds the pseudo-header sum) stored at csum_start + csum_offset."""
    cdef uint32_t start = le16(p.vnet_hdr + 6), off = le16(p.vnet_hdr + 8)
    cdef uint16_t c
    if start + off + 2 > p.len:
        return False
    c = ~csum_fold(csum_add(p.data + start, p.len - start, 0)) & 0xFFFF
    wr16(p.data + start + off, c)
    p.vnet_hdr[0] &= ~VNET_HDR_F_NEEDS_CSUM
    return True


cdef bint tso_parse(pkt_t *p, tso_t *t) noexcept nogil:
    cdef uint8_t gso = p.vnet_hdr[1] & ~VNET_HDR_GSO_ECN
    cdef uint8_t *d = p.data
    cdef uint32_t l4
    t.mss = le16(p.vnet_hdr + 4)
    t.l2 = 14
    if p.len < 18 or t.mss == 0:
        return False
    if rd16(d + 12) == 0x8100:
        t.l2 = 18
    t.v6 = gso == VNET_HDR_GSO_TCPV6
    if gso == VNET_HDR_GSO_TCPV4:
        if p.len < t.l2 + 20 or d[t.l2] >> 4 != 4 or d[t.l2 + 9] != 6:
            return False
        t.l3 = (d[t.l2] & 0x0F) * 4
        t.ip_id = rd16(d + t.l2 + 4)
    elif t.v6:
        if p.len < t.l2 + 40 or d[t.l2] >> 4 != 6 or d[t.l2 + 6] != 6:
            return False
        t.l3 = 40
    else:
        return False
    if t.l3 < 20 or p.len < t.l2 + t.l3 + 20:
        return False
    l4 = (d[t.l2 + t.l3 + 12] >> 4) * 4
    t.hlen = t.l2 + t.l3 + l4
    if l4 < 20 or p.len < t.hlen:
        return False
    t.payload = p.len - t.hlen
    t.seq = (<uint32_t>rd16(d + t.l2 + t.l3 + 4) << 16) | rd16(d + t.l2 + t.l3 + 6)
    t.flags = d[t.l2 + t.l3 + 13]
    return True


cdef uint32_t tso_segment(pkt_t *p, const tso_t *t, uint32_t first, pktpool_t *pool,
                          pkt_t **out) noexcept nogil:
    """Segments ``first`` .. ``first + MAX_SEGS - 1`` of the super-frame (each at most mss
    payload bytes, IP and TCP headers fixed, checksums computed) into ``out``. Returns how
    many (0 when out of buffers or past the end)."""
    cdef uint32_t n = 0, off = first * t.mss, seg, tcp_len
    cdef uint64_t sum
    cdef uint8_t *h
    cdef pkt_t *s
    while n < MAX_SEGS and (off < t.payload or (t.payload == 0 and off == 0 and n == 0)):
        seg = t.payload - off if t.payload - off < t.mss else t.mss
        s = pool_get(pool)
        if s == NULL or t.hlen + seg > s.cap:
            if s != NULL:
                pool_put(pool, s)
            pool_put_many(pool, out, n)
            return 0
        memcpy(s.data, p.data, t.hlen)
        memcpy(s.data + t.hlen, p.data + t.hlen + off, seg)
        s.len = t.hlen + seg
        h = s.data + t.l2
        tcp_len = t.hlen - t.l2 - t.l3 + seg
        if not t.v6:
            wr16(h + 2, t.l3 + tcp_len)
            wr16(h + 4, <uint16_t>(t.ip_id + first + n))
            wr16(h + 10, 0)
            wr16(h + 10, ~csum_fold(csum_add(h, t.l3, 0)) & 0xFFFF)
            sum = csum_add(h + 12, 8, 0)                  # pseudo-header: addresses
        else:
            wr16(h + 4, tcp_len)
            sum = csum_add(h + 8, 32, 0)
        sum += 6 + tcp_len
        h = s.data + t.l2 + t.l3                          # the TCP header
        wr16(h + 4, <uint16_t>((t.seq + off) >> 16))
        wr16(h + 6, <uint16_t>(t.seq + off))
        if off + seg < t.payload:
            h[13] = t.flags & ~0x09                        # FIN and PSH: last segment only
        if off:
            h[13] &= ~0x80                                 # CWR: first segment only
        wr16(h + 16, 0)
        wr16(h + 16, ~csum_fold(csum_add(h, tcp_len, sum)) & 0xFFFF)
        out[n] = s
        n += 1
        off += seg
        if t.payload == 0:
            break
    return n


cdef int segment_and_send(vq_t *vq, pktpool_t *pool, pkt_t *p) noexcept nogil:
    """Software TSO of ``p`` into ``vq``, MAX_SEGS segments at a time: 1 when every segment
    went in, -1 when the ring ran out of buffers (or could not take frames) on the way, 0
    when the frame could not be segmented or a segment was refused."""
    cdef tso_t t
    cdef pkt_t *segs[MAX_SEGS]
    cdef uint32_t first = 0, nseg, k, taken
    cdef uint64_t no_buffer = vq.st.drop_no_buffer
    if not tso_parse(p, &t):
        return 0
    while True:
        nseg = tso_segment(p, &t, first, pool, segs)
        if nseg == 0:
            return 1 if first > 0 and first * t.mss >= t.payload else 0
        k = vq_enqueue(vq, segs, nseg, &taken)
        pool_put_many(pool, segs, nseg)
        if taken < nseg or vq.st.drop_no_buffer != no_buffer:
            return -1
        if k < nseg:
            return 0
        first += nseg


cdef inline bint takes_gso(vq_t *vq, uint8_t gso) noexcept nogil:
    return (gso == VNET_HDR_GSO_TCPV4 and vq.ofl_rx & OFL_TSO4 != 0 or
            gso == VNET_HDR_GSO_TCPV6 and vq.ofl_rx & OFL_TSO6 != 0)


cdef uint32_t offload_send(vq_t *vq, pktpool_t *pool, pkt_t **pkts, uint32_t n,
                           uint32_t *failed, uint64_t *delivered_bytes) noexcept nogil:
    """vq_enqueue with the offloads the receiver did not agree to done here first. Returns
    how many of ``pkts`` were delivered; ``*failed`` counts those that could not be
    segmented, ``*delivered_bytes`` the bytes that went into the ring (the segments' with
    their headers; frames held for an IOTLB miss count when they go in). The caller keeps
    (and frees) ``pkts``. Delivery stops when the ring runs out of buffers (none is cut
    into segments for a full ring): the frames after that are the caller's to count."""
    cdef uint32_t i, start = 0, sent = 0, done, taken
    cdef uint64_t bytes_before = vq.st.bytes, no_buffer = vq.st.drop_no_buffer
    cdef pkt_t *p
    cdef uint8_t gso
    cdef bint soft, lost
    cdef int rc
    failed[0] = 0
    delivered_bytes[0] = 0
    for i in range(n):
        p = pkts[i]
        gso = p.vnet_hdr[1]
        soft = gso != VNET_HDR_GSO_NONE and not takes_gso(vq, gso)
        lost = False
        if p.ext_len and (soft or p.vnet_hdr[0] & VNET_HDR_F_NEEDS_CSUM and
                          not vq.ofl_rx & OFL_CSUM):
            lost = vq_materialize(p) < 0      # work on the whole frame: not one-copy
        if soft or lost:
            if i > start:
                sent += vq_enqueue(vq, pkts + start, i - start, &taken)
                if taken < i - start or vq.st.drop_no_buffer != no_buffer:
                    break                             # no room: the rest waits
            start = i + 1
            if lost:
                failed[0] += 1
                continue
            rc = segment_and_send(vq, pool, p)
            if rc < 0:
                break                                 # this one and the rest: no room
            if rc:
                sent += 1
            else:
                failed[0] += 1
        elif p.vnet_hdr[0] & VNET_HDR_F_NEEDS_CSUM and not vq.ofl_rx & OFL_CSUM:
            if not csum_complete(p):
                p.vnet_hdr[0] = 0
    else:
        if start < n:
            sent += vq_enqueue(vq, pkts + start, n - start, NULL)
    delivered_bytes[0] += vq.st.bytes - bytes_before
    return sent


def segment(bytes frame, bytes vnet_hdr):
    """Software TSO of one frame (tests and tools): the list of resulting frames."""
    cdef pkt_t *out[MAX_SEGS]
    cdef pkt_t *p
    cdef tso_t t
    cdef uint32_t n, i, first = 0
    pool_obj = PacketPool(MAX_SEGS + 1, 65600)
    cdef pktpool_t *pool = (<PacketPool>pool_obj).pool
    p = pool_get(pool)
    memcpy(p.data, <const char *>frame, len(frame))
    p.len = len(frame)
    memcpy(p.vnet_hdr, <const char *>vnet_hdr, 12)
    result = []
    if tso_parse(p, &t):
        while True:
            n = tso_segment(p, &t, first, pool, out)
            if n == 0:
                break
            result += [(<char *>out[i].data)[:out[i].len] for i in range(n)]
            pool_put_many(pool, out, n)
            first += n
    pool_put(pool, p)
    return result


def complete_checksum(bytes frame, bytes vnet_hdr):
    """Software checksum of one frame (tests and tools): the frame with it filled in."""
    pool_obj = PacketPool(1, 65600)
    cdef pktpool_t *pool = (<PacketPool>pool_obj).pool
    cdef pkt_t *p = pool_get(pool)
    memcpy(p.data, <const char *>frame, len(frame))
    p.len = len(frame)
    memcpy(p.vnet_hdr, <const char *>vnet_hdr, 12)
    if not csum_complete(p):
        raise ValueError("checksum position outside the frame")
    out = (<char *>p.data)[:p.len]
    pool_put(pool, p)
    return out
