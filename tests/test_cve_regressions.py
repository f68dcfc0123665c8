"""Regression tests named after the CVEs of DPDK's vhost library: what pyvhost does when a
front-end or a guest does what the exploit did. Pass = the process lives, the bad message is
refused (connection closed with a log line, or a failure ack) or the bad packet dropped and
counted, no fd or mapping leaks, nothing read or written out of bounds (these tests also run
under ASan in ``make asan-test``).

CVE ids (DPDK lib/vhost, from the DPDK stable release notes and oss-security advisories):

- CVE-2018-1059  guest-physical -> host translation did not check the length: a descriptor
                 running past its region read host memory
- CVE-2019-14818 fds attached to messages that take none were leaked; SET_VRING_NUM with a
                 bad size (denial of service)
- CVE-2020-10722 SET_LOG_BASE: mmap offset + size overflow (a smaller map than the log)
- CVE-2020-10723 a ring address that did not translate was used anyway
- CVE-2020-10724 vhost-crypto: key lengths not validated
- CVE-2020-10725 memory leak (repeated requests allocating without freeing)
- CVE-2020-10726 fd leak (a replaced fd not closed) and vring index not checked
- CVE-2020-14374, CVE-2020-14375, CVE-2020-14376, CVE-2020-14377, CVE-2020-14378
                 vhost-crypto: out-of-bounds reads/writes, TOCTOU, integer underflow
- CVE-2021-3839  SET_INFLIGHT_FD: queue number not checked (out-of-bounds write)
- CVE-2022-0669  GET/SET_INFLIGHT_FD with an unexpected number of fds (leak, crash)
- CVE-2022-2132  virtio-net header spread over more than two descriptors: buf_avail near
                 4 GiB, every mbuf allocated (denial of service to other guests)

pyvhost has no crypto device and no inflight tracking: those requests are refused unless
their protocol feature was negotiated, and the feature is never offered.
"""

from __future__ import annotations

import logging
import os
import re

import pytest

from pyvhost._pktpool import PacketPool
from pyvhost.backend import NET_FEATURES
from pyvhost.protocol import constants as C
from pyvhost.protocol import payloads as P
from pyvhost.protocol.constants import Request as R
from pyvhost.protocol.messages import RequestError, check_request
from tests.harness.driver import (
    F_NEXT,
    DriverRing,
    GuestImage,
    PackedDriverRing,
    packed_flags,
    vnet_hdr,
)
from tests.harness.vhost_client import (
    eventfd,
    fd_count,
    frontend,
    mem_table,
    negotiate,
    wait_closed,
)

MiB = 1 << 20


def maps_count() -> int:
    with open("/proc/self/maps") as f:
        return sum(1 for _ in f)


def rss_kib() -> int:
    """Resident memory now (VmRSS), not the peak (ru_maxrss never goes down)."""
    with open("/proc/self/status") as f:
        return int(re.search(r"^VmRSS:\s+(\d+) kB", f.read(), re.M).group(1))


@pytest.fixture(autouse=True)
def _no_tracebacks(caplog):
    """Whatever a test checks in the log, nothing in it may be an internal error."""
    caplog.set_level(logging.INFO, logger="pyvhost")
    yield
    assert "Traceback" not in caplog.text, caplog.text
    assert "internal error" not in caplog.text, caplog.text
    assert not [r for r in caplog.records if r.exc_info], caplog.text


def still_serving(server) -> None:
    with frontend(server) as fe:
        assert fe.get_u64(R.GET_FEATURES) == NET_FEATURES


def test_cve_2018_1059_descriptor_past_its_region(image):
    pool = PacketPool(8, 2048)
    d = DriverRing(image, 16)
    vq = d.make_queue(image.guest_memory())
    (head,) = d.take(1)
    d.write_desc(head, image.end - 30, 100)           # runs 70 bytes past guest memory
    d.publish(head)
    d.post_tx(b"ok" * 30)
    assert vq.recv_burst(pool) == [b"ok" * 30]
    assert vq.stats()["drop_bad_desc"] == 1


def test_cve_2019_14818_fds_on_messages_that_take_none(server, caplog):
    still_serving(server)
    base = fd_count()
    for req in (R.SET_OWNER, R.GET_FEATURES, R.SET_FEATURES):
        with frontend(server) as fe:
            body = P.U64(0).pack() if req is R.SET_FEATURES else b""
            fds = [eventfd() for _ in range(3)]
            fe.send(req, body, fds)
            for fd in fds:
                os.close(fd)
            wait_closed(server, fe)
    assert "carries 3 fds" in caplog.text
    assert fd_count() == base                 # the back-end closed every fd it was sent
    still_serving(server)


@pytest.mark.parametrize("num", [0, 3, 100, 32769, 65536, 0xFFFFFFFF])
def test_cve_2019_14818_bad_ring_size(server, num, caplog):
    still_serving(server)
    base = fd_count()
    with frontend(server) as fe:
        negotiate(fe)
        fe.send(R.SET_VRING_NUM, P.VringState(0, num))
        wait_closed(server, fe)
    assert (f"closing connection: SET_VRING_NUM: ring 0: ring size {num} is not a power "
            "of 2 in 1..32768") in caplog.text
    assert fd_count() == base
    still_serving(server)


def test_cve_2020_10722_log_base_overflow_refused():
    body = P.LogBase(0x2000, (1 << 64) - 0x1000).pack()
    with pytest.raises(RequestError, match="overflows"):
        check_request(int(R.SET_LOG_BASE), body, 1, C.bit(C.ProtocolFeature.LOG_SHMFD))
    with pytest.raises(RequestError, match="size 0"):
        check_request(int(R.SET_LOG_BASE), P.LogBase(0, 0).pack(), 1,
                      C.bit(C.ProtocolFeature.LOG_SHMFD))


def test_cve_2020_10722_log_larger_than_its_file_refused(server, caplog):
    still_serving(server)
    base = fd_count()
    memfd = os.memfd_create("log", os.MFD_CLOEXEC)
    os.ftruncate(memfd, 4096)
    try:
        with frontend(server) as fe:
            negotiate(fe, protocol=C.bits(C.ProtocolFeature.REPLY_ACK,
                                          C.ProtocolFeature.LOG_SHMFD))
            fe.send(R.SET_LOG_BASE, P.LogBase(1 << 20, 0), [memfd],
                    flags=C.VERSION | C.FLAG_NEED_REPLY)
            if not fe.closed_by_peer(timeout=2.0):
                pytest.fail("a 1 MiB dirty log over a 4 KiB file was accepted")
            server.sync()
    finally:
        os.close(memfd)
    assert ("closing connection: SET_LOG_BASE: dirty log runs past the end of its file"
            in caplog.text)
    assert server.device.log is None
    assert fd_count() == base                   # the log fd was closed, nothing mapped
    still_serving(server)


def test_cve_2020_10723_ring_addresses_outside_memory(server, image, caplog):
    pool = PacketPool(8, 2048)
    ring = DriverRing(image, 64)
    with frontend(server) as fe:
        negotiate(fe)
        mem_table(fe, image)
        fe.send(R.SET_VRING_NUM, P.VringState(1, 64))
        fe.send(R.SET_VRING_ADDR, P.VringAddr(1, 0, 0x1000, ring.used_uva, ring.avail_uva, 0))
        fe.send(R.SET_VRING_KICK, P.VringFd(1 | C.VRING_NOFD_MASK))
        fe.send(R.SET_VRING_ENABLE, P.VringState(1, 1))
        server.sync()
        vq = server.device.rings[1].vq
        assert not vq.ready
        ring.post_tx(b"x" * 60)
        assert vq.recv_burst(pool) == []
    assert "not inside guest memory" in caplog.text
    still_serving(server)


def test_cve_vhost_crypto_requests_refused(server, caplog):
    """CVE-2020-10724, CVE-2020-14374..14378 (vhost-crypto): one test, not six ids that
    would run the same body; there is no crypto device, the request is refused."""
    with frontend(server) as fe:
        negotiate(fe)
        fe.send(R.CREATE_CRYPTO_SESSION, bytes(8))
        wait_closed(server, fe)
    assert "CREATE_CRYPTO_SESSION needs protocol feature" in caplog.text
    still_serving(server)


def test_cve_2020_10725_no_memory_growth_on_repeated_requests(server, image):
    with frontend(server) as fe:
        negotiate(fe)
        for _ in range(20):
            mem_table(fe, image)
        server.sync()
        maps = maps_count()
        rss = rss_kib()
        for _ in range(300):
            mem_table(fe, image)
            fe.send(R.SET_VRING_NUM, P.VringState(0, 256))
        server.sync()
        assert maps_count() <= maps + 4
        assert rss_kib() - rss < 20 * 1024, (rss, rss_kib())    # KiB, resident now
        assert len(server.device.memory.regions) == len(image.regions)


def test_cve_2020_10726_replaced_fds_closed(server, caplog):
    still_serving(server)
    base = fd_count()
    with frontend(server) as fe:
        negotiate(fe)
        for n in (5, 100):
            for _ in range(n):
                fd = eventfd()
                fe.send(R.SET_VRING_CALL, P.VringFd(0), [fd])
                os.close(fd)
            server.sync()
            if n == 5:
                during = fd_count()
        assert fd_count() == during              # each replaced call fd was closed
    server.sync()
    assert fd_count() == base
    still_serving(server)


@pytest.mark.parametrize("req", [R.SET_VRING_KICK, R.SET_VRING_CALL, R.SET_VRING_ERR])
def test_cve_2020_10726_vring_index_checked(server, req, caplog):
    still_serving(server)
    base = fd_count()
    with frontend(server) as fe:
        negotiate(fe)
        fd = eventfd()
        fe.send(req, P.VringFd(200), [fd])
        os.close(fd)
        wait_closed(server, fe)
    assert fd_count() == base
    still_serving(server)
    assert "ring 200 does not exist" in caplog.text


@pytest.mark.parametrize("req", [R.GET_INFLIGHT_FD, R.SET_INFLIGHT_FD])
@pytest.mark.parametrize("nfds", [0, 1, 4])
def test_cve_2021_3839_and_2022_0669_inflight_refused_fds_closed(server, req, nfds, caplog):
    still_serving(server)
    base = fd_count()
    with frontend(server) as fe:
        negotiate(fe)
        fds = [eventfd() for _ in range(nfds)]
        fe.send(req, P.Inflight(1 << 20, 0, 0xFFFF, 1024), fds)
        for fd in fds:
            os.close(fd)
        wait_closed(server, fe)
    assert f"{req.name} needs protocol feature" in caplog.text
    assert fd_count() == base
    still_serving(server)


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
@pytest.mark.parametrize("splits", [[4, 4, 4], [1] * 12, [5, 1, 1, 1, 4, 30], [3, 3, 3, 3, 48]])
def test_cve_2022_2132_header_over_many_descriptors(packed, splits):
    """The 12-byte header over 3..12 descriptors: delivered intact, one pool buffer used."""
    frame = bytes(range(48))
    hdr = vnet_hdr(num_buffers=0)
    data = hdr + frame
    splits = list(splits)
    splits[-1] += len(data) - sum(splits)
    with GuestImage((MiB, MiB)) as img:
        pool = PacketPool(4, 2048)
        d = PackedDriverRing(img, 32) if packed else DriverRing(img, 32)
        vq = d.make_queue(img.guest_memory())
        d.post_tx(frame, hdr=hdr, splits=splits)
        assert vq.recv_burst(pool) == [frame]
        assert pool.available == pool.count == 4
        # and a header cut short in the middle of its descriptors is dropped, not overread
        if packed:
            at = img.alloc(16, 8)
            img.write(at, hdr[:4])
            slot, wrap = d.next_avail, d.avail_wrap
            d.write_desc(slot + 1, at, 4, 9, packed_flags(wrap if slot + 1 < 32 else wrap ^ 1))
            d.write_desc(slot, at, 4, 9, packed_flags(wrap, F_NEXT))
        else:
            a, b = d.take(2)
            at = img.alloc(16, 8)
            d.write_desc(a, at, 4, F_NEXT, b)
            d.write_desc(b, at, 4)
            d.publish(a)
        assert vq.recv_burst(pool) == []
        s = vq.stats()
        assert s["drop_bad_desc"] + s.get("drop_bad_hdr", 0) == 1 and pool.available == 4
