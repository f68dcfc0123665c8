"""The back-end's client mode (vhostuserclient ports) against a plain listening socket: a
closed endpoint closes its connection whatever it was waiting on (the peer sees EOF: QEMU
only listens again then), a peer that accepts and never talks is left and retried, and a
peer that hangs up at once is retried with back-off, never in a tight loop."""

from __future__ import annotations

import asyncio
import socket

from pyvhost.backend import Endpoint, NetDevice
from pyvhost.backend.endpoint import SILENT_PEER


def listener(path) -> socket.socket:
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(8)
    srv.setblocking(False)
    return srv


async def accept(srv: socket.socket, timeout: float) -> socket.socket:
    loop = asyncio.get_running_loop()
    conn, _ = await asyncio.wait_for(loop.sock_accept(srv), timeout)
    return conn


def test_close_ends_a_long_connection_and_the_peer_sees_eof(tmp_path):
    async def scenario():
        srv = listener(tmp_path / "qemu.sock")
        ep = Endpoint(NetDevice(1, name="t"), str(tmp_path / "qemu.sock"), client=True)
        await ep.start()
        conn = await accept(srv, 5)
        conn.sendall(b"\x01\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00")   # GET_FEATURES
        await asyncio.sleep(SILENT_PEER + 0.5)           # past the silent-peer wait
        await ep.close()
        conn.settimeout(2)
        data = b""
        while True:
            chunk = conn.recv(4096)
            if not chunk:
                break                                    # EOF: the socket was closed
            data += chunk
        assert data                                      # it answered GET_FEATURES first
        conn.close()
        srv.close()
    asyncio.run(scenario())


def test_silent_and_hanging_up_peers_are_retried_with_back_off(tmp_path):
    async def scenario():
        srv = listener(tmp_path / "qemu.sock")
        ep = Endpoint(NetDevice(1, name="t"), str(tmp_path / "qemu.sock"), client=True)
        await ep.start()
        loop = asyncio.get_running_loop()
        first = await accept(srv, 5)                     # accepted, never spoken to
        t0 = loop.time()
        second = await accept(srv, SILENT_PEER + 3)
        assert loop.time() - t0 >= SILENT_PEER - 0.2     # given up on after SILENT_PEER
        first.close()
        second.close()                                   # hang up at once, repeatedly
        t1, n = loop.time(), 0
        while loop.time() - t1 < 3:
            try:
                c = await accept(srv, 3)
            except TimeoutError:
                break
            c.close()
            n += 1
        assert 1 <= n < 12, n                            # back-off: not thousands
        await ep.close()
        srv.close()
    asyncio.run(scenario())
