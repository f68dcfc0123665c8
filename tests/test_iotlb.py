"""VIRTIO_F_ACCESS_PLATFORM in process: the IOTLB cache, IOTLB_MSG update/invalidate, miss
requests on the back-end request channel, rings that wait for (and resume after) a mapping,
permissions, RX frames held across a miss, hostile IOTLB messages, reset on disconnect.

The "guest" maps IOVA == GPA (so the driver ring's descriptors are IOVAs) except where a
test maps an IOVA elsewhere on purpose."""

from __future__ import annotations

import logging
import os
import socket

import pytest

from pyvhost._memory import IotlbMiss, IotlbTable
from pyvhost._pktpool import PacketPool
from pyvhost.backend.iotlb import Iotlb
from pyvhost.protocol import constants as C
from pyvhost.protocol import payloads as P
from pyvhost.protocol import wire
from pyvhost.protocol.constants import BackendRequest as BR
from pyvhost.protocol.constants import Feature as F
from pyvhost.protocol.constants import IotlbType
from pyvhost.protocol.constants import ProtocolFeature as PF
from pyvhost.protocol.constants import Request as R
from tests.harness import vhost_client
from tests.harness.driver import DriverRing
from tests.harness.vhost_client import FEATURES, fd_count, frontend, mem_table, negotiate

IOMMU_FEATURES = FEATURES | C.bit(F.ACCESS_PLATFORM)
IOMMU_PROTOCOL = C.bits(PF.MQ, PF.REPLY_ACK, PF.BACKEND_REQ)
PAGE = 4096
F_WRITE = 2


# -- the cache and the compiled table --------------------------------------------------

def test_cache_merges_splits_and_is_bounded():
    t = Iotlb(max_entries=4)
    t.update(0x1000, PAGE, 0x10000, 3)
    t.update(0x2000, PAGE, 0x11000, 3)            # continues it: merged
    assert t.entries == [(0x1000, 0x2FFF, 0x10000, 3)]
    assert t.table.translate(0x1800, 0x1000, 1) == 0x10800
    t.invalidate(0x1800, 0x100)                   # a hole in the middle: split
    assert t.entries == [(0x1000, 0x17FF, 0x10000, 3), (0x1900, 0x2FFF, 0x10900, 3)]
    with pytest.raises(IotlbMiss) as e:
        t.table.translate(0x1700, 0x200, 1)
    assert e.value.iova == 0x1800
    t.update(0x5000, PAGE, 0x90000, 1)
    with pytest.raises(PermissionError):
        t.table.translate(0x5000, 16, 2)
    t.update(0x6000, PAGE, 0x20000, 1)            # not contiguous with 0x5000's: kept apart
    with pytest.raises(ValueError):
        t.table.translate(0x5F00, 0x200, 1)
    t.update(0x9000, PAGE, 0x30000, 3)            # fifth entry: the oldest goes
    assert len(t) == 4 and t.evictions == 1
    t.invalidate(0, 1 << 64)
    assert len(t) == 0 and len(t.table) == 0
    with pytest.raises(ValueError):
        IotlbTable([(0x2000, 0x2FFF, 0, 3), (0x1000, 0x1FFF, 0, 3)])   # unsorted


# -- the backend over a socket ---------------------------------------------------------

class Session:
    """A front-end that negotiated ACCESS_PLATFORM and gave a back-end request channel."""

    def __init__(self, fe, image):
        self.fe = fe
        self.image = image
        negotiate(fe, protocol=IOMMU_PROTOCOL, features=IOMMU_FEATURES)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.chan = ours
        assert fe.ack(R.SET_BACKEND_REQ_FD, b"", [theirs.fileno()]) == 0
        theirs.close()
        mem_table(fe, image)

    def map(self, iova, size, gpa=None, perm=3) -> int:
        uva = self.image.uva(iova if gpa is None else gpa)
        return self.fe.get_u64(R.IOTLB_MSG, P.IotlbMsg(iova, size, uva, perm, IotlbType.UPDATE))

    def unmap(self, iova, size) -> int:
        return self.fe.get_u64(R.IOTLB_MSG, P.IotlbMsg(iova, size, 0, 0, IotlbType.INVALIDATE))

    def miss(self, timeout=5.0) -> tuple[int, int]:
        m = wire.recv_message_blocking(self.chan, expect_reply=False, timeout=timeout)
        assert m.request == BR.IOTLB_MSG and m.flags == C.VERSION
        p = P.IotlbMsg.unpack(m.payload)
        assert p.type == IotlbType.MISS
        return p.iova, p.perm

    def no_miss(self) -> bool:
        self.chan.settimeout(0.3)
        try:
            return not self.chan.recv(1)
        except TimeoutError:
            return True

    def ring(self, index, ring: DriverRing, kick=None):
        fe = self.fe
        fe.send(R.SET_VRING_NUM, P.VringState(index, ring.size))
        fe.send(R.SET_VRING_ADDR, P.VringAddr(index, 0, ring.desc_gpa, ring.used_gpa,
                                              ring.avail_gpa, 0))    # IOVAs
        fe.send(R.SET_VRING_BASE, P.VringState(index, 0))
        fe.send(R.SET_VRING_KICK, P.VringFd(index | C.VRING_NOFD_MASK))
        assert fe.ack(R.SET_VRING_ENABLE, P.VringState(index, 1)) == 0

    def map_ring(self, ring: DriverRing) -> None:
        for gpa, size in ((ring.desc_gpa, 16 * ring.size), (ring.avail_gpa, 6 + 2 * ring.size),
                          (ring.used_gpa, 6 + 8 * ring.size)):
            start = gpa & ~(PAGE - 1)
            assert self.map(start, (gpa + size - start + PAGE - 1) & ~(PAGE - 1)) == 0
        self.drain()

    def drain(self) -> None:
        """Forget misses sent while the ring was being mapped piece by piece."""
        self.chan.setblocking(False)
        try:
            while self.chan.recv(4096):
                pass
        except BlockingIOError:
            pass
        finally:
            self.chan.setblocking(True)

    def close(self):
        self.chan.close()


def test_ring_start_miss_then_tx_miss_resume(server, image):
    dev = server.device
    pool = PacketPool(16, 2048)
    tx_ring = DriverRing(image, 64)
    with frontend(server) as fe:
        s = Session(fe, image)
        s.ring(1, tx_ring)
        # the ring's addresses are not mapped: a miss for the desc table, ring not started
        assert s.miss() == (tx_ring.desc_gpa, 1)
        assert not dev.rings[1].vq.ready
        server.sync()
        s.map_ring(tx_ring)
        assert dev.rings[1].vq.ready
        # a frame in an unmapped buffer: nothing consumed, one miss (deduplicated)
        buf = image.alloc(PAGE, PAGE)           # a page of its own, not mapped yet
        tx_ring.post_tx(b"\x42" * 60, addrs=[buf])
        assert dev.tx_ring(0).vq.recv_burst(pool) == []
        assert dev.tx_ring(0).vq.recv_burst(pool) == []
        server.sync()
        assert s.miss() == (buf, 1)
        assert s.no_miss()
        assert tx_ring.used_idx() == 0 and dev.tx_ring(0).vq.stats()["iotlb_misses"] == 1
        # the update resumes the ring
        assert s.map(buf & ~(PAGE - 1), PAGE, perm=1) == 0
        assert dev.tx_ring(0).vq.recv_burst(pool) == [b"\x42" * 60]
        assert tx_ring.used_idx() == 1
        # invalidating the ring's pages stops it and asks again
        assert s.unmap(tx_ring.desc_gpa, 16) == 0
        server.sync()
        assert not dev.rings[1].vq.ready
        assert s.miss() == (tx_ring.desc_gpa, 1)
        s.map_ring(tx_ring)
        server.sync()
        assert dev.rings[1].vq.ready
        s.close()


def test_translation_permissions_and_held_rx(server, image):
    dev = server.device
    pool = PacketPool(16, 2048)
    rx_ring = DriverRing(image, 64)
    iova = 0x7F00_0000_0000                 # not a GPA: only the IOTLB knows where it is
    with frontend(server) as fe:
        s = Session(fe, image)
        s.map_ring(rx_ring)
        s.ring(0, rx_ring)
        server.sync()
        assert dev.rings[0].vq.ready
        buf = image.alloc(2048, PAGE)
        (head,) = rx_ring.take(1)
        rx_ring.write_desc(head, iova, 2048, F_WRITE)
        rx_ring.publish(head)
        # the write into an unmapped buffer misses: the frame is held, not dropped
        assert dev.rx_ring(0).vq.send_burst(pool, [b"\x11" * 100]) == 1
        server.sync()
        assert s.miss() == (iova, 2)
        assert rx_ring.used_idx() == 0
        # mapped read-only: the device may not write there -> dropped as a bad descriptor
        assert s.map(iova, PAGE, gpa=buf, perm=1) == 0
        server.sync()
        assert rx_ring.used_idx() == 1 and rx_ring.used_elem(0) == (head, 0)
        assert dev.rx_ring(0).vq.stats()["drop_bad_desc"] == 1
        # a writable mapping: the frame lands in the guest page behind the IOVA
        (head,) = rx_ring.take(1)
        rx_ring.write_desc(head, iova + 0x800, 2048, F_WRITE)
        rx_ring.publish(head)
        assert s.map(iova, PAGE, gpa=buf, perm=3) == 0
        assert dev.rx_ring(0).vq.send_burst(pool, [b"\x22" * 100]) == 1
        assert image.read(buf + 0x800 + 12, 100) == b"\x22" * 100
        s.close()


def test_hostile_iotlb_messages_refused(server, image, caplog):
    caplog.set_level(logging.WARNING, logger="pyvhost.backend")
    with frontend(server) as fe:
        s = Session(fe, image)
        g = image.alloc(PAGE, PAGE)
        uva = image.uva(g)
        for msg in (P.IotlbMsg(0, 0, uva, 3, IotlbType.UPDATE),               # size 0
                    P.IotlbMsg((1 << 64) - PAGE, 2 * PAGE, uva, 3, IotlbType.UPDATE),
                    P.IotlbMsg(0, PAGE, (1 << 64) - 16, 3, IotlbType.UPDATE),
                    P.IotlbMsg(0, PAGE, uva, 0, IotlbType.UPDATE),            # no access
                    P.IotlbMsg(0, PAGE, uva, 4, IotlbType.UPDATE),
                    P.IotlbMsg(0, PAGE, uva, 3, IotlbType.MISS),              # wrong way
                    P.IotlbMsg(0, PAGE, uva, 3, 9)):
            assert fe.get_u64(R.IOTLB_MSG, msg) != 0
        assert len(server.device.iotlb) == 0
        assert "refused" in caplog.text
        # the connection goes on; a global invalidation (size 0, as QEMU sends it) is fine
        assert s.map(g, PAGE) == 0
        assert s.unmap(0, 0) == 0
        assert len(server.device.iotlb) == 0
        assert fe.get_u64(R.GET_FEATURES) & C.bit(F.ACCESS_PLATFORM)
        s.close()


def test_reset_on_disconnect_and_no_leak(server, image):
    dev = server.device
    g = image.alloc(PAGE, PAGE)
    before = fd_count()
    for _ in range(3):
        with frontend(server) as fe:
            s = Session(fe, image)
            s.map(g, PAGE)
            server.sync()
            assert dev.iotlb_event_fd >= 0 and len(dev.iotlb) == 1
            s.close()
        assert dev.iotlb_event_fd == -1 and len(dev.iotlb) == 0
        assert dev.backend_req is None
        assert all(r.vq.iotlb is None for r in dev.rings)
    while vhost_client._TO_CLOSE:                      # our copies of the region fds we sent
        os.close(vhost_client._TO_CLOSE.pop())
    assert fd_count() == before


def test_without_access_platform_nothing_changes(server, image):
    dev = server.device
    pool = PacketPool(16, 2048)
    ring = DriverRing(image, 64)
    with frontend(server) as fe:
        negotiate(fe)
        mem_table(fe, image)
        fe.send(R.SET_VRING_NUM, P.VringState(1, 64))
        fe.send(R.SET_VRING_ADDR, P.VringAddr(1, 0, ring.desc_uva, ring.used_uva,
                                              ring.avail_uva, 0))
        fe.send(R.SET_VRING_KICK, P.VringFd(1 | C.VRING_NOFD_MASK))
        assert fe.ack(R.SET_VRING_ENABLE, P.VringState(1, 1)) == 0
        ring.post_tx(b"\x55" * 60)
        assert dev.tx_ring(0).vq.recv_burst(pool) == [b"\x55" * 60]
        assert dev.iotlb_event_fd == -1 and dev.rings[1].vq.iotlb is None
