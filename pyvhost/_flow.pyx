# cython: language_level=3
"""Compiled flow handling for the switch's fast path: parse a frame into a ``flow_key_t``
(in_port, VLAN, Ethernet, IPv4/ARP, TCP/UDP/ICMP), hash it, look it up in a PMD's
exact-match cache, and the VLAN rewrites actions need. Also the Python view of a key
(``key_dict``) for the slow path. No rules, no ports, no rings here.
"""

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcmp, memcpy, memmove, memset

from pyvhost._pktpool cimport PacketPool, pkt_t, pool_get, pool_put


cdef inline uint16_t rd16(const uint8_t *p) noexcept nogil:
    return (<uint16_t>p[0] << 8) | p[1]


cdef void flow_extract(const pkt_t *p, uint16_t in_port, flow_key_t *k) noexcept nogil:
    cdef const uint8_t *d = p.data
    cdef uint32_t n = p.len, off = 14, ihl
    cdef uint16_t frag
    memset(k, 0, sizeof(flow_key_t))
    k.in_port = in_port
    if n < 14:
        return
    memcpy(k.dl_dst, d, 6)
    memcpy(k.dl_src, d + 6, 6)
    k.dl_type = rd16(d + 12)
    if k.dl_type == ETH_P_8021Q and n >= 18:
        k.vlan_tci = rd16(d + 14) | 0x1000
        k.dl_type = rd16(d + 16)
        off = 18
    if k.dl_type == 0x0806 and n >= off + 28:            # ARP: opcode, sender/target IP
        k.nw_proto = d[off + 7]
        memcpy(&k.nw_src, d + off + 14, 4)
        memcpy(&k.nw_dst, d + off + 24, 4)
    elif k.dl_type == 0x0800 and n >= off + 20 and d[off] >> 4 == 4:
        ihl = (d[off] & 0x0F) * 4
        k.nw_tos = d[off + 1]
        k.nw_proto = d[off + 9]
        memcpy(&k.nw_src, d + off + 12, 4)
        memcpy(&k.nw_dst, d + off + 16, 4)
        frag = rd16(d + off + 6) & 0x1FFF
        if ihl >= 20 and frag == 0 and n >= off + ihl + 4:
            off += ihl
            if k.nw_proto == 6 or k.nw_proto == 17:
                k.tp_src = rd16(d + off)
                k.tp_dst = rd16(d + off + 2)
            elif k.nw_proto == 1:                            # ICMP type and code
                k.tp_src = d[off]
                k.tp_dst = d[off + 1]


cdef uint32_t flow_hash(const flow_key_t *k) noexcept nogil:
    cdef uint64_t w[5]
    cdef uint64_t h = 0x9E3779B97F4A7C15ULL
    cdef int i
    memcpy(w, k, sizeof(flow_key_t))
    for i in range(5):
        h ^= w[i]
        h *= 0xFF51AFD7ED558CCDULL
        h ^= h >> 32
    return <uint32_t>h


cdef const actions_t *emc_lookup(emc_t *emc, const flow_key_t *k, uint32_t h,
                                 uint32_t gen) noexcept nogil:
    cdef emc_entry_t *e = &emc.e[h & (EMC_ENTRIES - 1)]
    if e.gen == gen and e.hash == h and memcmp(&e.key, k, sizeof(flow_key_t)) == 0:
        return &e.actions
    return NULL


cdef void emc_insert(emc_t *emc, const flow_key_t *k, uint32_t h, uint32_t gen,
                     const actions_t *a) noexcept nogil:
    cdef emc_entry_t *e = &emc.e[h & (EMC_ENTRIES - 1)]
    e.hash = h
    e.gen = gen
    memcpy(&e.key, k, sizeof(flow_key_t))
    memcpy(&e.actions, a, sizeof(actions_t))


cdef inline uint32_t masked_hash(const uint64_t *w, const uint64_t *mask,
                                 uint64_t *out) noexcept nogil:
    cdef uint64_t h = 0x9E3779B97F4A7C15ULL
    cdef int i
    for i in range(5):
        out[i] = w[i] & mask[i]
        h ^= out[i]
        h *= 0xFF51AFD7ED558CCDULL
        h ^= h >> 32
    return <uint32_t>h


cdef const actions_t *mf_lookup(mf_t *mf, const flow_key_t *k, uint32_t gen) noexcept nogil:
    """The cached actions of the first subtable whose masked key matches, or NULL."""
    cdef uint64_t w[5]
    cdef uint64_t m[5]
    cdef uint32_t s, h
    cdef mf_sub_t *sub
    cdef mf_entry_t *e
    memcpy(w, k, sizeof(flow_key_t))
    for s in range(mf.nsub):
        sub = &mf.sub[s]
        if sub.gen != gen or sub.used == 0:
            continue
        h = masked_hash(w, sub.mask, m)
        e = &sub.e[h & (MF_ENTRIES - 1)]
        if e.gen == gen and e.hash == h and memcmp(e.key, m, sizeof(m)) == 0:
            return &e.actions
    return NULL


cdef void mf_insert(mf_t *mf, const flow_key_t *k, const uint64_t *mask, uint32_t gen,
                    const actions_t *a) noexcept nogil:
    cdef uint64_t w[5]
    cdef uint32_t s, h
    cdef mf_sub_t *sub = NULL
    cdef mf_entry_t *e
    for s in range(mf.nsub):                         # same mask, still current
        if mf.sub[s].gen == gen and memcmp(mf.sub[s].mask, mask, 5 * sizeof(uint64_t)) == 0:
            sub = &mf.sub[s]
            break
    if sub == NULL:
        for s in range(mf.nsub):                     # a stale subtable to reuse
            if mf.sub[s].gen != gen:
                sub = &mf.sub[s]
                break
    if sub == NULL:
        if mf.nsub < MF_MASKS:
            sub = &mf.sub[mf.nsub]
            mf.nsub += 1
        else:
            sub = &mf.sub[mf.next_victim % MF_MASKS]
            mf.next_victim += 1
    if sub.gen != gen or memcmp(sub.mask, mask, 5 * sizeof(uint64_t)) != 0:
        memset(sub.e, 0, sizeof(sub.e))
        memcpy(sub.mask, mask, 5 * sizeof(uint64_t))
        sub.gen = gen
        sub.used = 0
    memcpy(w, k, sizeof(flow_key_t))
    h = masked_hash(w, sub.mask, w)
    e = &sub.e[h & (MF_ENTRIES - 1)]
    e.hash = h
    e.gen = gen
    memcpy(e.key, w, sizeof(w))
    memcpy(&e.actions, a, sizeof(actions_t))
    sub.used += 1


cdef inline void shift_offload_offsets(pkt_t *p, int delta) noexcept nogil:
    """A tag pushed (+4) or popped (-4) moves the L3/L4 headers: so must the virtio-net
    header's csum_start (partial checksum) and hdr_len (segmentation)."""
    cdef uint16_t v
    if p.vnet_hdr[0] & 1:                                   # NEEDS_CSUM
        v = p.vnet_hdr[6] | (<uint16_t>p.vnet_hdr[7] << 8)
        v = <uint16_t>(v + delta)
        p.vnet_hdr[6] = v & 0xFF
        p.vnet_hdr[7] = v >> 8
    if p.vnet_hdr[1]:                                       # a GSO type
        v = p.vnet_hdr[2] | (<uint16_t>p.vnet_hdr[3] << 8)
        v = <uint16_t>(v + delta)
        p.vnet_hdr[2] = v & 0xFF
        p.vnet_hdr[3] = v >> 8


cdef int vlan_set(pkt_t *p, uint16_t vid) noexcept nogil:
    """Set the VLAN id, pushing an 802.1Q tag if the frame has none. -1: no room."""
    cdef uint16_t tci
    if p.len >= 18 and rd16(p.data + 12) == ETH_P_8021Q:
        tci = (rd16(p.data + 14) & 0xF000) | (vid & 0x0FFF)
    else:
        if p.len < 14 or p.data - p.buf < 4:
            return -1
        memmove(p.data - 4, p.data, 12)
        p.data -= 4
        p.len += 4
        p.cap += 4
        p.data[12] = ETH_P_8021Q >> 8
        p.data[13] = ETH_P_8021Q & 0xFF
        tci = vid & 0x0FFF
        shift_offload_offsets(p, 4)
    p.data[14] = tci >> 8
    p.data[15] = tci & 0xFF
    return 0


cdef void vlan_strip(pkt_t *p) noexcept nogil:
    if p.len >= 18 and rd16(p.data + 12) == ETH_P_8021Q:
        memmove(p.data + 4, p.data, 12)
        p.data += 4
        p.len -= 4
        p.cap -= 4
        shift_offload_offsets(p, -4)


def key_dict(bytes raw):
    """The fields of a ``flow_key_t`` given as raw bytes (the slow path's view)."""
    cdef flow_key_t k
    if len(raw) != sizeof(flow_key_t):
        raise ValueError("not a flow key")
    memcpy(&k, <const char *>raw, sizeof(flow_key_t))
    return {
        "in_port": k.in_port,
        "dl_vlan": (k.vlan_tci & 0x0FFF) if k.vlan_tci else None,
        "dl_dst": bytes(k.dl_dst[:6]),
        "dl_src": bytes(k.dl_src[:6]),
        "dl_type": k.dl_type,
        "nw_src": (<uint8_t *>&k.nw_src)[:4],
        "nw_dst": (<uint8_t *>&k.nw_dst)[:4],
        "nw_proto": k.nw_proto,
        "nw_tos": k.nw_tos,
        "tp_src": k.tp_src,
        "tp_dst": k.tp_dst,
    }


def frame_key(bytes frame, uint16_t in_port=0):
    """The raw ``flow_key_t`` of an Ethernet frame (tests and tools)."""
    cdef pkt_t p
    cdef flow_key_t k
    memset(&p, 0, sizeof(pkt_t))
    p.data = <uint8_t *><const char *>frame
    p.len = len(frame)
    flow_extract(&p, in_port, &k)
    return (<char *>&k)[:sizeof(flow_key_t)]


cdef dict _field_spans():
    cdef flow_key_t k
    cdef size_t base = <size_t>&k

    def span(size_t addr, int size):
        return (addr - base, size)
    return {
        "in_port": span(<size_t>&k.in_port, 2), "dl_vlan": span(<size_t>&k.vlan_tci, 2),
        "dl_dst": span(<size_t>&k.dl_dst, 6), "dl_src": span(<size_t>&k.dl_src, 6),
        "dl_type": span(<size_t>&k.dl_type, 2), "nw_src": span(<size_t>&k.nw_src, 4),
        "nw_dst": span(<size_t>&k.nw_dst, 4), "nw_proto": span(<size_t>&k.nw_proto, 1),
        "nw_tos": span(<size_t>&k.nw_tos, 1), "tp_src": span(<size_t>&k.tp_src, 2),
        "tp_dst": span(<size_t>&k.tp_dst, 2),
    }


FIELD_SPANS = _field_spans()


def field_mask(fields):
    """The wildcard mask (raw, key-sized) that keeps exactly ``fields`` of a flow key."""
    mask = bytearray(sizeof(flow_key_t))
    for name in fields:
        off, size = FIELD_SPANS[name]
        mask[off:off + size] = b"\xff" * size
    return bytes(mask)


KEY_SIZE = sizeof(flow_key_t)
ACTION_OPS = {"output": OP_OUTPUT, "flood": OP_FLOOD, "set_vlan": OP_SET_VLAN,
              "strip_vlan": OP_STRIP_VLAN}
MAX_OPS = MAX_ACTION_OPS
EMC_SIZE = EMC_ENTRIES


def vlan_edit(bytes frame, bytes vnet_hdr, int vid=-1):
    """Push/set VLAN ``vid`` (or strip the tag when ``vid`` is -1) on a frame with its
    virtio-net header, as an action does (tests and tools): the new (frame, header)."""
    pool_obj = PacketPool(1, max(len(frame) + 64, 64))
    cdef PacketPool pool = pool_obj
    cdef pkt_t *p = pool_get(pool.pool)
    memcpy(p.data, <const char *>frame, len(frame))
    p.len = len(frame)
    memcpy(p.vnet_hdr, <const char *>vnet_hdr, 12)
    if vid < 0:
        vlan_strip(p)
    elif vlan_set(p, vid) < 0:
        pool_put(pool.pool, p)
        raise ValueError("no headroom for a tag")
    out = ((<char *>p.data)[:p.len], (<char *>p.vnet_hdr)[:12])
    pool_put(pool.pool, p)
    return out
