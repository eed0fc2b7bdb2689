"""The redundancy study: k replicas per segment over churning volunteer hosts, and an oracle.

Theory of operation
-------------------
``run_redundancy(params, seed)`` builds one population of volunteer hosts
(availability from node/sim/availability.py, speed, bandwidth and price floor
from seeded distributions), then, for each redundancy ``k`` in ``ks``, runs
the same jobs through the real market, segment and ledger cores on a fresh
``Simulator(seed)`` (node/sim/market_world.py), and schedules them once more
with the oracle (node/sim/oracle.py). Every k sees the same hosts and the same
availability (common random numbers), so differences between k are the
market's, not the dice's.

The workload: ``jobs`` jobs, spread round-robin over ``owners`` owner nodes,
each a chain of ``segments_per_job`` segments of ``extent_s`` guest
vCPU-seconds on one vCPU. Host speed (guest vCPU-seconds per second) is
log-normal with median 1 and ``speed_sigma``, clipped to [0.25, 4]; host
bandwidth is log-uniform between the two ``bandwidth_mbit`` bounds; price
floors are uniform integers in ``price_floor``. All these are assumptions,
stated in docs/simulator-redundancy.md.

Reported per k: makespan (first offer to last commit), host-seconds spent
(every replica's running time), the shares of it wasted on losers (replicas
that ran while another won), on lost replicas (their host went down), and
on the rest (attempts abandoned, run deadlines), payments (accepted by the
payees' ledgers; exactly one per committed segment is checked), re-offers,
and the cores' refusal counters. The result holds no wall-clock value:
the same seed gives the same ``json.dumps(result, sort_keys=True)``.

``plot_redundancy`` draws makespan by k beside the oracle, and host-hours
by k split into useful and wasted; ``format_redundancy`` prints the table.
"""

from __future__ import annotations

import math
import pathlib
import random
import statistics
from typing import Any

from node.sim.availability import HOUR, AvailabilityModel, HostAvailability, generate_hosts
from node.sim.engine import Simulator
from node.sim.market_world import EPOCH, HostModel, MarketWorld, ReplicaRun, WorldConfig
from node.sim.oracle import OracleHost, Pipeline, oracle_schedule

MIB = 1 << 20
DEFAULTS: dict[str, Any] = {
    "hosts": 1000,
    "owners": 5,
    "jobs": 50,
    "segments_per_job": 20,
    "extent_s": 3600,
    "ks": [1, 2, 3],
    "horizon_h": 336.0,
    "checkpoint_mib": 256,
    "memory_mib": 512,
    "ceiling": 10,
    "price_floor": [1, 3],
    "speed_sigma": 0.35,
    "bandwidth_mbit": [10.0, 100.0],
    "owner_bandwidth_mbit": 1000.0,
    "offer_fanout": 20,
    "latency_ms": 40.0,
    "jitter_ms": 20.0,
    "loss": 0.0,
    "detection_s": 15.0,
    "verify_s": 30.0,
    "setup_s": 10,
    "run_noise": 0.1,
    "bid_window_s": 2.0,
    "run_grace_s": 60.0,
    "chain_length": 256,
    "random_share": 0.21,
    "departure": "crash",
}
_INTS = {
    "hosts": (1, 100_000),
    "owners": (1, 1000),
    "jobs": (1, 100_000),
    "segments_per_job": (1, 10_000),
    "extent_s": (1, 10**7),
    "checkpoint_mib": (1, 1 << 20),
    "memory_mib": (72, 1 << 20),
    "ceiling": (1, 4096),
    "offer_fanout": (0, 100_000),
    "setup_s": (0, 86400),
    "chain_length": (16, 1 << 20),
}
_FLOATS = {
    "horizon_h": (1.0, 24 * 365.0),
    "speed_sigma": (0.0, 3.0),
    "owner_bandwidth_mbit": (0.1, 1e6),
    "latency_ms": (0.0, 60_000.0),
    "jitter_ms": (0.001, 60_000.0),
    "loss": (0.0, 0.5),
    "detection_s": (0.0, 86400.0),
    "verify_s": (0.0, 86400.0),
    "run_noise": (0.0, 2.0),
    "bid_window_s": (0.05, 600.0),
    "run_grace_s": (1.0, 86400.0),
    "random_share": (0.0, 1.0),
}


def validate(params: dict[str, Any]) -> dict[str, Any]:
    """``params`` over the defaults, checked; ``ValueError("field: reason")`` if not."""
    unknown = sorted(set(params) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"{unknown[0]}: unknown parameter (known: {', '.join(sorted(DEFAULTS))})")
    p = {**DEFAULTS, **params}
    for name, (low, high) in _INTS.items():
        value = p[name]
        if type(value) is not int or not low <= value <= high:
            raise ValueError(f"{name}: must be an integer in {low}..{high}, got {value!r}")
    for name, (bottom, top) in _FLOATS.items():
        number = p[name]
        if type(number) not in (int, float) or not bottom <= number <= top:
            raise ValueError(f"{name}: must be a number in {bottom}..{top}, got {number!r}")
        p[name] = float(number)
    ks = p["ks"]
    if not isinstance(ks, list) or not ks or any(type(k) is not int or not 1 <= k <= 8 for k in ks):
        raise ValueError(f"ks: must be a non-empty list of integers in 1..8, got {ks!r}")
    if len(set(ks)) != len(ks):
        raise ValueError("ks: names a k twice")
    for name, kind in (("price_floor", int), ("bandwidth_mbit", (int, float))):
        pair = p[name]
        ok = isinstance(pair, list) and len(pair) == 2 and all(isinstance(v, kind) for v in pair)
        if not ok or not 0 < pair[0] <= pair[1] or any(isinstance(v, bool) for v in pair):
            raise ValueError(f"{name}: must be [low, high] with 0 < low <= high, got {pair!r}")
    if p["price_floor"][1] > p["ceiling"]:
        raise ValueError("price_floor: its high end is above the ceiling (no host would bid)")
    if p["departure"] not in ("crash", "withdraw"):
        raise ValueError(f"departure: must be 'crash' or 'withdraw', got {p['departure']!r}")
    if p["owners"] > p["jobs"]:
        raise ValueError("owners: more owners than jobs")
    return p


def run_redundancy(params: dict[str, Any], seed: int) -> dict[str, Any]:
    """Run the study; a JSON-ready result, the same for the same params and seed."""
    p = validate(params)
    if type(seed) is not int:
        raise ValueError(f"seed: must be an integer, got {seed!r}")
    horizon_s = p["horizon_h"] * HOUR
    availability, hosts = population(p, seed)
    runs = [_run_k(p, seed, k, availability, hosts) for k in p["ks"]]
    pipeline = Pipeline(
        bid_window_s=p["bid_window_s"],
        latency_s=(p["latency_ms"] + p["jitter_ms"]) / 1000,
        verify_s=p["verify_s"],
        setup_s=p["setup_s"],
        owner_bandwidth=_bytes_s(p["owner_bandwidth_mbit"]),
    )
    oracle = oracle_schedule(
        availability,
        [OracleHost(h.speed, h.bandwidth) for h in hosts],
        jobs=p["jobs"],
        segments=p["segments_per_job"],
        extent_s=p["extent_s"],
        checkpoint_bytes=p["checkpoint_mib"] * MIB,
        pipeline=pipeline,
        horizon_s=horizon_s,
    )
    return {
        "kind": "redundancy",
        "seed": seed,
        "params": {k: p[k] for k in sorted(p)},
        "population": _describe_population(availability, hosts, horizon_s),
        "availability_model": AvailabilityModel(random_share=p["random_share"]).describe(),
        "runs": runs,
        "oracle": {
            "makespan_h": _r(oracle.makespan_s / HOUR),
            "host_hours": _r(oracle.host_seconds / HOUR),
            "segments": oracle.segments,
            "unplaced": oracle.unplaced,
            "critical_path_h": _r(oracle.critical_path_s / HOUR),
        },
    }


def _host_models(p: dict[str, Any], rng: random.Random) -> list[HostModel]:
    low, high = (_bytes_s(v) for v in p["bandwidth_mbit"])
    models = []
    for _ in range(p["hosts"]):
        speed = min(max(rng.lognormvariate(0.0, p["speed_sigma"]), 0.25), 4.0)
        bandwidth = round(math.exp(rng.uniform(math.log(low), math.log(high))))
        models.append(HostModel(speed, bandwidth, rng.randint(*p["price_floor"])))
    return models


def _bytes_s(mbit: float) -> int:
    return max(1, round(mbit * 1e6 / 8))


def build_world(
    p: dict[str, Any],
    seed: int,
    k: int,
    availability: list[HostAvailability],
    hosts: list[HostModel],
) -> MarketWorld:
    """The market world for redundancy ``k`` over this population, started, not run."""
    owners = p["owners"]
    config = WorldConfig(
        k=k,
        jobs_per_owner=tuple(len(range(i, p["jobs"], owners)) for i in range(owners)),
        segments=p["segments_per_job"],
        extent_s=p["extent_s"],
        memory_mib=p["memory_mib"],
        checkpoint_bytes=p["checkpoint_mib"] * MIB,
        ceiling=p["ceiling"],
        horizon_s=p["horizon_h"] * HOUR,
        offer_fanout=p["offer_fanout"],
        latency_s=p["latency_ms"] / 1000,
        jitter_s=p["jitter_ms"] / 1000,
        loss=p["loss"],
        detection_s=p["detection_s"],
        verify_s=p["verify_s"],
        setup_s=p["setup_s"],
        run_noise=p["run_noise"],
        owner_bandwidth=_bytes_s(p["owner_bandwidth_mbit"]),
        departure=p["departure"],
        bid_window_s=p["bid_window_s"],
        run_grace_s=p["run_grace_s"],
        chain_length=p["chain_length"],
    )
    world = MarketWorld(Simulator(seed), config, availability, hosts)
    world.start()
    return world


def population(p: dict[str, Any], seed: int) -> tuple[list[HostAvailability], list[HostModel]]:
    """The hosts every k runs over: their availability and their speed, bandwidth, price."""
    root = Simulator(seed)
    model = AvailabilityModel(random_share=p["random_share"])
    availability = generate_hosts(
        model, p["hosts"], p["horizon_h"] * HOUR, root.fork("availability")
    )
    return availability, _host_models(p, root.fork("hosts"))


def _run_k(
    p: dict[str, Any],
    seed: int,
    k: int,
    availability: list[HostAvailability],
    hosts: list[HostModel],
) -> dict[str, Any]:
    world = build_world(p, seed, k, availability, hosts)
    sim, end = world.sim, EPOCH + world.config.horizon_s
    step = EPOCH
    while not world.done() and step < end:  # in hours, to stop soon after the last payment
        step = min(step + HOUR, end)
        sim.run(step, world.deliver)
    return summarize(world, k)


def summarize(world: MarketWorld, k: int) -> dict[str, Any]:
    """The figures of one run (see the module docstring)."""
    now, books = world.sim.now, world.accounts
    winners = {(key, attempt, node) for key, (node, attempt, _) in books.commits.items()}
    spent = dict.fromkeys(("won", "loser", "lost", "other"), 0.0)
    for run in books.runs:
        spent[_classify(world, run, winners)] += (run.ended or now) - run.started
    total = sum(spent.values())
    start = books.first_offer or EPOCH
    commit_times = [t for _, _, t in books.commits.values()]
    finish_h = sorted((t - start) / HOUR for t in books.finished.values())
    machines = list(books.machines.values())
    core: dict[str, int] = {}
    for m in machines:
        for name, value in m.statistics().items():
            core[name] = core.get(name, 0) + value
    paid_once = all(len(books.payments.get(key, [])) == 1 for key in books.commits)
    unpaid_extra = [key for key in books.payments if key not in books.commits]
    return {
        "k": k,
        "makespan_h": _r((max(commit_times, default=start) - start) / HOUR),
        "host_hours": _r(total / HOUR),
        "useful_host_hours": _r(spent["won"] / HOUR),
        "wasted_share": _r(1 - spent["won"] / total if total else 0.0),
        "wasted_on_losers_share": _r(spent["loser"] / total if total else 0.0),
        "wasted_on_lost_share": _r(spent["lost"] / total if total else 0.0),
        "wasted_other_share": _r(spent["other"] / total if total else 0.0),
        "segments_committed": len(books.commits),
        "payments": books.stats["payments_accepted"],
        "units_paid": books.stats["units_accepted"],
        "every_committed_segment_paid_once": paid_once and not unpaid_extra,
        "reoffers": books.stats["attempts"] - len(books.commits),
        "replicas": len(books.runs),
        "replicas_lost": core.get("replicas_lost", 0),
        "replicas_timed_out": core.get("replicas_timed_out", 0),
        "attempts_abandoned": core.get("abandoned", 0),
        "auctions_empty": core.get("auctions_empty", 0),
        "verifications_failed": core.get("verifications_failed", 0),
        "jobs_finished": len(finish_h),
        "job_finish_h": {
            "median": _r(statistics.median(finish_h)) if finish_h else None,
            "p90": _r(finish_h[min(len(finish_h) - 1, math.ceil(0.9 * len(finish_h)) - 1)])
            if finish_h
            else None,
            "max": _r(finish_h[-1]) if finish_h else None,
        },
        "refusals": {n: v for n, v in sorted(core.items()) if n.startswith("refused_")},
        "world": dict(sorted(world.statistics().items())),
        "steps": world.sim.steps,
    }


def _classify(world: MarketWorld, run: ReplicaRun, winners: set[Any]) -> str:
    """won; lost (its host went down); loser (in the winning attempt, beaten); other."""
    key = (run.job_id, run.segment)
    node = world.hosts[run.host].identity.node_id
    if (key, run.attempt, node) in winners:
        return "won"
    if run.outcome == "lost":
        return "lost"
    commit = world.accounts.commits.get(key)
    return "loser" if commit is not None and commit[1] == run.attempt else "other"


def _describe_population(
    availability: list[HostAvailability], hosts: list[HostModel], horizon_s: float
) -> dict[str, Any]:
    count = len(availability)
    random_hosts = [a for a in availability if a.kind == "random"]
    up = [a.uptime(0.0, horizon_s) / horizon_s for a in availability]
    intervals = [e - s for a in availability for s, e in a.intervals]
    speeds = sorted(h.speed for h in hosts)
    return {
        "hosts": count,
        "random_share": _r(len(random_hosts) / count),
        "mean_availability": _r(sum(up) / count),
        "mean_up_interval_h": _r(sum(intervals) / len(intervals) / HOUR) if intervals else 0.0,
        "speed_median": _r(speeds[count // 2]),
        "speed_p10": _r(speeds[count // 10]),
        "speed_p90": _r(speeds[(9 * count) // 10]),
    }


def _r(value: float) -> float:
    return round(float(value), 4)


# -- presentation ------------------------------------------------------------------------


def format_redundancy(result: dict[str, Any]) -> str:
    """The study's table, for people."""
    header = (
        f"{'':>8} {'makespan h':>10} {'host-h':>8} {'wasted':>7} {'losers':>7} "
        f"{'lost':>6} {'other':>6} {'paid':>5} {'units':>6} {'reoffers':>8}"
    )
    lines = [f"redundancy study, seed {result['seed']}", header]
    for run in result["runs"]:
        lines.append(
            f"{'k=' + str(run['k']):>8} {run['makespan_h']:>10.2f} {run['host_hours']:>8.1f} "
            f"{run['wasted_share']:>7.1%} {run['wasted_on_losers_share']:>7.1%} "
            f"{run['wasted_on_lost_share']:>6.1%} {run['wasted_other_share']:>6.1%} "
            f"{run['payments']:>5} {run['units_paid']:>6} {run['reoffers']:>8}"
        )
    oracle = result["oracle"]
    lines.append(
        f"{'oracle':>8} {oracle['makespan_h']:>10.2f} {oracle['host_hours']:>8.1f} "
        f"{0:>7.1%} {'':>7} {'':>6} {'':>6} {oracle['segments']:>5} {'':>6} {0:>8}"
    )
    lines.append(f"critical path (no churn, fastest host): {oracle['critical_path_h']:.2f} h")
    return "\n".join(lines)


def plot_redundancy(result: dict[str, Any], directory: pathlib.Path) -> list[pathlib.Path]:
    """PNG charts: makespan by k beside the oracle; host-hours by k, useful and wasted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    runs, oracle = result["runs"], result["oracle"]
    labels = [f"k={r['k']}" for r in runs] + ["oracle"]
    paths = []

    fig, ax = plt.subplots(figsize=(6, 4))
    makespans = [r["makespan_h"] for r in runs] + [oracle["makespan_h"]]
    colors = ["tab:blue"] * len(runs) + ["tab:gray"]
    ax.bar_label(ax.bar(labels, makespans, color=colors), fmt="%.1f")
    ax.axhline(oracle["critical_path_h"], color="black", linestyle=":", label="critical path")
    ax.set_ylim(0, 1.15 * max(makespans))
    ax.set_ylabel("makespan (hours)")
    ax.set_title(f"Makespan by redundancy (seed {result['seed']})")
    ax.legend()
    paths.append(_save(fig, directory / "redundancy-makespan.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    k_labels = labels[:-1]
    parts = (
        ("useful", [r["useful_host_hours"] for r in runs], "tab:green"),
        ("losers", [r["host_hours"] * r["wasted_on_losers_share"] for r in runs], "tab:orange"),
        ("lost to churn", [r["host_hours"] * r["wasted_on_lost_share"] for r in runs], "tab:red"),
        ("other", [r["host_hours"] * r["wasted_other_share"] for r in runs], "tab:purple"),
    )
    bottom = [0.0] * len(runs)
    for name, values, color in parts:
        ax.bar(k_labels, values, bottom=bottom, label=name, color=color)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    for x, total in enumerate(r["host_hours"] for r in runs):
        ax.annotate(f"{total:.0f}", (x, total), ha="center", va="bottom")
    ax.axhline(oracle["host_hours"], color="black", linestyle=":", label="oracle")
    ax.set_ylim(0, 1.15 * max(max(bottom), oracle["host_hours"]))
    ax.set_ylabel("host-hours spent")
    ax.set_title("Host-hours by redundancy: useful and wasted")
    ax.legend()
    paths.append(_save(fig, directory / "redundancy-host-hours.png"))
    return paths


def _save(fig: Any, path: pathlib.Path) -> pathlib.Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
