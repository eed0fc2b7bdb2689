"""How fast agents find each other and mesh up, and how fast a crash is noticed.

Each run brings up a fresh testbed of N hosts (network namespaces, mDNS on the
bridge, wireguard-go per host) and measures, from the moment the *last* agent
process was started, until every agent lists every other as alive and has a
WireGuard session with it (`full_mesh_s`). With `--failure` it then kills one
agent with SIGKILL and measures until every other agent has marked it dead and
removed its WireGuard peer (`dead_s`), restarts it, and measures until the
mesh is full again (`rejoin_s`). Prints one JSON object: medians, all samples,
and the conditions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from node.testbed import testbed
from node.testbed.checks import full_mesh, rpc, wait_for


def one_run(hosts: int, failure: bool) -> dict[str, float]:
    root = Path(tempfile.mkdtemp(prefix="gleaner-bench-")) / "tb"
    try:
        described = testbed.up(hosts, root=root, libvirt=False)
        last_start = max(h["started_at"] for h in described)
        wait_for(lambda: full_mesh(described), 60, "full mesh", step_s=0.01)
        sample = {"full_mesh_s": time.time() - last_start}
        if failure:
            sample.update(crash_and_rejoin(root, described))
        return sample
    finally:
        testbed.down(root)


def crash_and_rejoin(root: Path, described: list[dict]) -> dict[str, float]:
    victim, others = described[-1], described[:-1]
    state = json.loads((root / "testbed.json").read_text())
    testbed.kill_agent(next(h for h in state["hosts"] if h["name"] == victim["name"]))
    killed = time.time()

    def all_dead() -> bool:
        for host in others:
            for peer in rpc(host, "peers"):
                if peer["node_id"] == victim["node_id"] and (
                    peer["state"] == "alive" or peer["state"] == "suspect" or peer["wireguard_peer"]
                ):
                    return False
        return True

    wait_for(all_dead, 60, "the killed agent marked dead everywhere", step_s=0.01)
    dead_s = time.time() - killed
    restarted = testbed.restart_agent(root, victim["name"])
    wait_for(lambda: full_mesh(described), 60, "mesh after restart", step_s=0.01)
    return {"dead_s": dead_s, "rejoin_s": time.time() - restarted["started_at"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=5)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--failure", action="store_true", help="also measure crash detection")
    parser.add_argument("--json", action="store_true", help="print JSON (the only output form)")
    args = parser.parse_args()
    samples = [one_run(args.hosts, args.failure) for _ in range(args.runs)]
    result: dict = {
        "bench": "discovery",
        "hosts": args.hosts,
        "runs": args.runs,
        "conditions": {
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "discovery": "mDNS on one bridge",
            "probe_interval_s": 0.5,
            "gossip_interval_s": 0.2,
        },
    }
    for key in samples[0]:
        values = [round(s[key], 3) for s in samples]
        result[key] = round(statistics.median(values), 3)
        result[f"{key}_samples"] = values
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
