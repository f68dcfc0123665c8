"""The switch's side of OpenFlow's asynchronous messages: frames from the datapath's
controller queue become PACKET_INs to every connected controller of their bridge (reason
NO_MATCH for a table-miss rule, else ACTION; the rule's table and cookie; the input port
as the match). Bounded all the way: the compiled queue drops and counts what does not fit
(PUNT_SLOTS frames, a rate in frames per second, a busy lock), a drain takes at most
DRAIN_MOST frames per turn of the event loop, and a controller that does not read gets no
more until it has (``Connection.send_async`` drops and counts). Runs on the switch's
asyncio loop; owns the queue and the injector (PACKET_OUT). May use the switch's bridges
and ports, never changes them."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from pyvhost._punt import NO_RULE, PuntQueue
from pyvhost.switch.inject import Injector

from . import asyncmsg as AM
from . import codec as C

log = logging.getLogger("pyvhost.openflow")
DRAIN_MOST = 64


class Events:
    def __init__(self, openflow):
        self.of = openflow
        self.switch = openflow.switch
        self.queue: PuntQueue | None = None
        self.injector: Injector | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.packet_ins = 0            # PACKET_INs handed to connections
        self.no_controller = 0         # frames for a bridge no controller is connected to
        self.unknown = 0               # frames of a bridge or port that went away

    def start(self) -> None:
        """Take frames from the datapath (once; on the running loop)."""
        if self.queue is not None:
            return
        self.loop = asyncio.get_running_loop()
        self.queue = PuntQueue()
        self.injector = Injector(self.switch.datapath)
        self.switch.datapath.set_punt(self.queue)
        self.loop.add_reader(self.queue.fd, self._drain)

    def close(self) -> None:
        if self.queue is None:
            return
        with contextlib.suppress(Exception):
            self.loop.remove_reader(self.queue.fd)
        self.switch.datapath.set_punt(None)
        self.queue = None

    # -- PACKET_IN ------------------------------------------------------------------------
    def _drain(self) -> None:
        try:
            for rec in self.queue.pop(DRAIN_MOST):
                self._packet_in(rec)
        except Exception:                   # never let the reader callback die
            log.exception("openflow: PACKET_IN delivery failed")

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
        conns = [c for c in b.connections if c.wants(C.PACKET_IN)] if b else []
        if not conns:
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
        reason, cookie = AM.OFPR_ACTION, AM.NO_COOKIE
        rule = bridge.rules.get(rec["rule_id"]) if rec["rule_id"] != NO_RULE else None
        if rule is not None:
            flow = rule.flow
            if flow.table == rec["table"] and flow.priority == rec["priority"]:
                cookie = flow.cookie
                if flow.priority == 0 and not flow.match:     # the table-miss rule
                    reason = AM.OFPR_NO_MATCH
        for conn in conns:
            msg = AM.packet_in(conn.next_xid(), rec["total_len"], reason, rec["table"],
                               cookie, ofport, rec["data"])
            if conn.send_async(msg):
                self.packet_ins += 1

    def stats(self) -> dict:
        out = dict(self.queue.stats()) if self.queue is not None else {}
        out.update({"packet_ins": self.packet_ins, "no_controller": self.no_controller,
                    "unknown": self.unknown})
        return out
