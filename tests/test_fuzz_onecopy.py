"""A hostile driver against one-copy forwarding (the receive that leaves a frame's tail in
the sender's buffers, and the send that copies it from there), packed and split.

Differential: the same random ring contents in two identical guest images, one read by the
plain receive (vq_dequeue), one by the one-copy receive made whole (vq_dequeue_ref,
vq_materialize, vq_rx_complete), with and without IN_ORDER: the same frames, the same
counters, the same ring positions, and nothing written in guest memory but the ring. Then
the same hostile rings forwarded straight into a well-formed receiver (vq_enqueue from the
sender's buffers): every chain taken is delivered or counted, every packet buffer comes
back, and the bytes delivered are those the plain receive reads from a twin image. Runs
under ASan/UBSan too (test_fuzz_asan.py)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from pyvhost._pktpool import PacketPool
from tests.harness.driver import DriverRing, GuestImage, PackedDriverRing
from tests.harness.fuzzing import Counter, fuzz_settings
from tests.test_fuzz_rings import (
    assert_only_written,
    delta,
    packed_ring_ranges,
    packed_round,
    snapshot,
    split_ring_ranges,
    split_round,
)

MiB = 1 << 20


def load(d, img, layout: str, vq, contents) -> None:
    """Write one random round into the TX ring ``d`` of ``img``."""
    if layout == "packed":
        slots, tables = contents
        for slot, raw in slots:
            img.write(d.desc_gpa + 16 * slot, raw)
        img.write(img.start, tables)
        return
    heads, descs, ahead, tables = contents
    for slot, raw in descs:
        img.write(d.desc_gpa + 16 * slot, raw)
    for k, h in enumerate(heads):
        d.set_avail_entry(k, h)
    img.write(img.start, tables)
    d.set_avail_idx(vq.base + ahead)


def tx_ring(img, layout: str, size: int, indirect: bool, in_order: bool = False):
    d = (DriverRing if layout == "split" else PackedDriverRing)(img, size)
    vq = d.make_queue(img.guest_memory(), indirect=indirect)
    if in_order:                        # VIRTIO_F_IN_ORDER: packed TX bursts complete with
        with vq:                        # one used descriptor
            vq.set_features(event_idx=False, indirect=indirect, mrg_rxbuf=False, hdr_len=12,
                            packed=layout == "packed", in_order=True)
    return d, vq


@st.composite
def good_frames(draw):
    """Well-formed TX chains to mix into the hostile rounds: (frame, splits, indirect)."""
    sizes = draw(st.lists(st.sampled_from([14, 60, 128, 129, 200, 1500, 2030, 2100]),
                          min_size=1, max_size=6))
    return [(bytes((k * 31 + i) & 0xFF for i in range(size)), draw(st.integers(1, 5)),
             draw(st.booleans())) for k, size in enumerate(sizes)]


def post_good(d, frames) -> None:
    for frame, splits, indirect in frames:
        try:
            d.post_tx(frame, splits=splits, indirect=indirect)
        except RuntimeError:            # the driver ring is full (deterministic: both)
            return


def ring_ranges(d, layout: str):
    return packed_ring_ranges(d) if layout == "packed" else split_ring_ranges(d)


def draw_round(data, img, layout: str, size: int):
    return data.draw(packed_round(img, size, 0) if layout == "packed"
                     else split_round(img, size, 0))


def twin_round(data, layout: str, size: int, twins) -> None:
    """The same next round into each (driver ring, image, queue) of ``twins`` (identical
    images): a random hostile one or well-formed frames; a broken queue restarted first."""
    for _, _, vq in twins:
        if vq.broken:
            with vq:
                vq.start()
    if data.draw(st.booleans()):
        contents = draw_round(data, twins[0][1], layout, size)
        for d, img, vq in twins:
            load(d, img, layout, vq, contents)
    else:
        good = data.draw(good_frames())
        for d, _, _ in twins:
            post_good(d, good)


def fuzz_same_as_plain_receive(layout: str, n: int) -> None:
    count = Counter(f"{layout} rings, hostile driver, one-copy receive vs plain")
    long_frames = []                # frames past the copied head: the one-copy receive ran

    @fuzz_settings(n)
    @given(st.data(), st.sampled_from([1, 2, 16, 64]), st.booleans(), st.booleans())
    def run(data, size, indirect, in_order):
        count()
        with GuestImage((MiB, MiB)) as img1, GuestImage((MiB, MiB)) as img2:
            d1, vq1 = tx_ring(img1, layout, size, indirect, in_order)
            d2, vq2 = tx_ring(img2, layout, size, indirect, in_order)
            assert (d1.desc_gpa, img1.start) == (d2.desc_gpa, img2.start)
            pool1, pool2 = PacketPool(8, 2048), PacketPool(8, 2048)
            for _ in range(data.draw(st.integers(1, 3))):
                twin_round(data, layout, size, [(d1, img1, vq1), (d2, img2, vq2)])
                for _ in range(2):
                    b1, b2 = vq1.stats(), vq2.stats()
                    mem2 = snapshot(img2)
                    plain = vq1.recv_burst(pool1)
                    ref = vq2.recv_burst_ref(pool2)
                    assert_only_written(img2, mem2, ring_ranges(d2, layout))
                    assert ref == plain
                    for lo, hi in ring_ranges(d1, layout):    # the same used entries
                        assert img1.read(lo, hi - lo) == img2.read(lo, hi - lo)
                    long_frames.extend(f for f in ref if len(f) > 128)
                    assert delta(vq2.stats(), b2) == delta(vq1.stats(), b1)
                    assert vq2.base == vq1.base and vq2.broken == vq1.broken
                    assert pool1.available == pool1.count and pool2.available == pool2.count

    run()
    count.report(n)
    assert long_frames, "no frame longer than the copied head was generated"


def test_fuzz_split_one_copy_receive_is_the_plain_receive():
    fuzz_same_as_plain_receive("split", 120)


def test_fuzz_packed_one_copy_receive_is_the_plain_receive():
    fuzz_same_as_plain_receive("packed", 120)


def test_packed_frame_lying_over_a_used_slot_reads_what_the_driver_left():
    """The packed fuzzer's find: a burst gives a hostile chain (no bytes) back, then takes a
    frame whose buffer lies over that chain's slot, where its used descriptor goes. No
    chain of the burst goes back before the burst's frames are read: both receives read
    the slot as the driver left it (the plain one read it after the used descriptor was
    stored, one-copy before)."""
    got = []
    for one_copy in (False, True):
        with GuestImage((MiB, MiB)) as img:
            d, vq = tx_ring(img, "packed", 16, False)
            bad = d.desc_gpa + 16 * 10
            d.write_desc(10, img.start, 0, 0, 0x81)        # avail (wrap 1), NEXT: 0 bytes
            d.write_desc(11, 0, 0, 0, 0)
            d.write_desc(12, bad + 15 - 12, 16, 0, 0x80)   # header, then 10's flags on
            post_good(d, [(bytes(range(k, k + 14)), 1, False) for k in range(5)]
                      + [(bytes(14), 5, False)])         # slots 0-9
            before = img.read(bad + 15, 4)
            pool = PacketPool(8, 2048)
            got.append(vq.recv_burst_ref(pool) if one_copy else vq.recv_burst(pool))
            assert d.read_desc(10)[3] & 0x8080 == 0x8080   # 10 was given back, used
            assert vq.stats()["drop_bad_desc"] == 1
    assert len(got[0]) == 7 and got[0][6] == before
    assert got[0] == got[1]


def received(r, mrg: bool, hdr_len: int = 12) -> list[bytes]:
    """The frames a receiver's used ring holds: without mergeable buffers a buffer given
    back unused (length 0) holds none; with them the header (which may span small
    buffers, an empty one included) says how many buffers the frame took."""
    out, used, i = [], r.used(), 0
    while i < len(used):
        head, length = used[i]
        if length == 0 and not mrg:
            i += 1
            continue
        data, k = r.rx_bytes(head, length), i + 1
        while len(data) < hdr_len and k < len(used):
            data += r.rx_bytes(*used[k])
            k += 1
        nbufs = int.from_bytes(data[10:12], "little") if mrg else 1
        assert nbufs >= k - i, (nbufs, k - i)
        for head, length in used[k:i + nbufs]:
            data += r.rx_bytes(head, length)
        i += nbufs
        out.append(data[hdr_len:])
    return out


def is_subsequence(small, big) -> bool:
    it = iter(big)
    return all(any(x == y for y in it) for x in small)


def test_fuzz_forward_hostile_sender_into_a_good_receiver():
    """Hostile rings forwarded (one copy, straight from the sender's buffers) into a good
    receiver: every chain taken is delivered or counted, every packet buffer comes back;
    and the same rings in a twin image read by the plain receive: the frames delivered
    are, byte for byte and in order, those of the plain receive (some left out: the
    receiver's buffers are random, some too small), each once."""
    count = Counter("hostile sender, one-copy forward")
    n = 300

    @fuzz_settings(n)
    @given(st.data(), st.sampled_from(["split", "packed"]), st.sampled_from(["split", "packed"]),
           st.sampled_from([1, 2, 16, 64]), st.booleans(), st.booleans(),
           st.lists(st.integers(0, 2100), min_size=0, max_size=8))
    def run(data, src_layout, dst_layout, size, indirect, mrg, rx_sizes):
        count()
        with GuestImage((MiB, MiB)) as img, GuestImage((MiB, MiB)) as img2, \
                GuestImage((MiB,)) as dimg:
            d, vq = tx_ring(img, src_layout, size, indirect)
            d2, vq2 = tx_ring(img2, src_layout, size, indirect)
            r = (DriverRing if dst_layout == "split" else PackedDriverRing)(dimg, 64)
            dst = r.make_queue(dimg.guest_memory(), mrg_rxbuf=mrg)
            for length in rx_sizes:
                r.post_rx([length])
            pool, pool2 = PacketPool(8, 2048), PacketPool(8, 2048)
            for _ in range(data.draw(st.integers(1, 3))):
                twin_round(data, src_layout, size, [(d, img, vq), (d2, img2, vq2)])
                before, dbefore = vq.stats(), dst.stats()
                mem = snapshot(img)
                taken, sent = vq.forward_burst(pool, dst)
                assert_only_written(img, mem, ring_ranges(d, src_layout))
                dd, ddst = delta(vq.stats(), before), delta(dst.stats(), dbefore)
                assert taken == dd.get("packets", 0)
                assert sent == ddst.get("packets", 0) <= taken
                assert sent + sum(v for k, v in ddst.items() if k.startswith("drop_")) \
                    >= taken, ddst
                assert pool.available == pool.count
                if src_layout == "packed":
                    assert (vq.base & 0x7FFF) < size
                plain = vq2.recv_burst(pool2)
                got = received(r, mrg)
                assert len(got) == sent, (got, sent)
                assert is_subsequence(got, plain), (len(got), len(plain))

    run()
    count.report(n)
