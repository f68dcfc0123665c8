"""A hostile driver against the compiled device-side rings, packed and split.

Deterministic hostile packed chains (the split ones are in test_vring_hostile.py), then
random rings for both layouts. Besides the counters, every TX burst is checked to have
written nothing in guest memory but the ring itself (the used entries): a device that walks
a hostile chain must only read it. Runs under ASan/UBSan too (test_fuzz_asan.py)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyvhost._pktpool import PacketPool
from tests.harness.driver import (
    F_INDIRECT,
    F_NEXT,
    F_WRITE,
    PDESC,
    DriverRing,
    GuestImage,
    PackedDriverRing,
    packed_flags,
    vnet_hdr,
)
from tests.harness.fuzzing import Counter, fuzz_settings

MiB = 1 << 20


@pytest.fixture
def image():
    with GuestImage((MiB, MiB)) as img:
        yield img


@pytest.fixture
def pool():
    return PacketPool(64, 2048)


def frame(n: int, seed: int = 0) -> bytes:
    return bytes((seed + i) & 0xFF for i in range(n))


def delta(after: dict, before: dict) -> dict:
    return {k: after[k] - before[k] for k in after if after[k] != before[k]}


def snapshot(img) -> list[bytes]:
    return [bytes(r.mm) for r in img.regions]


def changed_ranges(img, before: list[bytes]) -> list[tuple[int, int]]:
    """GPA ranges (start, end) whose bytes differ from ``before`` (16-byte granules)."""
    out = []
    for r, old in zip(img.regions, before, strict=True):
        new = bytes(r.mm)
        if new == old:
            continue
        for at in range(r.offset, r.offset + r.size, 16):
            if new[at:at + 16] != old[at:at + 16]:
                gpa = r.gpa + at - r.offset
                if out and out[-1][1] == gpa:
                    out[-1] = (out[-1][0], gpa + 16)
                else:
                    out.append((gpa, gpa + 16))
    return out


def assert_only_written(img, before, allowed: list[tuple[int, int]]) -> None:
    for lo, hi in changed_ranges(img, before):
        assert any(a <= lo and hi <= b for a, b in allowed), \
            f"device wrote guest memory at {lo:#x}..{hi:#x}, outside {allowed}"


def packed_ring_ranges(d: PackedDriverRing) -> list[tuple[int, int]]:
    return [(d.desc_gpa, d.desc_gpa + 16 * d.size + 15),
            (d.device_event_gpa, d.device_event_gpa + 16)]


def split_ring_ranges(d: DriverRing) -> list[tuple[int, int]]:
    return [(d.used_gpa, d.used_gpa + 6 + 8 * d.size + 15)]


# ======================================================================================
# deterministic hostile packed chains
# ======================================================================================
#
# Each builder writes one hostile buffer at the driver's next slots (available under the
# current wrap) and returns how many slots it spans; ``w`` is F_WRITE for RX rings.

def _put(d: PackedDriverRing, descs, buf_id=0x77) -> int:
    """Write ``descs`` (addr, len, flags) at the next slots, head last; advance the driver."""
    first, wrap = d.next_avail, d.avail_wrap
    for k, (addr, length, flags) in enumerate(descs):
        if k:
            d.write_desc(d.next_avail, addr, length, buf_id, packed_flags(d.avail_wrap, flags))
        d.next_avail += 1
        if d.next_avail == d.size:
            d.next_avail, d.avail_wrap = 0, d.avail_wrap ^ 1
    addr, length, flags = descs[0]
    d.write_desc(first, addr, length, buf_id, packed_flags(wrap, flags))
    d.in_flight += len(descs)
    d.slots_of[buf_id] = len(descs)
    return len(descs)


def _table(img, entries) -> int:
    at = img.alloc(16 * max(1, len(entries)), 16)
    for k, (addr, length, flags) in enumerate(entries):
        img.write(at + 16 * k, PDESC.pack(addr, length, 0, flags))
    return at


def _buf(img, n=72) -> int:
    at = img.alloc(n, 8)
    img.write(at, vnet_hdr() + frame(n - 12))
    return at


def h_indirect_in_indirect(d, img, w):
    inner = _table(img, [(_buf(img), 72, w)])
    outer = _table(img, [(inner, 16, F_INDIRECT | w)])
    return _put(d, [(outer, 16, F_INDIRECT)])


def h_indirect_len(n):
    def build(d, img, w):
        return _put(d, [(_table(img, [(_buf(img), 72, w)] * 4), n, F_INDIRECT)])
    return build


def h_indirect_with_next(d, img, w):
    table = _table(img, [(_buf(img), 72, w)])
    return _put(d, [(table, 16, F_INDIRECT | F_NEXT), (_buf(img), 72, w)])


def h_indirect_table_at(where):
    def build(d, img, w):
        return _put(d, [(where(img), 32, F_INDIRECT)])
    return build


def h_indirect_too_many_segments(d, img, w):
    base = _buf(img, 200)
    return _put(d, [(_table(img, [(base + k, 1, w) for k in range(100)]), 1600, F_INDIRECT)])


def h_single(addr_of, length, flip=False):
    def build(d, img, w):
        return _put(d, [(addr_of(img), length, (w ^ F_WRITE) if flip else w)])
    return build


def h_ring_loop(d, img, w):
    """Every slot of the ring available and chained to the next: a chain with no end."""
    at = _buf(img)
    return _put(d, [(at, 72, w | F_NEXT)] * d.size)


def h_wrong_direction_in_indirect(d, img, w):
    return _put(d, [(_table(img, [(_buf(img), 72, w), (_buf(img), 72, w ^ F_WRITE)]), 32,
                     F_INDIRECT)])


HOSTILE_PACKED = {
    "indirect_in_indirect": h_indirect_in_indirect,
    "indirect_len_24": h_indirect_len(24),
    "indirect_len_0": h_indirect_len(0),
    "indirect_len_huge": h_indirect_len(0xFFFFFFF0),
    "indirect_with_next": h_indirect_with_next,
    "indirect_table_unmapped": h_indirect_table_at(lambda img: 0x1000),
    "indirect_table_past_end": h_indirect_table_at(lambda img: img.end - 16),
    "indirect_table_overflow": h_indirect_table_at(lambda img: (1 << 64) - 16),
    "indirect_too_many_segments": h_indirect_too_many_segments,
    "indirect_wrong_direction": h_wrong_direction_in_indirect,
    "addr_unmapped": h_single(lambda img: 0x1000, 72),
    "addr_straddles_end": h_single(lambda img: img.end - 10, 72),
    "addr_len_overflow": h_single(lambda img: (1 << 64) - 16, 72),
    "len_near_4g": h_single(lambda img: img.start, 0xFFFFFFFF),
    "len_2g": h_single(lambda img: img.start, 0x80000000),
    "wrong_direction": h_single(lambda img: _buf(img), 72, flip=True),
    "ring_loop": h_ring_loop,
}
BREAKS_RING = {"ring_loop"}           # a chain longer than the ring: the ring is broken


@pytest.mark.parametrize("size", [64, 48])
@pytest.mark.parametrize("name", sorted(HOSTILE_PACKED))
def test_hostile_packed_tx(image, pool, name, size):
    d = PackedDriverRing(image, size)
    vq = d.make_queue(image.guest_memory())
    d.post_tx(frame(60, 1))
    assert vq.recv_burst(pool) == [frame(60, 1)]       # the wrap bits are right
    d.used()
    before = vq.stats()
    HOSTILE_PACKED[name](d, image, 0)
    good = None if name in BREAKS_RING else d.post_tx(frame(60, 2))
    mem = snapshot(image)
    got = vq.recv_burst(pool)
    dd = delta(vq.stats(), before)
    assert_only_written(image, mem, packed_ring_ranges(d))
    assert pool.available == pool.count
    if name in BREAKS_RING:
        assert got == [] and vq.broken and dd.get("ring_errors") == 1
        return
    assert got == [frame(60, 2)], dd
    assert dd.get("drop_bad_desc") == 1 and dd.get("packets") == 1, dd
    assert [buf_id for buf_id, _ in d.used()] == [0x77, good]


@pytest.mark.parametrize("mrg", [False, True], ids=["plain", "mergeable"])
@pytest.mark.parametrize("name", sorted(HOSTILE_PACKED))
def test_hostile_packed_rx(image, pool, name, mrg):
    d = PackedDriverRing(image, 64)
    vq = d.make_queue(image.guest_memory(), mrg_rxbuf=mrg)
    before = vq.stats()
    HOSTILE_PACKED[name](d, image, F_WRITE)
    good = None if name in BREAKS_RING else d.post_rx([2048])
    mem = snapshot(image)
    sent = vq.send_burst(pool, [frame(100, 1), frame(100, 2)])
    dd = delta(vq.stats(), before)
    allowed = packed_ring_ranges(d)
    if good is not None:
        (gpa, n), = d.buffers[good]
        allowed.append((gpa & ~15, gpa + n + 16))
    assert_only_written(image, mem, allowed)
    assert pool.available == pool.count
    if name in BREAKS_RING:
        assert sent == 0 and vq.broken and dd.get("ring_errors") == 1
        assert dd.get("drop_no_buffer") == 2
        return
    assert sent == 1 and dd.get("drop_bad_desc") == 1, dd
    used = d.used()
    assert [u[0] for u in used] == [0x77, good]
    assert used[0][1] == 0                              # the hostile buffer came back unwritten
    assert d.rx_bytes(good, used[1][1]) == vnet_hdr(num_buffers=1) + frame(100, 2)


def test_packed_buffer_crossing_regions_is_delivered(image, pool):
    d = PackedDriverRing(image, 16)
    vq = d.make_queue(image.guest_memory())
    at = image.boundary(0) - 30
    image.write(at, vnet_hdr() + frame(60, 3))
    _put(d, [(at, 72, 0)])
    assert vq.recv_burst(pool) == [frame(60, 3)]


def test_packed_base_beyond_ring_is_refused(image):
    d = PackedDriverRing(image, 16)
    vq = d.make_queue(image.guest_memory())
    with vq:
        vq.base = 20                       # slot 20 of a 16-slot ring
        with pytest.raises(ValueError, match="beyond the ring size"):
            vq.start()
    assert not vq.ready


def test_packed_base_set_while_running_stays_inside_the_ring(image, pool):
    d = PackedDriverRing(image, 16)
    vq = d.make_queue(image.guest_memory())
    buf = _buf(image)
    # a descriptor that would be "slot 40": past the ring, in guest memory
    beyond = d.desc_gpa + 16 * 40
    image.write(beyond, PDESC.pack(buf, 72, 5, packed_flags(1)))
    mem = snapshot(image)
    before = vq.stats()
    with vq:
        vq.base = 40 | 0x8000              # as SET_VRING_BASE on a started ring does
    got = vq.recv_burst(pool)
    dd = delta(vq.stats(), before)
    assert got == [] and not dd.get("packets") and not dd.get("drop_bad_desc"), dd
    assert_only_written(image, mem, packed_ring_ranges(d))


# ======================================================================================
# random rings
# ======================================================================================

def _plausible(img, w):
    return st.tuples(
        st.integers(0, 0x40000).map(lambda off: img.start + off - 1024),
        st.sampled_from([0, 1, 12, 16, 32, 64, 100, 1500, 0xFFFFFFFF]),
        st.sampled_from([w, w, w | F_NEXT, w | F_NEXT, F_INDIRECT, F_INDIRECT | F_NEXT,
                         w ^ F_WRITE]))


@st.composite
def packed_round(draw, img, size, w):
    """Per slot: nothing new, a plausible descriptor (avail under either wrap), or random
    bytes; plus random indirect tables at the places plausible indirects point to."""
    slots = []
    for slot in range(size):
        kind = draw(st.sampled_from(["keep", "plausible", "plausible", "plausible", "raw"]))
        if kind == "keep":
            continue
        if kind == "raw":
            slots.append((slot, draw(st.binary(min_size=16, max_size=16))))
            continue
        addr, length, flags = draw(_plausible(img, w))
        wrap = draw(st.sampled_from([1, 1, 1, 0]))
        buf_id = draw(st.integers(0, 0xFFFF))
        slots.append((slot, PDESC.pack(addr, length, buf_id,
                                       packed_flags(wrap, flags))))
    tables = draw(st.binary(min_size=0, max_size=256))
    return slots, tables


def test_fuzz_packed_tx():
    count = Counter("packed rings, hostile driver, tx")
    n = 200

    @fuzz_settings(n)
    @given(st.data(), st.sampled_from([1, 2, 3, 10, 16, 64]), st.booleans(), st.booleans())
    def run(data, size, indirect, enabled):
        count()
        with GuestImage((MiB, MiB)) as img:
            d = PackedDriverRing(img, size)
            vq = d.make_queue(img.guest_memory(), indirect=indirect, enabled=enabled)
            pool = PacketPool(8, 2048)
            for _ in range(data.draw(st.integers(1, 4))):
                if vq.broken:
                    with vq:
                        vq.start()
                slots, tables = data.draw(packed_round(img, size, 0))
                for slot, raw in slots:
                    img.write(d.desc_gpa + 16 * slot, raw)
                img.write(img.start, tables)     # where many plausible addresses point
                for _ in range(2):
                    before = vq.stats()
                    mem = snapshot(img)
                    frames = vq.recv_burst(pool)
                    dd = delta(vq.stats(), before)
                    assert_only_written(img, mem, packed_ring_ranges(d))
                    assert len(frames) == dd.get("packets", 0)
                    assert sum(map(len, frames)) == dd.get("bytes", 0)
                    if not enabled:
                        assert frames == []
                    assert pool.available == pool.count
                    assert (vq.base & 0x7FFF) < size and (vq.base >> 16 & 0x7FFF) < size

    run()
    count.report(n)


def test_fuzz_packed_rx():
    count = Counter("packed rings, hostile driver, rx")
    n = 200

    @fuzz_settings(n)
    @given(st.data(), st.sampled_from([1, 2, 3, 10, 16, 64]), st.booleans(), st.booleans(),
           st.lists(st.integers(0, 1600), min_size=1, max_size=32))
    def run(data, size, indirect, mrg, sizes):
        count()
        with GuestImage((MiB, MiB)) as img:
            d = PackedDriverRing(img, size)
            vq = d.make_queue(img.guest_memory(), indirect=indirect, mrg_rxbuf=mrg)
            pool = PacketPool(64, 2048)
            frames = [frame(k, i) for i, k in enumerate(sizes)]
            for _ in range(data.draw(st.integers(1, 4))):
                if vq.broken:
                    with vq:
                        vq.start()
                slots, tables = data.draw(packed_round(img, size, F_WRITE))
                for slot, raw in slots:
                    img.write(d.desc_gpa + 16 * slot, raw)
                img.write(img.start, tables)
                before = vq.stats()
                sent = vq.send_burst(pool, frames)
                dd = delta(vq.stats(), before)
                assert sent == dd.get("packets", 0)
                assert sent + sum(v for k, v in dd.items() if k.startswith("drop_")) \
                    == len(frames), dd
                assert pool.available == pool.count
                assert (vq.base & 0x7FFF) < size

    run()
    count.report(n)


@st.composite
def split_round(draw, img, size, w):
    """Random split ring contents: avail entries, descriptors, avail idx."""
    heads = draw(st.lists(st.one_of(st.integers(0, size - 1), st.integers(0, 0xFFFF)),
                          min_size=size, max_size=size))
    descs = []
    for slot in range(size):
        if draw(st.integers(0, 4)) == 0:
            descs.append((slot, draw(st.binary(min_size=16, max_size=16))))
        else:
            addr, length, flags = draw(_plausible(img, w))
            nxt = draw(st.one_of(st.integers(0, size - 1), st.integers(0, 0xFFFF)))
            descs.append((slot, struct.pack("<QIHH", addr, length, flags, nxt)))
    ahead = draw(st.one_of(st.integers(0, size), st.integers(0, 0xFFFF)))
    return heads, descs, ahead, draw(st.binary(max_size=256))


def test_fuzz_split_tx_writes_only_the_used_ring():
    count = Counter("split rings, hostile driver, tx, memory writes")
    n = 150

    @fuzz_settings(n)
    @given(st.data(), st.sampled_from([1, 2, 16, 64]), st.booleans(), st.booleans())
    def run(data, size, indirect, event_idx):
        count()
        with GuestImage((MiB, MiB)) as img:
            d = DriverRing(img, size)
            vq = d.make_queue(img.guest_memory(), indirect=indirect, event_idx=event_idx)
            pool = PacketPool(8, 2048)
            for _ in range(data.draw(st.integers(1, 3))):
                if vq.broken:
                    with vq:
                        vq.start()
                heads, descs, ahead, tables = data.draw(split_round(img, size, 0))
                for slot, raw in descs:
                    img.write(d.desc_gpa + 16 * slot, raw)
                for k, h in enumerate(heads):
                    d.set_avail_entry(k, h)
                img.write(img.start, tables)
                d.set_avail_idx(vq.base + ahead)
                before, base = vq.stats(), vq.base
                mem = snapshot(img)
                frames = vq.recv_burst(pool)
                dd = delta(vq.stats(), before)
                assert_only_written(img, mem, split_ring_ranges(d))
                consumed = (vq.base - base) & 0xFFFF
                assert consumed <= size
                assert consumed == dd.get("packets", 0) + sum(
                    v for k, v in dd.items() if k.startswith("drop_"))
                assert len(frames) == dd.get("packets", 0)
                assert pool.available == pool.count

    run()
    count.report(n)
