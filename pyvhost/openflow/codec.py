"""OpenFlow 1.3 framing and the small fixed messages: the 8-byte header, message type
numbers, reserved port numbers, HELLO with its version bitmap, ECHO, FEATURES,
GET/SET_CONFIG, BARRIER. Every decoder checks lengths before it reads and raises
``OFError`` (never struct.error, IndexError, ...). Pure functions over bytes: no sockets,
no switch."""

from __future__ import annotations

import struct
from typing import NamedTuple

from . import errors as E
from .errors import OFError

VERSION = 0x04                   # OpenFlow 1.3
HEADER = struct.Struct("!BBHI")
MAX_MESSAGE = 0xFFFF

# enum ofp_type
HELLO, ERROR, ECHO_REQUEST, ECHO_REPLY, EXPERIMENTER = 0, 1, 2, 3, 4
FEATURES_REQUEST, FEATURES_REPLY, GET_CONFIG_REQUEST, GET_CONFIG_REPLY, SET_CONFIG = 5, 6, 7, 8, 9
PACKET_IN, FLOW_REMOVED, PORT_STATUS, PACKET_OUT, FLOW_MOD = 10, 11, 12, 13, 14
GROUP_MOD, PORT_MOD, TABLE_MOD, MULTIPART_REQUEST, MULTIPART_REPLY = 15, 16, 17, 18, 19
BARRIER_REQUEST, BARRIER_REPLY = 20, 21
QUEUE_GET_CONFIG_REQUEST, ROLE_REQUEST, GET_ASYNC_REQUEST, SET_ASYNC, METER_MOD = 22, 24, 26, 28, 29
TYPE_NAMES = {0: "HELLO", 1: "ERROR", 2: "ECHO_REQUEST", 3: "ECHO_REPLY", 4: "EXPERIMENTER",
              5: "FEATURES_REQUEST", 6: "FEATURES_REPLY", 7: "GET_CONFIG_REQUEST",
              8: "GET_CONFIG_REPLY", 9: "SET_CONFIG", 10: "PACKET_IN", 11: "FLOW_REMOVED",
              12: "PORT_STATUS", 13: "PACKET_OUT", 14: "FLOW_MOD", 15: "GROUP_MOD",
              16: "PORT_MOD", 17: "TABLE_MOD", 18: "MULTIPART_REQUEST",
              19: "MULTIPART_REPLY", 20: "BARRIER_REQUEST", 21: "BARRIER_REPLY",
              22: "QUEUE_GET_CONFIG_REQUEST", 23: "QUEUE_GET_CONFIG_REPLY",
              24: "ROLE_REQUEST", 25: "ROLE_REPLY", 26: "GET_ASYNC_REQUEST",
              27: "GET_ASYNC_REPLY", 28: "SET_ASYNC", 29: "METER_MOD"}

# enum ofp_port_no
OFPP_MAX = 0xFFFFFF00
OFPP_IN_PORT = 0xFFFFFFF8
OFPP_TABLE = 0xFFFFFFF9
OFPP_NORMAL = 0xFFFFFFFA
OFPP_FLOOD = 0xFFFFFFFB
OFPP_ALL = 0xFFFFFFFC
OFPP_CONTROLLER = 0xFFFFFFFD
OFPP_LOCAL = 0xFFFFFFFE
OFPP_ANY = 0xFFFFFFFF
OFPG_ANY = 0xFFFFFFFF
OFPTT_ALL = 0xFF
NO_BUFFER = 0xFFFFFFFF

# enum ofp_capabilities
OFPC_FLOW_STATS, OFPC_TABLE_STATS, OFPC_PORT_STATS = 1, 2, 4

HELLO_ELEM_VERSIONBITMAP = 1


class Header(NamedTuple):
    version: int
    type: int
    length: int
    xid: int


def parse_header(data: bytes) -> Header:
    """The header of a message (``data`` at least 8 bytes); OFError if its length field
    is below 8 (the stream cannot be framed any more)."""
    if len(data) < HEADER.size:
        raise OFError(E.BAD_REQUEST, E.BRC_BAD_LEN, f"{len(data)} bytes: no header")
    h = Header(*HEADER.unpack_from(data))
    if h.length < HEADER.size:
        raise OFError(E.BAD_REQUEST, E.BRC_BAD_LEN, f"length field {h.length} < 8")
    return h


def message(type_: int, xid: int, body: bytes = b"", version: int = VERSION) -> bytes:
    if HEADER.size + len(body) > MAX_MESSAGE:
        raise ValueError(f"a message of {HEADER.size + len(body)} bytes")
    return HEADER.pack(version, type_, HEADER.size + len(body), xid) + body


def need(body: bytes, size: int, what: str, exact: bool = False) -> None:
    """BAD_REQUEST/BAD_LEN unless the body has ``size`` bytes (at least, or exactly)."""
    if len(body) < size or (exact and len(body) != size):
        raise OFError(E.BAD_REQUEST, E.BRC_BAD_LEN,
                      f"{what}: body of {len(body)} bytes, {'' if exact else 'at least '}"
                      f"{size} expected")


# -- HELLO ---------------------------------------------------------------------------------
def hello(xid: int = 0, versions: tuple[int, ...] = (VERSION,)) -> bytes:
    bitmap = 0
    for v in versions:
        bitmap |= 1 << v
    elem = struct.pack("!HHI", HELLO_ELEM_VERSIONBITMAP, 8, bitmap)
    return message(HELLO, xid, elem, version=max(versions))


def hello_versions(version: int, body: bytes) -> set[int]:
    """The versions a peer's HELLO offers: those of its version bitmap element, or (no
    bitmap) every version up to the header's. Malformed elements: OFError
    (HELLO_FAILED/INCOMPATIBLE)."""
    offered: set[int] | None = None
    off = 0
    while off + 4 <= len(body):
        etype, elen = struct.unpack_from("!HH", body, off)
        if elen < 4 or off + elen > len(body):
            raise OFError(E.HELLO_FAILED, E.HFC_INCOMPATIBLE,
                          f"HELLO element of length {elen} at offset {off}")
        if etype == HELLO_ELEM_VERSIONBITMAP:
            offered = set()
            for i in range((elen - 4) // 4):
                word, = struct.unpack_from("!I", body, off + 4 + 4 * i)
                offered |= {32 * i + b for b in range(32) if word >> b & 1}
        off += (elen + 7) // 8 * 8
    if offered is None:
        offered = set(range(1, version + 1))
    return offered


def negotiate(version: int, body: bytes) -> int:
    """The version to speak with a peer whose HELLO is (version, body): 1.3 or OFError
    (HELLO_FAILED/INCOMPATIBLE)."""
    offered = hello_versions(version, body)
    if VERSION in offered:
        return VERSION
    names = ", ".join(f"0x{v:02x}" for v in sorted(offered)) or "none"
    raise OFError(E.HELLO_FAILED, E.HFC_INCOMPATIBLE,
                  f"We support version 0x{VERSION:02x}, you support {names}")


# -- FEATURES, CONFIG ----------------------------------------------------------------------
FEATURES = struct.Struct("!QIBB2xII")


def features_reply(xid: int, dpid: int, n_tables: int, capabilities: int,
                   n_buffers: int = 0, auxiliary_id: int = 0) -> bytes:
    return message(FEATURES_REPLY, xid, FEATURES.pack(dpid, n_buffers, n_tables, auxiliary_id,
                                                       capabilities, 0))


CONFIG = struct.Struct("!HH")
FRAG_MASK = 3


def config_reply(xid: int, flags: int, miss_send_len: int) -> bytes:
    return message(GET_CONFIG_REPLY, xid, CONFIG.pack(flags, miss_send_len))


def parse_set_config(body: bytes) -> tuple[int, int]:
    need(body, CONFIG.size, "SET_CONFIG", exact=True)
    flags, miss = CONFIG.unpack(body)
    if flags & ~FRAG_MASK:
        raise OFError(E.SWITCH_CONFIG_FAILED, E.SCFC_BAD_FLAGS, f"flags 0x{flags:x}")
    if flags & FRAG_MASK not in (0,):      # FRAG_NORMAL only: no drop/reassembly here
        raise OFError(E.SWITCH_CONFIG_FAILED, E.SCFC_BAD_FLAGS,
                      f"fragment handling {flags & FRAG_MASK} (only FRAG_NORMAL)")
    return flags, miss


# -- helpers for the variable-length structures -------------------------------------------
def pad8(n: int) -> int:
    return (n + 7) // 8 * 8
