"""The host's network interfaces as the switch's host ports need them: interface names,
index and flags (admin state, carrier), MTU, tap creation (TUNSETIFF with a virtio-net
header and offloads) and the AF_PACKET socket with its TPACKET_V3 ring. Errors become
``NetdevError`` with a line for users; a missing privilege names the capability.

Only system calls on the process's own network namespace here: nothing of the datapath,
the store or the switch. Never deletes or reconfigures an interface it did not create
(a tap goes away when its fd is closed).
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import socket
import struct

IFNAMSIZ = 16
IFNAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:@-]{0,14}")

# linux/if_tun.h
TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFF_TUN_EXCL = 0x8000
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6 = 0x01, 0x02, 0x04
VNET_HDR_LEN = 12            # with num_buffers: the layout pkt_t keeps

# linux/sockios.h, linux/if.h
SIOCGIFFLAGS, SIOCGIFMTU, SIOCSIFMTU = 0x8913, 0x8921, 0x8922
IFF_UP, IFF_RUNNING, IFF_LOWER_UP = 0x1, 0x40, 0x10000

# linux/if_packet.h
SOL_PACKET = 263
PACKET_ADD_MEMBERSHIP = 1
PACKET_RX_RING = 5
PACKET_STATISTICS = 6             # struct tpacket_stats_v3; read and reset by the kernel
PACKET_VERSION = 10
PACKET_VNET_HDR = 15
PACKET_IGNORE_OUTGOING = 23
PACKET_MR_PROMISC = 1
TPACKET_V3 = 2
ETH_P_ALL = 0x0003
RING_BLOCK = 1 << 18          # a block holds the largest GSO frame (64 KiB) and then some
RING_BLOCKS = 16
RING_FRAME = 2048
RING_TIMEOUT_MS = 1           # a block with frames is handed over after at most this


class NetdevError(Exception):
    """An interface operation failed; the message is for users."""


def _fail(what: str, e: OSError, capability: str) -> NetdevError:
    if e.errno in (errno.EPERM, errno.EACCES):
        return NetdevError(f"{what}: not permitted: needs {capability} (run the switch as "
                           f"root or grant it {capability})")
    return NetdevError(f"{what}: {e.strerror or e}")


def check_ifname(name: str, what: str = "interface name") -> None:
    if not isinstance(name, str) or not IFNAME_RE.fullmatch(name):
        raise NetdevError(f"{what} {name!r}: 1 to {IFNAMSIZ - 1} of A-Z a-z 0-9 _ . : @ - "
                          "(not starting with . : @ or -)")


def ifindex(name: str) -> int | None:
    """The interface's index in this network namespace, or None if there is none."""
    try:
        return socket.if_nametoindex(name)
    except OSError:
        return None


def _ifreq(name: str, value: int = 0) -> bytes:
    return struct.pack("16si20x", name.encode(), value)


def _ioctl(name: str, request: int, value: int = 0) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        out = fcntl.ioctl(s.fileno(), request, _ifreq(name, value))
    return struct.unpack_from("i", out, 16)[0]


def link_state(name: str) -> dict:
    """{"state": up|down|absent, "carrier": on|off} for an interface of this namespace."""
    try:
        flags = _ioctl(name, SIOCGIFFLAGS) & 0xFFFFFFFF
    except OSError:
        return {"state": "absent", "carrier": "off"}
    return {"state": "up" if flags & IFF_UP else "down",
            "carrier": "on" if flags & (IFF_LOWER_UP | IFF_RUNNING) else "off"}


def get_mtu(name: str) -> int | None:
    try:
        return _ioctl(name, SIOCGIFMTU)
    except OSError:
        return None


def set_mtu(name: str, mtu: int) -> None:
    try:
        _ioctl(name, SIOCSIFMTU, mtu)
    except OSError as e:
        raise _fail(f"setting the MTU of {name} to {mtu}", e, "CAP_NET_ADMIN") from None


def open_tap(name: str) -> int:
    """A new tap interface ``name`` (never an existing one): a non-blocking fd with 12-byte
    virtio-net headers and checksum/TSO offloads on; the interface goes when it closes."""
    check_ifname(name, "internal port name")
    if ifindex(name) is not None:
        raise NetdevError(f"an interface named {name} exists already (an internal port "
                          "creates its own)")
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise _fail("opening /dev/net/tun", e, "CAP_NET_ADMIN") from None
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(),
                                               IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | IFF_TUN_EXCL))
        fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_LEN))
        fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6)
    except OSError as e:
        os.close(fd)
        if e.errno == errno.EBUSY:
            raise NetdevError(f"an interface named {name} exists already") from None
        raise _fail(f"creating tap {name}", e, "CAP_NET_ADMIN") from None
    return fd


def _packet_socket(dev: str, protocol: int, what: str, setup) -> socket.socket:
    """An AF_PACKET socket (protocol 0: it receives nothing until bound) that ``setup``
    prepares, bound to ``dev`` with ``protocol``, and ``dev`` promiscuous while it is open
    (the kernel undoes it on close). Errors name the interface and CAP_NET_RAW."""
    check_ifname(dev, "dev")
    index = ifindex(dev)
    if index is None:
        raise NetdevError(f"dev={dev}: no such interface")
    try:
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    except OSError as e:
        raise _fail(f"an AF_PACKET socket for {dev}", e, "CAP_NET_RAW") from None
    try:
        setup(s)
        s.bind((dev, protocol))
        s.setsockopt(SOL_PACKET, PACKET_ADD_MEMBERSHIP,
                     struct.pack("iHH8s", index, PACKET_MR_PROMISC, 0, b""))
    except OSError as e:
        s.close()
        raise _fail(f"{what} {dev}", e, "CAP_NET_RAW") from None
    return s


def _ring_setup(s: socket.socket) -> None:
    s.setblocking(False)
    s.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
    s.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V3)
    try:
        s.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
    except OSError:
        pass                     # older kernels: our own frames are not looped back anyway
    s.setsockopt(SOL_PACKET, PACKET_RX_RING, struct.pack(
        "7I", RING_BLOCK, RING_BLOCKS, RING_FRAME, RING_BLOCK * RING_BLOCKS // RING_FRAME,
        RING_TIMEOUT_MS, 0, 0))


def open_packet_socket(dev: str) -> socket.socket:
    """An AF_PACKET socket on ``dev`` (all protocols) with virtio-net headers, a TPACKET_V3
    receive ring (RING_BLOCKS x RING_BLOCK bytes, not yet mapped), its own frames not looped
    back, and ``dev`` promiscuous while the socket is open."""
    return _packet_socket(dev, ETH_P_ALL, "attaching", _ring_setup)


def promisc_socket(dev: str) -> socket.socket:
    """An AF_PACKET socket that receives nothing and only keeps ``dev`` promiscuous while
    it is open (for ports whose frames come another way: afxdp)."""
    return _packet_socket(dev, 0, "promiscuous mode on", lambda s: None)
