"""Feature and protocol-feature negotiation with a backend, and what was agreed.

The frontend offers ``DEFAULT_FEATURES`` (or a caller's subset, plus RING_PACKED when packed
rings are asked for) and takes the intersection with what the backend offers; the result
says which ring behaviour applies (split or packed, IN_ORDER, mergeable RX buffers,
EVENT_IDX, header length) and how many queue pairs the backend has. Uses only
pyvhost.protocol; the channel does the I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

from pyvhost.protocol import constants as C
from pyvhost.protocol import payloads as P
from pyvhost.protocol.constants import Feature as F
from pyvhost.protocol.constants import ProtocolFeature as PF
from pyvhost.protocol.constants import Request as R

from .channel import BackendGone, Channel

DEFAULT_FEATURES = C.bits(F.VERSION_1, F.NET_MRG_RXBUF, F.RING_EVENT_IDX, F.NET_MQ,
                          F.IN_ORDER, F.PROTOCOL_FEATURES)
DEFAULT_PROTOCOL_FEATURES = C.bits(PF.MQ, PF.REPLY_ACK)


@dataclass(frozen=True)
class Negotiated:
    backend_features: int
    features: int
    backend_protocol_features: int
    protocol_features: int
    backend_queue_pairs: int

    def has(self, bit: int) -> bool:
        return bool(self.features & C.bit(bit))

    @property
    def mrg_rxbuf(self) -> bool:
        return self.has(F.NET_MRG_RXBUF)

    @property
    def event_idx(self) -> bool:
        return self.has(F.RING_EVENT_IDX)

    @property
    def packed(self) -> bool:
        return self.has(F.RING_PACKED)

    @property
    def in_order(self) -> bool:
        return self.has(F.IN_ORDER)

    @property
    def hdr_len(self) -> int:
        return 12 if self.mrg_rxbuf or self.has(F.VERSION_1) else 10

    @property
    def per_ring_enable(self) -> bool:
        """With protocol features, rings start disabled and SET_VRING_ENABLE turns them on."""
        return self.has(F.PROTOCOL_FEATURES)

    def describe(self) -> str:
        names = [f.name for f in F if self.features & C.bit(f)]
        pnames = [f.name for f in PF if self.protocol_features & C.bit(f)]
        return (f"features {self.features:#x} ({', '.join(names)}); protocol features "
                f"{self.protocol_features:#x} ({', '.join(pnames) or 'none'}); backend has "
                f"{self.backend_queue_pairs} queue pair(s)")


def negotiate(ch: Channel, want: int, want_protocol: int, queue_pairs: int,
              require: int = 0) -> Negotiated:
    """GET/SET_FEATURES and GET/SET_PROTOCOL_FEATURES, GET_QUEUE_NUM, SET_OWNER.

    Raises BackendGone when the backend cannot serve ``queue_pairs`` pairs, lacks
    VERSION_1 (little-endian rings, 12-byte header: all this frontend speaks) or lacks a
    feature of ``require`` (e.g. RING_PACKED when packed rings were asked for)."""
    offered = ch.request(R.GET_FEATURES).value
    protocol_offered = protocol = 0
    pairs = 1
    if offered & C.bit(F.PROTOCOL_FEATURES):
        protocol_offered = ch.request(R.GET_PROTOCOL_FEATURES).value
        protocol = protocol_offered & want_protocol
        ch.request(R.SET_PROTOCOL_FEATURES, P.U64(protocol))
        ch.ack = bool(protocol & C.bit(PF.REPLY_ACK))
        if protocol & C.bit(PF.MQ):
            pairs = ch.request(R.GET_QUEUE_NUM).value
    if pairs < queue_pairs:
        raise BackendGone(f"backend has {pairs} queue pair(s), {queue_pairs} wanted")
    if not offered & C.bit(F.VERSION_1):
        raise BackendGone("backend does not offer VIRTIO_F_VERSION_1")
    missing = [f.name for f in F if require & ~offered & C.bit(f)]
    if missing:
        raise BackendGone(f"backend does not offer {', '.join(missing)}")
    features = offered & want
    if queue_pairs == 1:
        features &= ~C.bit(F.NET_MQ)
    ch.request(R.SET_OWNER)
    ch.request(R.SET_FEATURES, P.U64(features))
    return Negotiated(offered, features, protocol_offered, protocol, pairs)
