"""A switch port of type vhostuser (the switch listens on RUN_DIR/NAME.sock or in the
``--vhost-sock-dir``) or vhostuserclient (the switch connects to QEMU's socket at ``path=``
and reconnects whenever it comes back): a virtio-net device from pyvhost.backend, its
endpoint, and its place in the datapath. The device offers ``queues`` pairs; the switch
polls as many as the front-end has enabled (at least one), as OVS does."""

from __future__ import annotations

from dataclasses import dataclass, field

from pyvhost.backend import Endpoint, NetDevice

PORT_TYPES = ("vhostuser", "vhostuserclient")
DEFAULT_QUEUES = 8             # pairs offered unless queues= says otherwise


@dataclass
class Port:
    name: str
    bridge: str
    type: str
    path: str
    queues: int
    port_id: int
    ofport: int
    socket_mode: int | None = None
    socket_group: str | None = None
    device: NetDevice = field(repr=False, default=None)
    endpoint: Endpoint = field(repr=False, default=None)
    active: int = 1                       # queue pairs polled: the most the guest enabled

    @classmethod
    def create(cls, name, bridge, type_, path, queues, port_id, ofport, socket_mode=None,
               socket_group=None, gid=None) -> Port:
        if type_ not in PORT_TYPES:
            raise ValueError(f"unknown port type {type_!r} (have: {', '.join(PORT_TYPES)})")
        port = cls(name, bridge, type_, path, queues, port_id, ofport, socket_mode,
                   socket_group)
        port.device = NetDevice(queues, name=name)
        port.endpoint = Endpoint(port.device, path, client=type_ == "vhostuserclient",
                                 mode=socket_mode, gid=gid)
        return port

    def enabled_pairs(self) -> int:
        """1 + the highest queue pair whose guest TX ring is enabled now (at least 1)."""
        return 1 + max((q for q in range(self.queues) if self.queue_enabled(q)), default=0)

    def datapath_dev(self):
        """The port's device for the datapath (the vhost-user class over its rings)."""
        from pyvhost._vhostport import VhostDev
        return VhostDev(self.rx_vqs(), self.tx_vqs())

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
        """What the store keeps (a vhostuser socket's path follows from its name)."""
        out: dict = {"queues": self.queues}
        if self.type == "vhostuserclient":
            out["path"] = self.path
        if self.socket_mode is not None:
            out["socket_mode"] = self.socket_mode
        if self.socket_group is not None:
            out["socket_group"] = self.socket_group
        return out
