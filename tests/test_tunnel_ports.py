"""Tunnel ports of the switch (type=vxlan, type=geneve) through ``ctl``: the options and
their errors, what show and dump-ports say, the store (a restarted switch has them
again), del-port (the shared UDP socket goes with its last port). Then real overlays:
the switch runs inside a namespace made here, the underlay is a veth pair between
namespaces, a guest is a namespace behind a pyvhost front-end (pyvhost.frontend.Guest)
on a vhostuser port. The Linux kernel's own VXLAN device in another namespace is the
peer: ping and 50 MB of TCP both ways (md5 compared); then two pyvhost switches in two
namespaces, one guest each, over VXLAN and then over Geneve: ping and TCP with md5.

The namespace tests need root, ``ip`` and ``ping``; every name is unique to the test,
every address private and only inside namespaces made here, and fixtures delete them and
end the processes they started (by PID)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import socket
import subprocess

import pytest

from pyvhost.frontend.guest import Guest
from pyvhost.switch import Switch
from pyvhost.switch.commands import CommandError, run_command
from pyvhost.switch.flows import FlowSyntaxError, parse_flow
from pyvhost.switch.netdev import get_mtu
from tests.harness import ovs_netdev, processes
from tests.harness.limits import time_limit
from tests.harness.netns import available, sh
from tests.test_host_ports import transfer

needs_root = pytest.mark.skipif(not available() or shutil.which("ping") is None,
                                reason="needs root, ip, ping and /dev/net/tun")
TEST_TIMEOUT = 240


@pytest.fixture(autouse=True)
def bounded():
    with time_limit(TEST_TIMEOUT):
        yield


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tunnel_port_options_show_store_and_removal(tmp_path):
    port = free_udp_port()

    async def scenario():
        sw = Switch(tmp_path / "run")
        await sw.start()
        try:
            await run_command(sw, ["add-br", "br0"])
            await run_command(sw, ["add-port", "br0", "vx1", "type=vxlan",
                                   "remote_ip=127.0.0.2", "local_ip=127.0.0.1", "key=42",
                                   f"dst_port={port}", "csum=false", "tos=16", "ttl=9"])
            await run_command(sw, ["add-port", "br0", "vx2", "type=vxlan",
                                   "remote_ip=127.0.0.3", "local_ip=127.0.0.1", "key=42",
                                   f"dst_port={port}"])       # the same socket, shared
            for bad, why in (
                    (["type=vxlan"], "needs remote_ip"),
                    (["type=vxlan", "remote_ip=10.0.0.300"], "not an IPv4 address"),
                    (["type=vxlan", "remote_ip=224.0.0.1"], "not a unicast"),
                    (["type=vxlan", "remote_ip=10.0.0.1", "key=16777216"], "out of range"),
                    (["type=vxlan", "remote_ip=10.0.0.1", "key=x"], "not a number"),
                    (["type=vxlan", "remote_ip=10.0.0.1", "dst_port=0"], "out of range"),
                    (["type=vxlan", "remote_ip=10.0.0.1", "csum=yes"], "true or false"),
                    (["type=vxlan", "remote_ip=10.0.0.1", "ttl=0"], "out of range"),
                    (["type=geneve", "remote_ip=10.0.0.1", "local_ip=127.0.0.1",
                      f"dst_port={port}"], "carries vxlan already"),
                    (["type=vxlan", "remote_ip=127.0.0.2", "local_ip=127.0.0.1",
                      "key=42", f"dst_port={port}"], "exists on the socket"),
                    (["type=vxlan", "remote_ip=10.0.0.1", "local_ip=192.0.2.1",
                      f"dst_port={port}"], "not an address of this host"),
                    (["type=vhostuser", "remote_ip=10.0.0.1"], "for vxlan and geneve"),
                    (["type=vxlan", "remote_ip=10.0.0.1", "dev=eth0"], "not for type=vxlan"),
                    (["type=vxlan", "remote_ip=flows"], "not an IPv4 address"),
                    (["type=vxlan", "remote_ip=flow", "key=flo"], "not a number")):
                with pytest.raises(CommandError, match=why):
                    await run_command(sw, ["add-port", "br0", "bad", *bad])
            assert "bad" not in sw.ports
            show = await run_command(sw, ["show"])
            assert "type: vxlan  remote_ip: 127.0.0.2" in show and "csum: false" in show
            lo = min(get_mtu("lo"), 65535)              # the route's device (IP: at most 64K)
            assert f"underlay_mtu: {lo} mtu: {lo - 50}" in show
            data = json.loads(await run_command(sw, ["show", "--json"]))
            link = data["bridges"]["br0"]["ports"]["vx1"]["link"]
            assert link["key"] == 42 and link["tos"] == 16 and link["ttl"] == 9
            dump = json.loads(await run_command(sw, ["dump-ports", "--json", "br0"]))
            assert dump["vx1"]["rx_rings"]["drop_unknown_remote"] == 0
            assert "drop_geneve_critical" in await run_command(sw, ["dump-ports", "br0"])
        finally:
            await sw.stop()
        sw = Switch(tmp_path / "run")                      # restart: the store restores
        await sw.start()
        try:
            assert not sw.failed, sw.failed
            assert sw.ports["vx1"].cfg.tos == 16 and not sw.ports["vx1"].cfg.csum
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                with pytest.raises(OSError):                 # the switch holds the port
                    s.bind(("127.0.0.1", port))
            await run_command(sw, ["del-port", "vx1"])
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                with pytest.raises(OSError):                 # vx2 still uses it
                    s.bind(("127.0.0.1", port))
            await run_command(sw, ["del-port", "br0", "vx2"])
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.bind(("127.0.0.1", port))                  # the last one closed it
        finally:
            await sw.stop()

    asyncio.run(scenario())


@pytest.mark.parametrize("text", [
    "priority=5,tun_id=0x2a,actions=normal",
    "priority=5,tun_id=0x2a/0xff,tun_src=10.0.0.0/8,tun_dst=10.1.2.3,actions=output:p1",
    "priority=5,in_port=p1,actions=set_field:10.0.0.9->tun_dst,set_field:7->tun_id,output:t",
])
def test_tunnel_fields_and_set_field_round_trip(text):
    assert parse_flow(text).format() == text
    assert parse_flow(parse_flow(text).format()) == parse_flow(text)


@pytest.mark.parametrize("text, why", [
    ("tun_id=0x1000000,actions=drop", "out of range"),
    ("tun_src=10.0.0.300,actions=drop", "not an IPv4"),
    ("actions=set_field:1->tun_src", "tun_id or VALUE->tun_dst"),
    ("actions=set_field:10.0.0.0/8->tun_dst", "one address"),
    ("actions=set_field:x->tun_id", "not a number"),
])
def test_bad_tunnel_fields_are_refused(text, why):
    with pytest.raises(FlowSyntaxError, match=why):
        parse_flow(text)


def test_flow_based_ports_match_and_set_tunnel_metadata(tmp_path):
    """remote_ip=flow key=flow: one port for every remote. Rules match tun_id and tun_src
    of what it receives and pick the remote and VNI of what it sends (set_field), over
    real UDP sockets on loopback: peer A (127.0.0.3) -> flow port -> fixed port -> peer B
    (127.0.0.2), and back with the VNI and destination the rule sets. The megaflow a
    lookup installs covers the tunnel fields the rule looked at."""
    port = free_udp_port()
    peers = {}
    for ip in ("127.0.0.2", "127.0.0.3"):
        peers[ip] = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        peers[ip].bind((ip, port))
        peers[ip].settimeout(3)
    frame = bytes.fromhex("525400000002" "525400000001" "0800") + bytes(46)

    def hdr(vni):
        return bytes([8, 0, 0, 0]) + vni.to_bytes(3, "big") + b"\0"

    async def scenario():
        sw = Switch(tmp_path / "run")
        await sw.start()
        try:
            for argv in (["add-br", "br0"],
                         ["add-port", "br0", "tf", "type=vxlan", "remote_ip=flow", "key=flow",
                          "local_ip=127.0.0.1", f"dst_port={port}"],
                         ["add-port", "br0", "tx", "type=vxlan", "remote_ip=127.0.0.2",
                          "local_ip=127.0.0.1", "key=5", f"dst_port={port}"],
                         ["del-flows", "br0"],
                         ["add-flow", "br0", "priority=10,in_port=tf,tun_id=42,"
                          "tun_src=127.0.0.3,actions=output:tx"],
                         ["add-flow", "br0", "priority=10,in_port=tx,actions="
                          "set_field:127.0.0.3->tun_dst,set_field:99->tun_id,output:tf"]):
                await run_command(sw, argv)
            show = await run_command(sw, ["show"])
            assert "remote_ip: flow" in show and "key: flow" in show
            loop = asyncio.get_running_loop()
            a, b = peers["127.0.0.3"], peers["127.0.0.2"]
            a.sendto(hdr(42) + frame, ("127.0.0.1", port))
            got, addr = await loop.run_in_executor(None, b.recvfrom, 2048)
            assert got == hdr(5) + frame and addr[0] == "127.0.0.1"
            a.sendto(hdr(43) + frame, ("127.0.0.1", port))     # no rule for VNI 43: drop
            b.sendto(hdr(5) + frame, ("127.0.0.1", port))
            got, addr = await loop.run_in_executor(None, a.recvfrom, 2048)
            assert got == hdr(99) + frame                       # where the rule said
            b.settimeout(0.5)
            with pytest.raises(TimeoutError):
                await loop.run_in_executor(None, b.recvfrom, 2048)
            flows = await run_command(sw, ["dump-flows", "br0"])
            assert "tun_id=0x2a,tun_src=127.0.0.3" in flows and "n_packets=1" in flows
            assert "set_field:127.0.0.3->tun_dst,set_field:99->tun_id,output:tf" in flows
            trace = await run_command(sw, ["trace", "br0",
                                           "in_port=tf,tun_id=42,tun_src=127.0.0.3"])
            megaflow = next(line for line in trace.splitlines() if line.startswith("Megaflow"))
            assert "tun_id" in megaflow and "tun_src" in megaflow, trace
            assert "Outputs: tx" in trace
        finally:
            await sw.stop()
        sw = Switch(tmp_path / "run")                      # the store has them back
        await sw.start()
        try:
            assert not sw.failed, sw.failed
            assert sw.ports["tf"].cfg.key is None and sw.ports["tf"].cfg.remote_ip == "flow"
            flows = await run_command(sw, ["dump-flows", "br0"])
            assert "set_field:99->tun_id" in flows
        finally:
            await sw.stop()

    try:
        asyncio.run(scenario())
    finally:
        for s in peers.values():
            s.close()


# -- overlays over a veth underlay --------------------------------------------------------
def ns_switch(workdir, ns: str, name: str) -> processes.PyvhostProcess:
    """A ``pyvhost switch`` started inside namespace ``ns`` (its run dir: workdir/name)."""
    run_dir = workdir / name
    proc = processes.PyvhostProcess(["-v", "switch", "--run-dir", str(run_dir)], workdir, name)
    proc.args = ["ip", "netns", "exec", ns, *proc.args]
    proc.run = run_dir
    return proc.start(ready_text="switch: running")


def ctl(sw, *argv, check=True) -> str:
    return processes.ctl(sw.run, *argv, check=check)


def underlay(net):
    """Namespaces u1 and u2 joined by a veth pair: (u1, u2, ip1, ip2)."""
    u1, u2 = net.netns("tu1"), net.netns("tu2")
    a, b = net.name("tva"), net.name("tvb")
    net.veth(a, u1, b, None)
    sh(["ip", "link", "set", a, "netns", u2])
    net.links.remove(a)                     # it lives (and dies) with u2 now
    ip1, ip2 = net.ip(1), net.ip(2)
    sh(["ip", "addr", "add", f"{ip1}/24", "dev", b], ns=u1)
    sh(["ip", "addr", "add", f"{ip2}/24", "dev", a], ns=u2)
    sh(["ip", "link", "set", a, "up"], ns=u2)
    return u1, u2, ip1, ip2


@contextlib.contextmanager
def guest_on(net, sw, port: str, address: str, mtu: int = 1450, label: str = "a"):
    """A namespace guest (tg<label>) on ``sw``'s vhostuser ``port`` with ``address``/24."""
    ns = net.name(f"tg{label}")
    net.namespaces.append(ns)
    g = Guest(str(sw.run / f"{port}.sock"), netns=ns, ip=f"{address}/24", mtu=mtu).start()
    try:
        assert g.wait_connected(15), g.stats()
        yield g
    finally:
        g.stop()


@contextlib.contextmanager
def stopping(*procs):
    try:
        yield
    finally:
        for p in procs:
            p.stop()


def overlay_ip(net, host: int) -> str:
    _, x, y = net.subnet.split(".")
    return f"10.{int(x) - 100}.{y}.{host}"       # another private /24 (the test's own)


def kernel_vxlan(net, ns: str, remote: str) -> tuple[str, str]:
    """The kernel's vxlan device (VNI 42, port 4789) in ``ns`` (u2 of ``underlay``) to
    ``remote``: (the guest's overlay address, the device's)."""
    vx = net.name("tvx")
    sh(["ip", "link", "add", vx, "type", "vxlan", "id", "42", "remote", remote, "dstport",
        "4789", "dev", net.name("tva")], ns=ns)
    gip, kip = overlay_ip(net, 1), overlay_ip(net, 2)
    sh(["ip", "addr", "add", f"{kip}/24", "dev", vx], ns=ns)
    sh(["ip", "link", "set", vx, "up"], ns=ns)
    return gip, kip


@needs_root
@pytest.mark.slow
def test_guest_reaches_the_kernel_vxlan_device(workdir, net):
    u1, u2, ip1, ip2 = underlay(net)
    gip, kip = kernel_vxlan(net, u2, ip1)
    sw = ns_switch(workdir, u1, "sw1")
    with stopping(sw):
        ctl(sw, "add-br", "br0")
        ctl(sw, "add-port", "br0", "vm", "type=vhostuser", "queues=1")
        ctl(sw, "add-port", "br0", "vx", "type=vxlan", f"remote_ip={ip2}", "key=42")
        assert "mtu: 1450" in ctl(sw, "show")
        with guest_on(net, sw, "vm", gip) as g:
            assert net.ping(g.netns, kip), ctl(sw, "dump-ports", "br0")
            transfer(net, g.netns, u2, kip)              # guest -> kernel
            transfer(net, u2, g.netns, gip)              # kernel -> guest
            ports = json.loads(ctl(sw, "dump-ports", "--json", "br0"))
            vxp = ports["vx"]
            assert vxp["tx_rings"]["tx_segmented"] > 0 or vxp["tx_rings"]["tx_csum"] > 0
            assert vxp["rx_rings"]["drop_unknown_remote"] == 0
            fdb = ctl(sw, "fdb-show", "br0")
            assert "vx" in fdb                            # learned behind the tunnel
        # a big ping does not fit the underlay: dropped and counted, never fragmented
        with guest_on(net, sw, "vm", gip, mtu=1500) as g:
            assert net.ping(g.netns, kip)
            r = sh(["ping", "-c", "2", "-W", "1", "-s", "1472", "-M", "do", kip], ns=g.netns,
                   check=False, timeout=20)
            assert r.returncode != 0
            ports = json.loads(ctl(sw, "dump-ports", "--json", "br0"))
            assert ports["vx"]["tx_rings"]["tx_drop_mtu"] >= 2


@needs_root
@pytest.mark.slow
def test_two_switches_over_vxlan_then_geneve(workdir, net):
    u1, u2, ip1, ip2 = underlay(net)
    sw1, sw2 = ns_switch(workdir, u1, "sw1"), ns_switch(workdir, u2, "sw2")
    ga_ip, gb_ip = overlay_ip(net, 1), overlay_ip(net, 2)
    with stopping(sw1, sw2):
        for sw in (sw1, sw2):
            ctl(sw, "add-br", "br0")
            ctl(sw, "add-port", "br0", "vm", "type=vhostuser", "queues=1")
        with guest_on(net, sw1, "vm", ga_ip) as ga, \
                guest_on(net, sw2, "vm", gb_ip, label="b") as gb:
            for kind in ("vxlan", "geneve"):
                ctl(sw1, "add-port", "br0", "t", f"type={kind}", f"remote_ip={ip2}", "key=7")
                ctl(sw2, "add-port", "br0", "t", f"type={kind}", f"remote_ip={ip1}", "key=7")
                assert net.ping(ga.netns, gb_ip), ctl(sw1, "dump-ports", "br0")
                transfer(net, ga.netns, gb.netns, gb_ip)
                transfer(net, gb.netns, ga.netns, ga_ip)
                for sw in (sw1, sw2):
                    t = json.loads(ctl(sw, "dump-ports", "--json", "br0"))["t"]
                    assert t["type"] == kind and t["datapath"]["rx_packets"] > 1000
                    assert sum(v for k, v in t["rx_rings"].items()
                               if k.startswith("drop_")) == 0, t
                    ctl(sw, "del-port", "t")
                # with the tunnel gone, the guests are apart again
                r = sh(["ping", "-c", "1", "-W", "1", gb_ip], ns=ga.netns, check=False)
                assert r.returncode != 0


@needs_root
def test_hostile_datagrams_from_the_underlay_are_counted(workdir, net):
    """Random and mutated VXLAN datagrams sent at the switch's socket from the underlay
    are dropped and counted by reason; the switch then still carries a ping."""
    u1, u2, ip1, ip2 = underlay(net)
    vx = net.name("tvx")
    sw = ns_switch(workdir, u1, "sw1")
    with stopping(sw):
        ctl(sw, "add-br", "br0")
        ctl(sw, "add-port", "br0", "vm", "type=vhostuser", "queues=1")
        ctl(sw, "add-port", "br0", "vx", "type=vxlan", f"remote_ip={ip2}", "key=42")
        ctl(sw, "add-port", "br0", "vx9", "type=vxlan", "remote_ip=10.255.255.9", "key=42")
        sh(["python3", "-c", HOSTILE, ip1], ns=u2)
        deadline = 50
        while deadline:
            rx = json.loads(ctl(sw, "dump-ports", "--json", "br0"))["vx"]["rx_rings"]
            if rx["datagrams"] >= 600:
                break
            deadline -= 1
            subprocess.run(["sleep", "0.1"], check=True)
        for reason in ("drop_short", "drop_vxlan_flags", "drop_vxlan_reserved",
                       "drop_unknown_vni"):
            assert rx[reason] > 0, rx
        sh(["ip", "link", "add", vx, "type", "vxlan", "id", "42", "remote", ip1, "dstport",
            "4789", "dev", net.name("tva")], ns=u2)
        gip, kip = overlay_ip(net, 1), overlay_ip(net, 2)
        sh(["ip", "addr", "add", f"{kip}/24", "dev", vx], ns=u2)
        sh(["ip", "link", "set", vx, "up"], ns=u2)
        with guest_on(net, sw, "vm", gip) as g:
            assert net.ping(g.netns, kip), ctl(sw, "dump-ports", "br0")
        assert sw.alive()


HOSTILE = """
import random, socket, sys
rnd = random.Random(7)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
good = bytes([8, 0, 0, 0, 0, 0, 42, 0]) + bytes.fromhex("ffffffffffff525400000009") + \
    b"\\x08\\x00" + bytes(46)
for i in range(600):
    k = i % 4
    if k == 0:
        d = bytes(rnd.randrange(256) for _ in range(rnd.randrange(64)))
    elif k == 1:
        d = good[:rnd.randrange(len(good))]
    else:
        d = bytearray(good)
        d[rnd.randrange(8)] = rnd.randrange(256)
        d = bytes(d)
    s.sendto(d, (sys.argv[1], 4789))
"""


@needs_root
@pytest.mark.slow
@pytest.mark.skipif(ovs_netdev.available() is not None, reason=str(ovs_netdev.available()))
def test_guest_reaches_ovs_userspace_over_geneve(workdir, net):
    """Open vSwitch's userspace datapath as the Geneve peer (header 00 00 6558 VNI 00, UDP
    checksum 0, DF set): the guest pings an address on OVS's br-int across the tunnel."""
    u1, u2, ip1, ip2 = underlay(net)
    ovs = ovs_netdev.OvsTunnelPeer(workdir, u2)
    gip, oip = overlay_ip(net, 1), overlay_ip(net, 2)
    sw = ns_switch(workdir, u1, "sw1")
    with stopping(sw):
        ovs.start(net.name("tva"), ip2, "geneve", ip1, 42, oip)
        try:
            ctl(sw, "add-br", "br0")
            ctl(sw, "add-port", "br0", "vm", "type=vhostuser", "queues=1")
            # OVS's userspace drops datagrams whose outer UDP checksum the kernel left to
            # the veth's offload: send none, as OVS itself does (PEERS.md)
            ctl(sw, "add-port", "br0", "gnv", "type=geneve", f"remote_ip={ip2}", "key=42",
                "csum=false")
            with guest_on(net, sw, "vm", gip) as g:
                assert net.ping(g.netns, oip, timeout=30), \
                    ctl(sw, "dump-ports", "br0") + ovs.log_tail()
            t = json.loads(ctl(sw, "dump-ports", "--json", "br0"))["gnv"]
            assert t["datapath"]["rx_packets"] >= 3
            assert sum(v for k, v in t["rx_rings"].items() if k.startswith("drop_")) == 0, t
        finally:
            ovs.stop()
