"""Frames the control plane sends into a bridge (OpenFlow's PACKET_OUT): as if received on
a port (or from no port), run through given actions or through the bridge's tables
(OFPP_TABLE), on the control thread. The datapath does the work (``Pmd.inject`` of a PMD
object no thread runs: its own packet buffers, the same execute/output/flush as the poll
loops); this module only turns model actions into runs of datapath ops, and keeps the frame
as the actions so far left it (VLAN and header edits, as the datapath makes them) for a
TABLE that follows, as OVS runs a packet-out's actions on the packet before resubmitting it
to table 0. No OpenFlow encoding here, no rule changes."""

from __future__ import annotations

from pyvhost._edit import edit_frame
from pyvhost._flow import vlan_edit
from pyvhost._pktpool import PacketPool
from pyvhost._switch import Pmd

INJECT_PMD_ID = 0x7FFF      # the TX queue hint of injected frames (tx bursts lock their queue)
INJECT_BUFFERS = 64         # a flood copies the frame once per port
INJECT_BUF_SIZE = 65600
VNET_NONE = bytes(12)
ONLY_EDITS = ("mod_vlan_vid", "strip_vlan", "set_field")
# set_field's fields as the datapath's header edits name them
EDITS = {"eth_src": "eth_src", "eth_dst": "eth_dst", "vlan_pcp": "vlan_pcp",
         "ip_src": "ip_src", "ip_dst": "ip_dst", "ip_dscp": "ip_dscp", "tcp_src": "tp_src",
         "udp_src": "tp_src", "tcp_dst": "tp_dst", "udp_dst": "tp_dst"}


class InjectError(ValueError):
    """A frame that cannot be sent as asked (too long, a port or bridge that is gone)."""


class Injector:
    def __init__(self, datapath):
        self.pmd = Pmd(datapath, INJECT_PMD_ID, PacketPool(INJECT_BUFFERS, INJECT_BUF_SIZE), 1)
        self.sent = 0

    def send(self, bridge, in_port_id: int, frame: bytes, actions: tuple) -> None:
        """``actions`` as the rule model has them, plus ("table",): the frame as it is at
        that point goes through the bridge's tables. ``in_port_id``: a port id of the
        bridge, or -1. Actions run in order, an edit (VLAN, set_field, dec_ttl) changes what
        later ones send and what a TABLE after it matches."""
        run: list[tuple] = []
        pending = frame                  # the frame with every edit so far applied
        try:
            for a in actions:
                if a[0] == "table":
                    self._run(bridge, in_port_id, frame, run)
                    run, frame = [], pending
                    if frame is None:            # dec_ttl expired it: it goes no further
                        break
                    self.pmd.inject(bridge.bridge_id, in_port_id, frame, None)
                    continue
                if pending is not None:
                    pending = edited(pending, a)
                run.append(a)
            else:
                self._run(bridge, in_port_id, frame, run)
        except (KeyError, ValueError, MemoryError) as e:
            raise InjectError(str(e)) from None
        self.sent += 1

    def _run(self, bridge, in_port_id: int, frame: bytes, run: list[tuple]) -> None:
        ops = bridge.action_ops(tuple(run))
        if any(a[0] not in ONLY_EDITS for a in run):    # (else nothing leaves: no run)
            self.pmd.inject(bridge.bridge_id, in_port_id, frame, ops)


def edited(frame: bytes, a: tuple) -> bytes | None:
    """``frame`` as model action ``a`` leaves it (None: dec_ttl found the TTL expired);
    actions that do not edit the frame leave it as it is."""
    if a[0] in ("mod_vlan_vid", "strip_vlan"):
        return vlan_edit(frame, VNET_NONE, a[1] if a[0] == "mod_vlan_vid" else -1)[0]
    if a[0] == "dec_ttl":
        out = edit_frame(frame, VNET_NONE, "dec_ttl")
        return None if out is None else out[0]
    if a[0] == "set_field" and a[1] in EDITS:
        v = int.from_bytes(a[2], "big") if isinstance(a[2], bytes) else a[2]
        return edit_frame(frame, VNET_NONE, EDITS[a[1]], v)[0]
    return frame
