"""OpenFlow groups through the real ``ovs-ofctl -O OpenFlow13`` against a running switch
with three pyvhost front-end guests: add-group/mod-group/del-groups, dump-groups,
dump-group-features and dump-group-stats with their outputs checked; rules using groups
(a missing group refused); traffic: ALL copies to every bucket, INDIRECT to its one,
SELECT spreads flows by their 5-tuple (a flow always to the same bucket), FAST_FAILOVER
takes the first bucket whose watched port is up and fails over when its guest goes;
deleting a group deletes its rules; ``ctl trace`` resolves groups; groups survive a
switch restart."""

from __future__ import annotations

import os
import re

import pytest

from pyvhost.frontend import VirtioUser
from tests.harness import openflow as O
from tests.harness import processes
from tests.harness.frontends import drain, switch_with_ports
from tests.harness.openflow import ofctl
from tests.test_openflow_packets import CONFIG, MAC, listening_port, udp

pytestmark = pytest.mark.skipif(not os.path.exists(O.OVS_OFCTL),
                                reason="ovs-ofctl (Debian openvswitch-common) is not installed")


def lines(out: str) -> list[str]:
    return sorted(line.strip() for line in out.splitlines()[1:] if line.strip())


def test_groups_through_ofctl(workdir):
    with switch_with_ports(workdir, CONFIG, "abc") as (run_dir, ports):
        target = f"tcp:127.0.0.1:{listening_port(run_dir)}"
        a, b, c = ports["a"], ports["b"], ports["c"]
        ofctl(target, "add-group", "group_id=1,type=all,bucket=output:2,bucket=output:3")
        ofctl(target, "add-group", "group_id=2,type=indirect,bucket=output:3")
        ofctl(target, "add-group", "group_id=3,type=select,bucket=weight:1,output:2,"
              "bucket=weight:2,output:3")
        ofctl(target, "add-group", "group_id=4,type=fast_failover,"
              "bucket=watch_port:2,output:2,bucket=watch_port:3,output:3")
        dump = ofctl(target, "dump-groups").stdout
        assert lines(dump) == sorted([
            "group_id=1,type=all,bucket=actions=output:2,bucket=actions=output:3",
            "group_id=2,type=indirect,bucket=actions=output:3",
            "group_id=3,type=select,bucket=actions=output:2,bucket=weight:2,actions=output:3",
            "group_id=4,type=ff,bucket=watch_port:2,actions=output:2,"
            "bucket=watch_port:3,actions=output:3"]), dump
        features = ofctl(target, "dump-group-features").stdout
        assert "Types:  0xf" in features and "Capabilities:  0x3" in features, features
        assert features.count("max_groups=0x400") == 4, features
        for flow in ("priority=10,udp,tp_dst=1,actions=group:1",
                     "priority=10,udp,tp_dst=2,actions=group:2",
                     "priority=10,udp,tp_dst=4,actions=group:4"):
            ofctl(target, "add-flow", flow)
        ofctl(target, "add-flow", "priority=10,udp,actions=group:3")
        assert "actions=group:1" in processes.ctl(run_dir, "dump-flows", "br0")
        r = ofctl(target, "add-flow", "priority=9,actions=group:9", check=False)
        assert r.returncode != 0 and "OFPBAC_BAD_OUT_GROUP" in r.stderr, r.stderr
        r = ofctl(target, "add-group", "group_id=1,type=all,bucket=output:2", check=False)
        assert r.returncode != 0 and "OFPGMFC_GROUP_EXISTS" in r.stderr, r.stderr
        r = ofctl(target, "add-group", "group_id=5,type=all,bucket=output:9", check=False)
        assert r.returncode != 0 and "OFPBAC_BAD_OUT_PORT" in r.stderr, r.stderr
        r = ofctl(target, "mod-group", "group_id=7,type=all,bucket=output:2", check=False)
        assert r.returncode != 0 and "OFPGMFC_UNKNOWN_GROUP" in r.stderr, r.stderr
        # traffic
        f1, f2, f4 = (udp(MAC["a"], MAC["b"], dport=d) for d in (1, 2, 4))
        a.send_all([f1] * 3)
        assert drain(b) == [f1] * 3 and drain(c) == [f1] * 3          # ALL
        a.send_all([f2] * 2)
        assert drain(c) == [f2] * 2 and drain(b, 0.2) == []           # INDIRECT
        a.send_all([f4] * 2)
        assert drain(b) == [f4] * 2 and drain(c, 0.2) == []           # FF: bucket 1 live
        to_b = to_c = 0
        for port in range(100, 132):                                  # SELECT: by 5-tuple
            frame = udp(MAC["a"], MAC["b"], dport=port)
            a.send_all([frame] * 2)
            got_b, got_c = drain(b, 0.15), drain(c, 0.15)
            assert (got_b, got_c) in (([frame] * 2, []), ([], [frame] * 2)), port
            to_b += bool(got_b)
            to_c += bool(got_c)
        assert to_b and to_c, (to_b, to_c)
        # trace resolves groups as the upcall does: ALL to both, SELECT one by 5-tuple
        trace = processes.ctl(run_dir, "trace", "br0", "in_port=a,udp,tp_dst=1")
        assert "Outputs: b, c" in trace, trace
        trace = processes.ctl(run_dir, "trace", "br0", "in_port=a,udp,tp_src=1000,tp_dst=100,"
                              "nw_src=10.0.0.1,nw_dst=10.0.0.2")
        assert re.search(r"Outputs: [bc]\n", trace + "\n"), trace
        assert "nw_src" in trace and "tp_src" in trace and "tp_dst" in trace, trace
        stats = ofctl(target, "dump-group-stats", "group_id=1").stdout
        assert re.search(r"group_id=1,duration=[\d.]+s,ref_count=1,packet_count=3,"
                         r"byte_count=180,bucket0:packet_count=3,byte_count=180,"
                         r"bucket1:packet_count=3,byte_count=180", stats), stats
        # FAST_FAILOVER fails over when b's guest goes (its link is looked at once a second)
        b.close()
        ports.pop("b")
        for _ in range(50):
            a.send_all([f4])
            if drain(c, 0.1) == [f4]:
                break
        else:
            raise AssertionError("FAST_FAILOVER did not take bucket 2")
        ports["b"] = VirtioUser(str(run_dir / "b.sock"), ring_size=256).open()
        # mod-group, then del-groups deletes the rules that use the group
        ofctl(target, "mod-group", "group_id=2,type=indirect,bucket=output:1")
        c.send_all([udp(MAC["c"], MAC["a"], dport=2)])
        assert drain(a) == [udp(MAC["c"], MAC["a"], dport=2)]
        ofctl(target, "del-groups", "group_id=2")
        flows = ofctl(target, "dump-flows").stdout
        assert "group:2" not in flows and "group:1" in flows, flows
        assert "group_id=2" not in ofctl(target, "dump-groups").stdout
    # the groups (and the rules using them) come back with the switch
    sw = processes.switch(workdir, run_dir, name="switch2")
    try:
        target = f"tcp:127.0.0.1:{listening_port(run_dir)}"
        dump = ofctl(target, "dump-groups").stdout
        assert "group_id=1,type=all" in dump and "group_id=4,type=ff" in dump
        assert "actions=group:1" in ofctl(target, "dump-flows").stdout
        ofctl(target, "del-groups")
        assert "group:" not in ofctl(target, "dump-flows").stdout
        assert lines(ofctl(target, "dump-groups").stdout) == []
    finally:
        assert sw.stop() == 0


def test_a_group_used_only_in_write_actions(workdir):
    """A rule naming a group only inside write_actions uses it as much as one naming it in
    its apply-actions: it counts in the group's stats, and GROUP_DELETE deletes it (kept,
    it would forward through whatever group next takes the freed slot)."""
    with switch_with_ports(workdir, CONFIG, "ab") as (run_dir, ports):
        target = f"tcp:127.0.0.1:{listening_port(run_dir)}"
        a, b = ports["a"], ports["b"]
        ofctl(target, "del-flows")
        ofctl(target, "add-group", "group_id=5,type=all,bucket=output:2")
        ofctl(target, "add-flow", "priority=10,in_port=1,actions=write_actions(group:5)")
        f = udp(MAC["a"], MAC["b"])
        a.send_all([f] * 2)
        assert drain(b) == [f] * 2
        stats = ofctl(target, "dump-group-stats", "group_id=5").stdout
        assert re.search(r"group_id=5,duration=[\d.]+s,ref_count=1,packet_count=2,"
                         r"byte_count=120,bucket0:packet_count=2,byte_count=120", stats), stats
        ofctl(target, "del-groups", "group_id=5")
        assert "group:5" not in ofctl(target, "dump-flows").stdout
        ofctl(target, "add-group", "group_id=7,type=all,bucket=output:in_port")
        a.send_all([f])
        assert drain(a, 0.3) == [] and drain(b, 0.2) == []
