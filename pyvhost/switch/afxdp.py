"""afxdp ports: like afpacket ports (an existing interface, attached, never deleted or
reconfigured, promiscuous while attached, watched once a second and attached again when it
comes back), but frames move through an AF_XDP socket on the interface's queue 0 (libxdp
loads its XDP program in generic mode; copy mode, which is what veth allows). Only where
the switch was built with libxdp and the kernel allows it; otherwise a clear error. No
datapath code here: the compiled class is pyvhost._afxdp."""

from __future__ import annotations

import errno
import logging
import socket
import struct
from dataclasses import dataclass

from . import netdev
from .afpacket import AfPacketPort

log = logging.getLogger("pyvhost.switch")
AF_XDP, SOL_XDP, XDP_STATISTICS = 44, 283, 7       # linux/socket.h, linux/if_xdp.h


def afxdp_dev():
    try:
        from pyvhost._afxdp import AfXdpDev
    except ImportError:
        raise netdev.NetdevError("type=afxdp: this pyvhost was built without libxdp "
                                 "(install libxdp-dev and build again)") from None
    return AfXdpDev()


@dataclass
class AfXdpPort(AfPacketPort):
    """``sock`` is the socket that keeps the interface promiscuous (it carries nothing)."""

    xdp_seen: int = 0                         # the AF_XDP socket's drops counted so far
    xdp_mode: str = ""                        # how the socket is attached: "skb" (see _open)

    TYPE = "afxdp"

    @staticmethod
    def new_dev():
        return afxdp_dev()

    def _attach(self) -> None:
        index = netdev.ifindex(self.dev_name)
        sock = netdev.promisc_socket(self.dev_name)
        self.count_kernel_drops()                 # the old socket's, before it goes
        try:
            self.xdp_mode = self._open()
        except OSError as e:
            sock.close()
            if self.sock is not None and self.dev.fd < 0:    # the old one went with it:
                self.sock.close()                         # attach again next second
                self.sock, self.ifindex = None, None
            if e.errno in (errno.EPERM, errno.EACCES):
                raise netdev.NetdevError(
                    f"AF_XDP on {self.dev_name}: not permitted: needs CAP_NET_RAW and "
                    "CAP_NET_ADMIN (with CAP_BPF) (run the switch as root)") from None
            raise netdev.NetdevError(f"AF_XDP is not available on {self.dev_name}: "
                                     f"{e.strerror or e}") from None
        old, self.sock, self.ifindex = self.sock, sock, index
        if old is not None:
            old.close()
        self.xdp_seen = 0                         # a new AF_XDP socket counts from zero
        self.attaches += 1

    def _open(self) -> str:
        """The AF_XDP socket in generic ("skb") XDP mode; returns the mode. Not the driver's
        own ("drv"), which veth offers for peers whose MTU fits a page: measured here on
        veth it was slower (64-byte frames: ~140-150 kpps at B against ~170 in skb mode;
        TCP no better): veth's XDP path copies each skb from the stack into a page-pool
        page first (skb_pp_cow_data) and runs in a NAPI poll of its own. AfXdpDev.open
        takes either mode and leaves nothing behind when one is refused, so a port that
        wants drv where it pays (a NIC) can fall back to skb."""
        self.dev.open(self.dev_name, 0, "skb")
        return "skb"

    def link(self) -> dict:
        out = super().link()
        if self.sock is not None and self.xdp_mode:
            out["xdp_mode"] = self.xdp_mode
        return out

    def _take_lost(self) -> bool:
        """The kernel unbound the AF_XDP socket (the interface left, perhaps to come back
        with the same index from another namespace): it reports ENETDOWN as its error."""
        fd = self.dev.fd if self.dev is not None else -1
        if fd < 0:
            return False
        try:
            with socket.fromfd(fd, AF_XDP, socket.SOCK_RAW) as s:    # a dup, closed here
                return s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != 0
        except OSError:
            return False

    def count_kernel_drops(self) -> None:
        """Add what the kernel dropped since the last look: struct xdp_statistics's
        rx_dropped and rx_ring_full (cumulative per socket)."""
        fd = self.dev.fd if self.dev is not None else -1
        if fd < 0:
            return
        try:
            with socket.fromfd(fd, AF_XDP, socket.SOCK_RAW) as s:    # a dup, closed here
                raw = s.getsockopt(SOL_XDP, XDP_STATISTICS, 48)
        except OSError:
            return
        fields = struct.unpack(f"{len(raw) // 8}Q", raw[:len(raw) // 8 * 8])
        total = fields[0] + (fields[3] if len(fields) > 3 else 0)
        self.kernel_drops += max(0, total - self.xdp_seen)
        self.xdp_seen = total

    def _detach(self) -> None:
        self.count_kernel_drops()
        self.dev.close()
        if self.sock is not None:
            self.sock.close()
        self.sock, self.ifindex = None, None
