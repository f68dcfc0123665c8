"""The real ``ovs-ofctl -O OpenFlow13`` (Debian openvswitch-common) against a running
``pyvhost switch`` listening with ``set-controller ptcp:...`` on loopback: show,
dump-ports-desc, dump-tables, add-flow, add-flows FILE, mod-flows, del-flows (and
--strict), dump-flows and dump-aggregate with their outputs checked and in step with
``ctl dump-flows``; errors ovs-ofctl reports as the spec names them; traffic between two
pyvhost front-end guests following what ovs-ofctl installed; and the ctl side:
set-controller's refusals (all or nothing), del-controller, set-dpid, punix:, several
connections at once, and a restarted switch listening again."""

from __future__ import annotations

import os
import re
import socket
import struct

import pytest

from tests.harness import openflow as O
from tests.harness import processes
from tests.harness.frontends import drain, switch_with_ports
from tests.harness.openflow import flow_lines, ofctl

pytestmark = pytest.mark.skipif(not os.path.exists(O.OVS_OFCTL),
                                reason="ovs-ofctl (Debian openvswitch-common) is not installed")

MAC = {n: bytes([0x02, 0, 0, 0, 0, i + 1]) for i, n in enumerate("ab")}
CONFIG = "add-br br0\n" + "".join(f"add-port br0 {n} type=vhostuser queues=1\n" for n in "ab") \
    + "set-dpid br0 0x00000000cafe0001\nset-controller br0 ptcp:0:127.0.0.1\n"


def udp(src: bytes, dst: bytes, dport: int = 53, vlan: int | None = None) -> bytes:
    ip = bytes([0x45, 0, 0, 28, 0, 0, 0, 0, 64, 17, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2])
    tag = b"\x81\x00" + vlan.to_bytes(2, "big") if vlan is not None else b""
    return dst + src + tag + b"\x08\x00" + ip + (1000).to_bytes(2, "big") + \
        dport.to_bytes(2, "big") + bytes(4) + b"p" * 18


def listening_port(run_dir) -> int:
    show = processes.ctl(run_dir, "show")
    m = re.search(r"listening on 127\.0\.0\.1:(\d+)", show)
    assert m, show
    return int(m.group(1))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def of_switch(workdir):
    with switch_with_ports(workdir, CONFIG, "ab") as (run_dir, ports):
        yield run_dir, ports, f"tcp:127.0.0.1:{listening_port(run_dir)}"


def test_show_ports_and_tables(of_switch):
    run_dir, _, target = of_switch
    out = ofctl(target, "show").stdout
    assert "OFPT_FEATURES_REPLY (OF1.3)" in out and "dpid:00000000cafe0001" in out, out
    assert "n_tables:255" in out and "capabilities: FLOW_STATS TABLE_STATS PORT_STATS" in out
    assert re.search(r" 1\(a\): addr:00:00:00:00:00:00\n\s+config:\s+0\n\s+state:\s+LIVE", out)
    assert " 2(b): " in out and "frags=normal miss_send_len=128" in out
    desc = ofctl(target, "dump-ports-desc").stdout
    assert " 1(a): " in desc and " 2(b): " in desc
    tables = ofctl(target, "dump-tables").stdout
    assert re.search(r"table 0:\n\s+active=1, lookup=0, matched=0", tables), tables
    assert "tables 2...254: ditto" in tables
    assert "dpid: 00000000cafe0001" in processes.ctl(run_dir, "show").replace(
        "datapath_id:", "dpid:")


def test_an_address_mask_that_is_no_prefix_through_ofctl(of_switch):
    """ovs-ofctl sends nw_dst=10.0.0.7/255.0.255.255 with that mask (OVS takes any): the
    rule is added (it was refused, BAD_NW_ADDR_MASK) and dumps as ovs-ofctl wrote it, and
    as ctl writes it."""
    run_dir, _, target = of_switch
    ofctl(target, "add-flow", "priority=100,ip,nw_dst=10.0.0.7/255.0.255.255,actions=output:2")
    dump = ofctl(target, "dump-flows", "ip").stdout
    assert "priority=100,ip,nw_dst=10.0.0.7/255.0.255.255 actions=output:2" in dump, dump
    ctl = processes.ctl(run_dir, "dump-flows", "--no-stats", "br0")
    assert " priority=100,ip,nw_dst=10.0.0.7/255.0.255.255 actions=output:2" in ctl, ctl


def test_flow_table_through_ofctl(of_switch, tmp_path):
    run_dir, _, target = of_switch
    ofctl(target, "add-flow", "priority=100,cookie=0x5,in_port=1,ip,nw_dst=10.0.0.0/24,"
          "actions=output:2")
    ofctl(target, "add-flow", "table=0,priority=90,in_port=2,dl_vlan=10,"
          "actions=strip_vlan,output:1")
    rules = tmp_path / "rules.txt"
    rules.write_text("# from a file\npriority=80,tcp,tp_dst=80,actions=goto_table:3\n"
                     "table=3,priority=5,udp,tp_src=0x100/0xff00,actions=flood\n"
                     "priority=70,in_port=2,vlan_tci=0,actions=mod_vlan_vid:20,output:1\n")
    ofctl(target, "add-flows", str(rules))
    dump = ofctl(target, "dump-flows").stdout
    assert flow_lines(dump) == sorted([
        "cookie=0x5, table=0, n_packets=0, n_bytes=0, priority=100,ip,in_port=1,"
        "nw_dst=10.0.0.0/24 actions=output:2",
        "cookie=0x0, table=0, n_packets=0, n_bytes=0, priority=90,in_port=2,dl_vlan=10 "
        "actions=pop_vlan,output:1",
        "cookie=0x0, table=0, n_packets=0, n_bytes=0, priority=80,tcp,tp_dst=80 "
        "actions=goto_table:3",
        "cookie=0x0, table=0, n_packets=0, n_bytes=0, priority=70,in_port=2,"
        "vlan_tci=0x0000/0x1fff actions=push_vlan:0x8100,set_field:4116->vlan_vid,output:1",
        "cookie=0x0, table=0, n_packets=0, n_bytes=0, priority=0 actions=NORMAL",
        "cookie=0x0, table=3, n_packets=0, n_bytes=0, priority=5,udp,tp_src=0x100/0xff00 "
        "actions=FLOOD"]), dump
    ctl = processes.ctl(run_dir, "dump-flows", "--no-stats", "br0")
    assert " cookie=0x5, priority=100,ip,in_port=1,nw_dst=10.0.0.0/24 actions=output:2" in ctl
    assert " priority=70,in_port=2,dl_vlan=0xffff actions=mod_vlan_vid:20,output:1" in ctl
    assert " table=3, priority=5,udp,tp_src=0x0100/0xff00 actions=flood" in ctl
    assert "flow_count=6" in ofctl(target, "dump-aggregate").stdout
    # a rule from ctl is seen by ovs-ofctl, ports by number
    processes.ctl(run_dir, "add-flow", "br0", "priority=60,in_port=a,actions=output:b")
    assert "priority=60,in_port=1 actions=output:2" in ofctl(target, "dump-flows").stdout
    # mod-flows: actions of every rule at least as specific (table 0), cookies kept
    ofctl(target, "mod-flows", "in_port=2,actions=drop")
    dump = ofctl(target, "dump-flows", "in_port=2").stdout
    assert flow_lines(dump) == sorted([
        "cookie=0x0, table=0, n_packets=0, n_bytes=0, priority=90,in_port=2,dl_vlan=10 "
        "actions=drop",
        "cookie=0x0, table=0, n_packets=0, n_bytes=0, priority=70,in_port=2,"
        "vlan_tci=0x0000/0x1fff actions=drop"]), dump
    ofctl(target, "mod-flows", "--strict", "priority=100,ip,in_port=1,nw_dst=10.0.0.0/24,"
          "actions=output:1,output:2")
    assert "cookie=0x5" in ofctl(target, "dump-flows", "cookie=0x5/-1").stdout
    assert "actions=output:1,output:2" in processes.ctl(run_dir, "dump-flows", "br0")
    # del-flows --strict takes one rule, del-flows all it subsumes, with cookies
    ofctl(target, "del-flows", "--strict", "priority=90,in_port=2,dl_vlan=10")
    ofctl(target, "del-flows", "--strict", "priority=91,in_port=2")           # none: fine
    assert "dl_vlan=10" not in ofctl(target, "dump-flows").stdout
    ofctl(target, "del-flows", "cookie=0x5/-1")
    ofctl(target, "del-flows", "table=3")
    ofctl(target, "del-flows", "in_port=2")
    left = flow_lines(ofctl(target, "dump-flows").stdout)
    assert [line.split(", ", 4)[-1] for line in left] == \
        ["priority=0 actions=NORMAL", "priority=60,in_port=1 actions=output:2",
         "priority=80,tcp,tp_dst=80 actions=goto_table:3"], left
    ofctl(target, "del-flows")
    assert flow_lines(ofctl(target, "dump-flows").stdout) == []
    assert processes.ctl(run_dir, "dump-flows", "br0") == ""
    # ports by name (ovs-ofctl reads them from PORT_DESC), replace-flows and diff-flows
    ofctl(target, "add-flow", "priority=4,in_port=a,actions=output:b")
    assert "priority=4,in_port=a actions=output:b" in \
        ofctl(target, "--names", "dump-flows").stdout
    rules.write_text("priority=5,in_port=1,actions=output:2\npriority=6,ip,actions=drop\n")
    ofctl(target, "replace-flows", str(rules))
    assert ofctl(target, "diff-flows", str(rules)).stdout == ""
    assert processes.ctl(run_dir, "dump-flows", "--no-stats", "br0") == \
        " priority=6,ip actions=drop\n priority=5,in_port=1 actions=output:2"


def test_ofctl_reports_the_spec_errors(of_switch):
    _, _, target = of_switch
    for flow, error in (("priority=5,actions=LOCAL", "OFPBAC_BAD_OUT_PORT"),
                        ("priority=5,actions=output:9", "OFPBAC_BAD_OUT_PORT"),
                        ("priority=5,actions=write_actions(LOCAL)", "OFPBAC_BAD_OUT_PORT"),
                        ("priority=5,actions=group:1", "OFPBAC_BAD_OUT_GROUP"),
                        ("priority=5,sctp,tp_dst=5,actions=drop", "OFPBMC_BAD_FIELD"),
                        ("priority=5,ip,nw_ttl=3,actions=drop", "OFPBMC_BAD_FIELD"),
                        ("priority=5,in_port=2,actions=push_vlan:0x8100,output:1",
                         "OFPBAC_MATCH_INCONSISTENT"),
                        ("priority=5,in_port=9,actions=drop", "OFPBMC_BAD_VALUE")):
        r = ofctl(target, "add-flow", flow, check=False)
        assert r.returncode != 0 and error in r.stderr, (flow, r.stderr)
    r = ofctl(target, "add-flow", "check_overlap,priority=0,actions=drop", check=False)
    # (an identical match at the same priority overlaps)
    assert r.returncode != 0 and "OFPFMFC_OVERLAP" in r.stderr, r.stderr
    r = ofctl(target, "queue-stats", check=False)       # (OVS names BAD_MULTIPART so)
    assert "OFPBRC_BAD_STAT" in r.stdout + r.stderr, r
    assert "priority=0 actions=NORMAL" in ofctl(target, "dump-flows").stdout


def test_traffic_follows_what_ofctl_installed(of_switch):
    run_dir, ports, target = of_switch
    a, b = ports["a"], ports["b"]
    ofctl(target, "del-flows")
    ofctl(target, "add-flow", "priority=10,in_port=1,udp,tp_dst=53,actions=output:2")
    ofctl(target, "add-flow", "priority=10,in_port=1,udp,tp_dst=54,vlan_tci=0,"
          "actions=mod_vlan_vid:20,output:2")
    ofctl(target, "add-flow", "priority=10,in_port=2,dl_vlan=30,actions=strip_vlan,output:1")
    a.send_all([udp(MAC["a"], MAC["b"])] * 25)
    assert drain(b) == [udp(MAC["a"], MAC["b"])] * 25
    a.send_all([udp(MAC["a"], MAC["b"], dport=54)] * 3)
    assert drain(b) == [udp(MAC["a"], MAC["b"], dport=54, vlan=20)] * 3
    b.send_all([udp(MAC["b"], MAC["a"], vlan=30)] * 4 + [udp(MAC["b"], MAC["a"])] * 2)
    assert drain(a) == [udp(MAC["b"], MAC["a"])] * 4           # no rule for untagged: drop
    a.send_all([udp(MAC["a"], MAC["b"], dport=99)] * 2)         # no rule: dropped
    assert drain(b, 0.3) == []
    dump = ofctl(target, "dump-flows").stdout
    n = {m.group(2): int(m.group(1)) for m in
         re.finditer(r"n_packets=(\d+), n_bytes=\d+, (priority=10,\S+)", dump)}
    assert n == {"priority=10,udp,in_port=1,tp_dst=53": 25,
                 "priority=10,udp,in_port=1,vlan_tci=0x0000/0x1fff,tp_dst=54": 3,
                 "priority=10,in_port=2,dl_vlan=30": 4}, dump
    ctl = processes.ctl(run_dir, "dump-flows", "br0")
    assert re.search(r"n_packets=25, .*priority=10,udp,in_port=1,tp_dst=53 ", ctl), ctl
    assert "packet_count=32" in ofctl(target, "dump-aggregate").stdout
    # mod-flows takes effect on the next packets; the counters carry on
    ofctl(target, "mod-flows", "in_port=1,udp,tp_dst=53,actions=drop")
    a.send_all([udp(MAC["a"], MAC["b"])] * 5)
    assert drain(b, 0.3) == []
    assert re.search(r"n_packets=30, .*tp_dst=53 actions=drop",
                     ofctl(target, "dump-flows").stdout)
    # ADD of the same match and priority replaces the rule: counters carry over (OpenFlow
    # 1.3), unless reset_counts
    ofctl(target, "add-flow", "priority=10,in_port=1,udp,tp_dst=53,actions=output:2")
    assert re.search(r"n_packets=30, .*tp_dst=53 actions=output:2",
                     ofctl(target, "dump-flows").stdout)
    ofctl(target, "add-flow", "reset_counts,priority=10,in_port=1,udp,tp_dst=53,"
          "actions=output:2")
    assert re.search(r"n_packets=0, .*tp_dst=53 actions=output:2",
                     ofctl(target, "dump-flows").stdout)
    # port counters: what each port received from its guest and sent to it
    stats = ofctl(target, "dump-ports").stdout
    assert re.search(r"port  1: rx pkts=35, .*\n\s+tx pkts=4, ", stats), stats
    assert re.search(r"port  2: rx pkts=6, .*\n\s+tx pkts=28, ", stats), stats


def test_set_controller_refusals_punix_connections_and_del(of_switch, workdir):
    run_dir, _, target = of_switch
    port = listening_port(run_dir)
    for argv, why in ((["ssl:127.0.0.1:6653"], "not supported"), (["tcp:nowhere"], "IP address"),
                      (["ptcp:70000"], "0..65535"), (["ptcp:6653:nowhere"], "not an IP"),
                      (["punix:/tmp/of.sock"], "run directory"), (["bogus"], "target is"),
                      (["ptcp:1:127.0.0.1", "ptcp:1:127.0.0.1"], "twice")):
        msg = processes.ctl(run_dir, "set-controller", "br0", *argv, check=False)
        assert why in msg, (argv, msg)
    assert "no bridge named nobr" in processes.ctl(run_dir, "set-controller", "nobr",
                                                   "ptcp:0", check=False)
    with socket.socket() as busy:                 # a port in use: nothing changes
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        msg = processes.ctl(run_dir, "set-controller", "br0", f"ptcp:{port}:127.0.0.1",
                            f"ptcp:{taken}:127.0.0.1", check=False)
        assert "in use" in msg, msg
    assert listening_port(run_dir) == port and "dpid:" in ofctl(target, "show").stdout
    # punix next to ptcp; several connections at once, ovs-ofctl served meanwhile
    processes.ctl(run_dir, "set-controller", "br0", f"ptcp:{port}:127.0.0.1", "punix:of.sock")
    assert (run_dir / "of.sock").is_socket()
    with O.Client("127.0.0.1", port) as c1, O.Client("127.0.0.1", port) as c2:
        assert "connections: 2" in processes.ctl(run_dir, "show")
        out = ofctl(f"unix:{run_dir / 'of.sock'}", "dump-flows").stdout
        assert "priority=0 actions=NORMAL" in out
        assert c1.alive() and c2.alive()
        t, _, body = c2.request(O.msg(O.FEATURES_REQUEST))
        assert t == O.FEATURES_REPLY and struct.unpack_from("!Q", body)[0] == 0xCAFE0001
    processes.ctl(run_dir, "set-dpid", "br0", "42")
    assert "dpid:000000000000002a" in ofctl(target, "show").stdout
    processes.ctl(run_dir, "del-controller", "br0")
    assert not (run_dir / "of.sock").exists()
    assert "Controller" not in processes.ctl(run_dir, "show")
    r = ofctl(target, "show", check=False, timeout=20)
    assert r.returncode != 0 and "refused" in r.stderr.lower(), r.stderr


def test_a_restarted_switch_listens_again(workdir):
    run_dir = workdir / "run"
    port = free_port()
    config = f"add-br br0\nset-controller br0 ptcp:{port}:127.0.0.1\n"
    sw = processes.switch(workdir, run_dir, config=config)
    try:
        target = f"tcp:127.0.0.1:{port}"
        ofctl(target, "add-flow", "priority=9,cookie=0x99,ip,actions=drop")
        dpid = re.search(r"dpid:([0-9a-f]{16})", ofctl(target, "show").stdout).group(1)
    finally:
        assert sw.stop() == 0
    with socket.socket() as busy:              # the port taken meanwhile: shown, not fatal
        busy.bind(("127.0.0.1", port))
        busy.listen()
        sw = processes.switch(workdir, run_dir, name="switch2")
        try:
            show = processes.ctl(run_dir, "show")
        except BaseException:
            sw.stop()
            raise
    try:
        assert f'Controller "ptcp:{port}:127.0.0.1"  not listening: ' in show, show
        processes.ctl(run_dir, "set-controller", "br0", f"ptcp:{port}:127.0.0.1")
        out = ofctl(target, "show").stdout
        assert f"dpid:{dpid}" in out
        assert "cookie=0x99" in ofctl(target, "dump-flows").stdout
        processes.ctl(run_dir, "del-br", "br0")       # its controller goes with it
        r = ofctl(target, "show", check=False, timeout=20)
        assert r.returncode != 0 and "refused" in r.stderr.lower(), r
        processes.ctl(run_dir, "add-br", "br0")
        assert "Controller" not in processes.ctl(run_dir, "show")
    finally:
        assert sw.stop() == 0


def test_a_stored_datapath_id_out_of_range_is_reported_and_replaced(workdir):
    """A corrupt store (a datapath id of 2**64) must not make every FEATURES_REPLY fail:
    the switch says so and serves with datapath id 1."""
    import json
    import sqlite3
    run_dir = workdir / "run"
    sw = processes.switch(workdir, run_dir, config="add-br br0\n"
                          "set-controller br0 ptcp:0:127.0.0.1\n")
    sw.stop()
    with sqlite3.connect(run_dir / "conf.db") as db:
        (text,) = db.execute("SELECT value FROM settings WHERE key='openflow:br0'").fetchone()
        conf = dict(json.loads(text), dpid=1 << 64)
        db.execute("UPDATE settings SET value=? WHERE key='openflow:br0'", (json.dumps(conf),))
    sw = processes.switch(workdir, run_dir)
    try:
        out = ofctl(f"tcp:127.0.0.1:{listening_port(run_dir)}", "show").stdout
        assert "dpid:0000000000000001" in out, out
        assert "stored datapath id 18446744073709551616 is not one" in sw.errors()
    finally:
        sw.stop()
