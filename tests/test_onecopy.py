"""One-copy forwarding between vhost-user ports (issue 15 item 1), in process: two or three
guests' rings driven from Python (tests.harness.driver), a Datapath with one PMD thread.
A frame whose cached action is one output to another vhost-user port is copied once,
from the sender's TX buffers into the receiver's RX buffers (pmd stat ``onecopy``); every
other case (flood, two outputs, a mirror, shaping, a receiver that needs a software
checksum) makes the frame whole first and must deliver the same bytes. Every ring
combination: split/packed sender x split/packed receiver, mergeable RX buffers on/off,
indirect descriptors, the header chained over several descriptors, 64 B to 9000+ B."""

from __future__ import annotations

import contextlib
import struct
import threading
import time
from types import SimpleNamespace

import pytest

from pyvhost._switch import Datapath
from pyvhost._vhostport import VhostDev
from pyvhost._vring import OFFLOAD_BITS
from pyvhost.switch.bridge import Bridge
from pyvhost.switch.flows import parse_flow
from tests.harness.driver import DriverRing, GuestImage, PackedDriverRing, vnet_hdr
from tests.test_offload import csum

MiB = 1 << 20
MAC = {n: bytes([0x02, 0, 0, 0, 0, i + 1]) for i, n in enumerate("abc")}
HEAD_COPY = 128                      # _vring.ONECOPY_HEAD: longer frames keep their tail


def frame(src: str, dst: bytes, size: int, seed: int = 0) -> bytes:
    """An IPv4/UDP frame of ``size`` bytes with a payload that differs per seed."""
    body = size - 14 - 20 - 8
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28 + body, 0, 0, 64, 17, 0,
                     bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]))
    udp = struct.pack("!HHHH", 1000 + seed, 2000, 8 + body, 0)
    payload = bytes((seed * 7 + i * 13) & 0xFF for i in range(body))
    return dst + MAC[src] + b"\x08\x00" + ip + udp + payload


class Guest:
    """One guest: its memory, a TX driver ring (it sends) and an RX driver ring."""

    def __init__(self, tx_layout: str, rx_layout: str, *, mrg: bool, hdr_len: int,
                 ofl_tx: int = 0, ofl_rx: int = 0):
        self.image = GuestImage((8 * MiB,))
        mem = self.image.guest_memory()
        self.tx = (DriverRing if tx_layout == "split" else PackedDriverRing)(self.image, 64)
        self.rx = (DriverRing if rx_layout == "split" else PackedDriverRing)(self.image, 256)
        self.tx_vq = self.tx.make_queue(mem, index=1, hdr_len=hdr_len)
        self.rx_vq = self.rx.make_queue(mem, index=0, hdr_len=hdr_len, mrg_rxbuf=mrg)
        self.mrg, self.hdr_len = mrg, hdr_len
        for vq, packed in ((self.tx_vq, tx_layout == "packed"),
                           (self.rx_vq, rx_layout == "packed")):
            with vq:
                vq.set_features(event_idx=False, indirect=True, mrg_rxbuf=vq is self.rx_vq
                                and mrg, hdr_len=hdr_len, packed=packed, ofl_tx=ofl_tx,
                                ofl_rx=ofl_rx)
        self.dev = VhostDev([self.rx_vq], [self.tx_vq])

    def post_rx(self, count: int):
        """Buffers for ``count`` frames of up to 9100 bytes: 2 KB each (mergeable) or a
        chain of 3 descriptors."""
        for _ in range(count):
            if self.mrg:
                for _ in range(5):
                    self.rx.post_rx([2048])
            else:
                self.rx.post_rx([4096, 4096, 1024])

    def received(self) -> list[tuple[bytes, bytes]]:
        """(virtio-net header, frame) of every frame delivered since the last call."""
        out = []
        used = self.rx.used()
        i = 0
        while i < len(used):
            head, length = used[i]
            data = self.rx.rx_bytes(head, length)
            hdr = data[:self.hdr_len]
            nbufs = int.from_bytes(hdr[10:12], "little") if self.mrg else 1
            assert nbufs >= 1, hdr
            for head, length in used[i + 1:i + nbufs]:
                data += self.rx.rx_bytes(head, length)
            i += nbufs
            out.append((hdr, data[self.hdr_len:]))
        return out

    def close(self):
        self.image.close()


@pytest.fixture
def switch():
    """make(guests, flows, **pool): a Datapath with the guests as ports 0, 1, ... on one
    bridge and a PMD polling their TX rings; everything stopped at the end."""
    state = {}

    def make(guests: dict, flows: list[str]):
        bridge = Bridge("br0", 0)
        dp = Datapath()
        dp.set_bridge(0, bridge.cls, bridge.macs)
        for i, (name, g) in enumerate(guests.items()):
            bridge.attach(SimpleNamespace(name=name, port_id=i, ofport=i + 1))
            dp.add_port(i, 0, g.dev)
        bridge.apply(add=[parse_flow(f) for f in flows])
        pmd = dp.new_pmd(0, pool_size=512)
        thread = threading.Thread(target=pmd.run, daemon=True)
        thread.start()
        pmd.set_rxqs([(i, 0) for i in range(len(guests))])
        state.update(dp=dp, pmd=pmd, thread=thread, guests=guests, bridge=bridge)
        return dp, pmd

    yield make
    if state:
        state["pmd"].stop()
        state["thread"].join(5)
        assert not state["thread"].is_alive()
        for i in range(len(state["guests"])):
            state["dp"].remove_port(i)
        for g in state["guests"].values():
            g.close()


@contextlib.contextmanager
def guests_a_to_b(rules: list[str]):
    """Split guests a and b (no mergeable buffers) as ports 0 and 1 of a bridge with
    ``rules``, a Datapath and a PMD whose thread is made, not started: SimpleNamespace(a,
    b, bridge, dp, pmd, thread). The thread is stopped and the guests closed at the end."""
    a = Guest("split", "split", mrg=False, hdr_len=12)
    b = Guest("split", "split", mrg=False, hdr_len=12)
    bridge = Bridge("br0", 0)
    dp = Datapath()
    dp.set_bridge(0, bridge.cls, bridge.macs)
    for i, (name, g) in enumerate((("a", a), ("b", b))):
        bridge.attach(SimpleNamespace(name=name, port_id=i, ofport=i + 1))
        dp.add_port(i, 0, g.dev)
    bridge.apply(add=[parse_flow(f) for f in rules])
    pmd = dp.new_pmd(0, pool_size=512)
    thread = threading.Thread(target=pmd.run, daemon=True)
    try:
        yield SimpleNamespace(a=a, b=b, bridge=bridge, dp=dp, pmd=pmd, thread=thread)
    finally:
        if thread.is_alive():
            pmd.stop()
            thread.join(5)
            assert not thread.is_alive()
        for i in range(2):
            dp.remove_port(i)
        a.close()
        b.close()


def wait_for(cond, timeout: float = 5.0, pmd=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        if pmd is not None:
            pmd.wake()
        time.sleep(0.01)
    return cond()


def settled(sender: Guest, count: int, pmd) -> bool:
    """Wait for ``count`` of the sender's TX buffers to come back: they go back after the
    burst's sends, so its counters (one-copy frames) are final then, while the frames
    themselves are visible to the receiver a moment before."""
    used: list = []
    return wait_for(lambda: len(used.__iadd__(sender.tx.used())) >= count, pmd=pmd)


def collect(guest: Guest, count: int, pmd, timeout: float = 5.0) -> list[tuple[bytes, bytes]]:
    got: list = []
    wait_for(lambda: len(got.__iadd__(guest.received())) >= count, timeout, pmd)
    return got


SIZES = [64, 129, 1500, 9018]
# header + frame over several descriptors: the header itself split, the copied head
# ending inside a descriptor, a segment boundary right at the head's end
SPLITS = {64: [], 129: [5, 7, 3, 60], 1500: [4, 20, 30], 9018: [140, 3000, 3000]}


def splits_of(data_len: int, size: int) -> list[int]:
    lead = SPLITS.get(size, [])
    return lead + [data_len - sum(lead)]


def send(guest: Guest, frames: list[bytes], indirect: bool, hdr: bytes | None = None):
    for k, f in enumerate(frames):
        splits = splits_of(guest.hdr_len + len(f), len(f))
        if indirect and k % 2:
            guest.tx.post_tx(f, hdr=hdr or vnet_hdr()[:guest.hdr_len], splits=splits,
                             indirect=True)
        else:
            guest.tx.post_tx(f, hdr=hdr or vnet_hdr()[:guest.hdr_len], splits=splits)


@pytest.mark.parametrize("src_layout", ["split", "packed"])
@pytest.mark.parametrize("dst_layout", ["split", "packed"])
@pytest.mark.parametrize("mrg", [False, True], ids=["plain", "mergeable"])
def test_one_output_is_copied_once_and_byte_exact(switch, src_layout, dst_layout, mrg):
    a = Guest(src_layout, src_layout, mrg=False, hdr_len=10 if not mrg else 12)
    b = Guest(dst_layout, dst_layout, mrg=mrg, hdr_len=12 if mrg else 10)
    dp, pmd = switch({"a": a, "b": b}, ["priority=10,in_port=a,actions=output:b"])
    frames = [frame("a", MAC["b"], size, seed) for seed in range(3) for size in SIZES]
    b.post_rx(len(frames))
    send(a, frames, indirect=True)
    pmd.wake()
    got = collect(b, len(frames), pmd)
    assert [f for _, f in got] == frames
    for hdr, _ in got:
        assert hdr[:10] == bytes(10)                # no offloads asked for
    long = sum(1 for f in frames if len(f) > HEAD_COPY)
    assert wait_for(lambda: pmd.stats()["onecopy"] == long, pmd=pmd), pmd.stats()
    used: list = []                 # every TX chain went back to the sender
    assert wait_for(lambda: len(used.__iadd__(a.tx.used())) >= len(frames), pmd=pmd)
    assert len(used) == len(frames) and a.tx_vq.stats()["packets"] == len(frames)
    s = dp.port_stats(0)
    assert s["rx_packets"] == len(frames) and s["rx_bytes"] == sum(map(len, frames))
    t = dp.port_stats(1)
    assert t["tx_packets"] == len(frames) and t["tx_bytes"] == sum(map(len, frames))


@pytest.mark.parametrize("src_layout", ["split", "packed"])
def test_the_sender_gets_every_buffer_back_in_order(switch, src_layout):
    a = Guest(src_layout, "split", mrg=False, hdr_len=12)
    b = Guest("split", "split", mrg=True, hdr_len=12)
    dp, pmd = switch({"a": a, "b": b}, ["priority=10,in_port=a,actions=output:b"])
    frames = [frame("a", MAC["b"], 1500, seed) for seed in range(20)]
    b.post_rx(len(frames))
    ids = []
    for f in frames:
        ids.append(a.tx.post_tx(f, hdr=vnet_hdr(), splits=3))
    pmd.wake()
    used: list = []
    assert wait_for(lambda: len(used.__iadd__(a.tx.used())) >= len(frames), pmd=pmd)
    assert [i for i, _ in used] == ids
    assert [f for _, f in collect(b, len(frames), pmd)] == frames


FALLBACKS = {
    # name: (flows, extra setup(dp, guests), the receivers)
    "flood": (["priority=10,in_port=a,actions=flood"], None, "bc"),
    "two outputs": (["priority=10,in_port=a,actions=output:b,output:c"], None, "bc"),
    "normal to a broadcast": (["priority=0,actions=normal"], None, "bc"),
    "mirror of the input": (
        ["priority=10,in_port=a,actions=output:b"],
        lambda dp: dp.set_mirrors(0, [{"out": 2, "src": [0], "dst": [], "vlan": -1,
                                       "filter": None, "carry": -1}]), "bc"),
    "mirror of the output": (
        ["priority=10,in_port=a,actions=output:b"],
        lambda dp: dp.set_mirrors(0, [{"out": 2, "src": [], "dst": [1], "vlan": -1,
                                       "filter": None, "carry": -1}]), "bc"),
    "shaping": (["priority=10,in_port=a,actions=output:b"],
                lambda dp: dp.set_shape(1, 10 ** 9, 10 ** 8), "b"),
}


@pytest.mark.parametrize("name", sorted(FALLBACKS))
def test_every_other_action_takes_the_pool_path_byte_exact(switch, name):
    flows, setup, receivers = FALLBACKS[name]
    a = Guest("split", "split", mrg=False, hdr_len=12)
    b = Guest("packed", "packed", mrg=True, hdr_len=12)
    c = Guest("split", "split", mrg=False, hdr_len=12)
    dp, pmd = switch({"a": a, "b": b, "c": c}, flows)
    if setup is not None:
        setup(dp)
    dst = b"\xff" * 6 if name == "normal to a broadcast" else MAC["b"]
    frames = [frame("a", dst, size, seed) for seed in range(2) for size in SIZES]
    for g in (b, c):
        g.post_rx(len(frames))
    send(a, frames, indirect=True)
    pmd.wake()
    for r in receivers:
        got = collect({"b": b, "c": c}[r], len(frames), pmd)
        assert [f for _, f in got] == frames, (name, r)
    assert settled(a, len(frames), pmd)
    assert pmd.stats()["onecopy"] == 0


def test_an_input_mirror_that_selects_none_of_the_frames_keeps_them_one_copy(switch):
    """An idle capture (a mirror of the input whose selection takes none of the frames:
    here VLAN 99, the frames are untagged) leaves the frames their one-copy path; a
    mirror that takes them gets them whole."""
    a = Guest("split", "split", mrg=False, hdr_len=12)
    b = Guest("packed", "packed", mrg=True, hdr_len=12)
    c = Guest("split", "split", mrg=False, hdr_len=12)
    dp, pmd = switch({"a": a, "b": b, "c": c}, ["priority=10,in_port=a,actions=output:b"])
    dp.set_mirrors(0, [{"out": 2, "src": [0], "dst": [], "vlan": 99, "filter": None,
                        "carry": -1}])
    frames = [frame("a", MAC["b"], 1500, seed) for seed in range(4)]
    b.post_rx(2 * len(frames))
    c.post_rx(len(frames))
    send(a, frames, indirect=True)
    pmd.wake()
    assert [f for _, f in collect(b, len(frames), pmd)] == frames
    assert settled(a, len(frames), pmd)
    assert pmd.stats()["onecopy"] == len(frames)
    dp.set_mirrors(0, [{"out": 2, "src": [0], "dst": [], "vlan": -1, "filter": None,
                        "carry": -1}])
    send(a, frames, indirect=True)
    pmd.wake()
    assert [f for _, f in collect(b, len(frames), pmd)] == frames
    assert [f for _, f in collect(c, len(frames), pmd)] == frames
    assert settled(a, len(frames), pmd)
    assert pmd.stats()["onecopy"] == len(frames)              # none more: made whole


def udp_csum_frame(size: int) -> tuple[bytes, bytes, bytes]:
    """(frame with the pseudo-header sum in its UDP checksum, its NEEDS_CSUM header, the
    frame with the checksum completed)."""
    f = bytearray(frame("a", MAC["b"], size, 5))
    src, dst = bytes(f[26:30]), bytes(f[30:34])
    udp_len = size - 34
    pseudo = src + dst + bytes([0, 17]) + udp_len.to_bytes(2, "big")

    f[40:42] = csum(pseudo).to_bytes(2, "big")
    partial = bytes(f)
    full = bytearray(f)
    c = (~csum(bytes(full[34:]))) & 0xFFFF
    full[40:42] = (c or 0xFFFF).to_bytes(2, "big")
    hdr = bytes([1, 0, 0, 0, 0, 0, 34, 0, 6, 0, 0, 0])
    return partial, hdr, bytes(full)


@pytest.mark.parametrize("guest_csum", [False, True], ids=["software-csum", "guest-csum"])
def test_a_receiver_without_the_offload_gets_the_checksum_done(switch, guest_csum):
    a = Guest("split", "split", mrg=False, hdr_len=12, ofl_tx=OFFLOAD_BITS["csum"])
    b = Guest("packed", "packed", mrg=True, hdr_len=12,
              ofl_rx=OFFLOAD_BITS["csum"] if guest_csum else 0)
    dp, pmd = switch({"a": a, "b": b}, ["priority=10,in_port=a,actions=output:b"])
    partial, hdr, full = udp_csum_frame(1500)
    b.post_rx(4)
    for _ in range(4):
        a.tx.post_tx(partial, hdr=hdr, splits=[12, 40, 1460])
    pmd.wake()
    got = collect(b, 4, pmd)
    assert settled(a, 4, pmd)
    if guest_csum:                    # passed on as it is: one copy, header kept
        assert [f for _, f in got] == [partial] * 4
        assert all(h[0] == 1 and h[6:10] == hdr[6:10] for h, _ in got)
        assert pmd.stats()["onecopy"] == 4
    else:                             # completed in software on the whole frame
        assert [f for _, f in got] == [full] * 4
        assert pmd.stats()["onecopy"] == 0


def test_a_full_receiver_drops_counted_and_the_sender_gets_its_buffers(switch):
    a = Guest("packed", "split", mrg=False, hdr_len=12)
    b = Guest("split", "split", mrg=False, hdr_len=12)
    dp, pmd = switch({"a": a, "b": b}, ["priority=10,in_port=a,actions=output:b"])
    b.post_rx(3)
    frames = [frame("a", MAC["b"], 1500, seed) for seed in range(10)]
    send(a, frames, indirect=False)
    pmd.wake()
    assert [f for _, f in collect(b, 3, pmd)] == frames[:3]
    assert wait_for(lambda: dp.port_stats(1)["drop_tx_full"] == 7, pmd=pmd), dp.port_stats(1)
    used: list = []
    assert wait_for(lambda: len(used.__iadd__(a.tx.used())) >= 10, pmd=pmd)
    b.post_rx(2)                                     # the ring works on
    more = [frame("a", MAC["b"], 9018, 40 + k) for k in range(2)]
    send(a, more, indirect=True)
    pmd.wake()
    assert [f for _, f in collect(b, 2, pmd)] == more


def test_a_receiver_removed_mid_stream_drops_counted(switch):
    a = Guest("split", "split", mrg=False, hdr_len=12)
    b = Guest("split", "split", mrg=False, hdr_len=12)
    dp, pmd = switch({"a": a, "b": b}, ["priority=10,in_port=a,actions=output:b"])
    b.post_rx(4)
    send(a, [frame("a", MAC["b"], 1500, 1)], indirect=False)
    pmd.wake()
    assert len(collect(b, 1, pmd)) == 1
    with b.rx_vq:
        b.rx_vq.stop()                               # the receiver's ring went away
    send(a, [frame("a", MAC["b"], 1500, k) for k in range(3)], indirect=False)
    pmd.wake()
    used: list = []
    assert wait_for(lambda: len(used.__iadd__(a.tx.used())) >= 4, pmd=pmd)
    assert wait_for(lambda: dp.port_stats(1)["drop_tx_full"] == 3, pmd=pmd), dp.port_stats(1)


# -- a sender whose memory goes away between the receive and the copy -----------------
# (in a child interpreter: without the guards the SIGBUS would kill the test run)

def _sender_with_tail_in_region_1(layout: str):
    """A sender whose frame's head lies in region 0 and tail in region 1 of its image."""
    img = GuestImage((MiB, MiB))
    tx = (DriverRing if layout == "split" else PackedDriverRing)(img, 16)
    vq = tx.make_queue(img.guest_memory(), index=1)
    if layout == "packed":
        with vq:
            vq.set_features(event_idx=False, indirect=True, mrg_rxbuf=False, hdr_len=12,
                            packed=True)
            vq.start()
    f = frame("a", MAC["b"], 1500, 9)
    data = vnet_hdr() + f
    head = img.alloc(300, 8)
    tail = img.boundary(0) + 4096
    img.write(head, data[:300])
    img.write(tail, data[300:])
    if layout == "split":
        tx.publish(tx._chain([(head, 300), (tail, len(data) - 300)], 0, False))
    else:
        tx._post([(head, 300), (tail, len(data) - 300)], False, False)
    return img, vq


def _child_sender_memory_truncated(layout: str) -> None:
    import os

    from pyvhost._pktpool import PacketPool
    pool = PacketPool(8, 65600)
    img, src = _sender_with_tail_in_region_1(layout)
    dimg = GuestImage((MiB,))
    rx = (DriverRing if layout == "split" else PackedDriverRing)(dimg, 16)
    dst = rx.make_queue(dimg.guest_memory(), index=0, mrg_rxbuf=True)
    if layout == "packed":
        with dst:
            dst.set_features(event_idx=False, indirect=True, mrg_rxbuf=True, hdr_len=12,
                             packed=True)
            dst.start()
    for _ in range(4):
        rx.post_rx([2048])
    os.ftruncate(img.regions[1].fd, 0)      # the tail is gone; the ring and head are not
    assert src.forward_burst(pool, dst) == (1, 0)
    assert pool.available == pool.count
    assert src.faults == 1 and src.broken, src.stats()
    assert dst.faults == 0 and not dst.broken, dst.stats()     # not the receiver's fault
    assert rx.used() == []                                     # its buffers stay its own
    assert dst.send_burst(pool, [b"z" * 100]) == 1             # and it works on
    img2, src2 = _sender_with_tail_in_region_1(layout)
    os.ftruncate(img2.regions[1].fd, 0)
    assert src2.recv_burst_ref(pool) == []                     # made whole: the same
    assert src2.faults == 1 and pool.available == pool.count
    print("OK")


@pytest.mark.parametrize("layout", ["split", "packed"])
def test_a_sender_truncating_its_memory_faults_itself_not_the_receiver(layout):
    import subprocess
    import sys
    from pathlib import Path
    proc = subprocess.run(
        [sys.executable, "-c",
         f"import tests.test_onecopy as t; t._child_sender_memory_truncated({layout!r})"],
        cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "OK" in proc.stdout, \
        f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"


def test_frames_held_for_an_iotlb_miss_keep_their_tails():
    """A receiver behind an IOMMU whose buffer is not mapped yet: the frame is held (copied
    whole, tail included: the sender gets its buffer back at once) and delivered once the
    mapping comes."""
    from pyvhost._memory import IotlbTable
    from pyvhost._pktpool import PacketPool
    from tests.harness.driver import F_WRITE
    iova, page = 0x7F00_0000_0000, 4096
    pool = PacketPool(8, 65600)
    with GuestImage((MiB,)) as simg, GuestImage((MiB,)) as dimg:
        tx = DriverRing(simg, 16)
        src = tx.make_queue(simg.guest_memory(), index=1)
        rx = DriverRing(dimg, 16)
        dst = rx.make_queue(dimg.guest_memory(), index=0)
        with dst:
            dst.set_iotlb(IotlbTable())
        f = frame("a", MAC["b"], 1500, 3)
        head_tx = tx.post_tx(f, hdr=vnet_hdr(), splits=3)
        buf = dimg.alloc(2 * page, page)
        (head,) = rx.take(1)
        rx.write_desc(head, iova, 2 * page, F_WRITE)
        rx.publish(head)
        assert src.forward_burst(pool, dst) == (1, 1)         # held: counted as delivered
        assert tx.used() == [(head_tx, 0)] and rx.used() == []
        assert dst.take_miss() == (iova, 2)
        with dst:
            dst.set_iotlb(IotlbTable([(iova, iova + 2 * page - 1, dimg.uva(buf), 3)]))
        assert dst.flush_held() == 0
        ((h, length),) = rx.used()
        assert h == head and dimg.read(buf + 12, length - 12) == f
        assert pool.available == pool.count


def test_only_the_thread_holding_a_burst_by_reference_gives_it_back():
    """A queue moving between PMDs is polled by both for a moment: one PMD's rx_complete
    (after a burst of its own, or none) must not give back and unlock another PMD's burst
    received by reference while that one still reads the tails."""
    from pyvhost._pktpool import PacketPool
    with GuestImage((MiB,)) as img:
        tx = DriverRing(img, 16)
        vq = tx.make_queue(img.guest_memory(), index=1, hdr_len=12)
        rx = DriverRing(img, 16)
        dev = VhostDev([rx.make_queue(img.guest_memory(), index=0, hdr_len=12)], [vq])
        heads = [tx.post_tx(frame("a", MAC["b"], 1500, k), hdr=vnet_hdr()[:12], splits=2)
                 for k in range(3)]
        pools = [PacketPool(8, 4096), PacketPool(8, 4096)]
        got, step = {}, [threading.Event() for _ in range(3)]

        def owner():                       # the PMD whose burst keeps its tails
            got["a"] = dev._test_rx_ref(0, pools[0])
            step[0].set()
            step[1].wait(10)
            dev._test_rx_complete(0)
            step[2].set()

        t = threading.Thread(target=owner)
        t.start()
        try:
            assert step[0].wait(10) and got["a"] == 3
            dev._test_rx_complete(0)           # the other PMD, with no burst of its own
            assert tx.used() == []             # nothing given back under the owner
            assert dev._test_rx_ref(0, pools[1]) == 0     # and the ring still locked
            step[1].set()
            assert step[2].wait(10)
        finally:
            step[1].set()
            t.join(10)
        assert [h for h, _ in tx.used()] == heads
        tx.post_tx(frame("a", MAC["b"], 1500, 9), hdr=vnet_hdr()[:12], splits=2)
        assert dev._test_rx_ref(0, pools[1]) == 1         # unlocked: the next one gets it
        dev._test_rx_complete(0)
        assert len(tx.used()) == 1


@pytest.mark.parametrize("first", ["oversize", "hostile"])
def test_a_frame_dropped_before_an_iotlb_miss_is_not_held_again(first):
    """A burst whose first frame is dropped in the ring (too big for a non-mergeable buffer,
    which stays the guest's; or its buffer is hostile, given back empty), whose second is
    delivered and whose third meets an unmapped buffer: only the third is held (the second
    was held too and delivered twice once the mapping came: the ring said "one delivered",
    taken as "the first one"), and the held one lands once, after the mapping."""
    from pyvhost._memory import IotlbTable
    from pyvhost._pktpool import PacketPool
    from tests.harness.driver import F_WRITE
    iova, page = 0x7F00_0000_0000, 4096
    pool = PacketPool(8, 4096)
    with GuestImage((MiB,)) as dimg:
        rx = DriverRing(dimg, 16)
        dst = rx.make_queue(dimg.guest_memory(), index=0)
        bufs = [dimg.alloc(page, page) for _ in range(3)]
        maps = [(iova + k * page, iova + (k + 1) * page - 1, dimg.uva(bufs[k]), 3)
                for k in range(3)]
        heads = rx.take(3)
        # A (200 B) meets heads[0]: 100 bytes (too small, kept) or device-readable (hostile)
        rx.write_desc(heads[0], iova, 100, F_WRITE if first == "oversize" else 0)
        rx.write_desc(heads[1], iova + page, page, F_WRITE)
        rx.write_desc(heads[2], iova + 2 * page, page, F_WRITE)
        rx.publish(*heads)
        # B lands in the first buffer left, C misses on the one after (not mapped yet)
        b_at, c_at = (0, 1) if first == "oversize" else (1, 2)
        with dst:
            dst.set_iotlb(IotlbTable(maps[:c_at]))
        a, b, c = (frame("a", MAC["b"], 200 if k == 0 else 60, k) for k in range(3))
        assert dst.send_burst(pool, [a, b, c]) == 2              # b, and c held
        assert dst.take_miss() == (iova + c_at * page, 2)
        with dst:
            dst.set_iotlb(IotlbTable(maps))
        assert dst.flush_held() == 0
        used = dict(rx.used())
        assert dimg.read(bufs[b_at] + 12, used[heads[b_at]] - 12) == b
        assert dimg.read(bufs[c_at] + 12, used[heads[c_at]] - 12) == c
        if first == "hostile":
            assert used[heads[0]] == 0                             # given back, empty
        assert len(used) == (2 if first == "oversize" else 3), used
        st = dst.stats()
        assert st["packets"] == 2, st
        assert st["drop_oversize" if first == "oversize" else "drop_bad_desc"] == 1, st
        assert pool.available == pool.count


def test_a_full_receiver_stops_the_send_before_segmenting(switch):
    """A receiver with no RX buffers and no GUEST_TSO, and a burst [frame, TSO frame,
    frame]: the send stops at the full ring; the TSO frame is not cut into segments for
    nothing and not counted as one that could not be segmented (drop_offload), it and the
    last frame are the port's drop_tx_full."""
    from tests.test_offload import tcp_frame, vnet
    a = Guest("split", "split", mrg=False, hdr_len=12,
              ofl_tx=OFFLOAD_BITS["csum"] | OFFLOAD_BITS["tso4"])
    b = Guest("split", "split", mrg=False, hdr_len=12)
    plain = vnet(flags=0) + bytes(2)
    # posted before the PMD starts: its first burst takes all three
    a.tx.post_tx(tcp_frame(b"p" * 1000), hdr=plain)
    a.tx.post_tx(tcp_frame(bytes(4000)), hdr=vnet(gso=1, gso_size=1000, hdr_len=54,
                                                      start=34, offset=16) + bytes(2))
    a.tx.post_tx(tcp_frame(b"q" * 1000), hdr=plain)
    dp, pmd = switch({"a": a, "b": b}, ["priority=10,in_port=a,actions=output:b"])
    assert settled(a, 3, pmd)
    st = dp.port_stats(1)
    assert st["drop_offload"] == 0 and st["drop_tx_full"] == 3 and st["tx_packets"] == 0, st
    assert b.rx_vq.stats()["drop_no_buffer"] == 1, b.rx_vq.stats()   # not 1 + 4 + 1
