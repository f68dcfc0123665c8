"""The screen of ``pyvhost top`` as text: ``render`` turns a topdata.View (or none yet) and a
status line into at most ``height`` lines of at most ``width`` characters, each with a style
name ("title", "head", "warn", "text") that the terminal side maps to attributes. Pure: no
curses, no sockets, so the layout is tested without a terminal.
"""

from __future__ import annotations

import time

from .topdata import View

PORT_HEAD = (f"{'PORT':<18} {'TYPE':<10} {'STATE':<13} {'RX pps':>8} {'RX bit/s':>9} "
             f"{'TX pps':>8} {'TX bit/s':>9} {'drop/s':>7}  drops by reason (total, +/s)")
PMD_HEAD = (f"{'PMD':<4} {'CPU':>4} {'busy':>6} {'pps':>8} {'upcall/s':>9} {'hit':>6} "
            f"{'megaflows':>9}  queues (usage)")
FLOW_HEAD = f"{'BRIDGE':<10} {'pps':>8} {'bit/s':>9} {'packets':>12}  rule"


def human(value: float | None, unit: str = "") -> str:
    """1234567 -> '1.23M'; None (no rate yet) -> '-'."""
    if value is None:
        return "-"
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{suffix}{unit}"
    return f"{value:.0f}{unit}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _drops(totals: dict[str, int], rates: dict[str, float | None]) -> str:
    parts = []
    for reason, total in sorted(totals.items(), key=lambda kv: -kv[1]):
        if not total:
            continue
        rate = rates.get(reason)
        parts.append(f"{reason}={total}" + (f"(+{human(rate)}/s)" if rate else ""))
    return " ".join(parts) or "none"


def render(view: View | None, width: int, height: int, *, control: str,
           status: str = "", interval: float = 1.0) -> list[tuple[str, str]]:
    """The lines of one screen; the busiest rules get whatever room the rest leaves."""
    clock = time.strftime("%H:%M:%S")
    lines: list[tuple[str, str]] = [
        (f"pyvhost top  {control}  every {interval:g}s  {clock}  (q quits)", "title")]
    if status:
        lines.append((status, "warn"))
    if view is None:
        lines.append(("reading the switch...", "text"))
        return [(t[:width], s) for t, s in lines[:height]]
    lines += [("", "text"), (PORT_HEAD, "head")]
    for p in view.ports:
        known = [r for r in p.drop_rates.values() if r is not None]
        drop_rate = sum(known) if known else None
        lines.append((f"{p.bridge + '/' + p.port:<18.18} {p.type:<10.10} {p.state:<13.13} "
                      f"{human(p.rx_pps):>8} {human(p.rx_bps):>9} {human(p.tx_pps):>8} "
                      f"{human(p.tx_bps):>9} {human(drop_rate):>7}  "
                      f"{_drops(p.drop_totals, p.drop_rates)}", "text"))
    if not view.ports:
        lines.append(("(no ports)", "text"))
    lines += [("", "text"), (PMD_HEAD, "head")]
    for m in view.pmds:
        cpu = "any" if m.cpu is None else str(m.cpu)
        lines.append((f"{m.pmd:<4} {cpu:>4} {_pct(m.busy):>6} {human(m.pps):>8} "
                      f"{human(m.upcalls):>9} {_pct(m.hit):>6} {m.megaflows:>9}  "
                      f"{', '.join(m.queues) or '(no queues)'}", "text"))
    lines += [("", "text"), ("BUSIEST RULES", "head"), (FLOW_HEAD, "head")]
    room = height - len(lines)
    for f in view.flows[:max(room, 0)]:
        lines.append((f"{f.bridge:<10.10} {human(f.pps):>8} {human(f.bps):>9} "
                      f"{f.packets:>12}  {f.flow}", "text"))
    if not view.flows and room > 0:
        lines.append(("(no rule has counted a packet)", "text"))
    return [(t[:width], s) for t, s in lines[:height]]
