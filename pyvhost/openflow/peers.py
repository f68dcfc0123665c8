"""Who is on the other end of an OpenFlow connection the switch accepted, for the same rule
the control socket applies (root, the switch's own user, or a member of its control
group): a Unix socket's peer by SO_PEERCRED; a TCP peer on this host (a loopback address) by
the owner of its socket in /proc/net/tcp{,6} (as identd answers), since anyone on the host
can connect to a loopback port. A peer on another host has no such answer: a listener on a
non-loopback address accepts it (the user chose that address). Reads only /proc and the
sockets it is given; no OpenFlow here."""

from __future__ import annotations

import ipaddress
import socket
import struct

from pyvhost.switch.control import peer_allowed

TCP_TABLES = {socket.AF_INET: "/proc/net/tcp", socket.AF_INET6: "/proc/net/tcp6"}


def _proc_address(text: str, family: int) -> tuple[str, int]:
    """An address:port as /proc/net/tcp writes it (the address's 32-bit words in host
    order, hex) as (address text, port)."""
    addr, port = text.split(":")
    raw = bytes.fromhex(addr)
    words = [raw[i:i + 4] for i in range(0, len(raw), 4)]
    packed = b"".join(struct.pack("=I", int.from_bytes(w, "big")) for w in words)
    return str(ipaddress.ip_address(packed)), int(port, 16)


def _same(a: str, b: str) -> bool:
    """Addresses equal, an IPv4-mapped IPv6 address and its IPv4 one alike."""
    x, y = ipaddress.ip_address(a), ipaddress.ip_address(b)
    x = getattr(x, "ipv4_mapped", None) or x
    y = getattr(y, "ipv4_mapped", None) or y
    return x == y


def tcp_peer_uid(sock: socket.socket) -> int | None:
    """The uid owning the other end of an accepted loopback TCP connection, or None when
    it is not found (not on this host, or already gone)."""
    local, peer = sock.getsockname()[:2], sock.getpeername()[:2]
    for family, path in TCP_TABLES.items():
        try:
            with open(path) as f:
                lines = f.readlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 8:
                continue
            try:
                l_addr, l_port = _proc_address(fields[1], family)
                r_addr, r_port = _proc_address(fields[2], family)
            except ValueError:
                continue
            # the peer's socket: its local end is our peer, its remote end is us
            if l_port == peer[1] and r_port == local[1] and _same(l_addr, peer[0]) and \
                    _same(r_addr, local[0]):
                return int(fields[7])
    return None


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    ip = getattr(ip, "ipv4_mapped", None) or ip
    return ip.is_loopback


def allowed(sock: socket.socket, ctl_gid: int | None) -> tuple[bool, str]:
    """(may this accepted connection program the switch, who it is) by the control
    socket's rule; a peer on another host is allowed (the listener's address let it in)."""
    if sock.family == socket.AF_UNIX:
        pid, uid, gid = struct.unpack("3i", sock.getsockopt(
            socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
        return peer_allowed(pid, uid, gid, ctl_gid), f"uid {uid} (pid {pid})"
    peer = sock.getpeername()[0]
    if not is_loopback(peer):
        return True, f"{peer} (another host)"
    uid = tcp_peer_uid(sock)
    if uid is None:
        return False, f"{peer} (its owner not found in /proc/net/tcp)"
    return peer_allowed(0, uid, -1, ctl_gid), f"uid {uid} on this host"
