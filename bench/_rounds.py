"""Alternating rounds for the benchmarks: every system measured once per round, in turn,
the peers around pyvhost (peer, pyvhost, peer, ...), so a machine that slows down or speeds
up during a run weighs on all of them alike; each round printed as it ends, the rounds
kept so the table shows each system's median and spread (benchtable.Row.rounds), and with
them the machine's cross-core round trip read before each (cross_core: Row.round_trips). No
system is started or stopped here: each measure does that itself."""

from __future__ import annotations

import statistics
from collections.abc import Callable


def alternate(label: str, rounds: int, measures: dict[str, Callable[[], float]],
              unit: str = "Mpps", probe: Callable[[], float | None] | None = None,
              probed: dict[str, list[float | None]] | None = None) -> dict[str, list[float]]:
    """measures[name]() for each name in the given order, ``rounds`` times; every round's
    numbers by name. A measure that raises ends the bench (a missing number is not 0).
    With ``probe`` (cross_core: the machine's state, read while no system runs), probe()
    just before each measure, printed with its number and kept in ``probed[name]`` (None:
    the probe could not read it)."""
    if rounds < 1:
        raise ValueError("rounds must be at least 1")
    got: dict[str, list[float]] = {name: [] for name in measures}
    trips: dict[str, list[float | None]] = probed if probed is not None else {}
    for i in range(rounds):
        for name, fn in measures.items():
            if probe is not None:
                trips.setdefault(name, []).append(probe())
            got[name].append(float(fn()))
        cells = "  ".join(f"{name} {got[name][-1]:.3f}" + (
            f" [rt {_ns(trips[name][-1])}]" if probe is not None else "") for name in measures)
        print(f"  round {i + 1}/{rounds}  {label}: {cells} {unit}", flush=True)
    return got


def _ns(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f} ns"


def cross_core(cpu_a: int, cpu_b: int, seconds: float = 0.5) -> Callable[[], float | None]:
    """A probe for alternate: the round trip of a cache line between the two CPUs the
    systems poll on (ns; it read 87, 130 or ~450 ns at different times on the VMs of this
    project). Only a reading next to the rounds: one that fails (a partner thread that
    stopped answering) is tried once more, then None, and the bench goes on."""
    from pyvhost._corelat import round_trip_ns

    def probe() -> float | None:
        for _ in range(2):
            try:
                return round_trip_ns(cpu_a, cpu_b, seconds)
            except RuntimeError as e:
                print(f"  cross-core round trip CPU {cpu_a}-{cpu_b}: {e}", flush=True)
        return None
    return probe


def medians(rounds: dict[str, list[float]]) -> dict[str, float]:
    return {name: statistics.median(v) for name, v in rounds.items() if v}


def paired(rounds: dict[str, list[float]], a: str, b: str) -> float | None:
    """The median over rounds of a's number over b's in the same round (None unless both
    have every round): a machine whose speed drifts between rounds moves both systems of a
    round alike, so this is steadier than the ratio of the medians."""
    if not rounds.get(a) or not rounds.get(b):
        return None
    got = [x / y for x, y in zip(rounds[a], rounds[b], strict=True) if y]
    return statistics.median(got) if got else None
