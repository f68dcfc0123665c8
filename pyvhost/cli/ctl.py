"""``pyvhost ctl COMMAND...``: send one command to a running switch and print the answer;
exit 1 on an error answer, 2 when the switch cannot be reached. Imports only the wire
format (pyvhost.switch.wire), so a call costs an interpreter start and little more."""

from __future__ import annotations

import argparse
import os
import sys

from pyvhost.switch.wire import MAX_FLOW_FILE, request


def add_parser(sub) -> None:
    p = sub.add_parser("ctl", help="control a running switch (add-br, add-port, add-flow, ...)")
    p.add_argument("--control", default="./run/ctl.sock", help="the switch's control socket")
    p.add_argument("argv", nargs=argparse.REMAINDER, help="command and its arguments")
    p.set_defaults(run=run)


FILE_COMMANDS = ("add-flows", "replace-flows")     # their FILE argument is read here


def _with_file(argv: list[str]) -> list[str]:
    """add-flows/replace-flows BRIDGE FILE: send the file's text (``-``: stdin)."""
    if len(argv) != 3 or argv[0] not in FILE_COMMANDS:
        return argv
    path = argv[2]
    limit = MAX_FLOW_FILE
    if path == "-":
        data = sys.stdin.buffer.read(limit + 1)
    else:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{path}: larger than {limit} bytes")
    try:
        return [argv[0], argv[1], data.decode()]
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not text ({e})") from None


def run(args) -> int:
    if not args.argv:
        print("ctl: no command (try: show)", file=sys.stderr)
        return 2
    try:
        argv = _with_file(args.argv)
    except (OSError, ValueError) as e:
        print(f"ctl: {e}", file=sys.stderr)
        return 1
    try:
        answer = request(args.control, argv, timeout=600.0 if argv is not args.argv else 30.0)
    except OSError as e:
        print(f"ctl: cannot reach the switch at {args.control}: {e}", file=sys.stderr)
        return 2
    if answer.get("warning"):
        print(f"ctl: warning: {answer['warning']}", file=sys.stderr)
    if not answer.get("ok"):
        print(f"ctl: {answer.get('error')}", file=sys.stderr)
        return 1
    if answer.get("output"):
        try:
            print(answer["output"])
            sys.stdout.flush()
        except BrokenPipeError:                  # `ctl dump-flows br0 | head`: fine
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0
