"""The rest of the OpenFlow 1.3 pipeline through the real ``ovs-ofctl -O OpenFlow13`` against
a running ``pyvhost switch`` with three pyvhost front-end guests: write_actions /
clear_actions (the action set, run when the pipeline ends, in the spec's order), write_metadata
and the metadata match, set_field on header fields and dec_ttl (PACKET_IN INVALID_TTL),
installed with ovs-ofctl's syntax, dumped the same by ovs-ofctl and ``ctl dump-flows``, and
frames between the guests showing what the rules did (checksums true), also when cached
decisions would be reused across rules."""

from __future__ import annotations

import os
import re
import struct

import pytest

from tests.harness import openflow as O
from tests.harness import processes
from tests.harness.frontends import drain, switch_with_ports
from tests.harness.openflow import flow_lines, ofctl
from tests.test_edit import csum, frame, layers, verify
from tests.test_openflow_ofctl import udp
from tests.test_openflow_packets import MAC, listening_port, next_packet_in

pytestmark = pytest.mark.skipif(not os.path.exists(O.OVS_OFCTL),
                                reason="ovs-ofctl (Debian openvswitch-common) is not installed")

CONFIG = "add-br br0\n" + "".join(f"add-port br0 {n} type=vhostuser queues=1\n" for n in "abc") \
    + "set-controller br0 ptcp:0:127.0.0.1\n"


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


def _ip(f: bytes) -> bytes:
    return layers(f)[0]


def test_set_field_and_dec_ttl_through_ofctl(of_switch):
    """Header edits installed by ovs-ofctl arrive at the guest with true checksums; a TTL
    that dec_ttl would take to 0 goes no further and reaches, as INVALID_TTL, only a
    controller that asked for it (SET_ASYNC)."""
    run_dir, ports, target = of_switch
    a, b, c = ports["a"], ports["b"], ports["c"]
    ofctl(target, "del-flows")
    ofctl(target, "add-flow", "priority=10,in_port=1,tcp,actions=mod_dl_src:02:00:00:00:00:99,"
          "mod_nw_dst:10.0.0.99,set_field:8080->tcp_dst,set_field:46->ip_dscp,dec_ttl,output:2")
    ofctl(target, "add-flow", "priority=10,in_port=1,dl_vlan=5,udp,actions=set_field:3->vlan_pcp,"
          "write_actions(set_field:5353->udp_dst,output:3)")
    dump = ofctl(target, "dump-flows").stdout
    assert "priority=10,tcp,in_port=1 actions=set_field:02:00:00:00:00:99->eth_src," \
        "set_field:10.0.0.99->ip_dst,set_field:8080->tcp_dst,set_field:46->ip_dscp,dec_ttl," \
        "output:2" in dump, dump
    assert "priority=10,udp,in_port=1,dl_vlan=5 actions=set_field:3->vlan_pcp," \
        "write_actions(set_field:5353->udp_dst,output:3)" in dump, dump
    ctl = processes.ctl(run_dir, "dump-flows", "--no-stats", "br0")
    assert "actions=set_field:02:00:00:00:00:99->eth_src,set_field:10.0.0.99->ip_dst," \
        "set_field:8080->tcp_dst,set_field:46->ip_dscp,dec_ttl,output:b" in ctl.replace(
            "output:2", "output:b"), ctl
    a.send_all([frame(6)] * 2)
    got = drain(b)
    assert len(got) == 2 and got[0] == got[1]
    g = got[0]
    verify(g)
    ip, l4 = layers(g)
    assert g[6:12] == bytes([2, 0, 0, 0, 0, 0x99]) and ip[16:20] == bytes([10, 0, 0, 99])
    assert l4[2:4] == (8080).to_bytes(2, "big") and ip[1] == 46 << 2 | 1 and ip[8] == 63
    a.send_all([frame(17, vlan=0x0005)])
    got = drain(c)
    assert len(got) == 1 and got[0][14:16] == bytes([0x60, 0x05]), got
    verify(got[0])
    assert layers(got[0])[1][2:4] == (5353).to_bytes(2, "big") and drain(b, 0.2) == []
    # TTL 1: not forwarded; PACKET_IN INVALID_TTL only where SET_ASYNC asked for it
    with O.Client("127.0.0.1", listening_port(run_dir)) as plain, \
            O.Client("127.0.0.1", listening_port(run_dir)) as asking:
        assert plain.alive() and asking.alive()
        asking.send(O.msg(28, struct.pack("!6I", 0b111, 0, 0b111, 0b111, 0b1111, 0)))
        assert asking.alive()
        # (an action set's CONTROLLER: the PACKET_IN names the rule that wrote it)
        ofctl(target, "add-flow", "priority=20,cookie=0x77,in_port=1,tcp,tp_dst=99,"
              "actions=output:3,write_actions(CONTROLLER:64)")
        hit = frame(6)[:36] + (99).to_bytes(2, "big") + frame(6)[38:]
        a.send_all([hit])
        for ctl in (plain, asking):
            pin = next_packet_in(ctl)
            assert (pin["reason"], pin["cookie"], pin["data"]) == (1, 0x77, hit[:64])
        assert drain(c) == [hit]
        a.send_all([frame(6, ttl=1)])
        pin = next_packet_in(asking)
        assert (pin["reason"], pin["in_port"], pin["table"]) == (2, 1, 0)
        ip = _ip(pin["data"])                        # as the actions before it left it
        assert ip[8] == 1 and ip[16:20] == bytes([10, 0, 0, 99])
        verify(pin["data"])
        assert drain(b, 0.3) == []
        plain.sock.settimeout(0.5)
        with pytest.raises(TimeoutError):
            plain.recv()


def test_megaflow_never_carries_a_decision_across_rules(of_switch):
    """Table 0 rewrites ip_dst, table 1 decides on ip_src and the new ip_dst: frames that
    differ only in fields a table consulted, sent interleaved so that cached decisions
    would be reused, each go where the rules say."""
    run_dir, ports, target = of_switch
    a, b, c = ports["a"], ports["b"], ports["c"]
    ofctl(target, "del-flows")
    ofctl(target, "add-flow", "priority=5,in_port=2,ip,actions=set_field:10.0.0.50->ip_dst,"
          "goto_table:1")
    ofctl(target, "add-flow", "priority=5,in_port=2,arp,actions=goto_table:1")
    ofctl(target, "add-flow", "table=1,priority=10,ip,nw_src=10.0.0.1,nw_dst=10.0.0.50,"
          "actions=output:1")
    ofctl(target, "add-flow", "table=1,priority=20,tcp,nw_src=10.0.0.1,tp_dst=22,"
          "actions=output:3")
    ofctl(target, "add-flow", "table=1,priority=1,actions=output:3")

    def from_src(f: bytes, src: bytes) -> bytes:     # the same frame, another ip_src
        off = 14
        ip = f[off:off + 12] + src + f[off + 16:off + 20]
        ip = ip[:10] + b"\0\0" + ip[12:]
        ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
        return f[:off] + ip + f[off + 20:]

    one = frame(6)                                   # 10.0.0.1 -> a
    other = from_src(frame(6), bytes([10, 0, 0, 7]))  # -> c
    ssh = one[:36] + (22).to_bytes(2, "big") + one[38:]   # tp_dst 22 -> c (its L4 checksum
    arp = b"\xff" * 6 + MAC["b"] + b"\x08\x06" + bytes(28)   # is off: not checked) ; -> c
    for _ in range(3):
        b.send_all([one, other, ssh, arp, one])
        got_a, got_c = drain(a), drain(c)
        assert len(got_a) == 2 and all(_ip(f)[16:20] == bytes([10, 0, 0, 50]) for f in got_a)
        assert [(_ip(f)[12:16], f[36:38]) if f[12:14] == b"\x08\x00" else "arp"
                for f in got_c] == [(bytes([10, 0, 0, 7]), (80).to_bytes(2, "big")),
                                    (bytes([10, 0, 0, 1]), (22).to_bytes(2, "big")), "arp"]


def test_pcp_ecn_and_arp_hardware_matches_through_ofctl(of_switch):
    """dl_vlan_pcp (alone: any tag with that priority), nw_ecn and arp_sha/arp_tha (masked)
    installed by ovs-ofctl, dumped back the same, and frames sorted by them."""
    run_dir, ports, target = of_switch
    a, b, c = ports["a"], ports["b"], ports["c"]
    ofctl(target, "del-flows")
    for flow in ("priority=10,in_port=1,dl_vlan_pcp=5,actions=output:2",
                 "priority=10,in_port=1,ip,nw_ecn=3,actions=output:2",
                 "priority=10,in_port=1,arp,arp_sha=02:00:00:00:00:01,"
                 "arp_tha=02:00:00:00:00:00/ff:ff:ff:ff:ff:00,actions=output:2",
                 "priority=1,in_port=1,actions=output:3"):
        ofctl(target, "add-flow", flow)
    dump = ofctl(target, "dump-flows").stdout
    for text in ("priority=10,in_port=1,dl_vlan_pcp=5 actions=output:2",
                 "priority=10,ip,in_port=1,nw_ecn=3 actions=output:2",
                 "priority=10,arp,in_port=1,arp_sha=02:00:00:00:00:01,"
                 "arp_tha=02:00:00:00:00:00/ff:ff:ff:ff:ff:00 actions=output:2"):
        assert text in dump, dump
    ctl = processes.ctl(run_dir, "dump-flows", "--no-stats", "br0")
    assert "priority=10,in_port=1,dl_vlan_pcp=5 actions=output:2" in ctl.replace(
        "in_port=a", "in_port=1").replace("output:b", "output:2"), ctl

    def arp(sha: bytes, tha: bytes) -> bytes:
        return b"\xff" * 6 + MAC["a"] + b"\x08\x06" + bytes([0, 1, 8, 0, 6, 4, 0, 1]) + sha + \
            bytes([10, 0, 0, 1]) + tha + bytes([10, 0, 0, 2])

    to_b = [frame(6, vlan=0xA007), frame(6, vlan=0xA000),         # pcp 5 (vid 7, vid 0)
            arp(bytes([2, 0, 0, 0, 0, 1]), bytes([2, 0, 0, 0, 0, 0x42]))]
    ecn = frame(6)
    ecn = ecn[:15] + bytes([ecn[15] | 3]) + ecn[16:]              # (IP checksum off: fine)
    to_b.append(ecn)
    to_c = [frame(6, vlan=0x8007), frame(6),                      # pcp 4; untagged, ECN 1
            arp(bytes([2, 0, 0, 0, 0, 2]), bytes([2, 0, 0, 0, 0, 0x42])),
            arp(bytes([2, 0, 0, 0, 0, 1]), bytes([2, 0, 0, 0, 1, 0x42]))]
    for _ in range(2):                                            # (and from the caches)
        for f in to_b + to_c:
            a.send_all([f])
        assert drain(b) == to_b and drain(c) == to_c


def test_normal_after_set_field_decides_on_the_edited_packet(of_switch):
    """NORMAL after a set_field (in the same actions, or in a later table) learns and looks
    up the addresses as edited, as OVS's does: a rewritten destination goes to its port,
    a rewritten source is what is learned; ``ctl trace`` says the same."""
    run_dir, ports, target = of_switch
    a, b, c = ports["a"], ports["b"], ports["c"]
    ofctl(target, "del-flows")
    ofctl(target, "add-flow", "priority=1,actions=NORMAL")
    for name, port in (("b", b), ("c", c)):           # b and c learned
        port.send_all([udp(MAC[name], b"\xff" * 6)])
    drain(a)
    drain(b)
    drain(c)
    new_src = bytes([2, 0, 0, 0, 0, 0x99])
    ofctl(target, "add-flow", "priority=10,in_port=1,udp,tp_dst=53,"
          f"actions=mod_dl_dst:{MAC['c'].hex(':')},mod_dl_src:{new_src.hex(':')},NORMAL")
    ofctl(target, "add-flow", f"priority=10,in_port=1,udp,tp_dst=54,actions=set_field:"
          f"{MAC['c'].hex(':')}->eth_dst,goto_table:1")
    ofctl(target, "add-flow", "table=1,priority=1,actions=NORMAL")
    to_b = udp(MAC["a"], MAC["b"])
    a.send_all([to_b])
    assert drain(c) == [MAC["c"] + new_src + to_b[12:]] and drain(b, 0.3) == []
    to_b54 = udp(MAC["a"], MAC["b"], dport=54)
    a.send_all([to_b54])
    assert drain(c) == [MAC["c"] + to_b54[6:]] and drain(b, 0.3) == []
    back = udp(MAC["c"], new_src)                    # the edited source was learned (on a)
    c.send_all([back])
    assert drain(a) == [back] and drain(b, 0.3) == []
    trace = processes.ctl(run_dir, "trace", "br0", f"in_port=a,udp,tp_dst=54,"
                          f"dl_src={MAC['a'].hex(':')},dl_dst={MAC['b'].hex(':')}")
    assert "Outputs: c\n" in trace + "\n", trace


def test_expired_ttls_no_controller_asked_for_do_not_use_the_packet_in_budget(workdir):
    """A storm of TTL=1 frames through dec_ttl, with no controller asking for INVALID_TTL:
    dropped in the datapath (counted as dropped by the rule's action), never queued for
    the controller, so the table-miss PACKET_IN that follows still gets through the
    bridge's small PACKET_IN budget (burst 25, 1/s)."""
    config = CONFIG.replace("ptcp:0:127.0.0.1\n", "ptcp:0:127.0.0.1 controller_rate_limit=1 "
                            "controller_burst_limit=25\n")
    with switch_with_ports(workdir, config, "ab") as (run_dir, ports):
        port = listening_port(run_dir)
        target = f"tcp:127.0.0.1:{port}"
        a, b = ports["a"], ports["b"]
        ofctl(target, "del-flows")
        ofctl(target, "add-flow", "priority=10,in_port=1,tcp,actions=dec_ttl,output:2")
        ofctl(target, "add-flow", "priority=0,actions=CONTROLLER:128")
        with O.Client("127.0.0.1", port) as ctl:
            assert ctl.alive()
            for _ in range(4):
                a.send_all([frame(6, ttl=1)] * 25)
            assert drain(b, 0.3) == []
            miss = udp(MAC["a"], MAC["b"])
            a.send_all([miss])
            ctl.sock.settimeout(0.8)
            pin = next_packet_in(ctl)
            assert (pin["reason"], pin["data"]) == (0, miss), pin
        show = processes.ctl(run_dir, "show")
        m = re.search(r"packet_in: queued (\d+),", show)
        assert m and int(m.group(1)) == 1, show
