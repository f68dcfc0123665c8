"""afpacket ports: an existing interface (a NIC, a veth) the switch was told to attach,
through an AF_PACKET socket with a TPACKET_V3 receive ring (netdev.open_packet_socket),
promiscuous while attached. The interface is never created, deleted or reconfigured here.
Once a second (``periodic``) the port looks at its interface: gone, the socket is taken
out of the datapath and closed; back (a new index, or the socket reported the link went
away), a new socket is attached; so traffic resumes without re-adding the port. No
datapath code here: the compiled class is pyvhost._afpacket."""

from __future__ import annotations

import errno
import logging
import socket
import struct
from dataclasses import dataclass, field

from . import netdev
from .port import Port

log = logging.getLogger("pyvhost.switch")


@dataclass
class AfPacketPort(Port):
    dev_name: str = ""
    sock: socket.socket | None = field(repr=False, default=None)
    ifindex: int | None = None
    dev: object = field(repr=False, default=None)
    attaches: int = 0
    abandoned: bool = False               # a PMD may still be inside: never closed
    kernel_drops: int = 0                 # frames the kernel dropped before we read them

    TYPE = "afpacket"

    @staticmethod
    def new_dev():
        from pyvhost._afpacket import AfPacketDev
        return AfPacketDev()

    @classmethod
    def create(cls, name, bridge, port_id, ofport, dev_name, restoring=False) -> AfPacketPort:
        """Attach ``dev_name``; when restoring from the store and the interface is not there
        (yet), the port waits for it (``periodic``)."""
        netdev.check_ifname(dev_name, "dev")
        port = cls(name, bridge, cls.TYPE, dev_name, 1, port_id, ofport, 1, dev_name)
        port.dev = cls.new_dev()
        try:
            port._attach()
        except netdev.NetdevError as e:
            if not restoring or netdev.ifindex(dev_name) is not None:
                raise
            log.warning("%s port %s: %s; attaching when it appears", cls.TYPE, name, e)
        return port

    def _attach(self) -> None:
        index = netdev.ifindex(self.dev_name)
        sock = netdev.open_packet_socket(self.dev_name)
        try:
            self.dev.attach(sock.fileno(), netdev.RING_BLOCK, netdev.RING_BLOCKS)
        except OSError as e:
            sock.close()
            raise netdev.NetdevError(f"attaching {self.dev_name}: {e}") from None
        self.count_kernel_drops()                 # the old socket's, before it goes
        old, self.sock, self.ifindex = self.sock, sock, index
        if old is not None:
            old.close()
        self.attaches += 1

    def _detach(self) -> None:
        self.dev.detach()                     # no PMD uses the socket once this returns
        self.count_kernel_drops()
        if self.sock is not None:
            self.sock.close()
        self.sock, self.ifindex = None, None

    def count_kernel_drops(self) -> None:
        """Add what the kernel dropped since the last look (its ring was full)."""
        if self.sock is None:
            return
        try:
            raw = self.sock.getsockopt(netdev.SOL_PACKET, netdev.PACKET_STATISTICS, 12)
        except OSError:
            return
        self.kernel_drops += struct.unpack("3I", raw)[1]     # tp_packets, tp_drops, ...

    def datapath_dev(self):
        return self.dev

    async def close(self) -> None:
        if not self.abandoned:
            self._detach()                    # the kernel ends promiscuous mode with it

    def abandon(self) -> None:
        self.abandoned = True                 # keep the socket and its ring mapped

    def periodic(self) -> bool:
        if self.abandoned:
            return False
        self.count_kernel_drops()           # once a second: a 32-bit counter cannot wrap
        index = netdev.ifindex(self.dev_name)
        if index is None:
            if self.sock is not None:
                log.warning("%s port %s: interface %s is gone", self.type, self.name,
                            self.dev_name)
                self._detach()
                return True
            return False
        lost = False
        if self.sock is not None:
            # an error (ENETDOWN): the link went down, or the interface left and came back
            # (the same index after a trip to another namespace): a new socket if it is up
            err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            lost = (self._take_lost() or err == errno.ENETDOWN) and \
                netdev.link_state(self.dev_name)["state"] == "up"
        if self.sock is None or index != self.ifindex or lost:
            try:
                self._attach()
            except netdev.NetdevError as e:
                log.warning("%s port %s: %s", self.type, self.name, e)
                return False
            log.info("%s port %s: attached to %s (index %d)", self.type, self.name,
                     self.dev_name, index)
            return True
        return False

    def _take_lost(self) -> bool:
        take = getattr(self.dev, "take_lost", None)
        return take() if take is not None else False

    @property
    def connected(self) -> bool:
        return self.sock is not None

    def link(self) -> dict:
        out = netdev.link_state(self.dev_name)
        if self.sock is None and out["state"] != "absent":
            out["state"] += " (not attached)"
        return out

    def state(self) -> str:
        return f"dev: {self.dev_name} " + " ".join(f"{k}: {v}" for k, v in self.link().items())

    def ring_counters(self) -> tuple[dict, dict, list[dict]]:
        st = self.dev.stats()
        if not self.abandoned:
            self.count_kernel_drops()
        rx = {k: v for k, v in st.items() if k.startswith("rx_")}
        rx["drop_kernel"] = self.kernel_drops     # the kernel's ring was full
        return rx, {k: v for k, v in st.items() if k.startswith("tx_")}, []

    def options(self) -> dict:
        return {"dev": self.dev_name}
