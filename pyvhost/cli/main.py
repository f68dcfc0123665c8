"""Entry point of the ``pyvhost`` command: parses the subcommand and runs it. Only the
chosen subcommand's module is imported (``pyvhost ctl`` must start fast); ``--help``
without a subcommand imports them all to list them."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

SUBCOMMANDS = ["reflector", "switch", "ctl", "gen", "bench", "demo", "guest", "top",
               "capture"]


def _chosen(argv: list[str]) -> list[str]:
    """The subcommand modules to load: the first word that names one, else all."""
    for arg in argv:
        if arg in SUBCOMMANDS:
            return [arg]
        if not arg.startswith("-"):
            break
    return SUBCOMMANDS


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyvhost", description="vhost-user switch and tools")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more log output (-vv for every message)")
    parser.add_argument("--log-format", choices=("text", "json"), default="text",
                        help="log lines as text or as JSON objects (repeats are rate-limited)")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in _chosen(sys.argv[1:] if argv is None else argv):
        importlib.import_module(f"pyvhost.cli.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(argv)
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "own_parser", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.words = extra         # a subcommand with its own parser (capture) parses these
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    if os.environ.get("PYVHOST_LOG"):
        level = os.environ["PYVHOST_LOG"].upper()
    from pyvhost.cli import logsetup
    logsetup.setup(level, args.log_format)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
