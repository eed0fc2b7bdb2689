"""The demo's VM part: a job's segments handed from host to host, and a live migration."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from node.control import call
from node.testbed_checks import ping, wait_for
from node.testbed_vm import NetworkVm
from segments.image import Image, build
from segments.workload import check_continuity, parse_progress, parse_result, reference_result

RECIPE = Path(__file__).resolve().parent.parent / "deploy" / "recipes" / "demo.toml"
STEPS, SEED = 2000, "demo"


def build_image(console: Console, root: Path) -> Image:
    started = time.monotonic()
    image = build(RECIPE, root / "images")
    console.print(
        f"guest image {image.id[:16]}… ({image.size_bytes / 2**20:.1f} MiB: Debian cloud kernel "
        f"+ busybox initramfs) ready in {time.monotonic() - started:.1f} s"
    )
    return image


def segments_handoff(console: Console, image: Image, hosts: list[dict[str, Any]]) -> bool:
    """Run the demo job as segments, each on the next host, from the previous checkpoint."""
    table = Table(title=f"job demo1: {STEPS} hash-chain steps, one segment per host")
    for column in ("segment", "host", "vCPU s", "wall s", "fetched", "checkpoint", "steps"):
        table.add_column(column)
    checkpoint: bytes | None = None
    holders: list[str] = []
    logs: list[str] = []
    index, finished = 0, False
    while not finished and index < 8:
        host = hosts[index % len(hosts)]
        reply = call(Path(host["socket"]), "segment_run", {
            "job": "demo1", "segment": index, "image_id": image.id,
            "args": f"gleaner.steps={STEPS} gleaner.seed={SEED} gleaner.every=10",
            "extent_cpu_s": 3.0, "checkpoint": checkpoint, "holders": holders,
        }, timeout=300)  # fmt: skip
        text = Path(reply["serial_log"]).read_text(errors="replace")
        logs.append(text)
        steps = parse_progress(text)
        fetched = reply["fetched"]
        table.add_row(
            str(index), host["name"], f"{reply['cpu_s']:.1f}", f"{reply['wall_s']:.1f}",
            f"{fetched.get('bytes', 0) / 2**20:.1f} MiB" if fetched else "-",
            "done" if reply["powered_off"] else f"{reply['checkpoint_bytes'] / 2**20:.1f} MiB",
            f"{steps[0][0]}-{steps[-1][0]}" if steps else "booting",
        )  # fmt: skip
        checkpoint, holders = reply["checkpoint"], [reply["holder"]]
        finished = reply["powered_off"]
        index += 1
    console.print(table)
    every_step = [line for text in logs for line in parse_progress(text)]
    check_continuity(every_step, seed=SEED, every=10)
    result = parse_result(logs[-1])
    ok = finished and result == reference_result(SEED, STEPS)
    console.print(
        f"result {result} — {'equals' if ok else 'DIFFERS from'} the same computation done "
        "outside the VM; the count continued across every host with no reset and no gap"
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
