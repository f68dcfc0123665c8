"""The switch's side of OpenFlow's asynchronous messages: frames from the datapath's
controller queue become PACKET_INs to every connected controller of their bridge (reason
NO_MATCH for a table-miss rule, else ACTION; the rule's table and cookie; the input port
as the match); the switch's observers' events become PORT_STATUS (a port added or
deleted; its link, looked at once a second, changed) and FLOW_REMOVED (a rule FLOW_MOD
gave SEND_FLOW_REM timed out, idle or hard, or was deleted, with its last counters).
Bounded all the way: the compiled queue drops and counts what does not fit
(PUNT_SLOTS frames, a rate in frames per second, a busy lock), a drain takes at most
DRAIN_MOST frames per turn of the event loop, and a controller that does not read gets no
more until it has (``Connection.send_async`` drops and counts). Runs on the switch's
asyncio loop; owns the queue and the injector (PACKET_OUT). May use the switch's bridges
and ports, never changes them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from pyvhost._punt import NO_RULE, PuntQueue
from pyvhost.switch.flows import canonical_head
from pyvhost.switch.inject import Injector

from . import asyncmsg as AM
from . import codec as C
from . import multipart as M
from . import oxm

log = logging.getLogger("pyvhost.openflow")
DRAIN_MOST = 64
LINK_EVERY = 1.0          # seconds between two looks at the ports' links
SEND_FLOW_REM = 1
NO_PACKET_IN = 0x40                                # OFPPC_NO_PACKET_IN


class Events:
    def __init__(self, openflow):
        self.of = openflow
        self.switch = openflow.switch
        self.queue: PuntQueue | None = None
        self._injector: Injector | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.packet_ins = 0            # PACKET_INs handed to connections
        self.no_controller = 0         # frames no connected controller wanted or took
        self.unknown = 0               # frames of a bridge or port that went away
        self.links: dict[tuple[str, str], bool] = {}     # (bridge, port) -> link up
        self._watch: asyncio.Task | None = None
        self._holding: list | None = None   # while draining: connections holding PACKET_INs

    def start(self) -> None:
        """Take frames from the datapath (once; on the running loop)."""
        if self.queue is not None:
            return
        self.loop = asyncio.get_running_loop()
        self.queue = PuntQueue()
        self.switch.datapath.set_punt(self.queue)
        self.loop.add_reader(self.queue.fd, self._drain)
        self.switch.observers.append(self._observe)
        self.links = {(p.bridge, p.name): p.connected for p in self.switch.ports.values()}
        self._watch = self.loop.create_task(self._watch_links(), name="openflow:links")

    @property
    def injector(self) -> Injector:
        """PACKET_OUT's way into the datapath (made on the first one: ~6 MB of buffers)."""
        if self._injector is None:
            self._injector = Injector(self.switch.datapath)
        return self._injector

    def close(self) -> None:
        if self.queue is None:
            return
        with contextlib.suppress(Exception):
            self.loop.remove_reader(self.queue.fd)
        with contextlib.suppress(ValueError):
            self.switch.observers.remove(self._observe)
        if self._watch is not None:
            self._watch.cancel()
        self.switch.datapath.set_punt(None)
        self.queue = None

    def _send(self, bridge_name: str, msg_type: int, reason: int, message: bytes) -> int:
        """``message`` (xid 0, as OVS sends asynchronous messages) to every connection of
        the bridge that wants ``msg_type`` for ``reason``; how many took it."""
        b = self.of.bridges.get(bridge_name)
        sent = 0
        for conn in [c for c in b.connections if c.wants(msg_type, reason)] if b else []:
            if self._holding is not None and not conn.holding:
                conn.hold()
                self._holding.append(conn)
            sent += conn.send_async(message)
        return sent

    def invalid_ttl_changed(self, bridge_name: str) -> None:
        """A connection came, went, or changed its role or SET_ASYNC: the datapath punts
        TTL-expired frames of the bridge only while one of them wants INVALID_TTL."""
        bridge = self.switch.bridges.get(bridge_name)
        if bridge is None:
            return
        b = self.of.bridges.get(bridge_name)
        on = b is not None and any(c.wants(C.PACKET_IN, AM.OFPR_INVALID_TTL)
                                   for c in b.connections)
        try:
            self.switch.datapath.set_invalid_ttl_punt(bridge.bridge_id, on)
        except KeyError:                    # (the bridge is going)
            pass

    # -- PORT_STATUS, FLOW_REMOVED ----------------------------------------------------------
    def _observe(self, kind: str, **info) -> None:
        if kind in ("port_added", "port_removed"):
            port = info["port"]
            added = kind == "port_added"
            key = (port.bridge, port.name)
            if added:
                self.links[key] = port.connected
            else:
                self.links.pop(key, None)
            self.port_status(port, AM.OFPPR_ADD if added else AM.OFPPR_DELETE)
            state = self.of._states.get(port.bridge)
            if state is not None:                   # a port that comes again starts afresh
                state.port_config.pop(port.name, None)
        elif kind == "rules_removed":
            self.flows_removed(info["bridge"], info["removed"], info["reason"])

    def _port_config(self, bridge_name: str, port_name: str) -> int:
        state = self.of._states.get(bridge_name)
        return state.port_config.get(port_name, 0) if state is not None else 0

    def port_status(self, port, reason: int) -> None:
        desc = M.port_desc(port.ofport, port.name, up=port.connected and reason !=
                           AM.OFPPR_DELETE, config=self._port_config(port.bridge, port.name))
        self._send(port.bridge, C.PORT_STATUS, reason, AM.port_status(0, reason, desc))

    async def _watch_links(self) -> None:
        while True:
            await asyncio.sleep(LINK_EVERY)
            try:
                for port in list(self.switch.ports.values()):
                    key = (port.bridge, port.name)
                    up = port.connected
                    if key in self.links and self.links[key] != up:
                        self.port_status(port, AM.OFPPR_MODIFY)
                    self.links[key] = up
                for bridge in list(self.switch.bridges.values()):
                    if bridge.groups is not None:
                        bridge.groups.refresh()         # FAST_FAILOVER's watch ports
            except Exception:
                log.exception("openflow: watching the ports' links failed")

    def flows_removed(self, bridge, removed: list, reason: str,
                      flags: list[int] | None = None) -> None:
        """FLOW_REMOVED for each removed rule that asked for it (``removed``: (rule, its
        last counters)); ``reason`` "timeout" (idle or hard, as the rule's times say) or
        "delete"; ``flags``: the rules' flags when the caller has them (and has dropped
        them from the bridge's OpenFlow state; else the state has them, dropped here).
        Only those rules' texts are parsed (rule.flow): a del-flows of 100k rules nobody
        asked about parses none."""
        state = self.of._states.get(bridge.name)
        now = time.monotonic()
        for i, (rule, (packets, bytes_, _used)) in enumerate(removed):
            if flags is not None:                  # (the caller dropped them: a rule
                f = flags[i]                       # since added may have the id now)
            else:
                f = state.flags_of(rule) if state else 0
                if state is not None:
                    state.rule_flags.pop(rule.id, None)
            if not f & SEND_FLOW_REM:
                continue
            flow = rule.flow
            age = now - rule.created
            if reason == "delete":
                why = AM.OFPRR_DELETE
            elif reason == "group_delete":
                why = AM.OFPRR_GROUP_DELETE
            elif flow.hard_timeout and age >= flow.hard_timeout:
                why = AM.OFPRR_HARD_TIMEOUT
            else:
                why = AM.OFPRR_IDLE_TIMEOUT
            match = oxm.encode(flow.match, bridge.ofport_number)
            self._send(bridge.name, C.FLOW_REMOVED, why, AM.flow_removed(
                0, flow.cookie, flow.priority, why, flow.table, int(age * 1e9),
                flow.idle_timeout, flow.hard_timeout, packets, bytes_, match))

    # -- PACKET_IN ------------------------------------------------------------------------
    def _drain(self) -> None:
        """The waiting frames as PACKET_INs; each connection's are written together, in
        one send (nothing else runs in between: no other message can come between them)."""
        held: list = []
        self._holding = held
        try:
            for rec in self.queue.pop(DRAIN_MOST):
                self._packet_in(rec)
        except Exception:                   # never let the reader callback die
            log.exception("openflow: PACKET_IN delivery failed")
        finally:
            self._holding = None
            for conn in held:
                conn.release()

    def _bridge_of(self, bridge_id: int):
        for b in self.switch.bridges.values():
            if b.bridge_id == bridge_id:
                return b
        return None

    def _packet_in(self, rec: dict) -> None:
        bridge = self._bridge_of(rec["bridge"])
        if bridge is None:
            self.unknown += 1
            return
        b = self.of.bridges.get(bridge.name)
        if b is None or not b.connections:
            self.no_controller += 1
            return
        if rec["in_port"] == 0xFFFF:
            ofport = C.OFPP_CONTROLLER
        else:
            port = self.switch._by_id.get(rec["in_port"])
            if port is None or port.bridge != bridge.name:
                self.unknown += 1
                return
            ofport = port.ofport
            if self._port_config(bridge.name, port.name) & NO_PACKET_IN:
                self.no_controller += 1             # PORT_MOD no-packet-in
                return
        reason, cookie = AM.OFPR_ACTION, AM.NO_COOKIE
        rule = bridge.rules.get(rec["rule_id"]) if rec["rule_id"] != NO_RULE else None
        if rule is not None:
            table, priority, rule_cookie, has_match = canonical_head(rule.text)
            if table == rec["table"] and priority == rec["priority"]:
                cookie = rule_cookie
                if priority == 0 and not has_match:            # the table-miss rule
                    reason = AM.OFPR_NO_MATCH
        if rec.get("invalid_ttl"):                 # dec_nw_ttl: sent only where SET_ASYNC
            reason = AM.OFPR_INVALID_TTL           # asked for it (not by default)
        sent = self._send(bridge.name, C.PACKET_IN, reason, AM.packet_in(
            0, rec["total_len"], reason, rec["table"], cookie, ofport, rec["data"]))
        self.packet_ins += sent
        if not sent:                    # none wanted it (roles, SET_ASYNC) or could take it
            self.no_controller += 1

    def stats(self) -> dict:
        out = dict(self.queue.stats()) if self.queue is not None else {}
        out.update({"packet_ins": self.packet_ins, "no_controller": self.no_controller,
                    "unknown": self.unknown})
        return out
