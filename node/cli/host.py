"""`gleaner drain | undrain`: the host operator's commands.

    gleaner drain [--deadline S] stop bidding, empty this host (progress until empty)
    gleaner undrain              bid again

A drain survives restarts of the agent. Both commands take ``--json``.
"""

from __future__ import annotations

import argparse
import time

from node.cli.common import (
    CliError,
    Subcommands,
    add_command,
    add_target,
    console,
    print_json,
    rpc,
)


def add_commands(sub: Subcommands) -> None:
    drain = add_command(
        sub, "drain", cmd_drain, "stop bidding and empty this host (survives restarts)"
    )
    add_target(drain)
    drain.add_argument("--deadline", type=float, help="seconds from now to be empty by")
    drain.add_argument("--no-wait", action="store_true", help="start the drain and return")
    add_target(add_command(sub, "undrain", cmd_undrain, "take this host back into the market"))


def cmd_drain(args: argparse.Namespace) -> int:
    params = {"deadline_s": args.deadline} if args.deadline is not None else {}
    policy = rpc(args, "drain", params)
    if args.no_wait:
        print_json(policy) if args.json else print(f"draining: {policy['reason']}")
        return 0
    from rich.progress import Progress, SpinnerColumn, TextColumn

    start = time.monotonic()
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), console=console()) as bar:
        task = bar.add_task("draining")
        while policy["state"] != "drained":
            guests = ", ".join(policy["guests"]) or "none"
            bar.update(
                task, description=f"draining: {policy['replicas_running']} replica(s) ({guests})"
            )
            time.sleep(0.5)
            policy = rpc(args, "status")["policy"]
            if policy is None or not policy["draining"]:
                raise CliError("the drain was called off (undrain)")
    elapsed = time.monotonic() - start
    if args.json:
        print_json({**policy, "time_to_empty_s": round(elapsed, 3)})
    else:
        print(f"host empty after {elapsed:.1f} s; not bidding until `gleaner undrain`")
    return 0


def cmd_undrain(args: argparse.Namespace) -> int:
    policy = rpc(args, "undrain")
    print_json(policy) if args.json else print(f"{policy['state']}: {policy['reason']}")
    return 0
