"""The OpenFlow 1.3 codec and the switch side of it without ovs-ofctl: HELLO negotiation,
OXM matches and instructions to and from the rule model (round trips, and each malformed
or inexpressible input refused with the spec's error), FLOW_MOD semantics (ADD replacing,
MODIFY, DELETE filters, CHECK_OVERLAP) against a switch run in-process, the connection
(errors answered in order, the connection surviving them, unframeable input and the
inactivity probe closing it), and fuzzing: random and mutated messages never raise, never
hang, and leave the switch answering."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
import threading
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyvhost.openflow import actions as A
from pyvhost.openflow import asyncmsg as AM
from pyvhost.openflow import codec as C
from pyvhost.openflow import errors as E
from pyvhost.openflow import groupmod as G
from pyvhost.openflow import metermod as MM
from pyvhost.openflow import oxm
from pyvhost.openflow import roles as R
from pyvhost.openflow.errors import OFError
from pyvhost.openflow.handler import Handler
from pyvhost.openflow.manager import enable
from pyvhost.switch import Switch, run_command
from pyvhost.switch.flows import (
    VLAN_NONE,
    Flow,
    Instructions,
    Prefix,
    format_action,
    parse_flow,
)
from tests.harness import openflow as O
from tests.harness.fuzzing import Counter, fuzz_settings, minimum

IP4 = lambda s: bytes(int(x) for x in s.split("."))        # noqa: E731


def err(exc_info) -> tuple[int, int]:
    return exc_info.value.type, exc_info.value.code


# -- HELLO -----------------------------------------------------------------------------------

def test_hello_negotiates_1_3_or_refuses():
    assert C.negotiate(4, struct.pack("!HHI", 1, 8, 1 << 1 | 1 << 4)) == 4
    assert C.negotiate(6, struct.pack("!HHI", 1, 8, 1 << 4 | 1 << 6)) == 4
    assert C.negotiate(5, b"") == 4                        # no bitmap: up to the header's
    for version, body in ((1, b""), (4, struct.pack("!HHI", 1, 8, 1 << 1 | 1 << 6)),
                          (4, struct.pack("!HH", 1, 99)), (4, struct.pack("!HH", 1, 2))):
        with pytest.raises(OFError) as e:
            C.negotiate(version, body)
        assert err(e) == (E.HELLO_FAILED, E.HFC_INCOMPATIBLE)
    h = C.hello(7)
    assert C.parse_header(h) == (4, C.HELLO, 16, 7) and C.negotiate(4, h[8:]) == 4
    with pytest.raises(OFError) as e:
        C.parse_header(struct.pack("!BBHI", 4, 0, 7, 0))
    assert err(e) == (E.BAD_REQUEST, E.BRC_BAD_LEN)


# -- OXM --------------------------------------------------------------------------------------

MATCHES = [
    {},
    {"in_port": "3"},
    {"dl_src": bytes.fromhex("020000000001"), "dl_dst": (bytes.fromhex("010000000000"),
                                                           bytes.fromhex("010000000000"))},
    {"dl_vlan": VLAN_NONE, "in_port": "1"},
    {"dl_vlan": 10},
    {"dl_type": 0x0800, "nw_proto": 6, "nw_src": Prefix(IP4("10.1.0.0"), 16),
     "nw_dst": Prefix(IP4("10.0.0.5"), 32), "tp_src": 80, "tp_dst": (0x100, 0xFF00)},
    {"dl_type": 0x0800, "nw_proto": 17, "tp_dst": 53, "ip_dscp": 46},
    {"dl_type": 0x0800, "nw_tos": 0xB9},
    {"dl_type": 0x0800, "nw_proto": 1, "tp_src": 8, "tp_dst": 0},
    {"dl_type": 0x0806, "nw_proto": 1, "nw_src": Prefix(IP4("10.0.0.0"), 8),
     "nw_dst": Prefix(IP4("10.0.0.2"), 32)},
    {"dl_type": 0x86DD},
    {"dl_type": 0x0800, "nw_dst": Prefix(IP4("10.0.0.7"), -1, IP4("255.0.255.255")),
     "nw_src": Prefix(IP4("0.0.0.1"), -1, IP4("0.0.0.255"))},      # masks as OVS takes
]


def test_an_address_mask_that_is_no_prefix_travels_as_it_came():
    """ovs-ofctl sends nw_dst=10.0.0.7/255.0.255.255 as IPV4_DST with that mask: taken as
    that match (it was refused with BAD_NW_ADDR_MASK), and sent back the same."""
    tlvs = IPT + O.oxm(12, IP4("10.0.0.7"), IP4("255.0.255.255"))
    match = oxm.decode(tlvs)
    assert match == {"dl_type": 0x0800,
                     "nw_dst": Prefix(IP4("10.0.0.7"), -1, IP4("255.0.255.255"))}
    assert oxm.encode(match, int) == tlvs
    assert str(match["nw_dst"]) == "10.0.0.7/255.0.255.255"


@pytest.mark.parametrize("match", MATCHES, ids=range(len(MATCHES)))
def test_oxm_round_trip(match):
    tlvs = oxm.encode(match, int)
    assert oxm.decode(tlvs) == match
    m = oxm.match_struct(tlvs)
    assert len(m) % 8 == 0 and oxm.split_match(m, 0) == (tlvs, len(m))
    flow = parse_flow("priority=1,actions=drop")
    flow.match = match
    assert parse_flow(flow.format()).match == match        # the model stores it as it is


def _bad_match(tlvs: bytes, code: int):
    with pytest.raises(OFError) as e:
        oxm.decode(tlvs)
    assert err(e) == (E.BAD_MATCH, code), e.value


IPT = O.oxm(5, b"\x08\x00")


@pytest.mark.parametrize("tlvs,code", [
    (O.oxm(7, b"\x03"), E.BMC_BAD_PREREQ),                             # vlan_pcp, no vid
    (O.oxm(6, b"\x00\x00") + O.oxm(7, b"\x03"), E.BMC_BAD_PREREQ),      # pcp untagged
    (O.oxm(6, b"\x10\x05") + O.oxm(7, b"\x08"), E.BMC_BAD_VALUE),      # pcp 8
    (O.oxm(6, b"\x10\x00", b"\x30\x00"), E.BMC_BAD_MASK),              # vlan mask > 13 bits
    (O.oxm(6, b"\x00\x05", b"\x0f\xff") + O.oxm(7, b"\x03"), E.BMC_BAD_PREREQ),  # no PRESENT
    (O.oxm(24, b"\x02" * 6), E.BMC_BAD_PREREQ),                        # arp_sha, no arp
    (O.oxm(1, bytes(4)), E.BMC_BAD_FIELD),                             # in_phy_port
    (O.oxm(60, b"\x00"), E.BMC_BAD_FIELD),                             # unknown field
    (struct.pack("!I", 0xFFFF << 16 | 1 << 9 | 8) + bytes(8), E.BMC_BAD_FIELD),  # experimenter
    (O.oxm(0, b"\x00\x01"), E.BMC_BAD_LEN),                            # in_port of 2 bytes
    (O.oxm(0, b"\x00\x00\x00\x01")[:-1], E.BMC_BAD_LEN),               # overruns
    (O.oxm(0, b"\x00\x00\x00\x01") + b"\x80\x00", E.BMC_BAD_LEN),      # stray bytes
    (O.oxm(0, b"\x00\x00\x00\x01") * 2, E.BMC_DUP_FIELD),
    (O.oxm(0, b"\xff\xff\xff\xfe"), E.BMC_BAD_VALUE),                  # in_port LOCAL
    (O.oxm(10, b"\x06"), E.BMC_BAD_PREREQ),                            # ip_proto, no eth_type
    (IPT + O.oxm(14, b"\x00\x50"), E.BMC_BAD_PREREQ),                  # tcp_dst, no ip_proto
    (IPT + O.oxm(10, b"\x11") + O.oxm(14, b"\x00\x50"), E.BMC_BAD_PREREQ),   # tcp on udp
    (O.oxm(5, b"\x08\x06") + O.oxm(11, IP4("1.2.3.4")), E.BMC_BAD_PREREQ),   # ipv4 on arp
    (IPT + O.oxm(11, IP4("1.2.3.0"), IP4("255.0.255.0")), E.BMC_BAD_WILDCARDS),  # any mask
    (IPT + O.oxm(11, IP4("1.2.3.4"), IP4("255.255.0.0")), E.BMC_BAD_WILDCARDS),
    (O.oxm(5, b"\x08\x00", b"\xff\x00"), E.BMC_BAD_MASK),              # eth_type masked
    (O.oxm(6, b"\x00\x05"), E.BMC_BAD_VALUE),                          # vid without PRESENT
    (IPT + O.oxm(9, b"\x04"), E.BMC_BAD_VALUE),                        # ip_ecn 4
    (IPT + O.oxm(8, b"\x40"), E.BMC_BAD_VALUE),                        # dscp 64
    (O.oxm(5, b"\x86\xdd") + O.oxm(10, b"\x06"), E.BMC_BAD_FIELD),     # IPv6 ip_proto
    (O.oxm(5, b"\x08\x06") + O.oxm(21, b"\x01\x00"), E.BMC_BAD_VALUE),  # arp_op 256
], ids=lambda v: v.hex() if isinstance(v, bytes) else str(v))
def test_oxm_refusals(tlvs, code):
    _bad_match(tlvs, code)


def test_match_struct_refusals():
    for data, code in ((struct.pack("!HH", 0, 8) + bytes(4), E.BMC_BAD_TYPE),
                       (struct.pack("!HH", 1, 3) + bytes(4), E.BMC_BAD_LEN),
                       (struct.pack("!HH", 1, 20) + bytes(4), E.BMC_BAD_LEN),
                       (b"\x00\x01", E.BMC_BAD_LEN)):
        with pytest.raises(OFError) as e:
            oxm.split_match(data, 0)
        assert err(e) == (E.BAD_MATCH, code)


# -- instructions and actions ----------------------------------------------------------------

PUSH = struct.pack("!HHH2x", 17, 8, 0x8100)
POP = struct.pack("!HH4x", 18, 8)
SET_VID = lambda vid: struct.pack("!HHIH6x", 25, 16, 0x8000 << 16 | 6 << 9 | 2, vid)  # noqa: E731
UNTAGGED, TAGGED = {"dl_vlan": VLAN_NONE}, {"dl_vlan": 7}


def WRITE(*actions: bytes) -> bytes:  # noqa: N802 (an instruction, as O.apply_actions)
    body = b"".join(actions)
    return struct.pack("!HH4x", 3, 8 + len(body)) + body


def test_instructions_decode_to_the_model():
    ins = O.apply_actions(O.output(2), O.output(C.OFPP_FLOOD), O.output(C.OFPP_ALL),
                          O.output(C.OFPP_NORMAL)) + O.goto(5)
    assert A.decode_instructions(ins, 1, {}) == \
        ((("output", "2"), ("flood",), ("flood",), ("normal",)), 5)
    assert A.decode_instructions(O.apply_actions(PUSH, SET_VID(0x1014), O.output(1)), 0,
                                 UNTAGGED)[0] == (("mod_vlan_vid", 20), ("output", "1"))
    assert A.decode_instructions(O.apply_actions(PUSH, O.output(1)), 0,
                                 UNTAGGED)[0] == (("mod_vlan_vid", 0), ("output", "1"))
    assert A.decode_instructions(O.apply_actions(SET_VID(0x1003), POP, O.output(1)), 0,
                                 TAGGED)[0] == (("mod_vlan_vid", 3), ("strip_vlan",),
                                                ("output", "1"))
    assert A.decode_instructions(b"", 0, {}) == ((), None)              # drop
    assert A.decode_instructions(O.apply_actions(O.output(2)) + struct.pack("!HHI", 6, 8, 9),
                                 0, {}) == ((("meter", 9), ("output", "2")), None)


@pytest.mark.parametrize("actions,match", [
    ((("output", "2"), ("flood",), ("normal",)), {}),
    ((("mod_vlan_vid", 20), ("output", "1")), UNTAGGED),
    ((("mod_vlan_vid", 3), ("output", "1"), ("strip_vlan",), ("output", "2")), TAGGED),
    ((), {}),
    ((("meter", 3), ("output", "2")), {}),
    ((("meter", 0xFFFF0000),), {}),
])
def test_instructions_round_trip(actions, match):
    for goto in (None, 9):
        data = A.encode_instructions(actions, goto, match, int)
        assert A.decode_instructions(data, 2, match) == (actions, goto)


@pytest.mark.parametrize("actions,text", [
    ((("set_field", "eth_src", b"\x02\x00\x00\x00\x00\x09"),
      ("set_field", "eth_dst", b"\xff" * 6)), ""),
    ((("set_field", "ip_src", bytes([10, 0, 0, 9])), ("set_field", "ip_dst", bytes(4)),
      ("set_field", "ip_dscp", 46), ("dec_ttl",)), "ip"),
    ((("set_field", "tcp_src", 1), ("set_field", "tcp_dst", 0xFFFF)), "tcp"),
    ((("set_field", "udp_src", 53), ("set_field", "udp_dst", 0)), "udp"),
    ((("set_field", "vlan_pcp", 7), ("output", "1")), "dl_vlan=7"),
    ((("mod_vlan_vid", 9), ("set_field", "vlan_pcp", 3)), "dl_vlan=0xffff"),
    ((("set_field", "vlan_pcp", 3), ("output", "1")), "dl_vlan_pcp=5"),   # (implies a tag)
])
def test_set_field_and_dec_ttl_round_trip(actions, text):
    """OpenFlow's form and back, and the model's text and back, say the same."""
    flow = parse_flow(f"priority=1,{text + ',' if text else ''}"
                      f"actions={','.join(map(format_action, actions))}")
    assert flow.actions == actions
    data = A.encode_actions(actions, flow.match, int)
    assert A.decode_actions(data, flow.match) == actions


@pytest.mark.parametrize("inst,match", [
    (Instructions(write_actions=(("output", "2"), ("group", 4))), {}),
    (Instructions(clear_actions=True), {}),
    (Instructions(write_metadata=(0x5, 0xFF)), {}),
    (Instructions((("mod_vlan_vid", 3), ("strip_vlan",), ("controller", 64)), True,
                  (0, (1 << 64) - 1)), TAGGED),
])
def test_write_clear_and_metadata_instructions_round_trip(inst, match):
    for actions, goto in (((), None), ((("output", "1"),), 7), ((("meter", 2),), None)):
        data = A.encode_instructions(actions, goto, match, int, inst)
        assert A.decode_flow_instructions(data, 2, match) == (actions, goto, inst)
        with pytest.raises(OFError) as e:                # (the two-part form takes none)
            A.decode_instructions(data, 2, match)
        assert (e.value.type, e.value.code) == (E.BAD_INSTRUCTION, E.BIC_UNSUP_INST)


@pytest.mark.parametrize("ins,code", [
    (struct.pack("!HH4xQ", 2, 16, 1), E.BIC_BAD_LEN),               # write_metadata short
    (struct.pack("!HH4xQQ", 2, 24, 3, 1), E.BIC_UNSUP_METADATA),    # value outside mask
    (struct.pack("!HH4xQ", 5, 16, 0), E.BIC_BAD_LEN),                # clear_actions long
    (WRITE(O.output(1)) * 2, E.BIC_UNSUP_INST),                      # twice
])
def test_write_instruction_refusals(ins, code):
    with pytest.raises(OFError) as e:
        A.decode_flow_instructions(ins, 0, {})
    assert (e.value.type, e.value.code) == (E.BAD_INSTRUCTION, code)


def test_wide_set_fields_count_as_the_ops_they_take():
    """A MAC takes three datapath ops: eleven set_field eth_src (33) are too many, ten (30)
    fit, and with apply- and write-actions counted together."""
    eth = struct.pack("!HHI6s2x", 25, 16, 0x8000 << 16 | 4 << 9 | 6, b"\x02" * 6)
    assert len(A.decode_actions(eth * 10, {})) == 10
    for ins in (O.apply_actions(*[eth] * 11),
                O.apply_actions(*[eth] * 6) + WRITE(*[eth] * 5)):
        with pytest.raises(OFError) as e:
            A.decode_flow_instructions(ins, 0, {})
        assert (e.value.type, e.value.code) == (E.BAD_ACTION, E.BAC_TOO_MANY)


@pytest.mark.parametrize("match", [
    {"metadata": 5}, {"metadata": (0x10, 0xF0)}, {"metadata": (0, 1)},
    {"dl_vlan_pcp": 3}, {"dl_vlan": 5, "dl_vlan_pcp": 7},
    {"vlan_tci": (0x1000, 0x1000)}, {"vlan_tci": (0x1010, 0x1FF0)},
    {"vlan_tci": (0x7000, 0xFF00)}, {"vlan_tci": (0, 0x1000)}, {"vlan_tci": (5, 0x0FFF)},
    {"dl_type": 0x0800, "nw_ecn": 2}, {"dl_type": 0x0800, "ip_dscp": 46, "nw_ecn": 1},
    {"dl_type": 0x0806, "arp_sha": b"\x02" * 6,
     "arp_tha": (b"\x02" * 5 + b"\x00", b"\xff" * 5 + b"\x00")},
])
def test_pipeline_matches_round_trip(match):
    """metadata, vlan_pcp (alone: vlan_vid PRESENT/PRESENT, as OVS sends it), a masked
    vlan_vid (any tag, VID ranges, with a vlan_pcp), ip_ecn,
    arp_sha/arp_tha: OXM and back, the model's text and back."""
    tlvs = oxm.encode(match, int)
    got = oxm.decode(tlvs)
    if "ip_dscp" in match and "nw_ecn" in match:          # both: the whole TOS byte
        assert got == {"dl_type": 0x0800, "nw_tos": 46 << 2 | 1}
    else:
        assert got == match
    flow = parse_flow(Flow(1, got, (("output", "1"),)).format())
    assert flow.match == got


@pytest.mark.parametrize("ins,match,want", [
    (O.apply_actions(O.output(C.OFPP_TABLE)), {}, (E.BAD_ACTION, E.BAC_BAD_OUT_PORT)),
    (O.apply_actions(O.output(C.OFPP_ANY)), {}, (E.BAD_ACTION, E.BAC_BAD_OUT_PORT)),
    (O.apply_actions(struct.pack("!HHIH6x", 0, 16, C.OFPP_CONTROLLER, 0xFFF0)), {},
     (E.BAD_ACTION, E.BAC_BAD_ARGUMENT)),
    (O.apply_actions(O.output(C.OFPP_LOCAL)), {}, (E.BAD_ACTION, E.BAC_BAD_OUT_PORT)),
    (O.apply_actions(O.output(C.OFPP_TABLE)), {}, (E.BAD_ACTION, E.BAC_BAD_OUT_PORT)),
    (O.apply_actions(O.output(0)), {}, (E.BAD_ACTION, E.BAC_BAD_OUT_PORT)),
    (O.apply_actions(struct.pack("!HHI", 22, 8, 0xFFFFFFFC)), {},
     (E.BAD_ACTION, E.BAC_BAD_OUT_GROUP)),
    (O.apply_actions(struct.pack("!HHI8x", 22, 16, 1)), {}, (E.BAD_ACTION, E.BAC_BAD_LEN)),
    (O.apply_actions(struct.pack("!HHB3x", 23, 8, 0)), {}, (E.BAD_ACTION, E.BAC_BAD_TYPE)),
    (O.apply_actions(struct.pack("!HH4x", 99, 8)), {}, (E.BAD_ACTION, E.BAC_BAD_TYPE)),
    (O.apply_actions(struct.pack("!HHI", 0xFFFF, 8, 0x2320)), {},
     (E.BAD_ACTION, E.BAC_BAD_EXPERIMENTER)),
    (O.apply_actions(struct.pack("!HH4x", 0, 8)), {}, (E.BAD_ACTION, E.BAC_BAD_LEN)),
    (O.apply_actions(struct.pack("!HHIH6x", 0, 24, 1, 0)), {}, (E.BAD_ACTION, E.BAC_BAD_LEN)),
    (O.apply_actions(struct.pack("!HH", 0, 0) + bytes(12)), {}, (E.BAD_ACTION, E.BAC_BAD_LEN)),
    (O.apply_actions(PUSH), {}, (E.BAD_ACTION, E.BAC_MATCH_INCONSISTENT)),
    (O.apply_actions(PUSH), TAGGED, (E.BAD_ACTION, E.BAC_BAD_TAG)),
    (O.apply_actions(struct.pack("!HHH2x", 17, 8, 0x88A8)), UNTAGGED,
     (E.BAD_ACTION, E.BAC_BAD_ARGUMENT)),
    (O.apply_actions(POP), {}, (E.BAD_ACTION, E.BAC_MATCH_INCONSISTENT)),
    (O.apply_actions(SET_VID(0x1005)), UNTAGGED, (E.BAD_ACTION, E.BAC_MATCH_INCONSISTENT)),
    (O.apply_actions(SET_VID(0x0005)), TAGGED, (E.BAD_ACTION, E.BAC_BAD_SET_ARGUMENT)),
    (O.apply_actions(struct.pack("!HHIH6x", 25, 16, 0x8000 << 16 | 21 << 9 | 2, 1)),
     {}, (E.BAD_ACTION, E.BAC_BAD_SET_TYPE)),                       # arp_op: not settable
    (O.apply_actions(struct.pack("!HHI4s4x", 25, 16, 0x8000 << 16 | 11 << 9 | 4, bytes(4))),
     {}, (E.BAD_ACTION, E.BAC_MATCH_INCONSISTENT)),                 # ipv4_src without ip
    (O.apply_actions(struct.pack("!HHIH6x", 25, 16, 0x8000 << 16 | 13 << 9 | 2, 80)),
     {"dl_type": 0x0800, "nw_proto": 17}, (E.BAD_ACTION, E.BAC_MATCH_INCONSISTENT)),
    (O.apply_actions(struct.pack("!HHIB7x", 25, 16, 0x8000 << 16 | 7 << 9 | 1, 3)),
     UNTAGGED, (E.BAD_ACTION, E.BAC_MATCH_INCONSISTENT)),          # vlan_pcp untagged
    (O.apply_actions(struct.pack("!HHIB7x", 25, 16, 0x8000 << 16 | 8 << 9 | 1, 64)),
     {"dl_type": 0x0800}, (E.BAD_ACTION, E.BAC_BAD_SET_ARGUMENT)),  # dscp 64
    (O.apply_actions(struct.pack("!HHI6s2x", 25, 16, 0x8000 << 16 | 3 << 9 | 0x10C,
                                 bytes(6) * 2)[:16]),
     {}, (E.BAD_ACTION, E.BAC_BAD_SET_LEN)),                        # eth_dst masked
    (O.apply_actions(struct.pack("!HH4x", 24, 16) + bytes(8)), {},
     (E.BAD_ACTION, E.BAC_BAD_LEN)),                                 # dec_nw_ttl long
    (O.apply_actions(struct.pack("!HHI", 25, 8, 0x8000 << 16 | 6 << 9 | 2)),
     TAGGED, (E.BAD_ACTION, E.BAC_BAD_SET_LEN)),
    (O.apply_actions(*[O.output(1)] * 33), {}, (E.BAD_ACTION, E.BAC_TOO_MANY)),
    (O.goto(0), {}, (E.BAD_INSTRUCTION, E.BIC_BAD_TABLE_ID)),
    (O.goto(255), {}, (E.BAD_INSTRUCTION, E.BIC_BAD_TABLE_ID)),
    (O.goto(3) + O.goto(4), {}, (E.BAD_INSTRUCTION, E.BIC_UNSUP_INST)),
    (struct.pack("!HH4x", 3, 8), {}, (E.BAD_INSTRUCTION, E.BIC_UNSUP_INST)),   # write
    (struct.pack("!HH4x", 5, 8), {}, (E.BAD_INSTRUCTION, E.BIC_UNSUP_INST)),   # clear
    (struct.pack("!HH4xQQ", 2, 24, 1, 1), {}, (E.BAD_INSTRUCTION, E.BIC_UNSUP_INST)),
    (struct.pack("!HHI", 6, 8, 0), {}, (E.METER_MOD_FAILED, E.MMFC_INVALID_METER)),
    (struct.pack("!HHI", 6, 8, 0xFFFF0001), {}, (E.METER_MOD_FAILED, E.MMFC_INVALID_METER)),
    (struct.pack("!HHI4x", 6, 16, 1), {}, (E.BAD_INSTRUCTION, E.BIC_BAD_LEN)),
    (struct.pack("!HHI", 6, 8, 1) * 2, {}, (E.BAD_INSTRUCTION, E.BIC_UNSUP_INST)),
    (struct.pack("!HHI", 6, 8, 1) + O.apply_actions(*[O.output(1)] * 32), {},
     (E.BAD_ACTION, E.BAC_TOO_MANY)),
    (struct.pack("!HH4x", 77, 8), {}, (E.BAD_INSTRUCTION, E.BIC_UNKNOWN_INST)),
    (struct.pack("!HHI", 0xFFFF, 8, 1), {}, (E.BAD_INSTRUCTION, E.BIC_BAD_EXPERIMENTER)),
    (struct.pack("!HH", 1, 6) + bytes(2), {}, (E.BAD_INSTRUCTION, E.BIC_BAD_LEN)),
    (O.goto(3)[:6], {}, (E.BAD_INSTRUCTION, E.BIC_BAD_LEN)),
    (struct.pack("!HH4x", 4, 16), {}, (E.BAD_INSTRUCTION, E.BIC_BAD_LEN)),
], ids=lambda v: v.hex() if isinstance(v, bytes) else str(v))
def test_instruction_refusals(ins, match, want):
    with pytest.raises(OFError) as e:
        A.decode_instructions(ins, 2, match)
    assert err(e) == want, e.value


# -- the switch in-process -------------------------------------------------------------------

class Running:
    """A Switch with bridge br0 and ports a (1), b (2) on an asyncio loop in a thread,
    OpenFlow listening on a loopback port."""

    def __init__(self, run_dir, probe_ms: int = 5000):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.sw = None
        try:
            self.sw = self.call(self._start(run_dir, probe_ms))
        except BaseException:
            self.close()
            raise
        address = self.sw.openflow.bridges["br0"].listeners[0].address
        self.port = int(address.rsplit(":", 1)[1])

    async def _start(self, run_dir, probe_ms):
        sw = Switch(run_dir)
        enable(sw)
        await sw.start()
        for argv in (["add-br", "br0"], ["add-port", "br0", "a", "type=vhostuser", "queues=1"],
                     ["add-port", "br0", "b", "type=vhostuser", "queues=1"],
                     ["set-controller", "br0", "ptcp:0:127.0.0.1",
                      f"inactivity_probe={probe_ms}"]):
            await run_command(sw, argv)
        return sw

    def call(self, coro, timeout: float = 30.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def ctl(self, *argv: str) -> str:
        return self.call(run_command(self.sw, list(argv)))

    def client(self, **kw) -> O.Client:
        return O.Client("127.0.0.1", self.port, **kw)

    def close(self) -> None:
        if self.sw is not None:
            with contextlib.suppress(Exception):
                self.call(self.sw.openflow.close())
            self.call(self.sw.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def running(tmp_path):
    r = Running(tmp_path / "run")
    try:
        yield r
    finally:
        r.close()


def flows(r: Running) -> str:
    return r.ctl("dump-flows", "--no-stats", "br0")


IN1 = O.match(O.oxm(0, struct.pack("!I", 1)))
TO2 = O.apply_actions(O.output(2))
PACKET_IN, FLOW_REMOVED, PORT_STATUS = 10, 11, 12    # asynchronous: may come any time
TO2_ACT = O.output(2)


def GMOD(command: int, gtype: int, gid: int, *buckets: bytes, xid: int = 1) -> bytes:  # noqa: N802
    return O.msg(15, struct.pack("!HBxI", command, gtype, gid) + b"".join(buckets), xid)


def BUCKET(actions: bytes, weight: int = 0, watch_port: int = C.OFPP_ANY,  # noqa: N802
           watch_group: int = 0xFFFFFFFF) -> bytes:
    return struct.pack("!HHII4x", 16 + len(actions), weight, watch_port, watch_group) + actions


FRAME = bytes.fromhex("020000000002020000000001") + b"\x08\x00" + bytes(46)


def test_flow_mods_follow_the_spec(running):
    r = running
    with r.client() as c:
        assert c.error_of(O.flow_mod(O.ADD, IN1, TO2, priority=10, cookie=0x77, idle=30)) is None
        assert " cookie=0x77, idle_timeout=30, priority=10,in_port=1 actions=output:2" in flows(r)
        rule = next(x for x in r.sw.bridges["br0"].rules.values() if "in_port=1" in x.text)
        created = rule.created
        time.sleep(0.05)
        # ADD of the same match and priority replaces it: the same rule (counters carry
        # over), a new duration, the new cookie and actions
        assert c.error_of(O.flow_mod(O.ADD, IN1, O.apply_actions(O.output(C.OFPP_FLOOD)),
                                     priority=10, cookie=0x78)) is None
        assert "cookie=0x78, priority=10,in_port=1 actions=flood" in flows(r)
        assert rule.id in r.sw.bridges["br0"].rules and rule.created > created
        # ... unless RESET_COUNTS: a new rule
        assert c.error_of(O.flow_mod(O.ADD, IN1, TO2, priority=10, flags=4)) is None
        assert rule.id not in r.sw.bridges["br0"].rules or \
            r.sw.bridges["br0"].rules[rule.id].text != rule.text
        # CHECK_OVERLAP: in_port=1 at priority 10 overlaps a rule matching everything
        assert c.error_of(O.flow_mod(O.ADD, O.match(), TO2, priority=10, flags=2)) == \
            (E.FLOW_MOD_FAILED, E.FMFC_OVERLAP)
        assert c.error_of(O.flow_mod(O.ADD, O.match(), TO2, priority=11, flags=2)) is None
        assert c.error_of(O.flow_mod(O.DELETE_STRICT, O.match(), priority=11)) is None
        # MODIFY (non-strict) changes actions only: cookie and timeouts stay
        assert c.error_of(O.flow_mod(O.ADD, O.match(O.oxm(0, struct.pack("!I", 2))), TO2,
                                     priority=20, cookie=0x5, hard=99)) is None
        assert c.error_of(O.flow_mod(O.MODIFY, O.match(),
                                     O.apply_actions(O.output(1)), cookie=0x5,
                                     cookie_mask=0xFF)) is None
        text = flows(r)
        assert "cookie=0x5, hard_timeout=99, priority=20,in_port=2 actions=output:1" in text
        assert "priority=10,in_port=1 actions=output:2" in text        # cookie 0: untouched
        # MODIFY_STRICT wants the priority and match exactly; nothing matching: no change
        assert c.error_of(O.flow_mod(O.MODIFY_STRICT, IN1, O.apply_actions(O.output(1)),
                                     priority=11)) is None
        assert flows(r) == text
        # DELETE with out_port, on every table
        assert c.error_of(O.flow_mod(O.ADD, IN1, O.goto(4), priority=30)) is None
        assert c.error_of(O.flow_mod(O.ADD, O.match(), TO2, table=4, priority=1)) is None
        assert c.error_of(O.flow_mod(O.DELETE, O.match(), table=0xFF, out_port=2)) is None
        text = flows(r)
        assert "output:2" not in text and "goto_table:4" in text and "in_port=2" in text, text
        assert c.error_of(O.flow_mod(O.DELETE, IN1, table=0xFF)) is None
        assert "in_port=1" not in flows(r)
        assert c.alive()


@pytest.mark.parametrize("data,want", [
    (O.flow_mod(7), (E.FLOW_MOD_FAILED, E.FMFC_BAD_COMMAND)),
    (O.flow_mod(O.ADD, flags=0x40), (E.FLOW_MOD_FAILED, E.FMFC_BAD_FLAGS)),
    (O.flow_mod(O.ADD, table=0xFF), (E.FLOW_MOD_FAILED, E.FMFC_BAD_TABLE_ID)),
    (O.flow_mod(O.ADD, buffer_id=5), (E.BAD_REQUEST, E.BRC_BUFFER_UNKNOWN)),
    (O.flow_mod(O.ADD, IN1, O.apply_actions(O.output(9))), (E.BAD_ACTION, E.BAC_BAD_OUT_PORT)),
    (O.flow_mod(O.ADD, O.match(O.oxm(0, struct.pack("!I", 9))), TO2),
     (E.BAD_MATCH, E.BMC_BAD_VALUE)),
    (O.flow_mod(O.ADD, O.match(O.oxm(1, bytes(4))), TO2), (E.BAD_MATCH, E.BMC_BAD_FIELD)),
    (O.flow_mod(O.ADD, struct.pack("!HH4x", 1, 40)), (E.BAD_MATCH, E.BMC_BAD_LEN)),
    (O.msg(O.FLOW_MOD, bytes(20)), (E.BAD_REQUEST, E.BRC_BAD_LEN)),
    (O.msg(O.FEATURES_REQUEST, b"x"), (E.BAD_REQUEST, E.BRC_BAD_LEN)),
    (O.msg(O.SET_CONFIG, b"\x00\x00"), (E.BAD_REQUEST, E.BRC_BAD_LEN)),
    (O.msg(O.SET_CONFIG, b"\x00\x04\x00\x80"), (E.SWITCH_CONFIG_FAILED, E.SCFC_BAD_FLAGS)),
    (O.msg(13, bytes(16)), (E.BAD_REQUEST, E.BRC_BUFFER_UNKNOWN)),           # PACKET_OUT
    (O.msg(13, bytes(8)), (E.BAD_REQUEST, E.BRC_BAD_LEN)),
    (O.packet_out(1, O.output(2), FRAME, actions_len=200), (E.BAD_REQUEST, E.BRC_BAD_LEN)),
    (O.packet_out(1, O.output(2), FRAME, actions_len=12), (E.BAD_REQUEST, E.BRC_BAD_LEN)),
    (O.packet_out(1, O.output(2), FRAME[:13]), (E.BAD_REQUEST, E.BRC_BAD_PACKET)),
    (O.packet_out(0, O.output(2), FRAME), (E.BAD_REQUEST, E.BRC_BAD_PORT)),
    (O.packet_out(9, O.output(2), FRAME), (E.BAD_REQUEST, E.BRC_BAD_PORT)),
    (O.packet_out(1, O.output(9), FRAME), (E.BAD_ACTION, E.BAC_BAD_OUT_PORT)),
    (O.packet_out(1, O.output(C.OFPP_ANY), FRAME), (E.BAD_ACTION, E.BAC_BAD_OUT_PORT)),
    (O.packet_out(1, struct.pack("!HH4x", 0, 8), FRAME), (E.BAD_ACTION, E.BAC_BAD_LEN)),
    (O.packet_out(1, struct.pack("!HH4x", 17, 8), FRAME), (E.BAD_ACTION, E.BAC_BAD_ARGUMENT)),
    (O.packet_out(1, struct.pack("!HHI", 22, 8, 1), FRAME), (E.BAD_ACTION, E.BAC_BAD_TYPE)),
    (O.msg(15, bytes(6)), (E.BAD_REQUEST, E.BRC_BAD_LEN)),                   # GROUP_MOD
    (GMOD(9, 0, 1), (E.GROUP_MOD_FAILED, 11)),                              # BAD_COMMAND
    (GMOD(0, 7, 1), (E.GROUP_MOD_FAILED, 10)),                              # BAD_TYPE
    (GMOD(0, 0, 0xFFFFFF01), (E.GROUP_MOD_FAILED, 1)),                      # INVALID_GROUP
    (GMOD(0, 2, 1, BUCKET(TO2_ACT), BUCKET(TO2_ACT)), (E.GROUP_MOD_FAILED, 12)),
    (GMOD(0, 0, 1, BUCKET(TO2_ACT)[:8]), (E.GROUP_MOD_FAILED, 12)),         # BAD_BUCKET
    (GMOD(0, 0, 1, BUCKET(TO2_ACT, weight=3)), (E.GROUP_MOD_FAILED, 12)),
    (GMOD(0, 3, 1, BUCKET(TO2_ACT)), (E.GROUP_MOD_FAILED, 13)),             # BAD_WATCH
    (GMOD(0, 3, 1, BUCKET(TO2_ACT, watch_port=C.OFPP_TABLE)), (E.GROUP_MOD_FAILED, 13)),
    (GMOD(0, 0, 1, BUCKET(TO2_ACT, watch_group=4)), (E.GROUP_MOD_FAILED, 6)),
    (GMOD(0, 0, 1, BUCKET(struct.pack("!HHI", 22, 8, 2))), (E.GROUP_MOD_FAILED, 5)),
    (GMOD(1, 0, 77, BUCKET(TO2_ACT)), (E.GROUP_MOD_FAILED, 8)),             # UNKNOWN_GROUP
    (GMOD(0, 0, 1, BUCKET(O.output(9))), (E.BAD_ACTION, E.BAC_BAD_OUT_PORT)),
    (GMOD(0, 0, 1, BUCKET(O.output(C.OFPP_NORMAL))), (E.BAD_ACTION, E.BAC_BAD_OUT_PORT)),
    (GMOD(0, 0, 1, BUCKET(PUSH + O.output(2))), (E.BAD_ACTION, E.BAC_MATCH_INCONSISTENT)),
    (O.flow_mod(O.ADD, IN1, O.apply_actions(struct.pack("!HHI", 22, 8, 5))),
     (E.BAD_ACTION, E.BAC_BAD_OUT_GROUP)),
    (O.multipart(6, bytes(3)), (E.BAD_REQUEST, E.BRC_BAD_LEN)),             # GROUP stats
    (O.multipart(8, b"x"), (E.BAD_REQUEST, E.BRC_BAD_LEN)),                 # GROUP_FEATURES
    (O.msg(6, bytes(24)), (E.BAD_REQUEST, E.BRC_BAD_TYPE)),                  # a reply
    (O.msg(99), (E.BAD_REQUEST, E.BRC_BAD_TYPE)),
    (O.msg(4, bytes(8)), (E.BAD_REQUEST, E.BRC_BAD_EXPERIMENTER)),
    (O.msg(O.FEATURES_REQUEST, version=1), (E.BAD_REQUEST, E.BRC_BAD_VERSION)),
    (O.multipart(9), (E.BAD_REQUEST, E.BRC_BAD_LEN)),                       # meter
    (O.multipart(5), (E.BAD_REQUEST, E.BRC_BAD_MULTIPART)),                 # queue
    (O.multipart(0xFFFF, bytes(8)), (E.BAD_REQUEST, E.BRC_BAD_EXPERIMENTER)),
    (O.multipart(0, flags=1), (E.BAD_REQUEST, E.BRC_BAD_MULTIPART)),
    (O.multipart(0, b"x"), (E.BAD_REQUEST, E.BRC_BAD_LEN)),
    (O.multipart(1, bytes(10)), (E.BAD_REQUEST, E.BRC_BAD_LEN)),
    (O.multipart(4, bytes(4)), (E.BAD_REQUEST, E.BRC_BAD_LEN)),
    (O.multipart(4, struct.pack("!I4x", 77)), (E.BAD_REQUEST, E.BRC_BAD_PORT)),
    (O.multipart(12, bytes(64)), (E.TABLE_FEATURES_FAILED, 5)),
    (O.msg(O.MULTIPART_REQUEST, b"\x00"), (E.BAD_REQUEST, E.BRC_BAD_LEN)),
])
def test_refused_requests_get_the_spec_error_and_the_connection_goes_on(running, data, want):
    with running.client() as c:
        c.send(data)
        t, xid, body = c.recv()
        assert t == O.ERROR and xid == struct.unpack_from("!I", data, 4)[0]
        assert struct.unpack_from("!HH", body) == want
        assert body[4:] == data[:64]                         # the request, as the data
        assert c.alive()


def test_requests_are_answered_in_order(running):
    """A pipeline of requests, good and bad, is answered in the order it was sent."""
    with running.client() as c:
        batch = b"".join([O.msg(O.FEATURES_REQUEST, xid=1), O.flow_mod(9, xid=2),
                          O.msg(O.ECHO_REQUEST, xid=3), O.multipart(0, xid=4),
                          O.flow_mod(O.ADD, IN1, TO2, xid=5), O.msg(O.BARRIER_REQUEST, xid=6),
                          O.msg(O.GET_CONFIG_REQUEST, xid=7),
                          O.flow_stats_request(aggregate=True, xid=8)])
        c.send(batch)
        got = [c.recv()[:2] for _ in range(7)]
        assert got == [(O.FEATURES_REPLY, 1), (O.ERROR, 2), (O.ECHO_REPLY, 3),
                       (O.MULTIPART_REPLY, 4), (O.BARRIER_REPLY, 6),
                       (O.GET_CONFIG_REPLY, 7), (O.MULTIPART_REPLY, 8)]


def test_flow_stats_and_multiparts(running):
    r = running
    r.ctl("add-flow", "br0", "table=2,cookie=0x9,priority=5,in_port=a,udp,tp_dst=53,"
          "actions=output:b")
    with r.client() as c:
        t, _, body = c.request(O.flow_stats_request(2))
        assert t == O.MULTIPART_REPLY and struct.unpack_from("!HH", body) == (1, 0)
        length, table, _, _, priority, idle, hard, flags, cookie, n, b = \
            struct.unpack_from("!HBxIIHHHH4xQQQ", body, 8)
        assert (table, priority, cookie, n, b) == (2, 5, 9, 0, 0) and length == len(body) - 8
        tlvs, end = oxm.split_match(body, 8 + 48)
        assert oxm.decode(tlvs) == {"in_port": "1", "dl_type": 0x0800, "nw_proto": 17,
                                    "tp_dst": 53}
        assert A.decode_instructions(body[end:], 2, {}) == ((("output", "2"),), None)
        # filtered by cookie, by out_port, by match
        for req, n_flows in ((O.flow_stats_request(cookie=9, cookie_mask=0xF), 1),
                             (O.flow_stats_request(cookie=8, cookie_mask=0xF), 0),
                             (O.flow_stats_request(out_port=2), 1),
                             (O.flow_stats_request(out_port=1), 0),
                             (O.flow_stats_request(m=IN1), 1),
                             (O.flow_stats_request(), 2)):
            t, _, body = c.request(req[:8] + struct.pack("!H", 2) + req[10:])   # aggregate
            assert t == O.MULTIPART_REPLY
            assert struct.unpack_from("!QQI", body, 8)[2] == n_flows
        # TABLE_FEATURES: every table, with its 8 properties, over several messages
        c.send(O.multipart(12))
        tables, more = [], 1
        while more:
            t, _, body = c.recv()
            more = struct.unpack_from("!HH", body)[1] & 1
            off = 8
            while off < len(body):
                length, table = struct.unpack_from("!HB", body, off)
                props, poff = set(), off + 64
                while poff < off + length:
                    ptype, plen = struct.unpack_from("!HH", body, poff)
                    props.add(ptype)
                    poff += (plen + 7) // 8 * 8
                assert props == {0, 2, 4, 6, 8, 10, 12, 14}
                tables.append(table)
                off += length
        assert tables == list(range(255))
        t, _, body = c.request(O.multipart(13))
        names = [body[8 + 64 * i + 16:8 + 64 * i + 32].rstrip(b"\0") for i in range(2)]
        assert t == O.MULTIPART_REPLY and names == [b"a", b"b"]
        t, _, body = c.request(O.multipart(4, struct.pack("!I4x", O.ANY)))
        assert t == O.MULTIPART_REPLY and len(body) == 8 + 2 * 112


def test_unframeable_length_truncation_and_probe_close_the_connection(tmp_path, caplog):
    r = Running(tmp_path / "run", probe_ms=300)
    try:
        with r.client() as c:                     # a length below 8: ERROR, then closed
            c.send(struct.pack("!BBHI", 4, 5, 4, 9))
            t, _, body = c.recv()
            assert t == O.ERROR and struct.unpack_from("!HH", body) == \
                (E.BAD_REQUEST, E.BRC_BAD_LEN)
            assert c.closed()
        with r.client() as c:                     # the probe: an ECHO_REQUEST, then close
            t, xid, _ = c.recv()
            assert t == O.ECHO_REQUEST
            c.send(O.msg(O.ECHO_REPLY, xid=xid))
            assert c.recv()[0] == O.ECHO_REQUEST  # answered: the connection stays
            assert c.closed(5)                    # unanswered: closed
        with r.client(do_hello=False) as c:       # not a HELLO first: HELLO_FAILED
            c.send(O.msg(O.FEATURES_REQUEST))
            assert c.recv()[0] == O.HELLO
            t, _, body = c.recv()
            assert t == O.ERROR and struct.unpack_from("!HH", body)[0] == E.HELLO_FAILED
            assert c.closed()
        with r.client(do_hello=False) as c:       # OpenFlow 1.0 only: HELLO_FAILED
            c.send(O.hello((1,), version=1))
            assert c.recv()[0] == O.HELLO
            t, _, body = c.recv()
            assert t == O.ERROR and struct.unpack_from("!HH", body) == \
                (E.HELLO_FAILED, E.HFC_INCOMPATIBLE)
            assert c.closed()
        with r.client() as c:                     # a body that never comes: closed
            c.send(struct.pack("!BBHI", 4, 14, 200, 1) + bytes(20))
            assert c.closed(15)
        with r.client() as c, r.client() as d:    # and others were served all along
            assert c.alive() and d.alive()
    finally:
        r.close()
    assert "internal error" not in caplog.text and "Traceback" not in caplog.text


# -- fuzzing ---------------------------------------------------------------------------------

CORPUS = [
    O.flow_mod(O.ADD, O.match(O.oxm(0, struct.pack("!I", 1)), O.oxm(5, b"\x08\x00"),
                              O.oxm(10, b"\x06"), O.oxm(14, b"\x00\x50"),
                              O.oxm(12, IP4("10.0.0.0"), IP4("255.255.255.0"))),
               O.apply_actions(O.output(2), PUSH) + O.goto(3), priority=7, cookie=3),
    O.flow_mod(O.ADD, O.match(O.oxm(6, b"\x00\x00")), O.apply_actions(PUSH, SET_VID(0x1005),
                                                                      O.output(C.OFPP_FLOOD))),
    O.flow_mod(O.MODIFY, O.match(O.oxm(4, bytes(6), b"\x01" + bytes(5))),
               O.apply_actions(O.output(C.OFPP_NORMAL))),
    O.flow_mod(O.DELETE, O.match(O.oxm(5, b"\x08\x06"), O.oxm(23, IP4("10.0.0.1"))),
               table=0xFF, out_port=2),
    O.flow_mod(O.DELETE_STRICT, IN1, priority=7),
    O.flow_stats_request(m=IN1), O.flow_stats_request(aggregate=True),
    O.multipart(4, struct.pack("!I4x", O.ANY)), O.multipart(0), O.multipart(3),
    O.msg(O.SET_CONFIG, b"\x00\x00\xff\xff"), O.msg(O.FEATURES_REQUEST),
    O.msg(O.ECHO_REQUEST, b"abc"),
    O.packet_out(1, O.output(2) + O.output(C.OFPP_IN_PORT), FRAME),
    O.packet_out(C.OFPP_CONTROLLER, PUSH + SET_VID(0x1007) + O.output(C.OFPP_FLOOD), FRAME),
    O.packet_out(2, O.output(C.OFPP_NORMAL) + O.output(C.OFPP_TABLE), FRAME),
    O.packet_out(1, struct.pack("!HHIH6x", 0, 16, C.OFPP_CONTROLLER, 40), FRAME),
    O.flow_mod(O.ADD, IN1, O.apply_actions(struct.pack("!HHIH6x", 0, 16, C.OFPP_CONTROLLER,
                                                       0xFFFF)), flags=1, idle=1),
    O.msg(24, struct.pack("!I4xQ", 2, 1)), O.msg(24, struct.pack("!I4xQ", 1, 0)),
    O.msg(26), O.msg(28, struct.pack("!6I", 3, 2, 7, 7, 15, 0)),
    GMOD(0, 0, 3, BUCKET(O.output(1)), BUCKET(O.output(2))),
    GMOD(0, 1, 4, BUCKET(O.output(1), weight=2), BUCKET(O.output(C.OFPP_CONTROLLER))),
    GMOD(1, 3, 3, BUCKET(O.output(1), watch_port=1), BUCKET(O.output(2), watch_port=2)),
    GMOD(2, 0, 0xFFFFFFFC),
    O.flow_mod(O.ADD, IN1, O.apply_actions(struct.pack("!HHI", 22, 8, 3))),
    O.multipart(6, struct.pack("!I4x", 0xFFFFFFFC)), O.multipart(7), O.multipart(8),
    O.msg(16, struct.pack("!I4x6s2xIII4x", 2, bytes(6), 0x10, 0x10, 0)),       # PORT_MOD
    O.msg(16, struct.pack("!I4x6s2xIII4x", 1, bytes(6), 0, 0x65, 0)),
    O.msg(29, struct.pack("!HHI", 0, 0xE, 1) + struct.pack("!HHII4x", 1, 16, 10, 10)),
    O.msg(29, struct.pack("!HHI", 0, 1, 2) + struct.pack("!HHII4x", 1, 16, 80, 0) * 2),
    O.msg(29, struct.pack("!HHI", 1, 2, 1) + struct.pack("!HHII4x", 1, 16, 5, 0)),
    O.flow_mod(O.ADD, IN1, struct.pack("!HHI", 6, 8, 1) + TO2, priority=3),
    O.multipart(9, struct.pack("!I4x", 0xFFFFFFFF)), O.multipart(10, struct.pack("!I4x", 1)),
    O.multipart(11), O.msg(29, struct.pack("!HHI", 2, 0, 0xFFFFFFFF)),
    O.msg(17, struct.pack("!B3xI", 0xFF, 3)),                                   # TABLE_MOD
    # the action set and metadata: write/clear actions, write_metadata, a metadata match
    O.flow_mod(O.ADD, O.match(O.oxm(2, struct.pack("!Q", 5), struct.pack("!Q", 0xFF))),
               O.apply_actions(O.output(1)) + struct.pack("!HH4x", 5, 8) +
               WRITE(O.output(2), struct.pack("!HHI", 22, 8, 3)) +
               struct.pack("!HH4xQQ", 2, 24, 0x10, 0xF0) + O.goto(2), table=1),
    O.flow_mod(O.ADD, O.match(O.oxm(6, b"\x00\x00")),
               WRITE(PUSH, SET_VID(0x1009), O.output(C.OFPP_CONTROLLER)) +
               struct.pack("!HH4xQQ", 2, 24, 1, 0xFFFFFFFFFFFFFFFF)),
    # set-field of header fields (checksums follow), dec_nw_ttl
    O.flow_mod(O.ADD, O.match(O.oxm(5, b"\x08\x00"), O.oxm(10, b"\x06")),
               O.apply_actions(
                   struct.pack("!HHI6s2x", 25, 16, 0x8000 << 16 | 4 << 9 | 6, b"\x02" * 6),
                   struct.pack("!HHI4s4x", 25, 16, 0x8000 << 16 | 12 << 9 | 4, IP4("10.0.0.9")),
                   struct.pack("!HHIH6x", 25, 16, 0x8000 << 16 | 13 << 9 | 2, 8080),
                   struct.pack("!HHIB7x", 25, 16, 0x8000 << 16 | 8 << 9 | 1, 46),
                   struct.pack("!HH4x", 24, 8), O.output(2))),
    O.packet_out(1, struct.pack("!HH4x", 24, 8) + O.output(2), FRAME),
]
INTERESTING = [0, 1, 2, 3, 4, 5, 7, 9, 13, 14, 15, 16, 17, 18, 20, 24, 28, 29, 99]


@st.composite
def fuzzed(draw):
    """A message with a true length field: a corpus message mutated, or random bytes."""
    if draw(st.booleans()):
        data = bytearray(draw(st.sampled_from(CORPUS)))
        for _ in range(draw(st.integers(1, 6))):
            kind = draw(st.sampled_from(["flip", "byte", "cut", "grow", "word"]))
            if kind == "flip" and len(data) > 8:
                i = draw(st.integers(8, len(data) - 1))
                data[i] ^= 1 << draw(st.integers(0, 7))
            elif kind == "byte" and len(data) > 8:
                data[draw(st.integers(8, len(data) - 1))] = draw(st.integers(0, 255))
            elif kind == "cut" and len(data) > 8:
                del data[draw(st.integers(8, len(data))):]
            elif kind == "grow":
                data += draw(st.binary(max_size=24))
            elif kind == "word" and len(data) > 10:
                i = draw(st.integers(8, len(data) - 2))
                data[i:i + 2] = struct.pack("!H", draw(st.sampled_from([0, 1, 4, 7, 8, 0xFFFF])))
        body = bytes(data[8:])
        mtype = data[1]
    else:
        mtype = draw(st.sampled_from(INTERESTING))
        body = draw(st.binary(max_size=200))
    return O.msg(mtype, body[:65000], xid=7)


def test_fuzzed_messages_never_break_the_connection(running, caplog):
    """Each fuzzed message is followed by an ECHO_REQUEST: everything before its reply is
    an answer or an ERROR, and the reply comes (no exception, no hang, no lost framing)."""
    counter = Counter("openflow messages")
    with running.client() as c:
        @fuzz_settings(300)
        @given(fuzzed())
        def run(data):
            counter()
            c.send(data + O.msg(O.ECHO_REQUEST, b"end", xid=0xEC))
            while True:
                t, xid, body = c.recv()
                if (t, xid) == (O.ECHO_REPLY, 0xEC):
                    break
                assert t in (O.ERROR, O.FEATURES_REPLY, O.GET_CONFIG_REPLY, O.MULTIPART_REPLY,
                             O.BARRIER_REPLY, O.ECHO_REPLY, PACKET_IN, FLOW_REMOVED,
                             PORT_STATUS, 25, 27), t         # (ROLE_REPLY, GET_ASYNC_REPLY)
        run()
        assert c.alive()
    counter.report(300)
    assert counter.n >= minimum(300)
    assert "internal error" not in caplog.text and "Traceback" not in caplog.text


def test_random_byte_streams_close_cleanly(running, caplog):
    """Unframed random bytes after the HELLO, then EOF: the switch answers what it can,
    closes within the timeout, and keeps serving others."""
    counter = Counter("openflow byte streams")
    rng = random.Random(1234)

    @fuzz_settings(60)
    @given(st.binary(min_size=1, max_size=300), st.booleans())
    def run(data, with_header):
        counter()
        if with_header:                            # a header of 1.3 that claims anything
            data = struct.pack("!BBH", 4, rng.choice(INTERESTING), rng.randrange(65536)) + data
        with running.client() as c:
            c.send(data)
            c.sock.shutdown(socket.SHUT_WR)
            assert c.closed(15)
    run()
    with running.client() as c:
        assert c.alive()
    counter.report(60)
    assert "internal error" not in caplog.text and "Traceback" not in caplog.text


def test_replaced_targets_close_their_connections_and_del_br_stops_serving(running):
    r = running
    old = r.port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        new = s.getsockname()[1]
    with r.client() as c:
        r.ctl("set-controller", "br0", f"ptcp:{old}:127.0.0.1", f"ptcp:{new}:127.0.0.1")
        assert c.alive()                          # its listener stays: so does it
        with O.Client("127.0.0.1", new) as d:
            assert d.alive()
            r.ctl("set-controller", "br0", f"ptcp:{new}:127.0.0.1")
            assert c.closed() and d.alive()       # the old listener's connection went
            with pytest.raises(OSError):
                O.Client("127.0.0.1", old, timeout=2)
            r.ctl("del-br", "br0")
            assert d.closed()

    async def setting():
        return r.sw.store.settings().get("openflow:br0")
    assert r.call(setting()) is None
    with pytest.raises(OSError):
        O.Client("127.0.0.1", new, timeout=2)
    r.ctl("add-br", "br0")
    assert "Controller" not in r.ctl("show")


def test_decoders_raise_nothing_but_oferror():
    """Random bytes into every decoder: a value or OFError, nothing else."""
    from pyvhost.openflow import multipart as M
    counter = Counter("openflow decoders")

    @fuzz_settings(2000)
    @given(st.binary(max_size=120), st.integers(0, 254), st.sampled_from([{}, UNTAGGED, TAGGED]))
    def run(data, table, match):
        counter()
        for decode in (lambda: oxm.decode(data), lambda: oxm.split_match(data, 0),
                       lambda: A.decode_instructions(data, table, match),
                       lambda: A.decode_actions(data, match),
                       lambda: A.decode_actions(data, match, packet_out=True),
                       lambda: AM.parse_packet_out(data),
                       lambda: R.parse_role_request(data), lambda: R.parse_set_async(data),
                       lambda: G.parse_buckets(data, table & 3),
                       lambda: MM.parse_bands(data, table & 0xF),
                       lambda: M.parse_flow_request(data), lambda: M.parse_request(data),
                       lambda: M.parse_port_request(data), lambda: C.parse_set_config(data),
                       lambda: C.negotiate(table & 7, data), lambda: C.parse_header(data)):
            with contextlib.suppress(OFError):
                decode()
    run()
    counter.report(2000)
    assert counter.n >= minimum(2000)


def _rules_and_store(r: Running) -> tuple[list[str], list[str]]:
    async def both():
        bridge = r.sw.bridges["br0"]
        return sorted(x.text for x in bridge.rules.values()), \
            sorted(t for _, t in r.sw.store.flows("br0"))
    return r.call(both())


def _pipeline(c: O.Client, messages: list[bytes]) -> dict[int, tuple[int, int]]:
    """Send at once, then a barrier: {xid: (error type, code)} of the errors before it."""
    c.send(b"".join(messages) + O.msg(O.BARRIER_REQUEST, xid=0xBA11))
    errors = {}
    while True:
        t, xid, body = c.recv()
        if (t, xid) == (O.BARRIER_REPLY, 0xBA11):
            return errors
        assert t == O.ERROR, t
        errors[xid] = struct.unpack_from("!HH", body)


def _adds(n: int, first_xid: int = 1, bad_every: int = 0) -> list[bytes]:
    out = []
    for i in range(n):
        port = 9 if bad_every and i % bad_every == bad_every - 1 else 2
        m = O.match(O.oxm(5, b"\x08\x00"), O.oxm(12, bytes([10, 9, i >> 8, i & 255])))
        out.append(O.flow_mod(O.ADD, m, O.apply_actions(O.output(port)), priority=3,
                              xid=first_xid + i))
    return out


def test_pipelined_flow_mods_are_one_transaction_with_errors_in_order(running):
    r = running
    with r.client() as c:
        errors = _pipeline(c, _adds(600, bad_every=10))
        assert sorted(errors) == list(range(10, 601, 10))
        assert set(errors.values()) == {(E.BAD_ACTION, E.BAC_BAD_OUT_PORT)}
    rules, stored = _rules_and_store(r)
    assert rules == stored and len(rules) == 1 + 540


def test_a_batch_the_store_cannot_commit_is_undone(running, monkeypatch):
    import sqlite3
    r = running
    with r.client() as c:
        assert _pipeline(c, _adds(5)) == {}
        before = _rules_and_store(r)
        store = r.sw.store
        real = store.transaction

        @contextlib.contextmanager
        def failing_commit():
            if store._depth:                      # nested: the real one
                with real():
                    yield
                return
            with contextlib.ExitStack():
                store.db.execute("BEGIN IMMEDIATE")
                store._depth += 1
                try:
                    yield
                finally:
                    store._depth -= 1
                store.db.execute("ROLLBACK")      # as a failed COMMIT leaves it
                raise sqlite3.OperationalError("disk I/O error")

        monkeypatch.setattr(store, "transaction", failing_commit)
        msgs = _adds(50, first_xid=100)
        msgs[3] = O.flow_mod(O.DELETE, O.match(), table=0xFF, xid=103)   # deletes all, too
        errors = _pipeline(c, msgs)
        assert sorted(errors) == list(range(100, 150))
        assert set(errors.values()) == {(E.FLOW_MOD_FAILED, E.FMFC_UNKNOWN)}
        monkeypatch.setattr(store, "transaction", real)
        assert _rules_and_store(r) == before
        assert c.alive()
        # and with the store full (SQLite's max_page_count), datapath and store agree
        pages = r.call(_run(lambda: store.db.execute("PRAGMA page_count").fetchone()[0]))
        r.call(_run(lambda: store.db.execute(f"PRAGMA max_page_count={pages}")))
        errors = _pipeline(c, _adds(400, first_xid=1000))
        r.call(_run(lambda: store.db.execute("PRAGMA max_page_count=1073741823")))
        assert set(errors.values()) <= {(E.FLOW_MOD_FAILED, E.FMFC_UNKNOWN)}
        rules, stored = _rules_and_store(r)
        assert rules == stored


async def _call(fn):
    return fn()


def _run(fn):
    return _call(fn)


def test_switch_config_is_the_bridges_and_outlives_its_controllers(running):
    r = running
    with r.client() as c, r.client() as d:
        assert c.error_of(O.msg(O.SET_CONFIG, struct.pack("!HH", 0, 0xFFFF))) is None
        t, _, body = d.request(O.msg(O.GET_CONFIG_REQUEST))
        assert t == O.GET_CONFIG_REPLY and struct.unpack("!HH", body) == (0, 0xFFFF)
    r.ctl("del-controller", "br0")
    r.ctl("set-controller", "br0", f"ptcp:{r.port}:127.0.0.1")
    with r.client() as c:
        assert struct.unpack("!HH", c.request(O.msg(O.GET_CONFIG_REQUEST))[2]) == (0, 0xFFFF)


def test_connections_per_bridge_are_bounded(running):
    from pyvhost.openflow.manager import MAX_CONNECTIONS
    with contextlib.ExitStack() as stack:
        clients = [stack.enter_context(running.client()) for _ in range(MAX_CONNECTIONS)]
        with running.client(do_hello=False) as extra:
            assert extra.closed()
        assert clients[0].alive() and clients[-1].alive()
    deadline = time.monotonic() + 10              # room again once they are gone
    while "connections: 0" not in running.ctl("show") and time.monotonic() < deadline:
        time.sleep(0.05)
    with running.client() as c:
        assert c.alive()


def test_ip_dscp_matches_the_six_dscp_bits_only(running):
    """OpenFlow's IP_DSCP (the model's ip_dscp) ignores the ECN bits; nw_tos does not."""
    from pyvhost._flow import frame_key
    r = running
    with r.client() as c:
        m = O.match(O.oxm(5, b"\x08\x00"), O.oxm(8, bytes([10])))
        assert c.error_of(O.flow_mod(O.ADD, m, O.apply_actions(O.output(2)), priority=50)) \
            is None
    assert " priority=50,ip,ip_dscp=10 actions=output:2" in flows(r)

    def frame(tos: int) -> bytes:
        ip = bytes([0x45, tos, 0, 28, 0, 0, 0, 0, 64, 17, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2])
        return bytes(6) + bytes([2, 0, 0, 0, 0, 1]) + b"\x08\x00" + ip + bytes(8)

    async def outputs(tos: int):
        bridge = r.sw.bridges["br0"]
        key = frame_key(frame(tos), bridge.ports["a"].port_id)
        return [bridge.rules[rid].text for _, rid in bridge.cls.lookup(key)[0]]
    for tos in (0x28, 0x29, 0x2B):
        assert r.call(outputs(tos)) == ["priority=50,ip,ip_dscp=10,actions=output:2"], tos
    assert r.call(outputs(0x2C)) == ["priority=0,actions=normal"]


def test_roles_generation_ids_and_async_config(running):
    """ROLE_REQUEST: EQUAL by default, a new MASTER makes the other one a SLAVE, a stale
    generation id or an unknown role is refused, a SLAVE may not write and gets no
    PACKET_IN until SET_ASYNC asks for them; GET_ASYNC shows the spec's defaults."""
    to_ctl = O.apply_actions(struct.pack("!HHIH6x", 0, 16, C.OFPP_CONTROLLER, 0xFFFF))[8:]

    def role(c, r, gen):
        t, xid, body = c.request(O.msg(24, struct.pack("!I4xQ", r, gen), xid=0x50))
        assert (t, xid) == (25, 0x50), (t, body)
        return struct.unpack("!I4xQ", body)

    def packet_in(c):
        while True:
            t, _, body = c.recv()
            if t == PACKET_IN:
                return body

    with running.client() as c1, running.client() as c2:
        assert role(c1, 0, 99) == (1, 0)                       # NOCHANGE: EQUAL
        assert role(c1, 2, 10) == (2, 10)
        assert role(c2, 2, 11) == (2, 11)
        assert role(c1, 0, 0) == (3, 11)                       # c1 became a SLAVE
        assert c1.error_of(O.msg(24, struct.pack("!I4xQ", 2, 5))) == \
            (E.ROLE_REQUEST_FAILED, 0)                          # STALE
        assert c1.error_of(O.msg(24, struct.pack("!I4xQ", 7, 12))) == \
            (E.ROLE_REQUEST_FAILED, 2)                          # BAD_ROLE
        assert c1.error_of(O.msg(24, bytes(8))) == (E.BAD_REQUEST, E.BRC_BAD_LEN)
        assert c1.error_of(O.flow_mod(O.ADD, IN1, TO2)) == (E.BAD_REQUEST, E.BRC_IS_SLAVE)
        assert c1.error_of(O.packet_out(1, O.output(2), FRAME)) == \
            (E.BAD_REQUEST, E.BRC_IS_SLAVE)
        t, _, body = c1.request(O.msg(26, xid=3))
        assert t == 27 and struct.unpack("!6I", body) == (3, 0, 7, 7, 15, 0)
        # the master's PACKET_OUT to CONTROLLER: a PACKET_IN (ACTION) for it, not the slave
        c2.send(O.packet_out(1, to_ctl, FRAME))
        assert packet_in(c2)[6] == 1                            # reason ACTION
        assert c1.alive()                                       # (nothing came before)
        c1.send(O.msg(28, struct.pack("!6I", 3, 2, 7, 7, 15, 0)))   # slave: ACTION too
        t, _, body = c1.request(O.msg(26, xid=4))
        assert struct.unpack("!6I", body) == (3, 2, 7, 7, 15, 0)
        c2.send(O.packet_out(1, to_ctl, FRAME))
        assert packet_in(c2)[6] == 1 and packet_in(c1)[6] == 1
        assert c1.error_of(O.msg(28, bytes(20))) == (E.BAD_REQUEST, E.BRC_BAD_LEN)
        assert role(c1, 1, 0) == (1, 11)                        # EQUAL: may write again
        assert c1.error_of(O.flow_mod(O.ADD, IN1, TO2)) is None


def _set_field(field: int, value: bytes) -> bytes:
    """An apply-actions instruction of one OFPAT_SET_FIELD."""
    tlv = struct.pack("!I", 0x8000 << 16 | field << 9 | len(value)) + value
    n = 4 + len(tlv)
    action = struct.pack("!HH", 25, (n + 7) // 8 * 8) + tlv + bytes((n + 7) // 8 * 8 - n)
    return struct.pack("!HH4x", 4, 8 + len(action)) + action


def test_modify_checks_set_field_against_each_rules_match(tmp_path):
    """A non-strict MODIFY giving set_field tcp_dst to a tcp rule and an ip rule (no
    ip_proto) is refused whole (MATCH_INCONSISTENT), both rules as they were: the ip rule
    must not get an action its match does not allow (its stored text would not parse
    again). Decoding once per table and VLAN state, as before, let it through."""
    async def main():
        sw = Switch(tmp_path / "run")
        of = enable(sw)
        await sw.start()
        try:
            for argv in (["add-br", "br0"], ["add-port", "br0", "a", "type=vhostuser"],
                         ["add-flow", "br0", "priority=20,tcp,actions=output:a"],
                         ["add-flow", "br0", "priority=10,ip,actions=output:a"]):
                await run_command(sw, argv)
            h = Handler(sw, "br0", of._state("br0"), 1, of.events)
            before = sorted(r.text for r in sw.bridges["br0"].rules.values())
            modify = O.flow_mod(O.MODIFY, O.match(), _set_field(14, b"\x00\x05"))[8:]
            [err] = h.flow_mods([modify])
            assert err is not None and (err.type, err.code) == \
                (E.BAD_ACTION, E.BAC_MATCH_INCONSISTENT), err
            assert sorted(r.text for r in sw.bridges["br0"].rules.values()) == before
            # only tcp rules selected: allowed
            tcp = O.match(O.oxm(5, struct.pack("!H", 0x800)), O.oxm(10, b"\x06"))
            assert h.flow_mods([O.flow_mod(O.MODIFY, tcp, _set_field(14, b"\x00\x05"))[8:]]) \
                == [None]
            texts = sorted(r.text for r in sw.bridges["br0"].rules.values())
            assert texts == ["priority=0,actions=normal", "priority=10,ip,actions=output:a",
                             "priority=20,tcp,actions=set_field:5->tcp_dst"], texts
            for t in texts:
                parse_flow(t)                    # every stored text reads back
        finally:
            await of.close()
            await sw.stop()

    asyncio.run(main())
