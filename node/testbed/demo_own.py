"""`make demo`, the job owner's own program: an OCI image built here, run by strangers' hosts.

The owner packs a root folder (this machine's static busybox and an awk
program) as an OCI archive, with no registry and no Docker daemon, and writes a
job file naming it and an input file of numbers. ``gleaner submit`` imports the
image into the owner's library and offers the job (k = 2); the hosts that win a
segment take the image from the owner block by block into their own
libraries. The program's state (its RAM and its scratch disk) travels in every
checkpoint. After the first segment the operator drains its winner, so the
rest run on other hosts (with four hosts or more: k = 2 must remain).
``gleaner fetch -o`` brings the output files home, and they are compared with
the same computation done here, outside the VM.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from node.testbed import own_program
from node.testbed.checks import rpc, wait_for
from node.testbed.market import job, wait_job

ROUNDS = 8_000
NUMBERS = [7 * n + 3 for n in range(24)]
JOB_TIMEOUT_S = 900.0
PROGRAM = f"""#!/bin/sh
# For each number n of the input: s = (s * 31 + n + i) mod 1000003, for i = 1..{ROUNDS}.
echo "counting $(wc -l < /gleaner/in/numbers.txt) numbers"
awk -v rounds={ROUNDS} '{{
  s = 0
  for (i = 1; i <= rounds; i++) s = (s * 31 + $1 + i) % 1000003
  print $1, s > "/data/result.txt"
  printf "number %d (%d): %d\\n", NR, $1, s
}}' /gleaner/in/numbers.txt
cp /data/result.txt /gleaner/out/result.txt
wc -l < /data/result.txt > /gleaner/out/count.txt
"""


def reference() -> str:
    """What the program writes to result.txt, computed here."""
    lines = []
    for n in NUMBERS:
        s = 0
        for i in range(1, ROUNDS + 1):
            s = (s * 31 + n + i) % 1000003
        lines.append(f"{n} {s}")
    return "\n".join(lines) + "\n"


def own_program_job(console: Console, root: Path, hosts: list[dict[str, Any]]) -> bool:
    owner, bidders = hosts[0], hosts[1:]
    names = {h["node_id"]: h["name"] for h in hosts}
    folder = root / "own-program"
    folder.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    own_program.build_run_image(root)
    archive = own_program.user_image(
        folder, ("sh", "awk", "wc", "cp", "echo"), {"app/count.sh": PROGRAM}, ("/app/count.sh",)
    )
    (folder / "numbers.txt").write_text("".join(f"{n}\n" for n in NUMBERS))
    job_file = own_program.write_job_file(
        folder / "job.toml",
        {
            "image": archive.name,
            "inputs": ["numbers.txt"],
            "memory_mib": 128,
            "extent_s": 2,
            "segments": "until-poweroff",
            "redundancy": 2,
            "price_ceiling": 20,
            "disk_mib": 64,
            "output_mib": 16,
        },
    )
    console.print(
        f"\n[bold]a job owner's own program[/bold]: {archive.name} "
        f"({archive.stat().st_size / 2**20:.1f} MiB OCI archive of busybox and an awk program, "
        f"packed here in {time.monotonic() - started:.1f} s), {len(NUMBERS)} input numbers"
    )
    job_id = own_program.submit_job_file(owner, job_file)["job_id"]
    console.print(f"{owner['name']} imported it and submitted job {job_id[:12]} (k = 2)")
    started = time.monotonic()
    drained = None
    if len(bidders) > 2:  # k = 2 hosts must remain (demo.py runs this with four or more)
        wait_for(lambda: _winner(owner, job_id, 0) is not None, JOB_TIMEOUT_S, "segment 0")
        drained = next(h for h in bidders if h["node_id"] == _winner(owner, job_id, 0))
        rpc(drained, "drain")
        console.print(f"segment 0 won by {drained['name']}; the operator drains it")
    try:
        detail = wait_job(owner, job_id, JOB_TIMEOUT_S)
    finally:
        if drained is not None:
            rpc(drained, "undrain")
    took = time.monotonic() - started
    table = Table(title=f"job {job_id[:12]}: {detail['outcome']} in {took:.0f} s")
    for column in ("segment", "replicas", "winner", "tokens paid"):
        table.add_column(column)
    for row in detail["rows"]:
        table.add_row(
            str(row["segment"]),
            ", ".join(names.get(n, n[:8]) for n in row["replicas"]),
            names.get(row["winner"], "-"),
            str(row["paid_units"]),
        )
    console.print(table)
    fetched = folder / "fetched"
    out = own_program.fetch_outputs(owner, job_id, fetched)
    result = fetched / "outputs" / "result.txt"
    matched = result.is_file() and result.read_text() == reference()
    winners = {row["winner"] for row in detail["rows"]}
    moved = drained is None or len(winners) >= 2
    ok = matched and out["exit_status"] == 0 and len(detail["rows"]) >= 3 and moved
    console.print(
        f"exit status {out['exit_status']}; {len(out['files'])} output files fetched to "
        f"{fetched}; result.txt {'equals' if matched else 'DIFFERS from'} the same computation "
        f"done outside the VM, over {len(detail['rows'])} segments won by {len(winners)} hosts"
    )
    return ok


def _winner(owner: dict[str, Any], job_id: str, segment: int) -> str | None:
    rows = job(owner, job_id)["rows"]
    return rows[segment]["winner"] if len(rows) > segment else None
