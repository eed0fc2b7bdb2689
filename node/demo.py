"""`make demo`: the main job on a local testbed swarm, as much of the mission as exists.

Today: bring up a swarm of hosts (each its own network namespace, agent inside),
show every agent's status, and tear everything down again, on every path.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from node import testbed
from node.control import call


def run(hosts: int, root: Path) -> int:
    console = Console()
    if not console.is_terminal:
        console = Console(width=180)  # keep 52-character node ids whole in logs
    console.print(f"[bold]gleaner demo[/bold]: bringing up {hosts} hosts under {root}")
    try:
        described = testbed.up(hosts, root=root)
        table = Table(title="agents")
        for column in ("host", "netns", "node id", "underlay", "overlay", "uptime", "version"):
            table.add_column(column, no_wrap=True)
        for host in described:
            status = call(Path(host["socket"]), "status")
            table.add_row(
                host["name"],
                host["netns"],
                status["node_id"],
                ", ".join(status["underlay"]),
                status["overlay_address"],
                f"{status['uptime_s']:.1f}s",
                status["version"],
            )
        console.print(table)
        ids = {host["node_id"] for host in described}
        console.print(f"{len(ids)} distinct node ids across {len(described)} hosts")
        return 0 if len(ids) == len(described) else 1
    finally:
        removed = testbed.down(root=root)
        console.print(
            f"torn down: {len(removed['stopped'])} agents stopped, "
            f"{len(removed['namespaces'])} namespaces removed"
        )
