"""A switch's OpenFlow side: per bridge, its controller targets (passive listeners
``ptcp:PORT[:IP]`` and ``punix:PATH`` for now), the connections they accepted, its
datapath id and its OpenFlow state; kept in the store's settings (key ``openflow:BRIDGE``)
so a restarted switch listens again. Listeners and connections live on the switch's
asyncio loop. The switch knows nothing of this module: ``enable(switch)`` attaches one
``OpenFlow`` to it as ``switch.openflow``."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import secrets
import socket
from dataclasses import dataclass, field
from pathlib import Path

from pyvhost._punt import DEFAULT_BURST as DEFAULT_PUNT_BURST
from pyvhost._punt import DEFAULT_RATE as DEFAULT_PUNT_RATE
from pyvhost.backend.endpoint import unlink_socket
from pyvhost.switch.commands import CommandError
from pyvhost.switch.groups import groups_of
from pyvhost.switch.meters import meters_of

from . import groupmod as G
from . import metermod as MM
from . import peers
from .connection import DEFAULT_PROBE, Connection
from .events import Events
from .handler import BridgeState, Handler

log = logging.getLogger("pyvhost.openflow")
DEFAULT_HOST = "127.0.0.1"   # ptcp:PORT alone listens on loopback (0.0.0.0: every address)
DEFAULT_CONTROLLER_PORT = 6653
CONNECT_TIMEOUT = 5.0        # seconds for an active connection's TCP handshake
MIN_BACKOFF, MAX_BACKOFF = 1.0, 8.0      # seconds between connection attempts (as OVS)
FAIL_MODES = ("standalone", "secure")
MAX_TARGETS = 8
DEFAULT_RATE, DEFAULT_BURST = DEFAULT_PUNT_RATE, DEFAULT_PUNT_BURST   # PACKET_INs/s, at once
MAX_CONNECTIONS = 64        # per bridge, over all its listeners


@dataclass
class Target:
    text: str
    kind: str                       # "ptcp", "punix" or "tcp" (active)
    port: int = 0
    host: str = DEFAULT_HOST
    path: str = ""


def valid_dpid(value) -> int | None:
    """A stored datapath id if it is one (1 .. 2**64 - 1), else None."""
    return value if isinstance(value, int) and not isinstance(value, bool) and \
        0 < value < 1 << 64 else None


def parse_target(text: str, run_dir: Path) -> Target:
    """``ptcp:PORT[:IP]``, ``punix:PATH`` (a name, or a path inside the run dir) or
    ``tcp:IP[:PORT]`` (a controller to connect to, port 6653 unless given)."""
    kind, _, rest = text.partition(":")
    if kind == "tcp":
        host, _, port_text = rest.rpartition(":") if rest.count(":") == 1 or \
            rest.startswith("[") else (rest, "", "")
        host = host.strip("[]")
        try:
            host = str(ipaddress.ip_address(host))
        except ValueError:
            raise CommandError(f"{text}: tcp:IP[:PORT] needs an IP address") from None
        if port_text and (not port_text.isdigit() or not 1 <= int(port_text) <= 65535):
            raise CommandError(f"{text}: tcp:IP[:PORT] with PORT 1..65535")
        return Target(text, "tcp", int(port_text) if port_text else DEFAULT_CONTROLLER_PORT,
                      host)
    if kind == "ptcp":
        port_text, _, host = rest.partition(":")
        if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
            raise CommandError(f"{text}: ptcp:PORT[:IP] with PORT 0..65535")
        host = host.strip("[]") or DEFAULT_HOST
        try:
            host = str(ipaddress.ip_address(host))
        except ValueError:
            raise CommandError(f"{text}: {host!r} is not an IP address") from None
        return Target(text, "ptcp", int(port_text), host)
    if kind == "punix":
        if not rest:
            raise CommandError(f"{text}: punix:PATH needs a path")
        path = Path(rest) if os.path.isabs(rest) else run_dir / rest
        if path.resolve().parent != run_dir.resolve():
            raise CommandError(f"{text}: punix sockets are created in the run directory "
                               f"{run_dir} (give a name, or a path there)")
        if len(str(path).encode()) > 107:
            raise CommandError(f"{text}: the socket path is longer than 107 bytes")
        return Target(text, "punix", path=str(path))
    if kind in ("unix", "ssl", "pssl"):
        raise CommandError(f"{text}: {kind}: targets are not supported (tcp:, ptcp:, punix:)")
    raise CommandError(f"{text}: a target is tcp:IP[:PORT], ptcp:PORT[:IP] or punix:PATH")


@dataclass
class Listener:
    target: Target
    server: asyncio.AbstractServer | None = None
    address: str = ""
    error: str = ""
    inode: tuple[int, int] | None = None
    connections: set = field(default_factory=set)
    task: asyncio.Task | None = None        # an active target's connect loop
    connected: bool = False                 # an active target: past the HELLO now

    @property
    def running(self) -> bool:
        return self.server is not None or self.task is not None

    def key(self) -> tuple | None:
        """What the listener listens on (None: a port the kernel will choose)."""
        t = self.target
        if t.kind == "punix":
            return ("punix", t.path)
        if t.kind == "tcp":
            return ("tcp", t.host, t.port)
        if self.server is not None:
            host, port = self.server.sockets[0].getsockname()[:2]
            return ("ptcp", str(ipaddress.ip_address(host)), port)
        return ("ptcp", t.host, t.port) if t.port else None


@dataclass
class BridgeOpenFlow:
    name: str
    dpid: int
    probe: float | None = DEFAULT_PROBE
    listeners: list[Listener] = field(default_factory=list)
    connections: set = field(default_factory=set)
    state: BridgeState = field(default_factory=BridgeState)
    fail_open: bool = False


class OpenFlow:
    def __init__(self, switch):
        self.switch = switch
        self.bridges: dict[str, BridgeOpenFlow] = {}
        self._tasks: set[asyncio.Task] = set()
        self._states: dict[str, BridgeState] = {}      # kept while the bridge lives
        self._rate_ids: dict[str, int] = {}          # bridges given a rate: their ids
        self.events = Events(self)

    # -- settings -------------------------------------------------------------------------
    def _conf(self, bridge: str) -> dict:
        conf = self.switch.store.settings().get(f"openflow:{bridge}")
        return conf if isinstance(conf, dict) else {}

    def _save(self, bridge: str, conf: dict | None) -> None:
        try:
            self.switch.store.set_setting(f"openflow:{bridge}", conf)
        except Exception as e:
            raise CommandError(f"the store could not be written ({e})") from None

    def dpid(self, bridge: str) -> int:
        b = self.bridges.get(bridge)
        if b is not None:
            return b.dpid
        return valid_dpid(self._conf(bridge).get("dpid")) or 0

    def _bridge(self, name: str):
        if name not in self.switch.bridges:
            raise CommandError(f"no bridge named {name}")
        return self.switch.bridges[name]

    # -- commands -------------------------------------------------------------------------
    async def set_controller(self, bridge: str, targets: list[str],
                             probe_ms: int | None = None, rate: int | None = None,
                             burst: int | None = None) -> None:
        """Listen on exactly ``targets`` (all or nothing: a target that cannot listen
        leaves everything as it was). ``rate``/``burst``: the bridge's PACKET_IN limit
        (OVS's controller_rate_limit/controller_burst_limit; None: as stored, else the
        defaults; a rate alone takes a burst of a quarter of it, at least 25, as OVS's)."""
        self._bridge(bridge)
        run_dir = Path(self.switch.run_dir)
        parsed = [parse_target(t, run_dir) for t in targets]
        keys = [Listener(t).key() or i for i, t in enumerate(parsed)]
        if len({t.text for t in parsed}) != len(parsed) or len(set(keys)) != len(keys):
            raise CommandError("a target is given twice")
        if len(parsed) > MAX_TARGETS:
            raise CommandError(f"at most {MAX_TARGETS} targets")
        conf = self._conf(bridge)
        current = self.bridges.get(bridge)
        running = {ln.key(): ln for ln in current.listeners if ln.running} if current else {}
        keep = {t.text: running[key] for t in parsed
                if (key := Listener(t).key()) is not None and key in running}
        new = [Listener(t) for t in parsed if t.text not in keep]
        for ln in new:
            try:
                await self._listen(bridge, ln)
            except OSError as e:
                for other in new:
                    await self._close_listener(other)
                raise CommandError(f"{ln.target.text}: {e.strerror or e}") from None
        dpid = valid_dpid(conf.get("dpid")) or \
            (current.dpid if current else secrets.randbits(48) or 1)
        probe = conf.get("inactivity_probe", int(DEFAULT_PROBE * 1000)) \
            if probe_ms is None else probe_ms
        conf.update({"targets": [t.text for t in parsed], "dpid": dpid,
                     "inactivity_probe": probe})
        if rate is not None:
            conf["controller_rate_limit"] = rate
            conf["controller_burst_limit"] = burst if burst is not None else max(25, rate // 4)
        elif burst is not None:
            conf["controller_burst_limit"] = burst

        try:
            self._save(bridge, conf)
        except CommandError:
            for ln in new:
                await self._close_listener(ln)
            raise
        if current is None:
            current = self.bridges[bridge] = BridgeOpenFlow(bridge, dpid,
                                                            state=self._state(bridge))
        current.probe = probe / 1000 if probe else None
        self._apply_rate(bridge)
        kept = {id(ln) for ln in keep.values()}
        for ln in current.listeners:
            if id(ln) not in kept:
                await self._close_listener(ln)
        for text, ln in keep.items():
            ln.target = next(t for t in parsed if t.text == text)
        by_text = {**keep, **{ln.target.text: ln for ln in new}}
        current.listeners = [by_text[t.text] for t in parsed]
        for ln in current.listeners:
            log.info("openflow %s: %s %s %s", bridge, ln.target.text,
                     "connecting to" if ln.target.kind == "tcp" else "listening on", ln.address)
        self._check_fail_open(bridge)

    def rate_limits(self, bridge: str, conf: dict | None = None) -> tuple[int, int]:
        """(controller_rate_limit, controller_burst_limit) of the bridge (0: no limit)."""
        conf = self._conf(bridge) if conf is None else conf
        return (int(conf.get("controller_rate_limit", DEFAULT_RATE)),
                int(conf.get("controller_burst_limit", DEFAULT_BURST)))

    def _apply_rate(self, bridge: str) -> None:
        """The datapath's controller queue takes the bridge's rate and burst."""
        queue = self.events.queue
        b = self.switch.bridges.get(bridge)
        if queue is None or b is None:
            return
        rate, burst = self.rate_limits(bridge)
        try:
            queue.set_rate(rate, burst, b.bridge_id)
        except ValueError as e:                  # (a stored pair set-controller refuses)
            log.error("openflow %s: controller rate %s burst %s: %s; the defaults instead",
                      bridge, rate, burst, e)
            queue.set_rate(DEFAULT_RATE, DEFAULT_BURST, b.bridge_id)
        self._rate_ids[bridge] = b.bridge_id

    async def del_controller(self, bridge: str) -> None:
        self._bridge(bridge)
        conf = self._conf(bridge)
        conf.pop("targets", None)
        self._save(bridge, conf)
        await self._stop_bridge(bridge)

    def save_groups(self, bridge: str) -> None:
        groups = self.switch.bridges[bridge].groups
        conf = self._conf(bridge)
        conf["groups"] = [G.to_json(g) for g in groups.groups.values()] if groups else []
        self._save(bridge, conf)

    def save_meters(self, bridge: str) -> None:
        meters = self.switch.bridges[bridge].meters
        conf = self._conf(bridge)
        conf["meters"] = [MM.to_json(m) for m in meters.meters.values()] if meters else []
        self._save(bridge, conf)

    def _restore_meters(self, name: str) -> None:
        """The bridge's stored meters (a bad one is logged and skipped)."""
        stored = self._conf(name).get("meters") or []
        if not stored:
            return
        meters = meters_of(self.switch.bridges[name], self.switch.datapath)
        for d in stored:
            try:
                meters.set(MM.from_json(d))
            except (ValueError, KeyError, TypeError) as e:
                log.error("openflow %s: stored meter %r skipped: %s", name, d, e)

    def _restore_groups(self, name: str) -> None:
        """The bridge's stored groups (a bad one is logged and skipped)."""
        stored = self._conf(name).get("groups") or []
        if not stored:
            return
        groups = groups_of(self.switch.bridges[name], self.switch.datapath)
        for d in stored:
            try:
                groups.set(G.from_json(d))
            except (ValueError, KeyError, TypeError) as e:
                log.error("openflow %s: stored group %r skipped: %s", name, d, e)

    def fail_mode(self, bridge: str) -> str:
        mode = self._conf(bridge).get("fail_mode")
        return mode if mode in FAIL_MODES else "standalone"

    def set_fail_mode(self, bridge: str, mode: str) -> None:
        """standalone: while the bridge has controllers to connect to (tcp:) and none is
        connected, it forwards by NORMAL (its rules kept, unused); secure: its rules only."""
        self._bridge(bridge)
        if mode not in FAIL_MODES:
            raise CommandError(f"fail mode {mode!r}: standalone or secure")
        conf = self._conf(bridge)
        conf["fail_mode"] = mode
        self._save(bridge, conf)
        self._check_fail_open(bridge)

    def _check_fail_open(self, bridge: str) -> None:
        """Fail open or closed as the bridge's fail mode and its controllers say."""
        b = self.bridges.get(bridge)
        br = self.switch.bridges.get(bridge)
        if br is None:
            return
        active = [ln for ln in b.listeners if ln.target.kind == "tcp"] if b else []
        on = bool(active) and self.fail_mode(bridge) == "standalone" and \
            not any(ln.connected for ln in active)
        if (b.fail_open if b is not None else False) == on:
            return
        self.switch.datapath.set_fail_open(br.bridge_id, on)
        if b is not None:
            b.fail_open = on
        log.info("openflow %s: %s", bridge, "no controller connected: fail-open, forwarding "
                 "by NORMAL (standalone)" if on else "forwarding by its rules")

    def set_dpid(self, bridge: str, dpid: int) -> None:
        self._bridge(bridge)
        conf = self._conf(bridge)
        conf["dpid"] = dpid
        self._save(bridge, conf)
        b = self.bridges.get(bridge)
        if b is not None:
            b.dpid = dpid
            for conn in b.connections:
                conn.handler.dpid = dpid

    async def pause(self, bridge: str) -> None:
        """Stop serving a bridge (its settings stay): no FLOW_MOD can arrive while it is
        being deleted. ``restore()`` serves it again."""
        await self._stop_bridge(bridge)

    async def forget(self, bridge: str) -> None:
        """The bridge was deleted: its listeners, connections, state and settings go."""
        await self._stop_bridge(bridge)
        self._states.pop(bridge, None)
        bridge_id = self._rate_ids.pop(bridge, None)
        if bridge_id is not None and self.events.queue is not None:
            self.events.queue.set_rate(DEFAULT_RATE, DEFAULT_BURST, bridge_id)
        with contextlib.suppress(Exception):
            if self._conf(bridge):
                self.switch.store.set_setting(f"openflow:{bridge}", None)

    # -- life -----------------------------------------------------------------------------
    async def restore(self) -> None:
        """Listen again on every stored target (a target that fails is logged and shown,
        the switch runs on). From here on frames for a controller are taken from the
        datapath, and counted when no controller wants them."""
        self.events.start()
        for name in list(self.switch.bridges):
            self._restore_groups(name)
            self._restore_meters(name)
            self._apply_rate(name)
            conf = self._conf(name)
            targets = conf.get("targets")
            if not targets or name in self.bridges:
                continue
            dpid = valid_dpid(conf.get("dpid"))
            if dpid is None:
                log.error("openflow %s: stored datapath id %r is not one: using 1",
                          name, conf.get("dpid"))
                dpid = 1
            probe = conf.get("inactivity_probe", int(DEFAULT_PROBE * 1000))
            b = self.bridges[name] = BridgeOpenFlow(name, dpid,
                                                    probe / 1000 if probe else None,
                                                    state=self._state(name))
            for text in targets:
                try:
                    ln = Listener(parse_target(str(text), Path(self.switch.run_dir)))
                except CommandError as e:
                    log.error("openflow %s: stored target skipped: %s", name, e)
                    continue
                b.listeners.append(ln)
                try:
                    await self._listen(name, ln)
                    log.info("openflow %s: %s listening on %s", name, text, ln.address)
                except OSError as e:
                    ln.error = e.strerror or str(e)
                    log.error("openflow %s: %s cannot listen: %s", name, text, ln.error)
            self._check_fail_open(name)

    async def close(self) -> None:
        for name in list(self.bridges):
            await self._stop_bridge(name)
        self.events.close()

    def _state(self, bridge: str) -> BridgeState:
        """A bridge's OpenFlow state (SET_CONFIG, rule flags): it outlives its
        controllers, not the bridge."""
        return self._states.setdefault(bridge, BridgeState())

    async def _stop_bridge(self, name: str) -> None:
        b = self.bridges.pop(name, None)
        if b is None:
            return
        if b.fail_open and name in self.switch.bridges:
            self.switch.datapath.set_fail_open(self.switch.bridges[name].bridge_id, False)
        for ln in b.listeners:
            await self._close_listener(ln)
        for conn in list(b.connections):
            conn.writer.close()
        tasks = [t for t in self._tasks if t.get_name() == f"openflow:{name}"]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t

    # -- listeners and connections --------------------------------------------------------
    async def _listen(self, bridge: str, ln: Listener) -> None:
        t = ln.target
        self.events.start()

        def accept(reader, writer):
            task = asyncio.get_running_loop().create_task(
                self._serve(bridge, ln, reader, writer), name=f"openflow:{bridge}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        if t.kind == "tcp":
            ln.address = f"{t.host}:{t.port}" if ":" not in t.host else f"[{t.host}]:{t.port}"
            ln.task = asyncio.get_running_loop().create_task(self._connect_loop(bridge, ln),
                                                             name=f"openflow:{bridge}")
        elif t.kind == "ptcp":
            ln.server = await asyncio.start_server(accept, t.host, t.port,
                                                   reuse_address=True)
            sockname = ln.server.sockets[0].getsockname()
            ln.address = f"{sockname[0]}:{sockname[1]}" if ":" not in sockname[0] else \
                f"[{sockname[0]}]:{sockname[1]}"
        else:
            unlink_socket(t.path)             # a stale socket only; FileExistsError else
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.bind(t.path)
                st = os.lstat(t.path)
                ln.inode = (st.st_dev, st.st_ino)
                os.chmod(t.path, 0o600)
                ln.server = await asyncio.start_unix_server(accept, sock=sock)
            except BaseException:
                sock.close()
                with contextlib.suppress(OSError):
                    unlink_socket(t.path, ln.inode)
                raise
            ln.address = t.path
        ln.error = ""

    async def _close_listener(self, ln: Listener) -> None:
        """Stop listening (or connecting), and close the listener's connections."""
        for conn in list(ln.connections):
            conn.writer.close()
        if ln.task is not None:
            task, ln.task = ln.task, None
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            ln.connected = False
        if ln.server is None:
            return
        ln.server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(ln.server.wait_closed(), 2)
        ln.server = None
        if ln.target.kind == "punix":
            with contextlib.suppress(OSError):
                unlink_socket(ln.target.path, ln.inode)

    async def _connect_loop(self, bridge: str, ln: Listener) -> None:
        """An active target: connect, serve the connection until it ends, then again
        after a backoff that doubles from MIN_BACKOFF to MAX_BACKOFF (reset by a
        connection that got past the HELLO)."""
        t = ln.target
        backoff = MIN_BACKOFF
        while True:
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(t.host, t.port), CONNECT_TIMEOUT)
            except (OSError, TimeoutError) as e:
                errno = getattr(e, "errno", None)
                ln.error = os.strerror(errno) if errno else str(e) or "timed out"
                log.info("openflow %s: %s: cannot connect (%s); again in %.0f s", bridge,
                         t.text, ln.error, backoff)
            else:
                ln.error = ""
                await self._serve(bridge, ln, reader, writer)
                if ln.connected:
                    backoff = MIN_BACKOFF
                ln.connected = False
                ln.error = ln.error or "connection closed"
                self._check_fail_open(bridge)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF)

    def _ready(self, bridge: str, ln: Listener) -> None:
        """A connection of ``ln`` is past the HELLO."""
        if ln.target.kind == "tcp":
            ln.connected = True
            self._check_fail_open(bridge)

    async def _serve(self, bridge: str, ln: Listener, reader, writer) -> None:
        b = self.bridges.get(bridge)
        if b is None or not ln.running:
            writer.close()
            return
        if len(b.connections) >= MAX_CONNECTIONS:
            log.warning("openflow %s: a connection refused: %d open already", bridge,
                        len(b.connections))
            writer.close()
            return
        peer = writer.get_extra_info("peername") or "unix"
        if isinstance(peer, tuple):
            peer = f"{peer[0]}:{peer[1]}"
        if ln.target.kind != "tcp":            # a listener: who may program the bridge?
            ok, who = peers.allowed(writer.get_extra_info("socket"),
                                    getattr(self.switch, "ctl_gid", None))
            if not ok:
                log.warning("openflow %s: connection from %s refused: not root, not the "
                            "switch's user and not in its control group", bridge, who)
                writer.close()
                return
        self.events.start()
        conn = Connection(reader, writer, Handler(self.switch, bridge, b.state, b.dpid,
                                                  self.events),
                          f"{bridge} {peer}", b.probe)
        conn.on_ready = lambda: self._ready(bridge, ln)
        b.connections.add(conn)
        ln.connections.add(conn)
        try:
            await conn.run()
        finally:
            b.connections.discard(conn)
            ln.connections.discard(conn)
            self.events.invalid_ttl_changed(bridge)

    # -- reports --------------------------------------------------------------------------
    def show_lines(self, bridge: str) -> list[str]:
        b = self.bridges.get(bridge)
        dpid = self.dpid(bridge)
        lines = []
        if b is not None:
            for ln in b.listeners:
                if ln.target.kind == "tcp":
                    state = "connected" if ln.connected else \
                        f"not connected: {ln.error or 'connecting'}"
                else:
                    state = f"listening on {ln.address}" if ln.server else \
                        f"not listening: {ln.error or 'closed'}"
                lines.append(f'    Controller "{ln.target.text}"  {state}')
            lines.append(f"        fail_mode: {self.fail_mode(bridge)}"
                         + ("  (fail-open: forwarding by NORMAL)" if b.fail_open else ""))
            n = len(b.connections)
            lines.append(f"        connections: {n}")
            rate, burst = self.rate_limits(bridge)
            lines.append(f"        controller_rate_limit: {rate or 'none'}, "
                         f"controller_burst_limit: {burst}")
            st = self.events.stats()
            if st.get("queued") or st.get("packet_ins"):
                lines.append(f"        packet_in: queued {st['queued']}, sent "
                             f"{st['packet_ins']}, dropped: rate {st['drop_rate']}, "
                             f"full {st['drop_full']}, busy {st['drop_busy']}, "
                             f"no controller {st['no_controller']}")
        if dpid:
            lines.append(f"    datapath_id: {dpid:016x}")
        return lines


def enable(switch) -> OpenFlow:
    """The switch's OpenFlow side (made once), and the ctl commands that drive it."""
    from . import commands
    commands.register()
    of = getattr(switch, "openflow", None)
    if of is None:
        of = switch.openflow = OpenFlow(switch)
    return of
