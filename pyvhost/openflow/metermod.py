"""OpenFlow 1.3 meters on the wire and applied: METER_MOD (ADD, MODIFY, DELETE, with the
spec's METER_MOD_FAILED codes), the METER, METER_CONFIG and METER_FEATURES multipart
bodies, and the meter's JSON form the store keeps. Meters themselves are the switch's
(pyvhost.switch.meters): kbps or pktps, DROP bands with a rate and (BURST) a burst size,
token buckets the datapath runs per packet. DSCP_REMARK and experimenter bands are
refused (BAD_BAND), as are the virtual meters SLOWPATH and CONTROLLER (INVALID_METER).
Deleting a meter deletes the rules that use it (spec 6.6, as for groups); ALL deletes
every meter. Counters: packets and bytes that reached the meter, and per band the frames
it dropped."""

from __future__ import annotations

import struct
import time

from pyvhost import _meter
from pyvhost.switch.flows import METER_MAX
from pyvhost.switch.meters import Band, Meter, meters_of

from . import codec as C
from . import errors as E
from .errors import OFError

METER_MOD = struct.Struct("!HHI")
BAND = struct.Struct("!HHII4x")
METER_REQUEST = struct.Struct("!I4x")
METER_STATS = struct.Struct("!IH6xIQQII")
BAND_STATS = struct.Struct("!QQ")
METER_CONFIG = struct.Struct("!HHI")
METER_FEATURES = struct.Struct("!IIIBB2x")
ADD, MODIFY, DELETE = 0, 1, 2
KBPS, PKTPS, BURST, STATS = 1, 2, 4, 8
BAND_DROP, BAND_DSCP_REMARK, BAND_EXPERIMENTER = 1, 2, 0xFFFF
OFPM_SLOWPATH, OFPM_CONTROLLER, OFPM_ALL = 0xFFFFFFFD, 0xFFFFFFFE, 0xFFFFFFFF


def _fail(code: int, why: str) -> OFError:
    return OFError(E.METER_MOD_FAILED, code, why)


def parse_bands(data: bytes, flags: int) -> list[Band]:
    bands = []
    off = 0
    while off < len(data):
        if off + 4 > len(data):
            raise _fail(E.MMFC_BAD_BAND, f"{len(data) - off} stray bytes after the last band")
        btype, length = struct.unpack_from("!HH", data, off)
        if length < BAND.size or length % 8 or off + length > len(data):
            raise _fail(E.MMFC_BAD_BAND, f"band of length {length} at offset {off}")
        if btype != BAND_DROP:
            name = {BAND_DSCP_REMARK: "DSCP_REMARK", BAND_EXPERIMENTER: "experimenter"}.get(
                btype, f"type {btype}")
            raise _fail(E.MMFC_BAD_BAND, f"a {name} band: only DROP bands here")
        if length != BAND.size:
            raise _fail(E.MMFC_BAD_BAND, f"a DROP band of length {length}")
        _, _, rate, burst = BAND.unpack_from(data, off)
        if rate == 0:
            raise _fail(E.MMFC_BAD_RATE, "band rate 0")
        if rate >= 1 << 32 or (flags & BURST and burst >= 1 << 32):
            raise _fail(E.MMFC_BAD_BAND_VALUE, f"band rate {rate}, burst {burst}")
        bands.append(Band(rate, burst if flags & BURST else 0))
        off += length
    if not bands:
        raise _fail(E.MMFC_BAD_BAND, "a meter without bands")
    if len(bands) > _meter.BANDS:
        raise _fail(E.MMFC_OUT_OF_BANDS, f"{len(bands)} bands (at most {_meter.BANDS})")
    if len({b.rate for b in bands}) != len(bands):
        raise _fail(E.MMFC_BAD_BAND_VALUE, "two bands of the same rate")
    return bands


def meter_mod(handler, body: bytes) -> None:
    """Apply one METER_MOD to the handler's bridge (OFError: the ERROR to answer)."""
    C.need(body, METER_MOD.size, "METER_MOD")
    command, flags, mid = METER_MOD.unpack_from(body)
    bridge = handler.bridge
    if command == DELETE:
        meters = bridge.meters
        if mid != OFPM_ALL and not 1 <= mid <= METER_MAX:
            raise _fail(E.MMFC_INVALID_METER, f"meter {mid:#x}")
        if meters is not None:
            for m in list(meters.meters) if mid == OFPM_ALL else [mid]:
                delete_meter(handler, meters, m)
            handler.save_meters()
        return
    if command not in (ADD, MODIFY):
        raise _fail(E.MMFC_BAD_COMMAND, f"command {command}")
    if not 1 <= mid <= METER_MAX:
        raise _fail(E.MMFC_INVALID_METER, f"meter {mid:#x}: not one a switch can add")
    if flags & ~(KBPS | PKTPS | BURST | STATS) or bool(flags & KBPS) == bool(flags & PKTPS):
        raise _fail(E.MMFC_BAD_FLAGS, f"flags 0x{flags:x} (KBPS or PKTPS, BURST, STATS)")
    bands = parse_bands(body[METER_MOD.size:], flags)
    meters = meters_of(bridge, handler.switch.datapath)
    exists = mid in meters.meters
    if command == ADD and exists:
        raise _fail(E.MMFC_METER_EXISTS, f"meter {mid} exists")
    if command == MODIFY and not exists:
        raise _fail(E.MMFC_UNKNOWN_METER, f"no meter {mid}")
    try:
        meters.set(Meter(mid, bool(flags & PKTPS), bands, bool(flags & BURST),
                         bool(flags & STATS)))
    except ValueError as e:
        raise _fail(E.MMFC_OUT_OF_METERS, str(e)) from None
    handler.save_meters()


def delete_meter(handler, meters, mid: int) -> None:
    """Meter ``mid`` goes, and with it every rule that uses it (FLOW_REMOVED to the
    controllers that asked, with reason DELETE: 1.3 has no METER_DELETE, as OVS sends it)."""
    if mid not in meters.meters:
        return
    handler.remove_rules(meters.users(mid), "delete")
    meters.delete(mid)


# -- multipart ------------------------------------------------------------------------------
def _selected(handler, body: bytes, what: str) -> list[int]:
    C.need(body, METER_REQUEST.size, f"{what} request", exact=True)
    mid, = METER_REQUEST.unpack(body)
    meters = handler.bridge.meters
    known = sorted(meters.meters) if meters is not None else []
    return known if mid == OFPM_ALL else [m for m in known if m == mid]


def _flags(m: Meter) -> int:
    return (PKTPS if m.pktps else KBPS) | (BURST if m.burst else 0) | (STATS if m.stats else 0)


def config_entries(handler, body: bytes) -> list[bytes]:
    meters = handler.bridge.meters
    out = []
    for mid in _selected(handler, body, "METER_CONFIG"):
        m = meters.meters[mid]
        bands = b"".join(BAND.pack(BAND_DROP, BAND.size, b.rate, b.burst) for b in m.bands)
        out.append(METER_CONFIG.pack(METER_CONFIG.size + len(bands), _flags(m), mid) + bands)
    return out


def stats_entries(handler, body: bytes) -> list[bytes]:
    meters = handler.bridge.meters
    now = time.monotonic()
    out = []
    for mid in _selected(handler, body, "METER"):
        m = meters.meters[mid]
        packets, bytes_, bands = meters.stats(mid)
        sec, nsec = divmod(int((now - m.created) * 1e9), 1_000_000_000)
        out.append(METER_STATS.pack(mid, METER_STATS.size + BAND_STATS.size * len(bands),
                                    len(meters.users(mid)), packets, bytes_, sec, nsec)
                   + b"".join(BAND_STATS.pack(p, b) for p, b in bands))
    return out


def features_entries(body: bytes) -> list[bytes]:
    C.need(body, 0, "METER_FEATURES request", exact=True)
    return [METER_FEATURES.pack(_meter.SLOTS, 1 << BAND_DROP, KBPS | PKTPS | BURST | STATS,
                                _meter.BANDS, 0)]


# -- the store's form -----------------------------------------------------------------------
def to_json(m: Meter) -> dict:
    return {"id": m.id, "pktps": m.pktps, "burst": m.burst, "stats": m.stats,
            "bands": [[b.rate, b.burst] for b in m.bands]}


def from_json(d: dict) -> Meter:
    """A stored meter (ValueError, KeyError, TypeError: a bad row)."""
    mid = int(d["id"])
    if not 1 <= mid <= METER_MAX:
        raise ValueError(f"meter id {mid}")
    bands = [Band(int(rate), int(burst)) for rate, burst in d["bands"]]
    if not 1 <= len(bands) <= _meter.BANDS or any(not 0 < b.rate < 1 << 32 or
                                                  not 0 <= b.burst < 1 << 32 for b in bands):
        raise ValueError(f"bands {d['bands']!r}")
    return Meter(mid, bool(d["pktps"]), bands, bool(d.get("burst")), bool(d.get("stats", 1)))
