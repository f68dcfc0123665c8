"""Packed virtqueues, driver side (pyvhost._driver with VIRTIO_F_RING_PACKED): the test plays
the device by reading and writing the descriptor ring and the event-suppression areas in
ring memory; then the whole frontend against pyvhost's own backend in process and against
``pyvhost reflector --mode echo``. Covers wrap counters over many laps, chained buffers,
mergeable RX with num_buffers, IN_ORDER batches, the packed SET_VRING_BASE encoding, event
suppression both ways, and a hostile device (ids out of range or not in flight, lengths
out of range, num_buffers 0 or huge): dropped and counted, never followed."""

from __future__ import annotations

import asyncio
import ctypes
import os
import struct

import pytest

from pyvhost import _driver
from pyvhost._driver import DriverQueue
from pyvhost._pktpool import PacketPool
from pyvhost.backend import NetBackend
from pyvhost.frontend import DEFAULT_FEATURES, BackendGone, VirtioUser
from pyvhost.frontend.memory import FrontendMemory
from pyvhost.frontend.rings import RingMemory
from pyvhost.protocol.constants import Feature as F
from pyvhost.protocol.constants import bit
from tests.test_frontend import backend_recv, frame, port_recv
from tests.test_gen import finish, gen

SIZE = 8
BUF = 256
AVAIL, USED, NEXT, WRITE = 1 << 7, 1 << 15, 1, 2
ENABLE, DISABLE, DESC = 0, 1, 2


class PackedDevice:
    """The device's view of one packed ring: consumes available descriptors in order and
    writes used ones, with its own wrap counters, exactly where a device would."""

    def __init__(self, ring: RingMemory):
        self.ring = ring
        self.avail_idx = self.used_idx = 0
        self.avail_wrap = self.used_wrap = 1

    def desc(self, i: int) -> tuple[int, int, int, int]:
        """(addr, len, id, flags) of ring slot i."""
        return struct.unpack("=QIHH", ctypes.string_at(self.ring.desc + 16 * i, 16))

    def is_avail(self, i: int, wrap: int) -> bool:
        flags = self.desc(i)[3]
        return bool(flags & AVAIL) == wrap and bool(flags & USED) != wrap

    def take(self) -> tuple[int, list[tuple[int, int, int, int]]] | None:
        """The next available chain: (buffer id, its descriptors), or None."""
        if not self.is_avail(self.avail_idx, self.avail_wrap):
            return None
        chain = []
        while True:
            d = self.desc(self.avail_idx)
            chain.append(d)
            self.avail_idx += 1
            if self.avail_idx == SIZE:
                self.avail_idx, self.avail_wrap = 0, self.avail_wrap ^ 1
            if not d[3] & NEXT:
                return d[2], chain

    def put_used(self, ident: int, length: int, nslots: int = 1, wrap: int | None = None):
        """Write a used descriptor at the used index and step over ``nslots`` slots."""
        wrap = self.used_wrap if wrap is None else wrap
        flags = (AVAIL | USED) if wrap else 0
        off = self.ring.desc + 16 * self.used_idx
        ctypes.memmove(off + 8, struct.pack("=IH", length, ident), 6)
        ctypes.c_uint16.from_address(off + 14).value = flags
        self.used_idx += nslots
        if self.used_idx >= SIZE:
            self.used_idx, self.used_wrap = self.used_idx - SIZE, self.used_wrap ^ 1

    def write_buffer(self, addr_host: int, data: bytes) -> None:
        ctypes.memmove(addr_host, data, len(data))

    def host(self, gpa: int) -> int:
        return self.ring.slots + (gpa - self.ring.slots_gpa)

    def set_device_event(self, flags: int, off_wrap: int = 0) -> None:
        ctypes.memmove(self.ring.used, struct.pack("=HH", off_wrap, flags), 4)

    def driver_event(self) -> tuple[int, int]:
        """(off_wrap, flags) the driver wrote."""
        return struct.unpack("=HH", ctypes.string_at(self.ring.avail, 4))


@pytest.fixture
def mem():
    m = FrontendMemory(1 << 20)
    yield m
    m.close()


def make(mem, index: int, *, mrg=True, event_idx=False, in_order=False, chain_seg=0):
    ring = RingMemory(mem, index, SIZE, BUF)
    q = DriverQueue(index, index % 2 == 0, SIZE, ring.desc, ring.avail, ring.used, ring.slots,
                    ring.slots_gpa, BUF, BUF, mem, True)
    q.configure(event_idx=event_idx, mrg_rxbuf=mrg, hdr_len=12, kickfd=ring.kickfd,
                callfd=ring.callfd, in_order=in_order, chain_seg=chain_seg)
    q.reset()
    return ring, q, PackedDevice(ring)


def kicked(ring: RingMemory) -> bool:
    try:
        os.eventfd_read(ring.kickfd)
        return True
    except BlockingIOError:
        return False


def hdr(num_buffers: int) -> bytes:
    return bytes(10) + struct.pack("=H", num_buffers)


# -- the compiled ring with the test as device ---------------------------------------------

def test_fresh_ring_base_and_layout(mem):
    ring, q, dev = make(mem, 1)
    assert q.packed and q.base == 0x80008000          # avail 0 wrap 1, used 0 wrap 1
    assert dev.driver_event() == (0, DISABLE)          # no interrupts while busy
    assert all(dev.desc(i) == (0, 0, 0, 0) for i in range(SIZE))


@pytest.mark.parametrize("chain_seg", [0, 100])
def test_tx_wraps_many_times(mem, chain_seg):
    """Frames through an 8-slot ring, 10 laps: every descriptor's AVAIL/USED bits follow the
    wrap counter, chains carry the id in every descriptor, the frame arrives intact."""
    ring, q, dev = make(mem, 1, chain_seg=chain_seg)
    pool = PacketPool(16, 2048)
    laps = 0
    for n in range(80):
        data = bytes([n]) * (60 + n % 150)
        assert q.send(pool, [data]) == 1
        ident, chain = dev.take()
        assert all(d[2] == ident for d in chain)
        assert len(chain) == (1 if not chain_seg else 1 + -(-len(data) // chain_seg))
        raw = b"".join(ctypes.string_at(dev.host(d[0]), d[1]) for d in chain)
        assert raw == bytes(12) + data
        dev.put_used(ident, 0, len(chain))
        laps += dev.used_idx < len(chain)
        assert q.reclaim() == 1
    assert laps >= 10 and q.free == (SIZE if not chain_seg else SIZE // 4)
    assert q.stats()["drop_bad_used"] == 0
    assert q.base == (dev.avail_idx | dev.avail_wrap << 15 | dev.used_idx << 16
                      | dev.used_wrap << 31)


def test_tx_burst_published_at_once_and_ring_full(mem):
    ring, q, dev = make(mem, 1)
    pool = PacketPool(16, 2048)
    assert q.send(pool, [b"a" * 60] * SIZE) == SIZE
    assert q.send(pool, [b"b" * 60]) == 0 and q.stats()["ring_full"] == 1
    taken = [dev.take()[0] for _ in range(SIZE)]
    assert sorted(taken) == list(range(SIZE)) and dev.take() is None
    for ident in taken:
        dev.put_used(ident, 0)
    assert q.send(pool, [b"c" * 60] * 3) == 3          # reclaimed, posted on the next lap
    assert [dev.take() is not None for _ in range(4)] == [True, True, True, False]


def test_tx_in_order_batch_completes_with_one_descriptor(mem):
    """IN_ORDER: the device returns 4 buffers with one used descriptor (the last id, at the
    first buffer's slot), as DPDK's vhost does; all 4 come back."""
    ring, q, dev = make(mem, 1, in_order=True)
    pool = PacketPool(16, 2048)
    assert q.send(pool, [b"x" * 60] * 6) == 6
    ids = [dev.take()[0] for _ in range(6)]
    dev.put_used(ids[3], 0, nslots=4)
    assert q.reclaim() == 4 and q.free == SIZE - 2
    dev.put_used(ids[5], 0, nslots=2)
    assert q.reclaim() == 2 and q.free == SIZE
    assert q.stats()["drop_bad_used"] == 0


def test_tx_hostile_used_descriptors(mem):
    ring, q, dev = make(mem, 1)
    pool = PacketPool(16, 2048)
    assert q.send(pool, [b"x" * 60] * 4) == 4
    ids = [dev.take()[0] for _ in range(4)]
    dev.put_used(SIZE + 7, 0)                          # id out of range
    dev.put_used(0xFFFF, 0)
    dev.put_used(ids[0], 0)                            # good
    dev.put_used(ids[0], 0)                            # the same id again: not in flight
    assert q.reclaim() == 1
    assert q.stats()["drop_bad_used"] == 3
    dev.put_used(ids[1], 0, wrap=0)                    # the wrong wrap: not used yet
    assert q.reclaim() == 0
    assert q.free == SIZE - 3 and not q.broken
    assert q.send(pool, [b"y" * 60]) == 1              # the ring still works


def test_rx_mergeable_frame_over_three_buffers_across_the_wrap(mem):
    ring, q, dev = make(mem, 0)
    pool = PacketPool(16, 2048)
    assert q.post_rx() == SIZE
    for _ in range(SIZE - 1):                          # move the ring near its end
        ident, chain = dev.take()
        assert chain[0][3] & WRITE
        dev.write_buffer(dev.host(chain[0][0]), hdr(1) + b"s" * 60)
        dev.put_used(ident, 72)
        assert q.recv(pool) == [b"s" * 60]
    payload = bytes(range(256)) * 2 + b"tail"          # 516 bytes over 3 buffers
    parts = [payload[:BUF - 12], payload[BUF - 12:2 * BUF - 12], payload[2 * BUF - 12:]]
    bufs = [dev.take() for _ in range(3)]
    dev.write_buffer(dev.host(bufs[0][1][0][0]), hdr(3) + parts[0])
    dev.write_buffer(dev.host(bufs[1][1][0][0]), parts[1])
    dev.write_buffer(dev.host(bufs[2][1][0][0]), parts[2])
    dev.put_used(bufs[0][0], BUF)
    dev.put_used(bufs[1][0], BUF)
    assert q.recv(pool) == []                          # the third is not used yet
    dev.put_used(bufs[2][0], len(parts[2]))
    assert q.recv(pool) == [payload]
    assert dev.used_wrap == 0 and q.stats()["drop_bad_used"] == 0
    assert q.free == 0                                 # every buffer posted again


def test_rx_chained_buffers_without_mrg(mem):
    ring, q, dev = make(mem, 0, mrg=False, chain_seg=100)
    pool = PacketPool(16, 2048)
    assert q.post_rx() == SIZE // 4                    # 12 + 100 + 100 + 44 bytes: 4 slots
    ident, chain = dev.take()
    assert [d[1] for d in chain] == [12, 100, 100, 44]
    assert all(d[3] & WRITE for d in chain) and [d[3] & NEXT for d in chain] == [1, 1, 1, 0]
    data = bytes(range(200))
    off = 0
    for d in chain:                                    # scatter header + frame over the chain
        piece = (bytes(12) + data)[off:off + d[1]]
        dev.write_buffer(dev.host(d[0]), piece)
        off += d[1]
    dev.put_used(ident, 212, nslots=4)
    assert q.recv(pool) == [data]


def test_rx_hostile_used_descriptors(mem):
    ring, q, dev = make(mem, 0)
    pool = PacketPool(16, 2048)
    q.post_rx()
    bufs = [dev.take() for _ in range(6)]
    dev.put_used(SIZE + 5, 64)                         # id out of range
    dev.put_used(bufs[0][0], BUF + 1)                  # longer than the buffer
    dev.put_used(bufs[0][0], 64)                       # no longer ours
    dev.put_used(bufs[1][0], 4)                        # shorter than the header
    dev.write_buffer(dev.host(bufs[2][1][0][0]), hdr(0))
    dev.put_used(bufs[2][0], 64)                       # num_buffers 0
    dev.write_buffer(dev.host(bufs[3][1][0][0]), hdr(60000))
    dev.put_used(bufs[3][0], 64)                       # num_buffers absurd
    dev.write_buffer(dev.host(bufs[4][1][0][0]), hdr(1) + b"ok" * 30)
    dev.put_used(bufs[4][0], 72)
    assert q.recv(pool) == [b"ok" * 30]                # a good frame still gets through
    assert q.stats()["drop_bad_used"] == 6
    assert not q.broken


def test_rx_in_order_skipped_buffers_are_counted(mem):
    """IN_ORDER RX: a used descriptor for a later buffer returns the earlier ones too (no
    length for them: dropped and counted)."""
    ring, q, dev = make(mem, 0, in_order=True)
    pool = PacketPool(16, 2048)
    q.post_rx()
    bufs = [dev.take() for _ in range(3)]
    dev.write_buffer(dev.host(bufs[2][1][0][0]), hdr(1) + b"z" * 60)
    dev.put_used(bufs[2][0], 72, nslots=3)
    assert q.recv(pool) == []
    assert q.stats()["drop_bad_used"] == 2


def test_kicks_follow_the_device_event_area(mem):
    ring, q, dev = make(mem, 1, event_idx=True)
    pool = PacketPool(16, 2048)
    q.send(pool, [b"a" * 60])
    assert kicked(ring)                                # ENABLE (zeroed area)
    dev.set_device_event(DISABLE)
    q.send(pool, [b"b" * 60])
    assert not kicked(ring)
    dev.set_device_event(DESC, 4 | 1 << 15)            # kick once slot 4 (wrap 1) is avail
    q.send(pool, [b"c" * 60])                          # slot 2
    assert not kicked(ring)
    q.send(pool, [b"d" * 60, b"e" * 60])               # slots 3, 4
    assert kicked(ring)
    for _ in range(5):
        dev.put_used(dev.take()[0], 0)
    q.reclaim()
    dev.set_device_event(DESC, 1 | 0 << 15)            # slot 1 of the next lap (wrap 0)
    q.send(pool, [b"f" * 60] * 3)                      # slots 5, 6, 7 (wrap 1)
    assert not kicked(ring)
    q.send(pool, [b"g" * 60] * 2)                      # slots 0, 1 (wrap 0)
    assert kicked(ring)
    assert q.stats()["kicks"] == 3 and q.stats()["kicks_suppressed"] == 3


@pytest.mark.parametrize("event_idx", [True, False])
def test_interrupts_requested_only_while_waiting(mem, event_idx):
    ring, q, dev = make(mem, 0, event_idx=event_idx)
    q.post_rx()
    assert dev.driver_event() == (0, DISABLE)
    assert _driver.wait([q], -1, 20) == 0
    assert dev.driver_event()[1] == DISABLE            # off again after the wait
    q.set_interrupts(True)
    # DESC names the slot of the next used descriptor, with the used wrap counter
    assert dev.driver_event() == ((1 << 15, DESC) if event_idx else (0, ENABLE))
    q.set_interrupts(False)
    ident, chain = dev.take()
    dev.write_buffer(dev.host(chain[0][0]), hdr(1) + b"w" * 60)
    dev.put_used(ident, 72)
    assert q.pending() == 1
    assert _driver.wait([q], -1, 1000) == 1


def test_chain_that_cannot_fit_the_ring_is_refused(mem):
    ring = RingMemory(mem, 1, SIZE, BUF)
    q = DriverQueue(1, False, SIZE, ring.desc, ring.avail, ring.used, ring.slots,
                    ring.slots_gpa, BUF, BUF, mem, True)
    with pytest.raises(ValueError):
        q.configure(event_idx=False, mrg_rxbuf=False, hdr_len=12, kickfd=-1, callfd=-1,
                    chain_seg=16)                     # 1 + 244/16 = 17 slots > 8


# -- the frontend against pyvhost's backend and the reflector --------------------------------

@pytest.mark.parametrize("mrg", [True, False])
@pytest.mark.parametrize("in_order", [True, False])
@pytest.mark.parametrize("chain_seg", [0, 1024])
def test_packed_both_directions_with_backend(workdir, mrg, in_order, chain_seg):
    features = DEFAULT_FEATURES
    if not mrg:
        features &= ~bit(F.NET_MRG_RXBUF)
    if not in_order:
        features &= ~bit(F.IN_ORDER)
    frames = [frame(64, 1), frame(1500, 2), frame(9000, 3)] * 60   # many laps of 64 slots

    async def main():
        async with NetBackend(str(workdir / "be.sock")) as be:
            port = VirtioUser(workdir / "be.sock", features=features, packed=True,
                              ring_size=64, mem_size=8 << 20, chain_seg=chain_seg)
            await port.aopen()
            try:
                neg = port.negotiated
                assert neg.packed and neg.mrg_rxbuf == mrg and neg.in_order == in_order
                assert port.tx_queue().packed
                for i in range(0, len(frames), 12):
                    assert port.send(frames[i:i + 12]) == 12
                    assert await backend_recv(be, 12) == frames[i:i + 12]
                for f in frames:
                    assert be.send([f]) == 1
                    assert await port_recv(port, 1) == [f]
                st = port.stats()
                assert st["ring0"]["packets"] == st["ring1"]["packets"] == len(frames)
                assert st["ring0"]["drop_bad_used"] == st["ring1"]["drop_bad_used"] == 0
                bases = {i: port.rings[i].queue.base for i in (0, 1)}
            finally:
                await port.aclose()
            # GET_VRING_BASE (packed encoding): TX, the backend consumed all we made
            # available; RX, it filled exactly the buffers we took back
            assert port.last_bases[1] & 0xFFFF == bases[1] & 0xFFFF
            assert port.last_bases[0] & 0xFFFF == bases[0] >> 16
    asyncio.run(asyncio.wait_for(main(), 60))


def test_packed_required_but_not_offered(workdir):
    async def main():
        be = NetBackend(str(workdir / "be.sock"))
        be.device.features_offered &= ~bit(F.RING_PACKED)
        async with be:
            port = VirtioUser(workdir / "be.sock", packed=True, mem_size=8 << 20)
            with pytest.raises(BackendGone, match="RING_PACKED"):
                await port.aopen()
            port.close()
    asyncio.run(asyncio.wait_for(main(), 30))


@pytest.mark.parametrize("size", [64, 1500, 9000])
def test_gen_packed_against_echo_reflector(workdir, reflectors, size):
    sock = workdir / "r.sock"
    reflectors(sock, mode="echo")
    proc = gen(workdir, "--socket", sock, "--mode", "txrx", "--count", 20000, "--size", size,
               "--packed", "--ring-size", 128)
    status, out = finish(proc)
    assert status == 0, out
    assert out["sent"] == 20000 and out["received"] == 20000 and out["lost"] == 0, out
    assert out["reordered"] == 0
    assert "RING_PACKED" in proc.errors()


def test_packed_reconnect_starts_fresh_rings(workdir):
    """disconnect (GET_VRING_BASE, packed encoding) and reconnect: new empty rings, both
    wrap counters 1 again, traffic flows."""
    async def main():
        async with NetBackend(str(workdir / "be.sock")) as be:
            port = VirtioUser(workdir / "be.sock", packed=True, ring_size=64, mem_size=8 << 20)
            await port.aopen()
            try:
                for _ in range(3):
                    for i in range(0, 100, 10):
                        f = [frame(200, i)] * 10
                        assert port.send(f) == 10
                        assert await backend_recv(be, 10) == f
                    assert be.send([frame(300, 7)]) == 1
                    assert await port_recv(port, 1) == [frame(300, 7)]
                    await asyncio.to_thread(port.disconnect)
                    assert port.last_bases[1] == 36 | 36 << 16      # one lap: wraps 0
                    await asyncio.to_thread(port.reconnect)
                    assert port.tx_queue().base == 0x80008000
            finally:
                await port.aclose()
    asyncio.run(asyncio.wait_for(main(), 60))
