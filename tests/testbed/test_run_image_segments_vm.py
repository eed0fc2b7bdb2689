"""A job's scratch disk travels in its checkpoints: segments alternate between two hosts.

Two real libvirt hosts (``hosts`` of tests/kit/vm_lab.py), each with its own block store.
The job's program appends numbered lines to a file on its scratch disk and prints the
file's length as it goes; every segment ends in a checkpoint (RAM and the writable disks)
on one host, whose blocks are copied to the other host's store (what a transfer ships: only
the blocks it lacks), which restores it and runs the next segment. The second segment's
checkpoint is verified on its receiver (restored with its disks, in copies) before it
runs on. The output, read off the final checkpoint's output disk, must hold every line
in order with no gap.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
from kit.agents import needs_root
from kit.job_images import RUN_RECIPE, root_folder
from kit.vm_lab import PACKAGE_CACHE, Lab

from node.base.identity import Identity
from segments.image import store as image_store
from segments.image.job_disks import command_for, prepare
from segments.image.library import ImageLibrary
from segments.image.oci import RunSettings
from segments.image.oci_pack import pack
from segments.image.outputs import read_outputs
from segments.image.runner import parse_exit
from segments.store.blocks import BlockStore
from segments.store.manifest import Manifest
from segments.vm.replica import CONSOLE_FILE, Replica, SegmentRun
from segments.vm.verify import VerifySpec, verify_checkpoint

IDENTITY = Identity.from_seeds(b"\x61" * 32, b"\x62" * 32)
LINES = 6000
EXTENT_S = 3.0
MAX_SEGMENTS = 30
APP = f"""#!/bin/sh
i=$(cat /data/n 2>/dev/null || echo 0)
while [ "$i" -lt {LINES} ]; do
  i=$((i + 1))
  echo "line $i" >> /data/log
  echo "$i" > /data/n
  [ $((i % 500)) -eq 0 ] && echo "length $i $(wc -c < /data/log)"
done
cp /data/log /gleaner/out/log
"""
pytestmark = [
    needs_root,
    pytest.mark.netns,
    pytest.mark.vm,
    pytest.mark.skipif(shutil.which("libvirtd") is None, reason="needs libvirtd"),
]


def ship(source: BlockStore, dest: BlockStore, checkpoint: Manifest) -> int:
    """Copy the blocks `dest` lacks, then the manifest; the bytes shipped."""
    missing = dest.missing(checkpoint)
    for digest in missing:
        dest.put(source.get(digest), digest)
    dest.add_manifest(checkpoint)
    return sum(missing.values())


def test_a_job_s_disk_goes_on_across_hosts_segment_by_segment(hosts: Lab, tmp_path: Path) -> None:
    boot = image_store.build(RUN_RECIPE, tmp_path / "images", PACKAGE_CACHE)
    root = root_folder(tmp_path / "root", ("sh", "cat", "wc", "cp", "echo"), {"app/run.sh": APP})
    (root / "data").mkdir()
    archive = pack([root], tmp_path / "img.tar", RunSettings(cmd=("/bin/sh", "/app/run.sh")))
    stores = {"a": BlockStore(tmp_path / "blocks-a"), "b": BlockStore(tmp_path / "blocks-b")}
    with ImageLibrary(tmp_path / "library") as library:
        image = library.import_archive(archive, IDENTITY, "test/lines").image
        command = command_for(image)
        disks = {  # each host prepares its own disks from the image (images travel: next step)
            name: prepare(
                library, image, command, {}, tmp_path / f"disks-{name}", 64 << 20, 16 << 20
            )
            for name in stores
        }
    runtimes = {"a": hosts.a.runtime, "b": hosts.b.runtime}
    checkpoint, console, shipped, host = None, b"", [], "a"
    previous_progress: bytes | None = None
    try:
        for segment in range(MAX_SEGMENTS):
            replica = Replica(runtimes[host], stores[host], IDENTITY, tmp_path / f"run-{segment}")
            run = SegmentRun(
                "gl-lines",
                boot.kernel,
                boot.initrd,
                boot.cmdline,
                128,
                1,
                EXTENT_S,
                disks=disks[host],
            )
            result = replica.run(run, checkpoint)
            console += stores[host].read_file(result.checkpoint, CONSOLE_FILE)
            if result.powered_off:
                break
            other = "b" if host == "a" else "a"
            shipped.append(ship(stores[host], stores[other], result.checkpoint))
            if segment == 1:  # the receiver verifies it first, as an owner would
                before = [d.path.read_bytes() for d in disks[other] if not d.read_only]
                spec = VerifySpec(
                    boot.kernel,
                    boot.initrd,
                    boot.cmdline,
                    128,
                    1,
                    tmp_path / "verify",
                    "gl-lines",
                    disks=disks[other],
                )
                verdict = verify_checkpoint(
                    runtimes[other],
                    stores[other],
                    spec,
                    result.checkpoint,
                    result.progress,
                    previous_progress,
                    False,
                    60.0,
                )
                assert verdict.ok, verdict.reason
                assert before == [d.path.read_bytes() for d in disks[other] if not d.read_only]
            previous_progress = result.progress
            checkpoint, host = result.checkpoint, other
        else:
            pytest.fail(f"the job did not end in {MAX_SEGMENTS} segments")
        final = result.checkpoint
        outputs = tmp_path / "outputs.raw"
        stores[host].materialize(replace(final, files=(final.file("disk-3"),)), outputs)
        read_outputs(outputs, tmp_path / "out")
    finally:
        for store in stores.values():
            store.close()
    segments = segment + 1
    print(f"\nFIGURE segments = {segments}, shipped per segment = {shipped}")
    text = console.decode(errors="replace")
    assert segments >= 4, text[-2000:]
    assert parse_exit(text) == 0
    log = (tmp_path / "out" / "log").read_text().splitlines()
    assert log == [f"line {i}" for i in range(1, LINES + 1)]
    lengths = [(int(i), int(n)) for i, n in re.findall(r"^length (\d+) (\d+)\r?$", text, re.M)]
    expected = [
        (i, sum(len(f"line {j}\n") for j in range(1, i + 1))) for i in range(500, LINES + 1, 500)
    ]
    assert lengths == expected  # printed across the segments, in order, none lost or repeated
