"""Host ports of the switch: internal (a tap the switch creates) and afpacket (an existing
interface attached through a TPACKET_V3 ring), with namespaces and veth pairs this file
makes and deletes (tests/harness/netns.py). The host stack reaches a pyvhost front-end
guest through an internal port moved into a namespace; TCP between a namespace behind an
afpacket port and one behind an internal port, with and without checksum offload on the
veth; a guest without offloads receives complete checksums; link flaps and an interface
deleted and made again under traffic; what happens without the capabilities; bad input."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import struct
import subprocess
import sys
import threading
import time

import pytest

from pyvhost.backend.responder import Responder
from pyvhost.frontend import VirtioUser
from pyvhost.packets import inet_checksum
from pyvhost.switch import netdev
from tests.harness import processes
from tests.harness.limits import time_limit
from tests.harness.netns import available, sh

needs_root = pytest.mark.skipif(not available(), reason="needs root, ip and /dev/net/tun")
GUEST_MAC = bytes.fromhex("525400a0b0c1")


TEST_TIMEOUT = 240          # seconds: no test here runs longer


@pytest.fixture(autouse=True)
def bounded():
    """Every test is bounded (the fixtures' finally blocks still clean up)."""
    with time_limit(TEST_TIMEOUT):
        yield


@pytest.fixture
def switch(workdir):
    """A started switch (its run dir as .run); stopped at the end (its taps go with it)."""
    run_dir = workdir / "run"
    sw = processes.switch(workdir, run_dir)
    sw.run = run_dir
    try:
        yield sw
    finally:
        assert sw.stop() == 0, sw.errors()[-3000:]


def ctl(sw, *argv, check=True):
    return processes.ctl(sw.run, *argv, check=check)


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


class Guest:
    """A pyvhost front-end on a vhostuser port that answers ARP and ping for ``ip`` (in a
    thread) and keeps every IPv4 frame it receives, to look at their checksums."""

    def __init__(self, sock: str, ip: str):
        self.port = VirtioUser(sock, ring_size=256).open()
        self.responder = Responder(ip, GUEST_MAC)
        self.frames: list[bytes] = []          # IPv4 (untagged)
        self.received: list[bytes] = []        # everything
        self.stopping = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stopping:
            try:
                frames = self.port.recv(timeout=0.2)
            except Exception:
                return
            replies = []
            self.received += frames
            for f in frames:
                if len(f) >= 34 and f[12:14] == b"\x08\x00":
                    self.frames.append(f)
                r = self.responder.reply(f)
                if r is not None:
                    replies.append(r)
            if replies:
                self.port.send(replies)

    def close(self):
        self.stopping = True
        self.thread.join(5)
        self.port.close()


def l4_checksum_ok(frame: bytes) -> tuple[int, bool]:
    """(IP protocol, whether its TCP/UDP checksum verifies) of an untagged IPv4 frame."""
    ihl = (frame[14] & 0x0F) * 4
    total = struct.unpack_from("!H", frame, 16)[0]
    proto = frame[23]
    l4 = frame[14 + ihl:14 + total]
    pseudo = frame[26:34] + struct.pack("!BBH", 0, proto, len(l4))
    if proto == 17 and struct.unpack_from("!H", l4, 6)[0] == 0:
        return proto, True                      # UDP without a checksum
    return proto, inet_checksum(pseudo + l4) == 0


# -- without the network: the error mapping --------------------------------------------
@pytest.mark.parametrize("code", [errno.EPERM, errno.EACCES])
def test_missing_privilege_names_the_capability(code):
    e = netdev._fail("creating tap x", OSError(code, "Operation not permitted"),
                     "CAP_NET_ADMIN")
    assert "needs CAP_NET_ADMIN" in str(e) and "creating tap x" in str(e)
    other = netdev._fail("attaching y", OSError(errno.ENODEV, "No such device"), "CAP_NET_RAW")
    assert "CAP_NET_RAW" not in str(other) and "No such device" in str(other)


@pytest.mark.parametrize("name", ["", "a" * 16, "-x", "a/b", "a b", "../x"])
def test_bad_interface_names_are_refused(name):
    with pytest.raises(netdev.NetdevError):
        netdev.check_ifname(name)


# -- internal ports ---------------------------------------------------------------------
@needs_root
def test_host_stack_pings_guest_through_internal_port_in_a_namespace(switch, net):
    """The internal port moved into a namespace keeps working: the namespace pings a
    front-end guest; its UDP and TCP frames (partial checksums on the tap) reach the
    guest, which has no offloads, with complete checksums."""
    ns = net.netns("hpi")
    tap = net.name("hpt")
    ctl(switch, "add-br", "br0")
    ctl(switch, "add-port", "br0", "vm1", "type=vhostuser")
    ctl(switch, "add-port", "br0", tap, "type=internal", "mtu=1400")
    assert net.exists(tap)
    guest = Guest(str(switch.run / "vm1.sock"), net.ip(254))
    try:
        sh(["ip", "link", "set", tap, "netns", ns])
        net.configure(ns, tap, net.ip(1))
        assert "mtu 1400" in net.link_flags(tap, ns)
        assert net.ping(ns, net.ip(254)), ctl(switch, "dump-ports", "br0")
        assert "elsewhere" in ctl(switch, "show")
        sh([sys.executable, "-c", UDP_AND_SYN, net.ip(254)], ns=ns)
        wait_for(lambda: {f[23] for f in guest.frames} >= {6, 17}, 10,
                 "a UDP datagram and a TCP SYN at the guest")
        for frame in guest.frames:
            proto, ok = l4_checksum_ok(frame)
            if proto in (6, 17):
                assert ok, f"bad checksum in {frame.hex()}"
        assert guest.responder.icmp_replies >= 3
    finally:
        guest.close()
    ctl(switch, "del-port", tap)
    assert not net.exists(tap, ns) and not net.exists(tap)      # the tap went with it


UDP_AND_SYN = """
import socket, sys
ip = sys.argv[1]
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.sendto(b"checksum me" * 50, (ip, 9999))
t = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
t.setblocking(False)
try:
    t.connect((ip, 80))
except BlockingIOError:
    pass
import time; time.sleep(0.5)
"""


@needs_root
def test_add_br_internal_and_store_recreates_host_ports(workdir, net):
    """add-br internal=true makes the bridge's own port; a restarted switch makes the
    internal ports again and attaches afpacket ports again; deleting the bridge deletes
    its internal interfaces and leaves the attached veth (not promiscuous any more)."""
    ns = net.netns("hps")
    br, veth, tap = net.name("hpb"), net.name("hpv"), net.name("hpm")
    net.veth(veth, ns, net.name("hpp"), net.ip(1))
    run_dir = workdir / "run"
    for start in range(2):
        sw = processes.switch(workdir, run_dir, name=f"switch{start}")
        try:
            if start == 0:
                processes.ctl(run_dir, "add-br", br, "internal=true")
                processes.ctl(run_dir, "add-port", br, "up1", "type=afpacket", f"dev={veth}")
                processes.ctl(run_dir, "add-port", br, tap, "type=internal", "mtu=1400")
            show = processes.ctl(run_dir, "show")
            assert f"Port {br}" in show and "type: internal" in show, show
            assert "mtu: 1400" in show and "mtu 1400" in net.link_flags(tap), show
            assert f"dev: {veth} state: up" in show, show
            assert net.exists(br)
            assert "promiscuity 1 " in net.link_flags(veth)
        finally:
            assert sw.stop() == 0
        assert not net.exists(br) and not net.exists(tap)   # taps go with the switch
        assert net.exists(veth) and "promiscuity 0 " in net.link_flags(veth)
    # restarted while the attached interface is away: the port loads and waits for it
    sh(["ip", "link", "del", veth])
    sw = processes.switch(workdir, run_dir, name="switch2")
    try:
        assert f"dev: {veth} state: absent" in processes.ctl(run_dir, "show")
        net.veth(veth, ns, net.name("hpp"), net.ip(1))
        wait_for(lambda: f"dev: {veth} state: up carrier: on" in processes.ctl(run_dir, "show"), 5,
                 "the interface attached once it is back")
        assert "promiscuity 1 " in net.link_flags(veth)
        processes.ctl(run_dir, "del-br", br)
        assert not net.exists(br) and not net.exists(tap)
        assert net.exists(veth) and "promiscuity 0 " in net.link_flags(veth)
    finally:
        assert sw.stop() == 0


@needs_root
def test_bad_host_port_requests_create_nothing(switch, net):
    ns = net.netns("hpe")
    veth = net.name("hpv")
    net.veth(veth, ns, net.name("hpp"), None)
    ctl(switch, "add-br", "br0")
    long_name = "x" * 16
    cases = [
        (["add-port", "br0", long_name, "type=internal"], "1 to 15"),
        (["add-port", "br0", "p1", "type=internal", "mtu=20"], "mtu"),
        (["add-port", "br0", "p1", "type=internal", "dev=lo"], "dev= is for type=afpacket"),
        (["add-port", "br0", "p1", "type=afpacket"], "needs dev="),
        (["add-port", "br0", "p1", "type=afpacket", "dev=nosuch0x"], "no such interface"),
        (["add-port", "br0", "p1", "type=afpacket", "dev=../etc"], "dev"),
        (["add-port", "br0", "p1", "type=afpacket", f"dev={veth}", "mtu=1500"], "mtu="),
        (["add-port", "br0", "p1", "type=afpacket", f"dev={veth}", "queues=2"], "takes no"),
        (["add-port", "br0", "lo", "type=internal"], "exists already"),
        (["add-port", "br0", "p1", "type=tap"], "unknown port type"),
    ]
    for argv, text in cases:
        out = ctl(switch, *argv, check=False)
        assert text in out, (argv, out)
    assert not net.exists("p1") and not net.exists(long_name)
    ctl(switch, "add-port", "br0", "p1", "type=afpacket", f"dev={veth}")
    assert "attached already" in ctl(switch, "add-port", "br0", "p2", "type=afpacket",
                                     f"dev={veth}", check=False)
    assert "already exists" in ctl(switch, "add-port", "br0", "p1", "type=internal",
                                   check=False)
    tap = net.name("hpt")
    ctl(switch, "add-port", "br0", tap, "type=internal")
    assert "a loop" in ctl(switch, "add-port", "br0", "p3", "type=afpacket", f"dev={tap}",
                           check=False)
    ctl(switch, "del-port", tap)
    ctl(switch, "del-port", "p1")
    assert net.exists(veth)                           # never deletes what it attached
    assert "Port" not in ctl(switch, "show")


@needs_root
@pytest.mark.skipif(shutil.which("capsh") is None, reason="needs capsh")
def test_without_capabilities_the_error_names_them_and_the_switch_runs_on(workdir, net):
    ns = net.netns("hpc")
    veth = net.name("hpv")
    net.veth(veth, ns, net.name("hpp"), None)
    run_dir = workdir / "run"
    sw = processes.PyvhostProcess([], workdir, "switch")
    sw.args = ["capsh", "--drop=cap_net_admin,cap_net_raw", "--", "-c",
               " ".join([*sw.args, "-v", "switch", "--run-dir", str(run_dir)])]
    sw.start(ready_text="switch: running")
    try:
        processes.ctl(run_dir, "add-br", "br0")
        tap = net.name("hpt")
        out = processes.ctl(run_dir, "add-port", "br0", tap, "type=internal", check=False)
        assert "CAP_NET_ADMIN" in out, out
        out = processes.ctl(run_dir, "add-port", "br0", "up1", "type=afpacket",
                            f"dev={veth}", check=False)
        assert "CAP_NET_RAW" in out, out
        if afxdp_built():
            out = processes.ctl(run_dir, "add-port", "br0", "up2", "type=afxdp",
                                f"dev={veth}", check=False)
            assert "CAP_NET_RAW" in out, out
        br = net.name("hpbr")
        out = processes.ctl(run_dir, "add-br", br, "internal=true", check=False)
        assert "CAP_NET_ADMIN" in out, out
        assert not net.exists(tap) and not net.exists(br)
        processes.ctl(run_dir, "add-port", "br0", "vm1", "type=vhostuser")
        show = processes.ctl(run_dir, "show")
        assert "Port vm1" in show and br not in show and "up1" not in show
    finally:
        assert sw.stop() == 0


# -- afpacket <-> internal --------------------------------------------------------------
def two_namespaces(switch, net, port_type="afpacket", tx_offload=True):
    """ns_a behind an afpacket (or afxdp) port (a veth), ns_b behind an internal port:
    (ns_a, ns_b, the veth's host end, its peer in ns_a)."""
    ns_a, ns_b = net.netns("hpa"), net.netns("hpb")
    veth, peer, tap = net.name("hpv"), net.name("hpp"), net.name("hpt")
    net.veth(veth, ns_a, peer, net.ip(1))
    if not tx_offload:
        if shutil.which("ethtool") is None:
            pytest.skip("needs ethtool")
        sh(["ethtool", "-K", peer, "tx", "off"], ns=ns_a)
    ctl(switch, "add-br", "br0")
    ctl(switch, "add-port", "br0", "up1", f"type={port_type}", f"dev={veth}")
    ctl(switch, "add-port", "br0", tap, "type=internal")
    sh(["ip", "link", "set", tap, "netns", ns_b])
    net.configure(ns_b, tap, net.ip(2))
    return ns_a, ns_b, veth, peer


TRANSFER_SERVER = """
import hashlib, socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 5201)); s.listen(1); s.settimeout(60)
print("listening", flush=True)
c, _ = s.accept(); c.settimeout(60)
h, n = hashlib.md5(), 0
while True:
    b = c.recv(1 << 16)
    if not b:
        break
    h.update(b); n += len(b)
print(n, h.hexdigest(), flush=True)
"""
TRANSFER_CLIENT = """
import hashlib, socket, sys
data = b"".join(hashlib.sha256(i.to_bytes(4, "big")).digest() for i in range(1 << 15))
s = socket.create_connection((sys.argv[1], 5201), timeout=60)
h, n = hashlib.md5(), 0
for _ in range(50 * (1 << 20) // len(data)):
    s.sendall(data); h.update(data); n += len(data)
s.close()
print(n, h.hexdigest(), flush=True)
"""


def transfer(net, ns_from, ns_to, address) -> None:
    """50 MiB over TCP from ``ns_from`` to ``address`` in ``ns_to``, md5 compared."""
    server = net.popen(ns_to, [sys.executable, "-c", TRANSFER_SERVER, address],
                       stdout=subprocess.PIPE, text=True)
    assert server.stdout.readline().strip() == "listening"
    client = sh([sys.executable, "-c", TRANSFER_CLIENT, address], ns=ns_from, timeout=120)
    got = server.communicate(timeout=60)[0].strip()
    assert got == client.stdout.strip() and got.startswith(str(50 << 20)), (got, client)


@needs_root
@pytest.mark.slow
@pytest.mark.parametrize("tx_offload", [True, False], ids=["csum-offload", "tx-off"])
def test_tcp_between_afpacket_and_internal_ports(switch, net, tx_offload):
    ns_a, ns_b, veth, peer = two_namespaces(switch, net, tx_offload=tx_offload)
    assert net.ping(ns_a, net.ip(2)), ctl(switch, "dump-ports", "br0")
    transfer(net, ns_a, ns_b, net.ip(2))          # afpacket -> internal
    transfer(net, ns_b, ns_a, net.ip(1))          # internal -> afpacket
    if shutil.which("iperf3"):
        server = net.popen(ns_b, ["iperf3", "-s", "-1", "-B", net.ip(2)],
                           stdout=subprocess.DEVNULL)
        time.sleep(0.5)
        out = sh(["iperf3", "-c", net.ip(2), "-t", "2", "-J"], ns=ns_a, timeout=60).stdout
        server.wait(10)
        assert '"bits_per_second"' in out
    dump = ctl(switch, "dump-ports", "--json", "br0")
    ports = json.loads(dump)
    rx = ports["up1"]["rx_rings"]
    if tx_offload:
        assert rx["rx_csum_partial"] > 0         # the pitfall happened, and was handled
    else:
        assert rx["rx_csum_partial"] == 0
    assert ports["up1"]["link"] == {"state": "up", "carrier": "on"}


@needs_root
@pytest.mark.slow
def test_link_flap_and_interface_recreated_under_traffic(switch, net):
    ns_a, ns_b, veth, peer = two_namespaces(switch, net)
    assert net.ping(ns_a, net.ip(2))
    pinger = net.popen(ns_b, ["ping", "-i", "0.05", net.ip(1)], stdout=subprocess.DEVNULL)

    def link():
            return json.loads(ctl(switch, "dump-ports", "--json", "br0"))["up1"]["link"]

    # down and up: shown, and traffic resumes
    sh(["ip", "link", "set", veth, "down"])
    wait_for(lambda: link()["state"] == "down", 5, "state down in dump-ports")
    assert "state: down" in ctl(switch, "show")
    sh(["ip", "link", "set", veth, "up"])
    wait_for(lambda: link() == {"state": "up", "carrier": "on"}, 5, "state up, carrier on")
    assert net.ping(ns_a, net.ip(2), timeout=15)
    # the peer goes down: no carrier
    sh(["ip", "link", "set", peer, "down"], ns=ns_a)
    wait_for(lambda: link()["carrier"] == "off", 5, "carrier off")
    net.configure(ns_a, peer, None)
    wait_for(lambda: link()["carrier"] == "on", 5, "carrier on")
    assert net.ping(ns_a, net.ip(2), timeout=15)
    # the interface goes away and comes back (a new index): attached again
    sh(["ip", "link", "del", veth])
    wait_for(lambda: link()["state"] == "absent", 5, "state absent")
    time.sleep(0.5)
    net.veth(veth, ns_a, peer, net.ip(1))
    wait_for(lambda: link()["state"] == "up", 5, "the new interface attached")
    assert net.ping(ns_a, net.ip(2), timeout=15), ctl(switch, "dump-ports", "br0")
    assert pinger.poll() is None                      # the namespace's pinger ran through
    assert "Port up1" in ctl(switch, "show")


@needs_root
@pytest.mark.parametrize("kind", ["afpacket", "afxdp"])
def test_interface_back_from_another_namespace_with_its_index_is_attached_again(switch, net,
                                                                                kind):
    """The interface leaves for another namespace and comes back within the switch's one
    look a second, with the same index: its old socket was unbound by the kernel, so a new
    one is attached (an afxdp port once went on holding a dead AF_XDP socket)."""
    if kind == "afxdp" and not afxdp_built():
        pytest.skip("built without libxdp")
    ns_a, ns_b, veth, peer = two_namespaces(switch, net, kind, tx_offload=kind == "afpacket")
    assert net.ping(ns_a, net.ip(2)), ctl(switch, "dump-ports", "br0")
    away = net.netns("hpx")
    index = net.link_index(veth)
    sh(["ip", "link", "set", veth, "netns", away])
    sh(["ip", "link", "set", veth, "netns", str(os.getpid())], ns=away)
    sh(["ip", "link", "set", veth, "up"])
    if net.link_index(veth) != index:
        pytest.skip("the kernel gave the interface a new index")
    assert net.ping(ns_a, net.ip(2), timeout=15), ctl(switch, "dump-ports", "br0")
    assert "promiscuity 1 " in net.link_flags(veth)


@needs_root
def test_afpacket_frames_reach_a_guest_without_offloads_with_complete_checksums(switch, net):
    """A local socket's frames over veth carry partial checksums (TP_STATUS_CSUMNOTREADY);
    the guest, which has no checksum offload, gets them completed."""
    ns = net.netns("hpg")
    veth, peer = net.name("hpv"), net.name("hpp")
    net.veth(veth, ns, peer, net.ip(1))
    ctl(switch, "add-br", "br0")
    ctl(switch, "add-port", "br0", "vm1", "type=vhostuser")
    ctl(switch, "add-port", "br0", "up1", "type=afpacket", f"dev={veth}")
    guest = Guest(str(switch.run / "vm1.sock"), net.ip(254))
    try:
        assert net.ping(ns, net.ip(254)), ctl(switch, "dump-ports", "br0")
        sh([sys.executable, "-c", UDP_AND_SYN, net.ip(254)], ns=ns)
        wait_for(lambda: {f[23] for f in guest.frames} >= {6, 17}, 10,
                 "a UDP datagram and a TCP SYN at the guest")
        for frame in guest.frames:
            proto, ok = l4_checksum_ok(frame)
            if proto in (6, 17):
                assert ok, f"bad checksum in {frame.hex()}"
    finally:
        guest.close()
    assert json.loads(ctl(switch, "dump-ports", "--json", "br0"))["up1"]["rx_rings"][
        "rx_csum_partial"] > 0


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@needs_root
def test_idle_switch_with_host_ports_sleeps(switch, net):
    """The tap and the packet socket are in the PMD's idle wake-up set: after traffic the
    switch sleeps (no busy polling), and the next frame still wakes it."""
    ns_a, ns_b, veth, peer = two_namespaces(switch, net)
    assert net.ping(ns_a, net.ip(2))
    time.sleep(1.0)
    before = cpu_seconds(switch.proc.pid)
    time.sleep(3.0)
    used = cpu_seconds(switch.proc.pid) - before
    assert used < 0.3, f"the idle switch used {used:.2f} s of CPU in 3 s"
    assert net.ping(ns_b, net.ip(1), count=2)
    # the internal port's interface deleted outside the switch, the veth too: their fds
    # fail (EPOLLERR for ever on the tap's): still no busy polling
    tap = net.name("hpt")
    sh(["ip", "link", "del", tap], ns=ns_b)
    sh(["ip", "link", "del", veth])
    wait_for(lambda: "deleted (outside the switch)" in ctl(switch, "show"), 5,
             "the tap shown as deleted")
    wait_for(lambda: "state: absent" in ctl(switch, "show"), 5, "the veth shown as absent")
    before = cpu_seconds(switch.proc.pid)
    time.sleep(3.0)
    used = cpu_seconds(switch.proc.pid) - before
    assert used < 0.3, f"the switch used {used:.2f} s of CPU in 3 s with dead ports"
    ctl(switch, "del-port", tap)
    ctl(switch, "del-port", "up1")


# -- afxdp ------------------------------------------------------------------------------
def afxdp_built() -> bool:
    try:
        import pyvhost._afxdp  # noqa: F401
    except ImportError:
        return False
    return True


needs_afxdp = pytest.mark.skipif(not afxdp_built(), reason="built without libxdp")


def test_afxdp_without_libxdp_is_a_clear_error(monkeypatch):
    from pyvhost.switch import afxdp
    monkeypatch.setitem(sys.modules, "pyvhost._afxdp", None)
    with pytest.raises(netdev.NetdevError, match="built without libxdp"):
        afxdp.afxdp_dev()


@needs_root
@needs_afxdp
def test_afxdp_port_carries_tcp_and_follows_its_interface(switch, net):
    """An afxdp port (copy mode on a veth whose peer sends complete checksums, as AF_XDP
    needs): ping, 50 MiB each way with md5, segmentation and checksums done for the
    internal port's TSO frames, idle sleeps, the interface deleted and made again."""
    ns_a, ns_b, veth, peer = two_namespaces(switch, net, "afxdp", tx_offload=False)
    assert net.ping(ns_a, net.ip(2)), ctl(switch, "dump-ports", "br0")
    assert "promiscuity 1 " in net.link_flags(veth)
    transfer(net, ns_a, ns_b, net.ip(2))
    transfer(net, ns_b, ns_a, net.ip(1))
    port = json.loads(ctl(switch, "dump-ports", "--json", "br0"))["up1"]
    assert port["type"] == "afxdp" and port["tx_rings"]["tx_segmented"] > 0, port
    time.sleep(1.0)
    before = cpu_seconds(switch.proc.pid)
    time.sleep(2.0)
    assert cpu_seconds(switch.proc.pid) - before < 0.2
    sh(["ip", "link", "del", veth])
    wait_for(lambda: "state: absent" in ctl(switch, "show"), 5, "state absent")
    net.veth(veth, ns_a, peer, net.ip(1))
    sh(["ethtool", "-K", peer, "tx", "off"], ns=ns_a)
    wait_for(lambda: f"dev: {veth} state: up carrier: on" in ctl(switch, "show"), 5,
             "attached again")
    assert net.ping(ns_a, net.ip(2), timeout=15), ctl(switch, "dump-ports", "br0")
    ctl(switch, "del-port", "up1")
    assert net.exists(veth) and "promiscuity 0 " in net.link_flags(veth)


@contextlib.contextmanager
def afxdp_behind_pmd(veth: str, poll: int):
    """A datapath with one NORMAL bridge: port 0 a TapDev on a socketpair (the caller gets
    the other end, not blocking; frames come with a virtio-net header), port 1 an afxdp
    port on ``veth``; one PMD polling port ``poll``. Yields (afxdp port, datapath, socket);
    all stopped and detached after."""
    import socket as so

    from pyvhost._switch import Datapath
    from pyvhost._tap import TapDev
    from pyvhost.switch.afxdp import AfXdpPort
    from pyvhost.switch.bridge import Bridge
    from pyvhost.switch.flows import parse_flow
    port = AfXdpPort.create("ax", "br0", 1, 1, veth)
    inside, outside = so.socketpair(so.AF_UNIX, so.SOCK_SEQPACKET)
    inside.setblocking(False)
    outside.setblocking(False)
    bridge = Bridge("b", 0)
    bridge.apply(add=[parse_flow("priority=0,actions=normal")])
    dp = Datapath()
    dp.set_bridge(0, bridge.cls, bridge.macs)
    dp.add_port(0, 0, TapDev(inside.fileno()))
    dp.add_port(1, 0, port.datapath_dev())
    pmd = dp.new_pmd(0, pool_size=256)
    thread = threading.Thread(target=pmd.run, daemon=True)
    thread.start()
    try:
        pmd.set_rxqs([(poll, 0)])
        yield port, dp, outside
    finally:
        pmd.stop()
        thread.join(5)
        dp.remove_port(0)
        dp.remove_port(1)
        port._detach()
        inside.close()
        outside.close()


@needs_root
@needs_afxdp
def test_afxdp_cuts_tso_segments_to_fit_its_frames(net):
    """A TSO frame whose segment size is larger than an AF_XDP frame (4 KiB; a guest may
    ask for any gso_size) goes out in segments that fit one: they once overran the UMEM
    and corrupted the switch's memory."""
    from tests.test_offload import tcp_frame, vnet
    ns = net.netns("ts")
    veth, peer = net.name("tsh"), net.name("tsp")
    net.veth(veth, ns, peer, None)
    sh(["ip", "link", "set", veth, "mtu", "9000"])
    sh(["ip", "link", "set", peer, "mtu", "9000"], ns=ns)
    counter = net.popen(ns, [sys.executable, "-c", COUNT_TCP, peer, "8"],
                        stdout=subprocess.PIPE, text=True)
    assert counter.stdout.readline().strip() == "ready"
    payload = bytes(range(256)) * 117 + b"end"               # 29955 bytes
    with afxdp_behind_pmd(veth, 0) as (_, dp, outside):
        outside.send(vnet(gso=1, gso_size=8000, hdr_len=54) + tcp_frame(payload))
        got = counter.communicate(timeout=20)[0].split()
        sizes = [int(n) for n in got]
        assert len(sizes) == 8 and max(sizes) <= 4096, sizes     # 4042 bytes each, at most
        assert sum(n - 54 for n in sizes) == len(payload), sizes
        assert dp.port_stats(1)["tx_packets"] == 1


@needs_root
@needs_afxdp
def test_afxdp_sends_every_segment_of_a_burst_without_further_traffic(net):
    """One TSO frame of 60 segments is one send burst of 60 frames, more than the kernel's
    generic AF_XDP transmit takes per kick (32): every segment reaches the peer with no
    other frame behind it to kick the rest out of the TX ring (they once sat there until
    the port's next burst: stalls for TCP)."""
    from tests.test_offload import tcp_frame, vnet
    ns = net.netns("tk")
    veth, peer = net.name("tkh"), net.name("tkp")
    net.veth(veth, ns, peer, None)
    counter = net.popen(ns, [sys.executable, "-c", COUNT_TCP, peer, "60"],
                        stdout=subprocess.PIPE, text=True)
    assert counter.stdout.readline().strip() == "ready"
    payload = bytes(range(250)) * 240                        # 60 segments of 1000 bytes
    with afxdp_behind_pmd(veth, 0) as (_, dp, outside):
        outside.send(vnet(gso=1, gso_size=1000, hdr_len=54) + tcp_frame(payload))
        got = counter.communicate(timeout=30)[0].split()
        sizes = [int(n) for n in got[:60]]
        assert len(sizes) == 60 and sum(n - 54 for n in sizes) == len(payload), sizes
        assert dp.port_stats(1)["tx_packets"] == 1


@needs_root
@needs_afxdp
def test_afxdp_sends_a_burst_in_order_around_a_tso_frame(net):
    """One send burst of [a short TCP segment, a TSO frame of 5 segments, a short one]: the
    peer gets them in that order (the TSO segments once went out before the short frames
    queued ahead of them: out-of-order TCP data, duplicate ACKs)."""
    from tests.test_offload import tcp_frame, vnet
    ns = net.netns("to")
    veth, peer = net.name("toh"), net.name("top")
    net.veth(veth, ns, peer, None)
    counter = net.popen(ns, [sys.executable, "-c", COUNT_TCP, peer, "7"],
                        stdout=subprocess.PIPE, text=True)
    assert counter.stdout.readline().strip() == "ready"
    with afxdp_behind_pmd(veth, 1) as (_, dp, outside):    # the tap side not polled yet
        outside.send(vnet() + tcp_frame(b"a" * 100, seq=1000))
        outside.send(vnet(gso=1, gso_size=1000, hdr_len=54) +
                     tcp_frame(bytes(5000), seq=1100))
        outside.send(vnet() + tcp_frame(b"c" * 200, seq=6100))
        dp.pmds[0].set_rxqs([(0, 0)])       # now one burst takes all three
        got = counter.communicate(timeout=30)[0].split()
    assert [int(n) for n in got] == [154] + [1054] * 5 + [254], got


@needs_root
@needs_afxdp
def test_afxdp_driver_mode_refused_leaves_the_queue_to_generic_mode(net):
    """veth refuses its own (driver) XDP mode when the peer's MTU does not fit a page: the
    error names the mode, the device stays closed, and a generic (skb) socket on the same
    queue, from a fresh UMEM, follows (the kernel frees the refused socket's hold on the
    queue a moment later: EBUSY until then, never for good). A bad mode is refused."""
    from pyvhost._afxdp import AfXdpDev
    ns = net.netns("dm")
    veth, peer = net.name("dmh"), net.name("dmp")
    net.veth(veth, ns, peer, None)
    sh(["ip", "link", "set", veth, "mtu", "9000"])
    sh(["ip", "link", "set", peer, "mtu", "9000"], ns=ns)
    dev = AfXdpDev()
    try:
        with pytest.raises(ValueError, match="skb or drv"):
            dev.open(veth, 0, "zc")
        with pytest.raises(OSError, match="drv mode") as refused:
            dev.open(veth, 0, "drv")
        assert refused.value.errno not in (0, errno.EBUSY) and not dev.attached
        deadline = time.monotonic() + 5
        while True:
            try:
                dev.open(veth, 0, "skb")
                break
            except OSError as e:
                assert e.errno == errno.EBUSY and time.monotonic() < deadline, e
                time.sleep(0.1)
        assert dev.attached and dev.fd >= 0
    finally:
        dev.close()
    assert not dev.attached


def epoll_targets(fd: int) -> list[int]:
    """The fds an epoll set watches (its /proc fdinfo)."""
    with open(f"/proc/self/fdinfo/{fd}") as f:
        return [int(line.split()[1]) for line in f if line.startswith("tfd:")]


def arrived(sock, frame: bytes) -> bool:
    """Has ``frame`` (after its virtio-net header) come in among what ``sock`` (not blocking)
    holds?"""
    while True:
        try:
            if sock.recv(4096).endswith(frame):
                return True
        except BlockingIOError:
            return False


@needs_root
@needs_afxdp
def test_afxdp_socket_is_watched_only_while_the_pmd_sleeps(net):
    """The kernel signals an AF_XDP socket's waiters for every frame it copies in, so the
    socket sits in the port's epoll set (its wait fd) only while the PMD sleeps, not while
    it polls (a flood keeps it polling); a frame wakes the sleeping PMD and is forwarded;
    a socket made again while the PMD sleeps (the interface came back) is watched at once."""
    ns = net.netns("ws")
    veth, peer = net.name("wsh"), net.name("wsp")
    net.veth(veth, ns, peer, None)
    frame = bytes.fromhex("ffffffffffff020000000001" "88b5") + b"wake me" * 8
    with afxdp_behind_pmd(veth, 1) as (port, dp, outside):
        dev = port.dev
        assert dev.wait_fd >= 0 and dev.wait_fd != dev.fd
        wait_for(lambda: epoll_targets(dev.wait_fd) == [dev.fd], 5, "the sleeping PMD "
                 "watching the socket")
        sh([sys.executable, "-c", RAW_SEND, peer, frame.hex()], ns=ns)
        wait_for(lambda: arrived(outside, frame), 5, "the frame forwarded")
        flood = net.popen(ns, [sys.executable, "-c", FLOOD, peer, "300000"])
        looks = []
        while flood.poll() is None and len(looks) < 2000:
            looks.append(epoll_targets(dev.wait_fd))
            time.sleep(0.002)
        flood.wait(60)
        assert [] in looks, looks[:20]                       # polling: not watched

        def flood_done():        # all forwarded, the tap side read empty (its queue is short:
            seen = dp.port_stats(1)["rx_packets"]            # a frame sent while it is full
            arrived(outside, b"no such frame")               # is dropped)
            time.sleep(0.3)
            arrived(outside, b"no such frame")
            return dp.port_stats(1)["rx_packets"] == seen
        wait_for(flood_done, 10, "the flood forwarded")

        def attach_again():                  # a new socket, PMD asleep; the kernel frees
            try:                             # the old one's hold on the queue a moment later
                port._attach()
                return True
            except netdev.NetdevError as e:
                assert "busy" in str(e), e
                return False
        wait_for(attach_again, 5, "a new socket")
        wait_for(lambda: epoll_targets(dev.wait_fd) == [dev.fd], 5, "the new socket")
        sh([sys.executable, "-c", RAW_SEND, peer, frame.hex()], ns=ns)
        wait_for(lambda: arrived(outside, frame), 5, "the frame forwarded")
    assert not dev.attached


COUNT_TCP = """
import socket, sys
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800))
s.bind((sys.argv[1], 0)); s.settimeout(15)
print("ready", flush=True)
for _ in range(int(sys.argv[2])):
    f = s.recv(70000)
    if f[23] == 6:
        print(len(f), flush=True)
"""


RAW_SEND = """
import socket, sys
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((sys.argv[1], 0))
s.send(bytes.fromhex(sys.argv[2]))
"""


@needs_root
def test_afpacket_puts_back_the_vlan_tag_the_kernel_took_out(switch, net):
    """A tagged frame arriving on the attached interface has its tag taken out by the
    kernel (TP_STATUS_VLAN_VALID); the guest receives it tagged as it was sent."""
    ns = net.netns("hpl")
    veth, peer = net.name("hpv"), net.name("hpp")
    net.veth(veth, ns, peer, None)
    ctl(switch, "add-br", "br0")
    ctl(switch, "add-port", "br0", "vm1", "type=vhostuser")
    ctl(switch, "add-port", "br0", "up1", "type=afpacket", f"dev={veth}")
    guest = Guest(str(switch.run / "vm1.sock"), net.ip(254))
    try:
        tagged = GUEST_MAC + bytes.fromhex("0200000000aa") + bytes.fromhex("81000005") + \
            b"\x88\xb5" + b"vlan five" * 8
        sh([sys.executable, "-c", RAW_SEND, peer, tagged.hex()], ns=ns)
        wait_for(lambda: tagged in guest.received, 5, "the tagged frame at the guest")
    finally:
        guest.close()
    stats = json.loads(ctl(switch, "dump-ports", "--json", "br0"))["up1"]["rx_rings"]
    assert stats["rx_vlan_restored"] >= 1


FLOOD = """
import socket, sys
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((sys.argv[1], 0))
frame = bytes.fromhex("ffffffffffff020000000001" "0800") + bytes(46)
for _ in range(int(sys.argv[2])):
    s.send(frame)
"""


@needs_root
@pytest.mark.parametrize("kind", ["afpacket", "afxdp"])
def test_frames_the_kernel_drops_before_the_switch_reads_them_are_counted(net, kind):
    """Nothing reads the port (no datapath): its kernel ring overflows, and what the kernel
    dropped shows as drop_kernel in the port's receive counters, not as nothing."""
    from pyvhost.switch.afpacket import AfPacketPort
    from pyvhost.switch.afxdp import AfXdpPort
    ns = net.netns("kd")
    veth, peer = net.name("kdh"), net.name("kdp")
    net.veth(veth, ns, peer, None)
    cls = AfPacketPort if kind == "afpacket" else AfXdpPort
    port = cls.create("kd", "br0", 1, 1, veth)
    try:
        rx, _, _ = port.ring_counters()
        assert rx["drop_kernel"] == 0
        sent = 60000
        sh([sys.executable, "-c", FLOOD, peer, str(sent)], ns=ns, timeout=60)
        # looks until two in a row agree: each drop counted once, not again on each look
        # (and the kernel done delivering the flood)
        looks = [port.ring_counters()[0]["drop_kernel"]]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (len(looks) < 2 or looks[-1] != looks[-2]
                                               or looks[-1] == 0):
            time.sleep(0.05)
            looks.append(port.ring_counters()[0]["drop_kernel"])
        assert len(looks) >= 2 and looks[-1] == looks[-2], looks
        assert 0 < looks[-1] <= sent, looks
    finally:
        port._detach()
