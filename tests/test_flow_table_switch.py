"""The flow table in a running switch, driven through ``pyvhost ctl`` with pyvhost frontends
as guests: megaflow masks in the datapath (a frame differing only in a wildcarded field hits
the cache, one differing in a consulted field does not), add-flows files (atomic, line
numbers), replace-flows leaving untouched rules' counters running, idle and hard timeouts,
trace --json, and storms of random source MACs and of unique destinations from one port
while the other ports' frames are all delivered and cost no upcalls."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest

from tests.harness import processes
from tests.harness.frontends import drain, switch_with_ports

MAC = {n: bytes([0x02, 0, 0, 0, 0, i + 1]) for i, n in enumerate("abcd")}
CONFIG = "add-br br0\n" + "".join(f"add-port br0 {n} type=vhostuser queues=1\n" for n in "abcd")


def udp(src_mac: bytes, dst_mac: bytes, nw_src: str, nw_dst: str, sport: int = 1000,
        dport: int = 53) -> bytes:
    ip = bytes([0x45, 0, 0, 28, 0, 0, 0, 0, 64, 17, 0, 0]) + \
        bytes(int(x) for x in nw_src.split(".")) + bytes(int(x) for x in nw_dst.split("."))
    return dst_mac + src_mac + b"\x08\x00" + ip + sport.to_bytes(2, "big") + \
        dport.to_bytes(2, "big") + bytes(4) + b"p" * 18




def upcalls(run_dir) -> int:
    return int(re.search(r"upcalls: (\d+)", processes.ctl(run_dir, "pmd-stats-show")).group(1))


def ctl_run(run_dir, *argv, stdin: str | None = None):
    return subprocess.run([sys.executable, "-m", "pyvhost.cli.main", "ctl", "--control",
                           str(run_dir / "ctl.sock"), *argv], capture_output=True, text=True,
                          input=stdin, timeout=120)


def counters(run_dir, match: str) -> int:
    """n_packets of the rule whose dump-flows line contains ``match``."""
    for line in processes.ctl(run_dir, "dump-flows", "br0").splitlines():
        if match in line:
            return int(re.search(r"n_packets=(\d+)", line).group(1))
    raise AssertionError(f"no rule {match!r}")


@pytest.fixture
def switch_ports(workdir):
    with switch_with_ports(workdir, CONFIG, "abcd") as (run_dir, ports):
        yield run_dir, ports


def test_megaflow_masks_in_the_datapath(switch_ports):
    run_dir, ports = switch_ports
    rules = "priority=10,in_port=a,ip,nw_dst=10.0.0.0/24,actions=output:b\n" \
            "priority=5,in_port=a,actions=output:c\n"
    assert ctl_run(run_dir, "add-flows", "br0", "-", stdin=rules).returncode == 0
    ports["a"].send([udp(MAC["a"], MAC["b"], "10.9.0.1", "10.0.0.5")])
    assert len(drain(ports["b"])) == 1
    base = upcalls(run_dir)
    # differs only in fields no consulted subtable looks at: the cached megaflow answers
    same = [udp(bytes([2, 9, 0, 0, 0, i]), MAC["d"], f"10.9.{i}.1", f"10.0.0.{i}",
                sport=2000 + i, dport=i) for i in range(1, 41)]
    ports["a"].send_all(same)
    assert len(drain(ports["b"])) == 40 and upcalls(run_dir) == base
    # a consulted bit differs: a new upcall, and the other rule's answer
    ports["a"].send([udp(MAC["a"], MAC["b"], "10.9.0.1", "10.0.1.5")])
    assert len(drain(ports["c"])) == 1 and upcalls(run_dir) == base + 1
    trace = ctl_run(run_dir, "trace", "--json", "br0",
                    "in_port=a,dl_dst=02:00:00:00:00:02,udp,nw_src=1.2.3.4,nw_dst=10.0.0.9,"
                    "tp_dst=53")
    summary = json.loads(trace.stdout.strip().splitlines()[-1])
    assert summary == {"rule": "priority=10,ip,in_port=a,nw_dst=10.0.0.0/24 actions=output:b",
                       "actions": "output:b", "outputs": ["b"]}, trace.stdout
    assert "Megaflow: in_port,dl_type,nw_dst" in trace.stdout


def test_an_address_netmask_that_is_no_prefix_matches_its_bits(switch_ports):
    """nw_dst=10.0.0.7/255.0.255.255 (as ovs-ofctl takes it) matches 10.X.0.7 for any X and
    nothing else: it was refused ("netmask is not contiguous"). Its subtable has no prefix
    trie; the classifier compares the masked bits, and so does the megaflow."""
    run_dir, ports = switch_ports
    rules = "priority=10,in_port=a,ip,nw_dst=10.0.0.7/255.0.255.255,actions=output:b\n" \
            "priority=5,in_port=a,actions=output:c\n"
    added = ctl_run(run_dir, "add-flows", "br0", "-", stdin=rules)
    assert added.returncode == 0, added.stderr
    hits = [udp(MAC["a"], MAC["b"], "10.9.0.1", f"10.{x}.0.7") for x in (0, 1, 77, 255)]
    misses = [udp(MAC["a"], MAC["b"], "10.9.0.1", dst) for dst in
              ("10.0.1.7", "10.1.0.8", "11.0.0.7", "10.5.128.7")]
    ports["a"].send_all(hits + misses)
    got_b, got_c = drain(ports["b"]), drain(ports["c"])
    assert sorted(f[30:34] for f in got_b) == sorted(f[30:34] for f in hits)
    assert sorted(f[30:34] for f in got_c) == sorted(f[30:34] for f in misses)
    assert counters(run_dir, "nw_dst=10.0.0.7/255.0.255.255") == len(hits)
    trace = ctl_run(run_dir, "trace", "--json", "br0",
                    "in_port=a,dl_dst=02:00:00:00:00:02,udp,nw_src=1.2.3.4,nw_dst=10.42.0.7")
    summary = json.loads(trace.stdout.strip().splitlines()[-1])
    assert summary["rule"] == \
        "priority=10,ip,in_port=a,nw_dst=10.0.0.7/255.0.255.255 actions=output:b", trace.stdout


def test_add_flows_is_atomic_and_names_the_bad_line(switch_ports, tmp_path):
    run_dir, _ = switch_ports
    before = processes.ctl(run_dir, "dump-flows", "--no-stats", "br0")
    bad = tmp_path / "bad.flows"
    bad.write_text("# three good lines, then a bad one\npriority=1,in_port=a,actions=drop\n"
                   "priority=2,in_port=b,actions=drop\n\npriority=3,udp,actions=output:c\n"
                   "priority=4,tcp,tp_dst=99999,actions=drop\n")
    r = ctl_run(run_dir, "add-flows", "br0", str(bad))
    assert r.returncode == 1 and "line 6" in r.stderr and "tp_dst" in r.stderr, r.stderr
    for text, why in (("priority=5,actions=" + ",".join(["strip_vlan"] * 33), "at most 32"),
                      ("priority=5,in_port=zz,actions=drop", "no port"),
                      ("priority=5,nw_dst=10.0.0.1,actions=drop", "prerequisites")):
        r = ctl_run(run_dir, "add-flows", "br0", "-", stdin=f"priority=1,actions=drop\n{text}\n")
        assert r.returncode == 1 and why in r.stderr, (text, r.stderr)
    huge = tmp_path / "huge.flows"
    with open(huge, "wb") as f:
        f.truncate(65 << 20)
    r = ctl_run(run_dir, "add-flows", "br0", str(huge))
    assert r.returncode == 1 and "larger than" in r.stderr, r.stderr
    assert processes.ctl(run_dir, "dump-flows", "--no-stats", "br0") == before


@pytest.mark.slow
def test_a_million_line_file_with_a_bad_last_line_changes_nothing(switch_ports, tmp_path):
    """A million good rules and a bad one at the end: refused with the line number, no rule
    of it applied, and the switch forwards a -> b all the while (the PMD needs no lock the
    parsing holds)."""
    run_dir, ports = switch_ports
    before = processes.ctl(run_dir, "dump-flows", "--no-stats", "br0")
    big = tmp_path / "million.flows"
    with open(big, "w") as f:
        for i in range(1_000_000):
            f.write(f"priority=9,in_port=c,ip,nw_dst=10.{i >> 16}.{i >> 8 & 255}.{i & 255},"
                    "actions=drop\n")
        f.write("priority=9,in_port=c,ip,nw_dst=10.300.0.1,actions=drop\n")
    ab = udp(MAC["a"], MAC["b"], "10.0.0.1", "10.0.0.2")
    ctl = subprocess.Popen([sys.executable, "-m", "pyvhost.cli.main", "ctl", "--control",
                            str(run_dir / "ctl.sock"), "add-flows", "br0", str(big)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        delivered = rounds = 0
        while ctl.poll() is None and rounds < 600:
            ports["a"].send_all([ab] * 20, timeout=5)
            delivered += sum(1 for fr in drain(ports["b"], 0.1) if fr == ab)
            rounds += 1
        _, err = ctl.communicate(timeout=300)
    finally:
        if ctl.poll() is None:
            ctl.kill()
            ctl.wait()
    assert ctl.returncode == 1 and "line 1000001" in err and "nw_dst" in err, err
    assert rounds >= 2 and delivered == 20 * rounds          # forwarding never stopped
    assert processes.ctl(run_dir, "dump-flows", "--no-stats", "br0") == before


def test_replace_flows_keeps_untouched_counters_running(switch_ports, tmp_path):
    run_dir, ports = switch_ports
    first = tmp_path / "v1.flows"
    first.write_text("priority=10,in_port=a,actions=output:b\n"
                     "priority=10,in_port=c,actions=output:d\n"
                     "priority=10,in_port=d,actions=drop\n")
    assert ctl_run(run_dir, "replace-flows", "br0", str(first)).returncode == 0
    ports["a"].send_all([udp(MAC["a"], MAC["b"], "10.0.0.1", "10.0.0.2")] * 30)
    ports["c"].send_all([udp(MAC["c"], MAC["d"], "10.0.0.3", "10.0.0.4")] * 7)
    assert len(drain(ports["b"])) == 30 and len(drain(ports["d"])) == 7
    assert counters(run_dir, "in_port=a actions=output:b") == 30
    second = tmp_path / "v2.flows"
    second.write_text("priority=10,in_port=a,actions=output:b\n"       # unchanged
                      "priority=10,in_port=c,actions=output:b\n"       # new actions
                      "priority=20,in_port=b,actions=output:a\n")      # new; d's rule goes
    r = ctl_run(run_dir, "replace-flows", "br0", str(second))
    assert r.returncode == 0 and "1 added, 1 modified, 1 deleted" in r.stdout, r
    assert counters(run_dir, "in_port=a actions=output:b") == 30        # kept, running on
    assert counters(run_dir, "in_port=c actions=output:b") == 7         # modified in place
    ports["a"].send_all([udp(MAC["a"], MAC["b"], "10.0.0.1", "10.0.0.2")] * 5)
    ports["c"].send_all([udp(MAC["c"], MAC["d"], "10.0.0.3", "10.0.0.4")] * 3)
    assert len(drain(ports["b"])) == 8 and drain(ports["d"], 0.2) == []
    assert counters(run_dir, "in_port=a actions=output:b") == 35
    assert "in_port=d" not in processes.ctl(run_dir, "dump-flows", "br0")
    processes.ctl(run_dir, "del-port", "b")          # rules naming b compile again, twice:
    processes.ctl(run_dir, "add-port", "br0", "b", "type=vhostuser", "queues=1")
    assert counters(run_dir, "in_port=a actions=output:b") == 35        # counters carried
    assert processes.ctl(run_dir, "del-flows", "--strict", "br0",
                         "priority=20,in_port=b") == "1 flows deleted"
    assert processes.ctl(run_dir, "del-flows", "br0", "in_port=a") == "1 flows deleted"


def test_a_rule_given_more_actions_keeps_its_counters_and_takes_them(switch_ports, tmp_path):
    """A rule is compiled with room for its own ops (at least 4): replace-flows giving it six
    puts a successor with room in its place, which counts on from the old one's counters
    and runs the new actions (each port gets the frame as its ops left it)."""
    run_dir, ports = switch_ports
    rules = tmp_path / "r.flows"
    rules.write_text("priority=10,in_port=c,actions=output:d\n")
    assert ctl_run(run_dir, "replace-flows", "br0", str(rules)).returncode == 0
    frame = udp(MAC["c"], MAC["d"], "10.0.0.3", "10.0.0.4")
    ports["c"].send_all([frame] * 7)
    assert len(drain(ports["d"])) == 7
    rules.write_text("priority=10,in_port=c,actions=mod_vlan_vid:5,output:a,strip_vlan,"
                     "output:b,mod_vlan_vid:7,output:d\n")
    r = ctl_run(run_dir, "replace-flows", "br0", str(rules))
    assert r.returncode == 0 and "1 modified" in r.stdout, r
    assert counters(run_dir, "in_port=c actions=mod_vlan_vid:5") == 7
    ports["c"].send_all([frame] * 3)
    got = {p: drain(ports[p]) for p in "abd"}
    tag = {5: b"\x81\x00\x00\x05", 7: b"\x81\x00\x00\x07"}
    assert got["a"] == [frame[:12] + tag[5] + frame[12:]] * 3
    assert got["b"] == [frame] * 3
    assert got["d"] == [frame[:12] + tag[7] + frame[12:]] * 3
    assert counters(run_dir, "in_port=c actions=mod_vlan_vid:5") == 10


def test_idle_and_hard_timeouts_expire_rules(switch_ports):
    run_dir, ports = switch_ports
    processes.ctl(run_dir, "add-flow", "br0", "priority=50,idle_timeout=2,in_port=a,"
                  "actions=output:b")
    processes.ctl(run_dir, "add-flow", "br0", "priority=50,hard_timeout=2,in_port=c,"
                  "actions=output:d")
    processes.ctl(run_dir, "add-flow", "br0", "priority=50,idle_timeout=1,in_port=d,"
                  "actions=drop")
    deadline = time.monotonic() + 4.5
    while time.monotonic() < deadline:               # a's rule is kept busy, c's is not
        ports["a"].send([udp(MAC["a"], MAC["b"], "10.0.0.1", "10.0.0.2")])
        drain(ports["b"], 0.2)
        time.sleep(0.3)
    flows = processes.ctl(run_dir, "dump-flows", "br0")
    assert re.search(r"n_packets=\d+, n_bytes=\d+, idle_timeout=2, idle_age=0, "
                     r"priority=50,in_port=a actions=output:b", flows), flows
    assert "in_port=c" not in flows and "in_port=d" not in flows, flows


def storm_round(ports, frames, i):
    ports["c"].send_all(frames[i * 250:(i + 1) * 250], timeout=5)


@pytest.mark.parametrize("storm", ["random_source_macs", "unique_destinations"])
def test_a_storm_from_one_port_leaves_the_others_alone(switch_ports, tmp_path, storm):
    """Port c sends 5000 frames each needing an upcall (new source MACs under NORMAL, or
    new destinations under exact /32 rules); between its bursts a sends to b. Every one of
    a's frames arrives, and none of them costs an upcall after the first: nothing the storm
    learns or installs invalidates a's cached flow."""
    run_dir, ports = switch_ports
    if storm == "unique_destinations":
        rules = tmp_path / "dst.flows"
        rules.write_text("priority=0,actions=normal\n" + "".join(
            f"priority=10,in_port=c,ip,nw_dst=10.1.{i >> 8}.{i & 255},actions=output:d\n"
            for i in range(1000)))
        assert ctl_run(run_dir, "replace-flows", "br0", str(rules)).returncode == 0
        frames = [udp(MAC["c"], MAC["d"], "10.0.0.3", f"10.1.{(i % 1000) >> 8}.{i & 255}",
                      sport=i) for i in range(5000)]
        frames = [udp(MAC["c"], MAC["d"], "10.0.0.3", f"10.2.{i >> 8}.{i & 255}")
                  if i % 2 else f for i, f in enumerate(frames)]        # misses too
    else:
        frames = [udp(bytes([2, 7]) + i.to_bytes(4, "big"), MAC["d"], "10.0.0.3", "10.0.0.4")
                  for i in range(5000)]
    ab = udp(MAC["a"], MAC["b"], "10.0.0.1", "10.0.0.2")
    ports["b"].send([udp(MAC["b"], MAC["a"], "10.0.0.2", "10.0.0.1")])  # learn b, a
    drain(ports["a"])
    ports["a"].send([ab])
    assert drain(ports["b"]) == [ab]
    base = upcalls(run_dir)
    got_b = 0
    for i in range(20):
        storm_round(ports, frames, i)
        ports["a"].send_all([ab] * 50, timeout=5)
        got_b += sum(1 for f in drain(ports["b"], 0.2) if f == ab)
        drain(ports["d"], 0.01)
    assert got_b == 1000
    storm_upcalls = upcalls(run_dir) - base
    stats = processes.ctl(run_dir, "pmd-stats-show")
    assert storm_upcalls <= 5000 + 2, stats                # none for a's 1000 frames
    if storm == "random_source_macs":
        fdb = processes.ctl(run_dir, "fdb-show", "br0")
        assert "02:00:00:00:00:01" in fdb and "02:00:00:00:00:02" in fdb


def test_cache_hits_keep_macs_alive_and_limits_hold(switch_ports):
    """With a 2 s aging time, a MAC seen only through cache hits stays learned while an idle
    one expires; a port's MAC limit and the bridge's table size hold under a storm."""
    run_dir, ports = switch_ports
    processes.ctl(run_dir, "set-bridge", "br0", "mac-aging-time=2", "mac-table-size=64")
    processes.ctl(run_dir, "set-port", "c", "mac-limit=10")
    ports["b"].send([udp(MAC["b"], MAC["a"], "10.0.0.2", "10.0.0.1")])   # b: seen once
    ports["a"].send([udp(MAC["a"], MAC["b"], "10.0.0.1", "10.0.0.2")])
    drain(ports["a"])
    drain(ports["b"])
    base = upcalls(run_dir)
    deadline = time.monotonic() + 4.0
    while time.monotonic() < deadline:           # a keeps sending: cache hits only
        ports["a"].send([udp(MAC["a"], MAC["b"], "10.0.0.1", "10.0.0.2")])
        drain(ports["b"], 0.1)
        time.sleep(0.2)
    assert upcalls(run_dir) - base <= 2            # refreshed by hits, not by misses
    fdb = processes.ctl(run_dir, "fdb-show", "br0")
    assert re.search(r"\s+a\s+0\s+02:00:00:00:00:01", fdb), fdb
    assert "02:00:00:00:00:02" not in fdb, fdb     # b went quiet: aged out
    storm = [udp(bytes([2, 8, 0, 0, i >> 8, i & 255]), MAC["d"], "10.0.0.3", "10.0.0.4")
             for i in range(300)]
    ports["c"].send_all(storm, timeout=5)
    for p in "abcd":
        drain(ports[p], 0.2)
    rows = processes.ctl(run_dir, "fdb-show", "br0").splitlines()[1:]
    assert sum(1 for r in rows if r.split()[0] == "c") == 10, rows     # c's limit
    ports["d"].send_all([udp(bytes([2, 9, 0, 0, i >> 8, i & 255]), MAC["c"], "10.0.0.4",
                             "10.0.0.3") for i in range(300)], timeout=5)
    for p in "abcd":
        drain(ports[p], 0.2)
    rows = processes.ctl(run_dir, "fdb-show", "br0").splitlines()[1:]
    assert len(rows) == 64 and sum(1 for r in rows if r.split()[0] == "d") >= 50, rows


def test_megaflow_cache_limit_evicts_idle_entries(switch_ports):
    run_dir, ports = switch_ports
    processes.ctl(run_dir, "set-pmd", "threads=1", "flow-limit=100")
    rules = "".join(f"priority=10,in_port=a,ip,nw_dst=10.3.{i >> 8}.{i & 255},actions=output:b\n"
                    for i in range(400))
    assert ctl_run(run_dir, "replace-flows", "br0", "-", stdin=rules).returncode == 0
    for i in range(0, 400, 40):                    # 400 distinct /32 megaflows
        ports["a"].send_all([udp(MAC["a"], MAC["b"], "10.0.0.1", f"10.3.{j >> 8}.{j & 255}")
                             for j in range(i, i + 40)], timeout=5)
        assert len(drain(ports["b"], 0.1)) == 40     # forwarded right while evicting
    stats = processes.ctl(run_dir, "pmd-stats-show")
    m = re.search(r"megaflows: (\d+) in \d+ masks \(limit 100, evicted (\d+)\)", stats)
    assert m and int(m.group(1)) <= 100 and int(m.group(2)) >= 290, stats


def test_rule_counters_are_exact_when_a_burst_mixes_rules(switch_ports):
    """The PMD adds a burst's rule counters once per run of frames through the same rules:
    frames of three rule paths (one through two tables) interleaved in the same bursts, runs
    of one and of many, and EMC entries overwritten within a burst, still count each frame
    and byte to exactly its own rules."""
    run_dir, ports = switch_ports
    rules = ("table=0,priority=10,in_port=a,udp,tp_dst=1,actions=output:b\n"
             "table=0,priority=10,in_port=a,udp,tp_dst=2,actions=output:c\n"
             "table=0,priority=10,in_port=a,udp,tp_dst=3,actions=goto_table:1\n"
             "table=1,priority=10,udp,actions=output:d\n")
    r = ctl_run(run_dir, "add-flows", "br0", "-", stdin=rules)
    assert r.returncode == 0, r.stderr
    pattern = [1, 2, 3, 3, 1, 1, 1, 2, 3, 2, 2, 2, 2, 1, 3, 3, 3, 3, 3, 1]
    frames, want = [], {1: [0, 0], 2: [0, 0], 3: [0, 0]}
    for i in range(400):
        dport = pattern[i % len(pattern)]
        # many source ports: more keys than one EMC slot each, some sharing slots
        f = udp(MAC["a"], MAC["b"], "10.0.0.1", "10.0.0.2", sport=1000 + i % 97,
                dport=dport) + b"x" * (i % 50)
        frames.append(f)
        want[dport][0] += 1
        want[dport][1] += len(f)
    for _ in range(3):                   # the second and third time: from the caches
        assert ports["a"].send_all(frames) == len(frames)
        got = {n: len(drain(ports[n])) for n in "bcd"}
        assert got == {"b": want[1][0], "c": want[2][0], "d": want[3][0]}, got
    stats = {}
    for line in processes.ctl(run_dir, "dump-flows", "br0").splitlines():
        m = re.search(r"n_packets=(\d+), n_bytes=(\d+)", line)
        which = re.search(r"tp_dst=\d|table=1", line)
        if m and which:
            stats[which.group(0)] = (int(m.group(1)), int(m.group(2)))
    three = (3 * want[3][0], 3 * want[3][1])
    assert stats == {"tp_dst=1": (3 * want[1][0], 3 * want[1][1]),
                     "tp_dst=2": (3 * want[2][0], 3 * want[2][1]),
                     "tp_dst=3": three, "table=1": three}, stats
