"""Moving a VM address between hosts through route claims, under a 1 ms prober.

A 3-host testbed: the VM stand-in starts on h1 and moves h1 -> h2 -> h1 … by
the agents' route-claim path (`vm_attach` at the destination; the old host
lingers, then withdraws). A prober on h3 sends one ICMPv6 echo per millisecond
to the VM's overlay address for the whole run. Per move we count the probes
sent during that move's window that got no reply; `propagation_ms` is the time
from the claim at the destination to the route change on h3 (both agents' wall
clocks, same machine): the claim is persisted (fsync) before it is sent, so
that time is part of it. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from node.testbed import netns, testbed
from node.testbed import vm as testbed_vm
from node.testbed.checks import full_mesh, ping, rpc, wait_for

SETTLE_S = 0.5


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--moves", type=int, default=20)
    parser.add_argument("--interval-ms", type=float, default=1.0)
    parser.add_argument("--json", action="store_true", help="print JSON (the only output form)")
    parser.add_argument("--debug", action="store_true", help="also list when each loss happened")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="gleaner-move-")) / "tb"
    prober = None
    try:
        hosts = testbed.up(3, root=root, libvirt=False)
        wait_for(lambda: full_mesh(hosts), 60, "full mesh")
        vm = testbed_vm.vm_add(root, "vm1")
        testbed_vm.vm_move(root, "vm1", "h1")
        wait_for(lambda: ping(hosts[2], vm["address"]), 20, "VM reachable")
        stop_file = root.parent / "stop-prober"
        duration = args.moves * 10 + 60
        prober = subprocess.Popen(
            netns.exec_command(
                hosts[2]["netns"],
                [
                    sys.executable,
                    "-m",
                    "node.testbed.prober",
                    vm["address"],
                    "--interval-ms",
                    str(args.interval_ms),
                    "--duration-s",
                    str(duration),
                    "--stop-file",
                    str(stop_file),
                ],
            ),
            stdout=subprocess.PIPE,
            text=True,
        )
        time.sleep(SETTLE_S)
        windows = []
        for move in range(args.moves):
            destination = "h2" if move % 2 == 0 else "h1"
            start = time.monotonic()
            result = testbed_vm.vm_move(root, "vm1", destination)
            time.sleep(SETTLE_S)
            windows.append((start, time.monotonic(), result["epoch"], destination))
        stop_file.touch()
        out, _ = prober.communicate(timeout=120)
        prober = None
        probe = json.loads(out)
        print(json.dumps(summarise(probe, windows, hosts, vm["address"], args)))
        return 0
    finally:
        if prober is not None:
            prober.kill()
            prober.wait()
        testbed.down(root)


def debug_offsets(lost_times: list, windows: list, hosts: list, address: str) -> list:
    """Each loss's time relative to the destination's claim (wall clock mapped to monotonic)."""
    shift = time.time() - time.monotonic()
    offsets = []
    for start, end, epoch, destination in windows:
        origin = next(h for h in hosts if h["name"] == destination)
        claimed = (
            next(
                h["at"]
                for h in rpc(origin, "routes")["history"]
                if h["address"] == address and h["event"] == "claimed" and h["epoch"] == epoch
            )
            - shift
        )
        routed = {
            h["at"] - shift
            for h in rpc(hosts[2], "routes")["history"]
            if h["address"] == address and h["event"] == "routed" and h["epoch"] == epoch
        }
        offsets.append(
            {
                "observer_routed_ms": [round((t - claimed) * 1000, 1) for t in routed],
                "lost_ms": [round((t - claimed) * 1000, 1) for t in lost_times if start <= t < end],
            }
        )
    return offsets


def summarise(probe: dict, windows: list, hosts: list, address: str, args) -> dict:
    lost_times = [  # when each lost probe really left (a stalled prober sends late)
        start + (end - start) * i / max(count - 1, 1)
        for (_, count), (start, end) in zip(
            probe["lost_runs"], probe["lost_runs_sent"], strict=True
        )
        for i in range(count)
    ]
    per_move = [sum(1 for t in lost_times if start <= t < end) for start, end, _, _ in windows]
    observer = {
        h["epoch"]: h["at"]
        for h in rpc(hosts[2], "routes")["history"]
        if h["address"] == address and h["event"] == "routed"
    }
    propagation = []
    for _, _, epoch, destination in windows:
        origin = next(h for h in hosts if h["name"] == destination)
        claimed = {
            h["epoch"]: h["at"]
            for h in rpc(origin, "routes")["history"]
            if h["address"] == address and h["event"] == "claimed"
        }
        if epoch in claimed and epoch in observer:
            propagation.append((observer[epoch] - claimed[epoch]) * 1000)
    return {
        "bench": "overlay_move",
        "moves": len(windows),
        "lost_probes_median": statistics.median(per_move),
        "lost_probes_max": max(per_move),
        "lost_probes_per_move": per_move,
        "lost_after_claim_ms": debug_offsets(lost_times, windows, hosts, address)
        if args.debug
        else None,
        "gap_ms_max": probe["gap_ms_max"],
        "propagation_ms_median": round(statistics.median(propagation), 3) if propagation else None,
        "propagation_ms_max": round(max(propagation), 3) if propagation else None,
        "probes_sent": probe["sent"],
        "probes_lost": probe["lost"],
        "rtt_ms_median": probe["rtt_ms_median"],
        "conditions": {
            "hosts": 3,
            "probe_interval_ms": args.interval_ms,
            "cores": os.cpu_count(),
            "linger_s": 2.0,
            "prober": "ICMPv6 echo from h3 to the VM's overlay address",
        },
    }


if __name__ == "__main__":
    sys.exit(main())
