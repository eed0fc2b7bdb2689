"""The `gleaner` command line: the agent, and the tools that talk to it.

Every command prints a readable table by default and one JSON document with
``--json``. Errors are one line on stderr and a non-zero exit: 2 for bad usage
or configuration, 1 for everything else.

This module only assembles the parser; each group of commands lives in its own
module beside it, and what they share in node/cli/common.py:

    agent.py    agent, status, peers           market.py   submit, jobs, watch, fetch, ledger
    host.py     drain, undrain                 testbed.py  testbed, demo
    stores.py   image, blocks (image.py, blocks.py)
    sim.py      sim
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from node import __version__
from node.cli import agent, host, market, sim, stores, testbed
from node.cli.common import EXIT_USAGE, CliError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gleaner", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"gleaner {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    agent.add_commands(sub)
    market.add_commands(sub)
    host.add_commands(sub)
    testbed.add_testbed_command(sub)
    stores.add_commands(sub)
    sim.add_commands(sub)
    testbed.add_demo_command(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        return int(args.func(args))
    except CliError as exc:
        print(f"gleaner: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
