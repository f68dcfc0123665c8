"""A benchmark's result as data: a ``Table`` of rows (a measure, its unit, one median per
system: pyvhost and its peers, and where the bench ran alternating rounds, each round's
number and so each system's spread) with the ratios it reports, printed as a Markdown table,
saved and loaded as JSON, handed to ``pyvhost bench --plot`` (benchplot draws it). The
benchmarks of bench/ build one and ``emit`` it; ``emitted()`` is what the last run emitted.
No measuring and no drawing here.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path


class TableError(ValueError):
    """A table (or its JSON) that does not hold together."""


@dataclass
class Row:
    label: str                               # "64 B io loop"
    unit: str                                # "Mpps"
    values: dict[str, float | None]          # system -> median (None: not measured)
    better: str = "higher"                   # or "lower"
    compare: bool = True                     # False: no ratio for this row
    rounds: dict[str, list[float]] = field(default_factory=dict)  # system -> each round
    # system -> the cross-core round trip (ns) between the polling CPUs read just before
    # each of its rounds (None: not measured), to set next to that round's number
    round_trips: dict[str, list[float | None]] = field(default_factory=dict)

    def spread(self, column: str) -> float | None:
        """Half the range of a system's rounds relative to their median (0.04: the rounds
        lie within +-4% of it); None without two rounds or with a median of 0."""
        got = self.rounds.get(column) or []
        median = self.values.get(column)
        if len(got) < 2 or not median:
            return None
        return (max(got) - min(got)) / 2 / abs(median)


@dataclass
class Table:
    bench: str                               # "switch"
    title: str
    columns: list[str]                       # the systems, pyvhost first
    ratios: list[tuple[str, str]]            # (numerator, denominator) column pairs
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    better_by: bool = False                  # ratios say "a better by" (b/a where lower wins)

    def add(self, label: str, unit: str, values: dict[str, float | None] | None = None,
            better: str = "higher", compare: bool = True,
            rounds: dict[str, list[float]] | None = None,
            round_trips: dict[str, list[float | None]] | None = None) -> Row:
        """A row; with ``rounds`` (each system's numbers, one per round) and no ``values``,
        the values are the rounds' medians; ``round_trips``: one per round of a system
        (None where it could not be read)."""
        rounds = {str(c): [_number(v) for v in got] for c, got in (rounds or {}).items()}
        trips = {str(c): [_number(v) for v in got] for c, got in (round_trips or {}).items()}
        if any(v is None for got in rounds.values() for v in got):
            raise TableError(f"{self.bench}: row {label!r}: a round without a number")
        for c, got in trips.items():
            if len(got) != len(rounds.get(c, ())):
                raise TableError(f"{self.bench}: row {label!r}: {len(got)} round trips for "
                                 f"{len(rounds.get(c, ()))} rounds of {c}")
        if values is None:
            values = {c: statistics.median(got) for c, got in rounds.items() if got}
        unknown = (set(values) | set(rounds) | set(trips)) - set(self.columns)
        if unknown:
            raise TableError(f"{self.bench}: row {label!r} has values for unknown columns "
                             f"{sorted(unknown)}")
        if better not in ("higher", "lower"):
            raise TableError(f"{self.bench}: row {label!r}: better must be higher or lower")
        row = Row(label, unit, {c: _number(values.get(c)) for c in self.columns}, better,
                  bool(compare), rounds, trips)
        self.rows.append(row)
        return row

    def ratio(self, row: Row, pair: tuple[str, str]) -> float | None:
        """numerator / denominator of one row (None if either is missing or zero, or the
        row is not compared); with ``better_by``, how many times the numerator is better."""
        a, b = (row.values.get(c) for c in pair)
        if self.better_by and row.better == "lower":
            a, b = b, a
        if not row.compare or a is None or b is None or b == 0:
            return None
        return a / b

    def ratio_name(self, pair: tuple[str, str]) -> str:
        return f"{pair[0]} better by" if self.better_by else f"{pair[0]}/{pair[1]}"

    def markdown(self) -> str:
        head = ["measure", "unit", *self.columns, *(self.ratio_name(p) for p in self.ratios)]
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for row in self.rows:
            cells = [row.label, row.unit + (" (lower is better)" if row.better == "lower"
                                            else "")]
            cells += [_cell(row.values[c], row.spread(c)) for c in self.columns]
            cells += [_ratio(self.ratio(row, pair)) for pair in self.ratios]
            out.append("| " + " | ".join(cells) + " |")
        if any(row.rounds for row in self.rows):
            out.append("\nmedians of alternating rounds; +-N%: half the range of the rounds, "
                       "relative to the median")
        trips = [row for row in self.rows if row.round_trips]
        if trips:
            out.append("\ncross-core round trip (ns) between the polling CPUs, read just "
                       "before each system's round, in round order:")
            out += [f"- {row.label}: " + "; ".join(
                f"{c} " + " ".join("n/a" if v is None else f"{v:.0f}"
                                   for v in row.round_trips[c])
                for c in self.columns if c in row.round_trips) for row in trips]
        return "\n".join(out)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Table:
        try:
            table = cls(str(data["bench"]), str(data["title"]), [str(c) for c in
                                                               data["columns"]],
                        [(str(a), str(b)) for a, b in data["ratios"]],
                        notes=[str(n) for n in data.get("notes", [])],
                        better_by=bool(data.get("better_by", False)))
            for r in data["rows"]:
                table.add(str(r["label"]), str(r["unit"]), dict(r["values"]),
                          r.get("better", "higher"), r.get("compare", True),
                          {str(c): list(v) for c, v in dict(r.get("rounds") or {}).items()},
                          {str(c): list(v) for c, v in
                           dict(r.get("round_trips") or {}).items()})
        except (KeyError, TypeError, ValueError) as e:
            raise TableError(f"not a bench table: {type(e).__name__}: {e}") from None
        for a, b in table.ratios:
            if a not in table.columns or b not in table.columns:
                raise TableError(f"ratio {a}/{b}: not columns of the table")
        return table


def _number(value) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TableError(f"{value!r} is not a number")
    return None if math.isnan(value) else float(value)


def _cell(value: float | None, spread: float | None = None) -> str:
    if value is None:
        return "n/a"
    text = f"{value:.{3 if abs(value) < 10 else 2 if abs(value) < 1000 else 1}f}"
    return text if spread is None else f"{text} +-{spread * 100:.0f}%"


def _ratio(value: float | None) -> str:
    return "" if value is None else f"x{value:.2f}"


_EMITTED: list[Table] = []


def emit(table: Table) -> Table:
    """A benchmark's result: printed as Markdown, kept for ``pyvhost bench --plot/--rows``."""
    print(f"\n{table.title}\n")
    print(table.markdown(), flush=True)
    for note in table.notes:
        print(f"note: {note}")
    _EMITTED.append(table)
    return table


def emitted() -> list[Table]:
    """The tables emitted since the last call (and forgets them)."""
    out = list(_EMITTED)
    _EMITTED.clear()
    return out


def save(tables: list[Table], path: str | Path) -> None:
    Path(path).write_text(json.dumps([t.to_json() for t in tables], indent=1) + "\n")


def load(path: str | Path) -> list[Table]:
    """The tables of a file ``save`` wrote (TableError if it is not one)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise TableError(f"{path}: {e}") from None
    if not isinstance(data, list) or not data or not all(isinstance(t, dict) for t in data):
        raise TableError(f"{path}: not a list of bench tables")
    return [Table.from_json(t) for t in data]
