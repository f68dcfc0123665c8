"""Where a frontend's rings and buffers live in its memory, and how each is handed to the
backend (SET_VRING_NUM/BASE/ADDR/CALL/KICK/ENABLE) and taken back (GET_VRING_BASE).

Ring ``2q`` is queue pair q's RX (device -> driver), ``2q + 1`` its TX, as virtio-net has
it. Each ring's memory (descriptor table, avail and used rings, one buffer slot per
descriptor) is allocated once, laid out for a split ring; a packed ring uses the same
memory: the descriptor table as its descriptor ring, the first 4 bytes of the avail ring as
the driver event-suppression area and of the used ring as the device's (SET_VRING_ADDR
passes them in the same fields). The compiled ``DriverQueue`` over it is rebuilt for every
connection, since its layout and buffer length depend on the negotiated features.
"""

from __future__ import annotations

import os

from pyvhost._driver import DriverQueue
from pyvhost.protocol import payloads as P
from pyvhost.protocol.constants import Request as R

from .channel import Channel
from .memory import FrontendMemory
from .negotiate import Negotiated


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


class RingMemory:
    """Ring ``index`` of ``size`` descriptors, each with a ``slot_size``-byte buffer."""

    def __init__(self, memory: FrontendMemory, index: int, size: int, slot_size: int):
        if size == 0 or size > 32768 or size & (size - 1):
            raise ValueError(f"ring size {size} is not a power of 2 in 1..32768")
        self.index = index
        self.size = size
        self.slot_size = slot_size
        avail_off = 16 * size
        used_off = _align(avail_off + 6 + 2 * size, 64)
        ring_bytes = _align(used_off + 6 + 8 * size, 64)
        self.desc, _ = memory.alloc(ring_bytes, 4096)
        self.avail = self.desc + avail_off
        self.used = self.desc + used_off
        self.slots, self.slots_gpa = memory.alloc(size * slot_size, 4096)
        self.memory = memory
        self.kickfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.callfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.queue: DriverQueue | None = None

    @property
    def rx(self) -> bool:
        return self.index % 2 == 0

    def make_queue(self, neg: Negotiated, rx_buf_len: int, chain_seg: int = 0) -> DriverQueue:
        """A fresh, empty driver queue for a new connection (RX buffers not yet posted).
        ``chain_seg``: packed rings post buffers as chains of descriptors this long."""
        buf_len = rx_buf_len if self.rx and neg.mrg_rxbuf else self.slot_size
        q = DriverQueue(self.index, self.rx, self.size, self.desc, self.avail, self.used,
                        self.slots, self.slots_gpa, self.slot_size, buf_len, self.memory,
                        neg.packed)
        q.configure(event_idx=neg.event_idx, mrg_rxbuf=neg.mrg_rxbuf, hdr_len=neg.hdr_len,
                    kickfd=self.kickfd, callfd=self.callfd, in_order=neg.in_order,
                    chain_seg=chain_seg if neg.packed else 0)
        q.reset()
        self.queue = q
        return q

    def hand_over(self, ch: Channel, neg: Negotiated) -> None:
        """Tell the backend about this ring and start it (the ring was reset: split base 0,
        packed base avail 0 / wrap 1, used 0 / wrap 1)."""
        i = self.index
        ch.request(R.SET_VRING_NUM, P.VringState(i, self.size))
        ch.request(R.SET_VRING_BASE, P.VringState(i, self.queue.base))
        uva = self.memory.uva
        ch.request(R.SET_VRING_ADDR,
                   P.VringAddr(i, 0, uva(self.desc), uva(self.used), uva(self.avail), 0))
        ch.request(R.SET_VRING_CALL, P.VringFd(i), [self.callfd])
        ch.request(R.SET_VRING_KICK, P.VringFd(i), [self.kickfd])
        if neg.per_ring_enable:
            ch.request(R.SET_VRING_ENABLE, P.VringState(i, 1))

    def take_back(self, ch: Channel) -> int:
        """GET_VRING_BASE: the backend stops the ring and says where it got to (packed:
        the encoded avail/used indices and wrap counters)."""
        return ch.request(R.GET_VRING_BASE, P.VringState(self.index, 0)).num

    def close(self) -> None:
        self.queue = None
        for fd in (self.kickfd, self.callfd):
            os.close(fd)
        self.kickfd = self.callfd = -1
