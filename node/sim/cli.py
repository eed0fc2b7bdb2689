"""`gleaner sim SCENARIO.toml --seed S [--json] [--plot DIR]`: run a scenario, print its figures.

The human form is a table per run, with Serf's published anchor beside our
join-convergence figures. ``--json`` prints one JSON object with sorted keys and
every float rounded to ``DIGITS`` places, and no wall-clock time in it, so the
same seed prints the same bytes. ``--plot DIR`` writes PNG charts there.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from node.sim import scenario as scenarios

DIGITS = 6


def rounded(value: Any) -> Any:
    """`value` with every float rounded to DIGITS places (recursively)."""
    if isinstance(value, float):
        return round(value, DIGITS)
    if isinstance(value, dict):
        return {str(k): rounded(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [rounded(v) for v in value]
    return value


def to_json(result: dict[str, Any]) -> str:
    return json.dumps(rounded(result), indent=2, sort_keys=True)


def main(
    path: str, seed: int, as_json: bool, plot_dir: str | None, echo: Callable[[str], None]
) -> int:
    """Run the scenario at `path`; raises ScenarioError for a bad scenario."""
    loaded = scenarios.load(Path(path))
    result = scenarios.run(loaded, seed)
    if plot_dir:
        from node.sim.plots import plot

        result["plots"] = [str(p) for p in plot(result, Path(plot_dir))]
    echo(to_json(result) if as_json else human(result))
    return 0


def _seconds(value: float | None) -> str:
    return "never" if value is None else f"{value:.3f} s"


def human(result: dict[str, Any]) -> str:
    lines = [f"scenario {result['scenario']} ({result['kind']}), seed {result['seed']}"]
    if result["kind"] == "redundancy":
        from node.sim.redundancy import format_redundancy

        lines.append(format_redundancy(result["redundancy"]))
        lines += [f"wrote {plot_path}" for plot_path in result.get("plots", [])]
        return "\n".join(lines)
    model = result["model"]
    member = model["membership"]
    lines.append(
        f"{model['nodes']} nodes; probe {member['probe_interval_s']} s, gossip "
        f"{member['gossip_interval_s']} s x {member['gossip_fanout']}; measured "
        f"{model['seconds']} s after {model['warmup_s']} s of warm-up"
    )
    what = "join known" if result["kind"] == "convergence" else "address routed to new host"
    anchor = result.get("serf_anchor", {}).get("p9999_s_by_loss", {})
    header = f"{'loss':>6} {'p50':>9} {'p99':>9} {'p99.99':>9} {'Serf p99.99':>12} "
    header += f"{'msgs/node/s':>12} {'bytes/node/s':>13} {'informed':>14}"
    lines += [f"time until {what}, by fraction of live nodes:", header]
    for run in result["runs"]:
        serf = anchor.get(str(float(run["loss"])))
        serf_text = "-" if serf is None else f"{serf:.1f} s"
        lines.append(
            f"{run['loss'] * 100:>5.0f}% {_seconds(run['p50_s']):>9} {_seconds(run['p99_s']):>9} "
            f"{_seconds(run['p9999_s']):>9} {serf_text:>12} "
            f"{run['messages_per_node_s_mean']:>12.2f} {run['bytes_per_node_s_mean']:>13.0f} "
            f"{run['informed']:>7}/{run['population']:<6}"
        )
    if anchor:
        lines.append(
            "Serf's anchor: its convergence model at 10,000 nodes, 200 ms gossip, fanout 3."
        )
    for run in result["runs"]:
        extra = (
            f"  loss {run['loss'] * 100:.0f}%: {run['events']} events, "
            f"{run['false_suspicions']} false suspicions, {run['false_deaths']} false deaths"
        )
        if "unrouted_nodes" in run:
            extra += f", {run['unrouted_nodes']} nodes briefly unrouted"
        lines.append(extra)
    for plot_path in result.get("plots", []):
        lines.append(f"wrote {plot_path}")
    return "\n".join(lines)
