"""The tunnel fields in OpenFlow 1.3: OXM tunnel_id (match, masked, and SET_FIELD) and
Open vSwitch's NXM_NX_TUN_IPV4_SRC/DST (OXM class 0x0001 fields 31/32: match, and
SET_FIELD tun_dst) to and from the model's tun_id/tun_src/tun_dst and set_tun_id/
set_tun_dst: round trips, the bytes ``ovs-ofctl -O OpenFlow13`` sends decoded, what the
24-bit VNI cannot say refused with the spec's code; and against a running switch, rules
with tunnel fields made by ovs-ofctl and by ``ctl`` shown alike by both dump-flows
(never left out, never a different rule)."""

from __future__ import annotations

import os
import struct

import pytest

from pyvhost.openflow import actions as A
from pyvhost.openflow import errors as E
from pyvhost.openflow import oxm
from pyvhost.openflow.errors import OFError
from pyvhost.switch.flows import Prefix, parse_flow
from tests.harness import openflow as O
from tests.harness import processes
from tests.harness.frontends import switch_with_ports
from tests.harness.openflow import ofctl
from tests.test_openflow_packets import CONFIG, listening_port

IP4 = lambda s: bytes(int(x) for x in s.split("."))        # noqa: E731


def nx(field: int, value: bytes, mask: bytes | None = None) -> bytes:
    """An NXM_1 (class 0x0001) TLV."""
    length = len(value) * (2 if mask else 1)
    return struct.pack("!I", 1 << 16 | field << 9 | int(mask is not None) << 8 | length) + \
        value + (mask or b"")


# what ovs-ofctl 3.1 sent for add-flow "tun_id=5,tun_src=10.0.0.1,tun_dst=10.0.0.0/24,
# actions=set_field:10.0.0.9->tun_dst,set_field:7->tun_id,output:2" (captured)
OFCTL_FLOW_MOD = bytes.fromhex(
    "040e009000000002000000000000000000000000000000000000000000008000ffffffffffffffffffffffff"
    "000000000001002480004c08000000000000000500013e040a000001000141080a000000ffffff0000000000"
    "000400380000000000190010000140040a000009000000000019001080004c08000000000000000700000010"
    "000000020000000000000000")


def test_the_flow_mod_ovs_ofctl_sends_decodes_to_the_model():
    body = OFCTL_FLOW_MOD[8:]
    tlvs, end = oxm.split_match(body, 40)
    assert oxm.decode(tlvs) == {"tun_id": 5, "tun_src": Prefix(IP4("10.0.0.1"), 32),
                                "tun_dst": Prefix(IP4("10.0.0.0"), 24)}
    actions, goto = A.decode_instructions(body[end:], 0, {})
    assert actions == (("set_tun_dst", Prefix(IP4("10.0.0.9"), 32)), ("set_tun_id", 7),
                       ("output", "2"))
    assert A.encode_instructions(actions, goto, {}, int) == body[end:]   # byte for byte
    assert oxm.encode(oxm.decode(tlvs), int) == tlvs


@pytest.mark.parametrize("match", [
    {"tun_id": 0xABCDEF},
    {"tun_id": (0x5, 0xFF), "in_port": "2"},
    {"tun_id": (0x100, 0xFFFFFF)},
    {"tun_src": Prefix(IP4("192.168.1.1"), 32), "tun_dst": Prefix(IP4("192.168.0.0"), 16)},
    {"tun_id": 42, "tun_dst": Prefix(IP4("10.1.2.3"), 32), "dl_type": 0x0800},
    {"tun_dst": Prefix(IP4("10.0.2.0"), -1, IP4("255.0.255.0"))},   # any mask, as OVS
])
def test_tunnel_match_round_trip(match):
    tlvs = oxm.encode(match, int)
    assert oxm.decode(tlvs) == match
    flow = parse_flow("priority=1,actions=drop")
    flow.match = match
    assert parse_flow(flow.format()).match == match


@pytest.mark.parametrize("tlvs,code", [
    (O.oxm(38, (1 << 24).to_bytes(8, "big")), E.BMC_BAD_VALUE),        # past a VNI
    (O.oxm(38, bytes(8), (1 << 32 | 0xFF).to_bytes(8, "big")), E.BMC_BAD_MASK),
    (O.oxm(38, bytes(4)), E.BMC_BAD_LEN),
    (O.oxm(38, (0x105).to_bytes(8, "big"), (0xFF).to_bytes(8, "big")), E.BMC_BAD_WILDCARDS),
    (nx(31, IP4("10.1.0.0"), IP4("255.0.255.0")), E.BMC_BAD_WILDCARDS),
    (nx(32, IP4("10.0.0.1")[:2]), E.BMC_BAD_LEN),
    (nx(33, IP4("10.0.0.1")), E.BMC_BAD_FIELD),                        # another NXM field
    (nx(31, IP4("10.0.0.1")) * 2, E.BMC_DUP_FIELD),
], ids=lambda v: v.hex() if isinstance(v, bytes) else str(v))
def test_tunnel_match_refusals(tlvs, code):
    with pytest.raises(OFError) as e:
        oxm.decode(tlvs)
    assert (e.value.type, e.value.code) == (E.BAD_MATCH, code), e.value


def _set(h: int, value: bytes) -> bytes:
    body = struct.pack("!I", h) + value
    length = (4 + len(body) + 7) // 8 * 8
    return struct.pack("!HH", 25, length) + body + bytes(length - 4 - len(body))


@pytest.mark.parametrize("action,code", [
    (_set(oxm.header(38, 8), (1 << 24).to_bytes(8, "big")), E.BAC_BAD_SET_ARGUMENT),
    (_set(oxm.header(38, 16, True), bytes(16)), E.BAC_BAD_SET_LEN),
    (_set(oxm.header(oxm.NX_TUN_IPV4_DST, 8, True), bytes(8)), E.BAC_BAD_SET_LEN),
    (_set(oxm.header(oxm.NX_TUN_IPV4_SRC, 4), bytes(4)), E.BAC_BAD_SET_TYPE),
])
def test_tunnel_set_field_refusals(action, code):
    with pytest.raises(OFError) as e:
        A.decode_actions(action, {})
    assert (e.value.type, e.value.code) == (E.BAD_ACTION, code), e.value


@pytest.mark.skipif(not os.path.exists(O.OVS_OFCTL),
                    reason="ovs-ofctl (Debian openvswitch-common) is not installed")
def test_tunnel_rules_show_alike_in_both_dump_flows(workdir):
    with switch_with_ports(workdir, CONFIG, "ab") as (run_dir, _ports):
        target = f"tcp:127.0.0.1:{listening_port(run_dir)}"
        ofctl(target, "del-flows")
        ofctl(target, "add-flow", "priority=7,tun_id=0x5,tun_src=10.0.0.1,tun_dst=10.0.0.0/24,"
              "actions=set_field:10.0.0.9->tun_dst,set_field:0x7->tun_id,output:2")
        processes.ctl(run_dir, "add-flow", "br0", "priority=8,in_port=a,tun_id=0x10/0xf0,"
                      "tun_src=192.168.0.0/16,actions=set_field:99->tun_id,"
                      "set_field:10.9.8.7->tun_dst,output:b")
        want = ["priority=7,tun_id=0x5,tun_src=10.0.0.1,tun_dst=10.0.0.0/24 "
                "actions=set_field:10.0.0.9->tun_dst,set_field:0x7->tun_id,output:2",
                "priority=8,tun_id=0x10/0xf0,tun_src=192.168.0.0/16,in_port=1 "
                "actions=set_field:0x63->tun_id,set_field:10.9.8.7->tun_dst,output:2"]
        assert O.flow_lines(ofctl(target, "--no-stats", "dump-flows").stdout) == sorted(want)
        ctl = processes.ctl(run_dir, "dump-flows", "br0")
        assert "priority=7,tun_id=0x5,tun_src=10.0.0.1,tun_dst=10.0.0.0/24,in_port" not in ctl
        assert "priority=7,tun_id=0x5,tun_src=10.0.0.1,tun_dst=10.0.0.0/24 " \
            "actions=set_field:10.0.0.9->tun_dst,set_field:7->tun_id,output:2" in ctl, ctl
        assert "priority=8,in_port=a,tun_id=0x10/0xf0,tun_src=192.168.0.0/16 " \
            "actions=set_field:99->tun_id,set_field:10.9.8.7->tun_dst,output:b" in ctl, ctl
        # a value only the 64-bit field has: refused, never stored as another rule
        r = ofctl(target, "add-flow", "priority=9,tun_id=0x1000000,actions=drop", check=False)
        assert r.returncode != 0 and "OFPBMC_BAD_VALUE" in r.stderr, r.stderr
        r = ofctl(target, "add-flow", "priority=9,actions=set_field:0x1000000->tun_id",
                  check=False)
        assert r.returncode != 0 and "OFPBAC_BAD_SET_ARGUMENT" in r.stderr, r.stderr
        # del-flows by a tunnel match takes exactly that rule
        ofctl(target, "del-flows", "tun_id=0x5")
        assert len(O.flow_lines(ofctl(target, "dump-flows").stdout)) == 1
