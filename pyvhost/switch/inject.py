"""Frames the control plane sends into a bridge (OpenFlow's PACKET_OUT): as if received on
a port (or from no port), run through given actions or through the bridge's tables
(OFPP_TABLE), on the control thread. The datapath does the work (``Pmd.inject`` of a PMD
object no thread runs: its own packet buffers, the same execute/output/flush as the poll
loops); this module only turns model actions into runs of datapath ops. No OpenFlow
encoding here, no rule changes."""

from __future__ import annotations

from pyvhost._flow import vlan_edit
from pyvhost._pktpool import PacketPool
from pyvhost._switch import Pmd

INJECT_PMD_ID = 0x7FFF      # the TX queue hint of injected frames (tx bursts lock their queue)
INJECT_BUFFERS = 64         # a flood copies the frame once per port
INJECT_BUF_SIZE = 65600
VNET_NONE = bytes(12)


class InjectError(ValueError):
    """A frame that cannot be sent as asked (too long, a port or bridge that is gone)."""


class Injector:
    def __init__(self, datapath):
        self.pmd = Pmd(datapath, INJECT_PMD_ID, PacketPool(INJECT_BUFFERS, INJECT_BUF_SIZE), 1)
        self.sent = 0

    def send(self, bridge, in_port_id: int, frame: bytes, actions: tuple) -> None:
        """``actions`` as the rule model has them, plus ("table",): the frame as it is at
        that point goes through the bridge's tables. ``in_port_id``: a port id of the
        bridge, or -1. Actions run in order, a VLAN edit changes what later ones send."""
        run: list[tuple] = []
        pending = frame                  # the frame with every edit so far applied
        try:
            for a in actions:
                if a[0] == "table":
                    self._run(bridge, in_port_id, frame, run)
                    run, frame = [], pending
                    self.pmd.inject(bridge.bridge_id, in_port_id, frame, None)
                    continue
                if a[0] in ("mod_vlan_vid", "strip_vlan"):
                    pending, _ = vlan_edit(pending, VNET_NONE,
                                           a[1] if a[0] == "mod_vlan_vid" else -1)
                run.append(a)
            self._run(bridge, in_port_id, frame, run)
        except (KeyError, ValueError, MemoryError) as e:
            raise InjectError(str(e)) from None
        self.sent += 1

    def _run(self, bridge, in_port_id: int, frame: bytes, run: list[tuple]) -> None:
        ops = bridge.action_ops(tuple(run))
        if any(a[0] not in ("mod_vlan_vid", "strip_vlan") for a in run):
            self.pmd.inject(bridge.bridge_id, in_port_id, frame, ops)
