"""OpenFlow 1.3 MULTIPART messages: the request header and the bodies of the requests this
switch answers (DESC, FLOW, AGGREGATE, TABLE, PORT_STATS, PORT_DESC, TABLE_FEATURES), and
the replies built from plain values, split into messages of at most 64 KiB with
REPLY_MORE on all but the last. What goes into them (rules, ports, counters) is the
handler's business; this module only lays out bytes and checks lengths."""

from __future__ import annotations

import struct
from typing import NamedTuple

from pyvhost._classifier import TABLES

from . import actions as A
from . import errors as E
from . import oxm
from .codec import HEADER, MAX_MESSAGE, MULTIPART_REPLY, message, need, pad8
from .errors import OFError

# enum ofp_multipart_types
DESC, FLOW, AGGREGATE, TABLE, PORT_STATS, QUEUE, GROUP, GROUP_DESC = range(8)
GROUP_FEATURES, METER, METER_CONFIG, METER_FEATURES, TABLE_FEATURES, PORT_DESC = range(8, 14)
EXPERIMENTER = 0xFFFF
REQ_MORE = REPLY_MORE = 1
MP_HEADER = struct.Struct("!HH4x")

FLOW_REQUEST = struct.Struct("!B3xII4xQQ")        # table, out_port, out_group, cookie, mask
FLOW_STATS = struct.Struct("!HBxIIHHHH4xQQQ")
AGGREGATE_REPLY = struct.Struct("!QQI4x")
TABLE_STATS = struct.Struct("!B3xIQQ")
PORT_STATS_REQUEST = struct.Struct("!I4x")
PORT_STATS_ENTRY = struct.Struct("!I4x12QII")
PORT = struct.Struct("!I4x6s2x16sIIIIIIII")
TABLE_FEATURES_HEAD = struct.Struct("!HB5x32sQQII")
DESC_BODY = struct.Struct("!256s256s256s32s256s")

# enum ofp_table_feature_prop_type
TFPT_INSTRUCTIONS, TFPT_NEXT_TABLES, TFPT_WRITE_ACTIONS, TFPT_APPLY_ACTIONS = 0, 2, 4, 6
TFPT_MATCH, TFPT_WILDCARDS, TFPT_WRITE_SETFIELD, TFPT_APPLY_SETFIELD = 8, 10, 12, 14
MAX_ENTRIES = 1 << 24
OFPPS_LINK_DOWN, OFPPS_LIVE = 1, 4


class Request(NamedTuple):
    type: int
    flags: int
    body: bytes


def parse_request(body: bytes) -> Request:
    need(body, MP_HEADER.size, "MULTIPART_REQUEST")
    mtype, flags = MP_HEADER.unpack_from(body)
    return Request(mtype, flags, body[MP_HEADER.size:])


class FlowRequest(NamedTuple):
    table: int
    out_port: int
    out_group: int
    cookie: int
    cookie_mask: int
    oxm: bytes


def parse_flow_request(body: bytes) -> FlowRequest:
    """The body of a FLOW or AGGREGATE request (the same layout)."""
    need(body, FLOW_REQUEST.size + 8, "flow stats request")
    fields = FLOW_REQUEST.unpack_from(body)
    tlvs, end = oxm.split_match(body, FLOW_REQUEST.size)
    if end != len(body):
        raise OFError(E.BAD_REQUEST, E.BRC_BAD_LEN,
                      f"flow stats request: {len(body) - end} bytes after the match")
    return FlowRequest(*fields, tlvs)


def parse_port_request(body: bytes) -> int:
    need(body, PORT_STATS_REQUEST.size, "port stats request", exact=True)
    return PORT_STATS_REQUEST.unpack(body)[0]


def replies(mtype: int, xid: int, entries: list[bytes]) -> list[bytes]:
    """MULTIPART_REPLY messages carrying ``entries`` (never split across messages)."""
    room = MAX_MESSAGE - HEADER.size - MP_HEADER.size
    chunks: list[list[bytes]] = [[]]
    size = 0
    for e in entries:
        if size + len(e) > room and chunks[-1]:
            chunks.append([])
            size = 0
        chunks[-1].append(e)
        size += len(e)
    out = []
    for i, chunk in enumerate(chunks):
        flags = REPLY_MORE if i < len(chunks) - 1 else 0
        out.append(message(MULTIPART_REPLY, xid, MP_HEADER.pack(mtype, flags) + b"".join(chunk)))
    return out


def _s(text: str, size: int) -> bytes:
    return text.encode()[:size - 1]


def desc(mfr: str, hw: str, sw: str, serial: str, dp: str) -> bytes:
    return DESC_BODY.pack(_s(mfr, 256), _s(hw, 256), _s(sw, 256), _s(serial, 32), _s(dp, 256))


def flow_stats(table: int, duration_ns: int, priority: int, idle: int, hard: int, flags: int,
               cookie: int, packets: int, bytes_: int, match_oxm: bytes,
               instructions: bytes) -> bytes:
    m = oxm.match_struct(match_oxm)
    length = FLOW_STATS.size + len(m) + len(instructions)
    return FLOW_STATS.pack(length, table, duration_ns // 1_000_000_000,
                           duration_ns % 1_000_000_000, priority, idle, hard, flags, cookie,
                           packets, bytes_) + m + instructions


def aggregate(packets: int, bytes_: int, flows: int) -> bytes:
    return AGGREGATE_REPLY.pack(packets, bytes_, flows)


def table_stats(table: int, active: int, lookups: int = 0, matched: int = 0) -> bytes:
    return TABLE_STATS.pack(table, active, lookups, matched)


def port_stats(port_no: int, rx_packets: int, tx_packets: int, rx_bytes: int, tx_bytes: int,
               rx_dropped: int, tx_dropped: int, rx_errors: int, tx_errors: int,
               duration_ns: int) -> bytes:
    return PORT_STATS_ENTRY.pack(port_no, rx_packets, tx_packets, rx_bytes, tx_bytes,
                                 rx_dropped, tx_dropped, rx_errors, tx_errors, 0, 0, 0, 0,
                                 duration_ns // 1_000_000_000, duration_ns % 1_000_000_000)


def port_desc(port_no: int, name: str, hw_addr: bytes = bytes(6), up: bool = True,
              speed_kbps: int = 0, config: int = 0) -> bytes:
    state = OFPPS_LIVE if up else OFPPS_LINK_DOWN
    return PORT.pack(port_no, hw_addr, _s(name, 16), config, state, 0, 0, 0, 0, speed_kbps,
                     speed_kbps)


def _prop(ptype: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("!HH", ptype, length) + payload + bytes(pad8(length) - length)


METADATA_ALL = (1 << 64) - 1      # every metadata bit can be matched and written


def table_features(table: int, name: str = "") -> bytes:
    """One table's features: the 8 properties every 1.3 controller (and ovs-ofctl)
    requires: instructions, next tables, write/apply actions, match, wildcards, write/apply
    set-field."""
    last = table == TABLES - 1
    instr = [A.IT_APPLY_ACTIONS, A.IT_WRITE_ACTIONS, A.IT_CLEAR_ACTIONS, A.IT_WRITE_METADATA,
             A.IT_METER] + ([] if last else [A.IT_GOTO_TABLE])
    actions = b"".join(struct.pack("!HH", a, 4) for a in
                       (A.AT_OUTPUT, A.AT_PUSH_VLAN, A.AT_POP_VLAN, A.AT_GROUP,
                        A.AT_DEC_NW_TTL, A.AT_SET_FIELD))
    setfields = b"".join(struct.pack("!I", oxm.header(f, oxm.SIZES[f])) for f in oxm.SETTABLE)
    fields = [oxm.header(f, oxm.SIZES[f] * (2 if m else 1), m)
              for f, m in oxm.SUPPORTED.items()]
    props = [
        _prop(TFPT_INSTRUCTIONS, b"".join(struct.pack("!HH", i, 4) for i in instr)),
        _prop(TFPT_NEXT_TABLES, bytes(range(table + 1, TABLES))),
        _prop(TFPT_WRITE_ACTIONS, actions),            # the same actions, into the set
        _prop(TFPT_APPLY_ACTIONS, actions),
        _prop(TFPT_MATCH, b"".join(struct.pack("!I", h) for h in fields)),
        _prop(TFPT_WILDCARDS, b"".join(struct.pack("!I", h & ~0x1FF | oxm.SIZES[oxm.key(h)])
                                       for h in fields)),
        _prop(TFPT_WRITE_SETFIELD, setfields),
        _prop(TFPT_APPLY_SETFIELD, setfields),
    ]
    body = b"".join(props)
    return TABLE_FEATURES_HEAD.pack(TABLE_FEATURES_HEAD.size + len(body), table,
                                    _s(name, 32), METADATA_ALL, METADATA_ALL, 0,
                                    MAX_ENTRIES) + body
