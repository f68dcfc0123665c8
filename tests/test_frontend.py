"""pyvhost.frontend against pyvhost's own backend, in process: negotiation, both directions
(mergeable RX buffers or not, EVENT_IDX or not, one or several memory regions), clean
shutdown with GET_VRING_BASE, the backend going away, reconnect, and server mode."""

from __future__ import annotations

import asyncio

import pytest

from pyvhost.backend import NetBackend
from pyvhost.frontend import DEFAULT_FEATURES, BackendGone, VirtioUser
from pyvhost.protocol.constants import Feature as F
from pyvhost.protocol.constants import ProtocolFeature as PF
from pyvhost.protocol.constants import bit

TIMEOUT = 5.0


def frame(size: int, fill: int) -> bytes:
    return bytes([fill]) * 12 + b"\x08\x00" + bytes((fill + i) & 0xFF for i in range(size - 14))


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


async def backend_recv(be: NetBackend, n: int) -> list[bytes]:
    got: list[bytes] = []
    while len(got) < n:
        got += await asyncio.wait_for(be.recv(0), TIMEOUT)
    return got


async def port_recv(port: VirtioUser, n: int) -> list[bytes]:
    got: list[bytes] = []
    while len(got) < n:
        got += await asyncio.wait_for(port.arecv(0), TIMEOUT)
    return got


@pytest.mark.parametrize("mrg", [True, False])
@pytest.mark.parametrize("event_idx", [True, False])
@pytest.mark.parametrize("regions", [1, 3])
def test_both_directions(workdir, mrg, event_idx, regions):
    features = DEFAULT_FEATURES
    if not mrg:
        features &= ~bit(F.NET_MRG_RXBUF)
    if not event_idx:
        features &= ~bit(F.RING_EVENT_IDX)
    frames = [frame(64, 1), frame(1500, 2), frame(9000, 3)] * 20

    async def main():
        async with NetBackend(str(workdir / "be.sock")) as be:
            port = VirtioUser(workdir / "be.sock", features=features, regions=regions,
                              mem_size=8 << 20)
            await port.aopen()
            try:
                neg = port.negotiated
                assert neg.mrg_rxbuf == mrg and neg.event_idx == event_idx
                assert neg.protocol_features & bit(PF.REPLY_ACK)
                assert neg.backend_queue_pairs == be.queues
                sent = 0
                for i in range(0, len(frames), 4):     # the TX ring has room for 256
                    sent += port.send(frames[i:i + 4])
                assert sent == len(frames)
                assert await backend_recv(be, len(frames)) == frames
                for f in frames:                    # one at a time: RX holds 256 buffers
                    assert be.send([f]) == 1
                    assert await port_recv(port, 1) == [f]
                st = port.stats()
                assert st["ring0"]["packets"] == len(frames)
                assert st["ring0"]["drop_bad_used"] == 0
                assert st["ring1"]["packets"] == len(frames)
            finally:
                await port.aclose()
            bufs = 20 * (1 + 1 + 5) if mrg else len(frames)   # 2048-byte buffers with mrg
            assert port.last_bases == {0: bufs, 1: len(frames)}
    run(main())


def test_backend_goes_away_and_reconnect(workdir):
    path = str(workdir / "be.sock")

    async def main():
        be = await NetBackend(path).start()
        port = VirtioUser(path)
        await port.aopen()
        try:
            assert port.send([frame(64, 7)]) == 1
            assert await backend_recv(be, 1) == [frame(64, 7)]
            await be.close()
            for _ in range(50):
                if not port.alive:
                    break
                await asyncio.sleep(0.02)
            assert not port.alive
            with pytest.raises(BackendGone):
                await asyncio.to_thread(port.recv, 0, 32, 2.0)
            be = await NetBackend(path).start()
            await asyncio.to_thread(port.reconnect)
            assert port.connections == 2 and port.alive
            assert port.send([frame(100, 8)]) == 1
            assert await backend_recv(be, 1) == [frame(100, 8)]
            be.send([frame(200, 9)])
            assert await port_recv(port, 1) == [frame(200, 9)]
        finally:
            await port.aclose()
            await be.close()
    run(main())


def test_server_mode_backend_connects(workdir):
    path = str(workdir / "fe.sock")

    async def main():
        port = VirtioUser(path, server=True, queues=2)
        opening = asyncio.create_task(port.aopen())
        be = await NetBackend(path, client=True, queues=2).start()
        try:
            await asyncio.wait_for(opening, TIMEOUT)
            assert port.has_feature(F.NET_MQ)
            for q in range(2):
                assert port.send([frame(80, q)], queue=q) == 1
                got = await asyncio.wait_for(be.recv(q), TIMEOUT)
                assert got == [frame(80, q)]
        finally:
            await port.aclose()
            await be.close()
    run(main())


def test_server_mode_never_replaces_what_is_not_a_socket(workdir):
    """A file (or a directory) at the server path is refused and left as it was."""
    path = workdir / "not-a-socket"
    path.write_text("keep me")
    with pytest.raises(FileExistsError, match="not a socket"):
        VirtioUser(str(path), server=True)
    assert path.read_text() == "keep me"


def test_blocking_recv_times_out_without_traffic(workdir):
    async def main():
        async with NetBackend(str(workdir / "be.sock")):
            port = VirtioUser(workdir / "be.sock")
            await port.aopen()
            try:
                t0 = asyncio.get_running_loop().time()
                got = await asyncio.to_thread(port.recv, 0, 32, 0.3)
                assert got == []
                assert asyncio.get_running_loop().time() - t0 >= 0.29
                assert port.rx_queue(0).stats()["waits"] >= 1
            finally:
                await port.aclose()
    run(main())


def test_backend_lacking_queues_is_refused(workdir):
    async def main():
        async with NetBackend(str(workdir / "be.sock"), queues=1):
            port = VirtioUser(workdir / "be.sock", queues=2)
            with pytest.raises(BackendGone, match="queue pair"):
                await port.aopen()
            port.close()
    run(main())
