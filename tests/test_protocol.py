"""pyvhost.protocol: payload encode/decode, the request table's size/fd/gate rules, header
checks, and MessageReader framing over a real Unix socketpair (partial writes, fds, errors)."""

from __future__ import annotations

import array
import os
import socket
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyvhost.protocol import constants as C
from pyvhost.protocol import payloads as P
from pyvhost.protocol import wire
from pyvhost.protocol.constants import ProtocolFeature as PF
from pyvhost.protocol.constants import Request as R
from pyvhost.protocol.messages import SPECS, FdRule, RequestError, check_request, expected_fds
from tests.harness.fuzzing import Counter, fuzz_settings

ALL_PROTOCOL = (1 << 64) - 1
u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, (1 << 64) - 1)


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


# ======================================================================================
# payloads
# ======================================================================================

@st.composite
def mem_regions(draw):
    size = draw(st.integers(1, 1 << 40))
    lim = (1 << 64) - size
    return P.MemRegion(draw(st.integers(0, lim)), size, draw(st.integers(0, lim)),
                       draw(st.integers(0, lim)))


PAYLOADS = {
    P.U64: st.builds(P.U64, u64),
    P.VringState: st.builds(P.VringState, st.integers(0, C.MAX_RINGS - 1), u32),
    P.VringFd: st.builds(P.VringFd, st.integers(0, 0x1FF)),
    P.VringAddr: st.builds(P.VringAddr, st.integers(0, C.MAX_RINGS - 1), st.integers(0, 1),
                           u64, u64, u64, u64),
    P.MemRegion: mem_regions(),
    P.MemTable: st.builds(P.MemTable, st.lists(mem_regions(), min_size=1, max_size=8)
                          .map(tuple)),
    P.SingleMemRegion: st.builds(P.SingleMemRegion, mem_regions()),
    P.LogBase: st.builds(P.LogBase, st.integers(1, 1 << 40), st.integers(0, 1 << 40)),
    P.IotlbMsg: st.builds(P.IotlbMsg, u64, u64, u64, u8, u8),
    P.Config: st.integers(0, C.MAX_CONFIG_SIZE).flatmap(
        lambda n: st.builds(P.Config, st.integers(0, C.MAX_CONFIG_SIZE - n), st.just(n),
                            st.integers(0, 1), st.binary(min_size=n, max_size=n))),
    P.Inflight: st.builds(P.Inflight, u64, u64, u16, u16),
    P.DeviceStateParams: st.builds(P.DeviceStateParams, u32, u32),
    P.Empty: st.builds(P.Empty),
}


def test_every_payload_type_has_a_strategy():
    used = {spec.payload for spec in SPECS.values()} | {
        spec.reply for spec in SPECS.values() if spec.reply}
    assert used <= set(PAYLOADS)


@pytest.mark.parametrize("cls", list(PAYLOADS), ids=lambda c: c.__name__)
def test_payload_roundtrip(cls):
    count = Counter(f"payload roundtrip {cls.__name__}")

    @fuzz_settings(60)
    @given(PAYLOADS[cls])
    def run(p):
        count()
        data = p.pack()
        q = cls.unpack(data)
        assert q == p
        q.validate()
        assert q.pack() == data

    run()
    count.report(1 if cls is P.Empty else 60)       # Empty has a single example


def test_payload_sizes_match_the_c_structs():
    assert P.U64.FMT.size == 8
    assert P.VringState.FMT.size == 8
    assert P.VringAddr.FMT.size == 40
    assert P.MemRegion.FMT.size == 32
    assert P.MemTable.SIZE == 8 + 8 * 32
    assert P.SingleMemRegion.SIZE == 40
    assert P.LogBase.FMT.size == 16
    assert P.IotlbMsg.FMT.size == 32
    assert P.Inflight.FMT.size == 24
    assert P.VringAddr(1, 0, 2, 3, 4, 5).pack() == struct.pack("=IIQQQQ", 1, 0, 2, 3, 4, 5)
    # the address struct order is desc, used, avail
    a = P.VringAddr.unpack(struct.pack("=IIQQQQ", 0, 0, 0xD, 0x0, 0xA, 0))
    assert (a.desc, a.used, a.avail) == (0xD, 0x0, 0xA)


@pytest.mark.parametrize("payload", [
    P.VringState(C.MAX_RINGS, 0),
    P.VringState(0xFFFFFFFF, 0),
    P.VringFd(0x200),
    P.VringFd(1 << 63),
    P.VringAddr(C.MAX_RINGS, 0, 0, 0, 0, 0),
    P.VringAddr(0, 2, 0, 0, 0, 0),
    P.MemRegion(0, 0, 0, 0),
    P.MemRegion((1 << 64) - 4096, 8192, 0, 0),
    P.MemRegion(0, 8192, (1 << 64) - 4096, 0),
    P.MemRegion(0, 8192, 0, (1 << 64) - 4096),
    P.MemRegion(0, (1 << 64) - 1, 2, 0),
    P.MemTable((P.MemRegion(0, 4096, 0, 0), P.MemRegion(0, 0, 0, 0))),
    P.SingleMemRegion(P.MemRegion(0, 0, 0, 0)),
    P.Config(250, 10, 0, bytes(10)),
    P.Config(0xFFFFFFFF, 1, 0, b"x"),
], ids=repr)
def test_payload_validate_rejects(payload):
    with pytest.raises(P.PayloadError):
        payload.validate()


def test_memtable_region_counts_and_sizes():
    r = P.MemRegion(0x1000, 0x1000, 0x2000, 0).pack()
    head = struct.Struct("=II")
    for n in range(1, 9):
        t = P.MemTable.unpack(head.pack(n, 0) + r * n)
        assert len(t.regions) == n
        assert P.MemTable.unpack(head.pack(n, 0) + r * 8).regions == t.regions  # full array
        with pytest.raises(P.PayloadError):
            P.MemTable.unpack(head.pack(n, 0) + r * (n - 1))
        with pytest.raises(P.PayloadError):
            P.MemTable.unpack(head.pack(n, 0) + r * n + bytes(P.MemTable.SIZE))  # > 8 regions
    for n in (0, 9, 0xFFFFFFFF):
        with pytest.raises(P.PayloadError):
            P.MemTable.unpack(head.pack(n, 0) + r * 8)
    for data in (b"", b"\x01", head.pack(1, 0)[:7]):
        with pytest.raises(P.PayloadError):
            P.MemTable.unpack(data)


def test_config_sizes():
    head = struct.Struct("=III")
    assert P.Config.unpack(head.pack(0, 0, 0)).data == b""
    assert P.Config.unpack(head.pack(0, 256, 0) + bytes(256)).size == 256
    for data in (head.pack(0, 4, 0) + bytes(3), head.pack(0, 4, 0) + bytes(5),
                 head.pack(0, 257, 0) + bytes(257), head.pack(0, 0, 0)[:11],
                 head.pack(0, 0xFFFFFFFF, 0)):
        with pytest.raises(P.PayloadError):
            P.Config.unpack(data)


def test_unpack_never_raises_anything_but_payload_error():
    count = Counter("payload unpack of random bytes")

    @fuzz_settings(300)
    @given(st.sampled_from(list(PAYLOADS)), st.binary(max_size=300))
    def run(cls, data):
        count()
        try:
            p = cls.unpack(data)
            p.validate()
        except P.PayloadError:
            return
        assert cls.unpack(p.pack()) == p if cls is not P.MemTable else True

    run()
    count.report(300)


# ======================================================================================
# the request table
# ======================================================================================

def valid_bodies(cls) -> list[bytes]:
    """Bodies of every accepted size for this payload type (values that validate)."""
    if cls is P.Empty:
        return [b"", bytes(8)]
    if cls is P.MemTable:
        r = P.MemRegion(0x1000, 0x1000, 0x2000, 0)
        return [P.MemTable((r,) * n).pack() for n in range(1, 9)]
    if cls is P.SingleMemRegion:
        return [P.SingleMemRegion(P.MemRegion(0x1000, 0x1000, 0x2000, 0)).pack()]
    if cls is P.Config:
        return [P.Config(0, n, 0, bytes(n)).pack() for n in (0, 1, 6, 256)]
    if cls is P.LogBase:
        return [P.LogBase(4096, 0).pack()]
    return [bytes(cls.FMT.size)]


def accepted_sizes(cls) -> set[int]:
    if cls is P.MemTable:
        return set(range(8 + 32, P.MemTable.SIZE + 1))   # n regions up to the full array
    return {len(b) for b in valid_bodies(cls)}


def fds_for(spec, body) -> int:
    lo, hi = expected_fds(spec, spec.payload.unpack(body))
    return lo


def test_every_request_has_a_spec():
    assert set(R) - set(SPECS) == set()


@pytest.mark.parametrize("req", list(SPECS), ids=lambda r: r.name)
def test_sizes_accepted_and_rejected(req):
    spec = SPECS[req]
    for body in valid_bodies(spec.payload):
        got, got_spec, payload = check_request(int(req), body, fds_for(spec, body), ALL_PROTOCOL)
        assert got is req and got_spec is spec
        assert isinstance(payload, spec.payload)
    good = accepted_sizes(spec.payload)
    body = valid_bodies(spec.payload)[0]
    bad_sizes = {0, 1, 4, 7, 9, 12, 16, 24, 31, 32, 33, 39, 41, 100, 265, 268, 4096}
    bad_sizes |= {n + d for n in good for d in (-1, 1)}
    for size in sorted(n for n in bad_sizes - good if n >= 0):
        if spec.payload is P.Config and size >= 12:
            data = struct.pack("=III", 0, 0, 0) + bytes(size - 12)   # claims 0 bytes
        elif spec.payload is P.MemTable and size >= 8:
            data = struct.pack("=II", 1, 0) + P.MemRegion(0, 4096, 0, 0).pack()
            data = (data + bytes(size))[:size]
        else:
            data = (body + bytes(size))[:size]
        with pytest.raises(RequestError, match=req.name):
            check_request(int(req), data, 0, ALL_PROTOCOL)


# fds a request carries, from vhost-user.rst, written down here rather than read back from
# the table under test: (min, max), or "vring" (one unless the NOFD bit is set), or
# "region" (one per region). Every other request carries none.
SPEC_FDS = {
    R.SET_MEM_TABLE: "region", R.SET_LOG_BASE: (1, 1), R.SET_LOG_FD: (1, 1),
    R.SET_VRING_KICK: "vring", R.SET_VRING_CALL: "vring", R.SET_VRING_ERR: "vring",
    R.SET_BACKEND_REQ_FD: (1, 1), R.SET_INFLIGHT_FD: (1, 1), R.GPU_SET_SOCKET: (1, 1),
    R.ADD_MEM_REG: (1, 1), R.REM_MEM_REG: (0, 1), R.SET_DEVICE_STATE_FD: (1, 1),
}


def spec_fds(req, payload) -> tuple[int, int]:
    rule = SPEC_FDS.get(req, (0, 0))
    if rule == "vring":
        return (0, 0) if payload.nofd else (1, 1)
    if rule == "region":
        return len(payload.regions), len(payload.regions)
    return rule


@pytest.mark.parametrize("req", list(SPECS), ids=lambda r: r.name)
def test_fd_counts(req):
    spec = SPECS[req]
    for body in valid_bodies(spec.payload):
        payload = spec.payload.unpack(body)
        lo, hi = spec_fds(req, payload)
        assert expected_fds(spec, payload) == (lo, hi)
        for n in range(0, 10):
            if lo <= n <= hi:
                check_request(int(req), body, n, ALL_PROTOCOL)
            else:
                with pytest.raises(RequestError, match="fds"):
                    check_request(int(req), body, n, ALL_PROTOCOL)


def test_fd_rules_of_the_spec():
    assert SPECS[R.SET_MEM_TABLE].fds is FdRule.PER_REGION
    assert SPECS[R.ADD_MEM_REG].fds is FdRule.ONE
    assert SPECS[R.REM_MEM_REG].fds is FdRule.OPTIONAL
    for r in (R.SET_VRING_KICK, R.SET_VRING_CALL, R.SET_VRING_ERR):
        assert SPECS[r].fds is FdRule.VRING
        check_request(int(r), P.VringFd(3).pack(), 1, 0)
        check_request(int(r), P.VringFd(3 | C.VRING_NOFD_MASK).pack(), 0, 0)
        with pytest.raises(RequestError):
            check_request(int(r), P.VringFd(3 | C.VRING_NOFD_MASK).pack(), 1, 0)
        with pytest.raises(RequestError):
            check_request(int(r), P.VringFd(3).pack(), 0, 0)
        with pytest.raises(RequestError, match="reserved"):
            check_request(int(r), P.VringFd(0x203).pack(), 1, 0)
    r3 = P.MemTable((P.MemRegion(0, 4096, 0, 0),) * 3).pack()
    check_request(int(R.SET_MEM_TABLE), r3, 3, 0)
    for n in (0, 2, 4, 8):
        with pytest.raises(RequestError):
            check_request(int(R.SET_MEM_TABLE), r3, n, 0)


# The protocol feature each request needs, written down from QEMU's vhost-user.rst (each
# request's "Only valid if ... was negotiated" / "when ... is set"), not read from SPECS.
SPEC_GATES = {
    "SET_LOG_BASE": "LOG_SHMFD", "SET_LOG_FD": "LOG_SHMFD", "GET_QUEUE_NUM": "MQ",
    "SEND_RARP": "RARP", "NET_SET_MTU": "NET_MTU", "SET_BACKEND_REQ_FD": "BACKEND_REQ",
    "SET_VRING_ENDIAN": "CROSS_ENDIAN", "GET_CONFIG": "CONFIG", "SET_CONFIG": "CONFIG",
    "CREATE_CRYPTO_SESSION": "CRYPTO_SESSION", "CLOSE_CRYPTO_SESSION": "CRYPTO_SESSION",
    "POSTCOPY_ADVISE": "PAGEFAULT", "POSTCOPY_LISTEN": "PAGEFAULT", "POSTCOPY_END": "PAGEFAULT",
    "GET_INFLIGHT_FD": "INFLIGHT_SHMFD", "SET_INFLIGHT_FD": "INFLIGHT_SHMFD",
    "RESET_DEVICE": "RESET_DEVICE", "VRING_KICK": "INBAND_NOTIFICATIONS",
    "GET_MAX_MEM_SLOTS": "CONFIGURE_MEM_SLOTS", "ADD_MEM_REG": "CONFIGURE_MEM_SLOTS",
    "REM_MEM_REG": "CONFIGURE_MEM_SLOTS", "SET_STATUS": "STATUS", "GET_STATUS": "STATUS",
    "GET_SHARED_OBJECT": "SHARED_OBJECT", "SET_DEVICE_STATE_FD": "DEVICE_STATE",
    "CHECK_DEVICE_STATE": "DEVICE_STATE",
}


def test_gated_requests_are_the_specs():
    assert {r.name: s.gate.name for r, s in SPECS.items() if s.gate is not None} == SPEC_GATES


@pytest.mark.parametrize("name", sorted(SPEC_GATES))
def test_gates(name):
    req, gate = R[name], PF[SPEC_GATES[name]]
    spec = SPECS[req]
    body = valid_bodies(spec.payload)[0]
    n = fds_for(spec, body)
    check_request(int(req), body, n, C.bit(gate))
    with pytest.raises(RequestError, match=gate.name):
        check_request(int(req), body, n, ALL_PROTOCOL & ~C.bit(gate))
    with pytest.raises(RequestError, match="not negotiated"):
        check_request(int(req), body, n, 0)


def test_ungated_requests_need_no_protocol_features():
    for req in (R.GET_FEATURES, R.SET_FEATURES, R.SET_OWNER, R.SET_MEM_TABLE, R.SET_VRING_NUM,
                R.SET_VRING_ADDR, R.SET_VRING_BASE, R.GET_VRING_BASE, R.SET_VRING_KICK,
                R.GET_PROTOCOL_FEATURES, R.SET_PROTOCOL_FEATURES, R.SET_VRING_ENABLE):
        spec = SPECS[req]
        assert spec.gate is None
        body = valid_bodies(spec.payload)[0]
        check_request(int(req), body, fds_for(spec, body), 0)
    assert SPECS[R.GET_QUEUE_NUM].gate is PF.MQ
    assert SPECS[R.GET_MAX_MEM_SLOTS].gate is PF.CONFIGURE_MEM_SLOTS


@pytest.mark.parametrize("code", [0, 44, 99, 0xFFFFFFFF])
def test_unknown_request(code):
    with pytest.raises(RequestError, match="unknown request id"):
        check_request(code, b"", 0, ALL_PROTOCOL)


def test_check_request_never_raises_anything_else():
    count = Counter("check_request of random requests")

    @fuzz_settings(400)
    @given(st.integers(0, 50), st.binary(max_size=300), st.integers(0, 9), u64)
    def run(code, body, nfds, pf):
        count()
        try:
            check_request(code, body, nfds, pf)
        except RequestError:
            pass

    run()
    count.report(400)


# ======================================================================================
# header checks
# ======================================================================================

@pytest.mark.parametrize("flags,size,reply,ok", [
    (1, 0, False, True),
    (1 | C.FLAG_NEED_REPLY, 8, False, True),
    (1, C.MAX_PAYLOAD, False, True),
    (1 | C.FLAG_REPLY, 8, True, True),
    (0, 0, False, False),                       # version 0
    (2, 0, False, False),
    (3, 0, False, False),
    (1 | C.FLAG_REPLY, 0, False, False),        # a reply where a request is expected
    (1, 8, True, False),                        # a request where a reply is expected
    (1 | 0x10, 0, False, False),                # unknown flag
    (1 | (1 << 31), 0, False, False),
    (1, C.MAX_PAYLOAD + 1, False, False),
    (1, 0xFFFFFFFF, False, False),
])
def test_check_header(flags, size, reply, ok):
    if ok:
        wire.check_header(1, flags, size, reply=reply)
    else:
        with pytest.raises(wire.WireError):
            wire.check_header(1, flags, size, reply=reply)


# ======================================================================================
# MessageReader over a socketpair
# ======================================================================================

@pytest.fixture
def pair():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    b.setblocking(False)
    yield a, b
    a.close()
    b.close()


def memfd(tag: bytes = b"") -> int:
    fd = os.memfd_create("t", os.MFD_CLOEXEC)
    os.write(fd, tag)
    return fd


def same_file(fd1: int, fd2: int) -> bool:
    s1, s2 = os.fstat(fd1), os.fstat(fd2)
    return (s1.st_dev, s1.st_ino) == (s2.st_dev, s2.st_ino)


def send_bytewise(sock, data: bytes, fds=()) -> None:
    """One byte per sendmsg; the fds ride on the first byte."""
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    sock.sendmsg([data[:1]], anc)
    for i in range(1, len(data)):
        sock.send(data[i:i + 1])


def message_bytes(req, payload=b"", flags=C.VERSION) -> bytes:
    return wire.encode_header(req, flags, len(payload)) + payload


def test_reader_whole_messages(pair):
    a, b = pair
    r = wire.MessageReader(b)
    assert r.read() == []
    f1, f2 = memfd(b"one"), memfd(b"two")
    try:
        wire.send_message(a, R.SET_FEATURES, C.VERSION, P.U64(0x1234).pack())
        wire.send_message(a, R.GET_FEATURES, C.VERSION | C.FLAG_NEED_REPLY)
        wire.send_message(a, R.SET_VRING_CALL, C.VERSION, P.VringFd(1).pack(), [f1])
        wire.send_message(a, R.SET_MEM_TABLE, C.VERSION, b"x" * 72, [f1, f2])
        msgs = r.read()
        assert [m.request for m in msgs] == [R.SET_FEATURES, R.GET_FEATURES, R.SET_VRING_CALL,
                                             R.SET_MEM_TABLE]
        assert msgs[0].payload == P.U64(0x1234).pack() and msgs[0].fds == []
        assert msgs[1].need_reply and msgs[1].payload == b""
        assert len(msgs[2].fds) == 1 and same_file(msgs[2].fds[0], f1)
        assert len(msgs[3].fds) == 2 and same_file(msgs[3].fds[1], f2)
        for m in msgs:
            m.close_fds()
            assert m.fds == []
    finally:
        os.close(f1)
        os.close(f2)


def test_reader_byte_by_byte_with_fds(pair):
    a, b = pair
    r = wire.MessageReader(b)
    before = fd_count()
    f1, f2 = memfd(b"1"), memfd(b"2")
    stream = [
        (message_bytes(R.SET_VRING_KICK, P.VringFd(0).pack()), [f1]),
        (message_bytes(R.SET_OWNER), []),
        (message_bytes(R.SET_VRING_ADDR, P.VringAddr(1, 0, 2, 3, 4, 5).pack()), []),
        (message_bytes(R.SET_MEM_TABLE, bytes(40)), [f1, f2]),
    ]
    got = []
    for k, (data, fds) in enumerate(stream):
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        a.sendmsg([data[:1]], anc if fds else [])
        got += r.read()
        for i in range(1, len(data)):
            assert len(got) == k            # no message is complete before its last byte
            a.send(data[i:i + 1])
            got += r.read()
        assert len(got) == k + 1
    assert [m.request for m in got] == [R.SET_VRING_KICK, R.SET_OWNER, R.SET_VRING_ADDR,
                                        R.SET_MEM_TABLE]
    assert [len(m.fds) for m in got] == [1, 0, 0, 2]
    assert same_file(got[0].fds[0], f1) and same_file(got[3].fds[1], f2)
    assert P.VringAddr.unpack(got[2].payload) == P.VringAddr(1, 0, 2, 3, 4, 5)
    for m in got:
        m.close_fds()
    os.close(f1)
    os.close(f2)
    assert fd_count() == before


def test_reader_random_chunking():
    count = Counter("message reader, random chunking")

    @fuzz_settings(60)
    @given(st.lists(st.tuples(st.integers(1, 43), st.binary(max_size=64), st.integers(0, 3)),
                    min_size=1, max_size=6),
           st.lists(st.integers(1, 50), min_size=1, max_size=20))
    def run(msgs, cuts):
        count()
        before = fd_count()
        a, b = socket.socketpair()
        b.setblocking(False)
        try:
            r = wire.MessageReader(b)
            got = []
            for req, payload, nfds in msgs:
                data = message_bytes(req, payload)
                fds = [memfd() for _ in range(nfds)]
                pos, k = 0, 0
                while pos < len(data):
                    n = cuts[k % len(cuts)]
                    k += 1
                    anc = ([(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                             array.array("i", fds).tobytes())] if fds and pos == 0 else [])
                    a.sendmsg([data[pos:pos + n]], anc)
                    pos += n
                    got += r.read()
                for fd in fds:
                    os.close(fd)
            assert [(m.request, m.payload, len(m.fds)) for m in got] == msgs
            for m in got:
                m.close_fds()
        finally:
            a.close()
            b.close()
        assert fd_count() == before

    run()
    count.report(60)


def test_reader_limit(pair):
    a, b = pair
    for _ in range(5):
        wire.send_message(a, R.SET_OWNER, C.VERSION)
    r = wire.MessageReader(b)
    assert len(r.read(limit=2)) == 2
    assert len(r.read(limit=2)) == 2
    assert len(r.read()) == 1
    assert r.read() == []


@pytest.mark.parametrize("flags,size", [(0, 8), (2, 8), (1 | C.FLAG_REPLY, 8), (1 | 0x20, 8),
                                        (1, C.MAX_PAYLOAD + 1)])
def test_reader_bad_header_closes_its_fds(pair, flags, size):
    a, b = pair
    before = fd_count()
    fds = [memfd(), memfd()]
    a.sendmsg([wire.encode_header(R.SET_MEM_TABLE, flags, size) + bytes(8)],
              [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())])
    for fd in fds:
        os.close(fd)
    r = wire.MessageReader(b)
    with pytest.raises(wire.WireError):
        r.read()
    assert fd_count() == before
    r.close()
    assert fd_count() == before


def test_reader_eof_mid_message_closes_its_fds(pair):
    a, b = pair
    before = fd_count()
    fd = memfd()
    send_bytewise(a, message_bytes(R.SET_VRING_CALL, P.VringFd(0).pack())[:15], [fd])
    os.close(fd)
    r = wire.MessageReader(b)
    assert r.read() == []
    assert fd_count() == before + 1        # the fd is held by the partial message
    a.shutdown(socket.SHUT_WR)
    with pytest.raises(EOFError):
        r.read()
    assert fd_count() == before


def test_reader_eof_after_complete_messages_closes_their_fds(pair):
    """Messages assembled in the same read() as an EOF or a bad header are dropped, and so
    are their fds (a front-end that sends SET_MEM_TABLE and hangs up leaks nothing)."""
    a, b = pair
    before = fd_count()
    fds = [memfd(), memfd()]
    wire.send_message(a, R.SET_MEM_TABLE, C.VERSION, bytes(72), fds)
    wire.send_message(a, R.SET_VRING_CALL, C.VERSION, P.VringFd(0).pack(), fds[:1])
    a.shutdown(socket.SHUT_WR)
    with pytest.raises(EOFError):
        wire.MessageReader(b).read()
    for fd in fds:
        os.close(fd)
    assert fd_count() == before


def test_reader_bad_header_after_complete_messages_closes_their_fds(pair):
    a, b = pair
    before = fd_count()
    fd = memfd()
    wire.send_message(a, R.SET_VRING_KICK, C.VERSION, P.VringFd(0).pack(), [fd])
    wire.send_message(a, R.SET_OWNER, 0)
    os.close(fd)
    with pytest.raises(wire.WireError):
        wire.MessageReader(b).read()
    assert fd_count() == before


def test_reader_eof_between_messages(pair):
    a, b = pair
    wire.send_message(a, R.SET_OWNER, C.VERSION)
    a.shutdown(socket.SHUT_WR)
    r = wire.MessageReader(b)
    with pytest.raises(EOFError):
        r.read()                            # the message before EOF is lost with the reader
    r2 = wire.MessageReader(b)
    with pytest.raises(EOFError):
        r2.read()


def test_reader_too_many_fds_closes_them(pair):
    a, b = pair
    before = fd_count()
    fds = [memfd() for _ in range(12)]
    a.sendmsg([message_bytes(R.SET_MEM_TABLE, bytes(8))],
              [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())])
    for fd in fds:
        os.close(fd)
    r = wire.MessageReader(b)
    with pytest.raises(wire.WireError, match="truncated"):
        r.read()
    assert fd_count() == before


def test_reader_exactly_max_fds(pair):
    a, b = pair
    before = fd_count()
    fds = [memfd() for _ in range(C.MAX_FDS)]
    wire.send_message(a, R.SET_MEM_TABLE, C.VERSION, bytes(8), fds)
    for fd in fds:
        os.close(fd)
    (m,) = wire.MessageReader(b).read()
    assert len(m.fds) == C.MAX_FDS
    m.close_fds()
    assert fd_count() == before


def test_reader_reply_direction(pair):
    a, b = pair
    wire.send_message(a, R.GET_FEATURES, C.VERSION | C.FLAG_REPLY, P.U64(7).pack())
    (m,) = wire.MessageReader(b, expect_reply=True).read()
    assert P.U64.unpack(m.payload).value == 7
    wire.send_message(a, R.GET_FEATURES, C.VERSION, P.U64(7).pack())
    with pytest.raises(wire.WireError, match="reply flag"):
        wire.MessageReader(b, expect_reply=True).read()


def test_recv_message_blocking(pair):
    a, b = pair
    b.setblocking(True)
    f = memfd()
    wire.send_message(a, R.GET_VRING_BASE, C.VERSION | C.FLAG_REPLY,
                      P.VringState(1, 42).pack(), [f])
    wire.send_message(a, R.GET_FEATURES, C.VERSION | C.FLAG_REPLY, P.U64(9).pack())
    m1 = wire.recv_message_blocking(b, expect_reply=True, timeout=2)
    m2 = wire.recv_message_blocking(b, expect_reply=True, timeout=2)
    assert P.VringState.unpack(m1.payload) == P.VringState(1, 42) and len(m1.fds) == 1
    assert P.U64.unpack(m2.payload).value == 9
    m1.close_fds()
    os.close(f)
    with pytest.raises(TimeoutError):
        wire.recv_message_blocking(b, expect_reply=True, timeout=0.05)
    assert b.gettimeout() is None                   # restored


def test_recv_message_blocking_closes_fds_on_error(pair):
    a, b = pair
    b.setblocking(True)
    before = fd_count()
    f = memfd()
    wire.send_message(a, R.GET_FEATURES, C.VERSION, bytes(8), [f])   # no reply flag
    os.close(f)
    with pytest.raises(wire.WireError):
        wire.recv_message_blocking(b, expect_reply=True, timeout=2)
    assert fd_count() == before
    c, d = socket.socketpair()               # the refused message's payload is still in b
    try:
        f = memfd()
        c.sendmsg([message_bytes(R.GET_FEATURES, bytes(8), C.VERSION | C.FLAG_REPLY)[:13]],
                  [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [f]).tobytes())])
        os.close(f)
        with pytest.raises(TimeoutError):
            wire.recv_message_blocking(d, expect_reply=True, timeout=0.05)
        assert fd_count() == before + 2
    finally:
        c.close()
        d.close()
    assert fd_count() == before


def test_send_message_large_payload(pair):
    a, b = pair
    payload = bytes(range(256)) * 16                 # MAX_PAYLOAD
    wire.send_message(a, R.SET_CONFIG, C.VERSION, payload)
    (m,) = wire.MessageReader(b).read()
    assert m.payload == payload
