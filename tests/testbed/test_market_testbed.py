"""The market end to end on a testbed: a job with k = 2 over four hosts, network jobs, a drain.

Host crashes (which leave hosts down) have a testbed of their own:
test_market_crash_testbed.py.
"""

from __future__ import annotations

import ipaddress
import time

import pytest
from kit.agents import needs_root

from node.testbed.checks import ping, rpc, wait_for
from node.testbed.market import (
    audit,
    guest_states,
    job,
    market_swarm,
    running_replica_hosts,
    submit,
    wait_job,
)

pytestmark = [needs_root, pytest.mark.netns, pytest.mark.vm]

SEED = "market"
ARGS = f"gleaner.steps=0 gleaner.seed={SEED}"  # runs until stopped: the job ends by count
JOB_TIMEOUT_S = 900.0


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    """An owner and four hosts, each with its agent and libvirtd."""
    root = tmp_path_factory.mktemp("market") / "tb"
    with market_swarm(root, 5) as (hosts, image_id):
        yield root, hosts, image_id


def test_five_segments_k2_on_four_hosts_pay_exactly_the_first_completers(swarm):
    _root, hosts, image_id = swarm
    owner, workers = hosts[0], hosts[1:]
    job_id = submit(owner, image_id, segments=5, redundancy=2, args=ARGS)
    detail = wait_job(owner, job_id, JOB_TIMEOUT_S)
    assert detail["outcome"] == "completed", detail["history"][-5:]
    report = audit(owner, hosts, job_id, SEED)
    assert report.ok, report.problems
    assert [row["segment"] for row in report.rows] == [0, 1, 2, 3, 4]
    assert all(len(row["replicas"]) == 2 for row in report.rows)  # k = 2 ran each segment
    assert report.last_step > 0
    paid = rpc(owner, "ledger")["payer"]["payments"]
    assert sorted(p["segment"] for p in paid if p["job_id"] == job_id) == [0, 1, 2, 3, 4]
    assert len({r["winner"] for r in report.rows} - {h["node_id"] for h in workers}) == 0


def test_a_network_job_answers_at_its_address_wherever_its_segments_run(swarm):
    _root, hosts, image_id = swarm
    owner = hosts[0]
    job_id = submit(owner, image_id, segments=3, redundancy=1, network=True, extent_s=4, args=ARGS)
    address = job(owner, job_id)["address"]
    assert ipaddress.IPv6Address(address) in ipaddress.IPv6Network("fd00::/8")
    answered: set[int] = set()  # segments whose guest answered a ping at the job's address

    def finished() -> bool:
        detail = job(owner, job_id)
        if detail["outcome"] is not None:
            return True
        rows = detail["rows"]
        if rows and rows[-1]["replicas"] and rows[-1]["winner"] is None and ping(owner, address):
            answered.add(rows[-1]["segment"])
        return False

    wait_for(finished, JOB_TIMEOUT_S, "the network job to end", step_s=0.2)
    detail = job(owner, job_id)
    assert detail["outcome"] == "completed", detail["history"][-5:]
    assert len(answered) >= 2, f"the guest answered at {address} only in segments {answered}"
    report = audit(owner, hosts, job_id, SEED)
    assert report.ok, report.problems
    # each segment's host claimed the address at a higher epoch, and the last withdrew it
    claims = _claims(owner, address)
    epochs = [epoch for epoch, _ in claims]
    assert epochs == sorted(epochs) and len(set(epochs)) >= 3, claims
    hosts_by_segment = {r["segment"]: r["winner"] for r in report.rows}
    assert {node for _, node in claims} >= set(hosts_by_segment.values())
    wait_for(
        lambda: (
            not any(r["node_id"] for r in rpc(owner, "routes")["routes"] if r["address"] == address)
        ),
        30,
        "the last host to withdraw the address",
    )


def test_draining_a_network_jobs_host_moves_its_guest_live(swarm):
    """The drained host's guest migrates, mid-segment, to the host the owner picks; the
    segment ends there and verifies, and the address follows the guest."""
    _root, hosts, image_id = swarm
    owner = hosts[0]
    job_id = submit(owner, image_id, segments=2, redundancy=1, network=True, extent_s=20, args=ARGS)
    address = job(owner, job_id)["address"]
    found: list = []

    def guest_running() -> bool:
        found[:] = [
            h for h in running_replica_hosts(owner, hosts, job_id)
            if "running" in guest_states(h).values()
        ]  # fmt: skip
        return bool(found) and ping(owner, address)

    wait_for(guest_running, JOB_TIMEOUT_S / 3, "the guest running and answering", step_s=0.2)
    source = found[0]
    segment = job(owner, job_id)["rows"][-1]["segment"]
    drained_at = time.time()
    rpc(source, "drain")
    try:
        wait_for(
            lambda: rpc(source, "status")["policy"]["state"] == "drained",
            300,
            "the source drained",
            step_s=0.2,
        )
        assert guest_states(source) == {}
        detail = wait_job(owner, job_id, JOB_TIMEOUT_S)
    finally:
        rpc(source, "undrain")
    assert detail["outcome"] == "completed", detail["history"][-5:]
    moves = [
        r for r in detail["history"]
        if r["what"] == "offered" and r.get("live_from") == source["node_id"]
    ]  # fmt: skip
    assert moves and moves[0]["segment"] == segment and moves[0]["t"] > drained_at
    [taker] = [
        r["node"]
        for r in detail["history"]
        if r["what"] == "awarded" and r["attempt"] == moves[0]["attempt"]
    ]
    assert taker != source["node_id"]
    assert rpc(source, "market")["statistics"]["replicas_handed_off"] == 1
    committed = [r for r in detail["history"] if r["what"] == "committed"]
    assert [r["segment"] for r in committed] == [0, 1]
    assert committed[segment]["node"] == taker, "the host the guest moved to finished it"
    report = audit(owner, hosts, job_id, SEED)
    assert report.ok, report.problems
    # the taker claimed the address in the moved segment, at a higher epoch than the source
    claims = _claims(owner, address)
    by_node = {node: epoch for epoch, node in claims}
    assert by_node[taker] > by_node[source["node_id"]], claims


def _claims(owner, address):
    """(epoch, holder) of every route change of `address` the owner saw, oldest first."""
    return [
        (h["epoch"], h["node_id"])
        for h in rpc(owner, "routes")["history"]
        if h["address"] == address and h["event"] == "routed" and h["node_id"]
    ]
