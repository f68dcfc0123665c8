"""The switch-to-controller messages OpenFlow 1.3 calls asynchronous (PACKET_IN,
FLOW_REMOVED, PORT_STATUS) and the PACKET_OUT request that answers a PACKET_IN: their
wire layouts, built and parsed with length checks (``OFError`` with the spec's code for a
malformed PACKET_OUT). Pure functions over bytes: no sockets, no switch."""

from __future__ import annotations

import struct
from typing import NamedTuple

from . import codec as C
from . import errors as E
from . import oxm
from .errors import OFError

# enum ofp_packet_in_reason
OFPR_NO_MATCH, OFPR_ACTION, OFPR_INVALID_TTL = 0, 1, 2
# enum ofp_flow_removed_reason
OFPRR_IDLE_TIMEOUT, OFPRR_HARD_TIMEOUT, OFPRR_DELETE, OFPRR_GROUP_DELETE = 0, 1, 2, 3
# enum ofp_port_reason
OFPPR_ADD, OFPPR_DELETE, OFPPR_MODIFY = 0, 1, 2
NO_COOKIE = 0xFFFFFFFFFFFFFFFF     # a PACKET_IN no rule sent (OVS sends this cookie too)

PACKET_IN = struct.Struct("!IHBBQ")             # buffer_id, total_len, reason, table, cookie
PACKET_OUT = struct.Struct("!IIH6x")            # buffer_id, in_port, actions_len
FLOW_REMOVED = struct.Struct("!QHBBIIHHQQ")     # cookie .. byte_count, then the match
PORT_STATUS = struct.Struct("!B7x")


def in_port_match(ofport: int) -> bytes:
    return oxm.match_struct(oxm._tlv(oxm.IN_PORT, oxm._b(ofport, 4)))


def packet_in(xid: int, total_len: int, reason: int, table: int, cookie: int, ofport: int,
              data: bytes) -> bytes:
    """A PACKET_IN (never buffered: NO_BUFFER) whose match holds the input port; the data
    is cut so the message fits in 64 KiB."""
    head = PACKET_IN.pack(C.NO_BUFFER, min(total_len, 0xFFFF), reason, table, cookie) + \
        in_port_match(ofport) + b"\x00\x00"
    room = C.MAX_MESSAGE - C.HEADER.size - len(head)
    return C.message(C.PACKET_IN, xid, head + data[:room])


class PacketOut(NamedTuple):
    in_port: int
    actions: bytes            # the action list, still encoded
    data: bytes


def parse_packet_out(body: bytes) -> PacketOut:
    C.need(body, PACKET_OUT.size, "PACKET_OUT")
    buffer_id, in_port, actions_len = PACKET_OUT.unpack_from(body)
    if buffer_id != C.NO_BUFFER:
        raise OFError(E.BAD_REQUEST, E.BRC_BUFFER_UNKNOWN,
                      f"buffer {buffer_id}: this switch buffers no packets")
    if actions_len % 8 or PACKET_OUT.size + actions_len > len(body):
        raise OFError(E.BAD_REQUEST, E.BRC_BAD_LEN,
                      f"actions_len {actions_len} in a body of {len(body)} bytes")
    end = PACKET_OUT.size + actions_len
    data = body[end:]
    if len(data) < 14:
        raise OFError(E.BAD_REQUEST, E.BRC_BAD_PACKET,
                      f"a packet of {len(data)} bytes (no Ethernet header)")
    if not (1 <= in_port < C.OFPP_MAX or in_port in (C.OFPP_CONTROLLER, C.OFPP_LOCAL)):
        raise OFError(E.BAD_REQUEST, E.BRC_BAD_PORT, f"in_port {in_port:#x}")
    return PacketOut(in_port, body[PACKET_OUT.size:end], data)


def flow_removed(xid: int, cookie: int, priority: int, reason: int, table: int,
                 duration_ns: int, idle: int, hard: int, packets: int, bytes_: int,
                 match_oxm: bytes) -> bytes:
    sec, nsec = divmod(max(0, duration_ns), 1_000_000_000)
    body = FLOW_REMOVED.pack(cookie, priority, reason, table, min(sec, 0xFFFFFFFF), nsec,
                             idle, hard, packets, bytes_) + oxm.match_struct(match_oxm)
    return C.message(C.FLOW_REMOVED, xid, body)


def port_status(xid: int, reason: int, port_desc: bytes) -> bytes:
    return C.message(C.PORT_STATUS, xid, PORT_STATUS.pack(reason) + port_desc)
