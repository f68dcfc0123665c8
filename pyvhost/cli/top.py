"""``pyvhost top``: a live terminal view of a running switch (curses; plain terminals and SSH
sessions are enough): ports' rx/tx rates and drops by reason, PMDs' busy share and queues,
the busiest rules, read from the control socket every --interval seconds (topdata) and
drawn by topscreen. q or Ctrl-C ends it with status 0 (SIGTERM and SIGHUP too); a switch
that is not running at the start is exit status 2 with the reason; a switch that goes away
later is said on screen and asked again every interval. ``--batch`` prints screens as text
instead (for pipes and logs). Changes nothing in the switch.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import time

from . import topdata
from .topscreen import render

log = logging.getLogger("pyvhost.top")
MAX_INTERVAL = 3600.0


class _Stop(Exception):
    """SIGTERM or SIGHUP: leave like q does."""


def add_parser(sub) -> None:
    p = sub.add_parser("top", help="live view of a running switch: ports, PMDs, busiest rules")
    p.add_argument("--control", default="./run/ctl.sock", help="the switch's control socket")
    p.add_argument("--run-dir", help="the switch's run directory (its ctl.sock; instead of "
                                     "--control)")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between readings")
    p.add_argument("-b", "--batch", action="store_true",
                   help="print the screens as text, no terminal control")
    p.add_argument("-n", "--iterations", type=int, default=0,
                   help="end after this many readings (0: until q or Ctrl-C)")
    p.set_defaults(run=run)


class Reader:
    """The last good sample, the view against the one before, and what went wrong since."""

    def __init__(self, control: str, interval: float):
        self.control = control
        self.interval = interval
        self.last: topdata.Sample | None = None
        self.view: topdata.View | None = None
        self.status = ""
        self.error = ""                          # the last reading's failure
        self.gone_since: float | None = None

    def poll(self) -> bool:
        """Read once; False (and a status line) if the switch could not be read."""
        try:
            sample = topdata.read(self.control, timeout=max(2.0, min(self.interval, 10.0)))
        except topdata.SwitchGone as e:
            self.error = str(e)
            if self.gone_since is None:
                self.gone_since = time.time()
                log.warning("top: %s", e)
            since = time.strftime("%H:%M:%S", time.localtime(self.gone_since))
            self.status = f"switch not answering since {since}: {e}; retrying every " \
                          f"{self.interval:g}s"
            return False
        if self.gone_since is not None:
            log.warning("top: the switch at %s answers again", self.control)
        self.gone_since, self.status = None, ""
        self.view = topdata.diff(self.last, sample)
        self.last = sample
        return True

    def screen(self, width: int, height: int) -> list[tuple[str, str]]:
        return render(self.view, width, height, control=self.control, status=self.status,
                      interval=self.interval)


def run(args) -> int:
    control = os.path.join(args.run_dir, "ctl.sock") if args.run_dir else args.control
    if not 0.05 <= args.interval <= MAX_INTERVAL:
        log.error("top: bad --interval %r", args.interval)
        print(f"top: --interval {args.interval:g}: give seconds from 0.05 to {MAX_INTERVAL:g}",
              file=sys.stderr)
        return 2
    if args.iterations < 0:
        print("top: --iterations: 0 or more", file=sys.stderr)
        return 2
    if not args.batch and not (sys.stdin.isatty() and sys.stdout.isatty()):
        print("top: stdin/stdout is not a terminal (use --batch for text output)",
              file=sys.stderr)
        return 2
    reader = Reader(control, args.interval)
    if not reader.poll():
        print(f"top: {reader.error} (is `pyvhost switch` running there?)", file=sys.stderr)
        return 2

    def stop(signum, frame):
        raise _Stop()
    old = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        if args.batch:
            return _batch(reader, args.iterations)
        import curses
        return curses.wrapper(_loop, reader, args.iterations)
    except (KeyboardInterrupt, _Stop):
        return 0
    except BrokenPipeError:                      # `pyvhost top -b | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _batch(reader: Reader, iterations: int) -> int:
    width = shutil.get_terminal_size((160, 50)).columns
    done = 1
    while True:
        for text, _style in reader.screen(width, 1000):
            print(text)
        print(flush=True)
        if iterations and done >= iterations:
            return 0
        time.sleep(reader.interval)
        reader.poll()
        done += 1


def _loop(stdscr, reader: Reader, iterations: int) -> int:
    import curses
    try:
        curses.curs_set(0)
    except curses.error:
        pass                                     # a terminal without an invisible cursor
    styles = {"title": curses.A_REVERSE, "head": curses.A_BOLD, "text": curses.A_NORMAL,
              "warn": curses.A_BOLD}
    if curses.has_colors():
        curses.use_default_colors()
        curses.init_pair(1, curses.COLOR_RED, -1)
        styles["warn"] = curses.color_pair(1) | curses.A_BOLD
    stdscr.timeout(100)                          # getch waits at most 0.1 s: q is prompt
    done = 1
    next_read = time.monotonic() + reader.interval
    while True:
        height, width = stdscr.getmaxyx()
        stdscr.erase()
        for y, (text, style) in enumerate(reader.screen(width - 1, height)):
            try:
                stdscr.addstr(y, 0, text, styles.get(style, curses.A_NORMAL))
            except curses.error:
                pass                             # the last cell of a small window
        stdscr.refresh()
        if iterations and done >= iterations:
            return 0
        while time.monotonic() < next_read:
            key = stdscr.getch()
            if key in (ord("q"), ord("Q")):
                return 0
            if key == curses.KEY_RESIZE:
                break
        if time.monotonic() >= next_read:
            reader.poll()
            done += 1
            next_read = time.monotonic() + reader.interval
