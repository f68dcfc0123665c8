"""A back-end in process and a tiny blocking front-end, for tests of the vhost-user message
layer: ``Server`` serves a NetDevice on a Unix socket from an asyncio loop in a thread;
``Frontend`` sends requests and reads replies with the protocol layer's own framing. The
QEMU-like steps (negotiate, mem_table, setup_ring) and fd bookkeeping live here too; the
pytest fixtures over them are in tests/conftest.py."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import socket
import threading

from pyvhost.backend import Endpoint, NetDevice
from pyvhost.protocol import constants as C
from pyvhost.protocol import payloads as P
from pyvhost.protocol import wire
from pyvhost.protocol.constants import Feature as F
from pyvhost.protocol.constants import ProtocolFeature as PF
from pyvhost.protocol.constants import Request as R
from tests.harness.driver import DriverRing

MiB = 1 << 20
QUEUE_PAIRS = 2
PROTOCOL = C.bits(PF.MQ, PF.REPLY_ACK, PF.CONFIGURE_MEM_SLOTS, PF.STATUS)
FEATURES = C.bits(F.VERSION_1, F.PROTOCOL_FEATURES, F.NET_MRG_RXBUF, F.RING_EVENT_IDX,
                  F.RING_INDIRECT_DESC)


def fd_count() -> int:
    """Open fds of this process, after a garbage collection: fds of objects an earlier test
    left for the collector must not close between a test's two counts."""
    gc.collect()
    return len(os.listdir("/proc/self/fd"))


def eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


class Server:
    """A NetDevice on a Unix socket, served from an asyncio loop in a thread."""

    def __init__(self, path: str, device: NetDevice | None = None):
        self.path = path
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.device = device or NetDevice(QUEUE_PAIRS, name="test")
        self.endpoint = self.run(lambda: Endpoint(self.device, path))
        self.call(self.endpoint.start())

    def call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def run(self, fn):
        """Run ``fn`` on the loop thread; returns after every callback queued before it."""
        async def wrap():
            return fn()
        return self.call(wrap())

    def sync(self) -> None:
        self.run(lambda: None)

    def close(self) -> None:
        self.call(self.endpoint.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class Frontend:
    """A blocking vhost-user front-end, just enough for tests."""

    def __init__(self, path: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)

    def send(self, req, payload=b"", fds=(), flags=C.VERSION) -> None:
        if not isinstance(payload, bytes | bytearray):
            payload = payload.pack()
        wire.send_message(self.sock, int(req), flags, bytes(payload), list(fds))

    def recv(self, timeout: float = 5.0) -> wire.Message:
        return wire.recv_message_blocking(self.sock, expect_reply=True, timeout=timeout)

    def get(self, req, payload=b"", fds=(), flags=C.VERSION) -> wire.Message:
        self.send(req, payload, fds, flags)
        m = self.recv()
        assert m.request == req
        return m

    def get_u64(self, req, payload=b"") -> int:
        return P.U64.unpack(self.get(req, payload).payload).value

    def ack(self, req, payload=b"", fds=()) -> int:
        """Send with NEED_REPLY and return the acked u64."""
        return P.U64.unpack(self.get(req, payload, fds, C.VERSION | C.FLAG_NEED_REPLY)
                            .payload).value

    def closed_by_peer(self, timeout: float = 5.0) -> bool:
        """True when the back-end closed the connection (replies before EOF are skipped)."""
        self.sock.settimeout(timeout)
        try:
            while True:
                data = self.sock.recv(4096)
                if not data:
                    return True
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        self.sock.close()








@contextlib.contextmanager
def frontend(server):
    fe = Frontend(server.path)
    try:
        yield fe
    finally:
        fe.close()
        server.sync()


def wait_closed(server, fe) -> None:
    assert fe.closed_by_peer(), "the back-end kept the connection open"
    server.sync()                      # Connection.close() (reset) has run to its end


def negotiate(fe, *, protocol=PROTOCOL, features=FEATURES) -> None:
    feats = fe.get_u64(R.GET_FEATURES)
    assert feats & C.bit(F.PROTOCOL_FEATURES)
    fe.send(R.SET_OWNER)
    offered = fe.get_u64(R.GET_PROTOCOL_FEATURES)
    assert offered & protocol == protocol
    fe.send(R.SET_PROTOCOL_FEATURES, P.U64(protocol))
    fe.send(R.SET_FEATURES, P.U64(features & feats))


def mem_table(fe, image) -> None:
    fe.send(R.SET_MEM_TABLE, P.MemTable(tuple(image.descs())), region_fds(image))


def setup_ring(fe, ring: DriverRing, index: int, *, kick=None, call=None, enable=True):
    fe.send(R.SET_VRING_NUM, P.VringState(index, ring.size))
    fe.send(R.SET_VRING_ADDR, P.VringAddr(index, 0, ring.desc_uva, ring.used_uva,
                                          ring.avail_uva, 0))
    fe.send(R.SET_VRING_BASE, P.VringState(index, 0))
    if kick is not None:
        fe.send(R.SET_VRING_KICK, P.VringFd(index), [kick])
    else:
        fe.send(R.SET_VRING_KICK, P.VringFd(index | C.VRING_NOFD_MASK))
    if call is not None:
        fe.send(R.SET_VRING_CALL, P.VringFd(index), [call])
    if enable:
        fe.send(R.SET_VRING_ENABLE, P.VringState(index, 1))


_TO_CLOSE: list[int] = []   # our copies of fds sent to the back-end, closed after each test


def region_fds(image, count: int | None = None) -> list[int]:
    """New fds of the image's regions (the first ``count``) to send; closed after the test."""
    fds = [os.dup(r.fd) for r in image.regions[:count]]
    _TO_CLOSE.extend(fds)
    return fds
