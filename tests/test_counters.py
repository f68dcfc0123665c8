"""Every fault a ring or the datapath counts is visible, under the struct's own field
names, and the split and packed layouts count the same fault in the same counter."""

from __future__ import annotations

import asyncio
import json
import os

import pytest

from pyvhost._pktpool import PacketPool
from pyvhost.switch import Switch, run_command
from tests.harness.driver import F_NEXT, F_WRITE, DriverRing, GuestImage, PackedDriverRing

MiB = 1 << 20
RING_FIELDS = {"packets", "bytes", "bursts", "calls", "drop_bad_desc", "drop_no_buffer",
               "drop_oversize", "drop_disabled", "drop_no_mbuf", "ring_errors", "drop_bad_hdr",
               "iotlb_misses", "call_errors", "faults"}
PORT_FIELDS = {"rx_packets", "rx_bytes", "tx_packets", "tx_bytes", "drop_police", "drop_qos",
               "drop_tx_full", "drop_action", "drop_offload", "drop_upcall", "drop_copy",
               "drop_no_port", "drop_mirror_port", "drop_tx_error", "drop_no_recv", "drop_meter"}


def frame(n: int) -> bytes:
    return bytes(i & 0xFF for i in range(n))


def delta(after: dict, before: dict) -> dict:
    return {k: after[k] - before[k] for k in after if after[k] != before[k]}


def ring(image, layout, **kw):
    d = (DriverRing if layout == "split" else PackedDriverRing)(image, 64)
    return d, d.make_queue(image.guest_memory(), **kw)


def unmapped_tx(d, image, layout):
    if layout == "split":
        (h,) = d.take(1)
        d.write_desc(h, 0xDEAD0000000, 64, 0)
        d.publish(h)
    else:
        d.write_desc(d.next_avail, 0xDEAD0000000, 64, 0x77,
                     0x80 if d.avail_wrap else 0x8000)
        d.next_avail += 1
        d.in_flight += 1


def broken_rx(d, image, layout):
    if layout == "split":
        d.set_avail_entry(0, 999)               # a head beyond the ring
        d.set_avail_idx(1)
    else:                                       # a chain longer than the ring
        for slot in range(d.size):
            d.write_desc(slot, image.alloc(64), 64, 0x77,
                         F_WRITE | F_NEXT | (0x80 if d.avail_wrap else 0x8000))


FAULTS = {
    # name: (direction, make it, expected counter deltas)
    "unmapped TX buffer": ("tx", unmapped_tx, {"drop_bad_desc": 1}),
    "RX without buffers": ("rx", lambda d, i, lay: None, {"drop_no_buffer": 2}),
    "broken RX ring": ("rx", broken_rx, {"ring_errors": 1, "drop_no_buffer": 2}),
    "TX frame larger than a packet buffer": (
        "tx", lambda d, i, lay: d.post_tx(frame(3000)), {"drop_oversize": 1}),
    "TX on a disabled ring": ("tx-disabled", lambda d, i, lay: d.post_tx(frame(64)),
                              {"drop_disabled": 1}),
}


@pytest.mark.parametrize("layout", ["split", "packed"])
@pytest.mark.parametrize("name", sorted(FAULTS))
def test_each_fault_has_one_counter_in_both_layouts(layout, name):
    direction, make, want = FAULTS[name]
    pool = PacketPool(64, 2048)
    with GuestImage((MiB, MiB)) as image:
        d, vq = ring(image, layout, enabled=direction != "tx-disabled")
        assert set(vq.stats()) == RING_FIELDS
        before = vq.stats()
        make(d, image, layout)
        if direction == "rx":
            vq.send_burst(pool, [frame(100), frame(100)])
        else:
            vq.recv_burst(pool)
        got = delta(vq.stats(), before)
        got = {k: v for k, v in got.items() if k not in ("bursts", "calls")}
        assert got == want, (layout, name, got)


@pytest.mark.parametrize("layout", ["split", "packed"])
def test_a_call_eventfd_that_cannot_be_written_is_counted(layout):
    pool = PacketPool(64, 2048)
    with GuestImage((MiB, MiB)) as image:
        r, w = os.pipe()
        os.close(r)                               # writes fail (EPIPE)
        d, vq = ring(image, layout, callfd=w)
        d.post_rx([2048])
        import signal
        old = signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        try:
            assert vq.send_burst(pool, [frame(100)]) == 1
        finally:
            signal.signal(signal.SIGPIPE, old)
            os.close(w)
        s = vq.stats()
        assert (s["call_errors"], s["calls"]) == (1, 0), s


def test_dump_ports_shows_every_counter(tmp_path):
    async def scenario():
        sw = Switch(tmp_path / "run")
        await sw.start()
        try:
            for argv in (["add-br", "br0"], ["add-port", "br0", "a", "type=vhostuser"]):
                await run_command(sw, argv)
            data = json.loads(await run_command(sw, ["dump-ports", "--json", "br0"]))
            assert set(data["a"]["datapath"]) == PORT_FIELDS
            assert set(data["a"]["rx_rings"]) == set(data["a"]["tx_rings"]) == RING_FIELDS
            text = await run_command(sw, ["dump-ports", "br0"])
            for field in PORT_FIELDS | RING_FIELDS:
                assert f" {field}=" in text, field
        finally:
            await sw.stop()
    asyncio.run(scenario())
