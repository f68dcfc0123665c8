"""The rest of the OpenFlow 1.3 pipeline through the real ``ovs-ofctl -O OpenFlow13`` against
a running ``pyvhost switch`` with three pyvhost front-end guests: write_actions /
clear_actions (the action set, run when the pipeline ends, in the spec's order), write_metadata
and the metadata match, installed with ovs-ofctl's syntax, dumped the same by ovs-ofctl
and ``ctl dump-flows``, and frames between the guests showing what the rules did."""

from __future__ import annotations

import os
import re

import pytest

from tests.harness import openflow as O
from tests.harness import processes
from tests.harness.frontends import drain, switch_with_ports
from tests.harness.openflow import flow_lines, ofctl
from tests.test_openflow_packets import listening_port

pytestmark = pytest.mark.skipif(not os.path.exists(O.OVS_OFCTL),
                                reason="ovs-ofctl (Debian openvswitch-common) is not installed")

MAC = {n: bytes([0x02, 0, 0, 0, 0, i + 1]) for i, n in enumerate("abc")}
CONFIG = "add-br br0\n" + "".join(f"add-port br0 {n} type=vhostuser queues=1\n" for n in "abc") \
    + "set-controller br0 ptcp:0:127.0.0.1\n"


def udp(src: bytes, dst: bytes, dport: int = 53, vlan: int | None = None) -> bytes:
    ip = bytes([0x45, 0, 0, 28, 0, 0, 0, 0, 64, 17, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2])
    tag = b"\x81\x00" + vlan.to_bytes(2, "big") if vlan is not None else b""
    return dst + src + tag + b"\x08\x00" + ip + (1000).to_bytes(2, "big") + \
        dport.to_bytes(2, "big") + bytes(4) + b"p" * 18


@pytest.fixture
def of_switch(workdir):
    with switch_with_ports(workdir, CONFIG, "abc") as (run_dir, ports):
        yield run_dir, ports, f"tcp:127.0.0.1:{listening_port(run_dir)}"


RULES = [
    # table 0: udp 53 from a: output to c now (untagged), and into the action set: a tag
    # 7 and output to b; metadata's low byte := 0x05; on to table 1
    "priority=10,in_port=1,udp,vlan_tci=0,tp_dst=53,actions=output:3,"
    "write_actions(mod_vlan_vid:7,output:2),write_metadata:0x5/0xff,goto_table:1",
    # udp 54: the same, but metadata 0x6
    "priority=10,in_port=1,udp,vlan_tci=0,tp_dst=54,actions=write_actions(output:2),"
    "write_metadata:0x6,goto_table:1",
    # udp 55: a set that table 1 clears, then writes output:3
    "priority=10,in_port=1,udp,vlan_tci=0,tp_dst=55,actions=write_actions(output:2),"
    "write_metadata:0x1005,goto_table:1",
    # table 1 by metadata: 0x05 under 0xff ends the pipeline (the set runs)
    "table=1,priority=20,metadata=0x5/0xff,actions=goto_table:2",
    "table=1,priority=30,metadata=0x1005,actions=clear_actions,write_actions(output:3)",
    "table=1,priority=10,metadata=0x6,actions=drop",
    "table=2,priority=1,actions=write_metadata:0x0",
]
# as ovs-ofctl dump-flows prints them (OpenFlow 1.3's push_vlan/set_field for mod_vlan_vid)
DUMPED = sorted([
    "cookie=0x0, table=0, n_packets=N, n_bytes=B, priority=10,udp,in_port=1,"
    "vlan_tci=0x0000/0x1fff,tp_dst=53 actions=output:3,write_actions(push_vlan:0x8100,"
    "set_field:4103->vlan_vid,output:2),write_metadata:0x5/0xff,goto_table:1",
    "cookie=0x0, table=0, n_packets=N, n_bytes=B, priority=10,udp,in_port=1,"
    "vlan_tci=0x0000/0x1fff,tp_dst=54 actions=write_actions(output:2),"
    "write_metadata:0x6,goto_table:1",
    "cookie=0x0, table=0, n_packets=N, n_bytes=B, priority=10,udp,in_port=1,"
    "vlan_tci=0x0000/0x1fff,tp_dst=55 actions=write_actions(output:2),"
    "write_metadata:0x1005,goto_table:1",
    "cookie=0x0, table=1, n_packets=N, n_bytes=B, priority=20,metadata=0x5/0xff "
    "actions=goto_table:2",
    "cookie=0x0, table=1, n_packets=N, n_bytes=B, priority=30,metadata=0x1005 "
    "actions=clear_actions,write_actions(output:3)",
    "cookie=0x0, table=1, n_packets=N, n_bytes=B, priority=10,metadata=0x6 actions=drop",
    "cookie=0x0, table=2, n_packets=N, n_bytes=B, priority=1 actions=write_metadata:0",
])


def _unstat(lines: list[str]) -> list[str]:
    return sorted(re.sub(r"n_bytes=\d+", "n_bytes=B", re.sub(r"n_packets=\d+", "n_packets=N",
                                                             line)) for line in lines)


def test_action_set_and_metadata_through_ofctl(of_switch, tmp_path):
    run_dir, ports, target = of_switch
    a, b, c = ports["a"], ports["b"], ports["c"]
    ofctl(target, "del-flows")
    rules = tmp_path / "rules.txt"
    rules.write_text("\n".join(RULES) + "\n")
    ofctl(target, "add-flows", str(rules))
    assert _unstat(flow_lines(ofctl(target, "dump-flows").stdout)) == DUMPED
    ctl = processes.ctl(run_dir, "dump-flows", "--no-stats", "br0")
    assert " priority=10,udp,in_port=1,dl_vlan=0xffff,tp_dst=53 actions=output:3," \
        "write_actions(mod_vlan_vid:7,output:2),write_metadata:0x5/0xff,goto_table:1" in ctl, ctl
    assert " table=1, priority=30,metadata=0x1005 actions=clear_actions," \
        "write_actions(output:3)" in ctl
    assert " table=1, priority=20,metadata=0x5/0xff actions=goto_table:2" in ctl
    assert " table=2, priority=1 actions=write_metadata:0x0" in ctl
    # a rule from ctl in the same syntax is what ovs-ofctl dumps
    processes.ctl(run_dir, "add-flow", "br0", "table=3,priority=2,metadata=0x7,"
                  "actions=output:a,clear_actions,write_actions(output:b)")
    assert "table=3, n_packets=0, n_bytes=0, priority=2,metadata=0x7 actions=output:1," \
        "clear_actions,write_actions(output:2)" in ofctl(target, "dump-flows").stdout
    # frames: 53 -> c untagged (applied at once), b tagged 7 (the set, at the end)
    a.send_all([udp(MAC["a"], MAC["b"])] * 3)
    assert drain(c) == [udp(MAC["a"], MAC["b"])] * 3
    assert drain(b) == [udp(MAC["a"], MAC["b"], vlan=7)] * 3
    # 54: metadata 0x6: table 1's rule has no actions, but ends the pipeline: the set runs
    a.send_all([udp(MAC["a"], MAC["b"], dport=54)] * 2)
    assert drain(b) == [udp(MAC["a"], MAC["b"], dport=54)] * 2 and drain(c, 0.2) == []
    # ... until it clears the set
    ofctl(target, "mod-flows", "table=1,metadata=0x6,actions=clear_actions")
    a.send_all([udp(MAC["a"], MAC["b"], dport=54)] * 2)
    assert drain(b, 0.3) == [] and drain(c, 0.2) == []
    # 55: metadata 0x1005: table 1's higher rule clears the set (output:2) and writes
    # output:3 (the 0x5/0xff rule, lower, would have kept it)
    a.send_all([udp(MAC["a"], MAC["b"], dport=55)] * 2)
    assert drain(c) == [udp(MAC["a"], MAC["b"], dport=55)] * 2 and drain(b, 0.3) == []
    dump = ofctl(target, "dump-flows").stdout
    assert re.search(r"n_packets=4, .*priority=10,metadata=0x6 actions=clear_actions", dump)
    assert drain(a, 0.2) == []
