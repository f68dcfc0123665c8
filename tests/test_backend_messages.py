"""The vhost-user back-end in process: a NetDevice served by an Endpoint on a temporary
socket, its asyncio loop in a thread, driven by a tiny blocking front-end written here with
send_message / recv_message_blocking. The QEMU-like setup sequence with traffic through the
Python driver ring, REPLY_ACK, memory hot-plug, reset; then malformed input, each of which
must close only that connection, with a log line naming the request, and leak no fd."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
import threading
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyvhost._pktpool import PacketPool
from pyvhost.backend import NET_FEATURES, NET_PROTOCOL_FEATURES, NetDevice
from pyvhost.protocol import constants as C
from pyvhost.protocol import payloads as P
from pyvhost.protocol import wire
from pyvhost.protocol.constants import Feature as F
from pyvhost.protocol.constants import ProtocolFeature as PF
from pyvhost.protocol.constants import Request as R
from pyvhost.protocol.messages import SPECS
from tests.harness.driver import DriverRing, vnet_hdr
from tests.harness.fuzzing import Counter, fuzz_settings
from tests.harness.vhost_client import (
    _TO_CLOSE,
    FEATURES,
    PROTOCOL,
    QUEUE_PAIRS,
    MiB,
    Server,
    eventfd,
    fd_count,
    frontend,
    mem_table,
    negotiate,
    region_fds,
    setup_ring,
    wait_closed,
)

# ======================================================================================
# the normal sequence
# ======================================================================================

def test_qemu_like_sequence_with_traffic(server, image):
    pool = PacketPool(64, 2048)
    rings = [DriverRing(image, 256) for _ in range(2 * QUEUE_PAIRS)]
    kicks = [eventfd() for _ in rings]
    calls = [eventfd() for _ in rings]
    dev = server.device
    try:
        with frontend(server) as fe:
            feats = fe.get_u64(R.GET_FEATURES)
            assert feats == NET_FEATURES
            fe.send(R.SET_OWNER)
            assert fe.get_u64(R.GET_PROTOCOL_FEATURES) == NET_PROTOCOL_FEATURES
            fe.send(R.SET_PROTOCOL_FEATURES, P.U64(PROTOCOL))
            assert fe.get_u64(R.GET_QUEUE_NUM) == QUEUE_PAIRS
            assert fe.get_u64(R.GET_MAX_MEM_SLOTS) == 509
            fe.send(R.SET_FEATURES, P.U64(FEATURES))
            mem_table(fe, image)
            for i, ring in enumerate(rings):
                setup_ring(fe, ring, i, kick=kicks[i], call=calls[i], enable=False)
            server.sync()
            assert all(not r.vq.enabled for r in dev.rings)    # bit 30: rings start disabled
            for i in range(len(rings)):
                assert fe.ack(R.SET_VRING_ENABLE, P.VringState(i, 1)) == 0
            assert all(r.vq.ready and r.vq.enabled for r in dev.rings)
            assert dev.features == FEATURES and dev.protocol_features == PROTOCOL

            # guest TX on queue pair 1 (ring 3) -> the device
            tx = rings[3]
            for k in range(5):
                tx.post_tx(bytes([k]) * 60, splits=2, indirect=bool(k & 1))
            got = dev.tx_ring(1).vq.recv_burst(pool)
            assert got == [bytes([k]) * 60 for k in range(5)]
            assert os.eventfd_read(calls[3]) >= 1
            # the device -> guest RX on queue pair 0 (ring 0), mergeable buffers
            rx = rings[0]
            for _ in range(8):
                rx.post_rx([512])
            assert dev.rx_ring(0).vq.send_burst(pool, [b"\xab" * 1000, b"\xcd" * 60]) == 2
            used = rx.used()
            assert len(used) == 3
            assert rx.rx_bytes(*used[0])[:12] == vnet_hdr(num_buffers=2)
            assert os.eventfd_read(calls[0]) >= 1

            # GET_VRING_BASE stops the ring and says where to resume
            assert P.VringState.unpack(fe.get(R.GET_VRING_BASE, P.VringState(3, 0)).payload) \
                == P.VringState(3, 5)
            assert P.VringState.unpack(fe.get(R.GET_VRING_BASE, P.VringState(0, 0)).payload) \
                == P.VringState(0, 3)
            assert not dev.rings[3].vq.ready and not dev.rings[0].vq.ready
            tx.post_tx(b"late" * 20)
            assert dev.tx_ring(1).vq.recv_burst(pool) == []
            # restart from that base: the late frame comes through
            fe.send(R.SET_VRING_BASE, P.VringState(3, 5))
            fe.send(R.SET_VRING_KICK, P.VringFd(3), [kicks[3]])
            assert fe.ack(R.SET_VRING_ENABLE, P.VringState(3, 1)) == 0
            assert dev.tx_ring(1).vq.recv_burst(pool) == [b"late" * 20]
        # disconnect: everything back to the initial state
        assert dev.features == 0 and dev.memory.regions == []
        assert all(not r.vq.ready and r.vq.kickfd == -1 and r.vq.callfd == -1
                   for r in dev.rings)
    finally:
        for fd in kicks + calls:
            os.close(fd)


def test_reply_ack(server, image, caplog):
    ring = DriverRing(image, 64)
    with frontend(server) as fe:
        negotiate(fe)
        assert fe.ack(R.SET_MEM_TABLE, P.MemTable(tuple(image.descs())),
                      region_fds(image)) == 0
        assert fe.ack(R.SET_VRING_NUM, P.VringState(0, 64)) == 0
        assert fe.ack(R.SET_VRING_ADDR, P.VringAddr(0, 0, ring.desc_uva, ring.used_uva,
                                                    ring.avail_uva, 0)) == 0
        # used-ring logging (live migration) is accepted
        assert fe.ack(R.SET_VRING_ADDR, P.VringAddr(0, C.VRING_F_LOG, ring.desc_uva,
                                                    ring.used_uva, ring.avail_uva, 0)) == 0
        # a request the device declines: failure ack, the connection goes on
        assert fe.ack(R.REM_MEM_REG, P.SingleMemRegion(P.MemRegion(1 << 40, 4096, 0, 0))) != 0
        assert fe.ack(R.SET_STATUS, P.U64(0x0F)) == 0
        assert fe.get_u64(R.GET_STATUS) == 0x0F
        # GET_* answer with their reply, never an extra ack
        assert fe.get_u64(R.GET_FEATURES, b"") == NET_FEATURES
        assert fe.get(R.GET_FEATURES, flags=C.VERSION | C.FLAG_NEED_REPLY).payload == \
            P.U64(NET_FEATURES).pack()
        # input the device cannot accept: failure ack, then the connection is closed
        assert fe.ack(R.SET_VRING_NUM, P.VringState(0, 3)) != 0
        wait_closed(server, fe)
    assert "SET_VRING_NUM" in caplog.text


def test_no_ack_without_reply_ack_negotiated(server):
    with frontend(server) as fe:
        negotiate(fe, protocol=C.bits(PF.MQ))
        fe.send(R.SET_VRING_NUM, P.VringState(0, 64), flags=C.VERSION | C.FLAG_NEED_REPLY)
        # the next reply on the wire is GET_FEATURES', not an ack
        assert fe.get(R.GET_FEATURES).request == R.GET_FEATURES


def test_set_features_without_protocol_bit_enables_all_rings(server):
    with frontend(server) as fe:
        fe.get_u64(R.GET_FEATURES)
        fe.send(R.SET_OWNER)
        fe.send(R.SET_FEATURES, P.U64(C.bit(F.VERSION_1)))
        fe.get_u64(R.GET_FEATURES)
        assert all(r.enabled and r.vq.enabled for r in server.device.rings)
    with frontend(server) as fe:
        negotiate(fe)
        fe.get_u64(R.GET_FEATURES)
        assert not any(r.enabled for r in server.device.rings)


def test_set_features_not_offered_closes(server, caplog):
    with frontend(server) as fe:
        fe.send(R.SET_FEATURES, P.U64(C.bit(F.NET_CTRL_VQ) | C.bit(F.VERSION_1)))
        wait_closed(server, fe)
    assert "features" in caplog.text
    with frontend(server) as fe:
        fe.send(R.SET_PROTOCOL_FEATURES, P.U64(C.bit(PF.PAGEFAULT)))
        wait_closed(server, fe)


def test_reset_device(sockdir, image):
    dev = NetDevice(QUEUE_PAIRS, name="reset")
    dev.protocol_features_offered = NET_PROTOCOL_FEATURES | C.bit(PF.RESET_DEVICE)
    server = Server(os.path.join(sockdir, "r.sock"), dev)
    pool = PacketPool(16, 2048)
    try:
        with frontend(server) as fe:
            protocol = PROTOCOL | C.bit(PF.RESET_DEVICE)
            negotiate(fe, protocol=protocol)
            mem_table(fe, image)
            ring = DriverRing(image, 64)
            setup_ring(fe, ring, 1)
            assert fe.ack(R.RESET_DEVICE) == 0
            assert dev.memory.regions == [] and dev.features == 0
            assert dev.owner and dev.protocol_features == protocol
            assert not any(r.vq.ready or r.enabled for r in dev.rings)
            # set up again from scratch: traffic flows
            fe.send(R.SET_FEATURES, P.U64(FEATURES))
            mem_table(fe, image)
            ring2 = DriverRing(image, 64)
            setup_ring(fe, ring2, 1)
            assert fe.ack(R.SET_VRING_ENABLE, P.VringState(1, 1)) == 0
            ring2.post_tx(b"x" * 64)
            assert dev.rings[1].vq.recv_burst(pool) == [b"x" * 64]
        # not offered: the gate refuses it
        dev.protocol_features_offered = NET_PROTOCOL_FEATURES
        with frontend(server) as fe:
            negotiate(fe)
            fe.send(R.RESET_DEVICE)
            wait_closed(server, fe)
    finally:
        server.close()


def test_reset_owner_keeps_the_connection(server, image):
    with frontend(server) as fe:
        negotiate(fe)
        mem_table(fe, image)
        setup_ring(fe, DriverRing(image, 64), 0)
        assert fe.ack(R.RESET_OWNER) == 0
        assert not server.device.rings[0].vq.ready
        assert fe.get_u64(R.GET_FEATURES) == NET_FEATURES


def test_add_and_remove_memory_regions(server, image):
    pool = PacketPool(16, 2048)
    dev = server.device
    ring = DriverRing(image, 64)
    descs = image.descs()
    with frontend(server) as fe:
        negotiate(fe)
        assert fe.get_u64(R.GET_MAX_MEM_SLOTS) == 509
        for d, fd in zip(descs, region_fds(image), strict=True):
            assert fe.ack(R.ADD_MEM_REG, P.SingleMemRegion(d), [fd]) == 0
        assert len(dev.memory.regions) == 2
        setup_ring(fe, ring, 1)
        assert fe.ack(R.SET_VRING_ENABLE, P.VringState(1, 1)) == 0
        ring.post_tx(b"a" * 64)
        assert dev.rings[1].vq.recv_burst(pool) == [b"a" * 64]
        # the region holding the ring goes: the ring stops, nothing is touched
        assert fe.ack(R.REM_MEM_REG, P.SingleMemRegion(descs[0])) == 0
        assert len(dev.memory.regions) == 1
        assert not dev.rings[1].vq.ready
        ring.post_tx(b"b" * 64)
        assert dev.rings[1].vq.recv_burst(pool) == []
        # and comes back (REM_MEM_REG may carry a stray fd: it is closed)
        (fd,) = region_fds(image, 1)
        assert fe.ack(R.ADD_MEM_REG, P.SingleMemRegion(descs[0]), [fd]) == 0
        assert dev.rings[1].vq.ready
        assert dev.rings[1].vq.recv_burst(pool) == [b"b" * 64]
        before = fd_count()
        extra = eventfd()
        assert fe.ack(R.REM_MEM_REG, P.SingleMemRegion(descs[1]), [extra]) == 0
        os.close(extra)
        assert fd_count() == before
        # overlapping a present region: refused, connection closed
        fe.send(R.ADD_MEM_REG, P.SingleMemRegion(P.MemRegion(
            descs[0].guest_phys_addr + 4096, 4096, 0x1000, 0)), region_fds(image, 1))
        wait_closed(server, fe)


def test_second_frontend_refused_while_one_is_connected(server):
    with frontend(server) as fe1:
        fe1.get_u64(R.GET_FEATURES)
        with frontend(server) as fe2:
            assert fe2.closed_by_peer()
        assert fe1.get_u64(R.GET_FEATURES) == NET_FEATURES


# ======================================================================================
# malformed input: only that connection closes, with a log line, and no fd leaks
# ======================================================================================

def _bad_version(fe, image):
    fe.send(R.SET_OWNER, flags=2)


def _reply_flag(fe, image):
    fe.send(R.SET_OWNER, flags=C.VERSION | C.FLAG_REPLY)


def _unknown_flag(fe, image):
    fe.send(R.SET_OWNER, flags=C.VERSION | 0x100)


def _oversized(fe, image):
    fe.sock.sendall(wire.encode_header(R.SET_CONFIG, C.VERSION, C.MAX_PAYLOAD + 1))


def _two_calls_in_one(fe, image):
    a, b = eventfd(), eventfd()
    fe.send(R.SET_VRING_CALL, P.VringFd(0), [a, b])
    os.close(a)
    os.close(b)


def _kick_nofd_with_fd(fe, image):
    a = eventfd()
    fe.send(R.SET_VRING_KICK, P.VringFd(0 | C.VRING_NOFD_MASK), [a])
    os.close(a)


def _kick_without_fd(fe, image):
    fe.send(R.SET_VRING_KICK, P.VringFd(0))


def _fd_on_set_owner(fe, image):
    a = eventfd()
    fe.send(R.SET_OWNER, b"", [a])
    os.close(a)


def _mem_table_missing_fd(fe, image):
    fe.send(R.SET_MEM_TABLE, P.MemTable(tuple(image.descs())), region_fds(image, 1))


def _mem_table_overlap(fe, image):
    d = image.descs()[0]
    other = P.MemRegion(d.guest_phys_addr + 4096, 4096, 0x10000, 0)
    fe.send(R.SET_MEM_TABLE, P.MemTable((d, other)), region_fds(image))


def _mem_table_uva_overlap(fe, image):
    d0, d1 = image.descs()
    other = P.MemRegion(d1.guest_phys_addr, d1.size, d0.userspace_addr + 4096, 0)
    fe.send(R.SET_MEM_TABLE, P.MemTable((d0, other)), region_fds(image))


def _mem_table_past_file(fe, image):
    d = image.descs()[0]
    fe.send(R.SET_MEM_TABLE, P.MemTable((P.MemRegion(d.guest_phys_addr, d.size * 2,
                                                     d.userspace_addr, 0),)),
            region_fds(image, 1))


def _mem_table_not_a_file(fe, image):
    a = eventfd()
    fe.send(R.SET_MEM_TABLE, P.MemTable((image.descs()[0],)), [a])
    os.close(a)


def _mem_table_zero_regions(fe, image):
    fe.send(R.SET_MEM_TABLE, struct.pack("=II", 0, 0))


def _short_payload(fe, image):
    fe.send(R.SET_FEATURES, b"\0\0\0\0")


def _long_payload(fe, image):
    fe.send(R.SET_VRING_NUM, bytes(12))


def _payload_on_get(fe, image):
    fe.send(R.GET_FEATURES, bytes(4))


def _truncated_stream(fe, image):
    fe.sock.sendall(wire.encode_header(R.SET_FEATURES, C.VERSION, 8) + b"\0\0\0")
    fe.sock.shutdown(socket.SHUT_WR)


def _unknown(code):
    def send(fe, image):
        fe.send(code, bytes(8))
    return send


def _ring(req, index, num=64):
    def send(fe, image):
        fe.send(req, P.VringState(index, num))
    return send


def _kick_ring(index):
    def send(fe, image):
        a = eventfd()
        fe.send(R.SET_VRING_KICK, P.VringFd(index), [a])
        os.close(a)
    return send


def _gated(req, payload=b""):
    def send(fe, image):
        fe.send(req, payload)
    return send


def _enable_value(fe, image):
    fe.send(R.SET_VRING_ENABLE, P.VringState(0, 2))


def _vring_base_reserved(fe, image):
    fe.send(R.SET_VRING_BASE, P.VringState(0, 0x10000))


def _vring_addr_flags(fe, image):
    fe.send(R.SET_VRING_ADDR, P.VringAddr(0, 2, 0, 0, 0, 0).pack())


def _mtu(fe, image):
    fe.send(R.NET_SET_MTU, P.U64(20))


def _status(fe, image):
    fe.send(R.SET_STATUS, P.U64(0x100))


# name -> (what to send, text the log line must contain, negotiate first)
MALFORMED = {
    "bad_version": (_bad_version, "SET_OWNER: bad version", False),
    "reply_flag_on_request": (_reply_flag, "SET_OWNER: reply flag", False),
    "unknown_flag": (_unknown_flag, "SET_OWNER: unknown flags", False),
    "oversized": (_oversized, "SET_CONFIG: payload size", False),
    "unknown_request": (_unknown(99), "unknown request id 99", False),
    "request_0": (_unknown(0), "unknown request id 0", False),
    "short_payload": (_short_payload, "SET_FEATURES: U64 payload is 4 bytes", False),
    "long_payload": (_long_payload, "SET_VRING_NUM: VringState payload is 12", False),
    "payload_on_get": (_payload_on_get, "GET_FEATURES", False),
    "fds_2_on_call": (_two_calls_in_one, "SET_VRING_CALL carries 2 fds", False),
    "fd_with_nofd_bit": (_kick_nofd_with_fd, "SET_VRING_KICK carries 1 fds", False),
    "kick_without_fd": (_kick_without_fd, "SET_VRING_KICK carries 0 fds", False),
    "fd_on_set_owner": (_fd_on_set_owner, "SET_OWNER carries 1 fds", False),
    "mem_table_missing_fd": (_mem_table_missing_fd, "SET_MEM_TABLE carries 1 fds", False),
    "mem_table_overlap": (_mem_table_overlap, "SET_MEM_TABLE: guest range", False),
    "mem_table_uva_overlap": (_mem_table_uva_overlap, "SET_MEM_TABLE: user range", False),
    "mem_table_past_file": (_mem_table_past_file, "SET_MEM_TABLE: region ends", False),
    "mem_table_not_a_file": (_mem_table_not_a_file, "SET_MEM_TABLE: memory fd", False),
    "mem_table_zero_regions": (_mem_table_zero_regions, "SET_MEM_TABLE: memory table", False),
    "gated_queue_num": (_gated(R.GET_QUEUE_NUM), "GET_QUEUE_NUM needs protocol feature MQ",
                        False),
    "gated_max_mem_slots": (_gated(R.GET_MAX_MEM_SLOTS), "GET_MAX_MEM_SLOTS needs", False),
    "gated_add_mem_reg": (_gated(R.ADD_MEM_REG, bytes(40)), "ADD_MEM_REG needs", False),
    "gated_rarp": (_gated(R.SEND_RARP, bytes(8)), "SEND_RARP needs", False),
    "gated_log_base": (_gated(R.SET_LOG_BASE, bytes(16)), "SET_LOG_BASE needs", True),
    "gated_inflight": (_gated(R.GET_INFLIGHT_FD, bytes(24)), "GET_INFLIGHT_FD needs", True),
    "ring_index_num": (_ring(R.SET_VRING_NUM, 2 * QUEUE_PAIRS), "SET_VRING_NUM: ring 4",
                       False),
    "ring_index_255": (_ring(R.SET_VRING_BASE, 255), "SET_VRING_BASE: ring 255", False),
    "ring_index_256": (_ring(R.SET_VRING_NUM, 256), "SET_VRING_NUM: vring index 256", False),
    "ring_index_get_base": (_ring(R.GET_VRING_BASE, 2 * QUEUE_PAIRS, 0), "GET_VRING_BASE",
                            False),
    "ring_index_enable": (_ring(R.SET_VRING_ENABLE, 7, 1), "SET_VRING_ENABLE: ring 7", False),
    "ring_index_kick": (_kick_ring(2 * QUEUE_PAIRS), "SET_VRING_KICK: ring 4", False),
    "ring_size_0": (_ring(R.SET_VRING_NUM, 0, 0), "SET_VRING_NUM: ring 0", False),
    "ring_size_3": (_ring(R.SET_VRING_NUM, 0, 3), "SET_VRING_NUM: ring 0", False),
    "ring_size_100": (_ring(R.SET_VRING_NUM, 1, 100), "SET_VRING_NUM: ring 1", False),
    "ring_size_65536": (_ring(R.SET_VRING_NUM, 0, 65536), "SET_VRING_NUM: ring 0", False),
    "ring_size_2^32-1": (_ring(R.SET_VRING_NUM, 0, 0xFFFFFFFF), "SET_VRING_NUM", False),
    "enable_value_2": (_enable_value, "SET_VRING_ENABLE: ring 0: enable value 2", True),
    "vring_base_reserved": (_vring_base_reserved, "SET_VRING_BASE", False),
    "vring_addr_flags": (_vring_addr_flags, "SET_VRING_ADDR: vring address flags", False),
    "mtu_out_of_range": (_mtu, "NET_SET_MTU", False),
    "status_not_a_byte": (_status, "SET_STATUS", True),
    "truncated_stream": (_truncated_stream, "disconnected", False),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_closes_only_that_connection(server, image, caplog, name):
    send, text, prepare = MALFORMED[name]
    caplog.set_level(logging.INFO, logger="pyvhost.backend")
    dev = server.device
    if name == "mtu_out_of_range":
        prepare = True
    base_fds = fd_count()
    with frontend(server) as fe:
        if prepare:
            negotiate(fe, protocol=PROTOCOL | C.bit(PF.NET_MTU))
            mem_table(fe, image)
            fe.get_u64(R.GET_FEATURES)
        send(fe, image)
        wait_closed(server, fe)
    while _TO_CLOSE:
        os.close(_TO_CLOSE.pop())
    assert text in caplog.text, caplog.text
    assert dev.memory.regions == [] and dev.features == 0
    assert fd_count() == base_fds
    # the server is still there: a second connection works
    with frontend(server) as fe:
        negotiate(fe)
        assert fe.get_u64(R.GET_QUEUE_NUM) == QUEUE_PAIRS
        assert fe.ack(R.SET_VRING_NUM, P.VringState(0, 256)) == 0
    assert fd_count() == base_fds


def test_every_gated_request_refused_without_its_feature(server, caplog):
    for req, spec in SPECS.items():
        if spec.gate is None:
            continue
        with frontend(server) as fe:
            negotiate(fe, protocol=NET_PROTOCOL_FEATURES & ~C.bit(spec.gate))
            fe.send(req, bytes(8))
            wait_closed(server, fe)
        assert req.name in caplog.text
        caplog.clear()


def test_fds_of_messages_behind_a_bad_one_are_closed(server):
    """A bad message and a good one with fds, read in the same burst: both messages' fds
    are closed when the connection goes."""
    base = fd_count()
    with frontend(server) as fe:
        fe.get_u64(R.GET_FEATURES)
        gate = threading.Event()
        server.loop.call_soon_threadsafe(gate.wait, 5)     # hold the loop while we write
        fe.send(R.SET_VRING_NUM, P.VringState(0, 3))        # refused: closes the connection
        fds = [eventfd(), eventfd()]
        fe.send(R.SET_VRING_CALL, P.VringFd(0), fds[:1])
        fe.send(R.SET_VRING_KICK, P.VringFd(1), fds[1:])
        for fd in fds:
            os.close(fd)
        gate.set()
        wait_closed(server, fe)
    assert fd_count() == base


def test_fds_not_leaked_over_connect_disconnect_cycles(server, image):
    ring = DriverRing(image, 64)
    with frontend(server) as fe:                          # warm up
        negotiate(fe)
    base = fd_count()
    with open("/proc/self/maps") as f:
        maps = sum(1 for _ in f)
    for i in range(30):
        kick, call, err = eventfd(), eventfd(), eventfd()
        with frontend(server) as fe:
            negotiate(fe)
            mem_table(fe, image)
            setup_ring(fe, ring, i % 4, kick=kick, call=call)
            fe.send(R.SET_VRING_ERR, P.VringFd(i % 4), [err])
            fe.send(R.SET_VRING_CALL, P.VringFd(i % 4), [call])       # replaces the first
            if i % 2:
                fe.get(R.GET_VRING_BASE, P.VringState(i % 4, 0))
            fe.get_u64(R.GET_FEATURES)
        for fd in (kick, call, err):
            os.close(fd)
        while _TO_CLOSE:
            os.close(_TO_CLOSE.pop())
    assert fd_count() == base
    with open("/proc/self/maps") as f:      # a region left mapped adds one; the allocator
        assert sum(1 for _ in f) <= maps    # may give one of its own back (ASan: 660 of 661)


# ======================================================================================
# a random message stream
# ======================================================================================

def _body(req: R) -> st.SearchStrategy[bytes]:
    """Plausible payloads of the right type (random values), or anything."""
    ring_idx = st.integers(0, 5)
    cls = SPECS[req].payload
    typed = {
        P.U64: st.builds(P.U64, st.one_of(st.integers(0, 0xFFFF),
                                          st.integers(0, (1 << 64) - 1))),
        P.VringState: st.builds(P.VringState, ring_idx,
                                st.sampled_from([0, 1, 2, 3, 64, 256, 32768, 65536])),
        P.VringFd: st.builds(P.VringFd, st.one_of(ring_idx, ring_idx.map(lambda i: i | 0x100),
                                                  st.integers(0, 0x3FF))),
        P.VringAddr: st.builds(P.VringAddr, ring_idx, st.integers(0, 1),
                               st.integers(0x7F0000000000, 0x7F0000100000),
                               st.integers(0x7F0000000000, 0x7F0000100000),
                               st.integers(0x7F0000000000, 0x7F0000100000), st.just(0)),
        P.SingleMemRegion: st.builds(P.SingleMemRegion, st.builds(
            P.MemRegion, st.sampled_from([0, 0x100000, 0x200000]),
            st.sampled_from([0, 4096, 1 << 20, 1 << 21]),
            st.sampled_from([0x7F0000000000, 0x7F0010000000]), st.sampled_from([0, 0x2000]))),
    }.get(cls)
    anything = st.binary(max_size=48)
    if typed is None:
        return st.one_of(st.just(b""), st.just(bytes(8)), anything)
    return st.one_of(typed.map(lambda p: p.pack()), typed.map(lambda p: p.pack()), anything)


@st.composite
def message(draw):
    code = draw(st.one_of(st.sampled_from(sorted(SPECS)), st.integers(0, 60)))
    try:
        req = R(code)
        body = draw(_body(req))
    except ValueError:
        body = draw(st.binary(max_size=16))
    flags = draw(st.sampled_from([C.VERSION, C.VERSION, C.VERSION | C.FLAG_NEED_REPLY,
                                  C.VERSION | C.FLAG_REPLY, 0, 0x11]))
    nfds = draw(st.sampled_from([0, 0, 0, 1, 1, 2]))
    kind = draw(st.sampled_from(["eventfd", "memfd"]))
    return code, flags, body, nfds, kind


def test_random_message_stream(sockdir, image, caplog):
    server = Server(os.path.join(sockdir, "fuzz.sock"))
    count = Counter("random message streams")
    memfd = os.memfd_create("fuzz", os.MFD_CLOEXEC)
    os.ftruncate(memfd, 2 * MiB)
    good_table = P.MemTable(tuple(image.descs())).pack()
    try:
        with frontend(server) as fe:
            negotiate(fe)
        base = fd_count()

        @fuzz_settings(120)
        @given(st.booleans(), st.lists(message(), min_size=1, max_size=12))
        def run(prefix, msgs):
            count()
            with frontend(server) as fe:
                if prefix:
                    negotiate(fe)
                    fe.send(R.SET_MEM_TABLE, good_table, region_fds(image))
                for code, flags, body, nfds, kind in msgs:
                    fds = [eventfd() if kind == "eventfd" else os.dup(memfd)
                           for _ in range(nfds)]
                    try:
                        fe.send(code, body, fds, flags)
                    except OSError:
                        break                          # the back-end has closed already
                    finally:
                        for fd in fds:
                            os.close(fd)
                with contextlib.suppress(OSError):
                    fe.sock.shutdown(socket.SHUT_WR)
                assert fe.closed_by_peer()
                server.sync()
            while _TO_CLOSE:
                os.close(_TO_CLOSE.pop())
            assert fd_count() == base
            # still serving
            with frontend(server) as fe:
                assert fe.get_u64(R.GET_FEATURES) == NET_FEATURES

        run()
        assert "internal error" not in caplog.text
        assert "Traceback" not in caplog.text
        count.report(120)
    finally:
        os.close(memfd)
        server.close()


def test_buffers_kicked_before_enable_are_not_lost(server, image):
    """rust-vmm/vhost#247: the guest posts and kicks before SET_VRING_ENABLE. The echo poll
    thread must pick that work up when the ring is enabled, with no new kick."""
    from pyvhost._poll import Poller
    dev = server.device
    poller = Poller([(dev.rx_ring(0).vq, dev.tx_ring(0).vq)], "echo", PacketPool(256, 2048))
    server.run(lambda: dev.listeners.append(poller.wake))
    thread = threading.Thread(target=poller.run, daemon=True)
    thread.start()
    rx, tx = DriverRing(image, 64), DriverRing(image, 64)
    kicks = [eventfd(), eventfd()]
    try:
        with frontend(server) as fe:
            negotiate(fe)
            mem_table(fe, image)
            setup_ring(fe, rx, 0, kick=kicks[0], enable=False)
            setup_ring(fe, tx, 1, kick=kicks[1], enable=False)
            rx.post_rx([2048])                       # RX buffer, kicked, ring not enabled
            os.eventfd_write(kicks[0], 1)
            server.sync()
            assert fe.ack(R.SET_VRING_ENABLE, P.VringState(0, 1)) == 0
            assert fe.ack(R.SET_VRING_ENABLE, P.VringState(1, 1)) == 0
            frame = bytes(range(6)) + bytes(range(6, 12)) + b"\x88\xb5" + b"x" * 50
            tx.post_tx(frame)                        # the guest kicks once for its frame
            os.eventfd_write(kicks[1], 1)
            deadline = time.monotonic() + 5
            used = []
            while not used and time.monotonic() < deadline:
                used = rx.used()
                time.sleep(0.01)
            assert len(used) == 1
            echoed = rx.rx_bytes(*used[0])[12:]
            assert echoed == frame[6:12] + frame[:6] + frame[12:]   # MACs swapped
    finally:
        poller.stop()
        thread.join(5)
        for fd in kicks:
            os.close(fd)


def test_features_cannot_change_the_layout_of_running_rings(server, image, caplog):
    """Review finding: a second SET_FEATURES flipping RING_PACKED (or EVENT_IDX, MRG_RXBUF)
    under a started ring would make the data path read a split ring as packed (or back),
    past what start() checked. Only LOG_ALL may change at run time."""
    ring = DriverRing(image, 64)
    kick = eventfd()
    try:
        with frontend(server) as fe:
            negotiate(fe)
            mem_table(fe, image)
            setup_ring(fe, ring, 1, kick=kick)
            assert fe.ack(R.SET_FEATURES, P.U64(FEATURES | C.bit(F.LOG_ALL))) == 0
            assert fe.ack(R.SET_FEATURES, P.U64(FEATURES)) == 0
            assert fe.ack(R.SET_FEATURES, P.U64(FEATURES | C.bit(F.RING_PACKED))) != 0
            wait_closed(server, fe)
        assert "while rings are running" in caplog.text
        assert "internal error" not in caplog.text
    finally:
        os.close(kick)


def test_a_new_connection_gets_fresh_packed_rings(server):
    """Review finding: after a packed connection, reset left the wrap counters at 0."""
    dev = server.device
    ring = dev.rings[0]
    with ring.vq:
        ring.vq.set_features(event_idx=False, indirect=False, mrg_rxbuf=False, hdr_len=12,
                             packed=True)
    fresh = ring.vq.base
    server.run(ring.reset)
    with ring.vq:
        ring.vq.set_features(event_idx=False, indirect=False, mrg_rxbuf=False, hdr_len=12,
                             packed=True)
    assert ring.vq.base == fresh == 0x80008000
