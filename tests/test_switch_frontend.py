"""``pyvhost switch`` forwarding between pyvhost's own frontends (no VM, no DPDK): flooding
and learning, VLAN push/strip, drop rules and their counters, bridge isolation, egress
rate limiting, a port deleted and a frontend reconnecting while the switch runs on."""

from __future__ import annotations

import re
import time

import pytest

from tests.harness import processes
from tests.harness.frontends import drain, switch_with_ports

MAC = {n: bytes([0x02, 0, 0, 0, 0, i + 1]) for i, n in enumerate("abcd")}
BCAST = b"\xff" * 6
CONFIG = """add-br br0
add-port br0 a type=vhostuser queues=1
add-port br0 b type=vhostuser queues=1
add-port br0 c type=vhostuser queues=1
add-br br1
add-port br1 d type=vhostuser queues=1
"""


def frame(src: bytes, dst: bytes, payload: bytes = b"x" * 50, vlan: int | None = None) -> bytes:
    tag = b"\x81\x00" + vlan.to_bytes(2, "big") if vlan is not None else b""
    return dst + src + tag + b"\x88\xb5" + payload          # local experimental ethertype




@pytest.fixture
def switch_ports(workdir):
    with switch_with_ports(workdir, CONFIG, "abcd") as (run_dir, ports):
        yield run_dir, ports


def test_flood_learn_and_isolation(switch_ports):
    run_dir, ports = switch_ports
    assert ports["a"].send([frame(MAC["a"], BCAST)]) == 1
    assert drain(ports["b"]) == [frame(MAC["a"], BCAST)]
    assert drain(ports["c"]) == [frame(MAC["a"], BCAST)]
    assert drain(ports["d"], 0.3) == []                     # another bridge
    assert drain(ports["a"], 0.3) == []                     # never back out of the input
    ports["b"].send([frame(MAC["b"], MAC["a"])])            # a's MAC was learned
    assert drain(ports["a"]) == [frame(MAC["b"], MAC["a"])]
    assert drain(ports["c"], 0.3) == []
    fdb = processes.ctl(run_dir, "fdb-show", "br0")
    assert "02:00:00:00:00:01" in fdb and "02:00:00:00:00:02" in fdb, fdb


def test_vlan_push_strip_and_drop(switch_ports):
    run_dir, ports = switch_ports
    processes.ctl(run_dir, "add-flow", "br0", "priority=10,in_port=a,actions=mod_vlan_vid:42,"
                                              "output:b")
    processes.ctl(run_dir, "add-flow", "br0", "priority=10,in_port=b,dl_vlan=42,"
                                              "actions=strip_vlan,output:a")
    processes.ctl(run_dir, "add-flow", "br0", "priority=20,in_port=c,actions=drop")
    plain = frame(MAC["a"], MAC["b"])
    ports["a"].send([plain])
    assert drain(ports["b"]) == [frame(MAC["a"], MAC["b"], vlan=42)]
    ports["b"].send([frame(MAC["b"], MAC["a"], vlan=42)])
    assert drain(ports["a"]) == [frame(MAC["b"], MAC["a"])]
    ports["c"].send([frame(MAC["c"], BCAST)] * 10)
    assert drain(ports["a"], 0.3) == [] and drain(ports["b"], 0.3) == []
    flows = processes.ctl(run_dir, "dump-flows", "br0")
    assert re.search(r"n_packets=10, .*priority=20,in_port=c actions=drop", flows), flows
    assert re.search(r"n_packets=1, .*mod_vlan_vid:42,output:b", flows), flows


def test_wildcard_cache_follows_rule_changes(switch_ports):
    """Many distinct flows share one cached decision; a new rule changes it at once."""
    run_dir, ports = switch_ports
    processes.ctl(run_dir, "add-flow", "br0", "priority=10,in_port=a,actions=output:b")
    frames = [frame(MAC["a"], bytes([2, 1, 0, 0, i >> 8, i & 255])) for i in range(200)]
    for i in range(0, 200, 50):
        ports["a"].send_all(frames[i:i + 50])
        time.sleep(0.05)
    assert len(drain(ports["b"])) == 200
    stats = processes.ctl(run_dir, "pmd-stats-show")
    upcalls = int(re.search(r"upcalls: (\d+)", stats).group(1))
    assert upcalls < 10, stats                  # 200 flows, one wildcard entry
    processes.ctl(run_dir, "add-flow", "br0", "priority=30,in_port=a,actions=output:c")
    ports["a"].send([frames[0]])
    assert drain(ports["c"]) == [frames[0]] and drain(ports["b"], 0.3) == []


def test_egress_rate_limit(switch_ports):
    run_dir, ports = switch_ports
    processes.ctl(run_dir, "add-flow", "br0", "priority=10,in_port=a,actions=output:b")
    processes.ctl(run_dir, "set-qos", "b", "max-rate=1000")           # 1 Mbit/s
    big = frame(MAC["a"], MAC["b"], payload=bytes(1400))
    sent = ports["a"].send_all([big] * 200, timeout=5)
    got = drain(ports["b"])
    assert sent == 200 and 0 < len(got) < 100, len(got)   # a 16 KB burst, then the rate
    ports_text = processes.ctl(run_dir, "dump-ports", "br0")
    assert int(re.search(r"\(b\).*\n.*qos=(\d+)", ports_text).group(1)) > 0, ports_text


def test_port_deleted_and_frontend_reconnects(switch_ports):
    run_dir, ports = switch_ports
    processes.ctl(run_dir, "del-port", "br0", "c")
    ports["a"].send([frame(MAC["a"], BCAST)])
    assert drain(ports["b"]) == [frame(MAC["a"], BCAST)]
    ports["b"].disconnect()
    ports["b"].reconnect()
    ports["a"].send([frame(MAC["a"], BCAST, b"again" * 10)])
    assert drain(ports["b"]) == [frame(MAC["a"], BCAST, b"again" * 10)]
    assert "Port c" not in processes.ctl(run_dir, "show")
