"""`gleaner agent | status | peers`: run the agent, and ask it about itself."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Any

from node.cli.common import (
    CliError,
    Subcommands,
    add_command,
    add_target,
    console,
    format_duration,
    load_config,
    print_json,
    rpc,
)


def add_commands(sub: Subcommands) -> None:
    agent = add_command(sub, "agent", cmd_agent, "run the agent in the foreground")
    agent.add_argument("--config", help="TOML config file (defaults for every field)")
    agent.add_argument("--state-dir", help="override node.state_dir")
    add_target(
        add_command(
            sub, "status", cmd_status, "show this node's agent: id, addresses, uptime, peers"
        )
    )
    add_target(
        add_command(
            sub, "peers", cmd_peers, "list the swarm members this agent knows, with WireGuard state"
        )
    )


def cmd_agent(args: argparse.Namespace) -> int:
    import trio

    from node.base.identity import IdentityError
    from node.runtime.agent import run_agent
    from node.runtime.state import StateError

    loaded = load_config(args)
    logging.basicConfig(
        level=getattr(logging, loaded["log.level"].upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        trio.run(run_agent, loaded)
    except (IdentityError, StateError) as exc:
        raise CliError(str(exc)) from None
    except OSError as exc:
        raise CliError(f"agent failed to start: {exc}") from None
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    status = rpc(args, "status")
    if args.json:
        print_json(status)
        return 0
    from rich.table import Table

    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    rows = [
        ("node id", status["node_id"]),
        ("name", status["name"] or "-"),
        ("version", status["version"]),
        ("swarm", status["swarm_id"]),
        ("uptime", format_duration(status["uptime_s"])),
        ("underlay", ", ".join(status["underlay"]) or status["listen"]),
        ("overlay", status["overlay_address"]),
        ("peers", str(status["peer_count"])),
        ("policy", _policy_line(status.get("policy"))),
        ("protocol errors", str(status["protocol_errors"])),
        ("state", status["state_dir"]),
    ]
    for key, value in rows:
        table.add_row(key, value)
    console().print(table)
    return 0


def _policy_line(policy: dict[str, Any] | None) -> str:
    if not policy:
        return "-"
    bidding = "bidding" if policy["bidding"] else "not bidding"
    running = policy["replicas_running"]
    return f"{policy['state']} ({policy['reason']}); {bidding}; {running} replica(s) here"


def cmd_peers(args: argparse.Namespace) -> int:
    peers = rpc(args, "peers")
    if args.json:
        print_json(peers)
        return 0
    from rich.table import Table

    table = Table(box=None, pad_edge=False)
    for column in ("node", "overlay", "endpoint", "state", "handshake", "rx", "tx"):
        table.add_column(column, no_wrap=True)
    now = time.time()
    for peer in peers:
        handshake = peer["last_handshake"]
        table.add_row(
            peer["short_id"],
            peer["overlay_address"],
            peer["endpoint"] or "-",
            peer["state"],
            format_duration(now - handshake) + " ago" if handshake else "never",
            _format_bytes(peer["rx_bytes"]),
            _format_bytes(peer["tx_bytes"]),
        )
    console().print(table)
    return 0


def _format_bytes(count: int) -> str:
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{count} B"
