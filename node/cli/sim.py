"""`gleaner sim SCENARIO`: run a simulation scenario (the simulator is node/sim)."""

from __future__ import annotations

import argparse

from node.cli.common import EXIT_USAGE, CliError, Subcommands, add_command


def add_commands(sub: Subcommands) -> None:
    sim = add_command(sub, "sim", cmd_sim, "run a simulation scenario (node/sim/scenarios/*.toml)")
    sim.add_argument("scenario", help="the scenario's TOML file")
    sim.add_argument("--seed", type=int, default=1, help="the run's seed (default 1)")
    sim.add_argument("--json", action="store_true", help="print JSON")
    sim.add_argument("--plot", metavar="DIR", help="write PNG charts into DIR")


def cmd_sim(args: argparse.Namespace) -> int:
    from node.sim.cli import main as sim_main
    from node.sim.scenario import ScenarioError

    try:
        return sim_main(args.scenario, args.seed, args.json, args.plot, print)
    except ScenarioError as exc:
        raise CliError(f"scenario: {exc}", EXIT_USAGE) from None
