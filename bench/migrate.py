"""Live migration of a running guest between hosts, under a 1 ms prober.

A 3-host testbed with a private libvirtd per host. h1 boots the demo guest
with a tap; the guest holds its overlay address, which h1 routes and claims.
h3 probes that address every millisecond (ICMPv6 echo) for the whole run. The
guest is then live-migrated h1 -> h2 -> h1 … by the agents (libvirt, tcp over
the underlay); the destination agent, told beforehand with the owner's grant
for the next epoch, claims the address the moment the guest runs there.
Per migration: libvirt's reported downtime, and the probes sent during that
migration that got no reply. Prints one JSON object.
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
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from node.testbed import netns, testbed
from node.testbed.checks import full_mesh, ping, wait_for
from node.testbed.vm import NetworkVm
from segments.image.store import build

RECIPE = Path(__file__).resolve().parent.parent / "deploy" / "recipes" / "demo.toml"
NAME, TAP = "mig1", "gtmig1"
SETTLE_S = 3.0  # longer than the source's linger, so each migration starts clean


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--migrations", type=int, default=6)
    parser.add_argument("--json", action="store_true", help="print JSON (the only output form)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="gleaner-migrate-")) / "tb"
    prober = None
    try:
        hosts = testbed.up(3, root=root)
        wait_for(lambda: full_mesh(hosts), 60, "full mesh")
        image = build(RECIPE, root / "images")
        vm = NetworkVm(root, NAME, TAP)
        vm.start(hosts[0], image.id, "gleaner.steps=0 gleaner.every=100")
        address = vm.address
        wait_for(lambda: ping(hosts[2], address), 120, "the guest answering at its address")
        stop_file = root.parent / "stop-prober"
        prober = subprocess.Popen(
            netns.exec_command(hosts[2]["netns"], [
                sys.executable, "-m", "node.testbed.prober", address, "--duration-s",
                str(args.migrations * 30 + 60), "--stop-file", str(stop_file),
            ]),
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        time.sleep(1.0)
        runs = []
        for number in range(args.migrations):
            source, destination = (hosts[0], hosts[1]) if number % 2 == 0 else (hosts[1], hosts[0])
            start = time.monotonic()
            result = vm.migrate(source, destination)
            runs.append(
                {
                    **result,
                    "start": start,
                    "end": time.monotonic() + SETTLE_S,
                    "claimed": bool(result["claim"]),
                }
            )
            time.sleep(SETTLE_S)
        stop_file.touch()
        probe = json.loads(prober.communicate(timeout=120)[0])
        prober = None
        print(json.dumps(summarise(probe, runs, args)))
        return 0
    finally:
        if prober is not None:
            prober.kill()
            prober.wait()
        testbed.down(root)


def summarise(probe: dict, runs: list, args: argparse.Namespace) -> dict[str, Any]:
    interval = probe["interval_ms"] / 1000
    lost_times = [
        probe["first_send"] + seq * interval
        for first, count in probe["lost_runs"]
        for seq in range(first, first + count)
    ]
    lost = [sum(1 for t in lost_times if r["start"] <= t < r["end"]) for r in runs]
    downtime = [r["downtime_ms"] for r in runs]
    return {
        "bench": "migrate",
        "migrations": len(runs),
        "downtime_ms_median": round(statistics.median(downtime), 1),
        "downtime_ms_samples": [round(d, 1) for d in downtime],
        "total_ms_median": round(statistics.median(r["total_ms"] for r in runs), 1),
        "lost_probes_max": max(lost),
        "lost_probes_per_migration": lost,
        "gap_ms_max": probe["gap_ms_max"],
        "probes_sent": probe["sent"],
        "all_claimed": all(r["claimed"] for r in runs),
        "conditions": {
            "hosts": 3,
            "accelerator": "TCG (no KVM here)",
            "guest_memory_mib": 96,
            "probe_interval_ms": probe["interval_ms"],
            "cores": os.cpu_count(),
            "prober": "ICMPv6 echo from h3 to the guest's overlay address",
        },
    }


if __name__ == "__main__":
    sys.exit(main())
