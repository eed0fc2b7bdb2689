"""`make demo`: the main job on a local testbed swarm, as much of the mission as exists.

1. Bring up a swarm of hosts, each its own network namespace with an agent and
   its wireguard-go; agents find each other by mDNS and mesh up.
2. Show every agent, then ping every host from every other over the overlay.
3. Start a VM stand-in on one host and move its stable overlay address from
   host to host through the agents' route claims while another host probes it
   every millisecond; report each move and what the prober saw.
4. The market: the first host injects a VM job with k = 2; the others bid for
   each segment, two run it, the owner verifies the first completion by
   restoring it, commits it and pays that host with hash-chain tokens; the next
   segment restores from the committed checkpoint on whichever hosts win it.
   A summary table (segment, replicas, winner, time, tokens paid) and the
   result, checked against the same computation done outside the VM. Then
   live-migrate a network guest and watch its address follow.
4b. A job owner's own program (node/testbed/demo_own.py): an OCI image packed
   here, an input file, outputs fetched home and checked, across segments
   that run on several hosts, each taking the image into its own library
   (with four hosts or more, as `make demo` runs it).
5. Crash one agent (SIGKILL), watch the others declare it dead and drop its
   WireGuard peer, restart it and watch it rejoin.
6. Tear everything down, on every path.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from node.testbed import netns, testbed
from node.testbed import vm as testbed_vm
from node.testbed.checks import full_mesh, overlay_address, ping, rpc, wait_for

MESH_TIMEOUT_S = 60.0


def run(hosts: int, root: Path) -> int:
    console = Console()
    if not console.is_terminal:
        console = Console(width=180)  # keep 52-character node ids whole in logs
    console.print(f"[bold]gleaner demo[/bold]: bringing up {hosts} hosts under {root}")
    try:
        described = testbed.up(hosts, root=root)
        started = max(h["started_at"] for h in described)
        wait_for(lambda: full_mesh(described), MESH_TIMEOUT_S, "a full mesh")
        console.print(f"full mesh {time.time() - started:.2f} s after the last agent started")
        _show_agents(console, described)
        ok = _ping_matrix(console, described)
        if hosts >= 3:
            _move_vm(console, root, described)
            from node.testbed import demo_vm

            image = demo_vm.build_image(console, root)
            ok &= demo_vm.market_job(console, image, described)
            if hosts >= 4:  # k = 2 hosts must remain when the first winner is drained
                from node.testbed import demo_own

                ok &= demo_own.own_program_job(console, root, described)
            demo_vm.live_migration(console, root, image, described)
            _crash_and_rejoin(console, root, described)
        ids = {host["node_id"] for host in described}
        console.print(f"{len(ids)} distinct node ids across {len(described)} hosts")
        return 0 if ok and len(ids) == len(described) else 1
    finally:
        removed = testbed.down(root=root)
        console.print(
            f"torn down: {len(removed['stopped'])} agents stopped, "
            f"{len(removed['namespaces'])} namespaces removed"
        )


def _show_agents(console: Console, described: list[dict[str, Any]]) -> None:
    table = Table(title="agents")
    for column in ("host", "node id", "underlay", "overlay", "peers alive", "wg interface"):
        table.add_column(column, no_wrap=True)
    for host in described:
        status = rpc(host, "status")
        table.add_row(
            host["name"],
            status["node_id"],
            ", ".join(status["underlay"]),
            status["overlay_address"],
            str(status["peer_count"]),
            status["overlay_interface"] or "-",
        )
    console.print(table)


def _ping_matrix(console: Console, described: list[dict[str, Any]]) -> bool:
    addresses = {host["name"]: overlay_address(host) for host in described}
    table = Table(title="overlay ping (row pings column)")
    table.add_column("")
    for host in described:
        table.add_column(host["name"])
    ok = True
    for host in described:
        cells = []
        for other in described:
            if other is host:
                cells.append("-")
                continue
            reached = ping(host, addresses[other["name"]])
            ok &= reached
            cells.append("[green]ok[/green]" if reached else "[red]lost[/red]")
        table.add_row(host["name"], *cells)
    console.print(table)
    return ok


def _move_vm(console: Console, root: Path, described: list[dict[str, Any]]) -> None:
    vm = testbed_vm.vm_add(root, "vm1")
    path = [h["name"] for h in described[:-1]]
    prober_host = described[-1]
    testbed_vm.vm_move(root, "vm1", path[0])
    wait_for(lambda: ping(prober_host, vm["address"]), 20, "the VM reachable")
    console.print(
        f"VM stand-in vm1 at {vm['address']} started on {path[0]}; "
        f"{prober_host['name']} probes it every 1 ms while it moves"
    )
    stop_file = root / "stop-prober"
    stop_file.unlink(missing_ok=True)  # a file left by an earlier demo would stop it at once
    prober = subprocess.Popen(
        netns.exec_command(
            prober_host["netns"],
            [
                sys.executable,
                "-m",
                "node.testbed.prober",
                vm["address"],
                "--duration-s",
                "60",
                "--stop-file",
                str(stop_file),
            ],
        ),
        stdout=subprocess.PIPE,
        text=True,
    )
    table = Table(title="moves of vm1 (make-before-break, by route claim)")
    for column in ("epoch", "from", "to", "old host withdrew after"):
        table.add_column(column)
    try:
        time.sleep(0.3)
        for source, destination in zip(path, [*path[1:], path[0]], strict=False):
            moved = testbed_vm.vm_move(root, "vm1", destination)
            table.add_row(
                str(moved["epoch"]), source, destination, f"{moved['old_host_withdrawn_s']:.2f} s"
            )
        stop_file.touch()
        result = json.loads(prober.communicate(timeout=120)[0])
    finally:
        if prober.poll() is None:
            prober.kill()
            prober.wait()
    console.print(table)
    console.print(
        f"prober: {result['sent']} probes, {result['lost']} lost, "
        f"longest gap between replies {result['gap_ms_max']:.1f} ms, "
        f"median rtt {result['rtt_ms_median']:.2f} ms"
    )


def _crash_and_rejoin(console: Console, root: Path, described: list[dict[str, Any]]) -> None:
    victim, others = described[-1], described[:-1]
    state = json.loads((root / "testbed.json").read_text())
    testbed.kill_agent(next(h for h in state["hosts"] if h["name"] == victim["name"]))
    killed = time.monotonic()

    def all_dead() -> bool:
        return all(
            not any(
                p["node_id"] == victim["node_id"]
                and (p["state"] in ("alive", "suspect") or p["wireguard_peer"])
                for p in rpc(host, "peers")
            )
            for host in others
        )

    wait_for(all_dead, 30, "the crashed agent declared dead")
    console.print(
        f"killed the agent on {victim['name']} (SIGKILL): the others declared it dead and "
        f"dropped its WireGuard peer after {time.monotonic() - killed:.2f} s"
    )
    restarted = testbed.restart_agent(root, victim["name"])
    wait_for(lambda: full_mesh(described), MESH_TIMEOUT_S, "the mesh after the restart")
    console.print(
        f"restarted it: back in the full mesh {time.time() - restarted['started_at']:.2f} s "
        "after its process started (same node id)"
    )
