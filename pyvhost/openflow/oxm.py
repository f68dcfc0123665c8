"""OXM matches (OFPMT_OXM, class OFPXMC_OPENFLOW_BASIC) to and from the switch's match
model (``pyvhost.switch.flows``: a dict of in_port, metadata (masked), dl_src/dl_dst,
dl_type, dl_vlan, dl_vlan_pcp, nw_src/nw_dst, nw_proto, nw_tos, ip_dscp, nw_ecn,
tp_src/tp_dst, arp_sha/arp_tha, tun_id, tun_src/tun_dst, vlan_tci). vlan_vid (with
OFPVID_PRESENT, masked or not) and vlan_pcp become one 802.1Q TCI value and mask, which the
model keeps as dl_vlan/dl_vlan_pcp where it can and as vlan_tci (value, mask) otherwise
(vlan_vid=PRESENT/PRESENT: any tagged frame), as OVS prints them.

The tunnel fields: tunnel_id (OFPXMT_OFB_TUNNEL_ID, 64 bits: the model's 24-bit VNI, so a
value or mask bit above bit 23 is refused), and tun_src/tun_dst as Open vSwitch sends
them in OpenFlow 1.3: NXM_NX_TUN_IPV4_SRC/DST, OXM class 0x0001 (NXM_1) fields 31 and 32.
A field is known here by its key: the field number for OPENFLOW_BASIC, else class << 16
| field (``key``).

Only what the model expresses exactly is taken; anything else is refused with the spec's
BAD_MATCH code (an unknown or inexpressible field BAD_FIELD, a mask the model has no room
for BAD_MASK (an IPv4 address takes any mask, as OVS does), bits set outside the mask
BAD_WILDCARDS, a missing prerequisite BAD_PREREQ, a field twice DUP_FIELD), never a
silently different rule.
Ports travel as OpenFlow numbers (``"3"``); a bridge resolves them. Pure functions."""

from __future__ import annotations

import struct

from pyvhost.switch.flows import VLAN_NONE, Prefix, vlan_match

from . import errors as E
from .codec import OFPP_MAX, pad8
from .errors import OFError

OFPMT_OXM = 1
BASIC = 0x8000

# OXM_OF_* field numbers: (number, value bytes, maskable as the model allows)
IN_PORT, IN_PHY_PORT, METADATA, ETH_DST, ETH_SRC, ETH_TYPE, VLAN_VID, VLAN_PCP = range(8)
IP_DSCP, IP_ECN, IP_PROTO, IPV4_SRC, IPV4_DST, TCP_SRC, TCP_DST, UDP_SRC, UDP_DST = range(8, 17)
SCTP_SRC, SCTP_DST, ICMPV4_TYPE, ICMPV4_CODE, ARP_OP, ARP_SPA, ARP_TPA = range(17, 24)
TUNNEL_ID = 38
NXM_1 = 0x0001
NX_TUN_IPV4_SRC, NX_TUN_IPV4_DST = NXM_1 << 16 | 31, NXM_1 << 16 | 32
SIZES = {NX_TUN_IPV4_SRC: 4, NX_TUN_IPV4_DST: 4,
         IN_PORT: 4, IN_PHY_PORT: 4, METADATA: 8, ETH_DST: 6, ETH_SRC: 6, ETH_TYPE: 2,
         VLAN_VID: 2, VLAN_PCP: 1, IP_DSCP: 1, IP_ECN: 1, IP_PROTO: 1, IPV4_SRC: 4,
         IPV4_DST: 4, TCP_SRC: 2, TCP_DST: 2, UDP_SRC: 2, UDP_DST: 2, SCTP_SRC: 2,
         SCTP_DST: 2, ICMPV4_TYPE: 1, ICMPV4_CODE: 1, ARP_OP: 2, ARP_SPA: 4, ARP_TPA: 4,
         24: 6, 25: 6, 26: 16, 27: 16, 28: 4, 29: 1, 30: 1, 31: 16, 32: 6, 33: 6, 34: 4,
         35: 1, 36: 1, 37: 2, 38: 8, 39: 2, 40: 3}
# the fields this switch matches on (TABLE_FEATURES lists them), and whether a mask is ok
ARP_SHA, ARP_THA = 24, 25
SUPPORTED = {IN_PORT: False, METADATA: True, ETH_DST: True, ETH_SRC: True, ETH_TYPE: False,
             VLAN_VID: True, VLAN_PCP: False, ARP_SHA: True, ARP_THA: True,
             IP_DSCP: False, IP_ECN: False, IP_PROTO: False, IPV4_SRC: True, IPV4_DST: True,
             TCP_SRC: True, TCP_DST: True, UDP_SRC: True, UDP_DST: True, ICMPV4_TYPE: False,
             ICMPV4_CODE: False, ARP_OP: False, ARP_SPA: True, ARP_TPA: True, TUNNEL_ID: True,
             NX_TUN_IPV4_SRC: True, NX_TUN_IPV4_DST: True}
# the fields a SET_FIELD takes (TABLE_FEATURES lists them)
SETTABLE = (VLAN_VID, VLAN_PCP, ETH_SRC, ETH_DST, IPV4_SRC, IPV4_DST, TCP_SRC, TCP_DST,
            UDP_SRC, UDP_DST, IP_DSCP, TUNNEL_ID, NX_TUN_IPV4_DST)
VNI_MAX = 0xFFFFFF
OFPVID_PRESENT = 0x1000
IP, ARP = 0x0800, 0x0806
TCP, UDP, ICMP = 6, 17, 1


def header(field: int, length: int, hasmask: bool = False) -> int:
    """The OXM header of field ``field`` (a key: see the module doc)."""
    cls = field >> 16 or BASIC
    return cls << 16 | (field & 0x7F) << 9 | int(hasmask) << 8 | length


def key(h: int) -> int:
    """The field key of an OXM header."""
    cls, field = h >> 16, h >> 9 & 0x7F
    return field if cls == BASIC else cls << 16 | field


def _bad(code: int, why: str) -> OFError:
    return OFError(E.BAD_MATCH, code, why)


def split_match(data: bytes, off: int) -> tuple[bytes, int]:
    """The OXM TLVs of the ofp_match at ``data[off:]`` and the offset after it (padding
    included). BAD_MATCH/BAD_TYPE or BAD_LEN when it does not fit."""
    if len(data) < off + 4:
        raise _bad(E.BMC_BAD_LEN, "no room for the match header")
    mtype, mlen = struct.unpack_from("!HH", data, off)
    if mtype != OFPMT_OXM:
        raise _bad(E.BMC_BAD_TYPE, f"match type {mtype} (only OXM, 1)")
    if mlen < 4 or off + pad8(mlen) > len(data):
        raise _bad(E.BMC_BAD_LEN, f"match length {mlen} in {len(data) - off} bytes")
    return data[off + 4:off + mlen], off + pad8(mlen)


def parse_tlvs(oxm: bytes) -> dict[int, tuple[bytes, bytes | None]]:
    """{field: (value, mask or None)} of OXM TLVs; lengths, duplicates, classes and
    value-outside-mask bits checked."""
    out: dict[int, tuple[bytes, bytes | None]] = {}
    later: list[OFError] = []          # mask errors: a field this switch lacks comes first
    off = 0
    while off < len(oxm):
        if off + 4 > len(oxm):
            raise _bad(E.BMC_BAD_LEN, f"{len(oxm) - off} stray bytes after the last OXM")
        h, = struct.unpack_from("!I", oxm, off)
        cls, field, hasmask, length = h >> 16, h >> 9 & 0x7F, h >> 8 & 1, h & 0xFF
        if off + 4 + length > len(oxm):
            raise _bad(E.BMC_BAD_LEN, f"OXM of {length} bytes overruns the match")
        body = oxm[off + 4:off + 4 + length]
        off += 4 + length
        if cls != BASIC and cls << 16 | field not in SUPPORTED:
            raise _bad(E.BMC_BAD_FIELD, f"OXM class 0x{cls:04x} field {field} (only "
                                        "OPENFLOW_BASIC and NXM_1's tunnel addresses)")
        field = key(h)
        size = SIZES.get(field)
        if size is None:
            raise _bad(E.BMC_BAD_FIELD, f"unknown OXM field {field}")
        if length != size * (2 if hasmask else 1):
            raise _bad(E.BMC_BAD_LEN, f"OXM field {field}: {length} bytes")
        if field in out:
            raise _bad(E.BMC_DUP_FIELD, f"OXM field {field} given twice")
        if field not in SUPPORTED:
            raise _bad(E.BMC_BAD_FIELD, f"OXM field {field}: this switch cannot match on it")
        value, mask = (body[:size], body[size:]) if hasmask else (body, None)
        if mask is not None:
            if not SUPPORTED[field]:
                later.append(_bad(E.BMC_BAD_MASK, f"OXM field {field} takes no mask here"))
            elif any(v & ~m for v, m in zip(value, mask, strict=True)):
                later.append(_bad(E.BMC_BAD_WILDCARDS, f"OXM field {field}: value bits "
                                                       "outside its mask"))
            if mask == b"\xff" * size:
                mask = None
            elif not any(mask):
                continue                        # a field matched by nothing: absent
        out[field] = (value, mask)
    if later:
        raise later[0]
    return out


def _int(b: bytes) -> int:
    return int.from_bytes(b, "big")


def _prefix(value: bytes, mask: bytes | None) -> Prefix:
    """An address field's value and mask (any mask, as OVS takes: value bits outside it
    are refused before this, BAD_WILDCARDS)."""
    if mask is None:
        return Prefix(value, 32)
    return Prefix.masked(value, _int(mask))


def _ports(value: bytes, mask: bytes | None):
    return _int(value) if mask is None else (_int(value), _int(mask))


def decode(oxm: bytes) -> dict:
    """The model's match dict of a match's OXM TLVs (OFError for what it cannot say)."""
    tlv = parse_tlvs(oxm)
    match: dict = {}
    if IN_PORT in tlv:
        port = _int(tlv[IN_PORT][0])
        if not 1 <= port < OFPP_MAX:
            raise _bad(E.BMC_BAD_VALUE, f"in_port {port:#x}: no such port here")
        match["in_port"] = str(port)
    if METADATA in tlv:
        v, m = tlv[METADATA]
        match["metadata"] = _int(v) if m is None else (_int(v), _int(m))
    for field, name in ((ETH_DST, "dl_dst"), (ETH_SRC, "dl_src")):
        if field in tlv:
            v, m = tlv[field]
            match[name] = v if m is None else (v, m)
    eth_type = _int(tlv[ETH_TYPE][0]) if ETH_TYPE in tlv else None
    if eth_type is not None:
        match["dl_type"] = eth_type
    if VLAN_VID in tlv:
        v, m = (_int(b) if b is not None else None for b in tlv[VLAN_VID])
        if v > 0x1FFF or (m is None and v and not v & OFPVID_PRESENT):
            raise _bad(E.BMC_BAD_VALUE, f"vlan_vid 0x{v:04x}")
        if m is not None and m > 0x1FFF:
            raise _bad(E.BMC_BAD_MASK, f"vlan_vid mask 0x{m:04x} (13 bits: PRESENT and VID)")
        tci, tci_mask = v, 0x1FFF if m is None else m       # the TCI's bit 12: a tag
    if VLAN_PCP in tlv:
        if VLAN_VID not in tlv or not tci_mask & tci & OFPVID_PRESENT:
            raise _bad(E.BMC_BAD_PREREQ, "vlan_pcp needs vlan_vid (a tagged frame)")
        pcp = _int(tlv[VLAN_PCP][0])
        if pcp > 7:
            raise _bad(E.BMC_BAD_VALUE, f"vlan_pcp {pcp}")
        tci, tci_mask = tci | pcp << 13, tci_mask | 0xE000
    if VLAN_VID in tlv:                         # OFPVID_NONE: untagged (dl_vlan=0xffff)
        match.update({"dl_vlan": VLAN_NONE} if tci_mask == 0x1FFF and tci == 0 else
                     vlan_match(tci, tci_mask))
    ip_fields = (IP_DSCP, IP_ECN, IP_PROTO, IPV4_SRC, IPV4_DST)
    if any(f in tlv for f in ip_fields) and eth_type != IP:
        if eth_type == 0x86DD:
            raise _bad(E.BMC_BAD_FIELD, "IP fields of IPv6: this switch matches IPv4 only")
        raise _bad(E.BMC_BAD_PREREQ, "IP fields need eth_type=0x0800")
    if IP_DSCP in tlv:
        dscp = _int(tlv[IP_DSCP][0])
        if dscp > 63:
            raise _bad(E.BMC_BAD_VALUE, f"ip_dscp {dscp}")
        if IP_ECN in tlv:
            ecn = _int(tlv[IP_ECN][0])
            if ecn > 3:
                raise _bad(E.BMC_BAD_VALUE, f"ip_ecn {ecn}")
            match["nw_tos"] = dscp << 2 | ecn          # the whole TOS byte
        else:
            match["ip_dscp"] = dscp
    elif IP_ECN in tlv:
        ecn = _int(tlv[IP_ECN][0])
        if ecn > 3:
            raise _bad(E.BMC_BAD_VALUE, f"ip_ecn {ecn}")
        match["nw_ecn"] = ecn
    proto = _int(tlv[IP_PROTO][0]) if IP_PROTO in tlv else None
    if proto is not None:
        match["nw_proto"] = proto
    for field, name in ((IPV4_SRC, "nw_src"), (IPV4_DST, "nw_dst")):
        if field in tlv:
            match[name] = _prefix(*tlv[field])
    for (fsrc, fdst), need_proto in (((TCP_SRC, TCP_DST), TCP), ((UDP_SRC, UDP_DST), UDP),
                                     ((ICMPV4_TYPE, ICMPV4_CODE), ICMP)):
        for field, name in ((fsrc, "tp_src"), (fdst, "tp_dst")):
            if field in tlv:
                if proto != need_proto or eth_type != IP:
                    raise _bad(E.BMC_BAD_PREREQ, f"OXM field {field} needs eth_type=0x0800 "
                                                 f"and ip_proto={need_proto}")
                match[name] = _ports(*tlv[field])
    if TUNNEL_ID in tlv:
        v, m = (_int(b) if b is not None else None for b in tlv[TUNNEL_ID])
        if m is not None and m > VNI_MAX:
            raise _bad(E.BMC_BAD_MASK, f"tunnel_id mask {m:#x}: tunnel ids here are 24-bit "
                                       "VNIs")
        if v > VNI_MAX:
            raise _bad(E.BMC_BAD_VALUE, f"tunnel_id {v:#x}: tunnel ids here are 24-bit VNIs")
        match["tun_id"] = v if m is None else (v, m)
    for field, name in ((NX_TUN_IPV4_SRC, "tun_src"), (NX_TUN_IPV4_DST, "tun_dst")):
        if field in tlv:
            match[name] = _prefix(*tlv[field])
    arp = (ARP_OP, ARP_SPA, ARP_TPA, ARP_SHA, ARP_THA)
    if any(f in tlv for f in arp):
        if eth_type != ARP:
            raise _bad(E.BMC_BAD_PREREQ, "ARP fields need eth_type=0x0806")
        if ARP_OP in tlv:
            op = _int(tlv[ARP_OP][0])
            if op > 0xFF:
                raise _bad(E.BMC_BAD_VALUE, f"arp_op {op}: this switch matches 0..255")
            match["nw_proto"] = op
        for field, name in ((ARP_SPA, "nw_src"), (ARP_TPA, "nw_dst")):
            if field in tlv:
                match[name] = _prefix(*tlv[field])
        for field, name in ((ARP_SHA, "arp_sha"), (ARP_THA, "arp_tha")):
            if field in tlv:
                v, m = tlv[field]
                match[name] = v if m is None else (v, m)
    return match


# -- encoding ------------------------------------------------------------------------------
def _tlv(field: int, value: bytes, mask: bytes | None = None) -> bytes:
    if mask is None:
        return struct.pack("!I", header(field, len(value))) + value
    return struct.pack("!I", header(field, 2 * len(value), True)) + value + mask


def _b(n: int, size: int) -> bytes:
    return n.to_bytes(size, "big")


def encode(match: dict, ofport_of) -> bytes:
    """OXM TLVs of a model match; ``ofport_of(ref)`` gives a port reference's OpenFlow
    number (0 for a port that is gone)."""
    out = []
    if "in_port" in match:
        out.append(_tlv(IN_PORT, _b(ofport_of(match["in_port"]), 4)))
    if "metadata" in match:
        v = match["metadata"]
        out.append(_tlv(METADATA, _b(v, 8)) if isinstance(v, int) else
                   _tlv(METADATA, _b(v[0], 8), _b(v[1], 8)))
    if "tun_id" in match:
        v = match["tun_id"]
        out.append(_tlv(TUNNEL_ID, _b(v, 8)) if isinstance(v, int) else
                   _tlv(TUNNEL_ID, _b(v[0], 8), _b(v[1], 8)))
    for name, field in (("tun_src", NX_TUN_IPV4_SRC), ("tun_dst", NX_TUN_IPV4_DST)):
        if name in match and match[name].plen:
            p = match[name]
            out.append(_tlv(field, p.addr) if p.plen == 32 else _tlv(field, p.addr, p.mask))
    for name, field in (("dl_dst", ETH_DST), ("dl_src", ETH_SRC)):
        if name in match:
            v = match[name]
            out.append(_tlv(field, v) if isinstance(v, bytes) else _tlv(field, *v))
    dl_type = match.get("dl_type")
    if dl_type is not None:
        out.append(_tlv(ETH_TYPE, _b(dl_type, 2)))
    if "dl_vlan" in match:
        v = match["dl_vlan"]
        out.append(_tlv(VLAN_VID, _b(0 if v == VLAN_NONE else v | OFPVID_PRESENT, 2)))
    elif "dl_vlan_pcp" in match:                       # any tag (as OVS sends it)
        out.append(_tlv(VLAN_VID, _b(OFPVID_PRESENT, 2), _b(OFPVID_PRESENT, 2)))
    elif "vlan_tci" in match:                          # (as OVS sends a TCI: VID and
        v, m = match["vlan_tci"]                       # PRESENT, then a whole PCP)
        vid, vid_m = v & 0x1FFF, m & 0x1FFF
        if vid_m:
            out.append(_tlv(VLAN_VID, _b(vid, 2)) if vid_m == 0x1FFF else
                       _tlv(VLAN_VID, _b(vid, 2), _b(vid_m, 2)))
        if vid and m & 0xE000 == 0xE000:
            out.append(_tlv(VLAN_PCP, _b(v >> 13, 1)))
    if "dl_vlan_pcp" in match:
        out.append(_tlv(VLAN_PCP, _b(match["dl_vlan_pcp"], 1)))
    if "nw_tos" in match:
        out.append(_tlv(IP_DSCP, _b(match["nw_tos"] >> 2, 1)))
        out.append(_tlv(IP_ECN, _b(match["nw_tos"] & 3, 1)))
    if "ip_dscp" in match:
        out.append(_tlv(IP_DSCP, _b(match["ip_dscp"], 1)))
    if "nw_ecn" in match:
        out.append(_tlv(IP_ECN, _b(match["nw_ecn"], 1)))
    proto = match.get("nw_proto")
    if proto is not None:
        out.append(_tlv(ARP_OP, _b(proto, 2)) if dl_type == ARP else _tlv(IP_PROTO, _b(proto, 1)))
    for name, ip_field, arp_field in (("nw_src", IPV4_SRC, ARP_SPA), ("nw_dst", IPV4_DST, ARP_TPA)):
        if name in match and match[name].plen:
            p = match[name]
            field = arp_field if dl_type == ARP else ip_field
            out.append(_tlv(field, p.addr) if p.plen == 32 else _tlv(field, p.addr, p.mask))
    for name, field in (("arp_sha", ARP_SHA), ("arp_tha", ARP_THA)):
        if name in match:
            v = match[name]
            out.append(_tlv(field, v) if isinstance(v, bytes) else _tlv(field, *v))
    fields = {TCP: (TCP_SRC, TCP_DST), UDP: (UDP_SRC, UDP_DST),
              ICMP: (ICMPV4_TYPE, ICMPV4_CODE)}.get(proto)
    for i, name in enumerate(("tp_src", "tp_dst")):
        if name in match and fields is not None:
            v = match[name]
            size = 1 if proto == ICMP else 2
            if isinstance(v, tuple):
                if size == 1:          # (a masked ICMP type: the exact value it allows)
                    out.append(_tlv(fields[i], _b(v[0] & 0xFF, 1)))
                else:
                    out.append(_tlv(fields[i], _b(v[0], 2), _b(v[1], 2)))
            else:
                out.append(_tlv(fields[i], _b(v & (0xFF if size == 1 else 0xFFFF), size)))
    return b"".join(out)


def match_struct(oxm: bytes) -> bytes:
    """An ofp_match (type OXM) holding these TLVs, padded to 8 bytes."""
    length = 4 + len(oxm)
    return struct.pack("!HH", OFPMT_OXM, length) + oxm + bytes(pad8(length) - length)
