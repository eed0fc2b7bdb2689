"""A job owner's own program through the market: image, inputs, disk state and outputs travel.

Four hosts and an owner, each with its own state folder and image library (only
the swarm's boot image is in the testbed's shared recipe store). The owner packs
an OCI image from a root folder built here, writes a job file naming it and an
input, and submits it with ``gleaner submit`` (which imports the image). The
program appends numbered lines to a file on its scratch disk and prints the
file's length as it goes; k = 2 hosts run each segment, taking the image from the
owner (or an earlier runner) block by block, and the scratch disk travels in
every checkpoint. ``gleaner fetch -o`` brings the output files home.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from kit.agents import needs_root

from node.testbed.checks import rpc, wait_for
from node.testbed.market import job, market_swarm, wait_job
from node.testbed.own_program import (
    build_run_image,
    fetch_outputs,
    submit_job_file,
    user_image,
    user_root,
    write_job_file,
)

pytestmark = [needs_root, pytest.mark.netns, pytest.mark.vm]

LINES = 6000
JOB_TIMEOUT_S = 900.0
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


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    root = tmp_path_factory.mktemp("own") / "tb"
    with market_swarm(root, 5) as (hosts, _demo_image):
        yield root, hosts


def test_a_job_s_own_program_runs_across_hosts_with_its_disk_inputs_and_outputs(swarm, tmp_path):
    root, hosts = swarm
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
    # every host that ran a segment took the image from others into its own library
    for host in workers:
        records = list(
            (Path(host["config"]).parent / "state" / "library" / "imported").glob("*.json")
        )
        ran = host["node_id"] in ran_on
        assert len(records) == (1 if ran else 0), (host["name"], ran, records)


def _first_winner(owner, job_id: str) -> str | None:
    rows = job(owner, job_id)["rows"]
    return rows[0]["winner"] if rows else None


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")
def test_a_qcow2_root_disk_runs_the_job_s_command_on_its_inputs(swarm, tmp_path):
    root, hosts = swarm
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
