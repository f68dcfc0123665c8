"""Network namespaces and the tap interface of ``pyvhost.frontend.Guest``: create a namespace
(or use an existing one), open a tap *inside* it (TUNSETIFF resolves names in the calling
thread's namespace, so a short-lived helper thread setns()es into it first), set the MAC,
MTU, address and link state with ``ip -n NS``, and delete only what was created here.

The tap is opened the way pyvhost.switch.netdev opens an internal port's (IFF_TAP |
IFF_NO_PI | IFF_VNET_HDR | IFF_TUN_EXCL, a 12-byte virtio-net header, non-blocking); the
offloads (TUNSETOFFLOAD) are set per connection from what the backend negotiated. This
module may not import pyvhost.switch, backend or cli (frontend layering): the few ioctl
numbers are repeated here. Errors are ``GuestNetError`` with a line for users.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import os
import re
import struct
import subprocess
import threading

# linux/if_tun.h
TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
TUNSETCARRIER = 0x400454E2
IFF_TAP = 0x0002
IFF_MULTI_QUEUE = 0x0100
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFF_TUN_EXCL = 0x8000
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN = 0x01, 0x02, 0x04, 0x08
VNET_HDR_LEN = 12
CLONE_NEWNET = 0x40000000

IFNAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,14}")
NETNS_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
NETNS_DIR = "/run/netns"


class GuestNetError(Exception):
    """A namespace or interface operation failed; the message is for users."""


def check_ifname(name: str) -> None:
    if not isinstance(name, str) or not IFNAME_RE.fullmatch(name):
        raise GuestNetError(f"interface name {name!r}: 1 to 15 of A-Z a-z 0-9 _ . - "
                            "(not starting with . or -)")


def check_netns(name: str) -> None:
    if not isinstance(name, str) or not NETNS_RE.fullmatch(name):
        raise GuestNetError(f"namespace name {name!r}: 1 to 64 of A-Z a-z 0-9 _ . - "
                            "(not starting with . or -)")


def default_mac(netns: str | None, ifname: str, socket_path: str) -> str:
    """A locally administered unicast MAC that stays the same for the same namespace,
    interface and socket (02:xx:xx:xx:xx:xx)."""
    digest = hashlib.sha256(f"{netns or ''}\0{ifname}\0{os.path.abspath(socket_path)}"
                            .encode()).digest()
    return ":".join(f"{b:02x}" for b in (0x02, *digest[:5]))


def parse_mac(mac: str) -> str:
    parts = mac.split(":")
    if len(parts) != 6 or not all(re.fullmatch(r"[0-9A-Fa-f]{1,2}", p) for p in parts):
        raise GuestNetError(f"bad MAC address {mac!r}")
    value = bytes(int(p, 16) for p in parts)
    if value[0] & 1:
        raise GuestNetError(f"MAC {mac} is a multicast address")
    return ":".join(f"{b:02x}" for b in value)


def ip(args: list[str], netns: str | None = None, check: bool = True) -> str:
    """Run ``ip [-n NS] ARGS``; its stdout, GuestNetError with its stderr on failure."""
    cmd = ["ip", *(["-n", netns] if netns else []), *args]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise GuestNetError(f"{' '.join(cmd)}: {e}") from None
    if check and r.returncode != 0:
        raise GuestNetError(f"{' '.join(cmd)}: {r.stderr.strip() or 'failed'}")
    return r.stdout


def netns_exists(name: str) -> bool:
    return os.path.exists(os.path.join(NETNS_DIR, name))


def create_netns(name: str) -> bool:
    """Make namespace ``name`` unless it exists (its loopback up); True if made here."""
    check_netns(name)
    if netns_exists(name):
        return False
    ip(["netns", "add", name])
    try:
        ip(["link", "set", "lo", "up"], name)
    except GuestNetError:
        delete_netns(name)
        raise
    return True


def delete_netns(name: str) -> None:
    ip(["netns", "del", name], check=False)


_libc = None


def _setns(fd: int) -> None:
    global _libc
    if hasattr(os, "setns"):
        os.setns(fd, CLONE_NEWNET)
        return
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def _open_tap_here(name: str, queues: int = 1) -> list[int]:
    """``queues`` fds of one new tap (IFF_MULTI_QUEUE when more than one): the first
    creates it (IFF_TUN_EXCL: never an existing interface), the others attach to it."""
    fds: list[int] = []
    try:
        for q in range(queues):
            try:
                fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError as e:
                raise GuestNetError(f"opening /dev/net/tun: {e.strerror} (needs "
                                    "CAP_NET_ADMIN)") from None
            fds.append(fd)
            flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR
            flags |= IFF_MULTI_QUEUE if queues > 1 else 0
            flags |= IFF_TUN_EXCL if q == 0 else 0
            try:
                fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), flags))
                fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_LEN))
                fcntl.ioctl(fd, TUNSETOFFLOAD, 0)
            except OSError as e:
                if e.errno == errno.EBUSY:
                    raise GuestNetError(f"an interface named {name} exists already") from None
                if e.errno in (errno.EPERM, errno.EACCES):
                    raise GuestNetError(f"creating tap {name}: not permitted (needs "
                                        "CAP_NET_ADMIN)") from None
                raise GuestNetError(f"creating tap {name} (queue {q}): {e.strerror}") \
                    from None
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return fds


def open_tap(name: str, netns: str | None = None, queues: int = 1) -> list[int]:
    """A new tap ``name`` in ``netns`` (None: ours), never an existing interface: one
    non-blocking fd per queue with 12-byte virtio-net headers and no offloads yet
    (set_offloads). The interface goes away when the fds are closed."""
    check_ifname(name)
    if netns is None:
        return _open_tap_here(name, queues)
    check_netns(name=netns)
    result: dict = {}

    def in_namespace():
        try:
            nsfd = os.open(os.path.join(NETNS_DIR, netns), os.O_RDONLY | os.O_CLOEXEC)
            try:
                _setns(nsfd)          # this thread only; it ends right after
            finally:
                os.close(nsfd)
            result["fds"] = _open_tap_here(name, queues)
        except GuestNetError as e:
            result["error"] = e
        except OSError as e:
            result["error"] = GuestNetError(f"entering namespace {netns}: {e.strerror}")

    t = threading.Thread(target=in_namespace, name="pyvhost-setns")
    t.start()
    t.join()
    if "error" in result:
        raise result["error"]
    return result["fds"]


def tun_offloads(csum: bool, tso4: bool, tso6: bool, ecn: bool = False) -> int:
    """TUNSETOFFLOAD flags for what the reader of the tap (we) can pass on."""
    flags = TUN_F_CSUM if csum else 0
    if csum:
        flags |= (TUN_F_TSO4 if tso4 else 0) | (TUN_F_TSO6 if tso6 else 0)
        if ecn and flags & (TUN_F_TSO4 | TUN_F_TSO6):
            flags |= TUN_F_TSO_ECN
    return flags


def set_offloads(fd: int, flags: int) -> None:
    """What the kernel may hand us unfinished: partial checksums, TSO super-frames.
    Without them it completes and segments frames before they reach the tap's reader."""
    fcntl.ioctl(fd, TUNSETOFFLOAD, flags)


def set_carrier(fd: int, on: bool) -> None:
    """The interface's carrier: on while a backend is connected, as a NIC's link."""
    fcntl.ioctl(fd, TUNSETCARRIER, struct.pack("i", 1 if on else 0))


def configure(name: str, netns: str | None, *, mac: str, mtu: int | None,
              address: str | None) -> None:
    """MAC, MTU, address (CIDR) and link up, inside ``netns``."""
    args = ["link", "set", "dev", name, "address", mac]
    if mtu:
        args += ["mtu", str(mtu)]
    ip(args, netns)
    if address:
        ip(["addr", "add", address, "dev", name], netns)
    ip(["link", "set", "dev", name, "up"], netns)
