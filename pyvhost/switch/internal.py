"""Internal ports: a tap interface the switch creates (named after the port) and owns; the
host stack sends and receives through it as through any NIC, and it may be moved into
another network namespace (the fd keeps working). Frames carry virtio-net headers, so
checksum and TSO metadata pass between guests and the host stack. Deleting the port
closes the fd, and the kernel deletes the interface with it (wherever it is by then).
No datapath code here: the compiled class is pyvhost._tap."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from . import netdev
from .port import Port

log = logging.getLogger("pyvhost.switch")
MIN_MTU, MAX_MTU = 68, 65521


@dataclass
class InternalPort(Port):
    mtu: int | None = None
    fd: int = -1
    ifindex: int | None = None             # in the switch's namespace when created
    dev: object = field(repr=False, default=None)
    gone: bool = False                    # the interface was deleted under us

    @classmethod
    def create(cls, name, bridge, port_id, ofport, mtu=None) -> InternalPort:
        from pyvhost._tap import TapDev
        if mtu is not None and not (isinstance(mtu, int) and MIN_MTU <= mtu <= MAX_MTU):
            raise ValueError(f"mtu: {mtu!r} out of range {MIN_MTU}..{MAX_MTU}")
        fd = netdev.open_tap(name)
        try:
            if mtu is not None:
                netdev.set_mtu(name, mtu)
            port = cls(name, bridge, "internal", name, 1, port_id, ofport, 1, mtu, fd,
                       netdev.ifindex(name))
            port.dev = TapDev(fd, netdev.VNET_HDR_LEN)
        except BaseException:
            os.close(fd)                        # the tap goes with it
            raise
        log.info("internal port %s: tap %s created", name, name)
        return port

    def datapath_dev(self):
        return self.dev

    async def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def abandon(self) -> None:
        self.fd = -1            # a PMD may still write to it: the fd stays open (and the tap)

    def periodic(self) -> bool:
        if self.dev.dead and not self.gone:
            self.gone = True
            log.warning("internal port %s: its interface was deleted outside the switch "
                        "(del-port and add-port make it again)", self.name)
            return True
        return False

    def link(self) -> dict:
        if self.gone:
            return {"state": "deleted (outside the switch)", "carrier": "off"}
        if self.ifindex is None or netdev.ifindex(self.name) != self.ifindex:
            return {"state": "elsewhere (another network namespace)", "carrier": "on"}
        out = netdev.link_state(self.name)
        mtu = netdev.get_mtu(self.name)
        if mtu is not None:
            out["mtu"] = str(mtu)
        return out

    def state(self) -> str:
        return " ".join(f"{k}: {v}" for k, v in self.link().items())

    def ring_counters(self) -> tuple[dict, dict, list[dict]]:
        st = self.dev.stats()
        return ({k: v for k, v in st.items() if k.startswith("rx_")},
                {k: v for k, v in st.items() if k.startswith("tx_")}, [])

    def options(self) -> dict:
        return {"mtu": self.mtu} if self.mtu is not None else {}
