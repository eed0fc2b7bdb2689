"""The market end to end on a testbed: a job with k = 2 over four hosts, network jobs, a drain,
and a job owner's own program (an OCI image and a qcow2 disk) with its disk, inputs and outputs.

Each host has its own state folder and image library; only the swarm's boot images are
in the testbed's shared recipe store. The owner packs an OCI image from a root folder
built here, writes a job file naming it and an input, and submits it with ``gleaner
submit`` (which imports the image); hosts that win a segment take the image from the
owner (or an earlier runner) block by block, and the scratch disk travels in every
checkpoint. ``gleaner fetch -o`` brings the output files home.

Host crashes (which leave hosts down) have a testbed of their own:
test_market_crash_testbed.py.
"""

from __future__ import annotations

import ipaddress
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from kit.agents import needs_root

from node.base.identity import Identity
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
from node.testbed.own_program import (
    build_run_image,
    fetch_outputs,
    submit_job_file,
    user_image,
    user_root,
    write_job_file,
)
from segments.image.library import ImageLibrary

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


# -- a job owner's own program: image, inputs, disk state and outputs travel ----------

LINES = 6000
IDENTITY = Identity.from_seeds(b"\x51" * 32, b"\x52" * 32)
APP = f"""#!/bin/sh
cat /gleaner/in/seed.txt
i=$(cat /data/n 2>/dev/null || echo 0)
while [ "$i" -lt {LINES} ]; do
  i=$((i + 1))
  echo "line $i" >> /data/log
  echo "$i" > /data/n
  [ $((i % 500)) -eq 0 ] && echo "length $i $(wc -c < /data/log)"
done
cp /data/log /gleaner/out/log
cp /gleaner/in/seed.txt /gleaner/out/seed-copy.txt
"""
SUM = """#!/bin/sh
awk '{ s += $1 } END { print s }' /gleaner/in/n.txt > /gleaner/out/sum.txt
cat /gleaner/out/sum.txt
"""


def test_a_job_s_own_program_runs_across_hosts_with_its_disk_inputs_and_outputs(swarm, tmp_path):
    root, hosts, _demo_image = swarm
    owner, workers = hosts[0], hosts[1:]
    build_run_image(root)
    archive = user_image(
        tmp_path, ("sh", "cat", "wc", "cp", "echo"), {"app/run.sh": APP}, ("/bin/sh", "/app/run.sh")
    )
    (tmp_path / "seed.txt").write_text("seed 42\n")
    job_file = write_job_file(
        tmp_path / "job.toml",
        {
            "image": archive.name,
            "inputs": ["seed.txt"],
            "memory_mib": 128,
            "extent_s": 3,
            "segments": "until-poweroff",
            "redundancy": 2,
            "price_ceiling": 20,
            "disk_mib": 64,
            "output_mib": 16,
        },
    )
    job_id = submit_job_file(owner, job_file)["job_id"]
    # The host that holds the checkpoint finishes first, so it would win every segment:
    # once the first is committed, its winner is drained (it stops bidding), and the
    # next segments restore its checkpoint, disks and all, on other hosts.
    wait_for(lambda: _first_winner(owner, job_id) is not None, JOB_TIMEOUT_S, "segment 0")
    drained = next(h for h in workers if h["node_id"] == _first_winner(owner, job_id))
    rpc(drained, "drain")
    try:
        detail = wait_job(owner, job_id, JOB_TIMEOUT_S)
    finally:
        rpc(drained, "undrain")
    assert detail["outcome"] == "halted", detail["history"][-5:]
    rows = detail["rows"]
    assert len(rows) >= 4, f"only {len(rows)} segments"
    assert all(len(row["replicas"]) == 2 for row in rows)  # k = 2 ran every segment
    ran_on = {node for row in rows for node in row["replicas"]}
    assert ran_on <= {h["node_id"] for h in workers}
    winners = [row["winner"] for row in rows]
    assert winners[0] == drained["node_id"] and drained["node_id"] not in winners[2:], winners
    out = fetch_outputs(owner, job_id, tmp_path / "fetched")
    assert out["exit_status"] == 0
    fetched = tmp_path / "fetched"
    assert (fetched / "exit-status").read_text().strip() == "0"
    log = (fetched / "outputs" / "log").read_text().splitlines()
    assert log == [f"line {i}" for i in range(1, LINES + 1)]
    assert (fetched / "outputs" / "seed-copy.txt").read_text() == "seed 42\n"
    text = (fetched / "console.txt").read_text()
    lengths = [(int(i), int(n)) for i, n in re.findall(r"^length (\d+) (\d+)\r?$", text, re.M)]
    expected = [
        (i, sum(len(f"line {j}\n") for j in range(1, i + 1))) for i in range(500, LINES + 1, 500)
    ]
    assert lengths == expected  # printed across the segments, in order, none lost or repeated
    # every host that ran a segment took the image from others into its own library (ids
    # cover content, so importing the archive anywhere names it; other tests' images aside)
    with ImageLibrary(tmp_path / "reference-library") as reference:
        image_id = reference.import_archive(archive, IDENTITY, None).image.id
    for host in workers:
        library = Path(host["config"]).parent / "state" / "library" / "imported"
        ran = host["node_id"] in ran_on
        assert (library / f"{image_id}.json").is_file() == ran, (host["name"], ran)


def _first_winner(owner, job_id: str) -> str | None:
    rows = job(owner, job_id)["rows"]
    return rows[0]["winner"] if rows else None


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")
def test_a_qcow2_root_disk_runs_the_job_s_command_on_its_inputs(swarm, tmp_path):
    root, hosts, _demo_image = swarm
    owner = hosts[0]
    build_run_image(root)
    folder = user_root(
        tmp_path / "root", ("sh", "awk", "cat"), {"app/sum.sh": SUM}
    )  # a root file system on an ext4 disk, converted to qcow2, as people bring them
    raw, qcow2 = tmp_path / "root.raw", tmp_path / "root.qcow2"
    subprocess.run(
        ["/usr/sbin/mkfs.ext4", "-q", "-F", "-d", str(folder), str(raw), "32M"], check=True
    )
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2)], check=True
    )
    (tmp_path / "numbers.txt").write_text("".join(f"{n}\n" for n in range(1, 101)))
    job_file = write_job_file(
        tmp_path / "job.toml",
        {
            "image": qcow2.name,
            "command": ["/bin/sh", "/app/sum.sh"],
            "verify": "rerun",  # the owner runs it again itself and compares the outputs
            "inputs": {"n.txt": "numbers.txt"},
            "memory_mib": 128,
            "extent_s": 30,
            "segments": "until-poweroff",
            "redundancy": 2,
            "price_ceiling": 20,
            "disk_mib": 64,
            "output_mib": 16,
        },
    )
    job_id = submit_job_file(owner, job_file)["job_id"]
    detail = wait_job(owner, job_id, JOB_TIMEOUT_S)
    assert detail["outcome"] == "halted", detail["history"][-5:]
    out = fetch_outputs(owner, job_id, tmp_path / "fetched")
    assert out["exit_status"] == 0, (tmp_path / "fetched" / "console.txt").read_text()[-2000:]
    assert (tmp_path / "fetched" / "outputs" / "sum.txt").read_text() == "5050\n"
    verified = [r for r in detail["history"] if r["what"] == "verified"]
    assert any("a rerun here made the same 1 outputs" in r.get("reason", "") for r in verified), (
        verified
    )
