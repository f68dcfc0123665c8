"""Software offloads: TCP segmentation (IPv4, IPv6, VLAN-tagged) and checksum completion,
checked against checksums computed here in plain Python."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvhost._offload import complete_checksum, segment

SRC4, DST4 = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])
SRC6, DST6 = bytes(15) + b"\x01", bytes(15) + b"\x02"


def csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def vnet(flags=1, gso=0, hdr_len=0, gso_size=0, start=0, offset=0) -> bytes:
    return struct.pack("<BBHHHHH", flags, gso, hdr_len, gso_size, start, offset, 0)


def tcp_frame(payload: bytes, v6=False, vlan=False, seq=1000, flags=0x18) -> bytes:
    l2 = b"\x02" * 6 + b"\x04" * 6 + (b"\x81\x00\x00\x07" if vlan else b"") + \
        (b"\x86\xdd" if v6 else b"\x08\x00")
    tcp = struct.pack("!HHIIBBHHH", 1234, 80, seq, 0, 5 << 4, flags, 65535, 0, 0)
    if v6:
        ip = struct.pack("!IHBB", 6 << 28, len(tcp) + len(payload), 6, 64) + SRC6 + DST6
    else:
        ip = struct.pack("!BBHHHBBH", 0x45, 0, 20 + len(tcp) + len(payload), 77, 0, 64, 6, 0) \
            + SRC4 + DST4
        ip = ip[:10] + struct.pack("!H", ~csum(ip) & 0xFFFF) + ip[12:]
    return l2 + ip + tcp + payload


def check_segment(seg: bytes, v6: bool, l2: int) -> tuple[int, bytes, int]:
    """(seq, payload, tcp flags) of a segment whose checksums must be right."""
    if v6:
        ip, l3 = seg[l2:l2 + 40], 40
        tcp_len = struct.unpack("!H", ip[4:6])[0]
        pseudo = ip[8:40] + struct.pack("!IxxxB", tcp_len, 6)
    else:
        ip, l3 = seg[l2:l2 + 20], 20
        assert csum(ip) == 0xFFFF                               # IPv4 header checksum
        tcp_len = struct.unpack("!H", ip[2:4])[0] - 20
        pseudo = ip[12:20] + struct.pack("!xBH", 6, tcp_len)
    tcp = seg[l2 + l3:]
    assert len(tcp) == tcp_len
    assert csum(pseudo + tcp) == 0xFFFF                         # TCP checksum
    return struct.unpack("!I", tcp[4:8])[0], tcp[20:], tcp[13]


@pytest.mark.parametrize("v6,vlan", [(False, False), (True, False), (False, True)])
def test_tso_segments_carry_the_stream(v6, vlan):
    payload = bytes(range(256)) * 40 + b"tail"                  # 10244 bytes
    frame = tcp_frame(payload, v6=v6, vlan=vlan, flags=0x19)   # PSH|ACK|FIN
    l2 = 18 if vlan else 14
    segs = segment(frame, vnet(gso=4 if v6 else 1, gso_size=1448, hdr_len=l2 + 60))
    assert len(segs) == -(-len(payload) // 1448)
    data, seqs = b"", []
    for i, s in enumerate(segs):
        seq, chunk, flags = check_segment(s, v6, l2)
        seqs.append(seq)
        data += chunk
        last = i == len(segs) - 1
        assert bool(flags & 0x01) == last and bool(flags & 0x08) == last   # FIN, PSH
        if not v6:
            assert struct.unpack("!H", s[l2 + 4:l2 + 6])[0] == 77 + i    # IP id
    assert data == payload
    assert seqs == [1000 + 1448 * i for i in range(len(segs))]


@pytest.mark.parametrize("bad", [b"\x00" * 20, tcp_frame(b"x" * 100)[:40]])
def test_tso_refuses_what_it_cannot_parse(bad):
    assert segment(bad, vnet(gso=1, gso_size=100)) == []


def test_checksum_completion():
    payload = b"hello, offloads" * 7
    frame = tcp_frame(payload)
    tcp_len = 20 + len(payload)
    pseudo = csum(SRC4 + DST4 + struct.pack("!xBH", 6, tcp_len))
    partial = bytearray(frame)
    partial[14 + 20 + 16:14 + 20 + 18] = struct.pack("!H", pseudo)   # as a guest leaves it
    done = complete_checksum(bytes(partial), vnet(start=34, offset=16))
    check_segment(done, False, 14)
    with pytest.raises(ValueError):
        complete_checksum(frame, vnet(start=len(frame) - 1, offset=16))


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=1, max_size=300), st.data())
def test_checksum_of_any_span_matches_the_plain_sum(body, data):
    """Any start (odd or even), any length, any bytes: the completed checksum is the
    one's-complement sum computed here a word at a time."""
    start = data.draw(st.integers(0, len(body) - 1))
    offset = data.draw(st.integers(0, len(body) - start - 2)) if len(body) - start >= 2 \
        else None
    if offset is None:
        return
    frame = bytearray(body)
    seed = bytes(frame[start + offset:start + offset + 2])      # the "pseudo-header" part
    done = complete_checksum(bytes(frame), vnet(start=start, offset=offset))
    span = bytes(frame[start:])
    want = ~csum(span) & 0xFFFF
    assert done[start + offset:start + offset + 2] == struct.pack("!H", want), (seed, want)


@pytest.mark.parametrize("vid", [5, -1], ids=["push", "strip"])
def test_vlan_edit_keeps_the_partial_checksum_right(vid):
    """A tag pushed or popped moves the TCP header: csum_start must move with it, or the
    software checksum lands in the wrong place."""
    from pyvhost._flow import vlan_edit
    payload = b"vlan and offloads" * 9
    tagged = vid < 0
    frame = tcp_frame(payload, vlan=tagged)
    l2 = 18 if tagged else 14
    tcp_len = 20 + len(payload)
    pseudo = csum(SRC4 + DST4 + struct.pack("!xBH", 6, tcp_len))
    partial = bytearray(frame)
    partial[l2 + 20 + 16:l2 + 20 + 18] = struct.pack("!H", pseudo)
    edited, hdr = vlan_edit(bytes(partial), vnet(start=l2 + 20, offset=16), vid)
    new_l2 = 14 if tagged else 18
    assert struct.unpack("<H", hdr[6:8])[0] == new_l2 + 20
    check_segment(complete_checksum(edited, hdr), False, new_l2)


def test_tso_beyond_64_segments():
    payload = bytes(range(256)) * 200                          # 51200 bytes, MSS 536
    segs = segment(tcp_frame(payload), vnet(gso=1, gso_size=536, hdr_len=54))
    assert len(segs) == -(-len(payload) // 536) > 64
    data = b"".join(check_segment(s, False, 14)[1] for s in segs)
    assert data == payload
