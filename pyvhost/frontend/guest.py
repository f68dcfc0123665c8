"""``Guest``: a Linux network interface as a vhost-user guest, no VM needed.

    with Guest("/run/pyvhost/vm1.sock", netns="red", ip="10.1.0.1/24") as g:
        g.wait_connected(10)             # the backend (a switch port) answered
        ...                              # ping, iperf3, curl inside namespace "red"
        print(g.stats())

A VirtioUser frontend on the socket bridged to a tap interface created inside the
namespace (made if missing, deleted on stop only if made here), with MAC, MTU, address and
link up; its carrier is on while a backend is connected, as a NIC's link. Frames move in
the compiled loop of pyvhost._guest without the GIL, one thread per queue pair (N pairs: a
multiqueue tap, one fd per pair); the tap carries virtio-net headers, and its offloads
follow what the backend negotiated (NET_CSUM, HOST_TSO4/6: the kernel hands us partial
checksums and TSO super-frames only when the backend takes them; GUEST_CSUM/TSO: what the
backend hands us goes to the tap as it is). When the backend goes away the loops are
brought home, the carrier goes off, and the frontend reconnects (client) or accepts again
(server) until stop().

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
from .negotiate import DEFAULT_FEATURES
from .port import VirtioUser

log = logging.getLogger("pyvhost.guest")

CSUM_FEATURES = bit(F.NET_CSUM) | bit(F.NET_GUEST_CSUM)
TSO_FEATURES = bit(F.NET_HOST_TSO4) | bit(F.NET_HOST_TSO6) | bit(F.NET_GUEST_TSO4) | \
    bit(F.NET_GUEST_TSO6)
GUEST_FEATURES = DEFAULT_FEATURES | CSUM_FEATURES | TSO_FEATURES
MAX_FRAME = 65600            # a TSO super-frame (64 KiB of IP) with Ethernet and VLAN headers
RETRY = 0.5                  # seconds between connection attempts
MAX_QUEUES = 16


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
        if not 1 <= queues <= MAX_QUEUES:
            raise ValueError(f"queues must be 1..{MAX_QUEUES}")
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
        self.queues = queues
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
        self.tapfds: list[int] = []
        self.port: VirtioUser | None = None
        self.loops: list[_guest.GuestLoop] = []
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
            self.tapfds = N.open_tap(self.ifname, self.netns, self.queues)
            N.set_carrier(self.tapfds[0], False)     # no backend yet: no link
            N.configure(self.ifname, self.netns, mac=self.mac, mtu=self.mtu,
                        address=self.address)
            # every buffer of both rings has a slot of MAX_FRAME bytes (only what is written
            # is backed by pages): room for them, the rings and alignment
            mem = 2 * self.queues * self.ring_size * (MAX_FRAME + 12 + 64) + (4 << 20)
            self.port = VirtioUser(self.socket, server=self.server, queues=self.queues,
                                   ring_size=self.ring_size, max_frame=MAX_FRAME,
                                   rx_buf_len=self.rx_buf_len, mem_size=mem,
                                   packed=self.packed,
                                   features=self.features, connect_timeout=RETRY,
                                   pool_size=32)
            self.loops = [_guest.GuestLoop(fd, PacketPool(2 * 32 + 8, MAX_FRAME))
                          for fd in self.tapfds]
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
        for loop in self.loops:
            loop.stop()
        if self.thread is not None:
            self.thread.join(timeout=10)
            if self.thread.is_alive():
                # a loop may still be inside the rings and the tap: leak them rather than
                # unmap them or close fds whose numbers may be given to something else
                log.warning("guest thread did not end within 10 s; leaving its memory "
                            "and its tap open")
                self.port = None
                self.tapfds = []
        if self.port is not None:
            self._final = self.stats()      # the rings' counters go with the port
        self._cleanup()

    def _cleanup(self) -> None:
        if self.port is not None:
            with contextlib.suppress(Exception):
                self.port.close()
            self.port = None
        for fd in self.tapfds:
            os.close(fd)                 # the tap interface goes with its last fd
        self.tapfds = []
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
        except Exception as e:      # BackendGone, BackendRefused, OSError, or a setup
            # the backend's answers made impossible (e.g. too few queue pairs): retried
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
        for loop in self.loops:
            loop.configure(csum=csum, tso4=csum and tso4, tso6=csum and tso6,
                           ecn=neg.has(F.NET_HOST_ECN))
        self.tap_offloads = N.tun_offloads(csum, tso4, tso6, neg.has(F.NET_HOST_ECN))
        N.set_offloads(self.tapfds[0], self.tap_offloads)     # one device: every queue
        N.set_carrier(self.tapfds[0], True)
        self.connections += 1
        self.last_error = None
        log.info("guest: connected to %s: %s", self.socket, neg.describe())
        self.connected.set()
        return True

    def _run_queues(self) -> int:
        """Every queue pair's loop on a thread of its own until one returns; then all are
        brought home. The reason: stopped, the tap gone, a ring broken, or the backend
        gone (in that order of precedence)."""
        port, ctl = self.port, self.port.channel.fileno()
        done = threading.Event()
        reasons: list[int | None] = [None] * self.queues

        def work(q: int) -> None:
            try:
                reasons[q] = self.loops[q].run(port.rx_queue(q), port.tx_queue(q), ctl)
            finally:
                done.set()

        threads = [threading.Thread(target=work, args=(q,), name=f"pyvhost-guest-q{q}",
                                    daemon=True) for q in range(self.queues)]
        for t in threads:
            t.start()
        done.wait()
        for loop in self.loops:
            loop.stop()
        for t in threads:
            t.join()
        for loop in self.loops:
            loop.reset()
        got = {r for r in reasons if r is not None}
        if self._stopping.is_set():
            return _guest.STOP_STOPPED
        for reason in (_guest.STOP_TAP_GONE, _guest.STOP_BROKEN):
            if reason in got:
                return reason
        return _guest.STOP_CONTROL

    def _run(self) -> None:
        try:
            self._serve()
        except Exception as e:     # a bug or an unexpected OSError: said, never silent
            self.last_error = f"the guest's thread failed: {e!r}"
            log.exception("guest: %s", self.last_error)
        finally:
            self.connected.clear()

    def _serve(self) -> None:
        port = self.port
        while not self._stopping.is_set():
            if port.channel is None and not self._connect():
                if not self.server:        # accept() waited already; connect() did not
                    self._stopping.wait(RETRY)
                continue
            reason = self._run_queues()
            if reason == _guest.STOP_STOPPED:
                break
            self.connected.clear()
            with contextlib.suppress(OSError):
                N.set_carrier(self.tapfds[0], False)
            if reason == _guest.STOP_TAP_GONE:
                self.last_error = f"interface {self.ifname} was deleted"
                log.warning("guest: %s", self.last_error)
                break
            why = "broke a ring" if reason == _guest.STOP_BROKEN else "went away"
            self.last_error = f"the backend on {self.socket} {why}"
            log.warning("guest: %s; reconnecting", self.last_error)
            port.disconnect()

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
        per_queue = [loop.stats() for loop in self.loops]
        for st in per_queue:
            for k, v in st.items():
                out[k] = out.get(k, 0) + v
        port = self.port
        if port is not None and port.negotiated is not None:
            out["features"] = port.negotiated.features
            with contextlib.suppress(Exception):
                for q in range(self.queues):
                    rx, tx = port.rings[2 * q].queue, port.rings[2 * q + 1].queue
                    if rx is not None and tx is not None:
                        per_queue[q]["rx_ring"] = rx.stats()
                        per_queue[q]["tx_ring"] = tx.stats()
        if per_queue:
            for name in ("rx_ring", "tx_ring"):
                if name in per_queue[0]:
                    out[name] = per_queue[0][name]
        if self.queues > 1:
            out["queues"] = per_queue
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
