"""The market on a testbed whose replica hosts crash: no committed segment is lost.

A testbed of its own (an owner and four hosts, each with its agent and libvirtd):
the crashed hosts stay down, so no other test may share it.
"""

from __future__ import annotations

import pytest
from kit.agents import needs_root

from node.testbed import testbed
from node.testbed.checks import wait_for
from node.testbed.market import audit, job, market_swarm, submit, wait_job

pytestmark = [needs_root, pytest.mark.netns, pytest.mark.vm]

SEED = "market"
ARGS = f"gleaner.steps=0 gleaner.seed={SEED}"  # runs until stopped: the job ends by count
JOB_TIMEOUT_S = 900.0


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    """An owner and four hosts, each with its agent and libvirtd."""
    root = tmp_path_factory.mktemp("market-crash") / "tb"
    with market_swarm(root, 5) as (hosts, image_id):
        yield root, hosts, image_id


def _running_segment(owner, job_id):
    """The segment whose replicas are running now (awarded, nothing completed), or None."""
    rows = job(owner, job_id)["rows"]
    row = rows[-1] if rows else None
    if row and len(row["replicas"]) == 2 and not row["completions"] and row["winner"] is None:
        return row
    return None


def test_crashed_replica_hosts_lose_no_committed_segment(swarm):
    root, hosts, image_id = swarm
    owner = hosts[0]
    by_id = {h["node_id"]: h for h in hosts}
    job_id = submit(owner, image_id, segments=4, redundancy=2, extent_s=3, args=ARGS)
    # Segment 1 running: one replica's host crashes; the other finishes it.
    wait_for(
        lambda: (r := _running_segment(owner, job_id)) is not None and r["segment"] == 1,
        JOB_TIMEOUT_S / 3,
        "segment 1 running",
        step_s=0.1,
    )
    row = _running_segment(owner, job_id)
    assert row is not None
    testbed.crash_host(root, by_id[row["replicas"][0]]["name"])
    # A later segment running: both replicas' hosts crash; it is offered again.
    wait_for(
        lambda: (
            (r := _running_segment(owner, job_id)) is not None
            and r["segment"] >= 2
            and r["replicas"][0] != row["replicas"][0]  # not on the crashed host
            and all(testbed.is_up(root, by_id[n]["name"]) for n in r["replicas"])
        ),
        JOB_TIMEOUT_S / 3,
        "a later segment running on two live hosts",
        step_s=0.1,
    )
    both = _running_segment(owner, job_id)
    assert both is not None
    for node in both["replicas"]:
        testbed.crash_host(root, by_id[node]["name"])
    detail = wait_job(owner, job_id, JOB_TIMEOUT_S)
    assert detail["outcome"] == "completed"
    again = next(r for r in detail["rows"] if r["segment"] == both["segment"])
    assert again["attempts"] >= 2, "the segment was offered again after both replicas died"
    offers = [
        r for r in detail["history"] if r["what"] == "offered" and r["segment"] == both["segment"]
    ]
    committed = [r for r in detail["history"] if r["what"] == "committed"]
    assert [r["segment"] for r in committed] == [0, 1, 2, 3]  # none lost, none twice
    assert len(offers) >= 2
    crashed_attempt = max(
        r["attempt"]
        for r in detail["history"]
        if r["what"] == "awarded"
        and r["segment"] == both["segment"]
        and r["node"] in both["replicas"]
    )
    [done] = [r for r in committed if r["segment"] == both["segment"]]
    assert done["attempt"] > crashed_attempt, "committed from a new attempt"
    assert done["node"] not in both["replicas"], "won by a host that was still up"
    later = [o for o in offers if o["attempt"] > crashed_attempt]
    assert later, "offered again after both replicas' hosts crashed"
    [previous] = [r for r in committed if r["segment"] == both["segment"] - 1]
    assert later[0]["checkpoint"] == previous["manifest"], "from the last committed checkpoint"
    report = audit(owner, [h for h in hosts if testbed.is_up(root, h["name"])], job_id, SEED)
    assert not [p for p in report.problems if "ledgers" not in p], report.problems
