"""The switch side of OpenFlow 1.3 for one bridge: turns a decoded request into changes
through the same ``Switch`` methods ``pyvhost ctl`` uses (so ``ctl dump-flows`` and
``ovs-ofctl dump-flows`` show the same rules, cookies and counters) and into reply
messages. FLOW_MOD semantics as OpenFlow 1.3.5 (6.4) has them:

- ADD: a rule with the same table, priority and match is replaced; its counters carry over
  unless RESET_COUNTS, its duration restarts; CHECK_OVERLAP refuses a rule a packet could
  match together with another of the same priority (OVERLAP).
- MODIFY[_STRICT]: the matching rules (non-strict: every rule at least as specific as the
  match, as ``Bridge.select``) get the new instructions; cookie, timeouts, counters and
  duration stay (RESET_COUNTS: counters restart). No match: nothing happens.
- DELETE[_STRICT]: table 255 is every table; cookie/mask, out_port and out_group filter
  (a rule passes out_group when it names that group). MODIFY on table 255 is
  every table too, as Open vSwitch takes it (the spec allows 255 for deletes only).

Rules ``ctl`` made read back through OpenFlow as the nearest OpenFlow can say them: ports
by number (0 for a port that is gone), nw_tos as ip_dscp + ip_ecn, mod_vlan_vid on a match
that does not say whether the packet is tagged as push_vlan + set_field (as OVS writes it).

Connection-level messages (HELLO, ECHO) are the connection's; everything here is per
request and synchronous. No sockets here."""

from __future__ import annotations

import logging
import sqlite3
import struct
import time
import weakref

from pyvhost._classifier import TABLES
from pyvhost._flow import frame_key, key_dict
from pyvhost.switch.bulk import collector_paused
from pyvhost.switch.commands import CommandError
from pyvhost.switch.flows import VLAN_NONE, Flow, FlowSyntaxError, Selector, parse_flow
from pyvhost.switch.inject import InjectError
from pyvhost.switch.switch import RX_DROPS, TX_DROPS

from . import actions as A
from . import asyncmsg as AM
from . import codec as C
from . import errors as E
from . import groupmod as G
from . import metermod as MM
from . import multipart as M
from . import oxm
from . import roles as R
from .errors import OFError

log = logging.getLogger("pyvhost.openflow")

FLOW_MOD_FIXED = struct.Struct("!QQBBHHHIIIH2x")
PORT_MOD = struct.Struct("!I4x6s2xIII4x")
OFPPC_PORT_DOWN, OFPPC_NO_RECV, OFPPC_NO_FLOOD, OFPPC_NO_FWD, OFPPC_NO_PACKET_IN = \
    1, 4, 0x10, 0x20, 0x40
PORT_CONFIG_BITS = OFPPC_PORT_DOWN | OFPPC_NO_RECV | OFPPC_NO_FLOOD | OFPPC_NO_FWD | \
    OFPPC_NO_PACKET_IN
ADD, MODIFY, MODIFY_STRICT, DELETE, DELETE_STRICT = range(5)
SEND_FLOW_REM, CHECK_OVERLAP, RESET_COUNTS, NO_PKT_COUNTS, NO_BYT_COUNTS = 1, 2, 4, 8, 16
ALL_FLAGS = 0x1F
CAPABILITIES = C.OFPC_FLOW_STATS | C.OFPC_TABLE_STATS | C.OFPC_PORT_STATS
UNSUPPORTED_TYPES = {C.QUEUE_GET_CONFIG_REQUEST}
TABLE_MOD = struct.Struct("!B3xI")
OFPTC_DEPRECATED_MASK = 3          # 1.1/1.2's table-miss bits: no meaning in 1.3



def packet_match(frame: bytes) -> dict:
    """The match a PACKET_OUT's actions are checked against: the frame's own headers (its
    tag, its ethertype, IPv4's protocol), so a set_field the frame has the header for is
    taken and one it has not is refused (MATCH_INCONSISTENT)."""
    tagged = frame[12:14] == b"\x81\x00" and len(frame) >= 18
    match = {"dl_vlan": int.from_bytes(frame[14:16], "big") & 0xFFF if tagged else VLAN_NONE}
    k = key_dict(frame_key(frame))
    if k["dl_type"]:
        match["dl_type"] = k["dl_type"]
        if k["dl_type"] == oxm.IP:
            match["nw_proto"] = k["nw_proto"]
    return match

class StoreFailed(OFError):
    """The switch refused a change it had been given valid rules for: its store failed."""


class BridgeState:
    """What OpenFlow keeps per bridge beyond the rule model: the switch configuration
    (SET_CONFIG) and the flags FLOW_MODs gave rules (by rule id, checked against the rule's
    text, since ids are reused)."""

    def __init__(self) -> None:
        self.config_flags = 0
        self.miss_send_len = 128
        self.rule_flags: dict[int, tuple[str, int]] = {}
        self.port_config: dict[str, int] = {}            # PORT_MOD's config by port name
        self.generation = R.Generation()                 # ROLE_REQUEST's generation id
        self.roles: weakref.WeakSet = weakref.WeakSet()  # the connections' roles

    def flags_of(self, rule) -> int:
        text, flags = self.rule_flags.get(rule.id, ("", 0))
        return flags if text == rule.text else 0


class Handler:
    """Answers one connection's requests for bridge ``bridge_name`` of ``switch``."""

    def __init__(self, switch, bridge_name: str, state: BridgeState, dpid: int,
                 events=None):
        self.switch = switch
        self.events = events                   # PACKET_OUT's injector, FLOW_REMOVED
        self._unsent: list | None = None       # a batch's FLOW_REMOVEDs, until it is stored
        self._flag_log: list | None = None     # its flag changes: (rule id, before)
        self.role = R.Role()                   # this connection's role, async config
        state.roles.add(self.role)
        self.bridge_name = bridge_name
        self.state = state
        self.dpid = dpid

    @property
    def bridge(self):
        bridge = self.switch.bridges.get(self.bridge_name)
        if bridge is None:
            raise OFError(E.BAD_REQUEST, E.BRC_EPERM, f"bridge {self.bridge_name} is gone")
        return bridge

    def handle(self, h: C.Header, body: bytes) -> list[bytes]:
        """The replies to one request (OFError: the caller sends the ERROR)."""
        t = h.type
        self.role.check_write(t)
        if t == C.ROLE_REQUEST:
            reply = self.role_request(h.xid, body)
            self._async_changed()
            return [reply]
        if t == C.GET_ASYNC_REQUEST:
            C.need(body, 0, "GET_ASYNC_REQUEST", exact=True)
            return [R.async_reply(h.xid, self.role.masks)]
        if t == C.SET_ASYNC:
            self.role.masks = R.parse_set_async(body)
            self._async_changed()
            return []
        if t == C.FEATURES_REQUEST:
            C.need(body, 0, "FEATURES_REQUEST", exact=True)
            return [C.features_reply(h.xid, self.dpid, TABLES, CAPABILITIES)]
        if t == C.GET_CONFIG_REQUEST:
            C.need(body, 0, "GET_CONFIG_REQUEST", exact=True)
            return [C.config_reply(h.xid, self.state.config_flags, self.state.miss_send_len)]
        if t == C.SET_CONFIG:
            self.state.config_flags, self.state.miss_send_len = C.parse_set_config(body)
            return []
        if t == C.BARRIER_REQUEST:
            C.need(body, 0, "BARRIER_REQUEST", exact=True)
            return [C.message(C.BARRIER_REPLY, h.xid)]
        if t == C.FLOW_MOD:
            self.flow_mod(body)
            return []
        if t == C.MULTIPART_REQUEST:
            return self.multipart(h.xid, body)
        if t == C.PACKET_OUT:
            self.packet_out(body)
            return []
        if t == C.GROUP_MOD:
            G.group_mod(self, body)
            return []
        if t == C.PORT_MOD:
            self.port_mod(body)
            return []
        if t == C.METER_MOD:
            MM.meter_mod(self, body)
            return []
        if t == C.TABLE_MOD:
            self.table_mod(body)
            return []
        if t == C.EXPERIMENTER:
            raise OFError(E.BAD_REQUEST, E.BRC_BAD_EXPERIMENTER, "experimenter messages")
        why = f"{C.TYPE_NAMES.get(t, f'type {t}')} is not supported"
        raise OFError(E.BAD_REQUEST, E.BRC_BAD_TYPE, why)

    def flow_mods(self, bodies: list[bytes]) -> list[OFError | None]:
        """Several FLOW_MODs (as they came, pipelined) applied one after the other and
        stored in one transaction: one commit instead of one per message. Each gets its
        own outcome (None or the OFError to answer). If the store fails (a write or the
        commit: disk full, I/O error), the batch stops there, every change of it is undone
        (the bridge reloads its rules from the store, which rolled back) and each message
        of it gets FLOW_MOD_FAILED."""
        outcome: list[OFError | None] = []
        if self.role.is_slave:
            return [OFError(E.BAD_REQUEST, E.BRC_IS_SLAVE, "FLOW_MOD from a slave "
                            "controller")] * len(bodies)
        self._unsent = []                          # FLOW_REMOVEDs wait for the commit
        self._flag_log = []                        # flag changes, undone with the batch
        try:
            with self.switch.store.transaction(), collector_paused():
                for body in bodies:
                    try:
                        self.flow_mod(body)
                        outcome.append(None)
                    except StoreFailed:
                        raise                      # the store failed: so does the batch
                    except OFError as e:
                        outcome.append(e)
                    except (sqlite3.Error, OSError):
                        raise                      # the store's own failure
                    except Exception as e:         # a bug: this message fails, not the batch
                        log.exception("openflow %s: FLOW_MOD failed", self.bridge_name)
                        outcome.append(OFError(E.FLOW_MOD_FAILED, E.FMFC_UNKNOWN,
                                               f"internal error: {e}"))
        except Exception as e:                     # the commit (disk full, I/O error)
            log.error("openflow %s: %d FLOW_MODs could not be stored (%s): undone",
                      self.bridge_name, len(bodies), e)
            self.switch.reload_rules(self.bridge_name)
            self._flags_undone(self._flag_log)
            failed = OFError(E.FLOW_MOD_FAILED, E.FMFC_UNKNOWN, f"the store failed: {e}")
            outcome = [o or failed for o in outcome]
            outcome += [failed] * (len(bodies) - len(outcome))
            self._unsent = []                      # (the rules are back: none went)
        finally:
            unsent, self._unsent, self._flag_log = self._unsent, None, None
        for bridge, removed, reason, flags in unsent:
            self.events.flows_removed(bridge, removed, reason, flags)
        return outcome

    def role_request(self, xid: int, body: bytes) -> bytes:
        """MASTER or SLAVE with a generation id not older than the bridge's (which it
        becomes); a new MASTER makes the bridge's other masters SLAVEs; NOCHANGE asks."""
        role, gen = R.parse_role_request(body)
        if role in (R.MASTER, R.SLAVE):
            self.state.generation.check(gen)
        if role == R.MASTER:
            for other in list(self.state.roles):
                if other is not self.role and other.role == R.MASTER:
                    other.role = R.SLAVE
        if role != R.NOCHANGE:
            self.role.role = role
            log.info("openflow %s: a controller is %s now", self.bridge_name,
                     R.ROLE_NAMES[role])
        return R.role_reply(xid, self.role.role, self.state.generation.value)

    def save_groups(self) -> None:
        """Keep the bridge's groups in the store (they come back with the switch)."""
        if self.events is None:
            return
        try:
            self.events.of.save_groups(self.bridge_name)
        except CommandError as e:
            raise OFError(E.GROUP_MOD_FAILED, G.EPERM, str(e)) from None

    def save_meters(self) -> None:
        """Keep the bridge's meters in the store (they come back with the switch)."""
        if self.events is None:
            return
        try:
            self.events.of.save_meters(self.bridge_name)
        except CommandError as e:
            raise OFError(E.METER_MOD_FAILED, E.MMFC_UNKNOWN, str(e)) from None

    def wants(self, msg_type: int, reason: int) -> bool:
        return self.role.wants(msg_type, reason)

    def _async_changed(self) -> None:
        if self.events is not None:
            self.events.invalid_ttl_changed(self.bridge_name)

    # -- ports ----------------------------------------------------------------------------
    def ofport_of(self, ref: str) -> int:
        """A rule's port reference as OpenFlow numbers it (a port that went: the number
        the rule names, as OVS keeps it; 0 for a name)."""
        return self.bridge.ofport_number(ref)

    # -- FLOW_MOD -------------------------------------------------------------------------
    def flow_mod(self, body: bytes) -> None:
        C.need(body, FLOW_MOD_FIXED.size + 8, "FLOW_MOD")
        (cookie, cookie_mask, table, command, idle, hard, priority, buffer_id, out_port,
         out_group, flags) = FLOW_MOD_FIXED.unpack_from(body)
        tlvs, end = oxm.split_match(body, FLOW_MOD_FIXED.size)
        instructions = body[end:]
        if command > DELETE_STRICT:
            raise OFError(E.FLOW_MOD_FAILED, E.FMFC_BAD_COMMAND, f"command {command}")
        if flags & ~ALL_FLAGS:
            raise OFError(E.FLOW_MOD_FAILED, E.FMFC_BAD_FLAGS, f"flags 0x{flags:x}")
        if table == C.OFPTT_ALL and command == ADD:
            raise OFError(E.FLOW_MOD_FAILED, E.FMFC_BAD_TABLE_ID, "ADD to table 255 (all)")
        if table != C.OFPTT_ALL and table >= TABLES:
            raise OFError(E.FLOW_MOD_FAILED, E.FMFC_BAD_TABLE_ID, f"table {table}")
        if command in (ADD, MODIFY, MODIFY_STRICT) and buffer_id != C.NO_BUFFER:
            raise OFError(E.BAD_REQUEST, E.BRC_BUFFER_UNKNOWN,
                          f"buffer {buffer_id}: this switch buffers no packets")
        match = oxm.decode(tlvs)
        bridge = self.bridge
        if command == ADD:
            actions, goto, inst = A.decode_flow_instructions(instructions, table, match)
            flow = self._flow(Flow(priority, match, actions, table, cookie, idle, hard, goto,
                                   inst))
            self._check_ports(flow)
            self._add(bridge, flow, flags)
            return
        sel = Selector(match, None if table == C.OFPTT_ALL else table, cookie, cookie_mask,
                       priority)
        strict = command in (MODIFY_STRICT, DELETE_STRICT)
        rules = bridge.select(sel, strict)
        if command in (MODIFY, MODIFY_STRICT):
            if not rules:                          # nothing to change: the instructions
                # are still checked, against the message's own match (as OVS does)
                t = 0 if table == C.OFPTT_ALL else table
                actions, goto, inst = A.decode_flow_instructions(instructions, t, match)
                self._check_ports(Flow(priority, match, actions, t, goto_table=goto,
                                       inst=inst), match=False)
            self._modify(bridge, rules, instructions, flags)
        else:
            self.remove_rules([r for r in rules if self._outputs_to(r, out_port, out_group)],
                              "delete")

    def remove_rules(self, rules: list, reason: str) -> None:
        """``rules`` go (stored at once); the controllers that asked for it get a
        FLOW_REMOVED with ``reason`` for each."""
        if not rules:
            return
        bridge = self.bridge
        before = [(r, bridge.counters(r)) for r in rules]
        flags = [self.state.flags_of(r) for r in rules]
        self._apply(remove=rules)
        # the counters each had once no PMD could count into it (read before: if the
        # PMDs could not be waited for)
        removed = [(r, bridge.counters(r) if r.final else c) for r, c in before]
        if self.events is None:
            return
        if self._unsent is not None:               # in a batch: once it is stored
            self._unsent.append((bridge, removed, reason, flags))
        else:
            self.events.flows_removed(bridge, removed, reason, flags)

    def _flow(self, flow: Flow) -> Flow:
        """The flow as the model writes and reads it back (the store's copy): a flow whose
        text would read back differently is refused, never stored."""
        try:
            again = parse_flow(flow.format())
        except FlowSyntaxError as e:
            raise OFError(E.BAD_MATCH, E.BMC_BAD_PREREQ, str(e)) from None
        if again != flow:
            raise OFError(E.BAD_MATCH, E.BMC_BAD_FIELD,
                          f"rule {flow.format()!r} does not read back as itself")
        return again

    def _check_ports(self, flow: Flow, match: bool = True) -> None:
        """OFError if the flow names a port, group or meter the bridge lacks: in its
        actions, and (``match``) its in_port; a MODIFY checks only the new actions (the
        rule's in_port may name a port that went since)."""
        bridge = self.bridge
        actions = flow.all_actions()
        for a in actions:
            if a[0] == "output" and bridge.resolve(a[1]) is None:
                raise OFError(E.BAD_ACTION, E.BAC_BAD_OUT_PORT, f"output:{a[1]}: no such port")
        for a in actions:
            if a[0] == "group" and (bridge.groups is None or a[1] not in bridge.groups.groups):
                raise OFError(E.BAD_ACTION, E.BAC_BAD_OUT_GROUP, f"group:{a[1]}: no such group")
            if a[0] == "meter" and (bridge.meters is None or a[1] not in bridge.meters.meters):
                raise OFError(E.METER_MOD_FAILED, E.MMFC_UNKNOWN_METER,
                              f"meter:{a[1]}: no such meter")
        if match and "in_port" in flow.match and bridge.resolve(flow.match["in_port"]) is None:
            raise OFError(E.BAD_MATCH, E.BMC_BAD_VALUE,
                          f"in_port={flow.match['in_port']}: no such port")

    def _apply(self, add=(), remove=(), modify=(), specs=None, in_port_checked=True):
        """``in_port_checked`` False: ``add`` are removed rules' matches again (a MODIFY
        with RESET_COUNTS), whose in_port may name a port that went."""
        flags = {r.id: self.state.flags_of(r) for r, _ in modify}
        try:
            added = self.switch.change_rules(self.bridge_name, add=list(add),
                                             remove=list(remove), modify=list(modify),
                                             specs=specs, in_port_checked=in_port_checked)
        except CommandError as e:
            raise StoreFailed(E.FLOW_MOD_FAILED, E.FMFC_UNKNOWN, str(e)) from None
        for r in remove:
            self._set_flags(r.id, None)
        for r, _ in modify:                        # MODIFY keeps a rule's flags
            self._remember(r, flags[r.id])
        return added

    def _set_flags(self, rule_id: int, kept: tuple[str, int] | None) -> None:
        """A rule's (text, flags), or none; in a batch, what it was is logged first."""
        if self._flag_log is not None:
            self._flag_log.append((rule_id, self.state.rule_flags.get(rule_id)))
        if kept is None:
            self.state.rule_flags.pop(rule_id, None)
        else:
            self.state.rule_flags[rule_id] = kept

    def _flags_undone(self, log: list) -> None:
        """The flags as they were before an undone batch, on the rules as they are now
        (those that came back from the store have new ids: found by text); entries of
        rules that are not there any more go."""
        flags = self.state.rule_flags
        for rule_id, before in reversed(log):
            if before is None:
                flags.pop(rule_id, None)
            else:
                flags[rule_id] = before
        rules = self.bridge.rules
        lost = {}
        for rule_id, (text, f) in list(flags.items()):
            rule = rules.get(rule_id)
            if rule is None or rule.text != text:
                del flags[rule_id]
                lost[text] = f
        for rule in rules.values() if lost else ():
            if rule.text in lost and rule.id not in flags:
                flags[rule.id] = (rule.text, lost[rule.text])

    def _overlaps(self, bridge, spec: tuple) -> bool:
        table, priority, mask, value = spec[:4]
        m1 = int.from_bytes(mask, "little")
        v1 = int.from_bytes(value, "little") & m1
        for rule in bridge.same_priority(table, priority):
            t, p, mask2, value2 = bridge.rule_identity(rule)
            m2, v2 = int.from_bytes(mask2, "little"), int.from_bytes(value2, "little")
            if t == table and p == priority and (v1 ^ v2) & m1 & m2 == 0:
                return True
        return False

    def _add(self, bridge, flow: Flow, flags: int) -> None:
        spec = bridge.spec(flow)
        if flags & CHECK_OVERLAP and self._overlaps(bridge, spec):
            raise OFError(E.FLOW_MOD_FAILED, E.FMFC_OVERLAP,
                          f"{flow.format()} overlaps a rule of the same priority")
        old = bridge.find(spec)
        if old is not None and not flags & RESET_COUNTS:
            self._apply(modify=[(old, flow)])      # counters carry over (spec 6.4)
            old.created = time.monotonic()         # ... the duration restarts
            rule = old
        else:
            rule, = self._apply(add=[flow], remove=[old] if old is not None else [],
                                specs=[spec])
        self._remember(rule, flags)

    def _remember(self, rule, flags: int) -> None:
        kept = flags & (SEND_FLOW_REM | NO_PKT_COUNTS | NO_BYT_COUNTS)
        self._set_flags(rule.id, (rule.text, kept) if kept else None)

    def _modify(self, bridge, rules: list, instructions: bytes, flags: int) -> None:
        if not rules:
            return
        decoded: dict[tuple, tuple] = {}
        changes = []
        for rule in rules:
            f = rule.flow
            # everything of the rule the decoding checks its actions against (a SET_FIELD's
            # prerequisites: the VLAN state, dl_type and nw_proto)
            key = (f.table, A.vlan_state(f.match), f.match.get("dl_type"),
                   f.match.get("nw_proto"))
            if key not in decoded:
                decoded[key] = A.decode_flow_instructions(instructions, f.table, f.match)
            actions, goto, inst = decoded[key]
            new = Flow(f.priority, f.match, actions, f.table, f.cookie, f.idle_timeout,
                       f.hard_timeout, goto, inst)
            self._check_ports(new, match=False)
            changes.append((rule, new))
        if flags & RESET_COUNTS:                   # new rules: counters from zero
            kept = [(r.created, self.state.flags_of(r)) for r, _ in changes]
            added = self._apply(add=[f for _, f in changes], remove=[r for r, _ in changes],
                                in_port_checked=False)
            for rule, (created, rule_flags) in zip(added, kept, strict=True):
                rule.created = created
                self._remember(rule, rule_flags)
        else:
            self._apply(modify=changes)

    def _outputs_to(self, rule, out_port: int, out_group: int) -> bool:
        if out_port == C.OFPP_ANY and out_group == C.OFPG_ANY:
            return True                            # (no rule's text parsed for nothing)
        actions = rule.flow.all_actions()
        if out_group != C.OFPG_ANY and ("group", out_group) not in actions:
            return False
        if out_port == C.OFPP_ANY:
            return True
        for a in actions:
            if a[0] == "output" and self.ofport_of(a[1]) == out_port:
                return True
            if a[0] == "flood" and out_port in (C.OFPP_FLOOD, C.OFPP_ALL):
                return True
            if a[0] == "normal" and out_port == C.OFPP_NORMAL:
                return True
            if a[0] == "controller" and out_port == C.OFPP_CONTROLLER:
                return True
            if a[0] == "in_port" and out_port == C.OFPP_IN_PORT:
                return True
        return False

    # -- TABLE_MOD ------------------------------------------------------------------------
    def table_mod(self, body: bytes) -> None:
        """OpenFlow 1.3 gives a table no configuration: the config bits are reserved (the
        two 1.1/1.2 table-miss bits deprecated, ignored as Open vSwitch does; a table-miss
        rule says what a miss does). A table that is not there: BAD_TABLE; any other bit:
        BAD_CONFIG."""
        C.need(body, TABLE_MOD.size, "TABLE_MOD", exact=True)
        table, config = TABLE_MOD.unpack(body)
        if table != C.OFPTT_ALL and table >= TABLES:
            raise OFError(E.TABLE_MOD_FAILED, E.TMFC_BAD_TABLE, f"table {table}")
        if config & ~OFPTC_DEPRECATED_MASK:
            raise OFError(E.TABLE_MOD_FAILED, E.TMFC_BAD_CONFIG, f"config 0x{config:x}")
        log.info("openflow %s: TABLE_MOD table %s config 0x%x: nothing to change in 1.3",
                 self.bridge_name, "all" if table == C.OFPTT_ALL else table, config)

    # -- PORT_MOD -------------------------------------------------------------------------
    def port_mod(self, body: bytes) -> None:
        """PORT_DOWN, NO_RECV, NO_FWD, NO_PACKET_IN and (as Open vSwitch takes it in 1.3)
        NO_FLOOD; the datapath applies them at once, controllers get a PORT_STATUS."""
        C.need(body, PORT_MOD.size, "PORT_MOD", exact=True)
        port_no, hw_addr, config, mask, advertise = PORT_MOD.unpack(body)
        port = self.bridge.resolve(str(port_no)) if 1 <= port_no < C.OFPP_MAX else None
        if port is None:
            raise OFError(E.PORT_MOD_FAILED, E.PMFC_BAD_PORT, f"port {port_no:#x}: no such port")
        if hw_addr != bytes(6):                    # (PORT_DESC reports no address)
            raise OFError(E.PORT_MOD_FAILED, E.PMFC_BAD_HW_ADDR, f"hw_addr {hw_addr.hex(':')}")
        if (config | mask) & ~PORT_CONFIG_BITS:
            raise OFError(E.PORT_MOD_FAILED, E.PMFC_BAD_CONFIG,
                          f"config 0x{config:x} mask 0x{mask:x}")
        if advertise:
            raise OFError(E.PORT_MOD_FAILED, E.PMFC_BAD_ADVERTISE,
                          "advertise: no link features to set")
        old = self.state.port_config.get(port.name, 0)
        new = (old & ~mask) | (config & mask)
        self.switch.datapath.set_port_config(
            port.port_id, forward=not new & (OFPPC_PORT_DOWN | OFPPC_NO_FWD),
            receive=not new & (OFPPC_PORT_DOWN | OFPPC_NO_RECV),
            flood=not new & OFPPC_NO_FLOOD)
        self.state.port_config[port.name] = new
        log.info("openflow %s: port %s config 0x%x", self.bridge_name, port.name, new)
        if new != old and self.events is not None:
            self.events.port_status(port, AM.OFPPR_MODIFY)

    # -- PACKET_OUT -----------------------------------------------------------------------
    def packet_out(self, body: bytes) -> None:
        """Send the frame through its actions (OUTPUT to a port, FLOOD, ALL, IN_PORT,
        NORMAL, CONTROLLER, TABLE; VLAN edits) as if it came in on ``in_port``."""
        po = AM.parse_packet_out(body)
        bridge = self.bridge
        in_id = -1
        if po.in_port < C.OFPP_MAX:
            port = bridge.resolve(str(po.in_port))
            if port is None:
                raise OFError(E.BAD_REQUEST, E.BRC_BAD_PORT, f"in_port {po.in_port}: no "
                                                             "such port")
            in_id = port.port_id
        actions = A.decode_actions(po.actions, packet_match(po.data), packet_out=True)
        for a in actions:
            if a[0] == "output" and bridge.resolve(a[1]) is None:
                raise OFError(E.BAD_ACTION, E.BAC_BAD_OUT_PORT, f"output:{a[1]}: no such port")
            if a[0] == "group":                    # (the upcall resolves groups; a
                raise OFError(E.BAD_ACTION, E.BAC_BAD_TYPE,   # packet-out has none)
                              "GROUP in a PACKET_OUT is not supported (output to TABLE "
                              "through a rule that uses the group)")
        if self.events is None:
            raise OFError(E.BAD_REQUEST, E.BRC_BAD_TYPE, "PACKET_OUT: no injector")
        try:
            self.events.injector.send(bridge, in_id, po.data, actions)
        except InjectError as e:
            raise OFError(E.BAD_REQUEST, E.BRC_BAD_PACKET, str(e)) from None

    # -- MULTIPART ------------------------------------------------------------------------
    def multipart(self, xid: int, body: bytes) -> list[bytes]:
        req = M.parse_request(body)
        if req.flags & M.REQ_MORE:
            raise OFError(E.BAD_REQUEST, E.BRC_BAD_MULTIPART,
                          "requests in several parts are not supported")
        t = req.type
        if t == M.DESC:
            C.need(req.body, 0, "DESC request", exact=True)
            entries = [M.desc("pyvhost", "userspace vhost-user switch", "pyvhost", "None",
                              f"bridge {self.bridge_name}")]
        elif t in (M.FLOW, M.AGGREGATE):
            entries = self.flow_stats(M.parse_flow_request(req.body), t == M.AGGREGATE)
        elif t == M.TABLE:
            C.need(req.body, 0, "TABLE request", exact=True)
            counts = [0] * TABLES
            for rule in self.bridge.rules.values():
                counts[self.bridge.cls.place(rule.id)[0]] += 1
            entries = [M.table_stats(i, counts[i]) for i in range(TABLES)]
        elif t == M.PORT_STATS:
            entries = self.port_stats(M.parse_port_request(req.body))
        elif t == M.PORT_DESC:
            C.need(req.body, 0, "PORT_DESC request", exact=True)
            entries = [M.port_desc(p.ofport, p.name, up=p.connected,
                                   config=self.state.port_config.get(p.name, 0))
                       for p in self._ports()]
        elif t == M.TABLE_FEATURES:
            if req.body:
                raise OFError(E.TABLE_FEATURES_FAILED, 5,     # OFPTFFC_EPERM
                              "table features cannot be changed here")
            entries = [M.table_features(i) for i in range(TABLES)]
        elif t == M.GROUP:
            entries = G.stats_entries(self, req.body)
        elif t == M.GROUP_DESC:
            entries = G.desc_entries(self, req.body)
        elif t == M.GROUP_FEATURES:
            entries = G.features_entries(req.body)
        elif t == M.METER:
            entries = MM.stats_entries(self, req.body)
        elif t == M.METER_CONFIG:
            entries = MM.config_entries(self, req.body)
        elif t == M.METER_FEATURES:
            entries = MM.features_entries(req.body)
        elif t == M.EXPERIMENTER:
            raise OFError(E.BAD_REQUEST, E.BRC_BAD_EXPERIMENTER, "experimenter multipart")
        else:
            raise OFError(E.BAD_REQUEST, E.BRC_BAD_MULTIPART,
                          f"multipart type {t} is not supported")
        return M.replies(t, xid, entries)

    def _ports(self) -> list:
        return sorted(self.bridge.ports.values(), key=lambda p: p.ofport)

    def flow_stats(self, req: M.FlowRequest, aggregate: bool) -> list[bytes]:
        if req.table != C.OFPTT_ALL and req.table >= TABLES:
            raise OFError(E.BAD_REQUEST, E.BRC_BAD_TABLE_ID, f"table {req.table}")
        bridge = self.bridge
        sel = Selector(oxm.decode(req.oxm), None if req.table == C.OFPTT_ALL else req.table,
                       req.cookie, req.cookie_mask)
        rules = [r for r in bridge.select(sel)
                 if self._outputs_to(r, req.out_port, req.out_group)]
        now = time.monotonic()
        packets = bytes_ = 0
        out = []
        for rule in rules:
            n, b, _ = bridge.counters(rule)
            packets += n
            bytes_ += b
            if aggregate:
                continue
            f = rule.flow
            out.append(M.flow_stats(
                f.table, max(0, int((now - rule.created) * 1e9)), f.priority, f.idle_timeout,
                f.hard_timeout, self.state.flags_of(rule), f.cookie, n, b,
                oxm.encode(f.match, self.ofport_of),
                A.encode_instructions(f.actions, f.goto_table, f.match, self.ofport_of,
                                      f.inst)))
        return [M.aggregate(packets, bytes_, len(rules))] if aggregate else out

    def port_stats(self, port_no: int) -> list[bytes]:
        ports = self._ports()
        if port_no != C.OFPP_ANY:
            ports = [p for p in ports if p.ofport == port_no]
            if not ports:
                raise OFError(E.BAD_REQUEST, E.BRC_BAD_PORT, f"no port {port_no}")
        out = []
        for p in ports:
            d = self.switch.datapath.port_stats(p.port_id)
            rx_drop = sum(d.get(k, 0) for k in RX_DROPS)
            tx_drop = sum(d.get(k, 0) for k in TX_DROPS)
            out.append(M.port_stats(p.ofport, d["rx_packets"], d["tx_packets"], d["rx_bytes"],
                                    d["tx_bytes"], rx_drop, tx_drop, 0, 0, 0))
        return out
