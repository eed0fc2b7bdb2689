"""How fast the simulator runs: N nodes for S simulated seconds, with one join measured.

Builds N identities and records, seeds a converged swarm of N - 1 real
membership cores from one shared roster, lets it run, has node N join at
``--warmup`` seconds, and runs until ``--seconds`` simulated seconds in all.
Prints one JSON object: wall and CPU time of the run (key generation is
reported apart: it is the same for every study of a seed), the simulated
figures (``convergence_s_p9999``: time until 99.99 % of the live nodes knew the
joiner), peak RSS, events and messages, and the conditions (cores, load
average before and after: the machine is shared, so wall time depends on what
else runs). Defaults are memberlist's LAN timers, the conditions of Serf's
convergence anchor; ``--agent-defaults`` uses the agent's own (0.5 s probes).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from node.membership.config import MembershipConfig
from node.sim.engine import Simulator
from node.sim.studies import RunSpec, run_join
from node.sim.swarm import KeyRing

MEMBERLIST_LAN = MembershipConfig(probe_interval_s=1.0, probe_timeout_s=0.5)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=60.0, help="simulated seconds in all")
    parser.add_argument(
        "--warmup", type=float, default=2.0, help="simulated seconds before the join"
    )
    parser.add_argument("--loss", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--agent-defaults", action="store_true", help="0.5 s probes, not 1 s")
    parser.add_argument(
        "--probe-rounds", type=int, default=None, help="failed probe rounds before suspecting"
    )
    parser.add_argument("--json", action="store_true", help="print JSON (the only output form)")
    args = parser.parse_args()
    load_before = os.getloadavg()
    started, cpu_started = time.perf_counter(), time.process_time()
    keys = KeyRing(Simulator(args.seed).fork("keys"))
    keys.ensure(args.nodes)
    keys_s = time.perf_counter() - started
    config = MembershipConfig() if args.agent_defaults else MEMBERLIST_LAN
    if args.probe_rounds is not None:
        config = dataclasses.replace(config, probe_rounds=args.probe_rounds)
    spec = RunSpec(
        nodes=args.nodes,
        membership=config,
        loss=args.loss,
        warmup_s=args.warmup,
        seconds=args.seconds - args.warmup,
    )
    run_started, run_cpu_started = time.perf_counter(), time.process_time()
    figures = run_join(spec, args.seed, f"loss={args.loss}", keys)
    run_wall, run_cpu = time.perf_counter() - run_started, time.process_time() - run_cpu_started
    result = {
        "bench": "sim",
        "nodes": args.nodes,
        "seconds": args.seconds,
        "seed": args.seed,
        "loss": args.loss,
        "wall_s": round(time.perf_counter() - started, 3),
        "run_wall_s": round(run_wall, 3),
        "run_cpu_s": round(run_cpu, 3),
        "cpu_s": round(time.process_time() - cpu_started, 3),
        "keys_wall_s": round(keys_s, 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "convergence_s_p50": _round(figures["p50_s"]),
        "convergence_s_p99": _round(figures["p99_s"]),
        "convergence_s_p9999": _round(figures["p9999_s"]),
        "informed": figures["informed"],
        "population": figures["population"],
        "events": figures["events"],
        "messages": figures["messages_sent"],
        "us_per_event_cpu": round(run_cpu / figures["events"] * 1e6, 2),
        "messages_per_node_s": round(figures["messages_per_node_s_mean"], 3),
        "bytes_per_node_s": round(figures["bytes_per_node_s_mean"], 1),
        "conditions": {
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
            "probe_interval_s": config.probe_interval_s,
            "gossip_interval_s": config.gossip_interval_s,
            "gossip_fanout": config.gossip_fanout,
            "probe_rounds": config.probe_rounds,
        },
    }
    print(json.dumps(result))
    return 0


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


if __name__ == "__main__":
    sys.exit(main())
