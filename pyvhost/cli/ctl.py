"""``pyvhost ctl COMMAND...``: send one command to a running switch and print the answer;
exit 1 on an error answer, 2 when the switch cannot be reached."""

from __future__ import annotations

import argparse
import sys

from pyvhost.switch.control import request


def add_parser(sub) -> None:
    p = sub.add_parser("ctl", help="control a running switch (add-br, add-port, add-flow, ...)")
    p.add_argument("--control", default="./run/ctl.sock", help="the switch's control socket")
    p.add_argument("argv", nargs=argparse.REMAINDER, help="command and its arguments")
    p.set_defaults(run=run)


def run(args) -> int:
    if not args.argv:
        print("ctl: no command (try: show)", file=sys.stderr)
        return 2
    try:
        answer = request(args.control, args.argv)
    except OSError as e:
        print(f"ctl: cannot reach the switch at {args.control}: {e}", file=sys.stderr)
        return 2
    if not answer.get("ok"):
        print(f"ctl: {answer.get('error')}", file=sys.stderr)
        return 1
    if answer.get("output"):
        print(answer["output"])
    return 0
