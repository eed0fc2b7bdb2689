"""Volunteers first, on a testbed: pause when the owner returns, vacate after grace, drain.

Each testbed host's policy watches only its own namespace (``policy.scope =
"netns"``), so a busy loop started there is that host's volunteer coming back;
its grace is 20 s and its quiet period 2 s (node/testbed/testbed.py).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from kit.agents import needs_root

from node.testbed import testbed
from node.testbed.checks import rpc, wait_for
from node.testbed.market import (
    Load,
    finish,
    guest_states,
    job,
    market_swarm,
    running_replica_hosts,
    submit,
    wait_job,
)

pytestmark = [needs_root, pytest.mark.netns, pytest.mark.vm]

SEED = "policy"
ARGS = f"gleaner.steps=0 gleaner.seed={SEED}"
JOB_TIMEOUT_S = 900.0


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    root = tmp_path_factory.mktemp("policy") / "tb"
    with market_swarm(root, 5) as (hosts, image_id):
        yield root, hosts, image_id


def _replica_host(owner, hosts, job_id):
    found: list = []

    def running() -> bool:
        found[:] = [
            h for h in running_replica_hosts(owner, hosts, job_id)
            if any(s == "running" for s in guest_states(h).values())
        ]  # fmt: skip
        return bool(found)

    wait_for(running, JOB_TIMEOUT_S / 3, "a replica's guest running", step_s=0.2)
    return found[0]


def _state_of(host) -> str:
    states = list(guest_states(host).values())
    return states[0] if states else "gone"


def test_the_owners_load_pauses_the_guest_and_its_end_resumes_it(swarm):
    _root, hosts, image_id = swarm
    owner = hosts[0]
    job_id = submit(owner, image_id, segments=1, redundancy=2, extent_s=25, args=ARGS)
    host = _replica_host(owner, hosts, job_id)
    load = Load(host)
    try:
        started = time.monotonic()
        wait_for(lambda: _state_of(host) == "paused", 30, "the guest paused", step_s=0.05)
        paused_after = time.monotonic() - started
        policy = rpc(host, "status")["policy"]
        assert policy["state"] == "busy" and not policy["bidding"], policy
        assert "load" in policy["reason"], policy
        assert running_replica_hosts(owner, hosts, job_id), "paused mid-segment, not at its end"
    finally:
        load.stop()
    wait_for(lambda: _state_of(host) in ("running", "gone"), 20, "the guest running again")
    assert rpc(host, "status")["policy"]["state"] != "vacating"
    detail, report = finish(owner, hosts, job_id, SEED, JOB_TIMEOUT_S)
    assert detail["outcome"] == "completed" and report.ok, report.problems
    withdrawn = [r for r in detail["history"] if r["what"] == "withdrawn"]
    assert withdrawn == [], "a pause within the grace gives nothing up"
    print(f"guest paused {paused_after:.2f} s after the load started")  # for the log


def test_load_past_the_grace_vacates_and_the_job_still_completes(swarm):
    _root, hosts, image_id = swarm
    owner = hosts[0]
    job_id = submit(owner, image_id, segments=2, redundancy=2, extent_s=30, args=ARGS)
    host = _replica_host(owner, hosts, job_id)
    load = Load(host)
    try:
        wait_for(
            lambda: any(
                r["what"] == "withdrawn" and r["node"] == host["node_id"]
                for r in job(owner, job_id)["history"]
            ),
            120,
            "the busy host giving its replica up",
            step_s=0.2,
        )
        assert rpc(host, "status")["policy"]["state"] == "vacating"
        wait_for(lambda: _state_of(host) == "gone", 30, "its guest gone")
    finally:
        load.stop()
    detail, report = finish(owner, hosts, job_id, SEED, JOB_TIMEOUT_S)
    assert detail["outcome"] == "completed" and report.ok, report.problems
    assert host["node_id"] not in {row["winner"] for row in report.rows[:1]}


def test_a_drain_interrupted_by_kill_9_resumes_after_restart(swarm):
    root, hosts, image_id = swarm
    owner = hosts[0]
    job_id = submit(owner, image_id, segments=2, redundancy=1, extent_s=20, args=ARGS)
    host = _replica_host(owner, hosts, job_id)
    drained_at = time.time()
    policy = rpc(host, "drain")
    assert policy["draining"] and not policy["bidding"]
    testbed.kill_agent(_state_host(root, host["name"]))
    restarted = testbed.restart_agent(root, host["name"])
    wait_for(lambda: rpc(restarted, "status")["policy"]["state"] == "drained", 60, "drained")
    assert _state_of(host) == "gone", "the replica the crash left running is stopped"
    detail = wait_job(owner, job_id, JOB_TIMEOUT_S)
    assert detail["outcome"] == "completed"
    late_awards = [
        r
        for r in detail["history"]
        if r["what"] == "awarded" and r["node"] == host["node_id"] and r["t"] > drained_at
    ]
    assert late_awards == [], "a draining host wins nothing"
    assert rpc(restarted, "status")["policy"]["state"] == "drained"  # until undrain
    assert rpc(restarted, "undrain")["draining"] is False


def _state_host(root: Path, name: str) -> dict:
    import json

    state = json.loads((root / "testbed.json").read_text())
    return next(h for h in state["hosts"] if h["name"] == name)
