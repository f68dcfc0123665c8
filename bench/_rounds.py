"""Alternating rounds for the benchmarks: every system measured once per round, in turn,
the peers around pyvhost (peer, pyvhost, peer, ...), so a machine that slows down or speeds
up during a run weighs on all of them alike; each round printed as it ends, the rounds
kept so the table shows each system's median and spread (benchtable.Row.rounds). No
system is started or stopped here: each measure does that itself."""

from __future__ import annotations

import statistics
from collections.abc import Callable


def alternate(label: str, rounds: int, measures: dict[str, Callable[[], float]],
              unit: str = "Mpps") -> dict[str, list[float]]:
    """measures[name]() for each name in the given order, ``rounds`` times; every round's
    numbers by name. A measure that raises ends the bench (a missing number is not 0)."""
    if rounds < 1:
        raise ValueError("rounds must be at least 1")
    got: dict[str, list[float]] = {name: [] for name in measures}
    for i in range(rounds):
        for name, fn in measures.items():
            got[name].append(float(fn()))
        cells = "  ".join(f"{name} {got[name][-1]:.3f}" for name in measures)
        print(f"  round {i + 1}/{rounds}  {label}: {cells} {unit}", flush=True)
    return got


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
