"""Images people bring: what an import costs, and what a second image sharing a base adds.

Builds two OCI archives locally, with no registry and no daemon
(``segments.image.oci_pack``): a base whose one layer is a root holding this
machine's Python standard library (``/usr/lib/python3.11``, about 54 MB), and
a second image of that base plus one application layer (``--app-mib`` of
random data and a script). It imports the base into an empty image store,
then the second image into the same store, and prints one JSON object:

* ``import_s`` and ``image_bytes``: the base's import time (whole call:
  check, unpack, hash, store) and its uncompressed size;
* ``second_image_bytes`` and ``second_image_new_bytes``: the second image's
  size and the block bytes its import added, against ``app_layer_bytes``;
  the target is ``second_image_new_bytes <= 1.05 * app_layer_bytes``;
* ``first_fetch_bytes``: the bytes a fresh host brings into its stores when it
  takes a job of the base image from the owner's block server (on loopback,
  as a market host does: the job's bundle, then the layers it lacks; zero
  blocks never travel); ``second_fetch_bytes``: what the same host then
  brings for a job of the second image; the target is at most the app layer
  plus 5 %;
* with ``--vm`` (root, libvirtd, TCG): a job that appends ``--lines``
  numbered lines to a file on its scratch disk runs segment by segment,
  alternating between two private libvirtds (one namespace each) with
  separate block stores; each checkpoint (RAM and the writable disks) is
  shipped to the other host as the blocks it lacks. Per segment:
  ``checkpoint_disk_bytes_shipped`` (of the scratch and output disks),
  ``ram_bytes_shipped``, ``disk_blocks_changed_bytes`` (the scratch disk's
  blocks that differ from the previous checkpoint's), against
  ``scratch_disk_bytes``; the target is shipped <= changed disk blocks + RAM
  delta + 5 %. Then ``job_wall_s``, ``segments`` and ``outputs_ok`` (the
  output file holds every line in order).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trio

from node.base.identity import Identity
from node.market.run_requests import RunRequest
from node.runtime.job_bundles import BlockSources, JobBundles
from node.testbed import netns
from segments.image.job_disks import command_for, prepare
from segments.image.library import ImageLibrary, ImportedImage
from segments.image.oci import RunSettings
from segments.image.oci_pack import pack
from segments.image.outputs import read_outputs
from segments.image.store import build
from segments.store.blocks import DEFAULT_BLOCK_SIZE, BlockStore
from segments.store.manifest import ZERO, Manifest
from segments.store.transfer import serve_blocks
from segments.vm.libvirtd import Libvirtd
from segments.vm.replica import Replica, SegmentRun
from segments.vm.runtime import Disk, LibvirtRuntime

BASE_SOURCE = Path("/usr/lib/python3.11")
RUN_RECIPE = Path(__file__).resolve().parent.parent / "deploy" / "recipes" / "run.toml"
MAX_SEGMENTS = 40
IDENTITY = Identity.from_seeds(b"\x31" * 32, b"\x32" * 32)
HOST = Identity.from_seeds(b"\x33" * 32, b"\x34" * 32)


def run(work: Path, app_mib: float) -> dict[str, object]:
    base_root, app_root = work / "base", work / "app"
    shutil.copytree(BASE_SOURCE, base_root / BASE_SOURCE.relative_to("/"), symlinks=True)
    (app_root / "app").mkdir(parents=True)
    (app_root / "app" / "data.bin").write_bytes(random.Random(7).randbytes(int(app_mib * 2**20)))
    (app_root / "app" / "run.sh").write_text("#!/bin/sh\nsha256sum /app/data.bin\n")
    settings = RunSettings(cmd=("/bin/sh", "/app/run.sh"), env=("PATH=/usr/bin:/bin",))
    started = time.monotonic()
    base_archive = pack([base_root], work / "base.tar", settings)
    second_archive = pack([base_root, app_root], work / "second.tar", settings)
    pack_s = time.monotonic() - started
    with ImageLibrary(work / "store") as library:
        first = library.import_archive(base_archive, IDENTITY, "bench/base")
        second = library.import_archive(second_archive, IDENTITY, "bench/app")
        app_layer_bytes = int(second.image.layers[-1]["size"])
        started = time.monotonic()
        first_fetch, second_fetch = trio.run(_travel, work, library, ["bench/base", "bench/app"])
        travel_s = time.monotonic() - started
    ratio = second.new_bytes / app_layer_bytes
    return {
        "bench": "workloads",
        "import_s": round(first.seconds, 3),
        "image_bytes": first.image.size_bytes,
        "archive_bytes": base_archive.stat().st_size,
        "image_new_bytes": first.new_bytes,
        "second_image_bytes": second.image.size_bytes,
        "second_image_new_bytes": second.new_bytes,
        "second_import_s": round(second.seconds, 3),
        "app_layer_bytes": app_layer_bytes,
        "second_new_over_app_layer": round(ratio, 4),
        "target_second_new_over_app_layer_max": 1.05,
        "target_met": ratio <= 1.05,
        "pack_two_archives_s": round(pack_s, 3),
        "first_fetch_bytes": first_fetch,
        "second_fetch_bytes": second_fetch,
        "second_fetch_over_app_layer": round(second_fetch / app_layer_bytes, 4),
        "target_second_fetch_over_app_layer_max": 1.05,
        "fetch_target_met": second_fetch <= 1.05 * app_layer_bytes,
        "two_fetches_s": round(travel_s, 3),
        "conditions": {
            "base": str(BASE_SOURCE),
            "app_mib": app_mib,
            "block_bytes": DEFAULT_BLOCK_SIZE,
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "layer_compression": "gzip in the archive, stored uncompressed",
        },
    }


async def _travel(work: Path, library: ImageLibrary, images: list[str]) -> list[int]:
    """A fresh host takes a job of each image in turn from the owner's block server (on
    loopback), as a market host does; the bytes each brought into its stores."""
    owner_store = BlockStore(work / "owner-blocks")
    host_store, host_library = BlockStore(work / "host-blocks"), ImageLibrary(work / "host-lib")
    owner = JobBundles(IDENTITY, owner_store, library, 1 << 40)
    host = JobBundles(HOST, host_store, host_library, 1 << 40)
    fetched = []
    try:
        (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
        holders = [("127.0.0.1", listener.socket.getsockname()[1])]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_blocks, BlockSources([owner_store, library.store]), listener)
            for number, image in enumerate(images):
                work_ = await owner.make(RunRequest(image=image, disk_mib=256, output_mib=16))
                before = _held(host_store) + _held(host_library.store)
                await host.disks(work_, holders, work / f"host-disks-{number}")
                fetched.append(_held(host_store) + _held(host_library.store) - before)
                shutil.rmtree(work / f"host-disks-{number}")
            nursery.cancel_scope.cancel()
    finally:
        for store in (owner_store, host_store):
            store.close()
        host_library.close()
    return fetched


def _held(store: BlockStore) -> int:
    return store.statistics().bytes


def ship(source: BlockStore, dest: BlockStore, checkpoint: Manifest) -> dict[str, int]:
    """Copy the blocks `dest` lacks, then the manifest; the bytes shipped, by file."""
    missing = dest.missing(checkpoint)
    by_file: dict[str, int] = {}
    for entry, ref in checkpoint.blocks():
        if ref.digest in missing:
            by_file[entry.name] = by_file.get(entry.name, 0) + ref.length
            dest.put(source.get(ref.digest), ref.digest)
            del missing[ref.digest]
    dest.add_manifest(checkpoint)
    return by_file


LINES_APP = """#!/bin/sh
i=$(cat /data/n 2>/dev/null || echo 0)
while [ "$i" -lt {lines} ]; do
  i=$((i + 1))
  echo "line $i" >> /data/log
  echo "$i" > /data/n
done
cp /data/log /gleaner/out/log
"""
SCRATCH_BYTES, OUTPUT_BYTES = 64 << 20, 16 << 20


def _lines_image(work: Path, library: ImageLibrary, lines: int) -> ImportedImage:
    root = work / "root"
    (root / "bin").mkdir(parents=True)
    (root / "data").mkdir()
    shutil.copy2("/bin/busybox", root / "bin" / "busybox")
    for applet in ("sh", "cat", "cp", "echo"):
        (root / "bin" / applet).symlink_to("busybox")
    (root / "app").mkdir()
    (root / "app" / "run.sh").write_text(LINES_APP.format(lines=lines))
    archive = pack([root], work / "lines.tar", RunSettings(cmd=("/bin/sh", "/app/run.sh")))
    return library.import_archive(archive, IDENTITY, "bench/lines").image


def run_segments(work: Path, lines: int, extent_s: float) -> dict[str, object]:
    """The job over segments on two private libvirtds with separate stores (see above)."""
    work.mkdir(parents=True)
    boot = build(RUN_RECIPE, work / "images")
    tag = os.urandom(3).hex()
    with contextlib.ExitStack() as stack:
        library = stack.enter_context(ImageLibrary(work / "library"))
        image = _lines_image(work, library, lines)
        hosts: dict[str, tuple[LibvirtRuntime, BlockStore, tuple[Disk, ...]]] = {}
        for label in ("a", "b"):
            namespace = f"glw-{tag}-{label}"
            stack.callback(netns.delete_namespace, namespace)
            netns.add_namespace(namespace)
            daemon = Libvirtd(label, work / label, namespace, str(uuid.uuid4()))
            stack.callback(daemon.stop)
            daemon.start()
            daemon.warm_up()
            runtime = LibvirtRuntime(daemon.uri)
            stack.callback(runtime.close)
            store = BlockStore(work / f"blocks-{label}")
            stack.callback(store.close)
            disks = prepare(
                library,
                image,
                command_for(image),
                {},
                work / f"disks-{label}",
                SCRATCH_BYTES,
                OUTPUT_BYTES,
            )
            hosts[label] = (runtime, store, disks)
        per_segment: list[dict[str, object]] = []
        checkpoint, host, started = None, "a", time.monotonic()
        previous_disk: set[bytes] = set()
        while True:
            runtime, store, disks = hosts[host]
            segment = len(per_segment)
            replica = Replica(runtime, store, IDENTITY, work / f"run-{segment}")
            run = SegmentRun(
                "gl-bench-lines",
                boot.kernel,
                boot.initrd,
                boot.cmdline,
                128,
                1,
                extent_s,
                disks=disks,
            )
            result = replica.run(run, checkpoint)
            disk_blocks = {d for d in result.checkpoint.file("disk-0").digests if d != ZERO}
            changed = sum(
                ref.length
                for ref in result.checkpoint.file("disk-0").blocks(store.block_size)
                if ref.digest not in previous_disk and not ref.zero
            )
            previous_disk = disk_blocks
            if result.powered_off or segment >= MAX_SEGMENTS:
                break
            other = "b" if host == "a" else "a"
            by_file = ship(store, hosts[other][1], result.checkpoint)
            disk = sum(n for name, n in by_file.items() if name.startswith("disk-"))
            ram = sum(n for name, n in by_file.items() if name in ("ram", "rest", "memory"))
            per_segment.append(
                {
                    "checkpoint_disk_bytes_shipped": disk,
                    "ram_bytes_shipped": ram,
                    "disk_blocks_changed_bytes": changed,
                    "scratch_disk_used_bytes": len(disk_blocks) * store.block_size,
                    "within_target": disk + ram <= 1.05 * (changed + ram),
                }
            )
            checkpoint, host = result.checkpoint, other
        wall = time.monotonic() - started
        outputs = work / "outputs.raw"
        store = hosts[host][1]
        store.materialize(
            replace(result.checkpoint, files=(result.checkpoint.file("disk-3"),)), outputs
        )
        files = read_outputs(outputs, work / "out")
        log = (work / "out" / "log").read_text().splitlines() if files else []
    return {
        "segments": len(per_segment) + 1,
        "job_wall_s": round(wall, 3),
        "outputs_ok": result.powered_off and log == [f"line {i}" for i in range(1, lines + 1)],
        "scratch_disk_bytes": SCRATCH_BYTES,
        "per_segment": per_segment,
        "vm_conditions": {"lines": lines, "extent_cpu_s": extent_s, "memory_mib": 128, "tcg": True},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--app-mib", type=float, default=4.0, help="the app layer's random data")
    parser.add_argument("--json", action="store_true", help="print JSON (the only output form)")
    parser.add_argument("--vm", action="store_true", help="also run a job over segments (root)")
    parser.add_argument("--lines", type=int, default=6000, help="--vm: lines the job appends")
    parser.add_argument("--extent", type=float, default=3.0, help="--vm: vCPU-s per segment")
    args = parser.parse_args()
    if not BASE_SOURCE.is_dir():
        print(f"bench/workloads.py: needs {BASE_SOURCE}", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="gleaner-bench-workloads-") as tmp:
        result = run(Path(tmp), args.app_mib)
        if args.vm:
            result.update(run_segments(Path(tmp) / "vm", args.lines, args.extent))
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
