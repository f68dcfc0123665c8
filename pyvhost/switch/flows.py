"""OpenFlow-like rules in ovs-ofctl syntax: parse and format them, and turn a match into the
(mask, value) pair of raw flow-key bytes the compiled classifier takes.

    table=0,priority=10,cookie=0x5,idle_timeout=30,in_port=vm1,icmp,nw_dst=10.0.0.0/24,actions=drop
    in_port=1,actions=mod_vlan_vid:10,output:2,goto_table:1

Matches: in_port, dl_src, dl_dst (with /mask), dl_type, dl_vlan (0xffff: untagged), vlan_tci
(the 802.1Q TCI as OVS keys it, bit 12 set on every tagged frame, 0 on untagged ones; with
/mask: vlan_tci=0x1000/0x1000 is any tagged frame), nw_src,
nw_dst (prefix or /netmask), nw_proto, nw_tos (the whole TOS byte), ip_dscp (its six DSCP
bits, as OpenFlow's IP_DSCP), nw_ecn (its two ECN bits), dl_vlan_pcp (the 802.1Q priority:
a tagged frame), arp_sha, arp_tha (with /mask; arp), tp_src, tp_dst (with /mask), the
tunnel metadata tun_id (the
VNI, with /mask), tun_src, tun_dst (prefixes), OpenFlow's pipeline register metadata (64
bits, with /mask: 0 when a packet enters table 0, changed by write_metadata), and the
shorthands ip, icmp, tcp, udp, arp; prerequisites as OVS checks them (nw_* needs ip or arp,
tp_* needs tcp, udp or icmp). Actions: output:PORT, flood, drop, normal, mod_vlan_vid:VID,
strip_vlan, set_field:VNI->tun_id, set_field:IP->tun_dst, set_field:VALUE->FIELD for
FIELD eth_src, eth_dst, ip_src, ip_dst, tcp_src, tcp_dst, udp_src, udp_dst, ip_dscp,
vlan_pcp (also mod_dl_src/mod_dl_dst/mod_nw_src/mod_nw_dst/mod_vlan_pcp:VALUE; each with
OVS's prerequisites on the match: ip, tcp, udp, a VLAN tag), dec_ttl, goto_table:N,
controller[:MAX_LEN] (also output:controller[:MAX_LEN]; written CONTROLLER:MAX_LEN as
ovs-ofctl shows it, 65535: the whole frame), in_port (back out of the input port; written
IN_PORT), group:N (an OpenFlow group of the bridge) and meter:N (an OpenFlow meter of the
bridge, OpenFlow's meter instruction: first of the actions, at most one). OpenFlow's other
instructions, written as OVS prints them, after the apply-actions and before goto_table:
clear_actions, write_actions(ACTIONS) (the action set, run when the pipeline ends) and
write_metadata:VALUE[/MASK]. Ports are named here as the user wrote them; a bridge
resolves them. Pure functions and data: no datapath, no I/O.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import sys
from dataclasses import dataclass, field
from typing import NamedTuple

from pyvhost._classifier import TABLES
from pyvhost._flow import MAX_OPS, pack_key

SHORTHANDS = {
    "ip": {"dl_type": 0x0800},
    "icmp": {"dl_type": 0x0800, "nw_proto": 1},
    "tcp": {"dl_type": 0x0800, "nw_proto": 6},
    "udp": {"dl_type": 0x0800, "nw_proto": 17},
    "arp": {"dl_type": 0x0806},
}
U64 = (1 << 64) - 1
INT_FIELDS = {"metadata": U64, "dl_type": 0xFFFF, "dl_vlan": 0xFFFF, "nw_proto": 0xFF,
              "nw_tos": 0xFF, "ip_dscp": 0x3F, "nw_ecn": 3, "dl_vlan_pcp": 7,
              "tp_src": 0xFFFF, "tp_dst": 0xFFFF, "tun_id": 0xFFFFFF, "vlan_tci": 0xFFFF}
MASKABLE_INTS = ("tp_src", "tp_dst", "tun_id", "metadata", "vlan_tci")
MAC_FIELDS = ("dl_src", "dl_dst", "arp_sha", "arp_tha")
MATCH_ALIASES = {"ip_ecn": "nw_ecn", "vlan_pcp": "dl_vlan_pcp"}     # (as OVS takes them)
IP_FIELDS = ("nw_src", "nw_dst", "tun_src", "tun_dst")
FIELD_ORDER = ("metadata", "in_port", "tun_id", "tun_src", "tun_dst", "vlan_tci", "dl_vlan",
               "dl_vlan_pcp",
               "dl_src", "dl_dst", "dl_type", "nw_src", "nw_dst", "nw_proto", "nw_tos",
               "ip_dscp", "nw_ecn", "tp_src", "tp_dst", "arp_sha", "arp_tha")
FIELD_RANK = {name: k for k, name in enumerate(FIELD_ORDER)}
SET_FIELDS = {"tun_id": "set_tun_id", "tun_dst": "set_tun_dst"}   # set_field:V->FIELD
# the header fields a set_field edits: ("set_field", FIELD, value); value bytes for the
# addresses, an int (with its limit here) for the others
PACKET_SET_FIELDS = {"eth_src": None, "eth_dst": None, "ip_src": None, "ip_dst": None,
                     "tcp_src": 0xFFFF, "tcp_dst": 0xFFFF, "udp_src": 0xFFFF,
                     "udp_dst": 0xFFFF, "ip_dscp": 0x3F, "vlan_pcp": 7}
MOD_ALIASES = {"mod_dl_src": "eth_src", "mod_dl_dst": "eth_dst", "mod_nw_src": "ip_src",
               "mod_nw_dst": "ip_dst", "mod_vlan_pcp": "vlan_pcp"}
SHORTHAND_OF = {(v["dl_type"], v.get("nw_proto")): k for k, v in SHORTHANDS.items()}
DEFAULT_PRIORITY = 32768
VLAN_NONE = 0xFFFF
MAX_RULE_TEXT = 4096
METER_MAX = 0xFFFF0000           # OpenFlow's OFPM_MAX
CONTROLLER_MAX_LEN = 0xFFFF      # OpenFlow's OFPCML_NO_BUFFER: the whole frame
UPPER_ACTIONS = {"controller": "CONTROLLER", "in_port": "IN_PORT"}   # as ovs-ofctl writes them
FULL_MAC = b"\xff" * 6


class FlowSyntaxError(ValueError):
    """A flow or match the parser cannot take; the message says where."""


class Prefix(NamedTuple):
    """An IPv4 address with a prefix length (small: a rule set holds 100k of them), or with
    any other netmask (OVS and OpenFlow take those too): ``plen`` -1 and the mask's bytes
    in ``netmask``. Only a prefix has a trie in the classifier; any mask matches there."""

    addr: bytes           # 4 bytes, the bits outside the mask cleared
    plen: int             # 0..32, or -1: not a prefix (see netmask)
    netmask: bytes = b""  # the 4-byte mask when plen is -1

    @classmethod
    def parse(cls, text: str) -> Prefix:
        addr, slash, plen = text.partition("/")
        if _PLAIN_PREFIX.fullmatch(text):
            n = int(plen) if slash else 32             # the common spellings, quickly
            try:
                packed = socket.inet_aton(addr)        # (a part over 255 is an error)
            except OSError:
                packed = None
            if packed is not None and n <= 32:
                if n == 32:
                    return cls(packed, 32)
                value = int.from_bytes(packed, "big") & (0xFFFFFFFF << (32 - n)) & 0xFFFFFFFF
                return cls(value.to_bytes(4, "big"), n)
        if "." in plen:                                # a netmask, as OVS reads one: its
            return cls._with_netmask(addr, plen)       # 1 bits are the ones matched
        net = ipaddress.IPv4Network(text, strict=False)  # (or an error to report)
        return cls(net.network_address.packed, net.prefixlen)

    @classmethod
    def _with_netmask(cls, addr: str, mask: str) -> Prefix:
        """ADDR/NETMASK matches the netmask's 1 bits, as OVS does (ipaddress would take
        0.0.255.255 for a Cisco host mask, /16: the opposite of what OVS matches); a
        contiguous one is the prefix it spells."""
        value, m = _dotted_quad(addr), _dotted_quad(mask)
        if value is None or m is None:
            raise ValueError(f"{addr}/{mask}: not an address and netmask")
        return cls.masked((value & m).to_bytes(4, "big"), m)

    @classmethod
    def masked(cls, addr: bytes, mask: int) -> Prefix:
        """``addr`` (its bits outside ``mask`` already clear) under a 32-bit ``mask``."""
        host = mask ^ 0xFFFFFFFF
        if host & (host + 1):
            return cls(addr, -1, mask.to_bytes(4, "big"))
        return cls(addr, 32 - host.bit_length())

    @property
    def mask(self) -> bytes:
        if self.plen < 0:
            return self.netmask
        return ((0xFFFFFFFF << (32 - self.plen)) & 0xFFFFFFFF).to_bytes(4, "big")

    def __str__(self) -> str:
        ip = socket.inet_ntoa(self.addr)
        if self.plen < 0:
            return f"{ip}/{socket.inet_ntoa(self.netmask)}"
        return ip if self.plen == 32 else f"{ip}/{self.plen}"


# four plain decimals (no leading zero, as _decimal) and an optional plain /N: Prefix.parse's
# quick path
_PLAIN_PREFIX = re.compile(r"(?:(?:0|[1-9][0-9]{0,2})\.){3}(?:0|[1-9][0-9]{0,2})"
                           r"(?:/(?:0|[1-9][0-9]?))?", re.ASCII)


def _dotted_quad(text: str) -> int | None:
    """Four plain decimal parts of 0..255 (inet_aton would also take octal, hex and
    trailing text), as a number; None if it is not that."""
    parts = text.split(".")
    if len(parts) != 4 or not all(_decimal(p, 3) and int(p) <= 255 for p in parts):
        return None
    return int.from_bytes(bytes(int(p) for p in parts), "big")


def _decimal(text: str, digits: int) -> bool:
    """A plain decimal of at most ``digits`` digits without a leading zero (ipaddress
    refuses those as ambiguous)."""
    return 0 < len(text) <= digits and text.isascii() and text.isdigit() and \
        (text[0] != "0" or len(text) == 1)


def _int(text: str, name: str, limit: int) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise FlowSyntaxError(f"{name}: {text!r} is not a number") from None
    if not 0 <= value <= limit:
        raise FlowSyntaxError(f"{name}: {value} out of range 0..{limit}")
    return value


def _mac(text: str, name: str) -> bytes:
    parts = text.split(":")
    try:
        if len(parts) != 6 or any(not 1 <= len(p) <= 2 for p in parts):
            raise ValueError
        return bytes(int(p, 16) for p in parts)
    except ValueError:
        raise FlowSyntaxError(f"{name}: {text!r} is not a MAC address") from None


def _net(text: str, name: str) -> Prefix:
    try:
        return Prefix.parse(text)
    except ValueError:
        raise FlowSyntaxError(f"{name}: {text!r} is not an IPv4 address or prefix") \
            from None


def _split_top(text: str) -> list[str]:
    """Comma-separated parts, a comma inside parentheses (write_actions(...)) kept."""
    if "(" not in text:
        return [p.strip() for p in text.split(",") if p.strip()]
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise FlowSyntaxError(f"unbalanced ')' in {text!r}")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise FlowSyntaxError(f"unbalanced '(' in {text!r}")
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def port_ref(text: str) -> str:
    """A port as a rule names it: a name, or an OpenFlow number in one spelling (01 -> 1)."""
    return sys.intern(str(int(text)) if text.isdigit() else text)


def parse_match(text: str) -> dict:
    """A match string (no actions, no priority) into {field: value}; MAC and tp_* fields
    with a mask are (value, mask) pairs, IP fields networks."""
    return _parse_match_parts(_split_top(text))


def _parse_match_parts(parts: list[str]) -> dict:
    match: dict = {}
    for part in parts:
        name, eq, value = part.partition("=")
        name = sys.intern(MATCH_ALIASES.get(name.strip(), name.strip()))
        if not eq:
            if name in SHORTHANDS:
                match.update(SHORTHANDS[name])
                continue
            raise FlowSyntaxError(f"unknown match {name!r}")
        value = value.strip()
        if name in match:
            raise FlowSyntaxError(f"{name} given twice")
        if name == "in_port":
            if not value:
                raise FlowSyntaxError("in_port needs a port")
            match[name] = port_ref(value)
        elif name in MASKABLE_INTS and "/" in value:
            v, _, m = value.partition("/")
            match[name] = (_int(v, name, INT_FIELDS[name]), _int(m, name, INT_FIELDS[name]))
            if name == "metadata":                     # as OVS keeps it: value under mask
                v, m = match[name]
                match[name] = v if m == U64 else (v & m, m)
        elif name in INT_FIELDS:
            match[name] = _int(value, name, INT_FIELDS[name])
            if name == "dl_vlan" and match[name] > 0xFFF and match[name] != VLAN_NONE:
                raise FlowSyntaxError(f"dl_vlan: {match[name]} out of range 0..4095 "
                                      "(or 0xffff: untagged)")
        elif name in MAC_FIELDS:
            v, slash, m = value.partition("/")
            mac, mask = _mac(v, name), _mac(m, name) if slash else FULL_MAC
            match[name] = mac if mask == FULL_MAC else (mac, mask)
        elif name in IP_FIELDS:
            match[name] = _net(value, name)
        else:
            raise FlowSyntaxError(f"unknown match field {name!r}")
    if "vlan_tci" in match:
        if "dl_vlan" in match or "dl_vlan_pcp" in match:
            raise FlowSyntaxError("vlan_tci with dl_vlan or dl_vlan_pcp: give the tag one way")
        tci = match.pop("vlan_tci")
        match.update(vlan_match(*(tci if isinstance(tci, tuple) else (tci, 0xFFFF))))
    _check_prerequisites(match)
    return match


def vlan_match(value: int, mask: int) -> dict:
    """The match fields of a masked 802.1Q TCI (bit 12: tagged), as OVS prints it: dl_vlan
    and/or dl_vlan_pcp when the mask asks for a tag and whole VID/PCP fields, dl_vlan=0xffff
    for exactly untagged, else vlan_tci=(value, mask) (value under the mask; none at all
    for mask 0)."""
    value &= mask
    vid_m, pcp_m = mask & 0x0FFF, mask & 0xE000
    if mask & value & 0x1000 and vid_m in (0, 0x0FFF) and pcp_m in (0, 0xE000) and \
            (vid_m or pcp_m):
        out = {}
        if vid_m:
            out["dl_vlan"] = value & 0x0FFF
        if pcp_m:
            out["dl_vlan_pcp"] = value >> 13
        return out
    if mask == 0xFFFF and value == 0:
        return {"dl_vlan": VLAN_NONE}
    return {"vlan_tci": (value, mask)} if mask else {}


def vlan_tagged(match: dict) -> bool | None:
    """Whether every frame the match takes has a VLAN tag (True), none has (False), or
    either may (None)."""
    if "vlan_tci" in match:
        value, mask = match["vlan_tci"]
        return bool(value & 0x1000) if mask & 0x1000 else None
    v = match.get("dl_vlan")
    if v is None:
        return True if "dl_vlan_pcp" in match else None    # a priority match implies a tag
    return v != VLAN_NONE


def _check_prerequisites(match: dict) -> None:
    dl_type = match.get("dl_type")
    for name in ("nw_src", "nw_dst"):
        if name in match and dl_type not in (0x0800, 0x0806):
            raise FlowSyntaxError(f"{name}: prerequisites not met (needs ip or arp)")
    if "nw_tos" in match and ("ip_dscp" in match or "nw_ecn" in match):
        raise FlowSyntaxError("nw_tos with ip_dscp or nw_ecn: nw_tos is the whole TOS byte")
    if "dl_vlan_pcp" in match and match.get("dl_vlan") == VLAN_NONE:
        raise FlowSyntaxError("dl_vlan_pcp: prerequisites not met (a tagged frame, not "
                              "dl_vlan=0xffff)")
    for name in ("arp_sha", "arp_tha"):
        if name in match and dl_type != 0x0806:
            raise FlowSyntaxError(f"{name}: prerequisites not met (needs arp)")
    for name in ("nw_proto", "nw_tos", "ip_dscp", "nw_ecn"):
        if name in match and dl_type != 0x0800 and not (name == "nw_proto" and
                                                        dl_type == 0x0806):
            raise FlowSyntaxError(f"{name}: prerequisites not met (needs ip)")
    for name in ("tp_src", "tp_dst"):
        if name in match and (dl_type != 0x0800 or match.get("nw_proto") not in (1, 6, 17)):
            raise FlowSyntaxError(f"{name}: prerequisites not met (needs tcp, udp or icmp)")


@dataclass(slots=True, frozen=True)
class Instructions:
    """OpenFlow's instructions besides apply-actions, meter and goto_table. Frozen: parses
    are shared between rules (parse_flow keeps the last texts'), nothing may change one."""

    write_actions: tuple | None = None     # None: no write_actions instruction
    clear_actions: bool = False
    write_metadata: tuple[int, int] | None = None   # (value, mask)


def parse_instructions(text: str) -> tuple[tuple, int | None, Instructions]:
    """(apply-actions, goto_table or None, the other instructions) of an actions= text, in
    OpenFlow's order: meter, apply-actions, clear_actions, write_actions(...),
    write_metadata, goto_table."""
    write = md = None
    clear = False
    rest = []
    stage = 0                                  # 1 clear, 2 write_actions, 3 write_metadata
    for part in _split_top(text):
        name, _, arg = part.partition(":")
        name = name.strip()
        if rest and rest[-1].startswith("goto_table"):
            raise FlowSyntaxError("goto_table must be the last action")
        if name.startswith("write_actions("):
            if not part.endswith(")"):
                raise FlowSyntaxError(f"write_actions(...): {part!r}")
            if stage >= 2:
                raise FlowSyntaxError("write_actions: once, after clear_actions and before "
                                      "write_metadata")
            stage = 2
            write = parse_actions(part[len("write_actions("):-1], inner=True)[0]
        elif name == "clear_actions" and not arg:
            if stage >= 1:
                raise FlowSyntaxError("clear_actions: once, before write_actions and "
                                      "write_metadata")
            stage = 1
            clear = True
        elif name == "write_metadata":
            if stage >= 3:
                raise FlowSyntaxError("write_metadata given twice")
            stage = 3
            v, slash, m = arg.strip().partition("/")
            value = _int(v, "write_metadata", U64)
            mask = _int(m, "write_metadata", U64) if slash else U64
            if value & ~mask:
                raise FlowSyntaxError(f"write_metadata: value {value:#x} has bits outside "
                                      f"its mask {mask:#x}")
            md = (value, mask)
        else:
            if stage and name != "goto_table":
                raise FlowSyntaxError(f"{part!r}: apply-actions come before clear_actions, "
                                      "write_actions and write_metadata")
            rest.append(part)
    actions, goto = parse_actions(",".join(rest), n_other=op_count(write or ()))
    return actions, goto, Instructions(write, clear, md)


def parse_actions(text: str, inner: bool = False, n_other: int = 0) -> tuple[tuple, int | None]:
    """(actions, goto_table or None); names interned (a rule set holds 100k of them).
    ``inner``: the actions of write_actions(...) (no goto_table, meter or drop there)."""
    actions: list[tuple] = []
    goto = None
    for part in _split_top(text):
        name, _, arg = part.partition(":")
        name = name.strip().lower()                # as OVS: NORMAL, normal, Normal
        if goto is not None:
            raise FlowSyntaxError("goto_table must be the last action")
        if inner and name in ("goto_table", "meter", "drop", "write_actions",
                              "clear_actions", "write_metadata"):
            raise FlowSyntaxError(f"write_actions(...) cannot hold {name}")
        if name == "output" and arg.strip().lower().partition(":")[0] in UPPER_ACTIONS:
            name, _, arg = arg.strip().partition(":")         # output:CONTROLLER[:N] ...
            name = name.lower()
        if name == "controller":
            max_len = _int(arg, "controller", 0xFFFF) if arg.strip() else CONTROLLER_MAX_LEN
            actions.append(("controller", max_len))
        elif name == "in_port" and not arg:
            actions.append(("in_port",))
        elif name == "output":
            if not arg.strip():
                raise FlowSyntaxError("output needs a port: output:PORT")
            actions.append(("output", port_ref(arg.strip())))
        elif name == "mod_vlan_vid":
            actions.append(("mod_vlan_vid", _int(arg, "mod_vlan_vid", 0xFFF)))
        elif name == "goto_table":
            goto = _int(arg, "goto_table", TABLES - 1)
        elif name in MOD_ALIASES:
            actions.append(_set_field(MOD_ALIASES[name], arg.strip()))
        elif name == "set_field" and arg.partition("->")[2].strip() in PACKET_SET_FIELDS:
            value, _, target = arg.partition("->")
            actions.append(_set_field(target.strip(), value.strip()))
        elif name == "set_field":
            value, arrow, target = arg.partition("->")
            target = target.strip()
            if not arrow or target not in SET_FIELDS:
                raise FlowSyntaxError(f"set_field: VALUE->tun_id or VALUE->tun_dst or a "
                                      f"header field ({', '.join(PACKET_SET_FIELDS)}), "
                                      f"not {arg!r}")
            if target == "tun_id":
                actions.append(("set_tun_id", _int(value.strip(), "tun_id", 0xFFFFFF)))
            else:
                ip = _net(value.strip(), "tun_dst")
                if ip.plen != 32:
                    raise FlowSyntaxError(f"tun_dst: one address, not {ip}")
                actions.append(("set_tun_dst", ip))
        elif name == "group":
            actions.append(("group", _int(arg, "group", 0xFFFFFF00)))
        elif name == "meter":
            if actions:
                raise FlowSyntaxError("meter:N must be the first action (and only one)")
            meter = _int(arg, "meter", METER_MAX)
            if meter == 0:
                raise FlowSyntaxError("meter: 0 is not a meter (1..0xffff0000)")
            actions.append(("meter", meter))
        elif name in ("flood", "drop", "normal", "strip_vlan", "dec_ttl") and not arg:
            actions.append((sys.intern(name),))
        else:
            raise FlowSyntaxError(f"unknown action {part!r}")
    if any(a[0] == "drop" for a in actions) and (len(actions) > 1 or goto is not None):
        raise FlowSyntaxError("drop cannot be combined with other actions")
    if op_count(actions) + n_other > MAX_OPS:
        raise FlowSyntaxError(f"{len(actions)} actions taking {op_count(actions) + n_other} "
                              f"datapath ops in all: a rule holds at most {MAX_OPS}")
    return tuple(a for a in actions if a[0] != "drop"), goto


def op_count(actions: tuple) -> int:
    """Datapath ops the actions take (a wide value takes 16 bits per op: a MAC 3, an IPv4
    address or a tunnel field 2)."""
    n = 0
    for a in actions:
        if a[0] == "set_field" and isinstance(a[2], bytes):
            n += len(a[2]) // 2
        else:
            n += 2 if a[0] in ("set_tun_id", "set_tun_dst") else 1
    return n


# the instructions of the last action texts parse_flow read (rules share a few: a file of
# 100k rules often has one or two), and what they parse into, shared by the flows that have
# them (nothing changes a Flow's actions or Instructions in place); and the texts of the
# last apply-actions Flow.format_actions wrote
INSTRUCTIONS_CACHED = 1024
_INSTRUCTIONS: dict[str, tuple[tuple, int | None, Instructions]] = {}
_ACTION_TEXTS: dict[tuple, str] = {}


@dataclass(slots=True)
class Flow:
    """A rule as written: where it lives, its match and actions (ports still by name)."""

    priority: int = DEFAULT_PRIORITY
    match: dict = field(default_factory=dict)
    actions: tuple = ()
    table: int = 0
    cookie: int = 0
    idle_timeout: int = 0
    hard_timeout: int = 0
    goto_table: int | None = None
    inst: Instructions | None = None        # clear/write actions, write_metadata (None: none)

    def all_actions(self) -> tuple:
        """Every action the rule names: its apply-actions, then its write_actions (what
        walks a rule's ports, groups or meters walks this, never ``actions`` alone)."""
        written = self.inst.write_actions if self.inst is not None else None
        return self.actions + written if written else self.actions

    def format_match(self) -> str:
        parts = []
        rest = dict(self.match)
        short = SHORTHAND_OF.get((rest.get("dl_type"), rest.get("nw_proto"))) or \
            SHORTHAND_OF.get((rest.get("dl_type"), None))
        if short is not None:                          # the most specific shorthand
            parts.append(short)
            for k in SHORTHANDS[short]:
                del rest[k]
        for name in sorted((n for n in rest if n in FIELD_RANK), key=FIELD_RANK.__getitem__):
            v = rest[name]
            if name in MAC_FIELDS:
                v = v.hex(":") if isinstance(v, bytes) else f"{v[0].hex(':')}/{v[1].hex(':')}"
            elif name in IP_FIELDS:
                v = str(v)
            elif name in ("tun_id", "metadata"):
                v = f"0x{v[0]:x}/0x{v[1]:x}" if isinstance(v, tuple) else f"0x{v:x}"
            elif name == "vlan_tci" and v[1] == 0xFFFF:
                v = f"0x{v[0]:04x}"
            elif isinstance(v, tuple):
                v = f"0x{v[0]:04x}/0x{v[1]:04x}"
            elif name in ("dl_type", "dl_vlan") and (name == "dl_type" or v == VLAN_NONE):
                v = f"0x{v:04x}"
            parts.append(f"{name}={v}")
        return ",".join(parts)

    def format_actions(self) -> str:
        inst = self.inst
        if inst is None:                   # (the common case: a few texts for many rules)
            key = (self.actions, self.goto_table)
            text = _ACTION_TEXTS.get(key)
            if text is None:
                text = self._format_actions()
                if len(_ACTION_TEXTS) >= INSTRUCTIONS_CACHED:
                    _ACTION_TEXTS.clear()
                _ACTION_TEXTS[key] = text
            return text
        return self._format_actions()

    def _format_actions(self) -> str:
        out = [format_action(a) for a in self.actions]
        inst = self.inst
        if inst is not None:
            if inst.clear_actions:
                out.append("clear_actions")
            if inst.write_actions is not None:
                out.append(f"write_actions({','.join(map(format_action, inst.write_actions))})")
            if inst.write_metadata is not None:
                v, m = inst.write_metadata
                out.append(f"write_metadata:0x{v:x}" + (f"/0x{m:x}" if m != U64 else ""))
        if self.goto_table is not None:
            out.append(f"goto_table:{self.goto_table}")
        return ",".join(out) or "drop"

    def _head(self) -> list[str]:
        head = []
        if self.cookie:
            head.append(f"cookie=0x{self.cookie:x}")
        if self.table:
            head.append(f"table={self.table}")
        if self.idle_timeout:
            head.append(f"idle_timeout={self.idle_timeout}")
        if self.hard_timeout:
            head.append(f"hard_timeout={self.hard_timeout}")
        return head

    def format(self) -> str:
        """The rule as add-flow takes it (what the store keeps)."""
        match = self.format_match()
        head = ",".join(self._head() + [f"priority={self.priority}"] + ([match] if match else []))
        return f"{head},actions={self.format_actions()}"

    def format_body(self) -> str:
        """``priority=N,MATCH actions=ACTIONS`` (the tail of a dump-flows line)."""
        match = self.format_match()
        return f"priority={self.priority}" + (f",{match}" if match else "") + \
            f" actions={self.format_actions()}"

    def format_spec(self) -> str:
        """The rule as ``dump-flows --no-stats`` prints it (cookie, table and timeouts
        first when set)."""
        return "".join(f"{h}, " for h in self._head()) + self.format_body()


def _set_field(name: str, text: str) -> tuple:
    limit = PACKET_SET_FIELDS[name]
    if name in ("eth_src", "eth_dst"):
        return ("set_field", name, _mac(text, name))
    if name in ("ip_src", "ip_dst"):
        ip = _net(text, name)
        if ip.plen != 32:
            raise FlowSyntaxError(f"{name}: one address, not {ip}")
        return ("set_field", name, ip.addr)
    return ("set_field", name, _int(text, name, limit))


def format_action(a: tuple) -> str:
    if a[0] in ("set_tun_id", "set_tun_dst"):
        return f"set_field:{a[1]}->{a[0][4:]}"
    if a[0] == "set_field":
        v = a[2]
        text = v.hex(":") if isinstance(v, bytes) and len(v) == 6 else \
            socket.inet_ntoa(v) if isinstance(v, bytes) else str(v)
        return f"set_field:{text}->{a[1]}"
    name = UPPER_ACTIONS.get(a[0], a[0])
    return f"{name}:{a[1]}" if len(a) == 2 else name


HEAD_INTS = {"priority": 0xFFFF, "table": TABLES - 1, "idle_timeout": 0xFFFF,
             "hard_timeout": 0xFFFF, "cookie": (1 << 64) - 1}


def parse_flow(text: str) -> Flow:
    """``[table=N,][cookie=C,][priority=N,][idle_timeout=S,][hard_timeout=S,]MATCH,
    actions=ACTIONS`` (ovs-ofctl add-flow syntax)."""
    if len(text) > MAX_RULE_TEXT:
        raise FlowSyntaxError(f"a flow of {len(text)} characters (at most {MAX_RULE_TEXT})")
    head, sep, actions = text.partition("actions=")
    if not sep:
        raise FlowSyntaxError("a flow needs actions=...")
    flow = Flow()
    rest = []
    for part in _split_top(head):
        name, eq, value = part.partition("=")
        name = name.strip()
        if eq and name in HEAD_INTS:
            setattr(flow, name, _int(value.strip(), name, HEAD_INTS[name]))
        else:
            rest.append(part)
    flow.match = _parse_match_parts(rest)      # (parts stripped, none empty)
    parsed = _INSTRUCTIONS.get(actions)
    if parsed is None:
        parsed = parse_instructions(actions)
        if len(_INSTRUCTIONS) >= INSTRUCTIONS_CACHED:
            _INSTRUCTIONS.clear()
        _INSTRUCTIONS[actions] = parsed
    flow.actions, flow.goto_table, inst = parsed
    if inst != Instructions():
        flow.inst = inst
    check_action_prerequisites(flow.match, flow.actions)
    check_action_prerequisites(flow.match, inst.write_actions or ())
    if flow.goto_table is not None and flow.goto_table <= flow.table:
        raise FlowSyntaxError(f"goto_table:{flow.goto_table} must name a later table than "
                              f"{flow.table}")
    return flow


def check_action_prerequisites(match: dict, actions: tuple) -> None:
    """A set_field only on packets that have its header, as OVS checks it: ip_* needs ip,
    tcp_*/udp_* tcp/udp, vlan_pcp a VLAN tag (matched, or pushed by mod_vlan_vid before)."""
    tagged = bool(vlan_tagged(match))
    for a in actions:
        if a[0] == "mod_vlan_vid":
            tagged = True
        elif a[0] == "strip_vlan":
            tagged = False
        if a[0] != "set_field":
            continue
        name = a[1]
        proto = {"tcp": 6, "udp": 17}.get(name[:3])
        if (name.startswith("ip_") or proto) and match.get("dl_type") != 0x0800:
            raise FlowSyntaxError(f"set_field {name}: prerequisites not met (needs ip)")
        if proto and match.get("nw_proto") != proto:
            raise FlowSyntaxError(f"set_field {name}: prerequisites not met (needs "
                                  f"{name[:3]})")
        if name == "vlan_pcp" and not tagged:
            raise FlowSyntaxError("set_field vlan_pcp: prerequisites not met (needs a VLAN "
                                  "tag: dl_vlan=N or mod_vlan_vid before)")


def split_canonical(text: str) -> tuple[dict[str, str], str]:
    """What ``Flow.format()`` wrote, taken apart without parsing it again: the head
    fields that are set ({"cookie": "0x5", "table": "1", ...}, in format order) and the
    body as ``format_body`` prints it."""
    pre, _, actions = text.partition(",actions=")
    at = pre.index("priority=")
    head = dict(item.split("=", 1) for item in pre[:at].split(",") if item)
    return head, f"{pre[at:]} actions={actions}"


def canonical_head(text: str) -> tuple[int, int, int, bool]:
    """(table, priority, cookie, whether it has a match) of what ``Flow.format()`` wrote,
    without parsing it again (a PACKET_IN names its rule's cookie: per frame)."""
    head, body = split_canonical(text)
    priority, _, match = body.partition(" actions=")[0].partition(",")
    return (int(head.get("table", "0")), int(priority.removeprefix("priority=")),
            int(head.get("cookie", "0x0"), 16), bool(match))


@dataclass(slots=True)
class Selector:
    """del-flows/dump-flows: which rules (table None: all; cookie with its mask; for
    --strict the priority too)."""

    match: dict
    table: int | None = None
    cookie: int = 0
    cookie_mask: int = 0
    priority: int = DEFAULT_PRIORITY


def parse_selector(text: str) -> Selector:
    """``[table=N,][cookie=C/MASK,][priority=N,]MATCH`` as del-flows and dump-flows take it."""
    sel = Selector({})
    rest = []
    for part in _split_top(text):
        name, eq, value = part.partition("=")
        name, value = name.strip(), value.strip()
        if eq and name == "cookie":
            v, slash, m = value.partition("/")
            sel.cookie = _int(v, "cookie", HEAD_INTS["cookie"])
            full = HEAD_INTS["cookie"]
            sel.cookie_mask = _int(m, "cookie", full) if slash else full
        elif eq and name == "table":
            sel.table = _int(value, "table", TABLES - 1)
        elif eq and name == "priority":
            sel.priority = _int(value, "priority", 0xFFFF)
        elif name == "actions" or part.startswith("actions="):
            raise FlowSyntaxError("a match takes no actions")
        else:
            rest.append(part)
    sel.match = parse_match(",".join(rest))
    return sel


def match_key(match: dict, in_port_id: int | None) -> tuple[bytes, bytes]:
    """(mask, value) of a match as raw flow-key bytes, the value's bits outside the mask
    clear (so equal matches give equal bytes: Bridge.identity); ``in_port_id`` is the
    resolved in_port (ignored when the match has none)."""
    value: dict = {}
    mask: dict = {}
    for name, v in match.items():
        if name == "metadata":
            continue                               # not a key field: ``metadata_key``
        if name == "in_port":
            value["in_port"], mask["in_port"] = in_port_id, 0xFFFF
        elif name == "dl_vlan":
            if v == VLAN_NONE:
                value["vlan_tci"], mask["vlan_tci"] = 0, 0xFFFF
            else:
                value["vlan_tci"] = value.get("vlan_tci", 0) | v | 0x1000
                mask["vlan_tci"] = mask.get("vlan_tci", 0) | 0x1FFF
        elif name in MAC_FIELDS:
            if isinstance(v, bytes):
                value[name], mask[name] = v, FULL_MAC
            else:
                mac, m = v
                bits = int.from_bytes(mac, "big") & int.from_bytes(m, "big")
                value[name], mask[name] = bits.to_bytes(6, "big"), m
        elif name in IP_FIELDS:
            value[name], mask[name] = v.addr, v.mask
        elif name in ("ip_dscp", "nw_ecn"):             # parts of the TOS byte
            shift, bits = (2, 0xFC) if name == "ip_dscp" else (0, 0x03)
            value["nw_tos"] = value.get("nw_tos", 0) | v << shift
            mask["nw_tos"] = mask.get("nw_tos", 0) | bits
        elif name == "dl_vlan_pcp":                     # a tag with this priority
            value["vlan_tci"] = value.get("vlan_tci", 0) | v << 13 | 0x1000
            mask["vlan_tci"] = mask.get("vlan_tci", 0) | 0xF000
        elif isinstance(v, tuple):
            value[name], mask[name] = v[0] & v[1], v[1]
        else:
            value[name] = v & INT_FIELDS[name]
            mask[name] = INT_FIELDS[name]
    return pack_key(mask), pack_key(value)


def metadata_key(match: dict) -> tuple[bytes, bytes]:
    """(mask, value) of the match's metadata as the classifier's word after the key
    (native byte order; both 0: metadata not matched)."""
    v = match.get("metadata")
    if v is None:
        return bytes(8), bytes(8)
    value, mask = (v, U64) if isinstance(v, int) else v
    return mask.to_bytes(8, sys.byteorder), (value & mask).to_bytes(8, sys.byteorder)


def key_fields(match: dict) -> dict:
    """A match given with exact values (``trace``) as the key fields of one packet."""
    fields: dict = {}
    for name, v in match.items():
        if name in ("in_port", "metadata"):
            continue
        if name == "dl_vlan":
            if v != VLAN_NONE:
                fields["vlan_tci"] = fields.get("vlan_tci", 0) | v | 0x1000
        elif name == "dl_vlan_pcp":
            fields["vlan_tci"] = fields.get("vlan_tci", 0) | v << 13 | 0x1000
        elif name == "nw_ecn":
            fields["nw_tos"] = fields.get("nw_tos", 0) | v
        elif name in MAC_FIELDS:
            fields[name] = v if isinstance(v, bytes) else v[0]
        elif name in IP_FIELDS:
            if v.plen != 32:
                raise FlowSyntaxError(f"{name}: a packet has one address, not {v}")
            fields[name] = v.addr
        elif name == "ip_dscp":
            fields["nw_tos"] = fields.get("nw_tos", 0) | v << 2
        else:
            fields[name] = v[0] if isinstance(v, tuple) else v
    return fields
