"""``pyvhost bench NAME``: runs the benchmark script bench/NAME.py of the source tree;
``--plot FILE.png`` draws the table it emits (benchplot), ``--rows FILE.json`` keeps its rows,
``--from-rows FILE.json`` draws saved rows without running anything.

Benchmarks measure pyvhost next to its peers (DPDK, OVS) in one run and print ratios; they
are not tests and set no thresholds. They need the repository checkout (they drive DPDK and
QEMU through the test harness), so this only finds and runs them.
"""

from __future__ import annotations

import argparse
import logging
import runpy
import sys
from pathlib import Path

from . import benchtable

ROOT = Path(__file__).resolve().parents[2]
BENCH_DIR = ROOT / "bench"
log = logging.getLogger("pyvhost.bench")


def available() -> list[str]:
    return sorted(p.stem for p in BENCH_DIR.glob("*.py") if not p.stem.startswith("_"))


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="run a benchmark from bench/ (pyvhost vs DPDK, same run)")
    p.add_argument("name", help="benchmark name: " + (", ".join(available()) or "none found"))
    p.add_argument("args", nargs=argparse.REMAINDER,
                   help="arguments for the benchmark (after --)")
    _own_options(p)
    p.set_defaults(run=run)


def _own_options(p) -> None:
    p.add_argument("--plot", metavar="FILE.png", help="draw the bench's table into this PNG")
    p.add_argument("--rows", metavar="FILE.json", help="save the bench's table as JSON")
    p.add_argument("--from-rows", metavar="FILE.json",
                   help="do not run: draw (--plot) the table saved with --rows")


def _split(args) -> None:
    """Our options given after NAME (``bench switch --plot f.png -- --sizes 64``) are ours;
    the rest, and all after ``--``, the benchmark's."""
    rest = list(args.args)
    cut = rest.index("--") if "--" in rest else len(rest)
    own = argparse.ArgumentParser(add_help=False)
    _own_options(own)
    mine, theirs = own.parse_known_args(rest[:cut])
    for key in ("plot", "rows", "from_rows"):
        if getattr(mine, key) is not None:
            setattr(args, key, getattr(mine, key))
    args.args = theirs + rest[cut + 1:]


def _fail(message: str) -> int:
    log.error("bench: %s", message)
    print(f"bench: {message}", file=sys.stderr)
    return 2


def run(args) -> int:
    _split(args)
    if args.plot and not args.plot.lower().endswith(".png"):
        return _fail(f"--plot {args.plot}: give a .png file name")
    if args.from_rows:
        if not args.plot:
            return _fail("--from-rows needs --plot FILE.png")
        try:
            tables = benchtable.load(args.from_rows)
        except benchtable.TableError as e:
            return _fail(str(e))
        return _outputs(args, tables)
    script = BENCH_DIR / f"{args.name}.py"
    if not script.is_file():
        return _fail(f"no benchmark {args.name!r} (have: {', '.join(available())})")
    sys.path.insert(0, str(ROOT))
    sys.argv = [str(script), *args.args]
    benchtable.emitted()                              # forget any earlier run's tables
    code = 0
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    tables = benchtable.emitted()
    if code or not (args.plot or args.rows):
        return code
    if not tables:
        return _fail(f"{args.name} emitted no table: nothing to plot or save")
    return _outputs(args, tables)


def _outputs(args, tables: list[benchtable.Table]) -> int:
    try:
        if args.rows and not args.from_rows:
            benchtable.save(tables, args.rows)
            print(f"bench: rows saved to {args.rows}")
        if args.plot:
            from .benchplot import draw
            draw(tables, args.plot)
            print(f"bench: plot written to {args.plot}")
    except (OSError, benchtable.TableError) as e:
        return _fail(str(e))
    return 0
