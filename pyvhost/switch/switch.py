"""The switch: bridges, ports, rules, QoS and PMD threads over one compiled datapath, with
its configuration kept in the run directory's store and applied again on start.

Control methods run on the asyncio thread; PMD threads never call back into Python (the
classifier and the MAC table they use are compiled). Commands parse in switch.commands;
this module applies them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path

from pyvhost._flow import KEY_FIELDS, key_dict
from pyvhost._switch import Datapath, limits

from .bridge import DEFAULT_MAC_AGING, DEFAULT_MAC_TABLE_SIZE, Bridge, Rule
from .commands import CommandError
from .flows import Flow, FlowSyntaxError, Selector, parse_flow
from .pmd import PmdSet
from .port import DEFAULT_QUEUES, Port
from .store import Store

log = logging.getLogger("pyvhost.switch")
LIMITS = limits()
DEFAULT_FLOW = "priority=0,actions=normal"
LOG_EVERY = 10.0          # seconds between two log lines about the same kind of event


def masked_fields(mask: bytes) -> list[str]:
    """The names of the key fields a raw mask keeps (any bit of them)."""
    wild = key_dict(mask)
    return [k for k in KEY_FIELDS
            if (any(wild[k]) if isinstance(wild[k], bytes) else wild[k])]


def kbps_to_bytes(kbps: int) -> int:
    return kbps * 1000 // 8


class Switch:
    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.store = Store(self.run_dir / "conf.db")
        self.datapath = Datapath()
        self.bridges: dict[str, Bridge] = {}
        self.ports: dict[str, Port] = {}
        self._by_id: dict[int, Port] = {}
        settings = self.store.settings()
        self.pmd_settings = {"threads": settings.get("threads", 1),
                             "assign": settings.get("assign", "roundrobin"),
                             "auto_lb": settings.get("auto_lb", False),
                             "cpus": settings.get("cpus", []),
                             "flow_limit": settings.get("flow_limit")}
        self._damped_seen: dict[str, int] = {}
        self._last_log: dict[str, float] = {}
        self.pmds = self._new_pmds()
        self._timer: asyncio.Task | None = None
        self._stuck_ports: list[Port] = []

    def _new_pmds(self) -> PmdSet:
        s = self.pmd_settings
        return PmdSet(self.datapath, s["threads"], s["cpus"], s["assign"], s["auto_lb"],
                      s["flow_limit"])

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
        for name, bridge in self.bridges.items():
            flows, rows = [], []
            for row, text in self.store.flows(name):
                try:
                    flow = parse_flow(text)
                    bridge.check(flow)
                except (FlowSyntaxError, ValueError) as e:
                    log.error("bridge %s: stored flow %r skipped: %s", name, text, e)
                    continue
                flows.append(flow)
                rows.append(row)
            for rule, row in zip(bridge.apply(add=flows), rows, strict=True):
                rule.row = row
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
                self.periodic()
            except Exception as e:
                self._log_once("tick", "periodic work failed: %s", e)

    def periodic(self, now_ns: int | None = None) -> None:
        """Once a second: PMD load samples, MAC aging, rule timeouts, flapping MACs."""
        now_ns = time.monotonic_ns() if now_ns is None else now_ns
        self.pmds.sample()
        for bridge in list(self.bridges.values()):
            bridge.macs.expire()
            gone = bridge.expired(now_ns)
            if gone:
                self._change(bridge, remove=gone)
            damped = bridge.macs.stats()["damped"]
            if damped > self._damped_seen.get(bridge.name, 0):
                vlan, mac = bridge.macs.last_damped()
                self._log_once(f"flap:{bridge.name}", "bridge %s: MAC %s (VLAN %d) is flapping "
                               "between ports; %d moves ignored so far", bridge.name,
                               mac.hex(":"), vlan, damped)
                self._damped_seen[bridge.name] = damped

    def _log_once(self, kind: str, fmt: str, *args) -> None:
        """A log line per kind of event per LOG_EVERY seconds, never one per packet."""
        now = time.monotonic()
        if now - self._last_log.get(kind, -LOG_EVERY) >= LOG_EVERY:
            self._last_log[kind] = now
            log.warning(fmt, *args)

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
        if bid >= LIMITS["bridges"]:
            raise CommandError(f"at most {LIMITS['bridges']} bridges")
        conf = self.store.settings().get(f"bridge:{name}", {})
        bridge = Bridge(name, bid, conf.get("mac_table_size", DEFAULT_MAC_TABLE_SIZE),
                        conf.get("mac_aging", DEFAULT_MAC_AGING))
        self.datapath.set_bridge(bid, bridge.cls, bridge.macs)
        self.bridges[name] = bridge
        if persist:
            self.store.add_bridge(name)
        if default_flow:
            self.add_flows(name, [parse_flow(DEFAULT_FLOW)], persist=persist)

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
        conf = self.store.settings().get(key, {})
        conf.update({"mac_table_size": bridge.macs.size, "mac_aging": bridge.macs.aging})
        self.store.set_setting(key, conf)

    async def del_bridge(self, name: str) -> None:
        bridge = self._bridge(name)
        for port in list(bridge.ports):
            await self.del_port(port, persist=False)
        del self.bridges[name]
        self.datapath.remove_bridge(bridge.bridge_id)      # waits out the PMDs
        self.store.del_bridge(name)

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
        limit = self.store.settings().get(f"port:{name}", {}).get("mac_limit")
        if limit:
            bridge.mac_limits[name] = limit
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
    def _change(self, bridge: Bridge, add: list[Flow] = (), remove: list[Rule] = (),
                modify: list[tuple[Rule, Flow]] = (), persist: bool = True) -> list[Rule]:
        """Apply one all-or-nothing change to a bridge's rules and its store rows."""
        for flow in add:
            try:
                bridge.check(flow)
            except ValueError as e:
                raise CommandError(str(e)) from None
        rows = [r.row for r in remove]
        try:
            added = bridge.apply(add=add, remove=remove, modify=modify)
        except ValueError as e:
            raise CommandError(str(e)) from None
        if remove:
            self._reclaim(bridge)
        if persist:
            new_rows = self.store.change_flows(bridge.name, [r.flow.format() for r in added],
                                               rows, [(r.row, f.format()) for r, f in modify])
            for rule, row in zip(added, new_rows, strict=True):
                rule.row = row
        return added

    def _reclaim(self, bridge: Bridge) -> None:
        """Free removed rules once no PMD can still be counting into them."""
        try:
            self.datapath.synchronize()
        except TimeoutError as e:
            log.error("bridge %s: removed rules kept in memory: %s", bridge.name, e)
            return
        bridge.cls.reclaim()

    def add_flow(self, bridge_name: str, flow: Flow, persist: bool = True) -> None:
        self.add_flows(bridge_name, [flow], persist)

    def add_flows(self, bridge_name: str, flows: list[Flow], persist: bool = True) -> int:
        """Add rules; one with the table, priority and match of an existing rule (or of an
        earlier line) replaces it, as OpenFlow's ADD does. All or nothing."""
        bridge = self._bridge(bridge_name)
        latest: dict[tuple, Flow] = {}
        for flow in flows:
            latest[flow.identity()] = flow
        replaced = [r for r in (bridge.find(f) for f in latest.values()) if r is not None]
        self._change(bridge, add=list(latest.values()), remove=replaced, persist=persist)
        return len(latest)

    def replace_flows(self, bridge_name: str, flows: list[Flow]) -> dict:
        """Make the bridge's rules exactly ``flows``, touching only what differs: rules in
        both with the same actions, cookie and timeouts stay as they are (counters run
        on), changed actions are modified in place, the rest is deleted or added."""
        bridge = self._bridge(bridge_name)
        wanted: dict[tuple, Flow] = {}
        for flow in flows:
            wanted[flow.identity()] = flow
        remove, modify, keep = [], [], set()
        for rule in bridge.rules.values():
            want = wanted.get(rule.flow.identity())
            if want is None:
                remove.append(rule)
            elif want.format() == rule.flow.format():
                keep.add(rule.flow.identity())
            elif (want.cookie, want.idle_timeout, want.hard_timeout) == \
                    (rule.flow.cookie, rule.flow.idle_timeout, rule.flow.hard_timeout):
                modify.append((rule, want))          # new actions: counters run on
                keep.add(rule.flow.identity())
            else:
                remove.append(rule)                  # the rule itself changed: a new one
        add = [f for k, f in wanted.items() if k not in keep]
        self._change(bridge, add=add, remove=remove, modify=modify)
        return {"added": len(add), "deleted": len(remove), "modified": len(modify)}

    def del_flows(self, bridge_name: str, selector: Selector | None,
                  strict: bool = False) -> int:
        bridge = self._bridge(bridge_name)
        gone = bridge.select(selector, strict)
        self._change(bridge, remove=gone)
        return len(gone)

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

    def dump_flows(self, bridge_name: str, selector: Selector | None = None,
                   stats: bool = True) -> str:
        """ovs-ofctl dump-flows: the selected rules, table and priority order."""
        bridge = self._bridge(bridge_name)
        now = time.monotonic()
        now_ns = time.monotonic_ns()
        out = []
        for rule in bridge.select(selector):
            if not stats:
                out.append(f" {rule.flow.format_spec()}")
                continue
            packets, bytes_, used = bridge.counters(rule)
            f = rule.flow
            parts = [f"cookie=0x{f.cookie:x}", f"duration={now - rule.created:.3f}s",
                     f"table={f.table}", f"n_packets={packets}", f"n_bytes={bytes_}"]
            if f.idle_timeout:
                parts.append(f"idle_timeout={f.idle_timeout}")
            if f.hard_timeout:
                parts.append(f"hard_timeout={f.hard_timeout}")
            if used:
                parts.append(f"idle_age={(now_ns - used) // 1_000_000_000}")
            out.append(" " + ", ".join(parts) + ", " + f.format_body())
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
            rx_drop += s["drop_upcall"]
            out.append(f"  port {port.ofport}({name}): rx pkts={s['rx_packets']}, "
                       f"bytes={s['rx_bytes']}, drop={rx_drop} (police={s['drop_police']}, "
                       f"bad_desc={s['drop_bad_desc']}, oversize={s['drop_oversize']}, "
                       f"upcall_limit={s['drop_upcall']}), "
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
                    f"  megaflow hits: {s['megaflow_hits']} "
                    f"(avg. subtable lookups per hit: {s['subtables_per_hit']:.2f})",
                    f"  megaflows: {s['megaflows']} in {s['megaflow_masks']} masks "
                    f"(limit {s['megaflow_limit']}, evicted {s['megaflow_evictions']})",
                    f"  upcalls: {s['upcalls']} (dropped: {s['upcall_drops']}, "
                    f"over a port's share: {s['upcall_throttled']}, "
                    f"{s['upcall_ns'] // max(s['upcalls'], 1)} ns each)",
                    f"  idle cycles: {s['idle_ns']} ({100 * s['idle_ns'] / cycles:.2f}%)",
                    f"  processing cycles: {s['busy_ns']} ({100 * s['busy_ns'] / cycles:.2f}%)",
                    f"  sleeps: {s['sleeps']}"]
        return "\n".join(out)


