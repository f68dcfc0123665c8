# cython: language_level=3
"""Header edits of a frame in place (OpenFlow set-field and dec_nw_ttl): Ethernet source
and destination, the 802.1Q priority, IPv4 source/destination (``addr`` a host-order
number), DSCP (the TOS byte's upper six bits; ECN kept), the TTL, TCP/UDP source and
destination ports. Each checks the frame is what it edits (else does nothing: the rule's
match guarantees it, a frame that lies is left alone) and updates the IPv4 header checksum
and the TCP/UDP checksum incrementally (RFC 1624): an address is in the L4 pseudo-header,
a port in the L4 header. A UDP checksum of 0 (none) stays 0. A frame whose virtio-net
header says NEEDS_CSUM carries a partial L4 checksum (the pseudo-header's sum, not
inverted, the device completes it): address edits keep it partial, port edits leave it.
No rules, keys or ports here."""

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy, memset

from pyvhost._pktpool cimport PacketPool, pkt_t, pool_get, pool_put

cdef enum:
    ETH_P_IP = 0x0800
    ETH_P_VLAN = 0x8100
    IPPROTO_TCP = 6
    IPPROTO_UDP = 17


cdef inline uint16_t rd16(const uint8_t *p) noexcept nogil:
    return (<uint16_t>p[0] << 8) | p[1]


cdef inline void wr16(uint8_t *p, uint16_t v) noexcept nogil:
    p[0] = v >> 8
    p[1] = v & 0xFF


cdef inline uint16_t csum_replace16(uint16_t c, uint16_t old, uint16_t new) noexcept nogil:
    """The checksum ``c`` of data in which a 16-bit word went from ``old`` to ``new``:
    ~(~C + ~m + m') (RFC 1624, eqn. 3)."""
    cdef uint32_t s = (<uint32_t>(~c & 0xFFFF)) + (~old & 0xFFFF) + new
    s = (s & 0xFFFF) + (s >> 16)
    s = (s & 0xFFFF) + (s >> 16)
    return <uint16_t>(~s & 0xFFFF)


cdef inline uint16_t csum_replace32(uint16_t c, uint32_t old, uint32_t new) noexcept nogil:
    c = csum_replace16(c, old >> 16, new >> 16)
    return csum_replace16(c, old & 0xFFFF, new & 0xFFFF)


cdef inline int l3_offset(const pkt_t *p) noexcept nogil:
    """Offset of an IPv4 header with room for itself (-1: not IPv4)."""
    cdef int off = 14
    cdef uint16_t t
    if p.len < 34:
        return -1
    t = rd16(p.data + 12)
    if t == ETH_P_VLAN:
        off = 18
        t = rd16(p.data + 16)
    if t != ETH_P_IP or p.len < <uint32_t>off + 20 or p.data[off] >> 4 != 4 or \
            (p.data[off] & 0x0F) < 5 or p.len < <uint32_t>off + (p.data[off] & 0x0F) * 4:
        return -1
    return off


cdef inline int l4_csum_offset(const pkt_t *p, int off) noexcept nogil:
    """Offset of the TCP/UDP checksum of the IPv4 packet at ``off`` (-1: none here: another
    protocol, a later fragment or a header cut short)."""
    cdef int l4 = off + (p.data[off] & 0x0F) * 4
    cdef uint8_t proto = p.data[off + 9]
    if rd16(p.data + off + 6) & 0x1FFF:
        return -1
    if proto == IPPROTO_TCP and p.len >= <uint32_t>l4 + 18:
        return l4 + 16
    if proto == IPPROTO_UDP and p.len >= <uint32_t>l4 + 8:
        return l4 + 6
    return -1


cdef inline bint partial_csum(const pkt_t *p) noexcept nogil:
    return p.vnet_hdr[0] & 1


cdef void edit_eth(pkt_t *p, bint dst, uint64_t mac) noexcept nogil:
    cdef int i
    if p.len < 14:
        return
    for i in range(6):
        p.data[(0 if dst else 6) + i] = (mac >> (40 - 8 * i)) & 0xFF


cdef void edit_pcp(pkt_t *p, uint8_t pcp) noexcept nogil:
    if p.len >= 18 and rd16(p.data + 12) == ETH_P_VLAN:
        wr16(p.data + 14, (rd16(p.data + 14) & 0x1FFF) | (<uint16_t>(pcp & 7) << 13))


cdef void edit_ipv4_addr(pkt_t *p, bint dst, uint32_t addr) noexcept nogil:
    cdef int off = l3_offset(p), at, c
    cdef uint32_t old
    cdef uint16_t v
    if off < 0:
        return
    at = off + (16 if dst else 12)
    old = (<uint32_t>rd16(p.data + at) << 16) | rd16(p.data + at + 2)
    if old == addr:
        return
    wr16(p.data + at, addr >> 16)
    wr16(p.data + at + 2, addr & 0xFFFF)
    wr16(p.data + off + 10, csum_replace32(rd16(p.data + off + 10), old, addr))
    c = l4_csum_offset(p, off)
    if c < 0:
        return
    v = rd16(p.data + c)
    if partial_csum(p):                 # the pseudo-header's sum, not inverted
        wr16(p.data + c, ~csum_replace32(~v & 0xFFFF, old, addr) & 0xFFFF)
    elif v != 0 or p.data[off + 9] == IPPROTO_TCP:
        v = csum_replace32(v, old, addr)
        wr16(p.data + c, 0xFFFF if v == 0 and p.data[off + 9] == IPPROTO_UDP else v)


cdef void edit_dscp(pkt_t *p, uint8_t dscp) noexcept nogil:
    cdef int off = l3_offset(p)
    cdef uint16_t old, new
    if off < 0:
        return
    old = rd16(p.data + off)                              # version/IHL, TOS
    new = (old & 0xFF03) | (<uint16_t>(dscp & 0x3F) << 2)
    p.data[off + 1] = new & 0xFF
    wr16(p.data + off + 10, csum_replace16(rd16(p.data + off + 10), old, new))


cdef void edit_l4_port(pkt_t *p, bint dst, uint16_t port) noexcept nogil:
    cdef int off = l3_offset(p), c, at
    cdef uint16_t old, v
    if off < 0:
        return
    c = l4_csum_offset(p, off)
    if c < 0:
        return
    at = off + (p.data[off] & 0x0F) * 4 + (2 if dst else 0)
    old = rd16(p.data + at)
    wr16(p.data + at, port)
    if partial_csum(p):                 # the device sums the L4 header: nothing to do
        return
    v = rd16(p.data + c)
    if v != 0 or p.data[off + 9] == IPPROTO_TCP:
        v = csum_replace16(v, old, port)
        wr16(p.data + c, 0xFFFF if v == 0 and p.data[off + 9] == IPPROTO_UDP else v)


cdef int edit_dec_ttl(pkt_t *p) noexcept nogil:
    """Decrement an IPv4 packet's TTL: -1 (and the packet untouched) if it would reach 0;
    0 otherwise (a frame that is not IPv4: nothing to do)."""
    cdef int off = l3_offset(p)
    cdef uint16_t old
    if off < 0:
        return 0
    if p.data[off + 8] <= 1:
        return -1
    old = rd16(p.data + off + 8)                          # TTL, protocol
    p.data[off + 8] -= 1
    wr16(p.data + off + 10, csum_replace16(rd16(p.data + off + 10), old, old - 0x100))
    return 0


cdef enum:
    CANARY = 0xA5


def edit_frame(bytes frame, bytes vnet_hdr, str what, value=0):
    """``frame`` (with its 12-byte virtio-net header) edited as the datapath edits it
    (tests and tools): ``what`` one of eth_src, eth_dst, vlan_pcp, ip_src, ip_dst (an int),
    ip_dscp, tp_src, tp_dst, dec_ttl. Returns (frame, header), or None when dec_ttl
    finds the TTL expired."""
    pool_obj = PacketPool(1, max(len(frame) + 64, 64))
    cdef PacketPool pool = pool_obj
    cdef pkt_t *p = pool_get(pool.pool)
    cdef int rc = 0
    cdef uint64_t v = value
    if len(vnet_hdr) != 12:
        pool_put(pool.pool, p)
        raise ValueError("a virtio-net header is 12 bytes here")
    # the buffer around the frame holds a known pattern: an edit that writes outside the
    # frame (before it or past its length) is caught below, not only where ASan would see it
    memset(p.buf, CANARY, <size_t>(p.data - p.buf) + p.cap)
    memcpy(p.data, <const char *>frame, len(frame))
    p.len = len(frame)
    memcpy(p.vnet_hdr, <const char *>vnet_hdr, 12)
    if what in ("eth_src", "eth_dst"):
        edit_eth(p, what == "eth_dst", v)
    elif what == "vlan_pcp":
        edit_pcp(p, v)
    elif what in ("ip_src", "ip_dst"):
        edit_ipv4_addr(p, what == "ip_dst", v)
    elif what == "ip_dscp":
        edit_dscp(p, v)
    elif what in ("tp_src", "tp_dst"):
        edit_l4_port(p, what == "tp_dst", v)
    elif what == "dec_ttl":
        rc = edit_dec_ttl(p)
    else:
        pool_put(pool.pool, p)
        raise ValueError(f"no edit {what!r}")
    out = None if rc < 0 else ((<char *>p.data)[:p.len], (<char *>p.vnet_hdr)[:12])
    outside = (<char *>p.buf)[:p.data - p.buf] + (<char *>p.data)[p.len:p.cap]
    pool_put(pool.pool, p)
    if outside.strip(bytes([CANARY])):
        raise AssertionError(f"{what} wrote outside the {len(frame)}-byte frame")
    return out
