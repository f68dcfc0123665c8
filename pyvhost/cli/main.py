"""Entry point of the ``pyvhost`` command: parses the subcommand and runs it."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from . import bench, ctl, demo, gen, reflector, switch

SUBCOMMANDS = [reflector, switch, ctl, gen, bench, demo]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyvhost", description="vhost-user switch and tools")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more log output (-vv for every message)")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in SUBCOMMANDS:
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    if os.environ.get("PYVHOST_LOG"):
        level = os.environ["PYVHOST_LOG"].upper()
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
