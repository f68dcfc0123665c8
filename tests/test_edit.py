"""The frame edits of OpenFlow's set_field and dec_nw_ttl (``pyvhost._edit``): every edit of
a TCP or UDP frame, tagged or not, leaves IPv4 and L4 checksums that verify from scratch;
a partial checksum (virtio-net NEEDS_CSUM) stays the pseudo-header's sum; a UDP checksum of
0 stays 0; dec_ttl of a TTL of 1 refuses; frames without the header are left alone."""

from __future__ import annotations

import struct

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from pyvhost._edit import edit_frame
from pyvhost.packets import inet_checksum as csum
from tests.harness.fuzzing import Counter, fuzz_settings, minimum

NO_HDR = bytes(12)
SRC, DST = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])


def frame(proto: int = 6, vlan: int | None = None, ttl: int = 64, udp_csum: bool = True,
          partial: bool = False) -> bytes:
    payload = b"hello, pipeline!"
    if proto == 6:
        l4 = struct.pack("!HHIIBBHHH", 1000, 80, 1, 0, 0x50, 0x18, 100, 0, 0) + payload
        at = 16
    else:
        l4 = struct.pack("!HHHH", 1000, 53, 8 + len(payload), 0) + payload
        at = 6
    pseudo = SRC + DST + struct.pack("!BBH", 0, proto, len(l4))
    if partial:                      # the pseudo-header's sum, not inverted (Linux, virtio)
        c = ~csum(pseudo) & 0xFFFF
    else:
        c = csum(pseudo + l4) if proto == 6 or udp_csum else 0
        if proto == 17 and udp_csum and c == 0:
            c = 0xFFFF
    l4 = l4[:at] + struct.pack("!H", c) + l4[at + 2:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0x11, 20 + len(l4), 1, 0, ttl, proto, 0, SRC, DST)
    ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
    tag = b"\x81\x00" + struct.pack("!H", vlan) if vlan is not None else b""
    return b"\x02" * 6 + b"\x04" * 6 + tag + b"\x08\x00" + ip + l4


def layers(f: bytes) -> tuple[bytes, bytes]:
    off = 18 if f[12:14] == b"\x81\x00" else 14
    ihl = (f[off] & 15) * 4
    return f[off:off + ihl], f[off + ihl:]


def verify(f: bytes) -> None:
    ip, l4 = layers(f)
    assert csum(ip) == 0, "IPv4 header checksum"
    if ip[9] == 17 and l4[6:8] == b"\0\0":
        return                                          # no UDP checksum
    pseudo = ip[12:20] + struct.pack("!BBH", 0, ip[9], len(l4))
    assert csum(pseudo + l4) == 0, "L4 checksum"


EDITS = [("ip_src", 0xC0A80001), ("ip_dst", 0x0A0A0A0A), ("tp_src", 4242), ("tp_dst", 7),
         ("ip_dscp", 46), ("dec_ttl", 0), ("eth_src", 0x020000000009),
         ("eth_dst", 0xFFFFFFFFFFFF)]


@pytest.mark.parametrize("proto", [6, 17])
@pytest.mark.parametrize("vlan", [None, 0x2005])
@pytest.mark.parametrize("what,value", EDITS)
def test_edits_keep_checksums_true(proto, vlan, what, value):
    f = frame(proto, vlan)
    verify(f)
    g, hdr = edit_frame(f, NO_HDR, what, value)
    verify(g)
    assert len(g) == len(f) and hdr == NO_HDR
    ip, l4 = layers(g)
    eth = g[:12]
    want = {"ip_src": lambda: ip[12:16] == value.to_bytes(4, "big"),
            "ip_dst": lambda: ip[16:20] == value.to_bytes(4, "big"),
            "tp_src": lambda: l4[0:2] == value.to_bytes(2, "big"),
            "tp_dst": lambda: l4[2:4] == value.to_bytes(2, "big"),
            "ip_dscp": lambda: ip[1] == value << 2 | 1,            # ECN (01) kept
            "dec_ttl": lambda: ip[8] == 63,
            "eth_src": lambda: eth[6:12] == value.to_bytes(6, "big"),
            "eth_dst": lambda: eth[0:6] == value.to_bytes(6, "big")}[what]
    assert want(), (what, g.hex())
    assert g != f


def test_vlan_pcp_and_what_is_left_alone():
    g, _ = edit_frame(frame(6, 0x2005), NO_HDR, "vlan_pcp", 5)
    assert g[14:16] == bytes([0xA0, 0x05])               # PCP 5, CFI and VID kept
    assert edit_frame(frame(6), NO_HDR, "vlan_pcp", 5)[0] == frame(6)     # untagged
    arp = b"\xff" * 6 + b"\x02" * 6 + b"\x08\x06" + bytes(28)
    for what, value in EDITS[:6]:                        # no IPv4 header: nothing changes
        assert edit_frame(arp, NO_HDR, what, value)[0] == arp
    icmp = frame(6)[:23] + b"\x01" + frame(6)[24:]       # (its IP checksum is off: kept so)
    assert edit_frame(icmp, NO_HDR, "tp_dst", 9)[0] == icmp


def test_udp_without_checksum_keeps_none():
    g, _ = edit_frame(frame(17, udp_csum=False), NO_HDR, "ip_dst", 0x0A000063)
    assert layers(g)[1][6:8] == b"\0\0"
    verify(g)


def test_partial_checksum_stays_partial():
    hdr = bytes([1, 0, 0, 0, 0, 0, 34, 0, 16, 0, 0, 0])  # NEEDS_CSUM, csum_start 34, off 16
    f = frame(6, partial=True)
    for what, value in (("ip_src", 0xC0A80001), ("ip_dst", 0x0A0A0A0A), ("tp_dst", 99)):
        g, h = edit_frame(f, hdr, what, value)
        assert h == hdr
        ip, l4 = layers(g)
        pseudo = ip[12:20] + struct.pack("!BBH", 0, 6, len(l4))
        assert l4[16:18] == struct.pack("!H", ~csum(pseudo) & 0xFFFF), what
        assert csum(ip) == 0


def test_dec_ttl_refuses_an_expiring_packet():
    assert edit_frame(frame(ttl=1), NO_HDR, "dec_ttl") is None
    assert edit_frame(frame(ttl=0), NO_HDR, "dec_ttl") is None
    g, _ = edit_frame(frame(ttl=2), NO_HDR, "dec_ttl")
    assert layers(g)[0][8] == 1
    verify(g)


N_HOSTILE = 3000
hostile_cases = Counter("hostile frames through every edit")
PARTIAL = bytes([1, 0, 0, 0, 0, 0, 34, 0, 16, 0, 0, 0])
ALL_EDITS = EDITS + [("dec_ttl", 0), ("vlan_pcp", 7), ("ip_dscp", 63)]


@fuzz_settings(N_HOSTILE)
@given(base=st.sampled_from([frame(6), frame(17), frame(6, 0x2005), frame(17, 0x2005),
                             frame(6, partial=True), frame(17, udp_csum=False)]),
       cut=st.integers(0, 200), flips=st.lists(st.tuples(st.integers(0, 199),
                                                         st.integers(0, 255)), max_size=8),
       hdr=st.one_of(st.just(NO_HDR), st.just(PARTIAL), st.binary(min_size=12, max_size=12)),
       edit=st.sampled_from(ALL_EDITS))
@example(base=frame(6, partial=True), cut=200, flips=[], hdr=bytes([1, 0, 0, 0, 0, 0, 0xFF,
                                                                   0xFF, 0xFF, 0xFF, 0, 0]),
         edit=("tp_dst", 7))                         # csum_start and offset far past the end
@example(base=frame(6), cut=200, flips=[(14, 0x4F)], hdr=NO_HDR, edit=("ip_src", 1))  # IHL 15
@example(base=frame(17), cut=36, flips=[], hdr=NO_HDR, edit=("tp_src", 1))   # L4 cut short
def test_hostile_frames_are_edited_within_the_frame(base, cut, flips, hdr, edit):
    """A frame a guest made up (cut anywhere, any byte changed: lengths, IHL, fragments,
    protocol) and any virtio-net header (csum_start/offset anywhere): every edit either
    leaves the frame alone or changes it within its bytes (edit_frame checks the buffer
    around it), never its length or header; under ASan in test_fuzz_asan too."""
    hostile_cases()
    f = bytearray(base[:cut])
    for at, value in flips:
        if at < len(f):
            f[at] = value
    what, value = edit
    out = edit_frame(bytes(f), hdr, what, value)
    if out is not None:
        assert len(out[0]) == len(f) and out[1] == hdr


def test_hostile_frames_ran():
    assert hostile_cases.n >= minimum(N_HOSTILE)
    hostile_cases.report(N_HOSTILE)
