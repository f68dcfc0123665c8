"""Live-migration support in the compiled rings: the dirty-page log (VHOST_F_LOG_ALL, the
used ring with VHOST_VRING_F_LOG) and the RARP frame SEND_RARP puts at the head of the
next burst from the guest."""

from __future__ import annotations

import mmap
import os

import pytest

from pyvhost._memory import Mapping
from pyvhost._pktpool import PacketPool
from tests.harness.driver import DriverRing, GuestImage, PackedDriverRing

PAGE = 4096
LOG_BYTES = 4096                    # covers 32768 pages = 128 MiB of guest addresses
MAC = bytes.fromhex("525400abcdef")


@pytest.fixture
def setup():
    image = GuestImage((1 << 20,))
    memory = image.guest_memory()
    fd = os.memfd_create("dirty-log")
    os.ftruncate(fd, LOG_BYTES)
    log_map = Mapping(fd, LOG_BYTES)
    view = mmap.mmap(fd, LOG_BYTES)
    os.close(fd)
    try:
        yield image, memory, log_map, view
    finally:
        view.close()
        log_map.close()
        memory.clear()
        image.close()


def dirty_pages(view) -> set[int]:
    pages = set()
    for i, byte in enumerate(view[:LOG_BYTES]):
        for b in range(8):
            if byte & (1 << b):
                pages.add(i * 8 + b)
    return pages


def pages_of(gpa: int, length: int) -> set[int]:
    return set(range(gpa // PAGE, (gpa + length - 1) // PAGE + 1))


def test_rx_buffers_and_used_ring_are_logged(setup):
    image, memory, log_map, view = setup
    ring = DriverRing(image, 64)
    vq = ring.make_queue(memory)
    pool = PacketPool(64, 2048)
    frame = bytes(range(256)) * 4
    head = ring.post_rx((2048,))
    with vq:
        vq.set_log(log_map.addr, LOG_BYTES)
        vq.set_log_flags(log_all=False, log_used=True, log_used_gpa=ring.used_gpa)
    assert vq.send_burst(pool, [frame]) == 1
    assert dirty_pages(view) == set()                     # logging off: nothing marked

    head = ring.post_rx((2048,))
    buf_gpa, _ = ring.buffers[head][0]
    with vq:
        vq.set_log_flags(log_all=True, log_used=True, log_used_gpa=ring.used_gpa)
    assert vq.send_burst(pool, [frame]) == 1
    expected = pages_of(buf_gpa, 12 + len(frame)) | pages_of(ring.used_gpa, 6 + 8 * 64)
    assert dirty_pages(view) == expected
    assert ring.rx_bytes(head, 12 + len(frame))[12:] == frame


def test_tx_logs_only_the_used_ring(setup):
    image, memory, log_map, view = setup
    ring = DriverRing(image, 64)
    vq = ring.make_queue(memory)
    with vq:
        vq.set_log(log_map.addr, LOG_BYTES)
        vq.set_log_flags(log_all=True, log_used=True, log_used_gpa=ring.used_gpa)
    ring.post_tx(b"\x01" * 60)
    assert len(vq.recv_burst(PacketPool(64, 2048))) == 1
    assert dirty_pages(view) == pages_of(ring.used_gpa, 6 + 8 * 64)


def test_log_smaller_than_memory_is_never_overrun(setup):
    image, memory, log_map, view = setup
    ring = DriverRing(image, 64)
    vq = ring.make_queue(memory)
    with vq:
        vq.set_log(log_map.addr, 1)                        # 8 pages: below every buffer
        vq.set_log_flags(log_all=True, log_used=True, log_used_gpa=ring.used_gpa)
    ring.post_rx((2048,))
    assert vq.send_burst(PacketPool(64, 2048), [b"\x02" * 100]) == 1
    assert dirty_pages(view) == set()


def test_rarp_heads_the_next_burst(setup):
    image, memory, _, _ = setup
    ring = DriverRing(image, 64)
    vq = ring.make_queue(memory)
    pool = PacketPool(64, 2048)
    ring.post_tx(b"\x03" * 60)
    with vq:
        vq.inject_rarp(MAC)
    frames = vq.recv_burst(pool)
    assert len(frames) == 2 and frames[1] == b"\x03" * 60
    rarp = frames[0]
    assert rarp[:6] == b"\xff" * 6 and rarp[6:12] == MAC and rarp[12:14] == b"\x80\x35"
    assert rarp[20:22] == b"\x00\x03" and rarp[22:28] == MAC and rarp[32:38] == MAC
    assert vq.recv_burst(pool) == []                       # announced once


def test_packed_used_descriptors_are_logged(setup):
    """Review finding: a packed ring's used entries live in the descriptor ring; they must
    be dirty-logged too, or the destination resumes from stale descriptors."""
    image, memory, log_map, view = setup
    ring = PackedDriverRing(image, 64)
    vq = ring.make_queue(memory)
    with vq:
        vq.set_log(log_map.addr, LOG_BYTES)
        vq.set_log_flags(log_all=True, log_used=True, log_used_gpa=ring.device_event_gpa)
    ring.post_tx(b"\x05" * 60)
    assert len(vq.recv_burst(PacketPool(64, 2048))) == 1
    assert pages_of(ring.desc_gpa, 16) <= dirty_pages(view)
