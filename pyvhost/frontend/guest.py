"""``Guest``: a Linux network interface as a vhost-user guest, no VM needed.

    with Guest("/run/pyvhost/vm1.sock", netns="red", ip="10.1.0.1/24") as g:
        g.wait_connected(10)             # the backend (a switch port) answered
        ...                              # ping, iperf3, curl inside namespace "red"
        print(g.stats())

A VirtioUser frontend (one queue pair) on the socket, bridged to a tap interface created
inside the namespace (made if missing, deleted on stop only if made here), with MAC, MTU,
address and link up. Frames move in the compiled loop of pyvhost._guest on a thread of its
own without the GIL; the tap carries virtio-net headers, and its offloads follow what the
backend negotiated (NET_CSUM, HOST_TSO4/6: the kernel hands us partial checksums and TSO
super-frames only when the backend takes them; GUEST_CSUM/TSO: what the backend hands us
goes to the tap as it is). When the backend goes away the thread reconnects (client) or
accepts again (server) until stop().

Built on pyvhost.frontend (VirtioUser), pyvhost._guest and .netns; may not import backend,
switch or cli.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time

from pyvhost import _guest
from pyvhost._pktpool import PacketPool
from pyvhost.protocol.constants import Feature as F
from pyvhost.protocol.constants import bit

from . import netns as N
from .channel import BackendGone, BackendRefused
from .negotiate import DEFAULT_FEATURES
from .port import VirtioUser

log = logging.getLogger("pyvhost.guest")

CSUM_FEATURES = bit(F.NET_CSUM) | bit(F.NET_GUEST_CSUM)
TSO_FEATURES = bit(F.NET_HOST_TSO4) | bit(F.NET_HOST_TSO6) | bit(F.NET_GUEST_TSO4) | \
    bit(F.NET_GUEST_TSO6)
GUEST_FEATURES = DEFAULT_FEATURES | CSUM_FEATURES | TSO_FEATURES
MAX_FRAME = 65600            # a TSO super-frame (64 KiB of IP) with Ethernet and VLAN headers
RETRY = 0.5                  # seconds between connection attempts


class Guest:
    """A tap interface ``ifname`` in namespace ``netns`` (None: this process's) as a
    vhost-user frontend on ``socket`` (``server``: listen there instead of connecting).

    ``mac`` (default: a stable locally administered one), ``ip`` (CIDR), ``mtu``.
    ``offloads``: offer checksum offloads ("csum"), checksum + TSO ("tso", default) or none
    ("none": the kernel completes and segments everything before it leaves the tap, and
    the backend must do the same for what it sends us). ``features`` overrides what is
    offered altogether. ``packed``: packed virtqueues (the backend must offer them).
    ``ring_size``: descriptors per ring; ``rx_buf_len``: receive
    buffer size with mergeable RX buffers (16 KiB: a 64 KiB TSO frame takes 5 of them, so a
    256-entry ring holds 50 such frames; with 2 KiB buffers it held 8, and TCP through the
    switch lost frames to a full ring whenever the receiving side was scheduled late)."""

    def __init__(self, socket: str, *, server: bool = False, netns: str | None = None,
                 ifname: str = "eth0", mac: str | None = None, ip: str | None = None,
                 mtu: int | None = None, queues: int = 1, offloads: str = "tso",
                 features: int | None = None, ring_size: int = 256,
                 rx_buf_len: int = 16384, packed: bool = False):
        if queues != 1:
            raise ValueError("only one queue pair for now (--queues 1)")
        if offloads not in ("tso", "csum", "none"):
            raise ValueError("offloads is tso, csum or none")
        if mtu is not None and not 68 <= mtu <= 65535 - 18:
            raise ValueError("mtu must be 68..65517")
        N.check_ifname(ifname)
        if netns is not None:
            N.check_netns(netns)
        self.socket = str(socket)
        self.server = server
        self.netns = netns
        self.ifname = ifname
        self.mac = N.parse_mac(mac) if mac else N.default_mac(netns, ifname, self.socket)
        self.address = ip
        self.mtu = mtu
        self.ring_size = ring_size
        self.rx_buf_len = rx_buf_len
        self.packed = packed
        if features is None:
            features = DEFAULT_FEATURES
            if offloads in ("csum", "tso"):
                features |= CSUM_FEATURES
            if offloads == "tso":
                features |= TSO_FEATURES
        self.features = features
        self.created_netns = False
        self.tapfd = -1
        self.port: VirtioUser | None = None
        self.loop: _guest.GuestLoop | None = None
        self.thread: threading.Thread | None = None
        self.connected = threading.Event()
        self.connections = 0
        self.last_error: str | None = None
        self.tap_offloads = 0
        self._stopping = threading.Event()
        self._final: dict | None = None

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> Guest:
        """Namespace, tap, frontend memory and the forwarding thread (which connects)."""
        if self.thread is not None:
            raise RuntimeError("already started")
        try:
            if self.netns is not None:
                self.created_netns = N.create_netns(self.netns)
            self.tapfd = N.open_tap(self.ifname, self.netns)
            N.configure(self.ifname, self.netns, mac=self.mac, mtu=self.mtu,
                        address=self.address)
            # every buffer of both rings has a slot of MAX_FRAME bytes (only what is written
            # is backed by pages): room for them, the rings and alignment
            mem = 2 * self.ring_size * (MAX_FRAME + 12 + 64) + (4 << 20)
            self.port = VirtioUser(self.socket, server=self.server, queues=1,
                                   ring_size=self.ring_size, max_frame=MAX_FRAME,
                                   rx_buf_len=self.rx_buf_len, mem_size=mem,
                                   packed=self.packed,
                                   features=self.features, connect_timeout=RETRY,
                                   pool_size=32)
            self.loop = _guest.GuestLoop(self.tapfd, PacketPool(2 * 32 + 8, MAX_FRAME))
        except BaseException:
            self._cleanup()
            raise
        self.thread = threading.Thread(target=self._run, name="pyvhost-guest", daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        """End the thread, disconnect, delete the tap and the namespace if made here.
        Idempotent."""
        self._stopping.set()
        if self.loop is not None:
            self.loop.stop()
        if self.thread is not None:
            self.thread.join(timeout=10)
            if self.thread.is_alive():
                log.warning("guest thread did not end within 10 s")
        if self.port is not None:
            self._final = self.stats()      # the rings' counters go with the port
        self._cleanup()

    def _cleanup(self) -> None:
        if self.port is not None:
            with contextlib.suppress(Exception):
                self.port.close()
            self.port = None
        if self.tapfd >= 0:
            os.close(self.tapfd)         # the tap interface goes with its last fd
            self.tapfd = -1
        if self.created_netns:
            N.delete_netns(self.netns)
            self.created_netns = False

    def __enter__(self) -> Guest:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def wait_connected(self, timeout: float) -> bool:
        return self.connected.wait(timeout)

    # -- the forwarding thread ----------------------------------------------------------
    def _connect(self) -> bool:
        port = self.port
        try:
            port.open()
        except (BackendGone, BackendRefused, OSError) as e:
            with contextlib.suppress(Exception):
                port.disconnect()
            msg = str(e)
            if msg != self.last_error:
                log.warning("guest: %s: %s", self.socket, msg)
            self.last_error = msg
            return False
        neg = port.negotiated
        csum = neg.has(F.NET_CSUM)
        tso4, tso6 = neg.has(F.NET_HOST_TSO4), neg.has(F.NET_HOST_TSO6)
        self.loop.configure(csum=csum, tso4=csum and tso4, tso6=csum and tso6,
                            ecn=neg.has(F.NET_HOST_ECN))
        self.tap_offloads = N.tun_offloads(csum, tso4, tso6, neg.has(F.NET_HOST_ECN))
        N.set_offloads(self.tapfd, self.tap_offloads)
        self.connections += 1
        self.last_error = None
        log.info("guest: connected to %s: %s", self.socket, neg.describe())
        self.connected.set()
        return True

    def _run(self) -> None:
        port, loop = self.port, self.loop
        while not self._stopping.is_set():
            if port.channel is None and not self._connect():
                if not self.server:        # accept() waited already; connect() did not
                    self._stopping.wait(RETRY)
                continue
            reason = loop.run(port.rx_queue(0), port.tx_queue(0), port.channel.fileno())
            if reason == _guest.STOP_STOPPED:
                break
            self.connected.clear()
            if reason == _guest.STOP_TAP_GONE:
                self.last_error = f"interface {self.ifname} was deleted"
                log.warning("guest: %s", self.last_error)
                break
            why = "broke a ring" if reason == _guest.STOP_BROKEN else "went away"
            self.last_error = f"the backend on {self.socket} {why}"
            log.warning("guest: %s; reconnecting", self.last_error)
            port.disconnect()
        self.connected.clear()

    # -- state --------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def stats(self) -> dict:
        """The loop's counters, the rings', what was negotiated, connection state."""
        if self._final is not None:
            return dict(self._final, connected=False)
        out: dict = {"interface": self.ifname, "netns": self.netns, "mac": self.mac,
                     "socket": self.socket, "connected": self.connected.is_set(),
                     "connections": self.connections, "tap_offloads": self.tap_offloads,
                     "error": self.last_error}
        if self.loop is not None:
            out.update(self.loop.stats())
        port = self.port
        if port is not None and port.negotiated is not None:
            out["features"] = port.negotiated.features
            with contextlib.suppress(Exception):
                for name, q in (("rx_ring", port.rings[0].queue),
                                ("tx_ring", port.rings[1].queue)):
                    if q is not None:
                        out[name] = q.stats()
        return out

    def describe(self) -> str:
        where = f"netns {self.netns}" if self.netns else "this namespace"
        return (f"{self.ifname} ({self.mac}{', ' + self.address if self.address else ''}"
                f"{', mtu ' + str(self.mtu) if self.mtu else ''}) in {where} on "
                f"{self.socket} ({'server' if self.server else 'client'})")


def wait_for(cond, timeout: float, interval: float = 0.05) -> bool:
    """Poll ``cond()`` until true or ``timeout`` seconds passed."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True
