"""The simulator's engine, network model and scenario loader (no cores involved)."""

from __future__ import annotations

import random

import pytest
from kit.import_graph import imported_roots
from kit.paths import REPO_ROOT

from node.base.identity import Identity
from node.base.wire import MessageType, encode_frame
from node.sim.engine import InvariantViolated, Simulator
from node.sim.network import FRAME_OVERHEAD_BYTES, LatencyModel, Network, Partition, frame_size
from node.sim.scenario import ScenarioError, load, parse

SCENARIOS = REPO_ROOT / "node" / "sim" / "scenarios"


def test_events_run_in_time_order_and_ties_in_scheduling_order():
    sim = Simulator(1)
    seen = []
    sim.at(2.0, "b", "late")
    sim.at(1.0, "a", "first")
    sim.at(1.0, "a", "second")
    sim.run(5.0, lambda now, node, event: seen.append((now, node, event)))
    assert seen == [(1.0, "a", "first"), (1.0, "a", "second"), (2.0, "b", "late")]
    assert sim.now == 5.0 and sim.steps == 3


def test_scheduling_in_the_past_is_refused():
    sim = Simulator(1)
    sim.run(5.0, lambda now, node, event: None)
    sim.at(5.0, "a", "now is fine")
    for bad in (4.999, float("nan")):
        with pytest.raises(ValueError, match=r"before now 5\.0"):
            sim.at(bad, "a", "too late")
    with pytest.raises(ValueError):
        sim.after(-0.1, "a", "too late")
    assert sim.pending() == 1


def test_forks_depend_on_the_seed_and_label_only():
    one, two = Simulator(7), Simulator(7)
    one.rng.random()  # drawing from the root does not move the forks
    assert one.fork("x").random() == two.fork("x").random()
    assert one.fork("x").random() != one.fork("y").random()
    assert Simulator(8).fork("x").random() != two.fork("x").random()


def test_a_broken_invariant_stops_the_run_with_time_step_and_event():
    sim = Simulator(1)
    count = []
    sim.add_invariant("at-most-two", lambda now: "three events" if len(count) > 2 else None)
    for t in range(5):
        sim.at(float(t), 0, t)
    with pytest.raises(InvariantViolated) as caught:
        sim.run(10.0, lambda now, node, event: count.append(event))
    assert caught.value.name == "at-most-two" and caught.value.step == 3
    assert "t=2.000000" in str(caught.value)


def test_frame_size_matches_the_real_encoder():
    identity = Identity.from_seeds(bytes(32), bytes(range(32)))
    for msg_type, body in (
        (MessageType.PING, {"nonce": 5}),
        (MessageType.ACK, {"nonce": 2**61, "updates": [bytes(300), bytes(40)]}),
        (MessageType.GOSSIP, {"updates": [bytes(1200)] * 6}),
    ):
        real = len(encode_frame(identity, msg_type, 100_000, body, sign=False))
        assert abs(frame_size(body) - real) <= 2, (frame_size(body), real)
    assert FRAME_OVERHEAD_BYTES == 46


def test_latency_is_positive_bounded_and_symmetric():
    network = Network(random.Random(1), LatencyModel(0.001, 0.04, 0.002))
    for _ in range(50):
        network.add_node()
    for a in range(50):
        for b in range(50):
            assert network.delay(a, b) == network.delay(b, a)
            assert 0.001 <= network.delay(a, b) <= 0.001 + 0.04 * 1.4143


def test_loss_drops_about_its_rate_and_counts_everything_sent():
    network = Network(random.Random(3), LatencyModel(), loss=0.2)
    network.add_node(), network.add_node()
    results = [network.transit(0, 1, 100, 0.0) for _ in range(10_000)]
    lost = sum(r is None for r in results)
    assert 1800 < lost < 2200
    assert network.traffic.messages_sent[0] == 10_000
    assert network.traffic.bytes_sent[0] == 1_000_000


def test_partitions_cut_both_ways_only_while_they_last():
    network = Network(
        random.Random(1), LatencyModel(), partitions=[Partition(1.0, 2.0, frozenset({0}))]
    )
    for _ in range(3):
        network.add_node()
    assert network.transit(0, 1, 10, 1.5) is None and network.transit(1, 0, 10, 1.5) is None
    assert network.transit(1, 2, 10, 1.5) is not None
    assert network.transit(0, 1, 10, 0.5) is not None and network.transit(0, 1, 10, 2.0) is not None
    assert network.dropped_partition == 2


def test_a_down_node_neither_sends_nor_receives():
    network = Network(random.Random(1), LatencyModel())
    network.add_node(), network.add_node()
    network.up[1] = False
    assert network.transit(1, 0, 10, 0.0) is None
    assert not network.arrived(1, 10)
    assert network.arrived(0, 10) and network.dropped_down == 1


def test_shipped_scenarios_load():
    for path in sorted(SCENARIOS.glob("*.toml")):
        scenario = load(path)
        assert scenario.kind in ("convergence", "routes", "redundancy"), path


BASE = {"kind": "convergence", "swarm": {"nodes": 10}}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"kind": "gossip"}, "kind: expected one of"),
        ({"swarm": {}}, "swarm.nodes: required"),
        ({"swarm": {"nodes": 2}}, "swarm.nodes: must be in [3,"),
        ({"swarm": {"nodes": 10.5}}, "swarm.nodes: expected an integer"),
        ({"swarm": {"nodes": 10, "seconds": 0}}, "swarm.seconds: must be in (0.0,"),
        ({"swarm": {"nodes": 10, "node": 3}}, "swarm.node: unknown setting"),
        ({"network": {"loss": [0.0, 1.0]}}, "network.loss: must be in [0.0, 0.95]"),
        ({"network": {"loss": "none"}}, "network.loss: expected a number"),
        ({"network": 3}, "network: expected a table"),
        ({"membership": {"gossip_fanout": 2.5}}, "membership.gossip_fanout: expected an integer"),
        ({"membership": {"probe_timeout_s": 2.0}}, "membership: need 0 < probe_timeout_s"),
        ({"churn": {"leave_fraction": 2}}, "churn.leave_fraction: must be in"),
        ({"partition": [{"start_s": 2, "end_s": 1, "fraction": 0.1}]}, "partition[0].end_s"),
        ({"partition": [{"start_s": 1, "end_s": 2}]}, "partition[0].fraction: required"),
        ({"extra": 1}, "extra: unknown section"),
    ],
)
def test_scenario_validation_names_the_field(change, message):
    with pytest.raises(ScenarioError) as caught:
        parse(BASE | change)
    assert message in str(caught.value)


def test_scenario_file_errors_are_scenario_errors(tmp_path):
    with pytest.raises(ScenarioError, match="no such file"):
        load(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("kind = ")
    with pytest.raises(ScenarioError, match="not valid TOML"):
        load(bad)


def test_redundancy_scenarios_hand_their_keys_to_part_b():
    scenario = parse({"kind": "redundancy", "name": "r", "hosts": 30, "ks": [1]})
    assert scenario.params == {"hosts": 30, "ks": [1]} and scenario.spec is None
    with pytest.raises(ScenarioError, match="hostz: unknown parameter"):
        parse({"kind": "redundancy", "hostz": 30})


def test_the_simulator_reads_no_clock_and_does_no_io():
    """Wall-clock time belongs in bench/sim.py only; the simulator is pure computation."""
    forbidden = {"trio", "socket", "time", "asyncio", "subprocess", "os", "zeroconf", "libvirt"}
    for module in sorted((SCENARIOS.parent).glob("*.py")):
        imported = imported_roots(module)
        assert not imported & forbidden, f"{module.name} imports {sorted(imported & forbidden)}"
