"""Packed rings, device side: descriptors read four at a time (pyvhost/_ring_batch.pxd).

Every scenario runs twice over identical guest memory, once with batching (the default) and
once with ``VirtQueue.batching = False`` (every chain one at a time), and everything the
guest can see must be the same byte for byte: the frames taken, the descriptor ring (used
ids, lengths, flags), the RX buffers' contents, the ring position and every counter. The
``batched`` counter shows how many chains went through the batch path, so each test also
says when a batch must (or must not) be taken: hostile batches (one of the four not
available, a chain or indirect flag inside, the ring's end inside, an id out of range, a
bad address or length, the wrong direction) fall back to the one-at-a-time path."""

from __future__ import annotations

import ctypes

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyvhost._pktpool import PacketPool
from tests.harness.driver import (
    F_INDIRECT,
    F_NEXT,
    F_WRITE,
    PDESC,
    GuestImage,
    PackedDriverRing,
    packed_flags,
)
from tests.harness.fuzzing import Counter, fuzz_settings
from tests.test_fuzz_rings import snapshot

MiB = 1 << 20
HDR = bytes(12)


def frame(n: int, seed: int = 0) -> bytes:
    return bytes((seed * 7 + i) & 0xFF for i in range(n))


def run(scenario, batching: bool, size: int = 16, pool_size: int = 64, **kw):
    """``scenario(d, vq, pool, image)`` over a fresh packed ring: what the guest sees."""
    with GuestImage((MiB,)) as image:
        d = PackedDriverRing(image, size)
        vq = d.make_queue(image.guest_memory(), **kw)
        vq.batching = batching
        pool = PacketPool(pool_size, 2048)
        out = scenario(d, vq, pool, image)
        seen = {"out": out, "stats": vq.stats(), "ring": image.read(d.desc_gpa, 16 * size),
                "base": vq.base, "broken": vq.broken, "pool": pool.available}
        return seen, vq.batched


def same_both_ways(scenario, batched: int, **kw):
    on, n_on = run(scenario, True, **kw)
    off, n_off = run(scenario, False, **kw)
    assert n_off == 0
    assert on == off
    assert n_on == batched
    return on


def rx_seen(d):
    return [(i, n, d.rx_bytes(i, n)) for i, n in d.used()]


# -- TX (dequeue) ------------------------------------------------------------------------

def test_tx_single_descriptors_are_taken_four_at_a_time():
    def sc(d, vq, pool, image):
        for k in range(8):
            d.post_tx(frame(60 + 180 * k, k))
        return vq.recv_burst(pool)
    seen = same_both_ways(sc, 8)
    assert seen["out"] == [frame(60 + 180 * k, k) for k in range(8)]
    assert seen["stats"]["packets"] == 8


def test_tx_one_copy_receive_batches_too():
    def sc(d, vq, pool, image):
        for k in range(8):
            d.post_tx(frame(1000 + k, k))
        got = vq.recv_burst_ref(pool)
        return got, d.used()
    seen = same_both_ways(sc, 8)
    assert seen["out"][0] == [frame(1000 + k, k) for k in range(8)]


def test_tx_burst_limit_leaves_the_tail_to_single_reads():
    def sc(d, vq, pool, image):
        for k in range(8):
            d.post_tx(frame(60, k))
        return vq.recv_burst(pool, 6), vq.recv_burst(pool)
    seen = same_both_ways(sc, 4 + 0)
    assert seen["out"] == ([frame(60, k) for k in range(6)], [frame(60, k) for k in (6, 7)])


def test_tx_a_batch_on_a_dry_pool_settles_the_deferred_singles_first():
    """Found by the fuzzer: frames taken one at a time have their copies deferred (checked
    at the burst's end) and hold packet buffers meanwhile; when a batch then finds the
    pool dry it settles those first, as one at a time does, so the ones refused (a bad
    header) give their buffers back and the burst goes on. It stopped there instead."""
    bad_hdr = b"\x01" + bytes(11)          # NEEDS_CSUM, not negotiated: refused
    def sc(d, vq, pool, image):
        for k in range(5):                   # a batch (0-3), then slot 4 one at a time
            d.post_tx(frame(60, k))
        d.post_tx(frame(60, 5), hdr=bad_hdr)
        d.post_tx(frame(60, 6), hdr=bad_hdr)
        d.post_tx(frame(60, 7))
        addr, _, buf_id, flags = d.read_desc(7)
        d.write_desc(7, addr, 0, buf_id, flags)        # length 0: a bad descriptor
        for k in range(8, 12):               # a batch, on a pool left with one buffer
            d.post_tx(frame(60, k))
        return vq.recv_burst(pool)
    seen = same_both_ways(sc, 4 + 3, pool_size=8)   # the second: 3 of 4, then dry
    assert seen["out"] == [frame(60, k) for k in (0, 1, 2, 3, 4, 8, 9, 10)]
    stats = seen["stats"]
    assert (stats["drop_bad_hdr"], stats["drop_bad_desc"], stats["drop_no_mbuf"]) == (2, 1, 1)


def test_tx_one_of_four_not_available_is_not_a_batch():
    def sc(d, vq, pool, image):
        for k in range(3):
            d.post_tx(frame(60, k))
        buf = image.alloc(72)
        image.write(buf, HDR + frame(60, 9))
        d.write_desc(3, buf, 72, id=3, flags=packed_flags(0))        # the old wrap: not ours
        first = vq.recv_burst(pool)
        for k in range(5):
            d.post_tx(frame(60, 10 + k))                             # slot 3 posted properly
        return first, vq.recv_burst(pool)
    seen = same_both_ways(sc, 4)
    assert seen["out"][0] == [frame(60, k) for k in range(3)]
    assert seen["out"][1] == [frame(60, 10 + k) for k in range(5)]


def test_tx_a_hole_in_the_middle_stops_where_one_at_a_time_stops():
    def sc(d, vq, pool, image):
        d.post_tx(frame(60, 0))
        d.post_tx(frame(60, 1))
        buf = image.alloc(72)
        image.write(buf, HDR + frame(60, 3))
        d.write_desc(3, buf, 72, id=7, flags=packed_flags(1))        # slot 2 never posted
        return vq.recv_burst(pool)
    seen = same_both_ways(sc, 0)
    assert seen["out"] == [frame(60, 0), frame(60, 1)]


def test_tx_a_chain_flag_inside_falls_back_then_batches_again():
    def sc(d, vq, pool, image):
        d.post_tx(frame(60, 0))
        d.post_tx(frame(60, 1), splits=[12, 60])                     # slots 1-2, NEXT in 1
        for k in range(2, 6):
            d.post_tx(frame(60, k))                                  # slots 3..6
        return vq.recv_burst(pool)
    seen = same_both_ways(sc, 4)
    assert seen["out"] == [frame(60, k) for k in range(6)]


def test_tx_indirect_and_wrong_direction_are_not_batches():
    def sc(d, vq, pool, image):
        d.post_tx(frame(60, 0), indirect=True)
        for k in range(1, 4):
            d.post_tx(frame(60, k))
        buf = image.alloc(72)
        d.write_desc(4, buf, 72, id=4, flags=packed_flags(1, F_WRITE))   # RX buffer on TX
        for k in range(5, 8):
            buf = image.alloc(72)
            image.write(buf, HDR + frame(60, k))
            d.write_desc(k, buf, 72, id=k, flags=packed_flags(1))
        return vq.recv_burst(pool)
    seen = same_both_ways(sc, 0)
    assert seen["out"] == [frame(60, k) for k in (0, 1, 2, 3, 5, 6, 7)]
    assert seen["stats"]["drop_bad_desc"] == 1


@pytest.mark.parametrize("bad", ["unmapped", "zero", "huge", "short"])
def test_tx_a_bad_descriptor_inside_falls_back_and_is_counted_the_same(bad):
    def sc(d, vq, pool, image):
        for k in range(8):
            buf = image.alloc(72)
            image.write(buf, HDR + frame(60, k))
            addr, length = buf, 72
            if k == 2:
                addr, length = {"unmapped": (0xDEAD000000, 72), "zero": (buf, 0),
                                "huge": (buf, 1 << 30), "short": (buf, 8)}[bad]
            d.write_desc(k, addr, length, id=k, flags=packed_flags(1))
        return vq.recv_burst(pool)
    # slots 0..3 fall back, 4..7 are a batch; a buffer shorter than the header is a
    # well-formed descriptor: batched, and dropped by the same receive as one at a time
    seen = same_both_ways(sc, 8 if bad == "short" else 4)
    assert seen["out"] == [frame(60, k) for k in range(8) if k != 2]
    assert seen["stats"]["drop_bad_desc"] == 1


def test_tx_ids_out_of_range_are_given_back_as_they_came():
    """Buffer ids are the driver's: the device returns them untouched, batch or not."""
    def sc(d, vq, pool, image):
        for k, id_ in enumerate((1000, 0xFFFF, 3, 3)):
            buf = image.alloc(72)
            image.write(buf, HDR + frame(60, k))
            d.write_desc(k, buf, 72, id=id_, flags=packed_flags(1))
        return vq.recv_burst(pool)
    seen = same_both_ways(sc, 4)
    assert [int.from_bytes(seen["ring"][16 * k + 12:16 * k + 14], "little")
            for k in range(4)] == [1000, 0xFFFF, 3, 3]


def test_tx_wrap_at_the_ring_end_is_read_one_at_a_time():
    def sc(d, vq, pool, image):
        for k in range(6):
            d.post_tx(frame(60, k))
        first = vq.recv_burst(pool)
        d.used()
        for k in range(6):
            d.post_tx(frame(60, 10 + k))           # slots 6, 7, then 0..3 (wrap 0)
        return first, vq.recv_burst(pool), d.used()
    seen = same_both_ways(sc, 8, size=8)
    assert seen["out"][1] == [frame(60, 10 + k) for k in range(6)]


def test_tx_pool_running_dry_inside_a_batch_stops_the_same():
    def sc(d, vq, pool, image):
        for k in range(6):
            d.post_tx(frame(60, k))
        return [vq.recv_burst(pool) for _ in range(4)]
    seen = same_both_ways(sc, 4, pool_size=2)
    assert sum(seen["out"], []) == [frame(60, k) for k in range(6)]
    assert seen["stats"]["drop_no_mbuf"] == 2


def test_tx_in_order_batch_is_one_used_descriptor_either_way():
    def sc(d, vq, pool, image):
        with vq:
            vq.set_features(event_idx=False, indirect=True, mrg_rxbuf=False, hdr_len=12,
                            packed=True, in_order=True)
        for k in range(8):
            d.post_tx(frame(60, k))
        return vq.recv_burst(pool)
    same_both_ways(sc, 8)


# -- RX (enqueue) ------------------------------------------------------------------------

def test_rx_single_buffers_are_filled_four_at_a_time():
    def sc(d, vq, pool, image):
        for _ in range(8):
            d.post_rx()
        sent = vq.send_burst(pool, [frame(60 + 200 * k, k) for k in range(8)])
        return sent, rx_seen(d)
    seen = same_both_ways(sc, 8)
    assert seen["out"][0] == 8
    assert [b[12:] for _, _, b in seen["out"][1]] == [frame(60 + 200 * k, k) for k in range(8)]


def test_rx_mergeable_frame_larger_than_a_buffer_is_merged_one_at_a_time():
    def sc(d, vq, pool, image):
        for _ in range(12):
            d.post_rx((256,))
        sent = vq.send_burst(pool, [frame(100), frame(200), frame(1000), frame(60, 1),
                                    frame(60, 2), frame(60, 3), frame(60, 4)])
        return sent, rx_seen(d)
    seen = same_both_ways(sc, 4, mrg_rxbuf=True)
    assert seen["out"][0] == 7


def test_rx_frame_too_large_without_merging_is_dropped_the_same():
    def sc(d, vq, pool, image):
        for _ in range(8):
            d.post_rx((128,))
        sent = vq.send_burst(pool, [frame(60, 0), frame(60, 1), frame(200), frame(60, 3),
                                    frame(60, 4), frame(60, 5), frame(60, 6)])
        return sent, rx_seen(d)
    seen = same_both_ways(sc, 4)
    assert seen["out"][0] == 6 and seen["stats"]["drop_oversize"] == 1


def test_rx_chained_buffer_and_missing_buffers():
    def sc(d, vq, pool, image):
        d.post_rx((100, 1948))                         # a chain: not a batch
        for _ in range(5):
            d.post_rx()
        sent = vq.send_burst(pool, [frame(60, k) for k in range(8)])
        return sent, rx_seen(d)
    seen = same_both_ways(sc, 4)
    assert seen["out"][0] == 6 and seen["stats"]["drop_no_buffer"] == 2


def test_rx_wrap_and_a_bad_chain_after_a_batch():
    def sc(d, vq, pool, image):
        for _ in range(6):
            d.post_rx()
        a = vq.send_burst(pool, [frame(60, k) for k in range(6)])
        first = rx_seen(d)
        for _ in range(4):
            d.post_rx()                                # slots 6, 7, then 0, 1 (wrap 0)
        for k, flags in ((2, F_WRITE), (3, F_WRITE), (4, F_NEXT | F_WRITE), (5, 0)):
            d.write_desc(k, image.alloc(2048), 2048, id=8 + k, flags=packed_flags(0, flags))
        b = vq.send_burst(pool, [frame(60, 10 + k) for k in range(8)])
        return a, first, b
    seen = same_both_ways(sc, 8, size=8)
    assert seen["out"][0] == 6 and seen["out"][2] == 6
    assert (seen["stats"]["drop_bad_desc"], seen["stats"]["drop_no_buffer"]) == (1, 1)


def test_rx_batch_dirty_logs_the_same_pages():
    """Live migration: a batch logs every page it writes (frames and used descriptors)
    exactly as one at a time does."""
    def sc(d, vq, pool, image):
        log = ctypes.create_string_buffer(4096)
        with vq:
            vq.set_log(ctypes.addressof(log), len(log))
            vq.set_log_flags(log_all=True, log_used=False)
        for _ in range(8):
            d.post_rx()
        sent = vq.send_burst(pool, [frame(60 + 250 * k, k) for k in range(8)])
        with vq:
            vq.set_log(0, 0)
        return sent, rx_seen(d), log.raw
    seen = same_both_ways(sc, 8)
    assert seen["out"][0] == 8 and any(seen["out"][2])


def test_one_copy_forwarding_batches_on_both_rings():
    def sc(d, vq, pool, image):
        rxd = PackedDriverRing(image, 16)
        rxq = rxd.make_queue(image.guest_memory())
        rxq.batching = vq.batching
        for k in range(8):
            d.post_tx(frame(1000 + k, k))
            rxd.post_rx()
        moved = vq.forward_burst(pool, rxq)
        return moved, rx_seen(rxd), d.used(), rxq.stats(), rxq.batched
    on, n_on = run(sc, True)
    off, n_off = run(sc, False)
    assert on["out"][:4] == off["out"][:4]
    assert (on["stats"], on["ring"], n_on, n_off) == (off["stats"], off["ring"], 8, 0)
    assert on["out"][0] == (8, 8)
    assert [b[12:] for _, _, b in on["out"][1]] == [frame(1000 + k, k) for k in range(8)]
    assert (on["out"][4], off["out"][4]) == (8, 0)


# -- random rings: the batch path is the one-at-a-time path ---------------------------------

@st.composite
def batchy_round(draw, base, size, w):
    """Per slot: mostly a good single descriptor available in this lap (so batches form),
    else a plausible hostile one (chain or indirect flags, the wrong direction, the other
    lap, lengths of 0 to 4 GiB, slot 0's across the region boundary at ``base``), random
    bytes, or nothing new; plus random bytes at ``base`` for the indirect tables. Buffers
    stay clear of the ring (in the first region, far below ``base``): a guest whose
    buffers overlap its own descriptor ring may see a batch read the descriptors before
    the frames land. Nor do two slots' buffers overlap (each slot has 4 KiB of its own, a
    good buffer in its upper 3 KiB, a hostile one up to 1 KiB below): a guest that posts
    one piece of memory twice gets whichever frame was written there last, and batches
    write theirs before the deferred single ones."""
    slots = []
    for slot in range(size):
        kind = draw(st.sampled_from(["good"] * 6 + ["plausible", "raw", "keep"]))
        if kind == "keep":
            continue
        if kind == "raw":
            slots.append((slot, draw(st.binary(min_size=16, max_size=16))))
            continue
        wrap, flags = 1, w
        addr = base + 0x1000 * slot + 0x400 + draw(st.integers(0, 0x3FF))
        length = draw(st.sampled_from([12, 60, 72, 1500, 2048]))
        if kind == "plausible":
            addr -= draw(st.sampled_from([0, 1024]))
            if slot == 0 and draw(st.booleans()):
                addr = base - 512          # across the region boundary (one slot: no overlap)
            length = draw(st.sampled_from([0, 1, 12, 100, 1500, 0xFFFFFFFF]))
            flags = draw(st.sampled_from([w, w | F_NEXT, F_INDIRECT, F_INDIRECT | F_NEXT,
                                          w ^ F_WRITE]))
            wrap = draw(st.sampled_from([1, 1, 0]))
        slots.append((slot, PDESC.pack(addr & (1 << 64) - 1, length,
                                       draw(st.integers(0, 0xFFFF)),
                                       packed_flags(wrap, flags))))
    return slots, draw(st.binary(max_size=256))


def test_fuzz_packed_batches_are_the_one_at_a_time_path():
    count = Counter("packed rings, batched vs one at a time")
    n = 150
    taken = [0]

    @fuzz_settings(n)
    @given(st.data(), st.sampled_from([4, 5, 8, 16, 64]), st.sampled_from(["tx", "ref", "rx"]),
           st.booleans(), st.lists(st.integers(0, 1600), min_size=1, max_size=32))
    def run(data, size, mode, mrg, sizes):
        count()
        frames = [frame(k, i) for i, k in enumerate(sizes)]
        with GuestImage((MiB, MiB)) as a, GuestImage((MiB, MiB)) as b:
            rings = [PackedDriverRing(img, size) for img in (a, b)]
            base = a.boundary(0)
            rounds = [data.draw(batchy_round(base, size, F_WRITE if mode == "rx" else 0))
                      for _ in range(data.draw(st.integers(1, 3)))]
            seen = []
            for img, d, batching in ((a, rings[0], True), (b, rings[1], False)):
                vq = d.make_queue(img.guest_memory(), mrg_rxbuf=mrg)
                vq.batching = batching
                pool = PacketPool(8 if mode != "rx" else 64, 2048)
                out = []
                for slots, tables in rounds:
                    if vq.broken:
                        with vq:
                            vq.start()
                    for slot, raw in slots:
                        img.write(d.desc_gpa + 16 * slot, raw)
                    img.write(base, tables)
                    if mode == "rx":
                        out.append(vq.send_burst(pool, frames))
                    else:
                        out.append(vq.recv_burst_ref(pool) if mode == "ref"
                                   else vq.recv_burst(pool))
                seen.append((out, vq.stats(), snapshot(img), vq.base, vq.broken,
                             pool.available, vq.batched))
            assert seen[0][:6] == seen[1][:6]
            assert seen[1][6] == 0
            taken[0] += seen[0][6]

    run()
    count.report(n)
    assert taken[0] > 0                     # the batch path was taken, and agreed
