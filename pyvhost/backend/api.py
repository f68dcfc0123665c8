"""The Python API for writing a virtio-net device: a vhost-user socket, bursts of frames.

    async with NetBackend("/tmp/vhost.sock", queues=1) as dev:
        while True:
            frames = await dev.recv(queue=0)         # waits on the kick fd, no spinning
            dev.send([reply(f) for f in frames], queue=0)

Frames are bytes (the Ethernet frame, no virtio-net header). Per packet the copy runs in
the compiled layer; this class only decides when to call it. Use one ``recv`` per queue
at a time. For line-rate forwarding use a compiled poll loop instead (pyvhost._poll).
"""

from __future__ import annotations

import asyncio

from pyvhost._pktpool import PacketPool

from .endpoint import Endpoint
from .net import NetDevice

IDLE_RECHECK = 0.5  # seconds: a ring without a kick fd (polling mode) is re-checked this often


class NetBackend:
    """A virtio-net device served on ``path`` (listening, or connecting with ``client``)."""

    def __init__(self, path: str, *, client: bool = False, queues: int = 1,
                 name: str = "net", pool_size: int = 1024, strict_fds: bool | None = None):
        self.device = NetDevice(queues, name=name, strict_fds=strict_fds)
        self.endpoint = Endpoint(self.device, path, client=client)
        self.pool = PacketPool(pool_size)
        self._waiters: set[asyncio.Future] = set()
        self.device.listeners.append(self._wake_all)

    async def start(self) -> NetBackend:
        await self.endpoint.start()
        return self

    async def close(self) -> None:
        await self.endpoint.close()
        self._wake_all()

    async def __aenter__(self) -> NetBackend:
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.close()

    @property
    def queues(self) -> int:
        return self.device.queue_pairs

    @property
    def connected(self) -> bool:
        return self.endpoint.connected.is_set()

    async def wait_connected(self) -> None:
        await self.endpoint.connected.wait()

    def send(self, frames, queue: int = 0) -> int:
        """Copy frames into the guest's receive buffers; returns how many it took."""
        return self.device.rx_ring(queue).vq.send_burst(self.pool, frames)

    def recv_nowait(self, queue: int = 0, max_packets: int = 32) -> list[bytes]:
        """Frames the guest has sent on ``queue`` (at most ``max_packets``), maybe none."""
        return self.device.tx_ring(queue).vq.recv_burst(self.pool, max_packets)

    async def recv(self, queue: int = 0, max_packets: int = 32) -> list[bytes]:
        """Wait for and return at least one frame sent by the guest on ``queue``."""
        vq = self.device.tx_ring(queue).vq
        while True:
            frames = vq.recv_burst(self.pool, max_packets)
            if frames:
                return frames
            vq.set_notify(True)
            if vq.pending():
                continue
            await self._wait_kick(vq)

    async def _wait_kick(self, vq) -> None:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        fd = vq.kickfd
        if fd >= 0:
            loop.add_reader(fd, _resolve, fut)
        # a timer, not asyncio.wait_for: Python 3.11's wait_for can swallow a cancellation
        # that races with the future's result, and the reader task then never ends
        timer = loop.call_later(IDLE_RECHECK, _resolve, fut) if fd < 0 else None
        self._waiters.add(fut)
        try:
            await fut
        finally:
            self._waiters.discard(fut)
            if timer is not None:
                timer.cancel()
            if fd >= 0:
                loop.remove_reader(fd)
        vq.drain_kick()

    def _wake_all(self) -> None:
        """Ring state changed (new fds, stop, reset): every waiter re-reads its ring."""
        for fut in list(self._waiters):
            _resolve(fut)

    def stats(self) -> dict:
        return {f"ring{r.index}": r.vq.stats() for r in self.device.rings}


def _resolve(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)
