"""OpenFlow-style meters of a bridge, as the rule model has them (an id, kbps or pktps,
DROP bands of a rate and a burst), compiled into the bridge's MeterTable
(pyvhost._meter) whose token buckets the datapath runs per packet. Rules name a meter as
``meter:N`` (first of their actions); a rule naming a meter that does not exist (yet)
compiles without it and compiles again when the meter comes. A meter changed in place
keeps its slot, so cached decisions naming it stay right. No OpenFlow encoding here, no
store: whoever makes meters keeps them."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from pyvhost import _meter


@dataclass
class Band:
    rate: int                                   # kbit/s or packets/s
    burst: int = 0                              # kbit or packets; 0: the rate's worth


@dataclass
class Meter:
    id: int
    pktps: bool                                 # False: kbps
    bands: list[Band]
    burst: bool = False                         # the bands' burst sizes were given
    stats: bool = True
    created: float = field(default_factory=time.monotonic)

    def units(self) -> list[tuple[int, int]]:
        """The bands as the compiled table takes them: (units/s, units), bytes or
        packets; a burst of 0 (or none given) is one second at the band's rate, as Open
        vSwitch takes it."""
        out = []
        for b in self.bands:
            burst = b.burst if self.burst and b.burst else b.rate
            if self.pktps:
                out.append((b.rate, burst))
            else:
                out.append((b.rate * 125, burst * 125))     # kilobits -> bytes
        return out


class Meters:
    """A bridge's meters; made on the first meter."""

    def __init__(self, bridge, datapath):
        self.bridge = bridge
        self.datapath = datapath
        self.table = _meter.MeterTable()
        datapath.set_meters(bridge.bridge_id, self.table)
        self.meters: dict[int, Meter] = {}
        self.slots: dict[int, int] = {}

    def slot(self, mid: int) -> int | None:
        return self.slots.get(mid)

    def set(self, m: Meter) -> None:
        """Add or replace meter ``m.id`` (ValueError: too many meters or bands, a bad
        rate). A replaced meter keeps its slot and counters; its buckets start full."""
        new = m.id not in self.slots
        if new:
            used = set(self.slots.values())
            free = next((s for s in range(_meter.SLOTS) if s not in used), None)
            if free is None:
                raise ValueError(f"at most {_meter.SLOTS} meters")
            slot = free
        else:
            slot = self.slots[m.id]
            m.created = self.meters[m.id].created
        self.table.set(slot, m.pktps, m.units(), keep_counters=not new)
        self.slots[m.id] = slot
        self.meters[m.id] = m
        if new:
            self.bridge.reresolve({f"meter:{m.id}"})
            self.bridge.reclaim(self.datapath)     # the rules naming it, compiled again

    def delete(self, mid: int) -> None:
        """Meter ``mid`` goes (its rules are the caller's to remove first)."""
        slot = self.slots.pop(mid, None)
        if slot is None:
            return
        self.table.clear(slot)
        del self.meters[mid]
        self.datapath.invalidate()

    def stats(self, mid: int) -> tuple[int, int, list[tuple[int, int]]]:
        return self.table.stats(self.slots[mid])

    def users(self, mid: int) -> list:
        """The bridge's rules that name meter ``mid``."""
        ref = f"meter:{mid}"
        return [r for r in self.bridge.rules.values()
                if ref in r.text and ("meter", mid) in r.flow.all_actions()]


def meters_of(bridge, datapath) -> Meters:
    """The bridge's Meters, made on first use."""
    if bridge.meters is None:
        bridge.meters = Meters(bridge, datapath)
    return bridge.meters
