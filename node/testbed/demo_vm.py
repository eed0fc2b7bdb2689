"""The demo's VM part: a job's segments handed from host to host, and a live migration."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from node.testbed import market as testbed_market
from node.testbed.checks import ping, rpc, wait_for
from node.testbed.vm import NetworkVm
from segments.image.store import Image, build
from segments.image.workload import reference_result

RECIPE = Path(__file__).resolve().parents[2] / "deploy" / "recipes" / "demo.toml"
STEPS, SEED = 1200, "demo"
JOB_TIMEOUT_S = 900.0


def build_image(console: Console, root: Path) -> Image:
    started = time.monotonic()
    image = build(RECIPE, root / "images")
    console.print(
        f"guest image {image.id[:16]}… ({image.size_bytes / 2**20:.1f} MiB: Debian cloud kernel "
        f"+ busybox initramfs) ready in {time.monotonic() - started:.1f} s"
    )
    return image


def market_job(console: Console, image: Image, hosts: list[dict[str, Any]]) -> bool:
    """The first host injects the demo job (k = 2); the others bid, run, and get paid."""
    owner, bidders = hosts[0], hosts[1:]
    names = {h["node_id"]: h["name"] for h in hosts}
    args = f"gleaner.steps={STEPS} gleaner.seed={SEED}"
    job_id = testbed_market.submit(
        owner, image.id, segments="until-poweroff", redundancy=2, extent_s=2, args=args
    )
    console.print(
        f"{owner['name']} injected job {job_id[:12]} ({STEPS} hash-chain steps, 2 vCPU-s "
        f"segments, k = 2, until the guest powers off); {len(bidders)} hosts bid for each segment"
    )
    started = time.monotonic()
    detail = testbed_market.wait_job(owner, job_id, JOB_TIMEOUT_S)
    report = testbed_market.audit(owner, hosts, job_id, SEED)
    table = Table(
        title=f"job {job_id[:12]}: {detail['outcome']} in {time.monotonic() - started:.0f} s"
    )
    for column in ("segment", "offers", "replicas", "first done", "winner", "time", "tokens paid"):
        table.add_column(column)
    for row in report.rows:
        done = row["completions"]
        took = (row["committed_at"] or row["offered_at"]) - row["offered_at"]
        table.add_row(
            str(row["segment"]), str(row["attempts"]),
            ", ".join(names.get(n, n[:8]) for n in row["replicas"]),
            names.get(done[0]["node"], "-") if done else "-",
            names.get(row["winner"], "-"), f"{took:.1f} s", str(row["paid_units"]),
        )  # fmt: skip
    console.print(table)
    for host in bidders:
        payee = rpc(host, "ledger")["payee"]
        earned = sum(p["units"] for p in payee["payments"] if p["job_id"] == job_id)
        console.print(f"  {host['name']} holds {earned} token unit(s) from {owner['name']}")
    ok = report.ok and report.result == reference_result(SEED, STEPS)
    for problem in report.problems:
        console.print(f"[red]problem:[/red] {problem}")
    console.print(
        f"result {report.result} — {'equals' if ok else 'DIFFERS from'} the same computation "
        "done outside the VM; each segment paid once, to its first verified completer"
    )
    return ok


def live_migration(console: Console, root: Path, image: Image, hosts: list[dict[str, Any]]) -> None:
    source, destination, observer = hosts[0], hosts[1], hosts[-1]
    vm = NetworkVm(root, "web1", "gtweb1")
    vm.start(source, image.id, "gleaner.steps=0 gleaner.every=100")
    wait_for(lambda: ping(observer, vm.address), 120, "the network guest answering")
    result = vm.migrate(source, destination)
    reachable = ping(observer, vm.address, count=3)
    console.print(
        f"live migration of network guest web1 ({vm.address}) {source['name']} → "
        f"{destination['name']}: libvirt downtime {result['downtime_ms']:.0f} ms, "
        f"address claimed at epoch {(result['claim'] or {}).get('epoch')}, "
        f"{'answering' if reachable else 'NOT answering'} from {observer['name']} afterwards"
    )
