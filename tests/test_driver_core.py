"""The driver side's one ring core (pyvhost/_drv_core.pxd): split and packed rings go
through the same reclaim, refill and receive, so the same device behaviour is counted the
same way on both layouts. Each test here caught a place where the two driver copies had
drifted apart before they were merged; the test plays the device by writing ring memory."""

from __future__ import annotations

import pytest

from pyvhost._driver import DriverQueue
from pyvhost._pktpool import PacketPool
from pyvhost.frontend.memory import FrontendMemory
from pyvhost.frontend.rings import RingMemory
from tests import test_frontend_driver as split_dev
from tests import test_frontend_packed as packed_dev

SIZE = 8
BUF = 256


@pytest.fixture
def mem():
    m = FrontendMemory(1 << 20)
    yield m
    m.close()


class Rx:
    """An RX queue of either layout and a device that completes its buffers by id."""

    def __init__(self, mem, layout: str, *, in_order: bool):
        ring = RingMemory(mem, 0, SIZE, BUF)
        self.q = DriverQueue(0, True, SIZE, ring.desc, ring.avail, ring.used, ring.slots,
                             ring.slots_gpa, BUF, BUF, mem, layout == "packed")
        self.q.configure(event_idx=False, mrg_rxbuf=True, hdr_len=12, kickfd=ring.kickfd,
                         callfd=ring.callfd, in_order=in_order)
        self.q.reset()
        self.q.post_rx()
        self.packed = layout == "packed"
        self.dev = (packed_dev.PackedDevice if self.packed else split_dev.Device)(ring)
        self.addr: dict[int, int] = {}
        self.taken = 0

    def posted(self, n: int) -> list[int]:
        """The ids of the next ``n`` buffers in posting order."""
        ids = []
        for _ in range(n):
            if self.packed:
                ident, chain = self.dev.take()
                self.addr[ident] = chain[0][0]
            else:
                ident = self.dev.avail_entry(self.taken)
            self.taken += 1
            ids.append(ident)
        return ids

    def complete(self, ident: int, data: bytes, nslots: int = 1) -> None:
        if self.packed:
            self.dev.write_buffer(self.dev.host(self.addr[ident]), data)
            self.dev.put_used(ident, len(data), nslots)
        else:
            self.dev.write_buffer(ident, data)
            self.dev.push_used(ident, len(data))


@pytest.mark.parametrize("layout", ["split", "packed"])
def test_in_order_rx_completion_that_skips_buffers_is_counted_on_both_layouts(mem, layout):
    """IN_ORDER: the device uses buffers in the order they were posted, so a completion of
    the third RX buffer means the first two are done too, without lengths. Packed gave
    them back and counted them (drop_bad_used), the frame with them dropped; split took
    the frame and left the two skipped buffers in flight forever (the ring shrank by two
    for good). Both now go by the posting order the same way."""
    rx = Rx(mem, layout, in_order=True)
    pool = PacketPool(16, 2048)
    ids = rx.posted(3)
    rx.complete(ids[2], packed_dev.hdr(1) + b"z" * 60, nslots=3)
    assert rx.q.recv(pool) == []
    s = rx.q.stats()
    assert (s["drop_bad_used"], s["packets"]) == (2, 0)
    assert rx.q.in_flight == SIZE                       # all three posted again
    nxt = rx.posted(1)[0]
    rx.complete(nxt, packed_dev.hdr(1) + b"ok" * 30)
    assert rx.q.recv(pool) == [b"ok" * 30]
    assert rx.q.stats()["drop_bad_used"] == 2


@pytest.mark.parametrize("layout", ["split", "packed"])
def test_in_order_rx_completions_in_order_are_frames(mem, layout):
    rx = Rx(mem, layout, in_order=True)
    pool = PacketPool(16, 2048)
    for k, ident in enumerate(rx.posted(4)):
        rx.complete(ident, packed_dev.hdr(1) + bytes([k]) * 60)
    assert rx.q.recv(pool) == [bytes([k]) * 60 for k in range(4)]
    assert rx.q.stats()["drop_bad_used"] == 0 and rx.q.in_flight == SIZE


@pytest.mark.parametrize("layout", ["split", "packed"])
def test_polling_an_empty_ring_is_not_a_burst(mem, layout):
    """Packed counted a burst (and re-published) for every poll of an empty RX ring,
    split did not, so packets per burst meant different things on the two layouts."""
    rx = Rx(mem, layout, in_order=False)
    pool = PacketPool(16, 2048)
    for _ in range(3):
        assert rx.q.recv(pool) == []
    assert rx.q.stats()["bursts"] == 0
    rx.complete(rx.posted(1)[0], packed_dev.hdr(1) + b"a" * 60)
    assert rx.q.recv(pool) == [b"a" * 60]
    assert (rx.q.stats()["bursts"], rx.q.stats()["packets"]) == (1, 1)
