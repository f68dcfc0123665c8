"""OpenFlow-like rules in ovs-ofctl syntax: parse, format, match against a flow key.

    priority=10,in_port=vm1,icmp,nw_dst=10.0.0.0/24,actions=drop
    in_port=1,actions=mod_vlan_vid:10,output:2

Matches: in_port, dl_src, dl_dst, dl_type, dl_vlan, nw_src, nw_dst (with /prefix),
nw_proto, tp_src, tp_dst, and the shorthands ip, icmp, tcp, udp, arp. Actions: output:PORT,
flood, drop, normal, mod_vlan_vid:VID, strip_vlan. Ports are named here as the user wrote
them; a bridge resolves them. Pure functions and data: no datapath, no I/O.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

SHORTHANDS = {
    "ip": {"dl_type": 0x0800},
    "icmp": {"dl_type": 0x0800, "nw_proto": 1},
    "tcp": {"dl_type": 0x0800, "nw_proto": 6},
    "udp": {"dl_type": 0x0800, "nw_proto": 17},
    "arp": {"dl_type": 0x0806},
}
INT_FIELDS = {"dl_type": 0xFFFF, "dl_vlan": 0xFFF, "nw_proto": 0xFF, "tp_src": 0xFFFF,
              "tp_dst": 0xFFFF}
MAC_FIELDS = ("dl_src", "dl_dst")
IP_FIELDS = ("nw_src", "nw_dst")
FIELD_ORDER = ("in_port", "dl_vlan", "dl_src", "dl_dst", "dl_type", "nw_src", "nw_dst",
               "nw_proto", "tp_src", "tp_dst")
ACTION_NAMES = ("output", "flood", "drop", "normal", "mod_vlan_vid", "strip_vlan")


class FlowSyntaxError(ValueError):
    """A flow or match the parser cannot take; the message says where."""


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
        if len(parts) != 6:
            raise ValueError
        return bytes(int(p, 16) for p in parts)
    except ValueError:
        raise FlowSyntaxError(f"{name}: {text!r} is not a MAC address") from None


def _net(text: str, name: str) -> ipaddress.IPv4Network:
    try:
        return ipaddress.IPv4Network(text, strict=False)
    except ValueError:
        raise FlowSyntaxError(f"{name}: {text!r} is not an IPv4 address or prefix") from None


def _split_top(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def parse_match(text: str) -> dict:
    """A match string (no actions, no priority) into {field: value}."""
    match: dict = {}
    for part in _split_top(text):
        name, eq, value = part.partition("=")
        name = name.strip()
        if not eq:
            if name in SHORTHANDS:
                match.update(SHORTHANDS[name])
                continue
            raise FlowSyntaxError(f"unknown match {name!r}")
        value = value.strip()
        if name == "in_port":
            match[name] = value
        elif name in INT_FIELDS:
            match[name] = _int(value, name, INT_FIELDS[name])
        elif name in MAC_FIELDS:
            match[name] = _mac(value, name)
        elif name in IP_FIELDS:
            match[name] = _net(value, name)
        else:
            raise FlowSyntaxError(f"unknown match field {name!r}")
    return match


def parse_actions(text: str) -> list[tuple]:
    actions = []
    for part in _split_top(text):
        name, _, arg = part.partition(":")
        name = name.strip()
        if name == "output":
            if not arg:
                raise FlowSyntaxError("output needs a port: output:PORT")
            actions.append(("output", arg.strip()))
        elif name == "mod_vlan_vid":
            actions.append(("mod_vlan_vid", _int(arg, "mod_vlan_vid", 0xFFF)))
        elif name in ("flood", "drop", "normal", "strip_vlan") and not arg:
            actions.append((name,))
        else:
            raise FlowSyntaxError(f"unknown action {part!r}")
    if any(a[0] == "drop" for a in actions) and len(actions) > 1:
        raise FlowSyntaxError("drop cannot be combined with other actions")
    return actions


@dataclass
class Flow:
    """A rule as written: priority, match and actions (ports still by name)."""

    priority: int = 32768
    match: dict = field(default_factory=dict)
    actions: list = field(default_factory=list)

    def format_match(self) -> str:
        parts = []
        for name in FIELD_ORDER:
            if name not in self.match:
                continue
            v = self.match[name]
            if name in MAC_FIELDS:
                v = v.hex(":")
            elif name in IP_FIELDS:
                v = str(v.network_address) if v.prefixlen == 32 else str(v)
            elif name == "dl_type":
                v = f"0x{v:04x}"
            parts.append(f"{name}={v}")
        return ",".join(parts)

    def format_actions(self) -> str:
        out = []
        for a in self.actions:
            if a[0] in ("output", "mod_vlan_vid"):
                out.append(f"{a[0]}:{a[1]}")
            else:
                out.append(a[0])
        return ",".join(out) or "drop"

    def format(self) -> str:
        match = self.format_match()
        head = f"priority={self.priority}" + (f",{match}" if match else "")
        return f"{head},actions={self.format_actions()}"


def parse_flow(text: str) -> Flow:
    """``[priority=N,]MATCH,actions=ACTIONS`` (ovs-ofctl add-flow syntax)."""
    head, sep, actions = text.partition("actions=")
    if not sep:
        raise FlowSyntaxError("a flow needs actions=...")
    flow = Flow()
    rest = []
    for part in _split_top(head):
        if part.startswith("priority="):
            flow.priority = _int(part[len("priority="):], "priority", 65535)
        else:
            rest.append(part)
    flow.match = parse_match(",".join(rest))
    flow.actions = parse_actions(actions)
    return flow


def key_matches(match: dict, key: dict, in_port_id) -> bool:
    """Does a resolved match (in_port given as a port id) cover this flow key?"""
    for name, want in match.items():
        if name == "in_port":
            if want != in_port_id:
                return False
        elif name in IP_FIELDS:
            addr = int.from_bytes(key[name], "big")
            if addr & int(want.netmask) != int(want.network_address):
                return False
        elif name == "dl_vlan":
            if key["dl_vlan"] != want:
                return False
        elif name in ("tp_src", "tp_dst") and key["nw_proto"] not in (1, 6, 17):
            return False
        elif key[name] != want:
            return False
    return True


def covers(pattern: dict, match: dict) -> bool:
    """del-flows (non-strict): every field of ``pattern`` is in ``match`` with that value."""
    return all(name in match and match[name] == value for name, value in pattern.items())
