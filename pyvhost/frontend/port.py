"""``VirtioUser``: a virtio-net driver without a VM, attached to any vhost-user backend.

    with VirtioUser("/tmp/vhost.sock", queues=1) as port:     # connect, negotiate, start
        port.send([frame])                                    # copies into the TX ring
        frames = port.recv(timeout=1.0)                       # sleeps on the call eventfd

The port owns memfd guest memory, its rings and eventfds; the control socket is either
connected (default) or listened on (``server=True``, the backend connects). Per packet the
work is compiled (pyvhost._driver); this class sequences the protocol and decides when to
call it. One thread (or one asyncio task per queue) uses a port at a time. When the
backend goes away, ``alive`` turns False and waits raise BackendGone; ``reconnect()``
sets everything up again over fresh, empty rings.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time

from pyvhost import _driver
from pyvhost._pktpool import PacketPool
from pyvhost.protocol.constants import Feature, bit
from pyvhost.protocol.constants import Request as R

from .channel import BackendGone, Channel, listen
from .memory import FrontendMemory
from .negotiate import DEFAULT_FEATURES, DEFAULT_PROTOCOL_FEATURES, Negotiated, negotiate
from .rings import RingMemory

HDR_LEN = 12


class VirtioUser:
    """A virtio-net frontend on ``path`` with ``queues`` queue pairs of ``ring_size``.

    ``mem_size``/``regions``: guest memory (memfd regions of mem_size bytes each).
    ``max_frame``: the largest frame sent or received in one piece. ``rx_buf_len``: RX
    buffer size when mergeable RX buffers are negotiated (frames span several).
    ``features``/``protocol_features``: what to offer (a subset of the defaults; add
    RING_PACKED to use packed rings if the backend has them). ``packed``: packed rings or
    fail (BackendGone). ``chain_seg``: with packed rings, post every buffer as a chain of
    descriptors (the header, then pieces of at most chain_seg bytes)."""

    def __init__(self, path: str, *, server: bool = False, queues: int = 1,
                 ring_size: int = 256, mem_size: int = 64 << 20, regions: int = 1,
                 max_frame: int = 9216, rx_buf_len: int = 2048,
                 features: int = DEFAULT_FEATURES,
                 protocol_features: int = DEFAULT_PROTOCOL_FEATURES,
                 connect_timeout: float = 10.0, pool_size: int = 1024,
                 packed: bool = False, chain_seg: int = 0):
        if not 1 <= queues <= 128:
            raise ValueError("queues must be 1..128")
        if rx_buf_len < 64 + HDR_LEN:
            raise ValueError("RX buffers must hold a header and a minimal frame")
        self.path = str(path)
        self.server = server
        self.queue_pairs = queues
        self.ring_size = ring_size
        self.rx_buf_len = rx_buf_len
        self.want = features | (bit(Feature.RING_PACKED) if packed else 0)
        self.require = bit(Feature.RING_PACKED) if packed else 0
        self.chain_seg = chain_seg
        self.want_protocol = protocol_features
        self.connect_timeout = connect_timeout
        self.slot_size = (HDR_LEN + max_frame + 63) // 64 * 64
        self.pool = PacketPool(pool_size, max(max_frame, 64))
        self.memory = FrontendMemory(mem_size, regions)
        self.rings: list[RingMemory] = []
        try:
            rx_slot = max(self.slot_size, (rx_buf_len + 63) // 64 * 64)
            for i in range(2 * queues):
                slot = rx_slot if i % 2 == 0 else self.slot_size
                self.rings.append(RingMemory(self.memory, i, ring_size, slot))
        except BaseException:
            self._release()
            raise
        self.negotiated: Negotiated | None = None
        self.channel: Channel | None = None
        try:
            self.listener = listen(self.path) if server else None
        except BaseException:
            self._release()
            raise
        self.connections = 0
        self.last_bases: dict[int, int] = {}

    # -- lifecycle ----------------------------------------------------------------------
    def open(self) -> VirtioUser:
        """Connect (or accept), negotiate, hand over memory and rings, post RX buffers."""
        if self.channel is not None:
            raise RuntimeError("already open")
        if self.listener is not None:
            ch = Channel.accept(self.listener, self.connect_timeout)
        else:
            ch = Channel.connect(self.path, self.connect_timeout)
        try:
            neg = negotiate(ch, self.want, self.want_protocol, self.queue_pairs,
                            self.require)
            for ring in self.rings:
                ring.make_queue(neg, self.rx_buf_len, self.chain_seg)
            ch.request(R.SET_MEM_TABLE, self.memory.table(), self.memory.fds())
            for ring in self.rings:
                ring.hand_over(ch, neg)
        except BaseException:
            ch.close()
            raise
        self.channel = ch
        self.negotiated = neg
        self.connections += 1
        for q in self.rx_queues:
            q.post_rx()
        return self

    def close(self) -> None:
        """Stop every ring with GET_VRING_BASE (if the backend is still there), disconnect,
        and free memory, eventfds and the listening socket. Idempotent."""
        self.disconnect()
        if self.listener is not None:
            self.listener.close()
            self.listener = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        self._release()

    def disconnect(self) -> None:
        """Stop the rings (GET_VRING_BASE, bases kept in ``last_bases``) and drop the
        connection; memory and eventfds stay for ``reconnect``."""
        ch, self.channel = self.channel, None
        if ch is None:
            return
        try:
            if ch.alive():
                for ring in self.rings:
                    self.last_bases[ring.index] = ring.take_back(ch)
        except BackendGone:
            pass
        finally:
            ch.close()

    def reconnect(self) -> VirtioUser:
        """After the backend went away (or a disconnect): set everything up again."""
        self.disconnect()
        return self.open()

    def _release(self) -> None:
        for ring in self.rings:
            ring.close()
        self.rings = []
        self.memory.close()

    def __enter__(self) -> VirtioUser:
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- state --------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        """Connected, and the backend has not closed its end."""
        return self.channel is not None and self.channel.alive()

    def check(self) -> None:
        """Raise BackendGone unless the backend is still there."""
        if not self.alive:
            raise BackendGone(f"backend on {self.path} went away")

    def _queue(self, index: int) -> _driver.DriverQueue:
        if self.channel is None:
            raise BackendGone("not connected")
        return self.rings[index].queue

    def rx_queue(self, q: int = 0) -> _driver.DriverQueue:
        return self._queue(2 * q)

    def tx_queue(self, q: int = 0) -> _driver.DriverQueue:
        return self._queue(2 * q + 1)

    @property
    def rx_queues(self) -> list[_driver.DriverQueue]:
        return [self.rx_queue(q) for q in range(self.queue_pairs)]

    @property
    def tx_queues(self) -> list[_driver.DriverQueue]:
        return [self.tx_queue(q) for q in range(self.queue_pairs)]

    def has_feature(self, feature: int) -> bool:
        return self.negotiated is not None and bool(self.negotiated.features & bit(feature))

    # -- packets ------------------------------------------------------------------------
    def send(self, frames, queue: int = 0) -> int:
        """Copy frames into TX ring ``queue``; returns how many fitted (the rest did not)."""
        return self.tx_queue(queue).send(self.pool, frames)

    def recv_nowait(self, queue: int = 0, max_packets: int = 32) -> list[bytes]:
        return self.rx_queue(queue).recv(self.pool, max_packets)

    def recv(self, queue: int = 0, max_packets: int = 32,
             timeout: float | None = None) -> list[bytes]:
        """Frames received on ``queue``; waits (on the call eventfd) up to ``timeout`` s
        for at least one. Raises BackendGone if the backend goes away meanwhile."""
        q = self.rx_queue(queue)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            frames = q.recv(self.pool, max_packets)
            if frames:
                return frames
            left = -1
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return []
                left = int(remaining * 1000) + 1
            if _driver.wait([q], self.channel.fileno(), left) == 2:
                self.check()

    def send_all(self, frames, queue: int = 0, timeout: float = 5.0) -> int:
        """Send every frame, waiting for TX descriptors to come back when the ring is full.
        Returns how many were sent before ``timeout``."""
        q = self.tx_queue(queue)
        frames = list(frames)
        done = 0
        deadline = time.monotonic() + timeout
        while done < len(frames):
            n = q.send(self.pool, frames[done:])
            done += n
            if n == 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                if _driver.wait([q], self.channel.fileno(), int(left * 1000) + 1) == 2:
                    self.check()
                q.reclaim()
        return done

    def stats(self) -> dict:
        """Per-ring counters of the compiled queues, and what was negotiated."""
        out = {f"ring{r.index}": r.queue.stats() for r in self.rings if r.queue is not None}
        if self.negotiated is not None:
            out["features"] = self.negotiated.features
            out["protocol_features"] = self.negotiated.protocol_features
        out["connections"] = self.connections
        return out

    # -- asyncio ------------------------------------------------------------------------
    async def aopen(self) -> VirtioUser:
        """``open`` on a worker thread, so a backend on this same loop can answer."""
        return await asyncio.to_thread(self.open)

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)

    async def __aenter__(self) -> VirtioUser:
        return await self.aopen()

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def arecv(self, queue: int = 0, max_packets: int = 32) -> list[bytes]:
        """Wait (without blocking the loop) for at least one frame on ``queue``."""
        q = self.rx_queue(queue)
        loop = asyncio.get_running_loop()
        while True:
            frames = q.recv(self.pool, max_packets)
            if frames:
                return frames
            q.set_interrupts(True)
            if q.pending():
                q.set_interrupts(False)
                continue
            fut = loop.create_future()
            ctl = self.channel.fileno()
            for fd in (q.callfd, ctl):
                loop.add_reader(fd, _resolve, fut, fd)
            try:
                fd = await fut
            finally:
                for fd_ in (q.callfd, ctl):
                    loop.remove_reader(fd_)
                q.set_interrupts(False)
            if fd == ctl:
                self.check()
            else:
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(q.callfd)


def _resolve(fut: asyncio.Future, fd: int) -> None:
    if not fut.done():
        fut.set_result(fd)
