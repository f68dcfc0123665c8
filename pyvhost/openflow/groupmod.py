"""OpenFlow 1.3 groups on the wire and applied: GROUP_MOD (ADD, MODIFY, DELETE, with the
spec's GROUP_MOD_FAILED codes), the GROUP, GROUP_DESC and GROUP_FEATURES multipart
bodies, and the group's JSON form the store keeps. Groups themselves are the switch's
(pyvhost.switch.groups): ALL, SELECT (weights, a hash of the 5-tuple), INDIRECT (one
bucket), FAST_FAILOVER (watch ports). Bucket actions: OUTPUT to a port, FLOOD, ALL,
IN_PORT, CONTROLLER (no VLAN edits: a bucket does not know whether the packet is tagged;
no chaining). Deleting a group deletes the rules that use it (spec 6.5). Group counters
are those of the rules that use the group (exact: every packet a rule counts went
through its group once); per-bucket counters are exact for ALL and INDIRECT and reported
as unavailable (all ones, as the spec says) for SELECT and FAST_FAILOVER."""

from __future__ import annotations

import struct
import time

from pyvhost import _group
from pyvhost.switch.groups import Bucket, Group, groups_of

from . import actions as A
from . import codec as C
from . import errors as E
from .errors import OFError

GROUP_MOD = struct.Struct("!HBxI")
BUCKET = struct.Struct("!HHII4x")
GROUP_STATS_REQUEST = struct.Struct("!I4x")
GROUP_STATS = struct.Struct("!H2xII4xQQII")
BUCKET_STATS = struct.Struct("!QQ")
GROUP_DESC = struct.Struct("!HBxI")
GROUP_FEATURES = struct.Struct("!II4I4I")
ADD, MODIFY, DELETE = 0, 1, 2
OFPG_MAX, OFPG_ALL, OFPG_ANY = 0xFFFFFF00, 0xFFFFFFFC, 0xFFFFFFFF
TYPE_NAMES = {_group.ALL: "all", _group.SELECT: "select", _group.INDIRECT: "indirect",
              _group.FAST_FAILOVER: "ff"}
TYPE_NUMBERS = {v: k for k, v in TYPE_NAMES.items()}
# ofp_group_mod_failed_code
GROUP_EXISTS, INVALID_GROUP, WEIGHT_UNSUPPORTED, OUT_OF_GROUPS, OUT_OF_BUCKETS = 0, 1, 2, 3, 4
CHAINING_UNSUPPORTED, WATCH_UNSUPPORTED, LOOP, UNKNOWN_GROUP, CHAINED_GROUP = 5, 6, 7, 8, 9
BAD_TYPE, BAD_COMMAND, BAD_BUCKET, BAD_WATCH, EPERM = 10, 11, 12, 13, 14
UNAVAILABLE = 0xFFFFFFFFFFFFFFFF
BUCKET_ACTIONS = ("output", "flood", "in_port")   # (a CONTROLLER here would be reported
                                                   # with another rule's cookie and reason)
GROUP_DELETE = 3                                 # OFPRR_GROUP_DELETE


def _fail(code: int, why: str) -> OFError:
    return OFError(E.GROUP_MOD_FAILED, code, why)


def parse_buckets(data: bytes, gtype: int) -> list[Bucket]:
    buckets = []
    off = 0
    while off < len(data):
        if off + BUCKET.size > len(data):
            raise _fail(BAD_BUCKET, f"{len(data) - off} stray bytes after the last bucket")
        length, weight, watch_port, watch_group = BUCKET.unpack_from(data, off)
        if length < BUCKET.size or length % 8 or off + length > len(data):
            raise _fail(BAD_BUCKET, f"bucket of length {length} at offset {off}")
        try:
            actions = A.decode_actions(data[off + BUCKET.size:off + length], None)
        except OFError as e:
            if e.code == E.BAC_BAD_TYPE and struct.unpack_from("!H", data, off + 16)[0] == \
                    A.AT_GROUP:
                raise _fail(CHAINING_UNSUPPORTED, "a group in a bucket") from None
            raise
        for a in actions:
            if a[0] == "group":
                raise _fail(CHAINING_UNSUPPORTED, "a group in a bucket")
            if a[0] not in BUCKET_ACTIONS:
                raise OFError(E.BAD_ACTION, E.BAC_BAD_TYPE if a[0] != "normal" else
                              E.BAC_BAD_OUT_PORT, f"{a[0]} in a bucket: only outputs here")
        if len(actions) > _group.BUCKET_OPS:
            raise OFError(E.BAD_ACTION, E.BAC_TOO_MANY, f"{len(actions)} actions in a bucket "
                                                        f"(at most {_group.BUCKET_OPS})")
        if weight and gtype != _group.SELECT:
            raise _fail(BAD_BUCKET, f"weight {weight} in a group that is not SELECT")
        if watch_group != OFPG_ANY:
            raise _fail(WATCH_UNSUPPORTED, "watch_group (no chaining here)")
        if watch_port != C.OFPP_ANY and not 1 <= watch_port < C.OFPP_MAX:
            raise _fail(BAD_WATCH, f"watch_port {watch_port:#x}")
        if gtype == _group.FAST_FAILOVER and watch_port == C.OFPP_ANY:
            raise _fail(BAD_WATCH, "a FAST_FAILOVER bucket watches no port")
        buckets.append(Bucket(actions, weight,
                              None if watch_port == C.OFPP_ANY else str(watch_port)))
        off += length
    if len(buckets) > _group.BUCKETS:
        raise _fail(OUT_OF_BUCKETS, f"{len(buckets)} buckets (at most {_group.BUCKETS})")
    if gtype == _group.INDIRECT and len(buckets) != 1:
        raise _fail(BAD_BUCKET, f"an INDIRECT group with {len(buckets)} buckets (one)")
    return buckets


def group_mod(handler, body: bytes) -> None:
    """Apply one GROUP_MOD to the handler's bridge (OFError: the ERROR to answer)."""
    C.need(body, GROUP_MOD.size, "GROUP_MOD")
    command, gtype, gid = GROUP_MOD.unpack_from(body)
    bridge = handler.bridge
    groups = groups_of(bridge, handler.switch.datapath)
    if command == DELETE:
        if gid != OFPG_ALL and gid > OFPG_MAX:
            raise _fail(INVALID_GROUP, f"group {gid:#x}")
        for g in list(groups.groups) if gid == OFPG_ALL else [gid]:
            delete_group(handler, groups, g)
        handler.save_groups()
        return
    if command not in (ADD, MODIFY):
        raise _fail(BAD_COMMAND, f"command {command}")
    if gid > OFPG_MAX:
        raise _fail(INVALID_GROUP, f"group {gid:#x}")
    if gtype not in TYPE_NAMES:
        raise _fail(BAD_TYPE, f"type {gtype}")
    buckets = parse_buckets(body[GROUP_MOD.size:], gtype)
    for b in buckets:
        for a in b.actions:
            if a[0] == "output" and bridge.resolve(a[1]) is None:
                raise OFError(E.BAD_ACTION, E.BAC_BAD_OUT_PORT, f"output:{a[1]}: no such port")
    exists = gid in groups.groups
    if command == ADD and exists:
        raise _fail(GROUP_EXISTS, f"group {gid} exists")
    if command == MODIFY and not exists:
        raise _fail(UNKNOWN_GROUP, f"no group {gid}")
    try:
        groups.set(Group(gid, TYPE_NAMES[gtype], buckets))
    except ValueError as e:
        raise _fail(OUT_OF_GROUPS, str(e)) from None
    handler.save_groups()


def delete_group(handler, groups, gid: int) -> None:
    """Group ``gid`` goes, and with it every rule that uses it (FLOW_REMOVED reason
    GROUP_DELETE to controllers that asked)."""
    if gid not in groups.groups:
        return
    handler.remove_rules([r for r, _ in groups.users(gid)], "group_delete")
    groups.delete(gid)


# -- multipart ------------------------------------------------------------------------------
def encode_bucket(b: Bucket, ofport_of) -> bytes:
    acts = A.encode_actions(b.actions, {}, ofport_of)
    watch = int(b.watch_port) if b.watch_port is not None else C.OFPP_ANY
    return BUCKET.pack(BUCKET.size + len(acts), b.weight, watch, OFPG_ANY) + acts


def desc_entries(handler, body: bytes) -> list[bytes]:
    C.need(body, 0, "GROUP_DESC request", exact=True)
    groups = handler.bridge.groups
    out = []
    for gid in sorted(groups.groups) if groups is not None else []:
        g = groups.groups[gid]
        buckets = b"".join(encode_bucket(b, handler.ofport_of) for b in g.buckets)
        out.append(GROUP_DESC.pack(GROUP_DESC.size + len(buckets), TYPE_NUMBERS[g.type], gid)
                   + buckets)
    return out


def stats_entries(handler, body: bytes) -> list[bytes]:
    C.need(body, GROUP_STATS_REQUEST.size, "GROUP request", exact=True)
    gid, = GROUP_STATS_REQUEST.unpack(body)
    bridge = handler.bridge
    groups = bridge.groups
    known = sorted(groups.groups) if groups is not None else []
    if gid != OFPG_ALL:
        known = [g for g in known if g == gid]
    now = time.monotonic()
    out = []
    for g in known:
        group = groups.groups[g]
        users = groups.users(g)
        packets = bytes_ = 0
        for r, uses in users:
            n, b, _ = bridge.counters(r)
            packets += n * uses
            bytes_ += b * uses
        exact = group.type in ("all", "indirect")
        bucket = BUCKET_STATS.pack(packets, bytes_) if exact else \
            BUCKET_STATS.pack(UNAVAILABLE, UNAVAILABLE)
        sec, nsec = divmod(int((now - group.created) * 1e9), 1_000_000_000)
        out.append(GROUP_STATS.pack(GROUP_STATS.size + BUCKET_STATS.size * len(group.buckets),
                                    g, len(users), packets, bytes_, sec, nsec)
                   + bucket * len(group.buckets))
    return out


def features_entries(body: bytes) -> list[bytes]:
    C.need(body, 0, "GROUP_FEATURES request", exact=True)
    types = sum(1 << t for t in TYPE_NAMES)
    capabilities = 1 | 2                        # SELECT_WEIGHT, SELECT_LIVENESS
    actions = 1 << A.AT_OUTPUT
    return [GROUP_FEATURES.pack(types, capabilities, *[_group.SLOTS] * 4, *[actions] * 4)]


# -- the store's form -----------------------------------------------------------------------
def to_json(g: Group) -> dict:
    return {"id": g.id, "type": g.type,
            "buckets": [{"actions": [list(a) for a in b.actions], "weight": b.weight,
                         "watch_port": b.watch_port} for b in g.buckets]}


def from_json(d: dict) -> Group:
    """A stored group (ValueError, KeyError, TypeError: a bad row)."""
    if d["type"] not in TYPE_NUMBERS:
        raise ValueError(f"type {d['type']!r}")
    buckets = []
    for b in d["buckets"]:
        actions = tuple(tuple(a) for a in b["actions"])
        if any(a[0] not in BUCKET_ACTIONS for a in actions):
            raise ValueError(f"bucket actions {actions!r}")
        watch = b.get("watch_port")
        buckets.append(Bucket(actions, int(b.get("weight", 0)),
                              None if watch is None else str(watch)))
    return Group(int(d["id"]), d["type"], buckets)
