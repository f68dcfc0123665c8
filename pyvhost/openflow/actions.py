"""OpenFlow 1.3 instructions and actions to and from the switch's rule model (actions
``output:PORT``, ``flood``, ``normal``, ``mod_vlan_vid:N``, ``strip_vlan``, ``controller:N``,
``in_port``, ``group:N``, ``meter:N`` and ``goto_table:N`` of ``pyvhost.switch.flows``).

Taken: GOTO_TABLE, METER (the model's ``meter:N``, first of the actions) and
APPLY_ACTIONS holding OUTPUT (a port number, FLOOD, ALL, NORMAL,
CONTROLLER with its max_len, IN_PORT; TABLE in a packet-out only: ``decode_actions(...,
packet_out=True)``), GROUP, PUSH_VLAN 0x8100, POP_VLAN and SET_FIELD vlan_vid, where the
model's action does exactly the same to every packet the rule's match admits (and
SET_FIELD tunnel_id, a 24-bit VNI, and NXM tun_dst: set_tun_id and set_tun_dst): PUSH_VLAN
(+ SET_FIELD) only on a match of untagged packets (mod_vlan_vid pushes a tag there),
SET_FIELD vlan_vid and POP_VLAN only on a match of tagged ones (or after a push). OFPP_ALL
is the model's ``flood`` (so a port PORT_MOD took out of flooding is left out of ALL too:
a difference from the spec). SET_FIELD of eth_src/eth_dst, ipv4_src/ipv4_dst,
tcp_src/tcp_dst, udp_src/udp_dst, ip_dscp and vlan_pcp (the model's ``("set_field", FIELD,
value)``, prerequisites as the spec's MATCH_INCONSISTENT) and DEC_NW_TTL (``dec_ttl``).
WRITE_ACTIONS (the same actions, into the action set),
CLEAR_ACTIONS and WRITE_METADATA (value and mask) are the model's ``Instructions``.
Everything else gets the spec's BAD_INSTRUCTION/BAD_ACTION error: OUTPUT to LOCAL, TABLE
(in a rule) or ANY (the datapath cannot send there), TTL and MPLS actions. Pure functions."""

from __future__ import annotations

import struct

from pyvhost._classifier import TABLES
from pyvhost._flow import MAX_OPS
from pyvhost.switch.flows import METER_MAX, U64, Instructions, Prefix, op_count, vlan_tagged

from . import codec as C
from . import errors as E
from . import oxm
from .codec import pad8
from .errors import OFError
from .oxm import BASIC, OFPVID_PRESENT, VLAN_VID, header

# enum ofp_instruction_type
IT_GOTO_TABLE, IT_WRITE_METADATA, IT_WRITE_ACTIONS, IT_APPLY_ACTIONS = 1, 2, 3, 4
IT_CLEAR_ACTIONS, IT_METER, IT_EXPERIMENTER = 5, 6, 0xFFFF
# enum ofp_action_type
AT_OUTPUT, AT_PUSH_VLAN, AT_POP_VLAN, AT_GROUP, AT_SET_FIELD = 0, 17, 18, 22, 25
AT_DEC_NW_TTL = 24
# SET_FIELD's header fields: OXM field -> the model's name (values: bytes for addresses)
PACKET_FIELDS = {oxm.ETH_SRC: "eth_src", oxm.ETH_DST: "eth_dst", oxm.IPV4_SRC: "ip_src",
                 oxm.IPV4_DST: "ip_dst", oxm.TCP_SRC: "tcp_src", oxm.TCP_DST: "tcp_dst",
                 oxm.UDP_SRC: "udp_src", oxm.UDP_DST: "udp_dst", oxm.IP_DSCP: "ip_dscp",
                 oxm.VLAN_PCP: "vlan_pcp"}
FIELD_OF = {name: f for f, name in PACKET_FIELDS.items()}
AT_EXPERIMENTER = 0xFFFF
KNOWN_ACTIONS = {0, 11, 12, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27}
ETH_P_8021Q = 0x8100
RESERVED_NAMES = {C.OFPP_IN_PORT: "IN_PORT", C.OFPP_TABLE: "TABLE",
                  C.OFPP_CONTROLLER: "CONTROLLER", C.OFPP_LOCAL: "LOCAL", C.OFPP_ANY: "ANY"}

UNKNOWN, UNTAGGED, TAGGED = "unknown", "untagged", "tagged"


def vlan_state(match: dict) -> str:
    tagged = vlan_tagged(match)
    return UNKNOWN if tagged is None else TAGGED if tagged else UNTAGGED


def _act(code: int, why: str) -> OFError:
    return OFError(E.BAD_ACTION, code, why)


OFPCML_MAX = 0xFFE5        # the largest max_len that still asks to cut the frame


def decode_actions(data: bytes, match: dict | None, packet_out: bool = False) -> tuple:
    """The model's actions of an action list (APPLY_ACTIONS); ``packet_out``: also
    OUTPUT to TABLE, as ("table",). ``match`` None: no set_field prerequisites (a group's
    bucket, which any packet of its rules may reach: an edit does nothing where the header
    is missing)."""
    out: list[tuple] = []
    state = vlan_state(match or {})
    pushed_at = -1                     # index of the mod_vlan_vid a PUSH_VLAN made
    off = 0
    while off < len(data):
        if off + 4 > len(data):
            raise _act(E.BAC_BAD_LEN, f"{len(data) - off} stray bytes after the last action")
        atype, alen = struct.unpack_from("!HH", data, off)
        if alen < 8 or alen % 8 or off + alen > len(data):
            raise _act(E.BAC_BAD_LEN, f"action {atype} of length {alen} at offset {off}")
        body = data[off:off + alen]
        off += alen
        if atype == AT_OUTPUT:
            if alen != 16:
                raise _act(E.BAC_BAD_LEN, f"OUTPUT of length {alen}")
            port, _max_len = struct.unpack_from("!IH", body, 4)
            if 1 <= port < C.OFPP_MAX:
                out.append(("output", str(port)))
            elif port in (C.OFPP_FLOOD, C.OFPP_ALL):
                out.append(("flood",))
            elif port == C.OFPP_NORMAL:
                out.append(("normal",))
            elif port == C.OFPP_CONTROLLER:
                if OFPCML_MAX < _max_len < 0xFFFF:
                    raise _act(E.BAC_BAD_ARGUMENT, f"controller max_len {_max_len:#x} "
                                                   "(0..0xffe5 or 0xffff)")
                out.append(("controller", _max_len))
            elif port == C.OFPP_IN_PORT:
                out.append(("in_port",))
            elif port == C.OFPP_TABLE and packet_out:
                out.append(("table",))
            else:
                name = RESERVED_NAMES.get(port, f"{port:#x}")
                raise _act(E.BAC_BAD_OUT_PORT, f"output to {name}: not supported here")
        elif atype == AT_PUSH_VLAN:
            if alen != 8:
                raise _act(E.BAC_BAD_LEN, f"PUSH_VLAN of length {alen}")
            ethertype, = struct.unpack_from("!H", body, 4)
            if ethertype != ETH_P_8021Q:
                raise _act(E.BAC_BAD_ARGUMENT, f"push_vlan ethertype 0x{ethertype:04x} "
                                               "(only 0x8100)")
            if state != UNTAGGED:
                raise _act(E.BAC_MATCH_INCONSISTENT if state == UNKNOWN else E.BAC_BAD_TAG,
                           "push_vlan needs a match of untagged packets (vlan_vid=NONE) "
                           "and pushes one tag")
            pushed_at = len(out)
            out.append(("mod_vlan_vid", 0))
            state = TAGGED
        elif atype == AT_POP_VLAN:
            if alen != 8:
                raise _act(E.BAC_BAD_LEN, f"POP_VLAN of length {alen}")
            if state != TAGGED:
                raise _act(E.BAC_MATCH_INCONSISTENT, "pop_vlan needs a match of tagged "
                                                     "packets (vlan_vid=N)")
            out.append(("strip_vlan",))
            state = UNTAGGED
            pushed_at = -1
        elif atype == AT_SET_FIELD:
            if alen < 8:
                raise _act(E.BAC_BAD_SET_LEN, f"SET_FIELD of length {alen}")
            h, = struct.unpack_from("!I", body, 4)
            cls, field, hasmask, flen = h >> 16, h >> 9 & 0x7F, h >> 8 & 1, h & 0xFF
            if pad8(8 + flen) != alen:
                raise _act(E.BAC_BAD_SET_LEN, f"SET_FIELD of length {alen} holding "
                                              f"{flen} bytes")
            fkey = oxm.key(h)
            if fkey in (oxm.TUNNEL_ID, oxm.NX_TUN_IPV4_DST):
                out.append(_set_tunnel(fkey, hasmask, flen, body[8:8 + flen]))
                pushed_at = -1
                continue
            if cls == BASIC and field in PACKET_FIELDS:
                out.append(_set_packet_field(field, hasmask, flen, body[8:8 + flen], match,
                                             state))
                continue
            if cls != BASIC or field != VLAN_VID:
                raise _act(E.BAC_BAD_SET_TYPE, f"set_field of class 0x{cls:04x} field "
                                               f"{field}: only vlan_vid, tunnel_id and "
                                               "tun_dst here")
            if hasmask or flen != 2:
                raise _act(E.BAC_BAD_SET_LEN, f"set_field vlan_vid of {flen} bytes")
            vid, = struct.unpack_from("!H", body, 8)
            if not vid & OFPVID_PRESENT or vid > 0x1FFF:
                raise _act(E.BAC_BAD_SET_ARGUMENT, f"set_field vlan_vid 0x{vid:04x} (needs "
                                                   "OFPVID_PRESENT)")
            if state != TAGGED:
                raise _act(E.BAC_MATCH_INCONSISTENT, "set_field vlan_vid needs a tagged "
                                                     "packet (match vlan_vid=N, or "
                                                     "push_vlan first)")
            if pushed_at == len(out) - 1 and pushed_at >= 0:
                out[pushed_at] = ("mod_vlan_vid", vid & 0xFFF)
            else:
                out.append(("mod_vlan_vid", vid & 0xFFF))
        elif atype == AT_GROUP:
            if alen != 8:
                raise _act(E.BAC_BAD_LEN, f"GROUP of length {alen}")
            gid, = struct.unpack_from("!I", body, 4)
            if gid > 0xFFFFFF00:
                raise _act(E.BAC_BAD_OUT_GROUP, f"group {gid:#x}")
            out.append(("group", gid))
        elif atype == AT_DEC_NW_TTL:
            if alen != 8:
                raise _act(E.BAC_BAD_LEN, f"DEC_NW_TTL of length {alen}")
            out.append(("dec_ttl",))
        elif atype == AT_EXPERIMENTER:
            raise _act(E.BAC_BAD_EXPERIMENTER, "experimenter actions are not supported")
        elif atype in KNOWN_ACTIONS:
            raise _act(E.BAC_BAD_TYPE, f"action type {atype} is not supported here")
        else:
            raise _act(E.BAC_BAD_TYPE, f"unknown action type {atype}")
        if atype != AT_PUSH_VLAN and atype != AT_SET_FIELD:
            pushed_at = -1
    if op_count(out) > MAX_OPS:
        raise _act(E.BAC_TOO_MANY, f"{len(out)} actions taking {op_count(out)} datapath ops: "
                                   f"a rule holds at most {MAX_OPS}")
    return tuple(out)


def _set_packet_field(field: int, hasmask: int, flen: int, value: bytes, match: dict | None,
                      state: str) -> tuple:
    """SET_FIELD of a header field: the model's ("set_field", name, value), the match
    providing the header (else MATCH_INCONSISTENT, as the spec says)."""
    name = PACKET_FIELDS[field]
    size = oxm.SIZES[field]
    if hasmask or flen != size:
        raise _act(E.BAC_BAD_SET_LEN, f"set_field {name}: {flen} bytes"
                                      f"{' with a mask' if hasmask else ''} ({size})")
    proto = {"tcp": oxm.TCP, "udp": oxm.UDP}.get(name[:3])
    if match is None:
        pass                                       # (a bucket: no prerequisites)
    elif (name.startswith("ip_") or proto) and match.get("dl_type") != oxm.IP:
        raise _act(E.BAC_MATCH_INCONSISTENT, f"set_field {name} needs a match of IPv4 "
                                             "(eth_type=0x0800)")
    elif proto and match.get("nw_proto") != proto:
        raise _act(E.BAC_MATCH_INCONSISTENT, f"set_field {name} needs ip_proto={proto}")
    elif name == "vlan_pcp" and state != TAGGED:
        raise _act(E.BAC_MATCH_INCONSISTENT, "set_field vlan_pcp needs a tagged packet "
                                             "(match vlan_vid=N, or push_vlan first)")
    if size == 6 or size == 4:
        return ("set_field", name, value)
    v = int.from_bytes(value, "big")
    limit = {"ip_dscp": 0x3F, "vlan_pcp": 7}.get(name, 0xFFFF)
    if v > limit:
        raise _act(E.BAC_BAD_SET_ARGUMENT, f"set_field {name} {v} (0..{limit})")
    return ("set_field", name, v)


def _set_tunnel(fkey: int, hasmask: int, flen: int, value: bytes) -> tuple:
    """SET_FIELD tunnel_id (the model's set_tun_id: a 24-bit VNI) or NXM tun_dst
    (set_tun_dst: one address)."""
    size = oxm.SIZES[fkey]
    if hasmask or flen != size:
        raise _act(E.BAC_BAD_SET_LEN, f"set_field of a tunnel field: {flen} bytes"
                                      f"{' with a mask' if hasmask else ''} ({size})")
    v = int.from_bytes(value, "big")
    if fkey == oxm.TUNNEL_ID:
        if v > oxm.VNI_MAX:
            raise _act(E.BAC_BAD_SET_ARGUMENT, f"set_field tunnel_id {v:#x}: tunnel ids "
                                               "here are 24-bit VNIs")
        return ("set_tun_id", v)
    return ("set_tun_dst", Prefix(value, 32))


def decode_instructions(data: bytes, table: int, match: dict) -> tuple[tuple, int | None]:
    """(actions, goto_table or None) of instructions that hold no others (see
    ``decode_flow_instructions``: those are refused here)."""
    actions, goto, inst = decode_flow_instructions(data, table, match)
    if inst is not None:
        raise OFError(E.BAD_INSTRUCTION, E.BIC_UNSUP_INST,
                      "write/clear actions and write_metadata are not taken here")
    return actions, goto


def decode_flow_instructions(data: bytes, table: int,
                             match: dict) -> tuple[tuple, int | None, Instructions | None]:
    """(apply-actions, goto_table or None, the other instructions or None) of a
    FLOW_MOD's instructions for a rule in ``table`` with ``match``."""
    seen: set[int] = set()
    actions: tuple = ()
    write = md = None
    clear = False
    goto = None
    meter = None
    off = 0
    while off < len(data):
        if off + 4 > len(data):
            raise OFError(E.BAD_INSTRUCTION, E.BIC_BAD_LEN,
                          f"{len(data) - off} stray bytes after the last instruction")
        itype, ilen = struct.unpack_from("!HH", data, off)
        if ilen < 8 or ilen % 8 or off + ilen > len(data):
            raise OFError(E.BAD_INSTRUCTION, E.BIC_BAD_LEN,
                          f"instruction {itype} of length {ilen} at offset {off}")
        body = data[off:off + ilen]
        off += ilen
        if itype in seen:
            raise OFError(E.BAD_INSTRUCTION, E.BIC_UNSUP_INST, f"instruction {itype} twice")
        seen.add(itype)
        if itype == IT_GOTO_TABLE:
            if ilen != 8:
                raise OFError(E.BAD_INSTRUCTION, E.BIC_BAD_LEN, f"GOTO_TABLE of length {ilen}")
            goto = body[4]
            if goto <= table or goto >= TABLES:
                raise OFError(E.BAD_INSTRUCTION, E.BIC_BAD_TABLE_ID,
                              f"goto_table:{goto} from table {table} (a later table of "
                              f"0..{TABLES - 1})")
        elif itype == IT_APPLY_ACTIONS:
            actions = decode_actions(body[8:], match)
        elif itype == IT_METER:
            if ilen != 8:
                raise OFError(E.BAD_INSTRUCTION, E.BIC_BAD_LEN, f"METER of length {ilen}")
            meter, = struct.unpack_from("!I", body, 4)
            if not 1 <= meter <= METER_MAX:
                raise OFError(E.METER_MOD_FAILED, E.MMFC_INVALID_METER,
                              f"meter {meter:#x}: not a meter id a rule can name")
        elif itype == IT_WRITE_ACTIONS:
            write = decode_actions(body[8:], match)   # (of each kind the last is the
                                                      # set's, as in OVS)
        elif itype == IT_CLEAR_ACTIONS:
            if ilen != 8:
                raise OFError(E.BAD_INSTRUCTION, E.BIC_BAD_LEN, f"CLEAR_ACTIONS of length {ilen}")
            clear = True
        elif itype == IT_WRITE_METADATA:
            if ilen != 24:
                raise OFError(E.BAD_INSTRUCTION, E.BIC_BAD_LEN,
                              f"WRITE_METADATA of length {ilen}")
            value, mask = struct.unpack_from("!QQ", body, 8)
            if value & ~mask & U64:
                raise OFError(E.BAD_INSTRUCTION, E.BIC_UNSUP_METADATA,
                              f"write_metadata {value:#x} has bits outside its mask {mask:#x}")
            md = (value, mask)
        elif itype == IT_EXPERIMENTER:
            raise OFError(E.BAD_INSTRUCTION, E.BIC_BAD_EXPERIMENTER,
                          "experimenter instructions are not supported")
        else:
            raise OFError(E.BAD_INSTRUCTION, E.BIC_UNKNOWN_INST, f"instruction type {itype}")
    written = op_count(write or ())
    if op_count(actions) + written > MAX_OPS:
        raise _act(E.BAC_TOO_MANY, f"{op_count(actions) + written} datapath ops: a rule "
                                   f"holds at most {MAX_OPS}")
    if meter is not None:
        if op_count(actions) + written + 1 > MAX_OPS:
            raise _act(E.BAC_TOO_MANY, f"{len(actions)} actions and a meter: a rule holds "
                                       f"at most {MAX_OPS}")
        actions = (("meter", meter),) + actions
    inst = Instructions(write, clear, md)
    return actions, goto, (None if inst == Instructions() else inst)


# -- encoding ------------------------------------------------------------------------------
def output(port: int, max_len: int = 0) -> bytes:
    return struct.pack("!HHIH6x", AT_OUTPUT, 16, port, max_len)


def set_vlan_vid(vid: int) -> bytes:
    return struct.pack("!HHIH6x", AT_SET_FIELD, 16, header(VLAN_VID, 2), vid | OFPVID_PRESENT)


def encode_actions(actions: tuple, match: dict, ofport_of) -> bytes:
    out = []
    state = vlan_state(match)
    for a in actions:
        if a[0] == "output":
            out.append(output(ofport_of(a[1])))
        elif a[0] == "flood":
            out.append(output(C.OFPP_FLOOD))
        elif a[0] == "normal":
            out.append(output(C.OFPP_NORMAL))
        elif a[0] == "controller":
            out.append(output(C.OFPP_CONTROLLER, a[1]))
        elif a[0] == "in_port":
            out.append(output(C.OFPP_IN_PORT))
        elif a[0] == "group":
            out.append(struct.pack("!HHI", AT_GROUP, 8, a[1]))
        elif a[0] == "mod_vlan_vid":
            if state != TAGGED:       # (unknown: as OVS writes mod_vlan_vid in OpenFlow 1.3)
                out.append(struct.pack("!HHH2x", AT_PUSH_VLAN, 8, ETH_P_8021Q))
            out.append(set_vlan_vid(a[1]))
            state = TAGGED
        elif a[0] == "strip_vlan":
            out.append(struct.pack("!HH4x", AT_POP_VLAN, 8))
            state = UNTAGGED
        elif a[0] == "set_field":
            field = FIELD_OF[a[1]]
            size = oxm.SIZES[field]
            value = a[2] if isinstance(a[2], bytes) else a[2].to_bytes(size, "big")
            body = struct.pack("!I", header(field, size)) + value
            out.append(struct.pack("!HH", AT_SET_FIELD, pad8(4 + len(body))) + body +
                       bytes(pad8(4 + len(body)) - 4 - len(body)))
        elif a[0] == "dec_ttl":
            out.append(struct.pack("!HH4x", AT_DEC_NW_TTL, 8))
        elif a[0] == "set_tun_id":
            out.append(struct.pack("!HHIQ", AT_SET_FIELD, 16, header(oxm.TUNNEL_ID, 8), a[1]))
        elif a[0] == "set_tun_dst":
            out.append(struct.pack("!HHI4s4x", AT_SET_FIELD, 16,
                                   header(oxm.NX_TUN_IPV4_DST, 4), a[1].addr))
        else:                                    # (never a rule that reads back otherwise)
            raise ValueError(f"action {a!r} has no OpenFlow form here")
    return b"".join(out)


def encode_instructions(actions: tuple, goto: int | None, match: dict, ofport_of,
                        inst: Instructions | None = None) -> bytes:
    out = b""
    if actions and actions[0][0] == "meter":
        out += struct.pack("!HHI", IT_METER, 8, actions[0][1])
        actions = actions[1:]
    if actions:
        acts = encode_actions(actions, match, ofport_of)
        out += struct.pack("!HH4x", IT_APPLY_ACTIONS, 8 + len(acts)) + acts
    if inst is not None:
        if inst.clear_actions:
            out += struct.pack("!HH4x", IT_CLEAR_ACTIONS, 8)
        if inst.write_actions is not None:
            acts = encode_actions(inst.write_actions, match, ofport_of)
            out += struct.pack("!HH4x", IT_WRITE_ACTIONS, 8 + len(acts)) + acts
        if inst.write_metadata is not None:
            out += struct.pack("!HH4xQQ", IT_WRITE_METADATA, 24, *inst.write_metadata)
    if goto is not None:
        out += struct.pack("!HHB3x", IT_GOTO_TABLE, 8, goto)
    return out
