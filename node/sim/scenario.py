"""Scenario files: one TOML file per study, validated field by field, run by seed.

Theory of operation
-------------------
A scenario names its ``kind`` and the conditions of its runs::

    kind = "convergence"            # convergence | routes | redundancy
    name = "convergence-10k"
    [swarm]      nodes, warmup_s, seconds, eager_limit, withdraw_after_s
    [membership] any field of node.membership.config.MembershipConfig
    [network]    base_latency_ms, spread_latency_ms, jitter_ms, loss (a rate, or a
                 list of rates: one run per rate)
    [churn]      departures_per_hour, mean_downtime_s, leave_fraction
    [[partition]] start_s, end_s (from t0), fraction (of the nodes, drawn by seed)

For ``kind = "redundancy"`` every other top-level key is a parameter of
node/sim/redundancy.py (part B of the study), handed to ``run_redundancy``
unchanged and checked by its ``validate`` (loaded lazily: a clear error if that
module is not there).

``load`` refuses unknown sections and keys, wrong types and values out of range
with ``ScenarioError("section.key: reason")`` (the house style of node/runtime/config.py),
so a typo never silently runs the default. ``run(scenario, seed)`` returns one
dict of figures: no wall-clock time in it, so the same seed gives the same dict.
"""

from __future__ import annotations

import importlib
import math
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from node.membership.config import MembershipConfig
from node.sim.churn import ChurnModel
from node.sim.engine import Simulator
from node.sim.network import LatencyModel, Partition
from node.sim.studies import RunSpec, run_join, run_route_move
from node.sim.swarm import KeyRing

KINDS = ("convergence", "routes", "redundancy")
MAX_NODES = 100_000
SERF_ANCHOR = {
    "source": "Serf convergence simulator (serf.io/docs/internals/simulator)",
    "nodes": 10_000,
    "gossip_interval_s": 0.2,
    "gossip_fanout": 3,
    "p9999_s_by_loss": {"0.0": 2.6, "0.2": 3.2},
}


class ScenarioError(Exception):
    """The scenario is unusable; the message names the field and the reason."""


Check = Callable[[Any], str | None]


def _number(low: float, high: float, *, open_low: bool = False) -> Check:
    def check(value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
            return f"expected a number, got {value!r}"
        if value < low or value > high or (open_low and value == low):
            bound = "(" if open_low else "["
            return f"must be in {bound}{low}, {high}], got {value!r}"
        return None

    return check


def _integer(low: int, high: int) -> Check:
    def check(value: Any) -> str | None:
        if type(value) is not int:
            return f"expected an integer, got {value!r}"
        return None if low <= value <= high else f"must be in [{low}, {high}], got {value}"

    return check


def _loss(value: Any) -> str | None:
    rates = value if isinstance(value, list) else [value]
    if not rates:
        return "expected a loss rate or a non-empty list of them"
    for rate in rates:
        problem = _number(0.0, 0.95)(rate)
        if problem:
            return problem
    return None


SECTIONS: dict[str, dict[str, Check]] = {
    "swarm": {
        "nodes": _integer(3, MAX_NODES),
        "warmup_s": _number(0.0, 3600.0),
        "seconds": _number(0.0, 86400.0, open_low=True),
        "eager_limit": _integer(0, MAX_NODES),
        "withdraw_after_s": _number(0.0, 3600.0),
    },
    "network": {
        "base_latency_ms": _number(0.0, 10_000.0),
        "spread_latency_ms": _number(0.0, 10_000.0),
        "jitter_ms": _number(0.0, 10_000.0),
        "loss": _loss,
    },
    "churn": {
        "departures_per_hour": _number(0.0, 3600.0),
        "mean_downtime_s": _number(0.0, 86400.0, open_low=True),
        "leave_fraction": _number(0.0, 1.0),
    },
    "membership": {f.name: _number(0.0, 1e6, open_low=True) for f in fields(MembershipConfig)}
    | {"local_health_max": _number(0.0, 1e6)},  # 0 turns Lifeguard's local health off
}
INTEGER_MEMBERSHIP = {f.name for f in fields(MembershipConfig) if f.type in ("int", int)}
PARTITION: dict[str, Check] = {
    "start_s": _number(0.0, 86400.0),
    "end_s": _number(0.0, 86400.0),
    "fraction": _number(0.0, 1.0, open_low=True),
}


@dataclass(frozen=True, slots=True)
class Scenario:
    kind: str
    name: str
    spec: RunSpec | None  # None for kind = "redundancy"
    losses: tuple[float, ...] = (0.0,)
    partition_fractions: tuple[tuple[float, float, float], ...] = ()
    params: dict[str, Any] = field(default_factory=dict)


def load(path: Path) -> Scenario:
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ScenarioError(f"{path}: no such file") from None
    except OSError as exc:
        raise ScenarioError(f"{path}: cannot read: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ScenarioError(f"{path}: not valid TOML: {exc}") from None
    return parse(data, default_name=path.stem)


def parse(data: dict[str, Any], default_name: str = "scenario") -> Scenario:
    """Validate a scenario's TOML data; ScenarioError names the first bad field."""
    kind = data.get("kind")
    if kind not in KINDS:
        raise ScenarioError(f"kind: expected one of {', '.join(KINDS)}, got {kind!r}")
    name = data.get("name", default_name)
    if not isinstance(name, str) or not name:
        raise ScenarioError(f"name: expected a non-empty string, got {name!r}")
    if not isinstance(data.get("description", ""), str):
        raise ScenarioError("description: expected a string")
    if kind == "redundancy":
        params = {k: v for k, v in data.items() if k not in ("kind", "name", "description")}
        try:
            _redundancy().validate(params)  # early, so a bad file fails before any run
        except ValueError as exc:
            raise ScenarioError(str(exc)) from None
        return Scenario(kind, name, None, params=params)
    allowed = {"kind", "name", "description", "partition", *SECTIONS}
    for key in data:
        if key not in allowed:
            raise ScenarioError(f"{key}: unknown section or setting")
    values = {section: _section(data, section) for section in SECTIONS}
    swarm, network, churn = values["swarm"], values["network"], values["churn"]
    if "nodes" not in swarm:
        raise ScenarioError("swarm.nodes: required")
    try:
        membership = MembershipConfig(**values["membership"])
    except ValueError as exc:
        raise ScenarioError(f"membership: {exc}") from None
    loss = network.get("loss", 0.0)
    losses = tuple(float(x) for x in (loss if isinstance(loss, list) else [loss]))
    spec = RunSpec(
        nodes=swarm["nodes"],
        membership=membership,
        latency=LatencyModel(
            network.get("base_latency_ms", 1.0) / 1000,
            network.get("spread_latency_ms", 40.0) / 1000,
            network.get("jitter_ms", 2.0) / 1000,
        ),
        churn=ChurnModel(**churn),
        **{
            k: swarm[k]
            for k in ("warmup_s", "seconds", "eager_limit", "withdraw_after_s")
            if k in swarm
        },
    )
    return Scenario(kind, name, spec, losses, _partitions(data.get("partition", [])))


def _section(data: dict[str, Any], section: str) -> dict[str, Any]:
    table = data.get(section, {})
    if not isinstance(table, dict):
        raise ScenarioError(f"{section}: expected a table like [{section}]")
    checks = SECTIONS[section]
    for key, value in table.items():
        if key not in checks:
            raise ScenarioError(f"{section}.{key}: unknown setting")
        problem = checks[key](value)
        if section == "membership" and key in INTEGER_MEMBERSHIP and type(value) is not int:
            problem = f"expected an integer, got {value!r}"
        if problem:
            raise ScenarioError(f"{section}.{key}: {problem}")
    return dict(table)


def _partitions(items: Any) -> tuple[tuple[float, float, float], ...]:
    if not isinstance(items, list):
        raise ScenarioError("partition: expected an array of tables like [[partition]]")
    result = []
    for number, item in enumerate(items):
        where = f"partition[{number}]"
        if not isinstance(item, dict):
            raise ScenarioError(f"{where}: expected a table")
        for key, value in item.items():
            if key not in PARTITION:
                raise ScenarioError(f"{where}.{key}: unknown setting")
            problem = PARTITION[key](value)
            if problem:
                raise ScenarioError(f"{where}.{key}: {problem}")
        missing = [key for key in PARTITION if key not in item]
        if missing:
            raise ScenarioError(f"{where}.{missing[0]}: required")
        if item["end_s"] <= item["start_s"]:
            raise ScenarioError(f"{where}.end_s: must be after start_s")
        result.append((float(item["start_s"]), float(item["end_s"]), float(item["fraction"])))
    return tuple(result)


def _redundancy() -> Any:
    try:
        redundancy = importlib.import_module("node.sim.redundancy")
    except ImportError as exc:
        raise ScenarioError(
            f"kind: 'redundancy' needs node.sim.redundancy, which is not available ({exc})"
        ) from None
    return redundancy


def run(scenario: Scenario, seed: int) -> dict[str, Any]:
    """Run every run of the scenario; the figures, the same for the same seed."""
    result: dict[str, Any] = {"scenario": scenario.name, "kind": scenario.kind, "seed": seed}
    if scenario.kind == "redundancy":
        try:
            result["redundancy"] = _redundancy().run_redundancy(scenario.params, seed)
        except ValueError as exc:
            raise ScenarioError(str(exc)) from None
        return result
    spec = scenario.spec
    assert spec is not None
    keys = KeyRing(Simulator(seed).fork("keys"))
    keys.ensure(spec.nodes)
    study = run_join if scenario.kind == "convergence" else run_route_move
    runs = []
    for loss in scenario.losses:
        label = f"loss={loss}"
        partitions = _draw_partitions(scenario, seed, label)
        runs.append(study(_with(spec, loss, partitions), seed, label, keys))
    result["model"] = describe(spec)
    result["model"]["partitions"] = [list(p) for p in scenario.partition_fractions]
    result["runs"] = runs
    if scenario.kind == "convergence":
        result["serf_anchor"] = SERF_ANCHOR
    return result


def _with(spec: RunSpec, loss: float, partitions: tuple[Partition, ...]) -> RunSpec:
    from dataclasses import replace

    return replace(spec, loss=loss, partitions=partitions)


def _draw_partitions(scenario: Scenario, seed: int, label: str) -> tuple[Partition, ...]:
    assert scenario.spec is not None
    nodes = scenario.spec.nodes
    rng = Simulator(seed).fork(f"{label}/partitions")
    drawn = []
    for start, end, fraction in scenario.partition_fractions:
        members = frozenset(rng.sample(range(nodes), max(1, round(fraction * nodes))))
        drawn.append(Partition(start, end, members))
    return tuple(drawn)


def describe(spec: RunSpec) -> dict[str, Any]:
    """The conditions of a run, for the output next to its figures."""
    return {
        "nodes": spec.nodes,
        "warmup_s": spec.warmup_s,
        "seconds": spec.seconds,
        "eager_limit": spec.eager_limit,
        "withdraw_after_s": spec.withdraw_after_s,
        "membership": {f.name: getattr(spec.membership, f.name) for f in fields(spec.membership)},
        "latency": {
            "base_s": spec.latency.base_s,
            "spread_s": spec.latency.spread_s,
            "jitter_s": spec.latency.jitter_s,
        },
        "churn": {
            "departures_per_hour": spec.churn.departures_per_hour,
            "mean_downtime_s": spec.churn.mean_downtime_s,
            "leave_fraction": spec.churn.leave_fraction,
        },
    }
