"""NORMAL on flow-based tunnel ports (remote_ip=flow, key=flow): the MAC table keeps the
remote (tun_src, tun_id) each MAC came from, NORMAL output to it sets tun_dst/tun_id, a
flood sends one copy per remote learned behind the port, and a MAC that moves to another
remote is followed (the cached decision that sent to the old one goes stale).

First the MAC table alone, then a switch over real UDP sockets on loopback (peers are
plain sockets speaking VXLAN), then one switch in a namespace and two Linux kernel vxlan
devices in two other namespaces behind one flow-based port (guest pings both, the fdb
shows each MAC with its remote, a MAC that moves to the other remote is followed)."""

from __future__ import annotations

import asyncio
import json
import socket

import pytest

from pyvhost._fdb import MacTable
from pyvhost.switch import Switch
from pyvhost.switch.commands import run_command
from tests.harness.limits import time_limit
from tests.harness.netns import sh
from tests.test_tunnel_ports import (
    ctl,
    free_udp_port,
    guest_on,
    needs_root,
    ns_switch,
    overlay_ip,
    stopping,
)

TEST_TIMEOUT = 240
MA, MB, MC = bytes.fromhex("02000000000a"), bytes.fromhex("02000000000b"), \
    bytes.fromhex("02000000000c")
BCAST = b"\xff" * 6
IP_A, IP_B = socket.inet_aton("10.9.0.2"), socket.inet_aton("10.9.0.3")


@pytest.fixture(autouse=True)
def bounded():
    with time_limit(TEST_TIMEOUT):
        yield


def test_mac_table_keeps_each_macs_remote_and_the_remotes_of_a_port():
    macs = MacTable(64)
    assert macs.learn(0, MA, 3, now=0, remote=IP_A, vni=42) == 1
    assert macs.learn(0, MA, 3, now=1, remote=IP_A, vni=42) == 0          # seen again
    assert macs.learn(0, MB, 3, now=2, remote=IP_A, vni=42) == 1
    assert macs.learn(0, MC, 4, now=3) == 1                              # no remote
    assert macs.remotes(3) == [(IP_A, 42)] and macs.remotes(4) == []
    assert macs.learn(0, MA, 3, now=4, remote=IP_B, vni=42) == 2          # another remote
    assert macs.learn(0, MB, 3, now=5, remote=IP_A, vni=43) == 2          # another VNI
    assert macs.remotes(3) == sorted([(IP_B, 42), (IP_A, 43)])             # A/42 has none
    rows = {mac: (port, remote, vni) for port, _, mac, _, remote, vni in macs.rows()}
    assert rows == {MA: (3, IP_B, 42), MB: (3, IP_A, 43), MC: (4, None, 0)}
    assert macs.learn(0, MA, 4, now=6) == 2                               # to a plain port
    assert macs.remotes(3) == [(IP_A, 43)] and macs.stats()["remotes"] == 1
    assert macs.forget_port(3) == 1 and macs.remotes(3) == []
    with pytest.raises(ValueError, match="remote"):
        macs.learn(0, MA, 3, remote=bytes(4))


def test_remotes_behind_a_port_are_bounded_and_always_counted():
    """A remote is whoever sends a datagram to a flow-based port (spoofable), and a flood
    copies a frame to each: at most FDB_PORT_REMOTES per port; a MAC whose remote finds
    no room is not learned (so the list never loses a remote that still has MACs)."""
    from pyvhost._fdb import FDB_PORT_REMOTES_MAX as FDB_PORT_REMOTES
    macs = MacTable(4096)
    mac = [bytes([2, 0, 0, 0, i >> 8, i & 255]) for i in range(FDB_PORT_REMOTES + 2)]
    ip = [bytes([10, 1, i >> 8, i & 255]) for i in range(FDB_PORT_REMOTES + 2)]
    for i in range(FDB_PORT_REMOTES):
        assert macs.learn(0, mac[i], 3, now=i, remote=ip[i], vni=1) == 1
    n = FDB_PORT_REMOTES
    assert macs.learn(0, mac[n], 3, now=n, remote=ip[n], vni=1) == -1      # no room: refused
    assert macs.stats()["remotes_full"] == 1 and len(macs.remotes(3)) == FDB_PORT_REMOTES
    assert macs.learn(0, mac[n], 3, now=n, remote=ip[0], vni=1) == 1       # a listed one: fine
    assert macs.learn(0, mac[0], 3, now=n, remote=ip[n], vni=1) == -1      # a move: refused
    assert macs.learn(0, mac[0], 4, now=n, remote=ip[n], vni=1) == 2       # another port: fine
    # mac[0] left ip[0] (mac[n] is still there): ip[0] stays listed behind port 3
    assert (ip[0], 1) in macs.remotes(3)
    assert macs.learn(0, mac[n], 4, now=n + 1) == 2                         # its last MAC goes
    assert (ip[0], 1) not in macs.remotes(3)
    assert macs.learn(0, mac[n + 1], 3, now=n + 1, remote=ip[n + 1], vni=1) == 1   # room again


def eth(dst: bytes, src: bytes) -> bytes:
    return dst + src + b"\x08\x00" + bytes(46)


def vxlan(vni: int) -> bytes:
    return bytes([8, 0, 0, 0]) + vni.to_bytes(3, "big") + b"\0"


def test_normal_learns_remotes_floods_each_and_follows_a_move(tmp_path):
    """Peers A (127.0.0.2) and B (127.0.0.3) behind flow-based port tf; peer C
    (127.0.0.4) behind the fixed port fx (key 5). The bridge has NORMAL only."""
    port = free_udp_port()
    peers = {}
    for ip in ("127.0.0.2", "127.0.0.3", "127.0.0.4"):
        peers[ip] = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        peers[ip].bind((ip, port))
    a, b, c = peers["127.0.0.2"], peers["127.0.0.3"], peers["127.0.0.4"]
    sw_addr = ("127.0.0.1", port)

    def recv(s, timeout=3.0):
        s.settimeout(timeout)
        try:
            return s.recvfrom(2048)[0]
        except TimeoutError:
            return None

    async def got(s, timeout=3.0):
        return await asyncio.get_running_loop().run_in_executor(None, recv, s, timeout)

    async def nothing(*socks):
        return [await got(s, 0.3) for s in socks] == [None] * len(socks)

    async def scenario():
        sw = Switch(tmp_path / "run")
        await sw.start()
        try:
            for argv in (["add-br", "br0"],
                         ["add-port", "br0", "tf", "type=vxlan", "remote_ip=flow", "key=flow",
                          "local_ip=127.0.0.1", f"dst_port={port}"],
                         ["add-port", "br0", "fx", "type=vxlan", "remote_ip=127.0.0.4",
                          "local_ip=127.0.0.1", "key=5", f"dst_port={port}"]):
                await run_command(sw, argv)
            # nothing learned behind tf yet: C's broadcast has no remote to go to
            c.sendto(vxlan(5) + eth(BCAST, MC), sw_addr)
            assert await nothing(a, b)
            # A and B announce themselves (broadcasts reach C); each is learned with its remote
            a.sendto(vxlan(42) + eth(BCAST, MA), sw_addr)
            assert await got(c) == vxlan(5) + eth(BCAST, MA)
            b.sendto(vxlan(43) + eth(BCAST, MB), sw_addr)
            assert await got(c) == vxlan(5) + eth(BCAST, MB)
            assert await nothing(a, b)                    # never back out of tf
            fdb = json.loads(await run_command(sw, ["fdb-show", "--json", "br0"]))
            rows = {r["mac"]: r for r in fdb}
            assert rows[MA.hex(":")]["remote"] == "127.0.0.2" and rows[MA.hex(":")]["key"] == 42
            assert rows[MB.hex(":")]["remote"] == "127.0.0.3" and rows[MB.hex(":")]["key"] == 43
            assert "remote" not in rows[MC.hex(":")]
            text = await run_command(sw, ["fdb-show", "br0"])
            assert "remote=127.0.0.2 key=42" in text and "remote=127.0.0.3 key=43" in text
            # unicast from C goes to the one remote, with its VNI (twice: cached the 2nd time)
            for _ in range(2):
                c.sendto(vxlan(5) + eth(MA, MC), sw_addr)
                assert await got(a) == vxlan(42) + eth(MA, MC)
                c.sendto(vxlan(5) + eth(MB, MC), sw_addr)
                assert await got(b) == vxlan(43) + eth(MB, MC)
                assert await nothing(a, b)
            # a broadcast from C: one copy per remote, each with its own VNI
            c.sendto(vxlan(5) + eth(BCAST, MC), sw_addr)
            assert await got(a) == vxlan(42) + eth(BCAST, MC)
            assert await got(b) == vxlan(43) + eth(BCAST, MC)
            assert await nothing(a, b)
            # MA moves to B's remote (VNI 44): C's frames to MA follow it
            b.sendto(vxlan(44) + eth(BCAST, MA), sw_addr)
            assert await got(c) == vxlan(5) + eth(BCAST, MA)
            c.sendto(vxlan(5) + eth(MA, MC), sw_addr)
            assert await got(b) == vxlan(44) + eth(MA, MC)
            assert await nothing(a, b)
            fdb = json.loads(await run_command(sw, ["fdb-show", "--json", "br0"]))
            row = next(r for r in fdb if r["mac"] == MA.hex(":"))
            assert (row["port"], row["remote"], row["key"]) == ("tf", "127.0.0.3", 44)
            # A has no MAC left: a flood reaches B's two remotes (VNI 43 and 44) only
            c.sendto(vxlan(5) + eth(BCAST, MC), sw_addr)
            assert sorted([await got(b), await got(b)]) == sorted(
                [vxlan(43) + eth(BCAST, MC), vxlan(44) + eth(BCAST, MC)])
            assert await nothing(a, b)
            tf = json.loads(await run_command(sw, ["dump-ports", "--json", "br0"]))["tf"]
            assert tf["tx_rings"]["tx_no_remote"] == 0, tf
            trace = await run_command(sw, ["trace", "br0",
                                           "in_port=tf,tun_id=42,tun_src=127.0.0.2"])
            megaflow = next(line for line in trace.splitlines() if line.startswith("Megaflow"))
            assert "tun_id" in megaflow and "tun_src" in megaflow, trace
        finally:
            await sw.stop()

    try:
        asyncio.run(scenario())
    finally:
        for s in peers.values():
            s.close()


# -- one switch, two kernel vxlan peers --------------------------------------------------
def mac_of(ns: str, dev: str) -> str:
    return json.loads(sh(["ip", "-j", "link", "show", dev], ns=ns).stdout)[0]["address"]


def fdb_of(sw) -> dict:
    return {r["mac"]: r for r in json.loads(ctl(sw, "fdb-show", "--json", "br0"))}


@needs_root
@pytest.mark.slow
def test_one_flow_based_port_reaches_two_kernel_vxlan_peers_with_normal(workdir, net):
    """The switch in namespace u1, a kernel vxlan device (VNI 42) in u2 and one in u3,
    each over its own veth to u1; the switch has one port remote_ip=flow key=42 and
    NORMAL only. Both peers reach the guest and the guest both peers (its ARP broadcasts
    flooded to each remote); the fdb shows each peer's MAC with its remote; then u2's MAC
    moves to u3 (u2's device goes, u3's takes its MAC and address) and the guest's
    frames to it follow."""
    u1, u2, u3 = net.netns("tn1"), net.netns("tn2"), net.netns("tn3")
    _, x, y = net.subnet.split(".")
    under = {u2: (net.ip(1), net.ip(2)), u3: (f"10.{int(x) - 150}.{y}.1",
                                             f"10.{int(x) - 150}.{y}.2")}
    vx = {}
    for i, (ns, (mine, theirs)) in enumerate(under.items()):
        a, b, v = net.name(f"tn{i}a"), net.name(f"tn{i}b"), net.name(f"tnv{i}")
        sh(["ip", "link", "add", a, "netns", u1, "type", "veth", "peer", "name", b,
            "netns", ns])
        sh(["ip", "addr", "add", f"{mine}/24", "dev", a], ns=u1)
        sh(["ip", "link", "set", a, "up"], ns=u1)
        sh(["ip", "addr", "add", f"{theirs}/24", "dev", b], ns=ns)
        sh(["ip", "link", "set", b, "up"], ns=ns)
        sh(["ip", "link", "add", v, "type", "vxlan", "id", "42", "remote", mine, "dstport",
            "4789", "dev", b], ns=ns)
        sh(["ip", "addr", "add", f"{overlay_ip(net, 2 + i)}/24", "dev", v], ns=ns)
        sh(["ip", "link", "set", v, "up"], ns=ns)
        vx[ns] = v
    gip, ip2, ip3 = overlay_ip(net, 1), overlay_ip(net, 2), overlay_ip(net, 3)
    m2, m3 = mac_of(u2, vx[u2]), mac_of(u3, vx[u3])
    sw = ns_switch(workdir, u1, "sw1")
    with stopping(sw):
        ctl(sw, "add-br", "br0")
        ctl(sw, "add-port", "br0", "vm", "type=vhostuser", "queues=1")
        ctl(sw, "add-port", "br0", "t", "type=vxlan", "remote_ip=flow", "key=42")
        with guest_on(net, sw, "vm", gip, label="n") as g:
            # each peer announces itself first (nothing is learned behind t before)
            assert net.ping(u2, gip), ctl(sw, "dump-ports", "br0")
            assert net.ping(u3, gip), ctl(sw, "dump-ports", "br0")
            fdb = fdb_of(sw)
            assert (fdb[m2]["port"], fdb[m2]["remote"], fdb[m2]["key"]) == \
                ("t", under[u2][1], 42), fdb
            assert (fdb[m3]["port"], fdb[m3]["remote"], fdb[m3]["key"]) == \
                ("t", under[u3][1], 42), fdb
            assert f"remote={under[u3][1]} key=42" in ctl(sw, "fdb-show", "br0")
            # the guest forgets both: its ARP requests are flooded, one copy per remote
            sh(["ip", "neigh", "flush", "all"], ns=g.netns)
            assert net.ping(g.netns, ip2) and net.ping(g.netns, ip3)
            t = json.loads(ctl(sw, "dump-ports", "--json", "br0"))["t"]
            assert t["tx_rings"]["tx_no_remote"] == 0, t
            # u2's MAC moves to u3: the guest's cached way to it must follow
            sh(["ip", "link", "del", vx[u2]], ns=u2)
            sh(["ip", "link", "set", vx[u3], "address", m2], ns=u3)
            sh(["ip", "addr", "add", f"{ip2}/24", "dev", vx[u3]], ns=u3)
            r = sh(["ping", "-c", "3", "-W", "2", "-I", ip2, gip], ns=u3, check=False,
                   timeout=30)
            assert r.returncode == 0, (r.stdout, fdb_of(sw))
            assert net.ping(g.netns, ip2)
            fdb = fdb_of(sw)
            assert (fdb[m2]["port"], fdb[m2]["remote"]) == ("t", under[u3][1]), fdb
