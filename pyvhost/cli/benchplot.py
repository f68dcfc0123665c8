"""``pyvhost bench --plot FILE.png``: draws bench tables (benchtable.Table) with matplotlib's
Agg backend (no display needed): one panel per unit of each table, in it one group of bars
per row (a bar per system: pyvhost next to its peers; a whisker from the lowest to the
highest round where the row kept its rounds), the table's ratios written above each group.
Reads tables, writes the PNG; measures nothing.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

from .benchtable import Table, TableError

COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b")


def _panels(tables: list[Table]) -> list[tuple[Table, str, list]]:
    """(table, unit, rows) for each unit of each table, in row order."""
    out = []
    for table in tables:
        units: dict[str, list] = {}
        for row in table.rows:
            units.setdefault(row.unit, []).append(row)
        out += [(table, unit, rows) for unit, rows in units.items()]
    return out


def _whiskers(rows, col: str, ys: list[float]) -> list[list[float]] | None:
    """(below, above) each bar: its rounds' lowest and highest (none without rounds)."""
    if not any(r.rounds.get(col) for r in rows):
        return None
    below, above = [], []
    for row, y in zip(rows, ys, strict=True):
        got = row.rounds.get(col)
        below.append(max(y - min(got), 0.0) if got else math.nan)
        above.append(max(max(got) - y, 0.0) if got else math.nan)
    return [below, above]


def _highest(row) -> list[float]:
    return [max(v) for v in row.rounds.values() if v]


def draw(tables: list[Table], path: str | Path) -> list[str]:
    """Write the PNG; returns the ratio annotations drawn (for callers and tests)."""
    panels = _panels(tables)
    if not panels:
        raise TableError("no rows to plot")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    widest = max(len(rows) for _, _, rows in panels)
    fig, axes = plt.subplots(len(panels), 1, squeeze=False,
                             figsize=(max(6.0, 1.8 + 1.6 * widest), 3.8 * len(panels)))
    notes: list[str] = []
    for ax, (table, unit, rows) in zip(axes[:, 0], panels, strict=True):
        cols = [c for c in table.columns if any(r.values.get(c) is not None for r in rows)]
        width = 0.8 / max(len(cols), 1)
        for i, col in enumerate(cols):
            xs = [k + (i - (len(cols) - 1) / 2) * width for k in range(len(rows))]
            ys = [r.values.get(col) or 0.0 for r in rows]
            ax.bar(xs, ys, width, label=col, color=COLORS[i % len(COLORS)],
                   yerr=_whiskers(rows, col, ys), capsize=3, ecolor="#444444")
        top = max((v for r in rows for v in [*r.values.values(), *_highest(r)]
                   if v is not None), default=1.0)
        for k, row in enumerate(rows):
            parts = [(f"{p[0]}/{p[1]} " if len(table.ratios) > 1 else "") +
                     f"x{table.ratio(row, p):.2f}" for p in table.ratios
                     if table.ratio(row, p) is not None]
            if parts:
                text = "\n".join(parts)
                notes.append(f"{row.label}: {text}")
                high = max((v for v in row.values.values() if v is not None), default=0.0)
                ax.annotate(text, (k, high), xytext=(0, 4), textcoords="offset points",
                            ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels([textwrap.fill(r.label + (" (lower is better)"
                                                     if r.better == "lower" else ""), 22)
                            for r in rows], fontsize=8)
        ax.set_ylabel(unit)
        ax.set_ylim(0, (top or 1.0) * 1.35)
        ratios = ", ".join(table.ratio_name(p) if table.better_by else
                           f"{p[0]} / {p[1]}" for p in table.ratios)
        ax.set_title(textwrap.fill(f"pyvhost bench {table.bench}: {table.title} ({unit})",
                                   int(fig.get_figwidth() * 11)) +
                     (f"\nratios: {ratios}" if ratios else ""), fontsize=9)
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.18),
                  ncol=min(len(cols), 3), frameon=False)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return notes
