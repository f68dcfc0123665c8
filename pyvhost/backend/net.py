"""The virtio-net device on top of the generic vhost-user device: its features, queue pairs
(ring 2q = guest RX, 2q+1 = guest TX), MTU and RARP requests. No sockets, no packets."""

from __future__ import annotations

import logging

from pyvhost._vring import OFFLOAD_BITS
from pyvhost.protocol import constants as C
from pyvhost.protocol import payloads as P
from pyvhost.protocol.constants import Feature as F
from pyvhost.protocol.constants import ProtocolFeature as PF

from .device import DeviceError, VhostUserDevice

log = logging.getLogger("pyvhost.backend")

NET_FEATURES = C.bits(
    F.VERSION_1, F.NET_MRG_RXBUF, F.RING_INDIRECT_DESC, F.RING_EVENT_IDX, F.NET_MQ, F.NET_MTU,
    F.NET_STATUS, F.NET_GUEST_ANNOUNCE, F.IN_ORDER, F.RING_PACKED, F.LOG_ALL,
    F.NET_CSUM, F.NET_GUEST_CSUM, F.NET_HOST_TSO4, F.NET_HOST_TSO6, F.NET_GUEST_TSO4,
    F.NET_GUEST_TSO6, F.ACCESS_PLATFORM, F.PROTOCOL_FEATURES,
)
OFL_CSUM, OFL_TSO4, OFL_TSO6 = (OFFLOAD_BITS[k] for k in ("csum", "tso4", "tso6"))
NET_PROTOCOL_FEATURES = C.bits(
    PF.MQ, PF.REPLY_ACK, PF.NET_MTU, PF.RARP, PF.STATUS, PF.CONFIGURE_MEM_SLOTS, PF.BACKEND_REQ,
    PF.LOG_SHMFD,
)
DEFAULT_QUEUE_PAIRS = 8
MAX_QUEUE_PAIRS = C.MAX_RINGS // 2


class NetDevice(VhostUserDevice):
    """A virtio-net device with ``queue_pairs`` RX/TX pairs."""

    protocol_features_offered = NET_PROTOCOL_FEATURES

    def __init__(self, queue_pairs: int = DEFAULT_QUEUE_PAIRS, name: str = "net",
                 features: int = NET_FEATURES, *, strict_fds: bool | None = None):
        if not 1 <= queue_pairs <= MAX_QUEUE_PAIRS:
            raise ValueError(f"queue pairs must be 1..{MAX_QUEUE_PAIRS}, not {queue_pairs}")
        self.features_offered = features
        super().__init__(2 * queue_pairs, name, strict_fds=strict_fds)

    @property
    def queue_pairs(self) -> int:
        return len(self.rings) // 2

    def rx_ring(self, q: int):
        """The ring we write frames into (the guest's receive queue of pair ``q``)."""
        return self.rings[2 * q]

    def tx_ring(self, q: int):
        """The ring we take frames from (the guest's transmit queue of pair ``q``)."""
        return self.rings[2 * q + 1]

    def ring_features(self) -> dict:
        mrg = self.has(F.NET_MRG_RXBUF)
        return {"event_idx": self.has(F.RING_EVENT_IDX),
                "indirect": self.has(F.RING_INDIRECT_DESC),
                "mrg_rxbuf": mrg,
                "hdr_len": 12 if (mrg or self.has(F.VERSION_1)) else 10,
                "packed": self.has(F.RING_PACKED),
                "in_order": self.has(F.IN_ORDER),
                "ofl_tx": self._offloads(F.NET_CSUM, F.NET_HOST_TSO4, F.NET_HOST_TSO6),
                "ofl_rx": self._offloads(F.NET_GUEST_CSUM, F.NET_GUEST_TSO4, F.NET_GUEST_TSO6)}

    def _offloads(self, csum: int, tso4: int, tso6: int) -> int:
        """The offload bits of one direction; TSO counts only with checksumming."""
        if not self.has(csum):
            return 0
        return OFL_CSUM | (OFL_TSO4 if self.has(tso4) else 0) | (OFL_TSO6 if self.has(tso6) else 0)

    def on_net_set_mtu(self, p: P.U64, fds):
        if not 68 <= p.value <= 65535:
            raise DeviceError(f"MTU {p.value} out of range 68..65535")
        self.mtu = p.value
        log.info("%s: MTU %d", self.name, self.mtu)

    def on_send_rarp(self, p: P.U64, fds):
        """After a migration: announce the guest's MAC from here, ahead of its own frames."""
        self.rarp_mac = p.value.to_bytes(8, "little")[:6]
        log.info("%s: RARP requested for %s", self.name, self.rarp_mac.hex(":"))
        with self.tx_ring(0).vq as vq:
            vq.inject_rarp(self.rarp_mac)
        self.changed()
