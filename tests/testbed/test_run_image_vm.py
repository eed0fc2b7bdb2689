"""A job owner's own program, from an imported OCI archive, in a real VM (whiteouts, PATH).

The same through the market, and a qcow2 root disk: tests/testbed/test_market_testbed.py.

One private libvirtd in a namespace (``one_host`` of tests/kit/vm_lab.py), QEMU TCG, the
``run`` recipe's kernel and initramfs. The image is packed here from a root folder holding
the host's static busybox and a script (no registry, no daemon), imported, and booted with
its inputs; the outputs come back through ``read_outputs`` and are compared with the same
computation done on the host.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from pathlib import Path

import pytest
from kit import job_images
from kit.agents import needs_root
from kit.job_images import RUN_RECIPE
from kit.vm_lab import PACKAGE_CACHE, one_host

from node.base.identity import Identity
from segments.image import store as image_store
from segments.image.job_disks import OUTPUTS, command_for, prepare
from segments.image.library import ImageLibrary, ImportedImage
from segments.image.oci import RunSettings
from segments.image.oci_pack import pack
from segments.image.outputs import read_outputs
from segments.image.runner import parse_exit
from segments.vm.runtime import LibvirtRuntime, VmSpec, VmState

IDENTITY = Identity.from_seeds(b"\x41" * 32, b"\x42" * 32)
BOOT_TIMEOUT_S = 180.0
APP = """#!/bin/sh
set -e
echo "hello from the job"
wc -c < /gleaner/in/data.txt > /gleaner/out/count
tr a-z A-Z < /gleaner/in/data.txt > /gleaner/out/upper.txt
mkdir -p /gleaner/out/sub
sha256sum /gleaner/in/data.txt | cut -d' ' -f1 > /gleaner/out/sub/sum
echo "working in $(pwd) as $GREETING" >&2
old=gone; [ -e /app/old.txt ] && old=present
echo "old:$old keep:$(ls /data/keep 2>/dev/null | tr '\\n' ',')"
exit 3
"""
APPLETS = ("sh", "wc", "tr", "mkdir", "sha256sum", "cut", "echo", "pwd", "ls")
real = pytest.mark.skipif(
    shutil.which("libvirtd") is None or not Path("/bin/busybox").exists(),
    reason="needs libvirtd and busybox-static",
)
pytestmark = [needs_root, pytest.mark.netns, pytest.mark.vm, real]


@pytest.fixture(scope="module")
def boot(tmp_path_factory: pytest.TempPathFactory) -> image_store.Image:
    return image_store.build(RUN_RECIPE, tmp_path_factory.mktemp("images"), PACKAGE_CACHE)


@pytest.fixture(scope="module")
def runtime(tmp_path_factory: pytest.TempPathFactory):
    with one_host(tmp_path_factory.mktemp("glr")) as made:
        yield made


def root_folder(path: Path) -> Path:
    return job_images.root_folder(path, APPLETS, {"app/run.sh": APP})


def expected_outputs(data: bytes) -> dict[str, bytes]:
    return {
        "count": f"{len(data)}\n".encode(),
        "upper.txt": data.upper(),
        "sub/sum": f"{hashlib.sha256(data).hexdigest()}\n".encode(),
    }


def run_job(
    runtime: LibvirtRuntime,
    boot: image_store.Image,
    library: ImageLibrary,
    imported: ImportedImage,
    work: Path,
    command: list[str] | None,
) -> tuple[str, dict[str, bytes]]:
    data = b"The quick brown fox jumps over the lazy dog.\n" * 50
    (work / "data.txt").write_bytes(data)
    spec_command = command_for(imported, command=command, env=["GREETING=hi"], working_dir="/app")
    disks = prepare(
        library,
        imported,
        spec_command,
        {"data.txt": work / "data.txt"},
        work / "disks",
        64 << 20,
        16 << 20,
    )
    name = f"gl-run-{imported.kind}"
    serial = work / "serial.log"
    spec = VmSpec(name, boot.kernel, boot.initrd, boot.cmdline, serial, 128, 1, disks=disks)
    runtime.define(spec)
    try:
        runtime.start(name)
        deadline = time.monotonic() + BOOT_TIMEOUT_S
        while runtime.state(name) is not VmState.SHUTOFF:
            assert time.monotonic() < deadline, serial.read_text(errors="replace")[-2000:]
            time.sleep(0.5)
    finally:
        if runtime.state(name) is not VmState.SHUTOFF:
            runtime.destroy(name)
        runtime.undefine(name)
    console = serial.read_text(errors="replace")
    files = read_outputs(work / "disks" / OUTPUTS, work / "out")
    assert {f.path for f in files} == set(expected_outputs(data))
    got = {f.path: (work / "out" / f.path).read_bytes() for f in files}
    assert got == expected_outputs(data), console[-2000:]
    return console, got


def test_an_oci_image_runs_its_command_with_inputs_and_outputs(
    runtime: LibvirtRuntime, boot: image_store.Image, tmp_path: Path
) -> None:
    base = root_folder(tmp_path / "root")
    (base / "app" / "old.txt").write_text("deleted by the next layer\n")
    (base / "data" / "keep").mkdir(parents=True)
    for name in ("a", "b"):
        (base / "data" / "keep" / name).write_text(name)
    app = tmp_path / "app-layer"  # whiteouts are files with OCI's names in a layer
    (app / "app").mkdir(parents=True)
    (app / "app" / ".wh.old.txt").write_text("")
    (app / "data" / "keep").mkdir(parents=True)
    (app / "data" / "keep" / ".wh..wh..opq").write_text("")
    (app / "data" / "keep" / "c").write_text("c")
    settings = RunSettings(cmd=("run.sh",), env=("PATH=/app:/bin",))  # found by PATH
    archive = pack([base, app], tmp_path / "img.tar", settings)
    with ImageLibrary(tmp_path / "store") as library:
        imported = library.import_archive(archive, IDENTITY, "test/job").image
        console, _ = run_job(runtime, boot, library, imported, tmp_path, None)
    assert "hello from the job" in console
    assert "working in /app as hi" in console
    assert "old:gone keep:c," in console  # the whiteout and the opaque folder, in the guest
    assert parse_exit(console) == 3
