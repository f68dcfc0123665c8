"""``pyvhost bench NAME``: runs the benchmark script bench/NAME.py of the source tree.

Benchmarks measure pyvhost next to its peers (DPDK) in one run and print ratios; they are
not tests and set no thresholds. They need the repository checkout (they drive DPDK and
QEMU through the test harness), so this only finds and runs them.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BENCH_DIR = ROOT / "bench"


def available() -> list[str]:
    return sorted(p.stem for p in BENCH_DIR.glob("*.py") if not p.stem.startswith("_"))


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="run a benchmark from bench/ (pyvhost vs DPDK, same run)")
    p.add_argument("name", help="benchmark name: " + (", ".join(available()) or "none found"))
    p.add_argument("args", nargs="*", help="arguments for the benchmark (after --)")
    p.set_defaults(run=run)


def run(args) -> int:
    script = BENCH_DIR / f"{args.name}.py"
    if not script.is_file():
        print(f"bench: no benchmark {args.name!r} (have: {', '.join(available())})",
              file=sys.stderr)
        return 2
    sys.path.insert(0, str(ROOT))
    sys.argv = [str(script), *args.args]
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as e:
        return int(e.code or 0)
    return 0
