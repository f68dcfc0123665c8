"""The switch's ports: what every port type shows the switch (``Port``), the vhost-user
types, and ``create_port`` that makes a port of any type. vhostuser (the switch listens on
RUN_DIR/NAME.sock or in the ``--vhost-sock-dir``) and vhostuserclient (the switch connects
to QEMU's socket at ``path=`` and reconnects whenever it comes back) are a virtio-net
device from pyvhost.backend and its endpoint; the device offers ``queues`` pairs and the
switch polls as many as the front-end has enabled (at least one), as OVS does. The host
port types (internal: a tap; afpacket and afxdp: an existing interface; vxlan and
geneve: a remote tunnel end over the host's UDP) live in .internal, .afpacket, .afxdp
and .tunnel. Each type hands the datapath a compiled device
(``datapath_dev``) of its port class; the switch itself never asks which type a port is."""

from __future__ import annotations

from dataclasses import dataclass, field

from pyvhost.backend import Endpoint, NetDevice

VHOST_TYPES = ("vhostuser", "vhostuserclient")
TUNNEL_TYPES = ("vxlan", "geneve")
HOST_TYPES = ("internal", "afpacket", "afxdp") + TUNNEL_TYPES
PORT_TYPES = VHOST_TYPES + HOST_TYPES
DEFAULT_QUEUES = 8             # pairs offered unless queues= says otherwise


@dataclass
class Port:
    """What the switch knows of any port. Subclasses implement the type's own parts."""
    name: str
    bridge: str
    type: str
    path: str
    queues: int
    port_id: int
    ofport: int
    active: int = 1                       # queue pairs polled

    @property
    def per_remote(self) -> bool:
        """Does the port reach many remotes (MAC learning keeps each MAC's)?"""
        return False

    def datapath_dev(self):
        """The port's compiled device (a pyvhost._port.PortDev) for the datapath."""
        raise NotImplementedError

    async def start(self) -> None:
        """Start serving (after the port is in the datapath); OSError if it cannot."""

    async def close(self) -> None:
        """Release what the port holds (after it left the datapath)."""

    def abandon(self) -> None:
        """A PMD may still be inside the port: keep its memory, drop its connections."""

    def periodic(self) -> bool:
        """Once a second on the control thread; True when the datapath must re-read the
        port's wait fds (its device changed)."""
        return False

    @property
    def connected(self) -> bool:
        return True

    def state(self) -> str:
        return "connected" if self.connected else "not connected"

    def link(self) -> dict:
        """The port's link as show and dump-ports report it (empty: nothing to say)."""
        return {}

    def queue_enabled(self, q: int) -> bool:
        return q < self.queues

    def ring_counters(self) -> tuple[dict, dict, list[dict]]:
        """(receive side, send side, per queue {"queue", "rx", "tx"}) counters."""
        return {}, {}, []

    def options(self) -> dict:
        """What the store keeps besides name, bridge, type and ofport."""
        return {}


@dataclass
class VhostPort(Port):
    socket_mode: int | None = None
    socket_group: str | None = None
    device: NetDevice = field(repr=False, default=None)
    endpoint: Endpoint = field(repr=False, default=None)

    @classmethod
    def create(cls, name, bridge, type_, path, queues, port_id, ofport, socket_mode=None,
               socket_group=None, gid=None) -> VhostPort:
        if type_ not in VHOST_TYPES:
            raise ValueError(f"unknown port type {type_!r} (have: {', '.join(PORT_TYPES)})")
        port = cls(name, bridge, type_, path, queues, port_id, ofport, 1, socket_mode,
                   socket_group)
        port.device = NetDevice(queues, name=name)
        port.endpoint = Endpoint(port.device, path, client=type_ == "vhostuserclient",
                                 mode=socket_mode, gid=gid)
        return port

    def enabled_pairs(self) -> int:
        """1 + the highest queue pair whose guest TX ring is enabled now (at least 1)."""
        return 1 + max((q for q in range(self.queues) if self.queue_enabled(q)), default=0)

    def datapath_dev(self):
        """The vhost-user class over the port's rings."""
        from pyvhost._vhostport import VhostDev
        return VhostDev(self.rx_vqs(), self.tx_vqs())

    def rx_vqs(self) -> list:
        """The guest's receive rings: the switch sends into these."""
        return [self.device.rx_ring(q).vq for q in range(self.queues)]

    def tx_vqs(self) -> list:
        """The guest's transmit rings: the switch polls these."""
        return [self.device.tx_ring(q).vq for q in range(self.queues)]

    async def start(self) -> None:
        await self.endpoint.start()

    async def close(self) -> None:
        await self.endpoint.close()

    def abandon(self) -> None:
        self.endpoint.connection = None

    @property
    def connected(self) -> bool:
        return self.endpoint.connected.is_set()

    def queue_enabled(self, q: int) -> bool:
        ring = self.device.tx_ring(q)
        return ring.vq.ready and ring.enabled

    def ring_counters(self) -> tuple[dict, dict, list[dict]]:
        """Summed per direction, the rings' counters (names as in the compiled structs)."""
        rx_rings: dict[str, int] = {}            # the guest's TX rings: we receive there
        tx_rings: dict[str, int] = {}
        for q in range(self.queues):
            for total, ring in ((rx_rings, self.device.tx_ring(q)),
                                (tx_rings, self.device.rx_ring(q))):
                for k, v in ring.vq.stats().items():
                    total[k] = total.get(k, 0) + v
        queues = [{"queue": q, "rx": self.device.tx_ring(q).vq.stats(),
                   "tx": self.device.rx_ring(q).vq.stats()} for q in range(self.active)]
        return rx_rings, tx_rings, queues

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


def create_host_port(name: str, bridge: str, type_: str, port_id: int, ofport: int, *,
                     mtu: int | None = None, dev: str | None = None,
                     restoring: bool = False, tunnel: dict | None = None) -> Port:
    """An internal, afpacket, afxdp, vxlan or geneve port, its interface created or
    attached, or its sockets opened (NetdevError or ValueError if not: then nothing was
    created). ``restoring``: an afpacket/afxdp port whose interface is absent is created
    anyway and attaches when the interface comes. ``tunnel``: a tunnel port's options
    (remote_ip=, key=, ...; only for vxlan and geneve)."""
    if type_ in TUNNEL_TYPES:
        if mtu is not None or dev is not None:
            raise ValueError(f"mtu= and dev= are not for type={type_} (its inner MTU is "
                             "the underlay's minus the encapsulation)")
        from .tunnel import TunnelPort
        return TunnelPort.create(name, bridge, port_id, ofport, type_, tunnel or {})
    if tunnel:
        raise ValueError(f"{', '.join(k + '=' for k in tunnel)}: for type=vxlan and "
                         "type=geneve only")
    if type_ == "internal":
        from .internal import InternalPort
        if dev is not None:
            raise ValueError("dev= is for type=afpacket (an internal port is its own "
                             "interface)")
        return InternalPort.create(name, bridge, port_id, ofport, mtu)
    if type_ in ("afpacket", "afxdp"):
        if mtu is not None:
            raise ValueError(f"mtu= is for type=internal (an {type_} port uses its "
                             "interface as it is)")
        if not dev:
            raise ValueError(f"type={type_} needs dev=IFNAME (the interface to attach)")
        if type_ == "afxdp":
            from .afxdp import AfXdpPort
            return AfXdpPort.create(name, bridge, port_id, ofport, dev, restoring)
        from .afpacket import AfPacketPort
        return AfPacketPort.create(name, bridge, port_id, ofport, dev, restoring)
    raise ValueError(f"unknown port type {type_!r} (have: {', '.join(PORT_TYPES)})")
