"""Mutation fuzzing of the vhost-user message stream: a valid QEMU-like setup sequence,
mutated (messages dropped, duplicated, swapped; payloads truncated, extended, bit-flipped;
fds added or removed; ring indexes and sizes replaced with hostile values: 0, non-power-of-2,
above 32768), sent to an in-process back-end. Each case: no crash and no "internal error",
no fd left open, and the back-end serves the next front-end; at the end a valid sequence
with traffic still works."""

from __future__ import annotations

import contextlib
import os
import socket
import struct

from hypothesis import given
from hypothesis import strategies as st

from pyvhost._pktpool import PacketPool
from pyvhost.backend import NET_FEATURES
from pyvhost.protocol import constants as C
from pyvhost.protocol import payloads as P
from pyvhost.protocol.constants import Request as R
from tests.harness.driver import DriverRing
from tests.harness.fuzzing import Counter, fuzz_settings
from tests.harness.vhost_client import _TO_CLOSE, FEATURES, PROTOCOL, eventfd, fd_count, frontend

EXAMPLES = 150


def valid_sequence(image, rings) -> list[tuple[int, bytes, list[str], int]]:
    """(request, payload, fd kinds, flags) of a QEMU-like setup of two rings."""
    seq = [(R.GET_FEATURES, b"", [], C.VERSION), (R.SET_OWNER, b"", [], C.VERSION),
           (R.GET_PROTOCOL_FEATURES, b"", [], C.VERSION),
           (R.SET_PROTOCOL_FEATURES, P.U64(PROTOCOL).pack(), [], C.VERSION),
           (R.SET_FEATURES, P.U64(FEATURES & NET_FEATURES).pack(), [], C.VERSION),
           (R.SET_MEM_TABLE, P.MemTable(tuple(image.descs())).pack(),
            ["region"] * len(image.regions), C.VERSION)]
    for i, ring in enumerate(rings):
        seq += [(R.SET_VRING_NUM, P.VringState(i, ring.size).pack(), [], C.VERSION),
                (R.SET_VRING_ADDR, P.VringAddr(i, 0, ring.desc_uva, ring.used_uva,
                                               ring.avail_uva, 0).pack(), [], C.VERSION),
                (R.SET_VRING_BASE, P.VringState(i, 0).pack(), [], C.VERSION),
                (R.SET_VRING_KICK, P.VringFd(i).pack(), ["eventfd"], C.VERSION),
                (R.SET_VRING_CALL, P.VringFd(i).pack(), ["eventfd"], C.VERSION),
                (R.SET_VRING_ENABLE, P.VringState(i, 1).pack(), [], C.VERSION | C.FLAG_NEED_REPLY)]
    seq += [(R.GET_VRING_BASE, P.VringState(1, 0).pack(), [], C.VERSION)]
    return seq


HOSTILE_U32 = [0, 1, 3, 255, 256, 32767, 32768, 32769, 65535, 65536, 0xFFFFFFFF]


@st.composite
def mutation(draw, n: int):
    kind = draw(st.sampled_from(["drop", "dup", "swap", "truncate", "extend", "flip", "fds+",
                                 "fds-", "index", "num", "flags"]))
    i = draw(st.integers(0, n - 1))
    return kind, i, draw(st.integers(0, n - 1)), draw(st.integers(0, 300)), \
        draw(st.integers(0, 255)), draw(st.sampled_from(HOSTILE_U32))


def mutate(seq, muts):
    seq = list(seq)
    for kind, i, j, pos, byte, value in muts:
        if not seq:
            break
        i %= len(seq)
        req, body, fds, flags = seq[i]
        if kind == "drop":
            del seq[i]
        elif kind == "dup":
            seq.insert(i, seq[i])
        elif kind == "swap":
            j %= len(seq)
            seq[i], seq[j] = seq[j], seq[i]
        elif kind == "truncate":
            seq[i] = (req, body[:pos % (len(body) + 1)], fds, flags)
        elif kind == "extend":
            seq[i] = (req, body + bytes([byte]) * (1 + pos % 64), fds, flags)
        elif kind == "flip" and body:
            b = bytearray(body)
            b[pos % len(b)] ^= byte or 1
            seq[i] = (req, bytes(b), fds, flags)
        elif kind == "fds+":
            seq[i] = (req, body, fds + ["eventfd"], flags)
        elif kind == "fds-" and fds:
            seq[i] = (req, body, fds[:-1], flags)
        elif kind == "index" and len(body) >= 4:
            seq[i] = (req, struct.pack("=I", value) + body[4:], fds, flags)
        elif kind == "num" and len(body) >= 8:
            seq[i] = (req, body[:4] + struct.pack("=I", value) + body[8:], fds, flags)
        elif kind == "flags":
            seq[i] = (req, body, fds, [0, 0x11, C.VERSION | C.FLAG_REPLY, 0xFFFFFFFF][byte % 4])
    return seq


def send_all(fe, seq, image) -> None:
    for req, body, kinds, flags in seq:
        fds, regions = [], iter(image.regions)
        for k in kinds:
            r = next(regions, None) if k == "region" else None
            fds.append(os.dup(r.fd) if r is not None else eventfd())
        try:
            from pyvhost.protocol import wire
            wire.send_message(fe.sock, int(req), flags & 0xFFFFFFFF, body, fds)
        except OSError:
            return                                   # the back-end has closed already
        finally:
            for fd in fds:
                os.close(fd)


def test_mutated_setup_sequences(server, image, caplog):
    rings = [DriverRing(image, 64), DriverRing(image, 64)]
    seq = valid_sequence(image, rings)
    counter = Counter("mutated message sequences")
    with frontend(server) as fe:
        assert fe.get_u64(R.GET_FEATURES) == NET_FEATURES
    base = fd_count()

    @fuzz_settings(EXAMPLES)
    @given(st.lists(mutation(len(seq)), min_size=1, max_size=6))
    def run(muts):
        counter()
        with frontend(server) as fe:
            send_all(fe, mutate(seq, muts), image)
            with contextlib.suppress(OSError):
                fe.sock.shutdown(socket.SHUT_WR)
            assert fe.closed_by_peer()
            server.sync()
        while _TO_CLOSE:
            os.close(_TO_CLOSE.pop())
        assert fd_count() == base
        with frontend(server) as fe:
            assert fe.get_u64(R.GET_FEATURES) == NET_FEATURES

    run()
    counter.report(EXAMPLES)
    assert "internal error" not in caplog.text
    # and a clean setup still carries traffic
    with frontend(server) as fe:
        send_all(fe, seq[:-1], image)
        server.sync()
        rings[1].post_tx(b"\x42" * 60)
        assert server.device.tx_ring(0).vq.recv_burst(PacketPool(16, 2048)) == [b"\x42" * 60]
