"""Tunnel ports (type=vxlan, type=geneve): a remote switch or kernel VTEP reached through
the host's own IP stack. Options are parsed and checked here (``parse_options``); the UDP
sockets are opened here: one receiving socket per (local_ip, dst_port), shared by every
tunnel port on it and closed with the last of them (``_SOCKETS``), and TUN_TX_SOCKS
sending sockets per port (csum, tos, ttl are theirs). The underlay MTU is the kernel's
route to the remote (IP_MTU of a connected probe socket), read again once a second; the
inner MTU it leaves is what ``show`` prints. No datapath code here: the compiled class is
pyvhost._tunnel. Nothing of bridges, rules or the store."""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
from dataclasses import dataclass, field

from .port import TUNNEL_TYPES, Port

log = logging.getLogger("pyvhost.switch")

DEFAULT_DST_PORT = {"vxlan": 4789, "geneve": 6081}
OPTION_NAMES = ("remote_ip", "local_ip", "key", "dst_port", "csum", "tos", "ttl")
OVERHEAD = 50                 # outer Ethernet 14 + IPv4 20 + UDP 8 + tunnel header 8
FRAME_OVERHEAD = 36           # what the underlay's IP MTU loses per inner frame
IP_MTU = 14                   # linux/in.h
IP_MTU_DISCOVER, IP_PMTUDISC_DONT = 10, 0
SO_NO_CHECK = 11
RCVBUF = 4 << 20
TUN_TX_SOCKS = 8              # sending sockets per port (_tunnel.pxd's limit)


class TunnelError(ValueError):
    """A bad tunnel option or a socket that cannot be had: the message is for users."""


@dataclass(frozen=True)
class TunnelConfig:
    kind: str
    remote_ip: str                    # or "flow": each frame's tun_dst
    local_ip: str | None
    key: int | None                   # None: key=flow, each frame's tun_id
    dst_port: int
    csum: bool
    tos: int
    ttl: int

    def options(self) -> dict:
        """As the store keeps them (strings, what add-port takes)."""
        out = {"remote_ip": self.remote_ip, "key": "flow" if self.key is None else str(self.key),
               "dst_port": str(self.dst_port), "csum": str(self.csum).lower(),
               "tos": str(self.tos), "ttl": str(self.ttl)}
        if self.local_ip:
            out["local_ip"] = self.local_ip
        return out


def _ipv4(value: str, what: str) -> str:
    try:
        addr = ipaddress.IPv4Address(value)
    except ValueError:
        raise TunnelError(f"{what}: {value!r} is not an IPv4 address") from None
    if addr.is_multicast or addr.is_unspecified or addr == ipaddress.IPv4Address(
            "255.255.255.255"):
        raise TunnelError(f"{what}: {value} is not a unicast address")
    return str(addr)


def _number(value, what: str, lo: int, hi: int) -> int:
    try:
        if isinstance(value, bool) or len(str(value)) > 12:
            raise ValueError
        n = int(str(value), 0)
    except ValueError:
        raise TunnelError(f"{what}: {value!r} is not a number") from None
    if not lo <= n <= hi:
        raise TunnelError(f"{what}: {n} out of range {lo}..{hi}")
    return n


def parse_options(kind: str, opts: dict) -> TunnelConfig:
    """The options of a tunnel port (add-port's strings or the store's), checked."""
    if kind not in TUNNEL_TYPES:
        raise TunnelError(f"unknown tunnel type {kind!r} (have: {', '.join(TUNNEL_TYPES)})")
    if not isinstance(opts, dict):
        raise TunnelError(f"options {opts!r} are not a mapping")
    unknown = sorted(set(opts) - set(OPTION_NAMES))
    if unknown:
        raise TunnelError(f"type={kind} takes {', '.join(o + '=' for o in OPTION_NAMES)}; "
                          f"not {', '.join(unknown)}")
    if not opts.get("remote_ip"):
        raise TunnelError(f"type={kind} needs remote_ip=IP (the other tunnel end) or "
                          "remote_ip=flow (each frame's tun_dst)")
    key = opts.get("key", "0")
    remote = str(opts["remote_ip"])
    csum = str(opts.get("csum", "true"))
    if csum not in ("true", "false"):
        raise TunnelError(f"csum: true or false, not {csum!r}")
    local = opts.get("local_ip")
    return TunnelConfig(
        kind=kind, remote_ip=remote if remote == "flow" else _ipv4(remote, "remote_ip"),
        local_ip=_ipv4(str(local), "local_ip") if local else None,
        key=None if key == "flow" else _number(key, "key", 0, (1 << 24) - 1),
        dst_port=_number(opts.get("dst_port", DEFAULT_DST_PORT[kind]), "dst_port", 1, 65535),
        csum=csum == "true", tos=_number(opts.get("tos", 0), "tos", 0, 255),
        ttl=_number(opts.get("ttl", 64), "ttl", 1, 255))


def tunnel_options(kind: str, stored: dict) -> dict | None:
    """A stored row's tunnel options (None for other port types)."""
    if kind not in TUNNEL_TYPES or not isinstance(stored, dict):
        return None
    return {k: v for k, v in stored.items() if k in OPTION_NAMES}


@dataclass
class _Shared:
    """A receiving socket and how many ports use it."""
    kind: str
    sock: socket.socket
    dev: object                     # pyvhost._tunnel.TunSocket
    users: int = 0


_SOCKETS: dict[tuple[str, int], _Shared] = {}


def _fail(what: str, e: OSError) -> TunnelError:
    if e.errno == errno.EADDRINUSE:
        return TunnelError(f"{what}: the address is in use (another switch or a kernel "
                           "vxlan device on this UDP port?)")
    if e.errno == errno.EADDRNOTAVAIL:
        return TunnelError(f"{what}: not an address of this host")
    return TunnelError(f"{what}: {e.strerror or e}")


def _receiving_socket(kind: str, local: str | None, port: int) -> _Shared:
    key = (local or "0.0.0.0", port)
    shared = _SOCKETS.get(key)
    if shared is not None:
        if shared.kind != kind:
            raise TunnelError(f"UDP port {port} on {key[0]} carries {shared.kind} already")
        return shared
    from pyvhost._tunnel import TunSocket
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.setblocking(False)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
        s.bind(key)
    except OSError as e:
        s.close()
        raise _fail(f"binding UDP {key[0]}:{port}", e) from None
    shared = _SOCKETS[key] = _Shared(kind, s, TunSocket(kind, s.fileno(),
                                                        socket.inet_aton(key[0])))
    return shared


def _release(cfg: TunnelConfig) -> None:
    key = (cfg.local_ip or "0.0.0.0", cfg.dst_port)
    shared = _SOCKETS.get(key)
    if shared is None:
        return
    shared.users -= 1
    if shared.users <= 0:
        del _SOCKETS[key]
        shared.sock.close()


def _sending_sockets(cfg: TunnelConfig) -> list[socket.socket]:
    out = []
    try:
        for _ in range(TUN_TX_SOCKS):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            out.append(s)
            s.setblocking(False)
            s.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DONT)
            s.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, cfg.tos)
            s.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, cfg.ttl)
            s.setsockopt(socket.SOL_SOCKET, SO_NO_CHECK, 0 if cfg.csum else 1)
            s.bind((cfg.local_ip or "0.0.0.0", 0))       # a source port of its own
    except OSError as e:
        for s in out:
            s.close()
        raise _fail("a sending socket", e) from None
    return out



def underlay_mtu(cfg: TunnelConfig) -> int | None:
    """The IP MTU of the kernel's route to the remote (None: no route now, or
    remote_ip=flow: a remote per frame)."""
    if cfg.remote_ip == "flow":
        return None
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            if cfg.local_ip:
                s.bind((cfg.local_ip, 0))
            s.connect((cfg.remote_ip, cfg.dst_port))
            return s.getsockopt(socket.IPPROTO_IP, IP_MTU)
    except OSError:
        return None


@dataclass
class TunnelPort(Port):
    cfg: TunnelConfig = None
    dev: object = field(repr=False, default=None)
    tx_socks: list = field(repr=False, default_factory=list)
    shared: _Shared = field(repr=False, default=None)
    mtu: int | None = None            # the underlay's, as last read
    abandoned: bool = False
    closed: bool = False

    @classmethod
    def create(cls, name, bridge, port_id, ofport, kind, opts: dict) -> TunnelPort:
        cfg = parse_options(kind, opts)
        from pyvhost._tunnel import TunnelDev
        shared = _receiving_socket(kind, cfg.local_ip, cfg.dst_port)
        shared.users += 1
        tx = []
        try:
            tx = _sending_sockets(cfg)
            mtu = underlay_mtu(cfg)
            remote = None if cfg.remote_ip == "flow" else socket.inet_aton(cfg.remote_ip)
            dev = TunnelDev(shared.dev, remote, cfg.dst_port,
                            -1 if cfg.key is None else cfg.key, [s.fileno() for s in tx],
                            _max_frame(mtu))
        except BaseException:
            for s in tx:
                s.close()
            _release(cfg)
            raise
        path = f"{cfg.remote_ip}:{cfg.dst_port}"
        return cls(name, bridge, kind, path, 1, port_id, ofport, 1, cfg, dev, tx, shared, mtu)

    def datapath_dev(self):
        return self.dev

    @property
    def per_remote(self) -> bool:
        return self.cfg.remote_ip == "flow" or self.cfg.key is None

    async def close(self) -> None:
        if self.abandoned or self.closed:
            return
        self.closed = True
        self.dev.detach()                 # no poll reads or sends for it after this
        for s in self.tx_socks:
            s.close()
        _release(self.cfg)

    def abandon(self) -> None:
        self.abandoned = True             # a PMD may be inside: keep every socket

    def periodic(self) -> bool:
        if self.abandoned or self.closed:
            return False
        mtu = underlay_mtu(self.cfg)
        if mtu != self.mtu:
            log.info("%s port %s: underlay MTU %s -> %s", self.type, self.name, self.mtu, mtu)
            self.mtu = mtu
            self.dev.set_max_frame(_max_frame(mtu))
        return False

    @property
    def inner_mtu(self) -> int | None:
        return None if self.mtu is None else self.mtu - OVERHEAD

    @property
    def connected(self) -> bool:
        return self.mtu is not None or self.cfg.remote_ip == "flow"

    def link(self) -> dict:
        c = self.cfg
        if self.mtu is not None:
            under, inner = self.mtu, self.inner_mtu
        elif c.remote_ip == "flow":       # a route per frame: 1500 is what is checked
            under, inner = "per flow (1500 assumed)", 1500 - OVERHEAD
        else:
            under = inner = "no route"
        return {"remote_ip": c.remote_ip, "local_ip": c.local_ip or "any",
                "key": "flow" if c.key is None else c.key, "dst_port": c.dst_port,
                "csum": str(c.csum).lower(), "tos": c.tos, "ttl": c.ttl,
                "underlay_mtu": under, "mtu": inner}

    def state(self) -> str:
        return " ".join(f"{k}: {v}" for k, v in self.link().items())

    def ring_counters(self) -> tuple[dict, dict, list[dict]]:
        st = self.dev.stats()
        rx = {k: v for k, v in st.items() if k.startswith("rx_")}
        rx.update(self.shared.dev.stats())       # the shared socket's, by reason
        return rx, {k: v for k, v in st.items() if k.startswith("tx_")}, []

    def options(self) -> dict:
        return self.cfg.options()


def _max_frame(mtu: int | None) -> int:
    """The largest inner frame an underlay IP MTU takes (no route yet: the usual 1500)."""
    return max(14, (mtu or 1500) - FRAME_OVERHEAD)
