"""The one ring core (pyvhost._vring: dequeue_chains, enqueue_chains): split and packed
rings go through the same dequeue and enqueue, so the same event is counted and signalled
the same way on both layouts. Each test here caught a place where the two copies had
drifted apart before they were merged."""

from __future__ import annotations

import os
import struct

import pytest

from pyvhost._pktpool import PacketPool
from tests.harness.driver import (
    F_NEXT,
    PACKED_F_AVAIL,
    PACKED_F_USED,
    DriverRing,
    GuestImage,
    PackedDriverRing,
    vnet_hdr,
)

MiB = 1 << 20
MAC = bytes.fromhex("020000000001")


@pytest.fixture
def image():
    with GuestImage((MiB,)) as img:
        yield img


@pytest.fixture
def callfd():
    fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    yield fd
    os.close(fd)


def frame(n: int, seed: int = 0) -> bytes:
    return bytes((seed + i) & 0xFF for i in range(n))


def ring_of(image, cls, size: int, callfd: int = -1):
    d = cls(image, size)
    return d, d.make_queue(image.guest_memory(), callfd=callfd)


def ring(image, layout: str, callfd: int = -1):
    return ring_of(image, PackedDriverRing if layout == "packed" else DriverRing, 64, callfd)


@pytest.mark.parametrize("layout", ["split", "packed"])
def test_an_empty_ring_is_not_a_burst(image, layout):
    """Packed counted a burst for every poll of an empty ring, split did not: a polling
    PMD's packets-per-burst then meant different things on the two layouts."""
    pool = PacketPool(16, 2048)
    d, vq = ring(image, layout)
    for _ in range(3):
        assert vq.recv_burst(pool) == []
    assert vq.stats()["bursts"] == 0
    d.post_tx(frame(60))
    assert vq.recv_burst(pool) == [frame(60)]
    assert (vq.stats()["bursts"], vq.stats()["packets"]) == (1, 1)


def test_split_used_index_comes_from_the_device_not_guest_memory(image, callfd):
    """A split dequeue that completed nothing compared its used index with the one in guest
    memory (which the guest can write) and, when they differed, published it again and
    signalled the guest; packed (and split enqueue) decided on what the burst itself used.
    Now both layouts notify only for used elements the burst wrote."""
    one = PacketPool(1, 2048)           # the RARP takes the only buffer: the chain stays
    d, vq = ring(image, "split", callfd)
    d.post_tx(frame(60))
    vq.inject_rarp(MAC)
    image.write(d.used_gpa + 2, struct.pack("<H", 5))      # the guest scribbles used->idx
    got = vq.recv_burst(one)
    assert len(got) == 1 and got[0][6:12] == MAC            # the RARP, nothing of the ring
    s = vq.stats()
    assert (s["drop_no_mbuf"], s["packets"], s["calls"]) == (1, 0, 0)
    assert d.used_idx() == 5                                # nothing written: nothing used
    with pytest.raises(BlockingIOError):
        os.eventfd_read(callfd)
    assert vq.recv_burst(PacketPool(4, 2048)) == [frame(60)]
    assert d.used_idx() == 1 and vq.stats()["calls"] == 1   # the real completion is told


@pytest.mark.parametrize("receive", ["plain", "one_copy"])
def test_packed_chain_running_into_slots_not_given_back_breaks_the_ring(receive):
    """A packed chain whose NEXT flags run on, past the ring's end, into the slots this very
    burst took: the driver cannot have posted those again (the device has not given them
    back), so the chain is hostile. The walk read them anyway: the plain receive read our
    own used descriptor there (a bad chain), the one-copy receive, which gives its chains
    back only at vq_rx_complete, read the first frame's buffer again and delivered it twice.
    Now a chain may span only the slots not taken: the ring is broken, the same for both."""
    with GuestImage((MiB,)) as image:
        pool = PacketPool(16, 2048)
        d, vq = ring_of(image, PackedDriverRing, 2)
        buf = image.alloc(64)
        d.write_desc(1, buf, 0, id=1, flags=PACKED_F_AVAIL | F_NEXT)   # runs on into slot 0
        d.post_tx(frame(14))                                          # slot 0, posted last
        got = vq.recv_burst(pool) if receive == "plain" else vq.recv_burst_ref(pool)
        assert got == [frame(14)]
        s = vq.stats()
        assert (s["ring_errors"], s["drop_bad_desc"], s["packets"]) == (1, 0, 1)
        assert vq.broken and pool.available == pool.count


def test_packed_in_order_tx_batch_completes_with_one_used_descriptor(image):
    """VIRTIO_F_IN_ORDER on a packed ring: a burst of TX buffers is given back with one used
    descriptor in the burst's first slot naming its last buffer (the driver steps over the
    rest); without IN_ORDER every buffer gets its own. RX buffers are each written (their
    lengths differ)."""
    pool = PacketPool(16, 2048)
    for in_order in (False, True):
        d, vq = ring(image, "packed")
        with vq:
            vq.set_features(event_idx=False, indirect=True, mrg_rxbuf=False, hdr_len=12,
                            packed=True, in_order=in_order)
        ids = [d.post_tx(frame(60, 0)), d.post_tx(frame(60, 1), splits=[12, 60]),
               d.post_tx(frame(60, 2))]
        assert vq.recv_burst(pool) == [frame(60, k) for k in range(3)]
        assert (vq.base >> 16) & 0x7FFF == 4                 # four slots used either way
        _, _, first_id, first_flags = d.read_desc(0)
        used = {k: bool(d.read_desc(k)[3] & PACKED_F_USED) for k in (0, 1, 3)}
        if in_order:
            assert first_id == ids[2] and used == {0: True, 1: False, 3: False}
        else:
            assert first_id == ids[0] and used == {0: True, 1: True, 3: True}
        d.post_rx()
        d.post_rx()
        assert vq.send_burst(pool, [frame(100), frame(200)]) == 2
        assert [d.read_desc(k)[1] for k in (4, 5)] == [112, 212]     # each with its length


@pytest.mark.parametrize("mrg_rxbuf", [False, True])
def test_split_used_elements_of_a_burst_are_written_in_order(image, mrg_rxbuf):
    """A split burst keeps its used elements aside and writes them together at its end
    (32 at a time, as DPDK's shadow used ring): a burst of 32 frames that each take three
    mergeable buffers gives back 96 elements, more than are kept aside at once. Every one
    must land in its slot, in the order taken, with its length, the used index published
    once, and each frame's header say how many buffers it took."""
    pool = PacketPool(64, 2048)
    d = DriverRing(image, 256)
    vq = d.make_queue(image.guest_memory(), mrg_rxbuf=mrg_rxbuf)
    size = 64 if mrg_rxbuf else 1024
    heads = [d.post_rx((size,)) for _ in range(96 if mrg_rxbuf else 32)]
    frames = [frame(150, k) for k in range(32)]
    assert vq.send_burst(pool, frames) == 32
    used = d.used()
    assert [h for h, _ in used] == heads
    if mrg_rxbuf:       # 12 + 150 bytes: 64, 64 and 34 of three buffers
        assert [n for _, n in used] == [64, 64, 34] * 32
        for k in range(32):
            got = b"".join(d.rx_bytes(h, n) for h, n in used[3 * k:3 * k + 3])
            assert got == bytes(10) + struct.pack("<H", 3) + frames[k]
    else:
        assert [n for _, n in used] == [162] * 32
        for (h, n), f in zip(used, frames, strict=True):
            assert d.rx_bytes(h, n) == bytes(10) + struct.pack("<H", 1) + f
    s = vq.stats()
    assert (s["packets"], s["bursts"]) == (32, 1)


@pytest.mark.parametrize("hdr_len", [10, 12])
def test_rx_header_is_exactly_the_header(image, hdr_len):
    """The RX header is written straight into the guest's buffer (no offload to pass on):
    all its bytes zero but num_buffers (12-byte header), nothing before or after it
    touched, and the frame right behind it; a header split across two buffers the same."""
    pool = PacketPool(16, 2048)
    d = DriverRing(image, 64)
    vq = d.make_queue(image.guest_memory(), hdr_len=hdr_len)
    one = d.post_rx((256,))
    split = d.post_rx((7, 249))
    f = frame(100, 9)
    image.write(d.buffers[one][0][0], bytes(range(1, 256)) + b"\x01")   # no zeros to hide in
    assert vq.send_burst(pool, [f, f]) == 2
    want = (bytes(10) + (struct.pack("<H", 1) if hdr_len == 12 else b"")) + f
    assert d.used() == [(one, len(want)), (split, len(want))]
    assert d.rx_bytes(one, len(want)) == want
    assert d.rx_bytes(split, len(want)) == want
    gpa, length = d.buffers[one][0]
    assert image.read(gpa + len(want), length - len(want)) == \
        bytes(range(1, 256))[len(want):] + b"\x01"


@pytest.mark.parametrize("layout", ["split", "packed"])
@pytest.mark.parametrize("receive", ["plain", "one_copy"])
def test_a_burst_copies_its_chains_together_and_keeps_their_order(image, layout, receive):
    """A dequeue burst copies its one-segment chains together at its end, then checks
    their headers: frames whose header asks for what was not agreed are dropped there and
    the rest keep the guest's order, with chains in several segments and frames long
    enough to keep their tail (one-copy) taken one at a time between them. Every chain is
    given back, every packet not delivered is back in the pool."""
    pool = PacketPool(64, 2048)
    d, vq = ring(image, layout)
    want = []
    for k in range(24):
        f = frame(60 + 40 * k, k)
        if k % 5 == 3:
            d.post_tx(f, hdr=vnet_hdr(flags=1))              # checksum not agreed: dropped
        elif k % 4 == 1:
            d.post_tx(f, splits=[12, 30, len(f) - 30])       # three segments
            want.append(f)
        else:
            d.post_tx(f)
            want.append(f)
    got = vq.recv_burst(pool) if receive == "plain" else vq.recv_burst_ref(pool)
    assert got == want
    s = vq.stats()
    assert (s["packets"], s["drop_bad_hdr"]) == (len(want), 24 - len(want))
    assert len(d.used()) == 24
    assert pool.available == pool.count


@pytest.mark.parametrize("layout", ["split", "packed"])
@pytest.mark.parametrize("receive", ["plain", "one_copy"])
def test_a_fault_in_the_burst_copies_gives_every_packet_back(layout, receive):
    """The guest's memory vanishes under the chains whose copies wait for the burst's end
    (the rings stay mapped): the fault unwinds the burst with every packet taken so far
    back in the pool, our RARP lead, a frame copied at once and the deferred ones alike,
    and a refused header dropped on the way is not given back twice. The hints before the
    burst touch the vanished buffers too: a hint must not fault."""
    with GuestImage((MiB, MiB)) as img:
        pool = PacketPool(16, 2048)
        d, vq = ring_of(img, PackedDriverRing if layout == "packed" else DriverRing, 64)
        vq.inject_rarp(MAC)                                         # a packet of our own
        d.post_tx(frame(100), hdr=vnet_hdr(flags=1), splits=[12, 50, 50])   # refused
        d.post_tx(frame(60), splits=[12, 30, 30])                   # copied at once
        at = img.alloc(16)
        img.alloc(img.boundary(0) - at - 16, 1)                     # the rest: region 1
        for k in range(4):
            d.post_tx(frame(60, k))                                 # copied at the end
        assert img.alloc(16) >= img.boundary(0)
        os.ftruncate(img.regions[1].fd, 0)
        got = vq.recv_burst(pool) if receive == "plain" else vq.recv_burst_ref(pool)
        assert got == []
        assert pool.available == pool.count
        assert vq.faults == 1 and vq.broken


@pytest.mark.parametrize("layout", ["split", "packed"])
def test_a_refused_header_frees_its_packet_for_the_next_chain(image, layout):
    """Two packet buffers for five chains, two of them with a header the device refuses:
    settled one at a time, each refused packet's buffer serves the next chain, so two
    frames are delivered and the fifth chain waits in the ring (no buffer). Copies that
    wait for the burst's end must come out the same: when the pool runs dry they are
    settled first, and the burst goes on."""
    pool = PacketPool(2, 2048)
    d, vq = ring(image, layout)
    refused = vnet_hdr(flags=1)
    d.post_tx(frame(60, 1), hdr=refused)
    d.post_tx(frame(60, 2))
    d.post_tx(frame(60, 3), hdr=refused)
    d.post_tx(frame(60, 4))
    d.post_tx(frame(60, 5))
    assert vq.recv_burst(pool) == [frame(60, 2), frame(60, 4)]
    s = vq.stats()
    assert (s["drop_bad_hdr"], s["drop_no_mbuf"], s["packets"]) == (2, 1, 2)
    assert vq.recv_burst(pool) == [frame(60, 5)]
    assert pool.available == pool.count
