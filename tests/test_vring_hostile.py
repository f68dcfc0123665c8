"""The compiled split ring (pyvhost._vring) against a Python driver: correct traffic first,
then a hostile guest. Every hostile case must leave the process alive, drop exactly the bad
packet with the right counter, and deliver the good packets of the same burst."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from pyvhost._pktpool import PacketPool
from pyvhost._vring import VirtQueue
from tests.harness.driver import (
    AVAIL_F_NO_INTERRUPT,
    F_INDIRECT,
    F_NEXT,
    F_WRITE,
    USED_F_NO_NOTIFY,
    DriverRing,
    GuestImage,
    vnet_hdr,
)
from tests.harness.fuzzing import Counter, fuzz_settings

MiB = 1 << 20
DROPS = ("drop_bad_desc", "drop_no_buffer", "drop_oversize", "drop_disabled", "drop_no_mbuf")
FUZZ = 150                  # examples of the property fuzzers in make test (scaled by make fuzz)
RING_FUZZ = 250             # ... of the random-ring fuzzers


@pytest.fixture
def image():
    with GuestImage((MiB, MiB)) as img:    # two regions, adjacent in GPA space only
        yield img


@pytest.fixture
def pool():
    return PacketPool(256, 2048)


def frame(n: int, seed: int = 0) -> bytes:
    return bytes((seed + i) & 0xFF for i in range(n))


def delta(after: dict, before: dict) -> dict:
    return {k: after[k] - before[k] for k in after if after[k] != before[k]}


def eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


def calls_seen(fd: int) -> int:
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


def setup_ring(image, size=64, **kw):
    d = DriverRing(image, size)
    vq = d.make_queue(image.guest_memory(), **kw)
    return d, vq


# ======================================================================================
# correct traffic
# ======================================================================================

def test_tx_single_descriptor(image, pool):
    d, vq = setup_ring(image)
    h = d.post_tx(frame(60))
    assert vq.recv_burst(pool) == [frame(60)]
    assert d.used() == [(h, 0)]
    s = vq.stats()
    assert (s["packets"], s["bytes"], s["drop_bad_desc"]) == (1, 60, 0)
    assert vq.base == 1 and d.used_idx() == 1
    assert vq.recv_burst(pool) == []
    assert pool.available == pool.count


@pytest.mark.parametrize("splits", [2, 3, 8, [12, 60], [1, 11, 60], [4, 4, 4, 30, 30],
                                    [5, 7, 1, 59], [12, 0, 60], [72]])
@pytest.mark.parametrize("indirect", [False, True])
def test_tx_chained_and_indirect(image, pool, splits, indirect):
    d, vq = setup_ring(image)
    heads = [d.post_tx(frame(60, k), splits=splits, indirect=indirect) for k in range(3)]
    assert vq.recv_burst(pool) == [frame(60, k) for k in range(3)]
    assert d.used() == [(h, 0) for h in heads]
    assert vq.stats()["drop_bad_desc"] == 0


def test_tx_header_fields_and_empty_frame(image, pool):
    d, vq = setup_ring(image)
    d.post_tx(b"", hdr=vnet_hdr(flags=2))              # a header alone: an empty frame
    d.post_tx(frame(1500), splits=[6, 6, 1500])
    assert vq.recv_burst(pool) == [b"", frame(1500)]


@pytest.mark.parametrize("hdr", [vnet_hdr(flags=1), vnet_hdr(gso_type=1), vnet_hdr(gso_type=3)],
                         ids=["csum_not_agreed", "tso_not_agreed", "ufo"])
def test_tx_header_asking_for_offloads_not_agreed_is_dropped(image, pool, hdr):
    d, vq = setup_ring(image)
    d.post_tx(frame(100), hdr=hdr)
    d.post_tx(frame(60))
    assert vq.recv_burst(pool) == [frame(60)]
    assert vq.stats()["drop_bad_hdr"] == 1


def test_tx_legacy_10_byte_header(image, pool):
    d, vq = setup_ring(image, hdr_len=10)
    d.post_tx(frame(50), hdr=bytes(10), splits=[3, 57])
    assert vq.recv_burst(pool) == [frame(50)]


def test_tx_burst_limit_and_index_wrap(image, pool):
    """Free-running indexes wrap at 2^16; a burst returns at most 32 frames."""
    d = DriverRing(image, 64)
    start = 0xFFF0
    d.set_avail_idx(start)
    image.write(d.used_gpa + 2, struct.pack("<H", start))
    d.last_used = start
    vq = d.make_queue(image.guest_memory(), base=start)
    got = []
    for rnd in range(4):
        for k in range(40):
            d.post_tx(frame(64, rnd * 40 + k))
        while len(got) < 40 * (rnd + 1):
            burst = vq.recv_burst(pool, 64)
            assert 0 < len(burst) <= 32
            got += burst
        d.used()
    assert got == [frame(64, k) for k in range(160)]
    assert vq.base == (start + 160) & 0xFFFF


def test_tx_buffer_crossing_region_boundary(image, pool):
    d, vq = setup_ring(image)
    b = image.boundary(0)
    layouts = [
        dict(addrs=[b - 100]),                               # header + 88 bytes | 112 bytes
        dict(splits=[12, 200], addrs=[b - 6, b - 500]),      # the header crosses
        dict(splits=[12, 200], addrs=[b - 500, b - 50]),     # the data crosses
        dict(splits=[100, 112], addrs=[b - 300, b - 3]),
        dict(splits=2, indirect=True, addrs=[b - 20, b - 300]),
    ]
    for k, kw in enumerate(layouts):                         # one at a time: same bytes
        d.post_tx(frame(200, k), **kw)
        assert vq.recv_burst(pool) == [frame(200, k)]
    assert vq.stats()["drop_bad_desc"] == 0


def test_tx_buffer_at_the_very_end_of_memory(image, pool):
    d, vq = setup_ring(image)
    d.post_tx(frame(52), addrs=[image.end - 64])
    assert vq.recv_burst(pool) == [frame(52)]


def test_rx_non_mergeable(image, pool):
    d, vq = setup_ring(image)
    heads = [d.post_rx([2048]) for _ in range(3)]
    assert vq.send_burst(pool, [frame(60, 1), frame(1514, 2)]) == 2
    used = d.used()
    assert used == [(heads[0], 72), (heads[1], 1526)]
    assert d.rx_bytes(*used[0]) == vnet_hdr(num_buffers=1) + frame(60, 1)
    assert d.rx_bytes(*used[1]) == vnet_hdr(num_buffers=1) + frame(1514, 2)
    s = vq.stats()
    assert (s["packets"], s["bytes"]) == (2, 1574)


def test_rx_chained_and_indirect_buffers(image, pool):
    d, vq = setup_ring(image)
    h1 = d.post_rx([10, 20, 2000])                  # header split over two descriptors
    h2 = d.post_rx([6, 6, 100, 1000], indirect=True)
    assert vq.send_burst(pool, [frame(500, 3), frame(600, 4)]) == 2
    used = d.used()
    assert used == [(h1, 512), (h2, 612)]
    assert d.rx_bytes(*used[0]) == vnet_hdr(num_buffers=1) + frame(500, 3)
    assert d.rx_bytes(*used[1]) == vnet_hdr(num_buffers=1) + frame(600, 4)


def test_rx_legacy_header_has_no_num_buffers(image, pool):
    d, vq = setup_ring(image, hdr_len=10)
    h = d.post_rx([256])
    assert vq.send_burst(pool, [frame(100)]) == 1
    assert d.used() == [(h, 110)]
    assert d.rx_bytes(h, 110) == bytes(10) + frame(100)


def test_rx_non_mergeable_buffer_too_small(image, pool):
    """A frame that does not fit is dropped; the buffer stays for the next frame."""
    d, vq = setup_ring(image)
    h = d.post_rx([128])
    assert vq.send_burst(pool, [frame(500), frame(100)]) == 1
    assert d.used() == [(h, 112)]
    assert vq.stats()["drop_oversize"] == 1


@pytest.mark.parametrize("bufsize", [64, 256, 1000])
def test_rx_mergeable_spanning_buffers(image, pool, bufsize):
    d, vq = setup_ring(image, mrg_rxbuf=True)
    heads = [d.post_rx([bufsize]) for _ in range(40)]
    frames = [frame(1500, 7), frame(30, 8), frame(bufsize - 12, 9), frame(bufsize - 11, 10)]
    assert vq.send_burst(pool, frames) == 4
    used = d.used()
    pos = 0
    for f in frames:
        need = 12 + len(f)
        nbufs = -(-need // bufsize)
        mine = used[pos:pos + nbufs]
        assert [h for h, _ in mine] == heads[pos:pos + nbufs]
        assert [n for _, n in mine] == [bufsize] * (nbufs - 1) + [need - bufsize * (nbufs - 1)]
        data = b"".join(d.rx_bytes(h, n) for h, n in mine)
        assert data == vnet_hdr(num_buffers=nbufs) + f
        pos += nbufs
    assert pos == len(used)


def test_rx_mergeable_out_of_buffers(image, pool):
    d, vq = setup_ring(image, mrg_rxbuf=True)
    for _ in range(3):
        d.post_rx([512])
    # 1000 bytes need 2 buffers; the second frame finds only one left
    assert vq.send_burst(pool, [frame(1000), frame(1000), frame(10)]) == 1
    assert len(d.used()) == 2
    assert vq.stats()["drop_no_buffer"] == 2
    assert vq.base == 2                       # the third buffer is still the guest's


def test_rx_no_buffers(image, pool):
    d, vq = setup_ring(image)
    d.post_rx([2048])
    d.post_rx([2048])
    assert vq.send_burst(pool, [frame(60, k) for k in range(5)]) == 2
    assert vq.stats()["drop_no_buffer"] == 3
    assert vq.send_burst(pool, [frame(60)]) == 0
    assert vq.stats()["drop_no_buffer"] == 4


def test_rx_buffer_crossing_region_boundary(image, pool):
    d, vq = setup_ring(image)
    b = image.boundary(0)
    h1 = d.post_rx([300], addrs=[b - 150])
    assert vq.send_burst(pool, [frame(280)]) == 1
    assert d.used() == [(h1, 292)]
    assert image.read(b - 150, 292) == vnet_hdr(num_buffers=1) + frame(280)
    h2 = d.post_rx([5, 400], addrs=[b - 600, b - 3])         # the header crosses too
    assert vq.send_burst(pool, [frame(390)]) == 1
    assert d.used() == [(h2, 402)]
    assert d.rx_bytes(h2, 402) == vnet_hdr(num_buffers=1) + frame(390)


def test_rx_buffer_exactly_to_end_of_memory(image, pool):
    d, vq = setup_ring(image)
    h = d.post_rx([112], addrs=[image.end - 112])
    assert vq.send_burst(pool, [frame(100)]) == 1
    assert d.used() == [(h, 112)]
    assert image.read(image.end - 100, 100) == frame(100)


def test_send_burst_more_than_a_burst(image, pool):
    d, vq = setup_ring(image, size=128)
    for _ in range(100):
        d.post_rx([128])
    assert vq.send_burst(pool, [frame(60, k) for k in range(90)]) == 90
    used = d.used()
    assert len(used) == 90
    assert d.rx_bytes(*used[77])[12:] == frame(60, 77)


def test_send_burst_keeps_going_after_a_dropped_frame(image, pool):
    """A frame dropped inside the first batch of 32 must not cost the later batches."""
    d, vq = setup_ring(image, size=64)
    for _ in range(50):
        d.post_rx([128])
    frames = [frame(500 if k == 5 else 60, k) for k in range(45)]   # #5 fits no buffer
    assert vq.send_burst(pool, frames) == 44
    s = vq.stats()
    assert (s["packets"], s["drop_oversize"], s["drop_no_buffer"]) == (44, 1, 0)
    assert [d.rx_bytes(*u)[12:] for u in d.used()] == [f for f in frames if len(f) == 60]


def test_send_burst_oversize_frame_for_the_pool(image):
    small = PacketPool(16, 128)
    d, vq = setup_ring(image)
    d.post_rx([2048])
    d.post_rx([2048])
    assert vq.send_burst(small, [frame(129), frame(128)]) == 1
    assert vq.stats()["drop_oversize"] == 1


def test_send_burst_bad_frame_type_keeps_the_pool(image, pool):
    d, vq = setup_ring(image)
    for _ in range(4):
        d.post_rx([256])
    for bad in ("text", 42, None):
        with pytest.raises(TypeError):
            vq.send_burst(pool, [frame(60), frame(61), bad])
        assert pool.available == pool.count
    assert vq.send_burst(pool, [bytearray(frame(60)), memoryview(frame(61))]) == 2


@pytest.mark.parametrize("size", [1, 2, 32768])
def test_ring_size_extremes(pool, size):
    with GuestImage((MiB, MiB)) as img:
        d, vq = setup_ring(img, size=size)
        for rnd in range(3):
            d.post_tx(frame(60, rnd))
            assert vq.recv_burst(pool) == [frame(60, rnd)]
            d.used()
        h = d.post_rx([128])
        assert vq.send_burst(pool, [frame(60), frame(60)]) == 1
        assert d.used() == [(h, 72)]
        assert vq.stats()["drop_no_buffer"] == 1


def test_tx_oversize_frame_for_the_pool(image):
    small = PacketPool(16, 128)
    d, vq = setup_ring(image)
    d.post_tx(frame(60, 1))
    h = d.post_tx(frame(129))
    d.post_tx(frame(128, 2))
    assert vq.recv_burst(small) == [frame(60, 1), frame(128, 2)]
    assert vq.stats()["drop_oversize"] == 1
    assert (h, 0) in d.used()


def test_tx_pool_exhausted_leaves_packets_in_the_ring(image):
    tiny = PacketPool(2, 2048)
    d, vq = setup_ring(image)
    for k in range(5):
        d.post_tx(frame(60, k))
    got = []
    for _ in range(3):
        got += vq.recv_burst(tiny)
    assert got == [frame(60, k) for k in range(5)]   # nothing lost: retried next burst
    s = vq.stats()
    assert s["drop_no_mbuf"] == 2 and s["packets"] == 5


# -- notifications ---------------------------------------------------------------------

def test_notify_no_interrupt_flag(image, pool):
    fd = eventfd()
    try:
        d, vq = setup_ring(image, callfd=fd)
        d.post_tx(frame(60))
        vq.recv_burst(pool)
        assert calls_seen(fd) == 1
        d.set_avail_flags(AVAIL_F_NO_INTERRUPT)
        for _ in range(3):
            d.post_tx(frame(60))
            assert vq.recv_burst(pool)
        assert calls_seen(fd) == 0
        d.set_avail_flags(0)
        d.post_tx(frame(60))
        vq.recv_burst(pool)
        assert calls_seen(fd) == 1
        assert vq.recv_burst(pool) == []            # nothing used: no call
        assert calls_seen(fd) == 0
        assert vq.stats()["calls"] == 2
    finally:
        os.close(fd)


def test_notify_event_idx_tx(image, pool):
    fd = eventfd()
    try:
        d, vq = setup_ring(image, event_idx=True, callfd=fd)
        d.set_avail_flags(AVAIL_F_NO_INTERRUPT)      # ignored under EVENT_IDX
        d.post_tx(frame(60))
        vq.recv_burst(pool)
        assert calls_seen(fd) == 1                   # first use after start always signals
        d.set_used_event(3)                          # "call me when used idx passes 3"
        fired = []
        for _ in range(5):
            d.post_tx(frame(60))
            vq.recv_burst(pool)
            fired.append(calls_seen(fd))
        # used idx goes 2, 3, 4, 5, 6: only the step 3 -> 4 crosses used_event
        assert fired == [0, 0, 1, 0, 0]
        d.set_used_event(d.used_idx())               # the driver re-arms at the current idx
        for _ in range(3):
            d.post_tx(frame(60))
        vq.recv_burst(pool)                          # one burst, one call
        assert calls_seen(fd) == 1
        assert vq.stats()["calls"] == 3
    finally:
        os.close(fd)


def test_notify_event_idx_rx(image, pool):
    fd = eventfd()
    try:
        d, vq = setup_ring(image, event_idx=True, callfd=fd)
        for _ in range(8):
            d.post_rx([256])
        d.set_used_event(0xFFFF)                     # far away: only the first call fires
        for _ in range(4):
            assert vq.send_burst(pool, [frame(60)]) == 1
        assert calls_seen(fd) == 1
        d.set_used_event(4)
        assert vq.send_burst(pool, [frame(60), frame(60)]) == 2   # used 4 -> 6 crosses 4
        assert calls_seen(fd) == 1
    finally:
        os.close(fd)


def test_set_notify_writes_suppression(image):
    d, vq = setup_ring(image)
    vq.set_notify(False)
    assert d.used_flags() == USED_F_NO_NOTIFY
    vq.set_notify(True)
    assert d.used_flags() == 0
    d2, vq2 = setup_ring(image, event_idx=True)
    d2.post_tx(frame(60))
    d2.post_tx(frame(60))
    assert vq2.pending()
    vq2.recv_burst(PacketPool(8, 2048))
    assert not vq2.pending()
    vq2.set_notify(True)
    assert d2.avail_event() == 2


# ======================================================================================
# hostile guests
# ======================================================================================
#
# Each builder writes one bad chain (flags | w, w = F_WRITE for an RX buffer, 0 for TX)
# and returns its head. The chain is published between two good packets.

def _loop2(length):
    def build(d, img, w):
        a, b = d.take(2)
        buf = img.alloc(64)
        d.write_desc(a, buf, length, w | F_NEXT, b)
        d.write_desc(b, buf, length, w | F_NEXT, a)
        return a
    return build


def _self_loop(length):
    def build(d, img, w):
        (a,) = d.take(1)
        d.write_desc(a, img.alloc(64), length, w | F_NEXT, a)
        return a
    return build


def _longer_than_ring(d, img, w):
    """Most free descriptors in one chain, the last pointing back to the first (zero
    lengths, so that only the descriptor count can stop the walk)."""
    idx = d.take(len(d.free) - 8)
    buf = img.alloc(64)
    for k, i in enumerate(idx):
        d.write_desc(i, buf, 0, w | F_NEXT, idx[(k + 1) % len(idx)])
    return idx[0]


def _indirect(d, img, w, entries, *, length=None, flags=F_INDIRECT, table=None):
    table = img.alloc(16 * max(len(entries), 1)) if table is None else table
    for k, e in enumerate(entries):
        img.write(table + 16 * k, struct.pack("<QIHH", *e))
    (h,) = d.take(1)
    d.write_desc(h, table, 16 * len(entries) if length is None else length, flags)
    return h


def _indirect_loop(d, img, w):
    buf = img.alloc(64)
    return _indirect(d, img, w, [(buf, 0, w | F_NEXT, (k + 1) % 8) for k in range(8)])


def _indirect_in_indirect(d, img, w):
    buf = img.alloc(128)
    inner = img.alloc(16)
    img.write(inner, struct.pack("<QIHH", buf, 128, w, 0))
    return _indirect(d, img, w, [(inner, 16, F_INDIRECT, 0)])


def _indirect_in_indirect_chained(d, img, w):
    buf = img.alloc(128)
    inner = img.alloc(16)
    img.write(inner, struct.pack("<QIHH", buf, 128, w, 0))
    return _indirect(d, img, w, [(buf, 64, w | F_NEXT, 1), (inner, 16, F_INDIRECT, 0)])


def _indirect_with_next(d, img, w):
    buf = img.alloc(128)
    h = _indirect(d, img, w, [(buf, 128, w, 0)], flags=F_INDIRECT | F_NEXT)
    (n,) = d.take(1)
    d.write_desc(n, buf, 64, w)
    img.write(d.desc_gpa + 16 * h + 14, struct.pack("<H", n))
    return h


def _indirect_len(length):
    def build(d, img, w):
        buf = img.alloc(128)
        return _indirect(d, img, w, [(buf, 128, w, 0), (buf, 0, w, 0)], length=length)
    build.__name__ = f"_indirect_len_{length:#x}"
    return build


def _indirect_table_at(where):
    def build(d, img, w):
        (h,) = d.take(1)
        d.write_desc(h, where(img), 64, F_INDIRECT)
        return h
    build.__name__ = "_indirect_table_bad_addr"
    return build


def _indirect_next_out_of_table(d, img, w):
    buf = img.alloc(128)
    return _indirect(d, img, w, [(buf, 64, w | F_NEXT, 2), (buf, 64, w, 0)])


def _single(addr_of, length, extra_flags=0):
    def build(d, img, w):
        (h,) = d.take(1)
        d.write_desc(h, addr_of(img), length, w | extra_flags)
        return h
    return build


def _next_index(nxt):
    def build(d, img, w):
        (h,) = d.take(1)
        d.write_desc(h, img.alloc(64), 64, w | F_NEXT, nxt(d))
        return h
    return build


def _huge_pair(d, img, w):
    a, b = d.take(2)
    buf = img.alloc(64)
    d.write_desc(a, buf, 0xFFFFFFF0, w | F_NEXT, b)
    d.write_desc(b, buf, 0xFFFFFFF0, w)
    return a


def _wrong_direction(position):
    def build(d, img, w):
        idx = d.take(3)
        for k, i in enumerate(idx):
            flags = w ^ F_WRITE if k == position else w
            d.write_desc(i, img.alloc(64), 64, flags | (F_NEXT if k < 2 else 0),
                         idx[k + 1] if k < 2 else 0)
        return idx[0]
    return build


def _too_many_segments(d, img, w):
    idx = d.take(65)
    buf = img.alloc(65 * 32)
    for k, i in enumerate(idx):
        d.write_desc(i, buf + 32 * k, 32, w | (F_NEXT if k < 64 else 0),
                     idx[k + 1] if k < 64 else 0)
    return idx[0]


HOSTILE = {
    "loop": _loop2(64),
    "loop_zero_len": _loop2(0),
    "self_loop": _self_loop(64),
    "self_loop_zero_len": _self_loop(0),
    "chain_longer_than_ring": _longer_than_ring,
    "indirect_loop": _indirect_loop,
    "indirect_in_indirect": _indirect_in_indirect,
    "indirect_in_indirect_after_data": _indirect_in_indirect_chained,
    "indirect_with_next": _indirect_with_next,
    "indirect_len_0": _indirect_len(0),
    "indirect_len_15": _indirect_len(15),
    "indirect_len_17": _indirect_len(17),
    "indirect_len_24": _indirect_len(24),
    "indirect_len_huge": _indirect_len(0x80010),
    "indirect_len_2^32-16": _indirect_len(0xFFFFFFF0),
    "indirect_table_unmapped": _indirect_table_at(lambda img: 0x1000),
    "indirect_table_past_end": _indirect_table_at(lambda img: img.end - 32),
    "indirect_table_overflow": _indirect_table_at(lambda img: (1 << 64) - 32),
    "indirect_next_out_of_table": _indirect_next_out_of_table,
    "addr_zero": _single(lambda img: 0, 64),
    "addr_below_memory": _single(lambda img: img.start - 16, 64),
    "addr_at_end": _single(lambda img: img.end, 64),
    "addr_far": _single(lambda img: 1 << 63, 64),
    "straddles_end": _single(lambda img: img.end - 8, 64),
    "straddles_start": _single(lambda img: img.start - 8, 64),
    "len_2^32-1": _single(lambda img: img.start, 0xFFFFFFFF),
    "len_2^32-1_end": _single(lambda img: img.end - 1, 0xFFFFFFFF),
    "len_over_max_chain": _single(lambda img: img.start, (1 << 24) + 1),
    "len_sum_over_2^32": _huge_pair,
    "addr_len_overflow_2^64": _single(lambda img: (1 << 64) - 16, 64),
    "addr_max": _single(lambda img: (1 << 64) - 1, 1),
    "next_eq_size": _next_index(lambda d: d.size),
    "next_0xffff": _next_index(lambda d: 0xFFFF),
    "wrong_direction_first": _wrong_direction(0),
    "wrong_direction_middle": _wrong_direction(1),
    "wrong_direction_last": _wrong_direction(2),
    "too_many_segments": _too_many_segments,
}


@pytest.mark.parametrize("indirect", [False, True], ids=["direct", "indirect_good"])
@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_tx_chain(image, pool, name, indirect):
    d, vq = setup_ring(image, size=256)
    before = vq.stats()
    g1 = d.post_tx(frame(60, 1), splits=2, indirect=indirect)
    bad = HOSTILE[name](d, image, 0)
    d.publish(bad)
    g2 = d.post_tx(frame(70, 2), splits=3, indirect=indirect)
    assert vq.recv_burst(pool) == [frame(60, 1), frame(70, 2)]
    assert delta(vq.stats(), before) == {"packets": 2, "bytes": 130, "bursts": 1,
                                         "drop_bad_desc": 1}
    assert d.used() == [(g1, 0), (bad, 0), (g2, 0)]
    assert not vq.broken
    d.post_tx(frame(80, 3))
    assert vq.recv_burst(pool) == [frame(80, 3)]


@pytest.mark.parametrize("mrg", [False, True], ids=["plain", "mergeable"])
@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_rx_chain(image, pool, name, mrg):
    d, vq = setup_ring(image, size=256, mrg_rxbuf=mrg)
    before = vq.stats()
    g1 = d.post_rx([2048])
    bad = HOSTILE[name](d, image, F_WRITE)
    d.publish(bad)
    g2 = d.post_rx([1024, 1024])
    assert vq.send_burst(pool, [frame(60, 1), frame(61, 2), frame(62, 3)]) == 2
    assert delta(vq.stats(), before) == {"packets": 2, "bytes": 122, "bursts": 1,
                                         "drop_bad_desc": 1}
    assert d.used() == [(g1, 72), (bad, 0), (g2, 74)]
    assert d.rx_bytes(g1, 72)[12:] == frame(60, 1)
    assert d.rx_bytes(g2, 74)[12:] == frame(62, 3)
    assert not vq.broken


def test_hostile_tx_header_shorter_than_vnet_header(image, pool):
    d, vq = setup_ring(image)
    d.post_tx(frame(60, 1))
    (h,) = d.take(1)
    d.write_desc(h, image.alloc(16), 11)
    d.publish(h)
    (z,) = d.take(1)
    d.write_desc(z, image.alloc(16), 0)                    # zero length
    d.publish(z)
    d.post_tx(frame(60, 2))
    assert vq.recv_burst(pool) == [frame(60, 1), frame(60, 2)]
    assert vq.stats()["drop_bad_desc"] == 2


def test_zero_length_descriptors_inside_chain_are_harmless(image, pool):
    d, vq = setup_ring(image)
    d.post_tx(frame(60), splits=[0, 12, 0, 60, 0])
    assert vq.recv_burst(pool) == [frame(60)]
    rd, rx = setup_ring(image)
    h = rd.post_rx([0, 100, 0])
    assert rx.send_burst(pool, [frame(60)]) == 1
    assert rd.used() == [(h, 72)]
    assert rd.rx_bytes(h, 72)[12:] == frame(60)


def test_hostile_indirect_not_negotiated(image, pool):
    d, vq = setup_ring(image, indirect=False)
    d.post_tx(frame(60, 1))
    d.post_tx(frame(60, 2), indirect=True, splits=2)
    d.post_tx(frame(60, 3))
    assert vq.recv_burst(pool) == [frame(60, 1), frame(60, 3)]
    assert vq.stats()["drop_bad_desc"] == 1


def test_indirect_table_crossing_regions_is_dropped(image, pool):
    """Known limit: an indirect table must lie in one region (DPDK copies one that does
    not); one that crosses is dropped and counted, never read past the region."""
    d, vq = setup_ring(image)
    b = image.boundary(0)
    d.post_tx(frame(60, 1), splits=2, indirect=True, addrs=[image.alloc(64), image.alloc(64)])
    bad = _indirect(d, image, 0, [(image.alloc(64), 72, 0, 0), (0, 0, 0, 0)], table=b - 16)
    d.publish(bad)
    d.post_tx(frame(60, 2))
    assert vq.recv_burst(pool) == [frame(60, 1), frame(60, 2)]
    assert vq.stats()["drop_bad_desc"] == 1


def test_hostile_head_index_out_of_range_breaks_the_ring(image, pool):
    d, vq = setup_ring(image, size=64)
    d.post_tx(frame(60, 1))
    d.publish(64)                         # head == size
    good = d.add_tx(frame(60, 2))
    d.publish(good)
    assert vq.recv_burst(pool) == [frame(60, 1)]
    assert vq.broken
    assert vq.stats()["ring_errors"] == 1
    assert d.used_idx() == 1              # what was done before is published
    assert vq.recv_burst(pool) == []
    assert not vq.pending()
    # the driver repairs its ring, the device restarts it (as after SET_VRING_ADDR/KICK)
    d.set_avail_entry(1, good)
    d.set_avail_idx(2)
    with vq:
        vq.start()
    assert not vq.broken
    assert vq.recv_burst(pool) == [frame(60, 2)]


@pytest.mark.parametrize("head", [64, 0x8000, 0xFFFF])
def test_hostile_head_index_out_of_range_rx(image, pool, head):
    d, vq = setup_ring(image, size=64)
    d.post_rx([256])
    d.publish(head)
    d.post_rx([256])
    assert vq.send_burst(pool, [frame(60, 1), frame(60, 2), frame(60, 3)]) == 1
    assert vq.broken
    s = vq.stats()
    assert s["ring_errors"] == 1
    assert s["packets"] + s["drop_bad_desc"] + s["drop_no_buffer"] + s["drop_oversize"] == 3
    assert vq.send_burst(pool, [frame(60)]) == 0


@pytest.mark.parametrize("ahead", [65, 100, 0x8000, 0xFFFF])
def test_hostile_avail_idx_too_far_ahead(image, pool, ahead):
    d, vq = setup_ring(image, size=64)
    d.post_tx(frame(60))
    d.set_avail_idx(vq.base + ahead)
    assert vq.recv_burst(pool) == []
    assert vq.broken and vq.stats()["ring_errors"] == 1
    assert vq.stats()["packets"] == 0
    assert d.used_idx() == 0
    d2, rx = setup_ring(image, size=64)
    d2.post_rx([256])
    d2.set_avail_idx(rx.base + ahead)
    assert rx.send_burst(pool, [frame(60)]) == 0
    assert rx.broken and rx.stats()["ring_errors"] == 1
    assert d2.used_idx() == 0


def test_avail_idx_exactly_a_full_ring_is_fine(image, pool):
    d, vq = setup_ring(image, size=16)
    for k in range(16):
        d.post_tx(frame(60, k))
    got = vq.recv_burst(pool) + vq.recv_burst(pool)
    assert got == [frame(60, k) for k in range(16)]
    assert not vq.broken


def test_disabled_ring(image, pool):
    d, vq = setup_ring(image, enabled=False)
    heads = [d.post_tx(frame(60, k)) for k in range(3)]
    assert vq.recv_burst(pool) == []
    assert d.used() == [(h, 0) for h in heads]          # consumed, given back, not delivered
    s = vq.stats()
    assert (s["drop_disabled"], s["packets"]) == (3, 0)
    with vq:
        vq.enabled = True
    d.post_tx(frame(60, 9))
    assert vq.recv_burst(pool) == [frame(60, 9)]

    rd, rx = setup_ring(image, enabled=False)
    rd.post_rx([256])
    assert rx.send_burst(pool, [frame(60)]) == 0
    assert rd.used() == [] and rx.base == 0             # RX buffers are left alone
    assert rx.stats()["drop_disabled"] == 1


def test_stopped_ring_does_nothing(image, pool):
    d, vq = setup_ring(image)
    d.post_tx(frame(60))
    d.post_rx([256])
    with vq:
        vq.stop()
    assert vq.recv_burst(pool) == []
    assert vq.send_burst(pool, [frame(60)]) == 0
    assert not vq.pending()
    vq.set_notify(True)
    assert d.used_idx() == 0


# -- ring addresses --------------------------------------------------------------------

def _configured(d, table, desc=None, used=None, avail=None, size=None):
    vq = VirtQueue(0)
    with vq:
        vq.set_memory(table)
        vq.set_size(size or d.size)
        vq.set_addresses(d.desc_uva if desc is None else desc,
                         d.used_uva if used is None else used,
                         d.avail_uva if avail is None else avail)
        vq.set_features(event_idx=True, indirect=True, mrg_rxbuf=False, hdr_len=12)
    return vq


def test_ring_addresses_outside_memory(image):
    d = DriverRing(image, 64)
    gm = image.guest_memory()
    r0, r1 = image.regions
    uva_end0 = r0.uva + r0.size
    cases = {
        "desc_gpa_not_uva": dict(desc=d.desc_gpa),
        "desc_unmapped": dict(desc=0x1000),
        "avail_unmapped": dict(avail=r1.uva + r1.size),
        "used_unmapped": dict(used=(1 << 64) - 8),
        "desc_straddles_region_end": dict(desc=uva_end0 - 16 * 32),
        "used_straddles_region_end": dict(used=uva_end0 - 8),
        "avail_straddles_start": dict(avail=r0.uva - 2),
        "desc_misaligned": dict(desc=d.desc_uva + 8),
        "used_misaligned": dict(used=d.used_uva + 2),
        "avail_misaligned": dict(avail=d.avail_uva + 1),
    }
    for name, kw in cases.items():
        vq = _configured(d, gm.table, **kw)
        with vq, pytest.raises(ValueError):
            vq.start()
        assert not vq.ready, name
        assert vq.recv_burst(PacketPool(4, 2048)) == [], name
    vq = _configured(d, gm.table)
    with vq:
        assert vq.start() is None
    assert vq.ready


def test_ring_without_memory_or_size():
    vq = VirtQueue(0)
    with vq, pytest.raises(ValueError, match="memory"):
        vq.start()
    with GuestImage((MiB,)) as img:
        vq.set_memory(img.guest_memory().table)
        with vq, pytest.raises(ValueError, match="size"):
            vq.start()


@pytest.mark.parametrize("size", [0, 3, 100, 65536, 1 << 31])
def test_bad_ring_sizes(size):
    vq = VirtQueue(0)
    with vq, pytest.raises(ValueError):
        vq.set_size(size)


def test_bad_header_len():
    vq = VirtQueue(0)
    with vq, pytest.raises(ValueError):
        vq.set_features(event_idx=False, indirect=False, mrg_rxbuf=False, hdr_len=11)


def test_start_resumes_from_used_idx(image, pool):
    d = DriverRing(image, 16)
    image.write(d.used_gpa + 2, struct.pack("<H", 5))
    d.set_avail_idx(5)
    d.last_used = 5
    vq = d.make_queue(image.guest_memory(), base=0)
    assert vq.base == 5
    d.post_tx(frame(60))
    assert vq.recv_burst(pool) == [frame(60)]


def test_memory_swapped_under_a_started_ring(image, pool):
    """A new table with the same layout (SET_MEM_TABLE again): traffic goes on."""
    d, vq = setup_ring(image)
    d.post_tx(frame(60, 1))
    assert vq.recv_burst(pool) == [frame(60, 1)]
    with vq:
        vq.set_memory(image.guest_memory().table)
        vq.start()
    d.post_tx(frame(60, 2))
    assert vq.recv_burst(pool) == [frame(60, 2)]


# ======================================================================================
# properties
# ======================================================================================

@st.composite
def tx_packets(draw):
    data = draw(st.binary(min_size=0, max_size=1600))
    total = 12 + len(data)
    cuts = sorted(draw(st.lists(st.integers(0, total), max_size=6)))
    bounds = [0, *cuts, total]
    splits = [b - a for a, b in zip(bounds, bounds[1:], strict=False)]
    return data, splits, draw(st.booleans())


def test_property_tx_roundtrip():
    count = Counter("tx roundtrip")

    @fuzz_settings(FUZZ)
    @given(st.lists(tx_packets(), min_size=1, max_size=12))
    def run(packets):
        count()
        with GuestImage((MiB, MiB)) as img:
            d, vq = setup_ring(img, size=128)
            pool = PacketPool(64, 2048)
            for data, splits, indirect in packets:
                d.post_tx(data, splits=splits, indirect=indirect)
            got = vq.recv_burst(pool) + vq.recv_burst(pool)
            assert got == [p[0] for p in packets]
            assert vq.stats()["drop_bad_desc"] == 0

    run()
    count.report(FUZZ)


def test_property_rx_roundtrip():
    count = Counter("rx roundtrip")

    @fuzz_settings(FUZZ)
    @given(frames=st.lists(st.binary(max_size=1600), min_size=1, max_size=12),
           bufs=st.lists(st.lists(st.integers(100, 700), min_size=1, max_size=4),
                         min_size=1, max_size=40),
           mrg=st.booleans(), indirect=st.booleans())
    def run(frames, bufs, mrg, indirect):
        count()
        with GuestImage((MiB, MiB)) as img:
            d, vq = setup_ring(img, size=256, mrg_rxbuf=mrg)
            pool = PacketPool(64, 2048)
            for sizes in bufs:
                d.post_rx(sizes, indirect=indirect)
            sent = vq.send_burst(pool, frames)
            s = vq.stats()
            assert sent == s["packets"]
            assert sent + s["drop_no_buffer"] + s["drop_oversize"] == len(frames)
            assert s["drop_bad_desc"] == 0
            used = d.used()
            # rebuild the frames from the used entries: num_buffers says how many to take
            got, pos = [], 0
            while pos < len(used):
                first = d.rx_bytes(*used[pos])
                nb = struct.unpack_from("<H", first, 10)[0]
                assert nb >= 1 and (mrg or nb == 1)
                data = b"".join(d.rx_bytes(*u) for u in used[pos:pos + nb])
                got.append(data[12:])
                pos += nb
            assert pos == len(used)
            # the frames delivered are the input minus the dropped ones, in order
            it = iter(frames)
            assert all(any(g == f for f in it) for g in got)
            assert len(got) == sent

    run()
    count.report(FUZZ)


RING = 16


@st.composite
def hostile_ring(draw, w=0):
    """Random bytes over the whole desc table and avail ring. Then, drawn per round: heads
    often cut into range, and descriptors often rewritten with addresses in or around guest
    memory and plausible lengths and flags, so that chains get walked and some delivered."""
    raw = bytearray(draw(st.binary(min_size=16 * RING + 6 + 2 * RING,
                                   max_size=16 * RING + 6 + 2 * RING)))
    if draw(st.integers(0, 3)):
        for slot in range(RING):
            at = 16 * RING + 4 + 2 * slot
            raw[at:at + 2] = struct.pack("<H", struct.unpack_from("<H", raw, at)[0] % RING)
    plausible = st.tuples(
        st.sampled_from([w, w, w | F_NEXT, w | F_NEXT, F_INDIRECT, w ^ F_WRITE]),
        st.integers(0x4000, 0x40000),
        st.sampled_from([12, 16, 64, 100, 1500]))
    anything = st.tuples(
        st.one_of(st.sampled_from([F_INDIRECT | F_NEXT, F_INDIRECT | F_WRITE]),
                  st.integers(0, 0xFFFF)),
        st.one_of(st.integers(0, 0x4000), st.integers(0, 1 << 21)),
        st.one_of(st.sampled_from([0, 1, 16, 32, 4096, 0xFFFFFFFF]), st.integers(0, 1 << 31)))
    mix = draw(st.sampled_from(["raw", "some", "plausible", "plausible"]))
    if mix == "raw":
        fixes = []
    elif mix == "some":
        fixes = draw(st.lists(st.tuples(st.integers(0, RING - 1), anything | plausible),
                              max_size=RING))
    else:
        fixes = list(enumerate(draw(st.lists(
            st.one_of(plausible, plausible, plausible, anything),
            min_size=RING, max_size=RING))))
    fixes = [(i, *f) for i, f in fixes]
    return raw, fixes, draw(st.one_of(st.integers(0, RING), st.integers(-2, RING + 2)))


def _apply(d, img, raw, fixes, ahead, base):
    img.write(d.desc_gpa, bytes(raw[:16 * RING]))
    img.write(d.avail_gpa, bytes(raw[16 * RING:]))
    for i, flags, off, length in fixes:
        addr = img.start + off - 1024             # some before memory, most inside
        nxt = struct.unpack_from("<H", raw, 16 * i + 14)[0] % (RING + 2)
        d.write_desc(i, addr, length, flags, nxt)
    if ahead is not None:
        d.set_avail_idx(base + ahead)


# a 16-byte chain whose 12-byte header the device refuses (drop_bad_hdr): found by the
# property below under ASan, where the accounting left that counter out
BAD_HEADER_ROUNDS = [(bytearray(16 * RING + 6 + 2 * RING), [], 0),
                     (bytearray(16 * RING + 6 + 2 * RING),
                      [(0, 0, 1072, 16)] + [(i, 0, 16384, 12) for i in range(1, RING)], 1)]


def test_property_random_rings_tx():
    count = Counter("random rings (tx)")

    @fuzz_settings(RING_FUZZ)
    @given(st.lists(hostile_ring(), min_size=1, max_size=4), st.booleans(), st.booleans())
    @example(BAD_HEADER_ROUNDS, False, True)
    def run(rounds, indirect, enabled):
        count()
        with GuestImage((MiB, MiB)) as img:
            d = DriverRing(img, RING)
            vq = d.make_queue(img.guest_memory(), indirect=indirect, enabled=enabled)
            pool = PacketPool(8, 2048)
            for raw, fixes, ahead in rounds:
                if vq.broken:                  # as a new SET_VRING_ADDR/KICK would
                    with vq:
                        vq.start()
                _apply(d, img, raw, fixes, ahead if ahead >= 0 else None, vq.base)
                for _ in range(3):
                    before, base = vq.stats(), vq.base
                    frames = vq.recv_burst(pool)
                    dd = delta(vq.stats(), before)
                    consumed = (vq.base - base) & 0xFFFF
                    assert consumed <= RING
                    accounted = sum(dd.get(k, 0) for k in
                                    ("packets", "drop_bad_desc", "drop_disabled",
                                     "drop_oversize", "drop_bad_hdr"))
                    assert accounted == consumed
                    assert len(frames) == dd.get("packets", 0)
                    assert sum(map(len, frames)) == dd.get("bytes", 0)
                    if not enabled:
                        assert frames == []
                    assert pool.available == pool.count

    run()
    count.report(RING_FUZZ)


def test_property_random_rings_rx():
    count = Counter("random rings (rx)")

    @fuzz_settings(RING_FUZZ)
    @given(st.lists(hostile_ring(F_WRITE), min_size=1, max_size=4), st.booleans(),
           st.booleans(),
           st.lists(st.integers(0, 1600), min_size=1, max_size=32))
    def run(rounds, indirect, mrg, sizes):
        count()
        with GuestImage((MiB, MiB)) as img:
            d = DriverRing(img, RING)
            vq = d.make_queue(img.guest_memory(), indirect=indirect, mrg_rxbuf=mrg)
            pool = PacketPool(64, 2048)
            frames = [frame(n, k) for k, n in enumerate(sizes)]
            for raw, fixes, ahead in rounds:
                if vq.broken:                  # as a new SET_VRING_ADDR/KICK would
                    with vq:
                        vq.start()
                _apply(d, img, raw, fixes, ahead if ahead >= 0 else None, vq.base)
                for _ in range(2):
                    before, base = vq.stats(), vq.base
                    sent = vq.send_burst(pool, frames)
                    dd = delta(vq.stats(), before)
                    assert sent == dd.get("packets", 0)
                    assert ((vq.base - base) & 0xFFFF) <= RING
                    dropped = sum(dd.get(k, 0) for k in DROPS)
                    assert sent + dropped == len(frames), dd
                    assert pool.available == pool.count

    run()
    count.report(RING_FUZZ)
