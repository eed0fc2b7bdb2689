"""The redundancy study on the simulator: reproducible, pays once per segment, k costs."""

from __future__ import annotations

import json
import tomllib
from typing import Any

import pytest
from kit.paths import REPO_ROOT

from node.ledger.tokens import sign_payment
from node.sim.engine import InvariantViolated
from node.sim.market_world import EPOCH, LEDGER_PAYMENT, Frame
from node.sim.redundancy import (
    build_world,
    format_redundancy,
    plot_redundancy,
    population,
    run_redundancy,
    validate,
)

SCENARIOS = REPO_ROOT / "node" / "sim" / "scenarios"


def small() -> dict[str, Any]:
    table = tomllib.loads((SCENARIOS / "redundancy-small.toml").read_text())
    assert table.pop("kind") == "redundancy"
    return table


@pytest.fixture(scope="module")
def seed_1() -> dict[str, Any]:
    return run_redundancy(small(), 1)


def test_the_same_seed_gives_byte_identical_json(seed_1):
    again = run_redundancy(small(), 1)
    assert json.dumps(again, sort_keys=True) == json.dumps(seed_1, sort_keys=True)


def test_another_seed_gives_another_result(seed_1):
    other = run_redundancy({**small(), "ks": [1]}, 2)
    assert other["runs"][0] != seed_1["runs"][0]
    assert other["population"] != seed_1["population"]


def test_the_full_scenario_file_is_valid():
    table = tomllib.loads((SCENARIOS / "redundancy.toml").read_text())
    assert table.pop("kind") == "redundancy"
    p = validate(table)
    assert p["hosts"] == 1000 and p["jobs"] * p["segments_per_job"] == 1000
    assert p["ks"] == [1, 2, 3]


def test_every_job_finishes_and_every_committed_segment_is_paid_exactly_once(seed_1):
    segments = 4 * 10
    for run in seed_1["runs"]:
        assert run["jobs_finished"] == 4
        assert run["segments_committed"] == segments
        assert run["payments"] == segments
        assert run["every_committed_segment_paid_once"] is True
        assert run["units_paid"] >= segments  # every price is at least one unit
        assert run["refusals"] == {}
    assert seed_1["oracle"]["segments"] == segments and seed_1["oracle"]["unplaced"] == 0


def test_two_replicas_spend_more_host_time_than_one(seed_1):
    k1, k2 = seed_1["runs"]
    assert k1["k"] == 1 and k2["k"] == 2
    assert k1["wasted_on_losers_share"] == 0.0  # one replica has no one to lose to
    assert k2["wasted_on_losers_share"] > 0.25
    assert k2["host_hours"] > 1.4 * k1["host_hours"]
    assert k1["useful_host_hours"] <= k1["host_hours"]


def test_the_oracle_is_bounded_by_the_critical_path(seed_1):
    oracle = seed_1["oracle"]
    assert oracle["critical_path_h"] <= oracle["makespan_h"]
    assert all(run["makespan_h"] > 0 for run in seed_1["runs"])


def test_an_injected_double_payment_is_caught_by_the_invariants():
    p = validate(small())
    availability, hosts = population(p, 3)
    world = build_world(p, 3, 1, availability, hosts)
    world.sim.run(EPOCH + 3 * 3600, world.deliver)
    paid = [
        (key, node)
        for key, [node] in world.accounts.payments.items()
        if world.hosts[world.by_node[node][1]].down_since is None
    ]
    assert paid, "no payment to a host that is up after three hours"
    (job_id, segment), node = paid[0]
    host = world.hosts[world.by_node[node][1]]
    [view] = [v for v in host.payee.chains() if v.accepted][:1]
    owner = world.owners[world.by_node[view.counterparty][1]]
    forged = sign_payment(
        owner.identity,
        world.accounts.chains[view.chain_id],
        payee=node,
        job_id=job_id,
        segment=segment,
        index=view.accepted + 1,
        units=1,
    )
    sender = owner.identity.node_id
    world.sim.at(
        world.sim.now, ("h", host.index), Frame(sender, "ledger", LEDGER_PAYMENT, forged.blob)
    )
    with pytest.raises(InvariantViolated) as caught:
        world.sim.run(world.sim.now + 60, world.deliver)
    assert caught.value.name in ("one_winner_paid_per_segment", "no_double_spend")
    assert "paid 2 times" in str(caught.value) or "second payment" in str(caught.value)


def test_lost_messages_and_withdrawing_hosts_still_pay_each_segment_once():
    result = run_redundancy({**small(), "loss": 0.05, "departure": "withdraw", "ks": [2]}, 4)
    [run] = result["runs"]
    assert run["world"]["messages_lost"] > 50  # the cores' retransmissions had work
    assert run["jobs_finished"] == 4 and run["segments_committed"] == 40
    assert run["payments"] == 40 and run["every_committed_segment_paid_once"] is True


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"hosts": 0}, "hosts"),
        ({"hosts": True}, "hosts"),
        ({"ks": []}, "ks"),
        ({"ks": [1, 9]}, "ks"),
        ({"ks": [2, 2]}, "ks"),
        ({"loss": 0.9}, "loss"),
        ({"departure": "vanish"}, "departure"),
        ({"price_floor": [5, 20]}, "price_floor"),
        ({"bandwidth_mbit": [0, 10]}, "bandwidth_mbit"),
        ({"owners": 9, "jobs": 4}, "owners"),
        ({"segmnets_per_job": 3}, "segmnets_per_job"),
        ({"horizon_h": "long"}, "horizon_h"),
    ],
)
def test_bad_params_raise_value_error_naming_the_field(params, field):
    with pytest.raises(ValueError) as caught:
        run_redundancy(params, 1)
    assert str(caught.value).startswith(f"{field}:")


def test_the_table_and_the_charts(seed_1, tmp_path):
    table = format_redundancy(seed_1)
    assert "k=1" in table and "k=2" in table and "oracle" in table
    pytest.importorskip("matplotlib")
    paths = plot_redundancy(seed_1, tmp_path)
    assert [p.name for p in paths] == ["redundancy-makespan.png", "redundancy-host-hours.png"]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
