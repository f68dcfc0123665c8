"""The tunnel port class (pyvhost._tunnel) without root: its decapsulation checked against a
reference written from the specs (RFC 7348 VXLAN, RFC 8926 Geneve) on random and mutated
headers (hypothesis; under ASan too, where ``decap`` hands the compiled code a buffer of
exactly the datagram's size, so any read past it is reported); then the port class in a
real datapath with a PMD thread, on loopback: a tap-class port (a SOCK_SEQPACKET
socketpair) and tunnel ports whose peer is a plain UDP socket of this test. Frames are
encapsulated with the right header and completed checksums, TSO super-frames arrive as
MSS segments, frames over the underlay MTU are dropped and counted, the outer source port
follows the inner flow, two ports on one socket each get their own frames, and hostile
datagrams (random, truncated, mutated headers) are all counted by reason while good
frames keep flowing."""

from __future__ import annotations

import os
import random
import select
import socket
import struct
import threading
import time

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from pyvhost._offload import complete_checksum
from pyvhost._switch import Datapath
from pyvhost._tap import TapDev
from pyvhost._tunnel import DROP_NAMES, TunnelDev, TunSocket, decap, partial_checksum
from pyvhost.packets import inet_checksum
from pyvhost.switch.bridge import Bridge
from pyvhost.switch.flows import parse_flow
from tests.harness.fuzzing import Counter, fuzz_settings, minimum

ETH_MIN = 14


def reference(kind: str, d: bytes):
    """What a receiver that understands no Geneve option does with the datagram, by RFC
    8926 and RFC 7348 as Linux's vxlan driver reads it: (vni, option bytes, inner frame)
    or the reason it is dropped. (RFC 7348 says reserved VXLAN bits MUST be ignored on
    receipt; Linux, and so pyvhost, drops a datagram with any of them set, which also
    drops VXLAN-GBP and VXLAN-GPE senders: deliberate, and what this checks.)"""
    if len(d) < 8 + ETH_MIN:
        return "drop_short"
    if kind == "vxlan":
        if not d[0] & 0x08:
            return "drop_vxlan_flags"
        if d[0] != 0x08 or d[1:4] != b"\0\0\0" or d[7]:
            return "drop_vxlan_reserved"
        return int.from_bytes(d[4:7], "big"), 0, d[8:]
    if d[0] >> 6:
        return "drop_geneve_version"
    hlen = 8 + (d[0] & 0x3F) * 4
    if len(d) < hlen + ETH_MIN:
        return "drop_short"
    if d[1] & 0x40:
        return "drop_geneve_critical"
    if d[1] & 0x80:
        return "drop_geneve_oam"
    if d[2:4] != b"\x65\x58":
        return "drop_geneve_proto"
    off = 8
    while off < hlen:
        if off + 4 > hlen or off + 4 + (d[off + 3] & 0x1F) * 4 > hlen:
            return "drop_geneve_opts"
        if d[off + 2] & 0x80:
            return "drop_geneve_critical"
        off += 4 + (d[off + 3] & 0x1F) * 4
    return int.from_bytes(d[4:7], "big"), hlen - 8, d[hlen:]


def vxlan_hdr(vni: int) -> bytes:
    return bytes([8, 0, 0, 0]) + vni.to_bytes(3, "big") + b"\0"


def geneve_hdr(vni: int, options: bytes = b"") -> bytes:
    return bytes([len(options) // 4, 0, 0x65, 0x58]) + vni.to_bytes(3, "big") + b"\0" + options


def option(cls: int, type_: int, data: bytes) -> bytes:
    return struct.pack("!HBB", cls, type_, len(data) // 4) + data


@st.composite
def datagrams(draw):
    kind = draw(st.sampled_from(["vxlan", "geneve"]))
    vni = draw(st.integers(0, (1 << 24) - 1))
    if kind == "vxlan":
        head = vxlan_hdr(vni)
    else:
        opts = b"".join(option(draw(st.integers(0, 0xFFFF)), draw(st.integers(0, 255)),
                               bytes(4 * draw(st.integers(0, 3))))
                        for _ in range(draw(st.integers(0, 3))))
        head = geneve_hdr(vni, opts)
    d = bytearray(head + draw(st.binary(min_size=0, max_size=80)))
    for _ in range(draw(st.integers(0, 4))):           # mutate a few header bytes
        if d:
            i = draw(st.integers(0, min(len(d), len(head) + 2) - 1))
            d[i] = draw(st.integers(0, 255))
    cut = draw(st.integers(0, len(d)))
    if draw(st.booleans()):
        d = d[:cut]                                    # truncated anywhere
    if draw(st.integers(0, 9)) == 0:
        kind = "geneve" if kind == "vxlan" else "vxlan"   # the other type's header
    return kind, bytes(d)


N_DECAP = 3000
decap_cases = Counter("decap against the reference")


@fuzz_settings(N_DECAP)
@given(datagrams())
@example(("geneve", geneve_hdr(5, option(0x102, 0x80, b"")) + bytes(14)))
@example(("geneve", bytes([0x3F, 0, 0x65, 0x58, 0, 0, 1, 0]) + bytes(300)))
@example(("vxlan", vxlan_hdr(1)[:7]))
def test_decap_agrees_with_the_specs(case):
    kind, d = case
    decap_cases()
    assert decap(kind, d) == reference(kind, d)


def test_decap_fuzzer_ran_and_saw_every_reason():
    assert decap_cases.n >= minimum(N_DECAP)
    decap_cases.report(N_DECAP)
    seen = set()
    rnd = random.Random(1)
    for _ in range(20000):
        kind = rnd.choice(["vxlan", "geneve"])
        d = bytes(rnd.choice([0, 8, 0x40, 0x80, 0x65, 0x58, 1, 2]) for _ in range(4)) + \
            bytes(rnd.randrange(256) for _ in range(rnd.randrange(40)))
        r = decap(kind, d)
        assert r == reference(kind, d)
        seen.add(r if isinstance(r, str) else "ok")
    decap_reasons = set(DROP_NAMES[:8])
    assert decap_reasons | {"ok"} <= seen, decap_reasons - seen


# -- the port class in a datapath -------------------------------------------------------
MAC1, MAC2 = bytes.fromhex("525400000001"), bytes.fromhex("525400000002")
NO_HDR = bytes(12)


def udp_frame(src, dst, sport=1000, payload=b"x" * 18, src_ip=b"\x0a\0\0\x01",
              dst_ip=b"\x0a\0\0\x02", csum_partial=False) -> tuple[bytes, bytes]:
    """(virtio-net header, frame) of a UDP datagram; with ``csum_partial`` the checksum
    field holds only the pseudo-header sum and the header asks for the rest."""
    udp_len = 8 + len(payload)
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + udp_len, 0, 0, 64, 17, 0,
                               src_ip, dst_ip))
    ip[10:12] = struct.pack("!H", inet_checksum(bytes(ip)))
    pseudo = src_ip + dst_ip + struct.pack("!BBH", 0, 17, udp_len)
    udp = bytearray(struct.pack("!HHHH", sport, 2000, udp_len, 0) + payload)
    if csum_partial:
        udp[6:8] = struct.pack("!H", (~inet_checksum(pseudo)) & 0xFFFF)
        hdr = bytes([1, 0, 0, 0, 0, 0, 34, 0, 6, 0, 0, 0])
    else:
        udp[6:8] = struct.pack("!H", inet_checksum(pseudo + bytes(udp)) or 0xFFFF)
        hdr = NO_HDR
    return hdr, dst + src + b"\x08\x00" + bytes(ip) + bytes(udp)


def tcp_super_frame(mss: int, payload: bytes) -> tuple[bytes, bytes]:
    """A TCP/IPv4 GSO super-frame with a partial checksum, as a guest hands it over."""
    src_ip, dst_ip = b"\x0a\0\0\x01", b"\x0a\0\0\x02"
    tcp_len = 20 + len(payload)
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + tcp_len, 7, 0, 64, 6, 0,
                               src_ip, dst_ip))
    ip[10:12] = struct.pack("!H", inet_checksum(bytes(ip)))
    pseudo = src_ip + dst_ip + struct.pack("!BBH", 0, 6, tcp_len)
    tcp = bytearray(struct.pack("!HHIIBBHHH", 5000, 80, 1, 0, 0x50, 0x18, 65535, 0, 0))
    tcp[16:18] = struct.pack("!H", (~inet_checksum(pseudo)) & 0xFFFF)
    hdr = struct.pack("<BBHHHHH", 1, 1, 54, mss, 34, 16, 0)    # NEEDS_CSUM, GSO_TCPV4
    return hdr, MAC2 + MAC1 + b"\x08\x00" + bytes(ip) + bytes(tcp) + payload


def l4_ok(frame: bytes) -> bool:
    ihl = (frame[14] & 0xF) * 4
    ip = frame[14:14 + ihl]
    total = struct.unpack("!H", ip[2:4])[0]
    l4 = frame[14 + ihl:14 + total]
    pseudo = ip[12:20] + struct.pack("!BBH", 0, ip[9], len(l4))
    return inet_checksum(pseudo + l4) == 0


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Rig:
    """A datapath with a NORMAL bridge, a tap-class port 0 (``tap``: the outside end) and
    tunnel ports 1.. on one receiving socket bound to 127.0.0.1:``port``, whose remote is
    ``peer`` (a UDP socket of the test on 127.0.0.1)."""

    def __init__(self, kind="vxlan", vnis=(42,), max_frame=1464, tx_socks=8, remote="127.0.0.1"):
        self.kind = kind
        self.inside, self.tap = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.inside.setblocking(False)
        self.rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.rx.setblocking(False)
        self.rx.bind(("127.0.0.1", 0))
        self.port = self.rx.getsockname()[1]
        self.peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.peer.bind(("127.0.0.1", 0))
        self.tx = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(tx_socks)]
        for s in self.tx:
            s.bind(("127.0.0.1", 0))
        self.sock = TunSocket(kind, self.rx.fileno())
        self.devs = [TunnelDev(self.sock, remote and socket.inet_aton(remote),
                               self.peer.getsockname()[1], vni, [s.fileno() for s in self.tx],
                               max_frame) for vni in vnis]
        bridge = Bridge("b", 0)
        bridge.apply(add=[parse_flow("priority=0,actions=normal")])
        self.bridge = bridge
        self.dp = Datapath()
        self.dp.set_bridge(0, bridge.cls, bridge.macs)
        self.dp.add_port(0, 0, TapDev(self.inside.fileno()))
        for i, dev in enumerate(self.devs, 1):
            self.dp.add_port(i, 0, dev)
        self.pmd = self.dp.new_pmd(0, pool_size=512)
        self.thread = threading.Thread(target=self.pmd.run, daemon=True)
        self.thread.start()
        self.pmd.set_rxqs([(i, 0) for i in range(len(self.devs) + 1)])

    def close(self):
        self.pmd.stop()
        self.thread.join(5)
        for i in range(len(self.devs) + 1):
            self.dp.remove_port(i)
        for dev in self.devs:
            dev.detach()
        for s in [self.inside, self.tap, self.rx, self.peer, *self.tx]:
            s.close()

    def header(self, vni=42) -> bytes:
        return vxlan_hdr(vni) if self.kind == "vxlan" else geneve_hdr(vni)

    def from_peer(self, datagram: bytes) -> None:
        self.peer.sendto(datagram, ("127.0.0.1", self.port))

    def at_peer(self, timeout=2.0):
        if not select.select([self.peer], [], [], timeout)[0]:
            return None
        data, addr = self.peer.recvfrom(70000)
        return data, addr

    def at_tap(self, timeout=2.0) -> bytes | None:
        if not select.select([self.tap], [], [], timeout)[0]:
            return None
        return self.tap.recv(70000)

    def counters(self) -> dict:
        out = dict(self.sock.stats())
        for i, dev in enumerate(self.devs, 1):
            for k, v in dev.stats().items():
                out[f"{i}.{k}"] = v
            out[f"{i}.rx_packets"] = self.dp.port_stats(i)["rx_packets"]
        return out

    def wait(self, predicate, timeout=3.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            c = self.counters()
            if predicate(c):
                return c
            time.sleep(0.01)
        raise AssertionError(f"counters never matched: {self.counters()}")


@pytest.fixture(params=["vxlan", "geneve"])
def rig(request):
    r = Rig(request.param)
    try:
        yield r
    finally:
        r.close()


def test_frames_cross_both_ways_with_headers_and_complete_checksums(rig):
    hdr, frame = udp_frame(MAC1, MAC2, csum_partial=True)
    rig.tap.send(hdr + frame)                           # flooded: out through the tunnel
    got = rig.at_peer()
    assert got is not None, rig.counters()
    data, (addr, sport) = got
    assert addr == "127.0.0.1" and data[:8] == rig.header(42)
    inner = data[8:]
    assert inner[:34] == frame[:34] and l4_ok(inner), inner.hex()     # completed
    assert rig.devs[0].stats()["tx_csum"] == 1
    _, back = udp_frame(MAC2, MAC1)
    rig.from_peer(rig.header(42) + back)                # MAC1 learned: straight to the tap
    assert rig.at_tap() == NO_HDR + back
    assert rig.sock.stats()["datagrams"] == 1
    assert sum(rig.sock.stats()[k] for k in DROP_NAMES) == 0
    sleeps = rig.pmd.stats()["sleeps"]
    time.sleep(0.3)
    cpu0 = os.times()
    time.sleep(1.0)
    cpu = os.times()
    used = (cpu.user - cpu0.user) + (cpu.system - cpu0.system)
    assert used < 0.5, f"{used:.2f} s of CPU in 1 s idle"   # it sleeps, not spins
    assert rig.pmd.stats()["sleeps"] > sleeps
    rig.from_peer(rig.header(42) + back)                # and wakes for a datagram
    assert rig.at_tap() == NO_HDR + back


def test_inner_checksums_left_to_an_offload_are_marked_for_completion(rig):
    """A sender whose kernel left the inner checksum to an offload (CHECKSUM_PARTIAL over
    veth: the field holds only the pseudo-header sum) has its frames arrive with
    NEEDS_CSUM, which completes them; complete checksums arrive untouched."""
    hdr, partial = udp_frame(MAC2, MAC1, csum_partial=True)
    assert partial_checksum(partial) == hdr and not l4_ok(partial)
    _, tcp = tcp_super_frame(1400, b"y" * 100)
    tcp_hdr = partial_checksum(tcp)
    assert tcp_hdr[0] == 1 and tcp_hdr[6:10] == bytes([34, 0, 16, 0])
    assert l4_ok(complete_checksum(tcp, tcp_hdr))
    rig.from_peer(rig.header(42) + partial)
    got = rig.at_tap()
    assert got == hdr + partial, got
    assert l4_ok(complete_checksum(got[12:], got[:12]))
    _, whole = udp_frame(MAC2, MAC1)
    assert partial_checksum(whole) == NO_HDR
    rig.from_peer(rig.header(42) + whole)
    assert rig.at_tap() == NO_HDR + whole
    assert rig.devs[0].stats()["rx_csum_partial"] == 1


def test_tso_super_frames_leave_as_segments_and_big_frames_are_dropped(rig):
    payload = os.urandom(5000)
    hdr, frame = tcp_super_frame(1400, payload)
    rig.tap.send(hdr + frame)
    got = b""
    for _ in range(4):
        seg = rig.at_peer()
        assert seg is not None, rig.counters()
        inner = seg[0][8:]
        assert len(inner) <= rig.devs[0].max_frame and l4_ok(inner)
        got += inner[54:]
    assert got == payload
    rig.wait(lambda c: c["1.tx_segmented"] == 1)      # counted once the last one went
    _, big = udp_frame(MAC1, MAC2, payload=bytes(1464 - 42 + 1))     # one byte too many
    rig.tap.send(NO_HDR + big)
    rig.wait(lambda c: c["1.tx_drop_mtu"] == 1)
    assert rig.at_peer(0.3) is None
    _, fits = udp_frame(MAC1, MAC2, payload=bytes(1464 - 42))
    rig.tap.send(NO_HDR + fits)
    assert len(rig.at_peer()[0]) == 8 + 1464


def test_outer_source_port_follows_the_inner_flow():
    rig = Rig()
    try:
        ports = {}
        for sport in list(range(1000, 1032)) * 2:      # 32 flows, each twice
            _, frame = udp_frame(MAC1, MAC2, sport=sport)
            rig.tap.send(NO_HDR + frame)
            got = rig.at_peer()
            assert got is not None
            ports.setdefault(sport, set()).add(got[1][1])
        assert all(len(p) == 1 for p in ports.values()), ports       # one per flow
        assert len({p for s in ports.values() for p in s}) >= 3      # spread over several
        assert rig.port not in {p for s in ports.values() for p in s}
    finally:
        rig.close()


def test_two_ports_on_one_socket_each_get_their_frames():
    rig = Rig(vnis=(42, 43))
    try:
        for n in range(20):
            vni = 42 + n % 2
            _, frame = udp_frame(bytes.fromhex(f"5254000001{n:02x}"), MAC1, sport=n)
            rig.from_peer(rig.header(vni) + frame)
        c = rig.wait(lambda c: c["1.rx_packets"] + c["2.rx_packets"] == 20)
        assert c["1.rx_packets"] == 10 and c["2.rx_packets"] == 10, c
        assert c["1.rx_via_inbox"] + c["2.rx_via_inbox"] > 0, c    # read by the other
        rig.from_peer(rig.header(44) + frame)          # nobody's VNI
        rig.wait(lambda c: c["drop_unknown_vni"] == 1)
        while rig.at_tap(0.2) is not None or rig.at_peer(0) is not None:
            pass                            # what was flooded (MAC1 was unknown) goes
        # NORMAL learned each remote MAC on its port: a frame to one behind VNI 43 leaves
        # once, with VNI 43 (not flooded to both)
        _, frame = udp_frame(MAC1, bytes.fromhex("525400000101"))
        rig.tap.send(NO_HDR + frame)
        got = rig.at_peer()
        assert got is not None and got[0][:8] == rig.header(43)
        assert rig.at_peer(0.3) is None
    finally:
        rig.close()


def test_a_flow_based_port_takes_any_remote_and_vni_and_needs_a_destination():
    """remote_ip=flow key=flow: datagrams from any address with any VNI are its own; a
    fixed port on the same socket still gets its own first. NORMAL floods a frame to a
    flow-based port as one copy per remote (address, VNI) learned behind it, and a
    flow-based port with none learned (port 2) sends nothing."""
    rig = Rig(vnis=(-1, 42), remote=None)
    try:
        fixed = TunnelDev(rig.sock, socket.inet_aton("127.0.0.1"), rig.peer.getsockname()[1],
                          42, [rig.tx[0].fileno()], 1464)
        rig.dp.add_port(3, 0, fixed)
        rig.pmd.set_rxqs([(0, 0), (1, 0), (2, 0), (3, 0)])
        for vni in (1, 2, 3, 42):
            _, frame = udp_frame(bytes.fromhex(f"5254000003{vni:02x}"), MAC1, sport=vni)
            rig.from_peer(rig.header(vni) + frame)
        c = rig.wait(lambda c: c["1.rx_packets"] + c["2.rx_packets"] == 3 and
                     rig.dp.port_stats(3)["rx_packets"] == 1)
        assert c["1.rx_packets"] == 3 and c["2.rx_packets"] == 0, c
        while rig.at_peer(0.3) is not None:               # what those floods sent
            pass
        before = rig.counters()
        _, frame = udp_frame(MAC1, MAC2)
        rig.tap.send(NO_HDR + frame)                     # flooded: to every remote
        got = sorted(rig.at_peer()[0][:8] for _ in range(4))
        assert got == sorted(rig.header(vni) for vni in (1, 2, 3, 42)), got
        assert rig.at_peer(0.3) is None
        c = rig.counters()
        assert c["1.tx_datagrams"] - before["1.tx_datagrams"] == 3, c
        assert c["2.tx_datagrams"] == 0, c
        assert c["1.tx_no_remote"] == c["2.tx_no_remote"] == 0, c
    finally:
        rig.dp.remove_port(3)
        fixed.detach()
        rig.close()


def hostile(rnd: random.Random, kind: str) -> bytes:
    good = (vxlan_hdr(42) if kind == "vxlan" else geneve_hdr(42)) + \
        udp_frame(MAC2, MAC1)[1]
    choice = rnd.randrange(4)
    if choice == 0:
        return bytes(rnd.randrange(256) for _ in range(rnd.randrange(0, 64)))
    if choice == 1:
        return good[:rnd.randrange(len(good))]
    d = bytearray(good)
    for _ in range(rnd.randrange(1, 4)):
        d[rnd.randrange(12)] = rnd.randrange(256)
    return bytes(d)


N_SOCKET = 30
socket_cases = Counter("hostile datagrams at the tunnel socket")


@pytest.mark.parametrize("kind", ["vxlan", "geneve"])
def test_hostile_datagrams_are_counted_by_reason_and_good_ones_still_pass(kind):
    rig = Rig(kind)
    try:
        @fuzz_settings(N_SOCKET)
        @given(st.integers(0, 1 << 32))
        def batch(seed):
            socket_cases()
            rnd = random.Random(seed)
            before = rig.counters()
            sent = [hostile(rnd, kind) for _ in range(20)]
            expect_ok = sum(1 for d in sent if isinstance(reference(kind, d), tuple)
                            and reference(kind, d)[0] == 42)
            for d in sent:
                rig.from_peer(d)

            def accounted(c):
                drops = sum(c[k] - before[k] for k in DROP_NAMES)
                rx = c["1.rx_packets"] - before["1.rx_packets"]
                return c["datagrams"] - before["datagrams"] == len(sent) and \
                    drops + rx == len(sent)
            c = rig.wait(accounted)
            assert c["1.rx_packets"] - before["1.rx_packets"] == expect_ok
            for d in sent:                                 # each reason where expected
                r = reference(kind, d)
                if isinstance(r, str):
                    assert c[r] > before[r]
        batch()
        assert socket_cases.n >= minimum(N_SOCKET)
        _, frame = udp_frame(MAC2, MAC1, sport=77)
        while rig.at_tap(0.2) is not None:
            pass
        rig.from_peer(rig.header(42) + frame)              # and it still works
        got = rig.at_tap()
        assert got == NO_HDR + frame
    finally:
        rig.close()
