"""Masked VLAN matches through the real ``ovs-ofctl -O OpenFlow13``: "any tagged frame"
(vlan_tci=0x1000/0x1000, OXM vlan_vid=PRESENT/PRESENT on its own) and a VID range
(vlan_tci=0x1010/0x1ff0) installed by ovs-ofctl and by ``ctl add-flow``, printed the same
by both dump-flows, and frames through the switch: tagged frames of the VIDs match,
untagged ones do not, whatever order they come in (the megaflow of one never answers for
the other); and the text syntax vlan_tci=V[/M] with its refusals and set_field vlan_pcp's
prerequisite on a masked match."""

from __future__ import annotations

import os
import re

import pytest

from tests.harness import openflow as O
from tests.harness import processes
from tests.harness.frontends import drain, switch_with_ports
from tests.harness.openflow import ofctl

pytestmark = pytest.mark.skipif(not os.path.exists(O.OVS_OFCTL),
                                reason="ovs-ofctl (Debian openvswitch-common) is not installed")

MAC = {n: bytes([0x02, 0, 0, 0, 0, i + 1]) for i, n in enumerate("abc")}
CONFIG = "add-br br0\n" + "".join(f"add-port br0 {n} type=vhostuser queues=1\n" for n in "abc") \
    + "set-controller br0 ptcp:0:127.0.0.1\n"


def udp(vlan: int | None = None, dport: int = 53) -> bytes:
    ip = bytes([0x45, 0, 0, 28, 0, 0, 0, 0, 64, 17, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2])
    tag = b"\x81\x00" + vlan.to_bytes(2, "big") if vlan is not None else b""
    return MAC["b"] + MAC["a"] + tag + b"\x08\x00" + ip + (1000).to_bytes(2, "big") + \
        dport.to_bytes(2, "big") + bytes(4) + b"p" * 18


@pytest.fixture
def of_switch(workdir):
    with switch_with_ports(workdir, CONFIG, "abc") as (run_dir, ports):
        m = re.search(r"listening on 127\.0\.0\.1:(\d+)", processes.ctl(run_dir, "show"))
        assert m
        yield run_dir, ports, f"tcp:127.0.0.1:{m.group(1)}"


def matches(dump: str) -> dict[str, int]:
    """{'priority=N,MATCH actions=...': n_packets} of an ovs-ofctl dump."""
    return {m.group(2): int(m.group(1)) for m in
            re.finditer(r"n_packets=(\d+), n_bytes=\d+, (priority=\S+ actions=\S+)", dump)}


def test_any_tag_and_vid_range_matches(of_switch):
    run_dir, ports, target = of_switch
    a, b, c = ports["a"], ports["b"], ports["c"]
    ofctl(target, "del-flows")
    ofctl(target, "add-flow", "priority=10,in_port=1,vlan_tci=0x1000/0x1000,actions=output:2")
    ofctl(target, "add-flow", "priority=20,in_port=1,vlan_tci=0x1010/0x1ff0,actions=output:3")
    # untagged, then tagged, then untagged again: each decided on its own
    a.send_all([udp()] * 2)
    assert drain(b, 0.3) == [] and drain(c, 0.1) == []
    a.send_all([udp(vlan=5)] * 3 + [udp(vlan=0x2007)] * 2)     # VIDs 5 and 7 (pcp 1)
    assert drain(b) == [udp(vlan=5)] * 3 + [udp(vlan=0x2007)] * 2
    a.send_all([udp(vlan=20)] * 4 + [udp(vlan=31)])             # in 16..31: the range
    assert drain(c) == [udp(vlan=20)] * 4 + [udp(vlan=31)]
    a.send_all([udp()] * 3 + [udp(vlan=32)])                    # 32: any tag, not the range
    assert drain(b) == [udp(vlan=32)] and drain(c, 0.1) == []
    assert matches(ofctl(target, "dump-flows").stdout) == {
        "priority=10,in_port=1,vlan_tci=0x1000/0x1000 actions=output:2": 6,
        "priority=20,in_port=1,vlan_tci=0x1010/0x1ff0 actions=output:3": 5}
    ctl = processes.ctl(run_dir, "dump-flows", "--no-stats", "br0")
    assert ctl == " priority=20,in_port=1,vlan_tci=0x1010/0x1ff0 actions=output:3\n" \
                  " priority=10,in_port=1,vlan_tci=0x1000/0x1000 actions=output:2", ctl
    # strict delete finds the masked match
    ofctl(target, "del-flows", "--strict", "priority=20,in_port=1,vlan_tci=0x1010/0x1ff0")
    a.send_all([udp(vlan=20)])
    assert drain(b) == [udp(vlan=20)] and drain(c, 0.1) == []


def test_masked_vlan_from_ctl_and_folded_forms(of_switch):
    """A rule from ctl add-flow is what ovs-ofctl shows; a TCI mask that is a whole VID or
    PCP prints as dl_vlan / dl_vlan_pcp on both sides (as OVS folds it)."""
    run_dir, ports, target = of_switch
    ofctl(target, "del-flows")
    processes.ctl(run_dir, "add-flow", "br0",
                  "priority=5,in_port=a,vlan_tci=0x1000/0x1000,actions=set_field:3->vlan_pcp,"
                  "output:b")
    processes.ctl(run_dir, "add-flow", "br0", "priority=6,vlan_tci=0/0x1000,actions=drop")
    ofctl(target, "add-flow", "priority=7,vlan_tci=0x1005/0x1fff,actions=drop")
    ofctl(target, "add-flow", "priority=8,vlan_tci=0x7000/0xf000,actions=drop")
    ofctl(target, "add-flow", "priority=9,vlan_tci=0x0005/0x0fff,actions=drop")
    want = {"priority=5,in_port=1,vlan_tci=0x1000/0x1000 actions=set_field:3->vlan_pcp,output:2",
            "priority=6,vlan_tci=0x0000/0x1000 actions=drop",
            "priority=7,dl_vlan=5 actions=drop",
            "priority=8,dl_vlan_pcp=3 actions=drop",
            "priority=9,vlan_tci=0x0005/0x0fff actions=drop"}
    assert set(matches(ofctl(target, "dump-flows").stdout)) == want
    ctl = processes.ctl(run_dir, "dump-flows", "--no-stats", "br0")
    assert {line.strip().replace("in_port=a", "in_port=1").replace("output:b", "output:2")
            for line in ctl.splitlines()} == want, ctl
    a, b = ports["a"], ports["b"]
    a.send_all([udp(vlan=0x2006), udp()])
    assert drain(b) == [udp(vlan=0x6006)]                       # pcp 1 -> 3, untagged: no rule


@pytest.mark.parametrize("text,want", [
    ("vlan_tci=0x1000/0x1000", {"vlan_tci": (0x1000, 0x1000)}),
    ("vlan_tci=0x1fff/0x1ff0", {"vlan_tci": (0x1FF0, 0x1FF0)}),   # value kept under the mask
    ("vlan_tci=0x1005/0x1fff", {"dl_vlan": 5}),
    ("vlan_tci=0x7000/0xf000", {"dl_vlan_pcp": 3}),
    ("vlan_tci=0", {"dl_vlan": 0xFFFF}),
    ("vlan_tci=0x1234/0", {}),
    ("vlan_tci=0x1000/0x1000,dl_vlan=5", "give the tag one way"),
    ("vlan_tci=0x10000", "out of range"),
])
def test_vlan_tci_syntax(text, want):
    from pyvhost.switch.flows import FlowSyntaxError, parse_match
    if isinstance(want, str):
        with pytest.raises(FlowSyntaxError, match=want):
            parse_match(text)
    else:
        assert parse_match(text) == want


def test_set_field_vlan_pcp_needs_a_tag_in_a_masked_match():
    from pyvhost.switch.flows import FlowSyntaxError, parse_flow
    parse_flow("vlan_tci=0x1000/0x1000,actions=set_field:3->vlan_pcp")
    for match in ("vlan_tci=0/0x1000", "vlan_tci=0x0005/0x0fff"):
        with pytest.raises(FlowSyntaxError, match="prerequisites"):
            parse_flow(f"{match},actions=set_field:3->vlan_pcp")
