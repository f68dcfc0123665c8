"""A switch port of type vhostuser (the switch listens) or vhostuserclient (the switch
connects to QEMU's socket and reconnects whenever it comes back): a virtio-net device
from pyvhost.backend, its endpoint, and its place in the datapath."""

from __future__ import annotations

from dataclasses import dataclass, field

from pyvhost.backend import Endpoint, NetDevice

PORT_TYPES = ("vhostuser", "vhostuserclient")
DEFAULT_QUEUES = 8


@dataclass
class Port:
    name: str
    bridge: str
    type: str
    path: str
    queues: int
    port_id: int
    ofport: int
    device: NetDevice = field(repr=False, default=None)
    endpoint: Endpoint = field(repr=False, default=None)

    @classmethod
    def create(cls, name, bridge, type_, path, queues, port_id, ofport) -> Port:
        if type_ not in PORT_TYPES:
            raise ValueError(f"unknown port type {type_!r} (have: {', '.join(PORT_TYPES)})")
        port = cls(name, bridge, type_, path, queues, port_id, ofport)
        port.device = NetDevice(queues, name=name)
        port.endpoint = Endpoint(port.device, path, client=type_ == "vhostuserclient")
        return port

    def rx_vqs(self) -> list:
        """The guest's receive rings: the switch sends into these."""
        return [self.device.rx_ring(q).vq for q in range(self.queues)]

    def tx_vqs(self) -> list:
        """The guest's transmit rings: the switch polls these."""
        return [self.device.tx_ring(q).vq for q in range(self.queues)]

    @property
    def connected(self) -> bool:
        return self.endpoint.connected.is_set()

    def queue_enabled(self, q: int) -> bool:
        ring = self.device.tx_ring(q)
        return ring.vq.ready and ring.enabled

    def options(self) -> dict:
        return {"path": self.path, "queues": self.queues}
