"""The switch: bridges, ports, rules, QoS and PMD threads over one compiled datapath, with
its configuration kept in the run directory's store and applied again on start.

Control methods run on the asyncio thread; PMD threads never call back into Python (the
classifier and the MAC table they use are compiled). Commands parse in switch.commands;
this module applies them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
import time
from pathlib import Path

from pyvhost._flow import KEY_FIELDS, key_dict
from pyvhost._switch import Datapath, limits

from .bridge import DEFAULT_MAC_AGING, DEFAULT_MAC_TABLE_SIZE, Bridge, Rule
from .bulk import give_back_memory
from .capture import Captures
from .commands import CommandError
from .flows import Flow, FlowSyntaxError, Selector, parse_flow, split_canonical
from .mirrors import Mirror, Mirrors
from .netdev import NetdevError
from .pmd import PmdSet, stored_settings
from .port import DEFAULT_QUEUES, HOST_TYPES, VHOST_TYPES, Port, VhostPort, create_host_port
from .rundir import CTL_SOCK, RunLock, check_name, group_id, prepare
from .store import Store, StoreError
from .tunnel import tunnel_options

log = logging.getLogger("pyvhost.switch")
LIMITS = limits()
DEFAULT_FLOW = "priority=0,actions=normal"
LOG_EVERY = 10.0          # seconds between two log lines about the same kind of event


BULK = 1000              # rules in one change after which freed memory goes back to the OS


def masked_fields(mask: bytes) -> list[str]:
    """The names of the key fields a raw mask keeps (any bit of them)."""
    wild = key_dict(mask)
    return [k for k in KEY_FIELDS
            if (any(wild[k]) if isinstance(wild[k], bytes) else wild[k])]


# the datapath's per-port drop counters, by the direction they count against
RX_DROPS = ("drop_police", "drop_upcall", "drop_copy", "drop_no_port", "drop_mirror_port",
            "drop_no_recv", "drop_meter")
TX_DROPS = ("drop_qos", "drop_tx_full", "drop_offload", "drop_tx_error")
MAX_OFPORT = 0xFEFF        # OpenFlow's OFPP_MAX: numbers above are reserved ports


def kbps_to_bytes(kbps: int) -> int:
    return kbps * 1000 // 8


class Switch:
    """``run_dir``: the store, the lock and (unless ``sock_dir``) the vhostuser sockets.
    ``socket_mode``/``socket_group``: what vhostuser sockets get unless a port says.
    Raises RunDirError or StoreError (one line for users) if it cannot start; then
    nothing in the run directory has been changed but the lock file."""

    def __init__(self, run_dir: str | Path, *, sock_dir: str | Path | None = None,
                 socket_mode: int | None = None, socket_group: str | None = None):
        self.socket_group = socket_group
        self.socket_gid = group_id(socket_group) if socket_group is not None else None
        self.run_dir = prepare(Path(run_dir), None if sock_dir else self.socket_gid)
        self.sock_dir = prepare(Path(sock_dir), self.socket_gid) if sock_dir else self.run_dir
        self.socket_mode = socket_mode if socket_mode is not None else \
            (0o660 if socket_group is not None else 0o600)
        self.lock = RunLock(self.run_dir)
        self.lock.acquire()
        try:
            self.store = Store(self.run_dir / "conf.db")
        except StoreError:
            self.lock.release()
            raise
        self.failed: dict[str, str] = {}          # stored rows that did not load: why
        self.ctl_gid: int | None = None           # the control group (--ctl-group)
        self._reserved_ofports: dict[str, set[int]] = {}   # bridge -> failed ports' numbers
        self._retired_ofports: dict[str, dict[int, str]] = {}  # bridge -> {number: name}
        self.datapath = Datapath()
        self.bridges: dict[str, Bridge] = {}
        self.ports: dict[str, Port] = {}
        self._by_id: dict[int, Port] = {}
        self.mirrors = Mirrors(self.datapath, self.store)
        self.captures = Captures(self)
        self.pmd_settings = stored_settings(self.store.settings())
        self._damped_seen: dict[str, int] = {}
        self._last_log: dict[str, float] = {}
        self._log_skipped: dict[str, int] = {}
        self.pmds = self._new_pmds()
        self._timer: asyncio.Task | None = None
        self._stuck_ports: list[Port] = []
        # observers (pyvhost.openflow): called as f(kind, **info) after a change, kinds
        # "port_added"/"port_removed" (bridge, port) and "rules_removed" (bridge, reason
        # "timeout" or "delete", removed: [(rule, (packets, bytes, used_ns))]; a removed
        # rule's text no longer changes: rule.flow parses it for an observer that needs it)
        self.observers: list = []

    def _new_pmds(self) -> PmdSet:
        s = self.pmd_settings
        return PmdSet(self.datapath, s["threads"], s["cpus"], s["assign"], s["auto_lb"],
                      s["flow_limit"], s["sleep_max"], s["emc_insert_inv_prob"])

    # -- life -----------------------------------------------------------------------------
    async def start(self, seed: list[list[str]] | None = None) -> None:
        """Apply the stored configuration (or the seed commands, on an empty store)."""
        from .commands import run_command
        if self.store.is_empty() and seed:
            with self.store.transaction():          # all of the seed or none of it
                for n, argv in enumerate(seed, 1):
                    try:
                        await run_command(self, argv)
                    except CommandError as e:
                        raise CommandError(f"command {n} ({' '.join(argv)}): {e}") from None
        else:
            await self._restore()
        self._timer = asyncio.get_running_loop().create_task(self._tick())

    def _failed(self, key: str, why: str) -> None:
        log.error("store: %s skipped: %s", key, why)
        self.failed[key] = why

    async def _restore(self) -> None:
        """Everything stored that still loads; a row that does not is logged, listed by
        ``show`` as failed and kept in the store (fix its cause and restart, or delete or
        re-add it)."""
        for name in self.store.bridges():
            try:
                self.add_bridge(name, persist=False, default_flow=False)
            except CommandError as e:
                self._failed(f"bridge {name}", str(e))
        for name, bridge, type_, opts, ofport in self.store.ports():
            try:
                if not isinstance(opts, dict):
                    raise CommandError(f"options {opts!r} are not a JSON object")
                await self.add_port(bridge, name, type_, opts.get("path"),
                                    opts.get("queues"), persist=False, ofport=ofport,
                                    socket_mode=opts.get("socket_mode"),
                                    socket_group=opts.get("socket_group"),
                                    mtu=opts.get("mtu"), dev=opts.get("dev"), restoring=True,
                                    tunnel=tunnel_options(type_, opts))
            except (CommandError, TypeError, ValueError) as e:
                self._failed(f"port {name}", str(e))
                if isinstance(ofport, int):
                    self._reserved_ofports.setdefault(bridge, set()).add(ofport)
        for name, bridge in self.bridges.items():
            flows, rows = [], []
            for row, text in self.store.flows(name):
                flow = None
                try:
                    flow = parse_flow(text)
                    bridge.check(flow)
                except (FlowSyntaxError, ValueError) as e:
                    self._failed(f"flow {row} of bridge {name}", f"{text!r}: {e}")
                    if flow is not None:        # a port that went: no new port gets its
                        self._retire_named(bridge, flow)            # number
                    continue
                flows.append(flow)
                rows.append(row)
            for rule, row in zip(bridge.apply(add=flows), rows, strict=True):
                rule.row = row
        for bridge in self.bridges.values():
            for why in self.mirrors.restore(bridge):
                self._failed(f"mirror of bridge {bridge.name}", why)
        for port, (pkbps, pburst, max_rate) in self.store.qos().items():
            if port in self.ports:
                self.set_policing(port, pkbps, pburst, persist=False)
                self.set_qos(port, max_rate, persist=False)

    async def stop(self) -> None:
        if self._timer:
            self._timer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._timer
        self.captures.end_all("the switch is stopping")
        self.pmds.stop()
        for port in list(self.ports.values()):
            await port.close()
        self.store.close()
        self.lock.release()

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            try:
                self.periodic()
            except Exception as e:
                self._log_once("tick", "periodic work failed: %s", e)
            self.sync_store()

    def sync_store(self) -> str | None:
        """Put what the store committed on disk (it already survives a crash of the switch;
        now of the machine too): before a ctl answer, and at most a second after an
        OpenFlow commit (OVS keeps no OpenFlow rule across a restart at all). Returns
        why it could not (None: synced, or nothing to sync)."""
        try:
            self.store.sync()
        except (sqlite3.Error, OSError) as e:
            why = (f"committed changes could not be synced to disk ({e}); they survive a "
                   "crash of the switch, not of the machine")
            self._log_once("sync", "store: %s", why)
            return why
        return None

    def periodic(self, now_ns: int | None = None) -> None:
        """Once a second: PMD load samples, host ports' links, MAC aging, rule timeouts,
        flapping MACs."""
        now_ns = time.monotonic_ns() if now_ns is None else now_ns
        self.pmds.sample()
        changed = False
        for port in list(self.ports.values()):
            try:
                changed |= port.periodic()
            except Exception as e:              # one port's trouble never stops the rest
                self._log_once(f"port:{port.name}", "port %s: %s", port.name, e)
        if changed:
            self.datapath.wake_all()            # PMDs sleep on the ports' new fds
        for bridge in list(self.bridges.values()):
            bridge.macs.expire()
            gone = bridge.expired(now_ns)
            if gone:
                self._remove_rules(bridge, gone, "timeout")
            damped = bridge.macs.stats()["damped"]
            if damped > self._damped_seen.get(bridge.name, 0):
                vlan, mac = bridge.macs.last_damped()
                self._log_once(f"flap:{bridge.name}", "bridge %s: MAC %s (VLAN %d) is flapping "
                               "between ports; %d moves ignored so far", bridge.name,
                               mac.hex(":"), vlan, damped)
                self._damped_seen[bridge.name] = damped

    def _log_once(self, kind: str, fmt: str, *args) -> None:
        """A log line per kind of event per LOG_EVERY seconds, never one per packet; the
        line says how many of that kind were not logged since the last one."""
        now = time.monotonic()
        if now - self._last_log.get(kind, -LOG_EVERY) >= LOG_EVERY:
            self._last_log[kind] = now
            skipped = self._log_skipped.pop(kind, 0)
            if skipped:
                fmt += " (%d more since the last report)"
                args = (*args, skipped)
            log.warning(fmt, *args)
        else:
            self._log_skipped[kind] = self._log_skipped.get(kind, 0) + 1

    # -- bridges and ports ----------------------------------------------------------------
    def _bridge(self, name: str) -> Bridge:
        if name not in self.bridges:
            raise CommandError(f"no bridge named {name}")
        return self.bridges[name]

    def _port(self, name: str) -> Port:
        if name not in self.ports:
            raise CommandError(f"no port named {name}")
        return self.ports[name]

    def add_bridge(self, name: str, persist: bool = True, default_flow: bool = True) -> None:
        try:
            check_name("bridge", name)
        except ValueError as e:
            raise CommandError(str(e)) from None
        if name in self.bridges:
            raise CommandError(f"bridge {name} already exists")
        if name in self.ports:
            raise CommandError(f"{name} is a port name")
        used = {b.bridge_id for b in self.bridges.values()}
        bid = next(i for i in range(len(used) + 1) if i not in used)
        if bid >= LIMITS["bridges"]:
            raise CommandError(f"at most {LIMITS['bridges']} bridges")
        conf = self._stored_conf(f"bridge:{name}")
        size = conf.get("mac_table_size", DEFAULT_MAC_TABLE_SIZE)
        aging = conf.get("mac_aging", DEFAULT_MAC_AGING)
        try:
            if type(size) is not int or type(aging) is not int:
                raise ValueError("not integers")
            bridge = Bridge(name, bid, size, aging)
        except (ValueError, OverflowError) as e:
            log.error("store: bridge %s: mac-table-size %r, mac-aging-time %r refused (%s): "
                      "the defaults used", name, size, aging, e)
            bridge = Bridge(name, bid)
        self.datapath.set_bridge(bid, bridge.cls, bridge.macs)
        self.bridges[name] = bridge
        try:
            with self.store.transaction():          # the bridge and its rule, or neither
                if persist:
                    self.store.add_bridge(name)
                if default_flow:
                    self.add_flows(name, [parse_flow(DEFAULT_FLOW)], persist=persist)
        except BaseException:
            del self.bridges[name]
            self.datapath.remove_bridge(bid)
            raise

    def _stored_conf(self, key: str) -> dict:
        """A bridge's or port's stored settings: a table, or {} (logged) if the store holds
        something else there."""
        conf = self.store.settings().get(key, {})
        if not isinstance(conf, dict):
            log.error("store: setting %s is %r, not a table: ignored", key, conf)
            return {}
        return conf

    def set_bridge(self, name: str, mac_table_size: int | None = None,
                   mac_aging: int | None = None) -> None:
        """other_config:mac-table-size / mac-aging-time, as OVS users set them."""
        from pyvhost._fdb import MacTable
        bridge = self._bridge(name)
        try:
            if mac_aging is not None:
                bridge.macs.set_aging(mac_aging)
            if mac_table_size is not None and mac_table_size != bridge.macs.size:
                macs = MacTable(mac_table_size, bridge.macs.aging)
                for port in bridge.ports.values():
                    macs.set_port_limit(port.port_id, bridge.mac_limits.get(port.name, 0))
                self.datapath.set_bridge(bridge.bridge_id, bridge.cls, macs)
                bridge.macs = macs
        except ValueError as e:
            raise CommandError(str(e)) from None
        key = f"bridge:{name}"
        conf = self._stored_conf(key)
        conf.update({"mac_table_size": bridge.macs.size, "mac_aging": bridge.macs.aging})
        self.store.set_setting(key, conf)

    async def del_bridge(self, name: str) -> None:
        bridge = self._bridge(name)
        self.store.del_bridge(name)                 # first: it is the step that can fail
        self.captures.end_bridge(name)
        for port in list(bridge.ports):
            await self.del_port(port, persist=False)
        del self.bridges[name]
        self._retired_ofports.pop(name, None)
        self.mirrors.forget(name)
        self.datapath.remove_bridge(bridge.bridge_id)      # waits out the PMDs
        for key in [k for k in self.failed if k.endswith(f" of bridge {name}")]:
            del self.failed[key]

    def new_port_id(self) -> int:
        """A datapath port id no port, capture or stuck port holds."""
        used = set(self._by_id) | {p.port_id for p in self._stuck_ports} | \
            self.captures.port_ids()
        port_id = next((i for i in range(LIMITS["ports"]) if i not in used), None)
        if port_id is None:
            raise CommandError(f"at most {LIMITS['ports']} ports (captures included)")
        return port_id

    # -- mirrors ----------------------------------------------------------------------------
    def add_mirror(self, bridge_name: str, name: str, args: list[str]) -> None:
        bridge = self._bridge(bridge_name)
        try:
            self.mirrors.add(bridge, Mirror.parse(name, args))
        except ValueError as e:
            raise CommandError(str(e)) from None
        log.info("mirror %s added to %s", name, bridge_name)

    def del_mirror(self, bridge_name: str, name: str) -> None:
        try:
            self.mirrors.remove(self._bridge(bridge_name), name)
        except ValueError as e:
            raise CommandError(str(e)) from None
        log.info("mirror %s removed from %s", name, bridge_name)

    def mirrors_data(self, bridge_name: str | None = None) -> list[dict]:
        names = [bridge_name] if bridge_name is not None else list(self.bridges)
        return [row for n in names for row in self.mirrors.rows(self._bridge(n))]

    def _retire_named(self, bridge: Bridge, flow: Flow) -> None:
        """The port numbers a stored rule names that no port has count as given back
        (a rule left for a port that went, loaded again once a port has its number)."""
        used = {p.ofport for p in bridge.ports.values()}
        retired = self._retired_ofports.setdefault(bridge.name, {})
        for ref in bridge.port_refs(flow):
            if ref.isdigit() and 1 <= int(ref) <= MAX_OFPORT and int(ref) not in used:
                retired.setdefault(int(ref), "")

    def _ofport(self, bridge: Bridge, requested: int | None, name: str) -> int:
        """Port ``name``'s OpenFlow number: ``requested``, else the number a port of that
        name had last on this bridge, else the lowest no port has had since the switch
        started, else the one given back longest ago (as OVS: a controller's rules for a
        port that went do not apply to the next port added unless nothing else is left)."""
        used = {p.ofport for p in bridge.ports.values()} | \
            self._reserved_ofports.get(bridge.name, set())
        retired = self._retired_ofports.get(bridge.name, {})     # number -> name, oldest first
        if requested is None:
            mine = [n for n, who in retired.items() if who == name and n not in used]
            fresh = next(n for n in range(1, len(used) + len(retired) + 2)
                         if n not in used and n not in retired)
            oldest = [n for n in retired if n not in used]
            if mine:
                return mine[-1]
            if fresh <= MAX_OFPORT or not oldest:
                if fresh > MAX_OFPORT:
                    raise CommandError(f"bridge {bridge.name} has no OpenFlow port number left")
                return fresh
            return oldest[0]
        if not isinstance(requested, int) or not 1 <= requested <= MAX_OFPORT:
            raise CommandError(f"ofport_request: {requested!r} out of range 1..{MAX_OFPORT}")
        if requested in used:
            raise CommandError(f"ofport {requested} is taken on bridge {bridge.name}")
        return requested

    async def add_port(self, bridge_name: str, name: str, type_: str, path: str | None = None,
                       queues: int | None = None, persist: bool = True, *,
                       ofport: int | None = None, socket_mode: int | None = None,
                       socket_group: str | None = None, mtu: int | None = None,
                       dev: str | None = None, restoring: bool = False,
                       tunnel: dict | None = None) -> None:
        """All or nothing: every check first; a failure after that undoes every step.
        ``mtu`` (internal) and ``dev`` (afpacket) are the host ports' options;
        ``restoring``: loading the store (an afpacket port's absent interface is waited
        for instead of refused)."""
        bridge = self._bridge(bridge_name)
        try:
            check_name("port", name)
        except ValueError as e:
            raise CommandError(str(e)) from None
        own_internal = type_ == "internal" and name == bridge_name   # the bridge's own port
        if name in self.ports or (name in self.bridges and not own_internal):
            raise CommandError(f"port {name} already exists")
        if type_ not in VHOST_TYPES + HOST_TYPES:
            raise CommandError(f"unknown port type {type_!r} (have: "
                               f"{', '.join(VHOST_TYPES + HOST_TYPES)})")
        if type_ in HOST_TYPES:
            if path or queues is not None or socket_mode is not None or \
                    socket_group is not None:
                raise CommandError(f"type={type_} takes no path=, queues=, socket-mode= or "
                                   "socket-group=")
            queues = 1                        # one queue: the interface's
        elif mtu is not None or dev is not None or tunnel:
            raise CommandError("mtu= and dev= are for type=internal, afpacket and afxdp; "
                               "remote_ip= and the other tunnel options for vxlan and geneve")
        elif type_ == "vhostuserclient":
            if not path:
                raise CommandError("type=vhostuserclient needs path= (the front-end's socket)")
            if socket_mode is not None or socket_group is not None:
                raise CommandError("socket-mode= and socket-group= are for type=vhostuser "
                                   "(the switch does not own a vhostuserclient's socket)")
        elif path:
            raise CommandError("path= is for type=vhostuserclient; a vhostuser port's "
                               f"socket is {self.sock_dir}/{name}.sock")
        else:
            path = str(self.sock_dir / f"{name}.sock")
            if path == str(self.run_dir / CTL_SOCK):
                raise CommandError(f"port name {name!r}: collides with the control socket")
        queues = DEFAULT_QUEUES if queues is None else queues
        if not isinstance(queues, int) or not 1 <= queues <= LIMITS["queues"]:
            raise CommandError(f"queues: {queues!r} out of range 1..{LIMITS['queues']}")
        of = self._ofport(bridge, ofport, name)
        port_id = self.new_port_id()
        capacity = len(self.pmds.pmds) * LIMITS["rxqs_per_pmd"]
        if sum(p.active for p in self.ports.values()) + 1 > capacity:
            raise CommandError(f"the PMD threads poll at most {capacity} RX queues "
                               f"({LIMITS['rxqs_per_pmd']} each); add threads with set-pmd")
        gid = None
        if type_ == "vhostuser":
            try:
                gid = group_id(socket_group) if socket_group is not None else self.socket_gid
            except ValueError as e:
                raise CommandError(f"socket-group: {e}") from None
            if socket_mode is None:
                socket_mode = None if socket_group is None else 0o660
            if socket_mode is not None and not (isinstance(socket_mode, int) and
                                                0 <= socket_mode <= 0o777):
                raise CommandError(f"socket-mode: {socket_mode!r} out of range 0..0777")
        if type_ in HOST_TYPES and any(p.type in ("afpacket", "afxdp") and p.path == dev
                                       for p in self.ports.values()):
            raise CommandError(f"dev={dev} is attached already")
        if dev is not None and dev in self.ports and self.ports[dev].type == "internal":
            raise CommandError(f"dev={dev} is this switch's internal port {dev} (a loop)")
        try:
            if type_ in HOST_TYPES:
                # the interface is created or attached here: a failure leaves nothing
                port = create_host_port(name, bridge_name, type_, port_id, of, mtu=mtu,
                                        dev=dev, restoring=restoring, tunnel=tunnel)
            else:
                port = VhostPort.create(name, bridge_name, type_, path, queues, port_id, of,
                                        socket_mode, socket_group, gid)
        except (ValueError, NetdevError) as e:
            raise CommandError(f"port {name}: {e}") from None
        if isinstance(port, VhostPort):
            if type_ == "vhostuser" and socket_mode is None:
                port.endpoint.mode = self.socket_mode
            port.device.listeners.append(self.datapath.wake_all)
            port.device.listeners.append(lambda: self._queues_changed(port))
        limit = self._stored_conf(f"port:{name}").get("mac_limit")
        if limit is not None and not (type(limit) is int and 0 <= limit <= 1 << 24):
            log.error("store: port %s: mac-limit %r refused: no limit", name, limit)
        elif limit:
            bridge.mac_limits[name] = limit
        try:
            self.datapath.add_port(port_id, bridge.bridge_id, port.datapath_dev())
        except BaseException:
            await port.close()
            raise
        self.ports[name] = port
        self._by_id[port_id] = port
        bridge.attach(port)
        bridge.reclaim(self.datapath, timeout=1.0)  # the rules naming it, compiled again
        try:
            try:
                await port.start()
            except OSError as e:
                raise CommandError(f"port {name}: {e}") from None
            if persist:
                self.store.add_port(name, bridge_name, type_, port.options(), of)
        except BaseException:
            await self._unplug(port)
            raise
        self.failed.pop(f"port {name}", None)
        self._reserved_ofports.get(bridge_name, set()).discard(of)
        self._retired_ofports.get(bridge_name, {}).pop(of, None)
        self._assign()
        self.mirrors.apply(bridge)                  # mirrors that name it take it now
        log.info("port %s (%s, %s, ofport %d) added to %s", name, type_, port.path, of,
                 bridge_name)
        self._emit("port_added", bridge=bridge, port=port)

    def _queues_changed(self, port: Port) -> None:
        """The front-end enabled a ring: poll as many pairs as it has ever enabled."""
        n = port.enabled_pairs()
        if n > port.active and self.ports.get(port.name) is port:
            port.active = n
            self._assign()

    async def del_port(self, name: str, bridge_name: str | None = None,
                       persist: bool = True) -> None:
        if name not in self.ports and f"port {name}" in self.failed and persist:
            self.store.del_port(name)               # a stored row that did not load
            del self.failed[f"port {name}"]
            return
        port = self._port(name)
        if bridge_name is not None and port.bridge != bridge_name:
            raise CommandError(f"port {name} is not on bridge {bridge_name}")
        if persist:
            self.store.del_port(name)              # first: it is the step that can fail
        await self._unplug(port)
        retired = self._retired_ofports.setdefault(port.bridge, {})
        retired.pop(port.ofport, None)             # (the latest last)
        retired[port.ofport] = name

    async def _unplug(self, port: Port) -> None:
        """Take a port out of the running switch (not the store)."""
        name = port.name
        del self.ports[name]
        del self._by_id[port.port_id]
        self.bridges[port.bridge].detach(port)
        self._assign()
        self.mirrors.apply(self.bridges[port.bridge])   # before its datapath slot goes
        try:
            self.datapath.remove_port(port.port_id)     # waits until no PMD can be inside it
        except TimeoutError as e:
            # a PMD is stuck: keep the port's memory (never unmap under it), close the socket
            log.error("port %s: %s; its rings stay mapped", name, e)
            self._stuck_ports.append(port)
            port.abandon()
        else:                                       # its rules were compiled again: the
            # wait above was after that, so no PMD can hold the old ones
            self.bridges[port.bridge].reclaim(self.datapath, synchronized=True)
        self.bridges[port.bridge].forget(port)      # no PMD can learn on it again
        give_back_memory()
        await port.close()
        log.info("port %s removed from %s", name, port.bridge)
        self._emit("port_removed", bridge=self.bridges[port.bridge], port=port)

    def _assign(self) -> None:
        self.pmds.set_rxqs([(p.port_id, q) for p in self.ports.values()
                            for q in range(p.active)])

    # -- rules ----------------------------------------------------------------------------
    def _change(self, bridge: Bridge, add: list[Flow] = (), remove: list[Rule] = (),
                modify: list[tuple[Rule, Flow]] = (), persist: bool = True,
                specs: list[tuple] | None = None, in_port_checked: bool = True) -> list[Rule]:
        """Apply one all-or-nothing change to a bridge's rules and its store rows."""
        try:
            for flow in add:
                bridge.check(flow, match=in_port_checked)
            for _, flow in modify:                   # (its match is the rule's own)
                bridge.check(flow, match=False)
        except ValueError as e:
            raise CommandError(str(e)) from None
        rows = [r.row for r in remove]
        old_texts = [r.text for r, _ in modify]
        try:
            added = bridge.apply(add=add, remove=remove, modify=modify, specs=specs)
        except ValueError as e:
            raise CommandError(str(e)) from None
        if persist:
            try:
                new_rows = self.store.change_flows(bridge.name, [r.text for r in added],
                                                   rows, [(r.row, r.text) for r, _ in modify])
            except (StoreError, sqlite3.Error) as e:
                log.error("bridge %s: the store refused a change of %d rules (%s): undone",
                          bridge.name, len(add) + len(remove) + len(modify), e)
                self._undo(bridge, added, remove, modify, old_texts)
                raise CommandError(f"the store could not be written ({e}): nothing "
                                   "changed") from None
            for rule, row in zip(added, new_rows, strict=True):
                rule.row = row
        if remove or modify:             # (modified: a rule given more ops was replaced)
            bridge.reclaim(self.datapath, remove)
        if len(add) + len(remove) >= BULK:
            give_back_memory()
        return added

    def _undo(self, bridge: Bridge, added: list[Rule], removed: list[Rule],
              modified: list[tuple[Rule, Flow]], old_texts: list[str]) -> None:
        """Put a bridge's rules back as they were before a change the store refused (the
        rules that come back keep their store rows and ages; their counters restart)."""
        back = bridge.apply(add=[r.flow for r in removed], remove=added,
                            modify=[(r, parse_flow(t)) for (r, _), t in
                                    zip(modified, old_texts, strict=True)])
        for new, old in zip(back, removed, strict=True):
            new.row, new.created = old.row, old.created
        bridge.reclaim(self.datapath)

    def add_flow(self, bridge_name: str, flow: Flow, persist: bool = True) -> None:
        self.add_flows(bridge_name, [flow], persist)

    def add_flows(self, bridge_name: str, flows: list[Flow], persist: bool = True) -> int:
        """Add rules; one with the table, priority and match of an existing rule (or of an
        earlier line) replaces it, as OpenFlow's ADD does. All or nothing."""
        bridge = self._bridge(bridge_name)
        latest: dict[tuple, tuple[Flow, tuple]] = {}
        for flow in flows:
            spec = bridge.spec(flow)
            latest[bridge.identity(spec)] = flow, spec
        replaced = [r for r in (bridge.find(s) for _, s in latest.values()) if r is not None]
        self._change(bridge, add=[f for f, _ in latest.values()], remove=replaced,
                     persist=persist, specs=[s for _, s in latest.values()])
        return len(latest)

    def replace_flows(self, bridge_name: str, flows: list[Flow]) -> dict:
        """Make the bridge's rules exactly ``flows``, touching only what differs: rules in
        both with the same actions, cookie and timeouts stay as they are (counters run
        on), changed actions are modified in place, the rest is deleted or added."""
        bridge = self._bridge(bridge_name)
        wanted: dict[tuple, Flow] = {}
        for flow in flows:
            wanted[bridge.identity(bridge.spec(flow))] = flow
        same_text = {f.format(): k for k, f in wanted.items()}
        remove, modify, keep = [], [], set()
        for rule in bridge.rules.values():
            if rule.text in same_text:               # unchanged (no need to parse it)
                keep.add(same_text[rule.text])
                continue
            key = bridge.rule_identity(rule)
            want = wanted.get(key)
            have = rule.flow if want is not None else None
            if want is None:
                remove.append(rule)
            elif (want.cookie, want.idle_timeout, want.hard_timeout) == \
                    (have.cookie, have.idle_timeout, have.hard_timeout):
                modify.append((rule, want))          # new actions: counters run on
                keep.add(key)
            else:
                remove.append(rule)                  # the rule itself changed: a new one
        add = [f for k, f in wanted.items() if k not in keep]
        self._change(bridge, add=add, remove=remove, modify=modify)
        return {"added": len(add), "deleted": len(remove), "modified": len(modify)}

    def del_flows(self, bridge_name: str, selector: Selector | None,
                  strict: bool = False) -> int:
        bridge = self._bridge(bridge_name)
        gone = bridge.select(selector, strict)
        self._remove_rules(bridge, gone, "delete")
        return len(gone)

    def _remove_rules(self, bridge: Bridge, gone: list[Rule], reason: str) -> None:
        """Remove rules and tell the observers, with each rule's last counters (those it
        had when no PMD could count into it any more; if the PMDs could not be waited
        for, those read before the removal)."""
        before = [(r, bridge.counters(r)) for r in gone] if self.observers else []
        self._change(bridge, remove=gone)
        if before:
            removed = [(r, bridge.counters(r) if r.final else c) for r, c in before]
            self._emit("rules_removed", bridge=bridge, reason=reason, removed=removed)

    def _emit(self, kind: str, **info) -> None:
        for observer in list(self.observers):
            try:
                observer(kind, **info)
            except Exception:                   # an observer's bug never stops the switch
                log.exception("observer of %s failed", kind)

    def change_rules(self, bridge_name: str, add: list[Flow] = (), remove: list[Rule] = (),
                     modify: list[tuple[Rule, Flow]] = (),
                     specs: list[tuple] | None = None,
                     in_port_checked: bool = True) -> list[Rule]:
        """One all-or-nothing change of rules the caller picked itself (OpenFlow's
        FLOW_MODs, pyvhost.openflow): the path add-flows and del-flows take, store
        included; ``modify`` gives rules new actions, cookie and timeouts (counters stay);
        ``specs``: Bridge.spec of each of ``add`` when the caller made them already;
        ``in_port_checked`` False: ``add`` are rules' own matches again, whose in_port
        may name a port that went. Returns the added rules."""
        return self._change(self._bridge(bridge_name), add=list(add), remove=list(remove),
                            modify=list(modify), specs=specs, in_port_checked=in_port_checked)

    def reload_rules(self, bridge_name: str) -> None:
        """Make a bridge's rules exactly what the store holds for it, touching only rules
        that differ (their counters restart): after a store transaction holding several
        changes failed as a whole (pyvhost.openflow commits a batch of FLOW_MODs at once)."""
        bridge = self._bridge(bridge_name)
        stored = dict(self.store.flows(bridge_name))
        remove = [r for r in bridge.rules.values() if stored.get(r.row) != r.text]
        live = {r.row for r in bridge.rules.values() if stored.get(r.row) == r.text}
        rows = [row for row in stored if row not in live]
        flows = []
        for row in list(rows):
            try:
                flows.append(parse_flow(stored[row]))
            except FlowSyntaxError:
                rows.remove(row)                     # (reported when it was loaded)
        for rule, row in zip(bridge.apply(add=flows, remove=remove), rows, strict=True):
            rule.row = row
        if remove:
            bridge.reclaim(self.datapath)

    def trace(self, bridge_name: str, match: dict) -> dict:
        bridge = self._bridge(bridge_name)
        try:
            return bridge.trace(match)
        except ValueError as e:
            raise CommandError(str(e)) from None

    # -- QoS ------------------------------------------------------------------------------
    def set_policing(self, name: str, rate_kbps: int, burst_kbits: int,
                     persist: bool = True) -> None:
        port = self._port(name)
        burst = burst_kbits * 1000 // 8 or max(kbps_to_bytes(rate_kbps) // 10, 9216)
        self.datapath.set_police(port.port_id, kbps_to_bytes(rate_kbps), burst)
        if persist:
            _, _, max_rate = self.store.qos().get(name, (0, 0, 0))
            self.store.set_qos(name, rate_kbps, burst_kbits, max_rate)

    def set_qos(self, name: str, max_rate_kbps: int, persist: bool = True) -> None:
        port = self._port(name)
        rate = kbps_to_bytes(max_rate_kbps)
        self.datapath.set_shape(port.port_id, rate, max(rate // 100, 16384))
        if persist:
            pk, pb, _ = self.store.qos().get(name, (0, 0, 0))
            self.store.set_qos(name, pk, pb, max_rate_kbps)

    # -- PMDs -----------------------------------------------------------------------------
    def set_mac_limit(self, name: str, limit: int) -> None:
        """At most ``limit`` MACs learned on port ``name`` (0: none)."""
        port = self._port(name)
        self.bridges[port.bridge].set_mac_limit(port, limit)
        self.store.set_setting(f"port:{name}", {"mac_limit": limit})

    def set_pmd(self, **settings) -> None:
        for k, v in settings.items():
            self.pmd_settings[k] = v
            self.store.set_setting(k, v)
        self.pmds.stop()
        self.pmds = self._new_pmds()
        self._assign()

    # -- reports --------------------------------------------------------------------------
    def show_data(self) -> dict:
        """Bridges, their ports (by OpenFlow number) and the stored rows that failed."""
        bridges = {}
        for name, bridge in self.bridges.items():
            ports = {}
            for pname, port in sorted(bridge.ports.items(), key=lambda kv: kv[1].ofport):
                p = {"ofport": port.ofport, "type": port.type, "state": port.state()}
                if isinstance(port, VhostPort):
                    p.update(path=port.path, queues=port.queues, polled=port.active)
                else:
                    p["link"] = port.link()
                ports[pname] = p
            bridges[name] = {"ports": ports}
        return {"bridges": bridges, "failed": dict(self.failed)}

    def show(self) -> str:
        data = self.show_data()
        lines = []
        for name, bridge in data["bridges"].items():
            lines.append(f"Bridge {name}")
            for pname, p in bridge["ports"].items():
                lines.append(f"    Port {pname} (ofport {p['ofport']})")
                if "path" in p:
                    lines.append(f"        type: {p['type']}  path: {p['path']}  "
                                 f"queues: {p['queues']} (polled: {p['polled']})  "
                                 f"{p['state']}")
                else:
                    lines.append(f"        type: {p['type']}  {p['state']}")
        if data["failed"]:
            lines.append("Failed (stored, not loaded):")
            lines += [f"    {key}: {why}" for key, why in data["failed"].items()]
        return "\n".join(lines)

    def dump_flows_data(self, bridge_name: str, selector: Selector | None = None) -> list:
        """The selected rules in table and priority order: each as add-flow takes it
        ("flow"), its dump-flows head fields and body, and its counters."""
        bridge = self._bridge(bridge_name)
        now = time.monotonic()
        now_ns = time.monotonic_ns()
        out = []
        for rule in bridge.select(selector):
            head, body = split_canonical(rule.text)
            packets, bytes_, used = bridge.counters(rule)
            out.append({"flow": rule.text, "head": head, "body": body,
                        "cookie": head.get("cookie", "0x0"),
                        "table": int(head.get("table", 0)),
                        "duration": round(now - rule.created, 3), "n_packets": packets,
                        "n_bytes": bytes_,
                        "idle_age": (now_ns - used) // 1_000_000_000 if used else None})
        return out

    def top_flows_data(self, bridge_name: str, n: int) -> list[dict]:
        """The ``n`` rules of a bridge that counted the most packets, most first (the
        classifier's one-pass top, no lock a PMD waits for): each as add-flow takes it and
        its counters. A rule removed while this runs is left out."""
        bridge = self._bridge(bridge_name)
        out = []
        for rid in bridge.cls.top(n):
            rule = bridge.rules.get(rid)
            if rule is None:
                continue
            try:
                packets, bytes_, _used = bridge.counters(rule)
                table = bridge.cls.place(rid)[0]
            except KeyError:                            # removed since
                continue
            out.append({"flow": rule.text, "table": table,
                        "n_packets": packets, "n_bytes": bytes_})
        return out

    def dump_flows(self, bridge_name: str, selector: Selector | None = None,
                   stats: bool = True) -> str:
        """ovs-ofctl dump-flows: the selected rules, table and priority order."""
        out = []
        for r in self.dump_flows_data(bridge_name, selector):
            head = r["head"]
            if not stats:
                out.append(" " + "".join(f"{k}={v}, " for k, v in head.items()) + r["body"])
                continue
            parts = [f"cookie={r['cookie']}", f"duration={r['duration']:.3f}s",
                     f"table={r['table']}", f"n_packets={r['n_packets']}",
                     f"n_bytes={r['n_bytes']}"]
            for timeout in ("idle_timeout", "hard_timeout"):
                if timeout in head:
                    parts.append(f"{timeout}={head[timeout]}")
            if r["idle_age"] is not None:
                parts.append(f"idle_age={r['idle_age']}")
            out.append(" " + ", ".join(parts) + ", " + r["body"])
        return "\n".join(out)

    def trace_report(self, bridge_name: str, match: dict, flow_text: str) -> tuple[str, dict]:
        """ofproto/trace: (text, the summary --json prints)."""
        t = self.trace(bridge_name, match)
        lines = [f"Flow: {flow_text}", f"bridge(\"{bridge_name}\")"]
        for table, rule in t["rules"]:
            lines.append(f" {table}. {rule.flow.format_spec()}")
        if not t["rules"]:
            lines.append(" 0. No match: drop")
        final = t["rules"][-1][1] if t["rules"] else None
        actions = ",".join(r.flow.format_actions() for _, r in t["rules"]) or "drop"
        if t["overflow"]:
            lines.append(" more actions than the datapath holds: drop")
        lines.append("Megaflow: " + ",".join(masked_fields(t["mask"])))
        lines.append(f"Datapath actions: {actions}")
        lines.append("Outputs: " + (", ".join(t["outputs"]) or "none"))
        summary = {"rule": final.flow.format_spec() if final else None, "actions": actions,
                   "outputs": t["outputs"]}
        return "\n".join(lines), summary

    def port_counters(self, port: Port) -> dict:
        """Everything counted for a port: the datapath's port counters and, summed per
        direction, its rings' or host device's (names as in the compiled structs: nothing
        is renamed); host ports add their link (state, carrier)."""
        rx_rings, tx_rings, queues = port.ring_counters()
        out = {"ofport": port.ofport, "type": port.type,
               "datapath": self.datapath.port_stats(port.port_id),
               "rx_rings": rx_rings, "tx_rings": tx_rings, "queues": queues}
        link = port.link()
        if link:
            out["link"] = link
        return out

    def dump_ports(self, bridge_name: str, as_json: bool = False) -> str:
        bridge = self._bridge(bridge_name)
        ports = sorted(bridge.ports.items(), key=lambda kv: kv[1].ofport)
        if as_json:
            return json.dumps({name: self.port_counters(port) for name, port in ports})
        out = [f"{bridge_name}: {len(bridge.ports)} ports"]
        for name, port in ports:
            c = self.port_counters(port)
            d, r, t = c["datapath"], c["rx_rings"], c["tx_rings"]
            rx_drop = sum(d[k] for k in RX_DROPS) + \
                sum(v for k, v in r.items() if k.startswith("drop_"))
            tx_drop = sum(d[k] for k in TX_DROPS) + \
                sum(v for k, v in t.items() if k.startswith("drop_"))
            errors = r.get("ring_errors", r.get("rx_errors", 0)) + \
                t.get("ring_errors", t.get("tx_errors", 0))
            out.append(f"  port {port.ofport}({name}): rx pkts={d['rx_packets']}, "
                       f"bytes={d['rx_bytes']}, drop={rx_drop} (police={d['drop_police']}, "
                       f"bad_desc={r.get('drop_bad_desc', 0)}, "
                       f"oversize={r.get('drop_oversize', r.get('rx_truncated', 0))}, "
                       f"upcall_limit={d['drop_upcall']}), "
                       f"errors={errors}")
            out.append(f"           tx pkts={d['tx_packets']}, bytes={d['tx_bytes']}, "
                       f"drop={tx_drop} (qos={d['drop_qos']}, full={d['drop_tx_full']}), "
                       f"action_drop={d['drop_action']}")
            if "link" in c:
                out.append(f"           link: type={port.type} " +
                           " ".join(f"{k}={v}" for k, v in c["link"].items()))
            side = "rings" if isinstance(port, VhostPort) else "device"
            for label, counters in (("datapath", d), (f"rx {side}", r), (f"tx {side}", t)):
                out.append(f"           {label}: " +
                           " ".join(f"{k}={v}" for k, v in counters.items()))
            for q in c["queues"]:
                if q["rx"]["packets"] or q["tx"]["packets"]:
                    out.append(f"           queue {q['queue']}: rx pkts={q['rx']['packets']}, "
                               f"tx pkts={q['tx']['packets']}, "
                               f"no_buffer={q['tx']['drop_no_buffer']}")
        return "\n".join(out)

    def fdb_data(self, bridge_name: str) -> list[dict]:
        out = []
        for port, vlan, mac, age, remote, key in self._bridge(bridge_name).fdb_rows():
            row = {"port": port, "vlan": vlan, "mac": mac, "age": age}
            if remote is not None:                 # behind a per-remote port: which one
                row.update(remote=remote, key=key)
            out.append(row)
        return out

    def fdb_show(self, bridge_name: str) -> str:
        rows = [" port  VLAN  MAC                Age"]
        for r in self.fdb_data(bridge_name):
            line = f"{r['port']:>5} {r['vlan']:5}  {r['mac']}  {r['age']:4}"
            if "remote" in r:
                line += f"  remote={r['remote']} key={r['key']}"
            rows.append(line)
        return "\n".join(rows)

    def pmd_rxq_data(self) -> list[dict]:
        loads = self.pmds.loads()
        total = sum(loads.values()) or 1
        out = []
        for i, pmd in enumerate(self.pmds.pmds):
            rxqs = []
            for port_id, q in pmd.rxqs():
                port = self._by_id.get(port_id)
                if port is not None:
                    rxqs.append({"port": port.name, "queue": q,
                                 "enabled": bool(port.queue_enabled(q)),
                                 "usage": 100 * loads.get((port_id, q), 0) // total})
            out.append({"pmd": i, "cpu": self.pmds.cpus[i], "rxqs": rxqs})
        return out

    def pmd_rxq_show(self) -> str:
        out = []
        for pmd in self.pmd_rxq_data():
            cpu = "any" if pmd["cpu"] is None else pmd["cpu"]
            out.append(f"pmd thread {pmd['pmd']} (cpu {cpu}):")
            for r in pmd["rxqs"]:
                state = "enabled" if r["enabled"] else "disabled"
                out.append(f"  port: {r['port']:<12} queue-id: {r['queue']:2} ({state:>8})  "
                           f"pmd usage: {r['usage']:3d} %")
        return "\n".join(out)

    def pmd_stats_data(self) -> list[dict]:
        return [{"pmd": i, **pmd.stats()} for i, pmd in enumerate(self.pmds.pmds)]

    def pmd_stats_show(self) -> str:
        def emc_state(s: dict) -> str:
            if s["emc_insert_inv_prob"] == 0:
                return "EMC off: emc-insert-inv-prob=0"
            return (f"now {'skipped' if s['emc_skipping'] else 'asked'}, "
                    f"1 in {s['emc_insert_inv_prob']} inserted")
        out = []
        for s in self.pmd_stats_data():
            i = s["pmd"]
            cycles = s["busy_ns"] + s["idle_ns"] or 1
            per_burst = s["packets"] / s["bursts"] if s["bursts"] else 0.0
            out += [f"pmd thread {i}:",
                    f"  packets received: {s['packets']}",
                    f"  avg. packets per burst: {per_burst:.2f}",
                    f"  one-copy frames: {s['onecopy']}",
                    f"  emc hits: {s['emc_hits']}",
                    f"  emc misses: {s['emc_misses']}",
                    f"  emc skipped: {s['emc_skipped']} ({emc_state(s)})",
                    f"  megaflow hits: {s['megaflow_hits']} "
                    f"(simple match: {s['simple_match_hits']}, "
                    f"same megaflow as the frame before: {s['megaflow_reused']}, "
                    f"avg. subtable lookups per hit: {s['subtables_per_hit']:.2f})",
                    f"  megaflows: {s['megaflows']} in {s['megaflow_masks']} masks "
                    f"(limit {s['megaflow_limit']}, evicted {s['megaflow_evictions']})",
                    f"  upcalls: {s['upcalls']} (dropped: {s['upcall_drops']}, "
                    f"over a port's share: {s['upcall_throttled']}, "
                    f"{s['upcall_ns'] // max(s['upcalls'], 1)} ns each)",
                    f"  idle cycles: {s['idle_ns']} ({100 * s['idle_ns'] / cycles:.2f}%)",
                    f"  processing cycles: {s['busy_ns']} ({100 * s['busy_ns'] / cycles:.2f}%)",
                    f"  sleeps: {s['sleeps']} (and {s['load_sleep_ns'] // 1000} us slept "
                    f"while lightly loaded)"]
        return "\n".join(out)


