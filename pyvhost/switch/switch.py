"""The switch: bridges, ports, rules, QoS and PMD threads over one compiled datapath, with
its configuration kept in the run directory's store and applied again on start.

Control methods run on the asyncio thread; ``_upcall`` runs on a PMD thread holding the
GIL (a flow-cache miss). Commands parse in switch.commands; this module applies them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from functools import lru_cache
from pathlib import Path

from pyvhost._flow import field_mask, key_dict
from pyvhost._switch import Datapath, limits

from .bridge import Bridge
from .commands import CommandError
from .flows import Flow, parse_flow
from .pmd import PmdSet
from .port import DEFAULT_QUEUES, Port
from .store import Store

log = logging.getLogger("pyvhost.switch")
LIMITS = limits()
DEFAULT_FLOW = "priority=0,actions=normal"


@lru_cache(maxsize=256)
def _mask(fields: frozenset) -> bytes:
    return field_mask(fields)


def kbps_to_bytes(kbps: int) -> int:
    return kbps * 1000 // 8


class Switch:
    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.store = Store(self.run_dir / "conf.db")
        self.datapath = Datapath()
        self.datapath.upcall = self._upcall
        self.bridges: dict[str, Bridge] = {}
        self.ports: dict[str, Port] = {}
        self._by_id: dict[int, Port] = {}
        self._free_slots = list(range(LIMITS["rules"] - 1, -1, -1))
        settings = self.store.settings()
        self.pmd_settings = {"threads": settings.get("threads", 1),
                             "assign": settings.get("assign", "roundrobin"),
                             "auto_lb": settings.get("auto_lb", False),
                             "cpus": settings.get("cpus", [])}
        self.pmds = self._new_pmds()
        self._timer: asyncio.Task | None = None
        self._stuck_ports: list[Port] = []

    def _new_pmds(self) -> PmdSet:
        s = self.pmd_settings
        return PmdSet(self.datapath, s["threads"], s["cpus"], s["assign"], s["auto_lb"])

    # -- life -----------------------------------------------------------------------------
    async def start(self, seed: list[list[str]] | None = None) -> None:
        """Apply the stored configuration (or the seed commands, on an empty store)."""
        from .commands import run_command
        if self.store.is_empty() and seed:
            for argv in seed:
                await run_command(self, argv)
        else:
            await self._restore()
        self._timer = asyncio.get_running_loop().create_task(self._tick())

    async def _restore(self) -> None:
        for name in self.store.bridges():
            self.add_bridge(name, persist=False, default_flow=False)
        for name, bridge, type_, opts in self.store.ports():
            await self.add_port(bridge, name, type_, opts.get("path"), opts.get("queues"),
                                persist=False)
        for name in self.bridges:
            for text in self.store.flows(name):
                self.add_flow(name, parse_flow(text), persist=False)
        for port, (pkbps, pburst, max_rate) in self.store.qos().items():
            if port in self.ports:
                self.set_policing(port, pkbps, pburst, persist=False)
                self.set_qos(port, max_rate, persist=False)

    async def stop(self) -> None:
        if self._timer:
            self._timer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._timer
        self.pmds.stop()
        for port in list(self.ports.values()):
            await port.endpoint.close()
        self.store.close()

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            try:
                self.pmds.sample()
                for bridge in list(self.bridges.values()):
                    bridge.expire()
            except Exception:
                log.exception("periodic work failed")

    # -- slow path (PMD thread, GIL held) -------------------------------------------------
    def _upcall(self, raw_key: bytes):
        key = key_dict(raw_key)
        port = self._by_id.get(key["in_port"])
        if port is None:
            return None
        bridge = self.bridges.get(port.bridge)
        if bridge is None:
            return None
        slot, ops, fields = bridge.classify(key, port)
        return slot, ops, _mask(fields)

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
        if name in self.bridges:
            raise CommandError(f"bridge {name} already exists")
        if name in self.ports:
            raise CommandError(f"{name} is a port name")
        used = {b.bridge_id for b in self.bridges.values()}
        bid = next(i for i in range(len(used) + 1) if i not in used)
        self.bridges[name] = Bridge(name, bid, self.datapath.invalidate)
        if persist:
            self.store.add_bridge(name)
        if default_flow:
            self.add_flow(name, parse_flow(DEFAULT_FLOW), persist=persist)

    async def del_bridge(self, name: str) -> None:
        bridge = self._bridge(name)
        for port in list(bridge.ports):
            await self.del_port(port, persist=False)
        for rule in bridge.rules:
            self._free_slots.append(rule.slot)
        del self.bridges[name]
        self.store.del_bridge(name)
        self.datapath.invalidate()

    async def add_port(self, bridge_name: str, name: str, type_: str, path: str | None,
                       queues: int | None, persist: bool = True) -> None:
        bridge = self._bridge(bridge_name)
        if name in self.ports or name in self.bridges:
            raise CommandError(f"port {name} already exists")
        if type_ == "vhostuserclient" and not path:
            raise CommandError("type=vhostuserclient needs path= (the front-end's socket)")
        path = path or str(self.run_dir / f"{name}.sock")
        queues = queues or DEFAULT_QUEUES
        used = set(self._by_id)
        port_id = next((i for i in range(LIMITS["ports"]) if i not in used), None)
        if port_id is None:
            raise CommandError("no free port id")
        try:
            port = Port.create(name, bridge_name, type_, path, queues, port_id,
                               bridge.next_ofport())
        except ValueError as e:
            raise CommandError(str(e)) from None
        port.device.listeners.append(self.datapath.wake_all)
        self.datapath.add_port(port_id, bridge.bridge_id, port.rx_vqs(), port.tx_vqs())
        self.ports[name] = port
        self._by_id[port_id] = port
        bridge.attach(port)
        try:
            await port.endpoint.start()
        except OSError as e:
            await self.del_port(name, persist=False)
            raise CommandError(f"port {name}: {e}") from None
        self._assign()
        if persist:
            self.store.add_port(name, bridge_name, type_, port.options())
        log.info("port %s (%s, %s) added to %s", name, type_, path, bridge_name)

    async def del_port(self, name: str, bridge_name: str | None = None,
                       persist: bool = True) -> None:
        port = self._port(name)
        if bridge_name is not None and port.bridge != bridge_name:
            raise CommandError(f"port {name} is not on bridge {bridge_name}")
        del self.ports[name]
        del self._by_id[port.port_id]
        self.bridges[port.bridge].detach(port)
        self._assign()
        try:
            self.datapath.remove_port(port.port_id)     # waits until no PMD can be inside it
        except TimeoutError as e:
            # a PMD is stuck: keep the port's memory (never unmap under it), close the socket
            log.error("port %s: %s; its rings stay mapped", name, e)
            self._stuck_ports.append(port)
            port.endpoint.connection = None
        await port.endpoint.close()
        if persist:
            self.store.del_port(name)

    def _assign(self) -> None:
        self.pmds.set_rxqs([(p.port_id, q) for p in self.ports.values()
                            for q in range(p.queues)])

    # -- rules ----------------------------------------------------------------------------
    def add_flow(self, bridge_name: str, flow: Flow, persist: bool = True) -> None:
        bridge = self._bridge(bridge_name)
        if not self._free_slots:
            raise CommandError("rule table full")
        slot = self._free_slots.pop()
        for pmd in self.pmds.pmds:
            pmd.reset_rule(slot)
        try:
            bridge.add_rule(flow, slot, time.monotonic())
        except ValueError as e:
            self._free_slots.append(slot)
            raise CommandError(str(e)) from None
        if persist:
            self._persist_flows(bridge)

    def del_flows(self, bridge_name: str, pattern: dict | None) -> None:
        bridge = self._bridge(bridge_name)
        for rule in bridge.remove_rules(pattern):
            self._free_slots.append(rule.slot)
        self._persist_flows(bridge)

    def _persist_flows(self, bridge: Bridge) -> None:
        self.store.set_flows(bridge.name, [r.flow.format() for r in
                                           sorted(bridge.rules, key=lambda r: r.seq)])

    def rule_counters(self, slot: int) -> tuple[int, int]:
        packets = bytes_ = 0
        for pmd in self.pmds.pmds:
            p, b = pmd.rule_counters(slot)
            packets += p
            bytes_ += b
        return packets, bytes_

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
    def set_pmd(self, **settings) -> None:
        for k, v in settings.items():
            self.pmd_settings[k] = v
            self.store.set_setting(k, v)
        self.pmds.stop()
        self.pmds = self._new_pmds()
        self._assign()

    # -- reports --------------------------------------------------------------------------
    def show(self) -> str:
        lines = []
        for name, bridge in self.bridges.items():
            lines.append(f"Bridge {name}")
            for pname, port in sorted(bridge.ports.items(), key=lambda kv: kv[1].ofport):
                state = "connected" if port.connected else "not connected"
                lines.append(f"    Port {pname} (ofport {port.ofport})")
                lines.append(f"        type: {port.type}  path: {port.path}  "
                             f"queues: {port.queues}  {state}")
        return "\n".join(lines)

    def dump_flows(self, bridge_name: str) -> str:
        bridge = self._bridge(bridge_name)
        now = time.monotonic()
        out = []
        for rule in bridge.rules:
            packets, bytes_ = self.rule_counters(rule.slot)
            text = rule.flow.format()
            out.append(f" duration={now - rule.created:.3f}s, n_packets={packets}, "
                       f"n_bytes={bytes_}, {text.replace(',actions=', ' actions=')}")
        return "\n".join(out)

    def port_counters(self, port: Port) -> dict:
        stats = self.datapath.port_stats(port.port_id)
        for ring in port.device.rings:
            s = ring.vq.stats()
            for k in ("drop_bad_desc", "drop_oversize", "ring_errors", "drop_no_mbuf"):
                stats[k] = stats.get(k, 0) + s[k]
        return stats

    def dump_ports(self, bridge_name: str) -> str:
        bridge = self._bridge(bridge_name)
        out = [f"{bridge_name}: {len(bridge.ports)} ports"]
        for name, port in sorted(bridge.ports.items(), key=lambda kv: kv[1].ofport):
            s = self.port_counters(port)
            rx_drop = s["drop_police"] + s["drop_bad_desc"] + s["drop_oversize"]
            tx_drop = s["drop_qos"] + s["drop_tx_full"]
            out.append(f"  port {port.ofport}({name}): rx pkts={s['rx_packets']}, "
                       f"bytes={s['rx_bytes']}, drop={rx_drop} (police={s['drop_police']}, "
                       f"bad_desc={s['drop_bad_desc']}, oversize={s['drop_oversize']}), "
                       f"errors={s['ring_errors']}")
            out.append(f"           tx pkts={s['tx_packets']}, bytes={s['tx_bytes']}, "
                       f"drop={tx_drop} (qos={s['drop_qos']}, full={s['drop_tx_full']}), "
                       f"action_drop={s['drop_action']}")
            for q in range(port.queues):
                rx = port.device.tx_ring(q).vq.stats()       # the guest's TX is our RX
                tx = port.device.rx_ring(q).vq.stats()
                if rx["packets"] or tx["packets"]:
                    out.append(f"           queue {q}: rx pkts={rx['packets']}, "
                               f"tx pkts={tx['packets']}, no_buffer={tx['drop_no_buffer']}")
        return "\n".join(out)

    def fdb_show(self, bridge_name: str) -> str:
        bridge = self._bridge(bridge_name)
        rows = [" port  VLAN  MAC                Age"]
        for port, vlan, mac, age in bridge.fdb_rows():
            rows.append(f"{port:>5} {vlan:5}  {mac}  {age:4}")
        return "\n".join(rows)

    def pmd_rxq_show(self) -> str:
        loads = self.pmds.loads()
        total = sum(loads.values()) or 1
        out = []
        for i, pmd in enumerate(self.pmds.pmds):
            cpus = self.pmd_settings["cpus"]
            cpu = cpus[i % len(cpus)] if cpus else "any"
            out.append(f"pmd thread {i} (cpu {cpu}):")
            for port_id, q in pmd.rxqs():
                port = self._by_id.get(port_id)
                if port is None:
                    continue
                state = "enabled" if port.queue_enabled(q) else "disabled"
                usage = 100 * loads.get((port_id, q), 0) // total
                out.append(f"  port: {port.name:<12} queue-id: {q:2} ({state:>8})  "
                           f"pmd usage: {usage:3d} %")
        return "\n".join(out)

    def pmd_stats_show(self) -> str:
        out = []
        for i, pmd in enumerate(self.pmds.pmds):
            s = pmd.stats()
            cycles = s["busy_ns"] + s["idle_ns"] or 1
            per_burst = s["packets"] / s["bursts"] if s["bursts"] else 0.0
            out += [f"pmd thread {i}:",
                    f"  packets received: {s['packets']}",
                    f"  avg. packets per burst: {per_burst:.2f}",
                    f"  emc hits: {s['emc_hits']}",
                    f"  emc misses: {s['emc_misses']}",
                    f"  upcalls: {s['upcalls']} (dropped: {s['upcall_drops']})",
                    f"  idle cycles: {s['idle_ns']} ({100 * s['idle_ns'] / cycles:.2f}%)",
                    f"  processing cycles: {s['busy_ns']} ({100 * s['busy_ns'] / cycles:.2f}%)",
                    f"  sleeps: {s['sleeps']}"]
        return "\n".join(out)


