"""The compiled driver ring (pyvhost._driver) with the test playing a hostile or a polite
device by writing the used ring directly: ids and lengths out of range are dropped and
counted, a runaway used index breaks the ring, num_buffers is honoured, and kicks follow
used->flags NO_NOTIFY and avail_event (EVENT_IDX)."""

from __future__ import annotations

import ctypes
import os
import struct

import pytest

from pyvhost._driver import DriverQueue
from pyvhost._pktpool import PacketPool
from pyvhost.frontend.memory import FrontendMemory
from pyvhost.frontend.rings import RingMemory

SIZE = 8
BUF = 256


class Device:
    """The device's view of one ring: reads avail, writes used."""

    def __init__(self, ring: RingMemory):
        self.ring = ring

    def avail_idx(self) -> int:
        return ctypes.c_uint16.from_address(self.ring.avail + 2).value

    def avail_entry(self, i: int) -> int:
        return ctypes.c_uint16.from_address(self.ring.avail + 4 + 2 * (i % SIZE)).value

    def used_idx(self) -> int:
        return ctypes.c_uint16.from_address(self.ring.used + 2).value

    def push_used(self, ident: int, length: int) -> None:
        idx = self.used_idx()
        ctypes.memmove(self.ring.used + 4 + 8 * (idx % SIZE), struct.pack("=II", ident, length), 8)
        ctypes.c_uint16.from_address(self.ring.used + 2).value = (idx + 1) & 0xFFFF

    def set_used_idx(self, value: int) -> None:
        ctypes.c_uint16.from_address(self.ring.used + 2).value = value & 0xFFFF

    def write_buffer(self, desc_id: int, data: bytes) -> None:
        ctypes.memmove(self.ring.slots + desc_id * self.ring.slot_size, data, len(data))

    def set_used_flags(self, flags: int) -> None:
        ctypes.c_uint16.from_address(self.ring.used).value = flags

    def set_avail_event(self, value: int) -> None:
        ctypes.c_uint16.from_address(self.ring.used + 4 + 8 * SIZE).value = value


@pytest.fixture
def mem():
    m = FrontendMemory(1 << 20)
    yield m
    m.close()


def make(mem, index: int, *, mrg=True, event_idx=False):
    ring = RingMemory(mem, index, SIZE, BUF)
    q = DriverQueue(index, index % 2 == 0, SIZE, ring.desc, ring.avail, ring.used, ring.slots,
                    ring.slots_gpa, BUF, BUF, mem)
    q.configure(event_idx=event_idx, mrg_rxbuf=mrg, hdr_len=12, kickfd=ring.kickfd,
                callfd=ring.callfd)
    q.reset()
    return ring, q, Device(ring)


def kicked(ring: RingMemory) -> bool:
    try:
        os.eventfd_read(ring.kickfd)
        return True
    except BlockingIOError:
        return False


def hdr(num_buffers: int) -> bytes:
    return bytes(10) + struct.pack("=H", num_buffers)


def test_rx_reassembles_mergeable_buffers(mem):
    ring, q, dev = make(mem, 0)
    pool = PacketPool(16, 2048)
    assert q.post_rx() == SIZE and dev.avail_idx() == SIZE
    ids = [dev.avail_entry(i) for i in range(3)]
    payload = bytes(range(256)) * 2 + b"tail"          # 516 bytes over 3 buffers
    dev.write_buffer(ids[0], hdr(3) + payload[:BUF - 12])
    dev.write_buffer(ids[1], payload[BUF - 12:2 * BUF - 12])
    dev.write_buffer(ids[2], payload[2 * BUF - 12:])
    dev.push_used(ids[0], BUF)
    dev.push_used(ids[1], BUF)
    assert q.recv(pool) == []                           # the third buffer is not there yet
    dev.push_used(ids[2], len(payload) - (2 * BUF - 12))
    assert q.recv(pool) == [payload]
    assert dev.avail_idx() == SIZE + 3                  # the buffers went back to the device
    assert q.stats()["drop_bad_used"] == 0


def test_rx_drops_what_a_hostile_device_writes(mem):
    ring, q, dev = make(mem, 0)
    pool = PacketPool(16, 2048)
    q.post_rx()
    first = dev.avail_entry(0)
    dev.push_used(SIZE + 5, 64)                         # id out of range
    dev.push_used(first, BUF + 1)                       # longer than the buffer
    assert q.recv(pool) == []
    assert q.stats()["drop_bad_used"] == 2
    dev.push_used(first, 64)                            # no longer ours: already returned
    second = dev.avail_entry(1)
    dev.write_buffer(second, hdr(0))                    # num_buffers 0
    dev.push_used(second, 64)
    third = dev.avail_entry(2)
    dev.write_buffer(third, hdr(1) + b"ok" * 30)
    dev.push_used(third, 72)
    assert q.recv(pool) == [b"ok" * 30]                 # a good frame still gets through
    assert q.stats()["drop_bad_used"] == 4
    dev.set_used_idx(dev.used_idx() + SIZE + 1)          # runaway used index
    assert q.recv(pool) == []
    assert q.broken and q.stats()["ring_errors"] == 1


def test_tx_reclaims_only_descriptors_in_flight(mem):
    ring, q, dev = make(mem, 1)
    pool = PacketPool(16, 2048)
    assert q.send(pool, [b"x" * 60] * SIZE) == SIZE
    assert q.send(pool, [b"y" * 60]) == 0 and q.stats()["ring_full"] == 1
    dev.push_used(dev.avail_entry(0), 0)
    dev.push_used(dev.avail_entry(0), 0)                # the same id twice
    dev.push_used(999, 0)
    assert q.reclaim() == 1
    assert q.stats()["drop_bad_used"] == 2
    assert q.send(pool, [b"z" * 60, b"w" * 60]) == 1
    with pytest.raises(ValueError):
        q.send(pool, [b"big" * 100])


def test_kicks_honour_no_notify(mem):
    ring, q, dev = make(mem, 1)
    pool = PacketPool(16, 2048)
    q.send(pool, [b"a" * 60])
    assert kicked(ring)
    dev.set_used_flags(1)                               # VRING_USED_F_NO_NOTIFY
    q.send(pool, [b"b" * 60])
    assert not kicked(ring)
    dev.set_used_flags(0)
    q.send(pool, [b"c" * 60])
    assert kicked(ring)
    assert q.stats()["kicks"] == 2 and q.stats()["kicks_suppressed"] == 1


def test_kicks_honour_avail_event(mem):
    ring, q, dev = make(mem, 1, event_idx=True)
    pool = PacketPool(16, 2048)
    dev.set_avail_event(2)                              # kick when avail passes index 2
    q.send(pool, [b"a" * 60])                           # avail 0 -> 1
    assert not kicked(ring)
    q.send(pool, [b"b" * 60, b"c" * 60])                # 1 -> 3 crosses 2
    assert kicked(ring)
    q.send(pool, [b"d" * 60])                           # 3 -> 4: the device did not ask
    assert not kicked(ring)


def test_interrupts_requested_only_while_waiting(mem):
    from pyvhost import _driver
    ring, q, dev = make(mem, 0, event_idx=True)
    q.post_rx()
    flags = ctypes.c_uint16.from_address(ring.avail)
    assert flags.value == 1                             # NO_INTERRUPT while busy
    assert _driver.wait([q], -1, 20) == 0
    assert flags.value == 1
    used_event = ctypes.c_uint16.from_address(ring.avail + 4 + 2 * SIZE)
    assert used_event.value == 0                        # asked for the next used entry
    os.eventfd_write(ring.callfd, 1)
    assert _driver.wait([q], -1, 1000) == 1
