"""``pyvhost guest`` and pyvhost.frontend.Guest (issue 16): Linux network namespaces as
vhost-user guests of a ``pyvhost switch`` (guest -> vhost-user -> switch -> vhost-user ->
guest), no VM. Ping, iperf3 TCP (byte counts match) and UDP at a set rate (0 loss), 50 MB
over HTTP with md5 match, with offloads on, off and mixed; the switch restarted under
running guests; a guest listening (--server) for the switch's vhostuserclient port; the
command's clean exit on SIGTERM (what it made removed, what it found kept), its counters
and JSON; and an idle guest using no CPU.

Needs root, ``ip`` and iperf3 (make test installs it). Every name is unique to the test,
every address a private 10.x one inside namespaces made here; fixtures delete namespaces
and end processes they started (by PID) however a test ends; each test is bounded by an
alarm as well as by timeouts on everything it waits for.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from pyvhost.frontend.guest import Guest
from pyvhost.frontend.netns import default_mac, netns_exists
from pyvhost.protocol.constants import Feature as F
from tests.harness import processes
from tests.harness.limits import time_limit
from tests.harness.netns import available, sh
from tests.harness.testpmd import vhost_vdev

pytestmark = pytest.mark.skipif(not available() or shutil.which("iperf3") is None,
                                reason="needs root, ip, /dev/net/tun and iperf3")

TEST_DEADLINE = 180          # seconds: no test here may run longer
IN_FLIGHT = 8 << 20          # iperf3's receiver stops counting at the end of the test: at
                             # most this much (socket buffers, rings) may be uncounted


@pytest.fixture(autouse=True)
def _deadline():
    with time_limit(TEST_DEADLINE):
        yield


def switch_config(*ports: str, extra: str = "", queues: int = 1) -> str:
    return "add-br br0\n" + "".join(f"add-port br0 {p} type=vhostuser queues={queues}\n"
                                    for p in ports) + extra


@pytest.fixture
def switch(workdir):
    """A started switch with vhostuser ports a and b; stopped (by PID) at the end."""
    run_dir = workdir / "run"
    sw = processes.switch(workdir, run_dir, config=switch_config("a", "b"))
    try:
        yield run_dir, sw
    finally:
        sw.stop()


@contextlib.contextmanager
def two_guests(net, run_dir, offloads=("tso", "tso"), mtu=None, packed=False, queues=1):
    """Guests in namespaces A and B on ports a and b, connected; both stopped after."""
    guests = []
    try:
        for i, (port, off) in enumerate(zip("ab", offloads, strict=True)):
            ns = net.name(f"gst{port}")
            net.namespaces.append(ns)      # deleted by net.close() should the guest not
            g = Guest(str(run_dir / f"{port}.sock"), netns=ns, ip=f"{net.ip(i + 1)}/24",
                      offloads=off, mtu=mtu, packed=packed, queues=queues)
            guests.append(g.start())
        for g in guests:
            assert g.wait_connected(15), g.stats()
        yield guests
    finally:
        for g in guests:
            g.stop()


def iperf3(net, server_ns, client_ns, address, args, timeout=60):
    """Run one iperf3 test; the client's JSON result."""
    srv = net.popen(server_ns, ["iperf3", "-s", "-1", "-B", address],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            r = sh(["iperf3", "-c", address, "-J", *args], ns=client_ns, check=False,
                   timeout=timeout)
            try:
                result = json.loads(r.stdout)
            except ValueError:
                result = {"error": r.stdout[-2000:] + r.stderr}
            if "error" not in result or time.monotonic() > deadline:
                break
            time.sleep(0.2)           # the server may not be listening yet
        assert "error" not in result, result["error"]
        return result
    finally:
        with contextlib.suppress(subprocess.TimeoutExpired):
            srv.wait(10)


def ports(run_dir) -> dict:
    return json.loads(processes.ctl(run_dir, "dump-ports", "--json", "br0"))


def counters_match(run_dir, guests: dict, explain: bool = False):
    """Each guest's counters against its switch port's: frames (and bytes) it handed the
    switch = what the switch took from that ring; frames the switch put in its ring =
    what reached its tap. ``explain``: the numbers instead of a bool."""
    sw = ports(run_dir)
    pairs = {}
    for name, g in guests.items():
        st, rings = g.stats(), sw[name]
        pairs[name] = {
            "to_device": ((st["to_device_packets"], st["to_device_bytes"]),
                          (rings["rx_rings"]["packets"], rings["rx_rings"]["bytes"])),
            "to_tap": (st["to_tap_packets"], rings["tx_rings"]["packets"])}
    if explain:
        return pairs, sw
    return all(x == y for p in pairs.values() for x, y in p.values())


def test_default_mac_is_stable_and_locally_administered():
    m = default_mac("ns1", "eth0", "/tmp/x.sock")
    assert m == default_mac("ns1", "eth0", "/tmp/x.sock") != default_mac("ns2", "eth0",
                                                                         "/tmp/x.sock")
    first = int(m.split(":")[0], 16)
    assert first & 2 and not first & 1


def test_ping_between_two_namespaces(net, switch):
    run_dir, _ = switch
    with two_guests(net, run_dir) as (a, b):
        assert net.ping(a.netns, net.ip(2), count=5)
        assert net.ping(b.netns, net.ip(1), count=3)
        sa, sb = a.stats(), b.stats()
        assert sa["to_device_packets"] >= 8 and sb["to_tap_packets"] >= 8, (sa, sb)
        assert sa["tap_write_errors"] == sb["tap_write_errors"] == 0
        flags = net.link_flags("eth0", a.netns)
        assert a.mac in flags and "vnet_hdr on" in flags, flags


def test_an_unexpected_error_in_the_guest_thread_is_reported(net, switch, monkeypatch,
                                                             caplog):
    """The forwarding thread never dies silently: an error nobody expected (here the tap
    refusing its carrier) ends it with the reason kept and logged."""
    from pyvhost.frontend import guest as guest_mod

    def refuse(fd, on):
        if on:                              # when the back-end is there: in the thread
            raise OSError(5, "carrier refused")
    monkeypatch.setattr(guest_mod.N, "set_carrier", refuse)
    run_dir, _ = switch
    g = Guest(str(run_dir / "a.sock"), netns=net.netns("gerr")).start()
    try:
        _wait(lambda: not g.alive, 10)
        assert "carrier refused" in (g.last_error or ""), g.last_error
        assert "carrier refused" in caplog.text
    finally:
        g.stop()


def test_jumbo_mtu_without_offloads(net, switch):
    """--mtu 9000 and no offloads: 9000-byte IP packets (not fragmented) in one frame."""
    run_dir, _ = switch
    with two_guests(net, run_dir, ("none", "none"), mtu=9000) as (a, b):
        assert "mtu 9000" in net.link_flags("eth0", a.netns)
        assert net.ping(a.netns, net.ip(2))
        r = sh(["ping", "-c", "3", "-i", "0.2", "-W", "2", "-s", "8972", "-M", "do", net.ip(2)],
               ns=a.netns, check=False, timeout=30)
        assert r.returncode == 0, r.stdout + r.stderr
        assert b.stats()["to_tap_bytes"] >= 3 * 9014


@pytest.mark.slow
@pytest.mark.parametrize("offloads", [("tso", "tso"), ("none", "none"), ("tso", "none"),
                                      ("csum", "tso")], ids="-".join)
def test_iperf3_tcp_bytes_match(net, switch, offloads):
    run_dir, _ = switch
    with two_guests(net, run_dir, offloads) as (a, b):
        assert net.ping(a.netns, net.ip(2))
        size = 200 << 20
        result = iperf3(net, b.netns, a.netns, net.ip(2), ["-n", str(size)])
        sent = result["end"]["sum_sent"]["bytes"]
        received = result["end"]["sum_received"]["bytes"]
        # iperf3 stops counting at the receiver when the sender says the test ended, so
        # what was still in flight is missing from its count (not lost: TCP delivered it)
        assert sent >= size and sent - received < IN_FLIGHT, (sent, received)
        # every frame a guest handed the switch is one the switch took from that port's
        # ring, and every frame the switch put in a guest's ring reached that guest's tap
        assert _wait(lambda: counters_match(run_dir, {"a": a, "b": b})), \
            counters_match(run_dir, {"a": a, "b": b}, explain=True)
        sa = a.stats()
        assert sa["drop_gso"] == sa["drop_csum"] == 0 and sa["tap_write_errors"] == 0
        if offloads[0] == "tso":
            assert a.tap_offloads == 7
            # TSO super-frames went to the switch: far fewer frames than MSS-sized ones
            assert sa["to_device_bytes"] / sa["to_device_packets"] > 3000, sa
        elif offloads[0] == "none":
            assert a.tap_offloads == 0
            assert sa["to_device_bytes"] / sa["to_device_packets"] <= 1514, sa
        if offloads[0] == "csum":
            assert a.tap_offloads == 1
        features = net.link_flags("eth0", a.netns)
        assert "eth0" in features


@pytest.mark.slow
def test_multiqueue_guests(net, workdir):
    """--queues 2 on ports with queues=2: a multiqueue tap, one loop per pair; parallel
    TCP streams use both pairs and every frame is accounted for."""
    run_dir = workdir / "run"
    sw = processes.switch(workdir, run_dir, config=switch_config("a", "b", queues=2))
    try:
        with two_guests(net, run_dir, queues=2) as (a, b):
            assert "numtxqueues 2" in net.link_flags("eth0", a.netns) or \
                "multi_queue" in net.link_flags("eth0", a.netns)
            assert net.ping(a.netns, net.ip(2))
            result = iperf3(net, b.netns, a.netns, net.ip(2), ["-P", "8", "-n", str(64 << 20)])
            assert result["end"]["sum_sent"]["bytes"] >= 64 << 20
            # the tap sends a flow on the queue its frames last came in on (automq), so
            # after the handshake the spread follows the switch's choice of RX queue; the
            # first frames of the 8 streams are hashed over both queues
            per_queue = a.stats()["queues"]
            assert all(q["to_device_packets"] > 0 for q in per_queue), \
                [(q["to_device_packets"], q["to_tap_packets"]) for q in per_queue]
            assert _wait(lambda: counters_match(run_dir, {"a": a, "b": b})), \
                counters_match(run_dir, {"a": a, "b": b}, explain=True)
    finally:
        sw.stop()


@pytest.mark.slow
def test_ethtool_in_the_namespace_and_what_the_tap_offers(net, switch):
    """The tap offers the namespace only the offloads the backend negotiated (--offloads
    none: checksumming off, and ethtool cannot turn it on); turning them off with ethtool
    in a guest that has them works too (the kernel then completes and segments)."""
    run_dir, _ = switch
    with two_guests(net, run_dir, ("tso", "none")) as (a, b):
        k = sh(["ethtool", "-k", "eth0"], ns=b.netns).stdout
        assert re.search(r"tx-checksumming: off", k) and \
            re.search(r"tcp-segmentation-offload: off", k), k
        sh(["ethtool", "-K", "eth0", "tx", "on", "tso", "on"], ns=b.netns, check=False)
        k = sh(["ethtool", "-k", "eth0"], ns=b.netns).stdout
        assert re.search(r"tx-checksumming: off", k), k
        assert "tcp-segmentation-offload: on" in sh(["ethtool", "-k", "eth0"],
                                                    ns=a.netns).stdout
        sh(["ethtool", "-K", "eth0", "tx", "off", "tso", "off"], ns=a.netns)
        assert net.ping(a.netns, net.ip(2))
        base = a.stats()
        result = iperf3(net, b.netns, a.netns, net.ip(2), ["-n", str(50 << 20)])
        assert (50 << 20) - result["end"]["sum_received"]["bytes"] < IN_FLIGHT, result["end"]
        st = a.stats()
        frames = st["to_device_packets"] - base["to_device_packets"]
        assert (st["to_device_bytes"] - base["to_device_bytes"]) / frames <= 1514, st
        assert st["csum_sw"] == st["drop_csum"] == st["drop_gso"] == 0, st


@pytest.mark.slow
@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_iperf3_udp_at_a_set_rate_loses_nothing(net, switch, packed):
    run_dir, _ = switch
    with two_guests(net, run_dir, packed=packed) as (a, b):
        assert a.port.negotiated.packed == packed
        assert net.ping(a.netns, net.ip(2))
        result = iperf3(net, b.netns, a.netns, net.ip(2),
                        ["-u", "-b", "20M", "-l", "1200", "-t", "3"])
        s = result["end"]["sum"]
        assert s["packets"] > 5000 and s["lost_packets"] == 0, s


FETCH_MD5 = "import hashlib, sys, urllib.request; print(hashlib.md5(urllib.request.urlopen(" \
    "sys.argv[1], timeout=60).read()).hexdigest())"


@pytest.mark.slow
@pytest.mark.parametrize("offloads", [("tso", "tso"), ("none", "tso")], ids="-".join)
def test_50mb_over_http_md5_matches(net, switch, workdir, offloads):
    run_dir, _ = switch
    blob = workdir / "www" / "blob.bin"
    blob.parent.mkdir()
    data = os.urandom(50 << 20)
    blob.write_bytes(data)
    want = hashlib.md5(data).hexdigest()
    with two_guests(net, run_dir, offloads) as (a, b):
        port = 8000 + os.getpid() % 1000
        srv = net.popen(b.netns, [sys.executable, "-m", "http.server", "--bind", net.ip(2),
                                  "--directory", str(blob.parent), str(port)],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://{net.ip(2)}:{port}/blob.bin"
        deadline = time.monotonic() + 30
        while True:
            r = sh([sys.executable, "-c", FETCH_MD5, url], ns=a.netns, check=False,
                   timeout=90)
            got = r.stdout.strip()
            if got == want or time.monotonic() > deadline:
                break
            time.sleep(0.3)           # the server may not be listening yet
        srv.kill()
        srv.wait(5)
        assert got == want, (got, want, r.stderr)
        sb = b.stats()
        assert sb["to_device_bytes"] > 50 << 20, sb


@pytest.mark.slow
def test_switch_restart_under_running_guests(net, workdir):
    run_dir = workdir / "run"
    conf = switch_config("a", "b")
    sw = processes.switch(workdir, run_dir, config=conf)
    try:
        with two_guests(net, run_dir) as (a, b):
            assert net.ping(a.netns, net.ip(2))
            assert sw.stop() == 0
            assert _wait(lambda: not a.connected.is_set())
            # no backend: no carrier in the namespace, as with a NIC whose link is down
            assert _wait(lambda: "NO-CARRIER" in net.link_flags("eth0", a.netns)), \
                net.link_flags("eth0", a.netns)
            sw = processes.switch(workdir, run_dir, name="switch2")
            assert a.wait_connected(20) and b.wait_connected(20), (a.stats(), b.stats())
            assert net.ping(a.netns, net.ip(2), timeout=30)
            assert a.stats()["connections"] == 2
            assert "NO-CARRIER" not in net.link_flags("eth0", a.netns)
    finally:
        sw.stop()


def _wait(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("dpdk-testpmd") is None, reason="needs DPDK testpmd")
@pytest.mark.parametrize("offloads", ["tso", "none"])
def test_dpdk_vhost_pmd_as_the_backend(net, workdir, testpmds, offloads):
    """DPDK testpmd's vhost PMD (two ports, io forwarding) instead of the switch: the
    guests negotiate what DPDK offers (checksums and guest TSO; no host TSO, so the
    kernel segments before the tap) and TCP and HTTP work through it."""
    socks = [workdir / "v0.sock", workdir / "v1.sock"]
    tp = testpmds([vhost_vdev(s, index=i) for i, s in enumerate(socks)], "vhost",
                  main_lcore=1).start()
    tp.set_fwd("io")
    tp.start_fwd()
    guests = []
    try:
        for i, sock in enumerate(socks):
            ns = net.name(f"gdpdk{i}")
            net.namespaces.append(ns)
            guests.append(Guest(str(sock), netns=ns, ip=f"{net.ip(i + 1)}/24",
                                offloads=offloads).start())
        a, b = guests
        assert a.wait_connected(20) and b.wait_connected(20), (a.stats(), b.stats())
        assert net.ping(a.netns, net.ip(2), timeout=30)
        result = iperf3(net, b.netns, a.netns, net.ip(2), ["-n", str(50 << 20)])
        end = result["end"]
        assert end["sum_sent"]["bytes"] >= 50 << 20 and \
            end["sum_sent"]["bytes"] - end["sum_received"]["bytes"] < IN_FLIGHT, end
        st = a.stats()
        assert st["drop_gso"] == st["drop_csum"] == st["tap_write_errors"] == 0, st
        if offloads == "tso":
            assert a.port.negotiated.has(F.NET_CSUM) and a.tap_offloads & 1
        else:
            assert a.tap_offloads == 0
        # every frame guest a posted was taken by DPDK's port 0, and the other way round
        assert _wait(lambda: (tp.port_stats()[0]["rx_packets"], tp.port_stats()[1]["tx_packets"])
                     == (a.stats()["to_device_packets"], b.stats()["to_tap_packets"])), \
            (tp.port_stats(), a.stats(), b.stats())
    finally:
        for g in guests:
            g.stop()


def test_server_mode_guest_and_vhostuserclient_port(net, workdir):
    """--server: the guest listens, the switch's vhostuserclient port connects to it."""
    sock = workdir / "guest-a.sock"
    run_dir = workdir / "run"
    conf = "add-br br0\n" \
        f"add-port br0 a type=vhostuserclient path={sock} queues=1\n" \
        "add-port br0 b type=vhostuser queues=1\n"
    ns_a, ns_b = net.name("gsrva"), net.name("gsrvb")
    net.namespaces += [ns_a, ns_b]
    a = Guest(str(sock), server=True, netns=ns_a, ip=f"{net.ip(1)}/24").start()
    b = None
    try:
        sw = processes.switch(workdir, run_dir, config=conf)
        try:
            b = Guest(str(run_dir / "b.sock"), netns=ns_b, ip=f"{net.ip(2)}/24").start()
            assert a.wait_connected(20) and b.wait_connected(20), (a.stats(), b.stats())
            assert net.ping(a.netns, net.ip(2))
        finally:
            if b is not None:
                b.stop()
            sw.stop()
    finally:
        a.stop()
    assert not sock.exists()


def guest_cmd(workdir, name, socket, *args):
    proc = processes.PyvhostProcess(["guest", "--socket", str(socket), *args], workdir, name)
    return proc.start(ready_text="guest: ", timeout=20)


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_command_sigterm_removes_what_it_made_and_reports(net, switch, workdir):
    run_dir, _ = switch
    made, found = net.name("gcmda"), net.name("gcmdb")
    net.namespaces += [made, found]
    sh(["ip", "netns", "add", found])          # exists before: the guest must keep it
    a = guest_cmd(workdir, "ga", run_dir / "a.sock", "--netns", made, "--ifname", "veth-x",
                  "--ip", f"{net.ip(1)}/24", "--mtu", "9000", "--json")
    b = guest_cmd(workdir, "gb", run_dir / "b.sock", "--netns", found, "--ip",
                  f"{net.ip(2)}/24", "--mac", "02:00:00:aa:bb:cc")
    try:
        assert netns_exists(made)
        link = net.link_flags("veth-x", made)
        assert "mtu 9000" in link and "UP" in link, link
        assert "02:00:00:aa:bb:cc" in net.link_flags("eth0", found)
        assert net.ping(made, net.ip(2))
        start = len(a.output())
        a.signal(signal.SIGUSR1)
        a.wait_output("to device:", 5, start)
        assert re.search(r"to device: [1-9]\d* pkts", a.output()[start:]), a.output()
    finally:
        rc_a, rc_b = a.stop(), b.stop()
    assert rc_a == 0 and rc_b == 0, (a.errors(), b.errors())
    assert not netns_exists(made), "the namespace it made is still there"
    assert netns_exists(found), "the namespace it found was removed"
    assert not net.exists("eth0", found), "the interface it made is still there"
    summary = json.loads(a.output().strip().splitlines()[-1])
    assert summary["to_device_packets"] >= 3 and summary["interface"] == "veth-x", summary
    assert "guest: stopped" in a.output()


def test_sigint_and_an_interface_deleted_under_the_guest(net, switch, workdir):
    """SIGINT ends it like SIGTERM; an interface someone deletes ends it with status 1 and
    a line saying so (never a spin on a dead fd); either way its namespace goes."""
    run_dir, _ = switch
    ns1, ns2 = net.name("gint"), net.name("gdel")
    net.namespaces += [ns1, ns2]
    g1 = guest_cmd(workdir, "gint", run_dir / "a.sock", "--netns", ns1)
    g2 = guest_cmd(workdir, "gdel", run_dir / "b.sock", "--netns", ns2)
    try:
        g1.signal(signal.SIGINT)
        assert g1.proc.wait(15) == 0, g1.errors()
        assert not netns_exists(ns1)
        sh(["ip", "link", "del", "eth0"], ns=ns2)
        assert g2.proc.wait(15) == 1, g2.errors()
        assert "interface eth0 was deleted" in g2.errors()
        assert not netns_exists(ns2)
    finally:
        g1.stop()
        g2.stop()


def test_idle_guest_uses_no_cpu(net, switch, workdir):
    run_dir, _ = switch
    ns = net.name("gidle")
    net.namespaces.append(ns)
    g = guest_cmd(workdir, "gidle", run_dir / "a.sock", "--netns", ns, "--ip",
                  f"{net.ip(1)}/24")
    try:
        time.sleep(1.0)
        before = cpu_seconds(g.proc.pid)
        time.sleep(3.0)
        used = cpu_seconds(g.proc.pid) - before
        assert used < 0.15, f"idle guest used {used:.2f} s of CPU in 3 s"
    finally:
        assert g.stop() == 0


def test_a_front_end_on_the_socket_is_reported(net, workdir):
    """Two front-ends on one socket: each sends GET_FEATURES and gets a request back; the
    guest says what the peer is instead of waiting, and keeps trying."""
    sock = workdir / "fe.sock"
    gen = processes.PyvhostProcess(["gen", "--socket", str(sock), "--server", "--mode", "rx",
                                    "--timeout", "30", "--duration", "30"], workdir, "gen")
    gen.start()
    ns = net.name("gfe")
    net.namespaces.append(ns)
    try:
        assert _wait(sock.exists)
        with Guest(str(sock), netns=ns) as g:
            assert _wait(lambda: "not a vhost-user back-end" in (g.last_error or ""), 15), \
                g.stats()
            assert g.alive and not g.connected.is_set()
    finally:
        gen.stop()


def test_bad_options_exit_2(workdir):
    for args, why in ((["--queues", "17"], "1..16"), (["--ip", "10.0.0.300/24"], "bad --ip"),
                      (["--ip", "10.1.1.1"], "prefix"), (["--ifname=bad/name"], "interface"),
                      (["--mac", "01:00:00:00:00:01"], "multicast")):
        r = subprocess.run([sys.executable, "-m", "pyvhost.cli.main", "guest", "--socket",
                            str(workdir / "x.sock"), *args], capture_output=True, text=True,
                           timeout=30, cwd=processes.REPO,
                           env=dict(os.environ, PYTHONPATH=str(processes.REPO)))
        assert r.returncode == 2 and why in r.stderr, (args, r.stderr)
    # a socket it cannot listen on: said in one line, nothing left behind
    r = subprocess.run([sys.executable, "-m", "pyvhost.cli.main", "guest", "--socket",
                        str(workdir / "no" / "such" / "dir.sock"), "--server", "--ifname",
                        f"pvg{os.getpid() % 10000}"], capture_output=True, text=True,
                       timeout=30, cwd=processes.REPO,
                       env=dict(os.environ, PYTHONPATH=str(processes.REPO)))
    assert r.returncode == 2 and "No such file" in r.stderr and "Traceback" not in r.stderr, \
        r.stderr


@pytest.mark.slow
def test_demo_netns_part():
    """``pyvhost demo --part netns``: the demo that needs no QEMU runs and cleans up."""
    before = set(sh(["ip", "netns", "list"]).stdout.split())
    r = subprocess.run([sys.executable, "-m", "pyvhost.cli.main", "demo", "--part", "netns"],
                       capture_output=True, text=True, timeout=150, cwd=processes.REPO,
                       env=dict(os.environ, PYTHONPATH=str(processes.REPO)),
                       start_new_session=True)
    assert r.returncode == 0 and "through the switch worked" in r.stdout, r.stdout + r.stderr
    assert "0% packet loss" in r.stdout and "Gbit/s" in r.stdout
    left = {n for n in set(sh(["ip", "netns", "list"]).stdout.split()) - before
            if n.startswith("pvdemo")}
    assert not left, left


@pytest.mark.slow
@pytest.mark.parametrize("offloads", ["tso", "none"])
def test_qemu_guest_and_namespace_guest_exchange_files(net, switch, workdir, offloads):
    """A QEMU guest (Linux virtio-net, offloads on) and a namespace guest on the switch:
    20 MB each way over HTTP with md5 match (the QEMU guest's TSO super-frames reach the
    tap as they are, or segmented by the switch when the namespace guest took no
    offloads; and the other way round)."""
    from pyvhost.cli.qemu_guest import NicSpec, QemuGuest, qemu_available
    if not qemu_available():
        pytest.skip("needs QEMU and a guest kernel (make test installs them)")
    run_dir, _ = switch
    ns = net.name("gqemu")
    net.namespaces.append(ns)
    www = workdir / "www"
    www.mkdir()
    data = os.urandom(20 << 20)
    (www / "ns.bin").write_bytes(data)
    vm = QemuGuest("vm", workdir, nics=[NicSpec(run_dir / "b.sock", ip=f"{net.ip(2)}/24")],
                   memory="512M")
    g = Guest(str(run_dir / "a.sock"), netns=ns, ip=f"{net.ip(1)}/24", offloads=offloads)
    try:
        g.start()
        vm.start()
        vm.wait_ready(timeout=120)
        vm.wait_link_up(timeout=30)
        assert g.wait_connected(20)
        assert net.ping(ns, net.ip(2), timeout=60)
        srv = net.popen(ns, [sys.executable, "-m", "http.server", "--bind", net.ip(1),
                             "--directory", str(www), "8080"],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        status, out = vm.run(f"for i in 1 2 3 4 5; do wget -q -O /tmp/recv "
                             f"http://{net.ip(1)}:8080/ns.bin && break; sleep 1; done; "
                             "md5sum /tmp/recv", timeout=240)
        sums = [line.split()[0] for line in out.splitlines() if line.endswith("/tmp/recv")]
        assert sums == [hashlib.md5(data).hexdigest()], out
        srv.kill()
        srv.wait(5)
        status, out = vm.run("mkdir -p /tmp/www; dd if=/dev/urandom of=/tmp/www/vm.bin bs=1M "
                             "count=20 2>/dev/null; md5sum /tmp/www/vm.bin; "
                             "httpd -p 8080 -h /tmp/www", timeout=120)
        assert status == 0, out
        want = out.split()[0]
        r = sh([sys.executable, "-c", FETCH_MD5, f"http://{net.ip(2)}:8080/vm.bin"], ns=ns,
               check=False, timeout=240)
        assert r.stdout.strip() == want, (r.stdout, r.stderr)
        st = g.stats()
        assert st["drop_gso"] == st["drop_csum"] == st["tap_write_errors"] == 0, st
    finally:
        vm.stop()
        g.stop()
