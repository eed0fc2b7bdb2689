"""Checkpoint verification of a real segment under a private libvirtd (QEMU TCG, the demo image).

Segment 0 is run and verified, then forged claims about it; segment 1 from its
checkpoint, verified; a finished job. Timings are printed (``pytest -s``), never
asserted. The verifier's logic on fakes is tests/unit/segments/test_verify.py.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from dataclasses import replace

import pytest
from kit.agents import needs_root
from kit.consoles import boot_console
from kit.vm_lab import PACKAGE_CACHE, RECIPE, figure, one_host

from node.base.identity import Identity
from segments.image import store as image
from segments.image import workload
from segments.store.blocks import BlockStore
from segments.store.manifest import Manifest
from segments.vm.progress import decode_progress, encode_progress
from segments.vm.replica import CONSOLE_FILE, Replica, SegmentRun
from segments.vm.verify import VerifySpec, verify_checkpoint

IDENTITY = Identity.from_seeds(b"\x05" * 32, b"\x06" * 32)
SEED = "glv"
VM = "gl-verify-test"
VERIFY_TIMEOUT_S = 60.0


@needs_root
@pytest.mark.netns
@pytest.mark.vm
@pytest.mark.skipif(shutil.which("libvirtd") is None, reason="needs libvirtd")
def test_real_segment_verifies(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Segment 0, verified; then forged claims; segment 1 from it, verified; a finished job."""
    root = tmp_path_factory.mktemp("glv-verify")
    built = image.build(RECIPE, root / "images", PACKAGE_CACHE)
    cmdline = workload.kernel_cmdline(steps=0, seed=SEED, base=built.cmdline)
    verify_dir = root / "verify"
    spec = VerifySpec(built.kernel, built.initrd, cmdline, built.memory_mb, 1, verify_dir, VM)
    done_cmdline = workload.kernel_cmdline(steps=8, seed=SEED, base=built.cmdline)

    def segment(work: str, extent: float, checkpoint: Manifest | None, line: str = cmdline):
        run = SegmentRun(VM, built.kernel, built.initrd, line, built.memory_mb, 1, extent)
        return Replica(runtime, store, IDENTITY, root / work).run(run, checkpoint)

    def check(result, base: bytes | None, claimed: bytes | None = None, halted: bool = False):
        job = spec if not halted else replace(spec, cmdline=done_cmdline)
        return verify_checkpoint(
            runtime,
            store,
            job,
            result.checkpoint,
            claimed or result.progress,
            base,
            halted,
            VERIFY_TIMEOUT_S,
        )

    with one_host(root) as runtime, contextlib.closing(BlockStore(root / "blocks")) as store:
        first = segment("r0", 5.0, None)
        assert not first.powered_off
        claimed = decode_progress(first.progress)
        assert claimed.step > 0 and claimed.state is not None
        console_before = first.serial_log.read_bytes()

        started = time.monotonic()
        verdict = check(first, None)
        figure("verify_segment_0", time.monotonic() - started)
        print(f"verdict: {verdict}")
        assert verdict.ok, verdict.reason
        assert verdict.new_step == claimed.step + 1
        assert runtime.list_vms() == {}
        assert list(verify_dir.iterdir()) == []
        assert first.serial_log.read_bytes() == console_before  # the replica's log untouched

        one_more = encode_progress(boot_console(SEED, claimed.step + 1))
        verdict = check(first, None, claimed=one_more)
        assert not verdict.ok and "the console shows step" in verdict.reason, verdict.reason
        verdict = check(first, encode_progress(boot_console(SEED, 2)))
        assert not verdict.ok and "started over" in verdict.reason, verdict.reason

        second = segment("r1", 3.0, first.checkpoint)
        assert not second.powered_off
        started = time.monotonic()
        verdict = check(second, first.progress)
        figure("verify_segment_1", time.monotonic() - started)
        print(f"verdict: {verdict}")
        assert verdict.ok, verdict.reason
        assert verdict.new_step == decode_progress(second.progress).step + 1
        verdict = check(second, None)  # segment 1 passed off as segment 0
        assert not verdict.ok and "no gleaner-start" in verdict.reason, verdict.reason
        assert runtime.list_vms() == {}

        done = segment("r2", 600.0, None, done_cmdline)
        assert done.powered_off
        assert [f.name for f in done.checkpoint.files] == [CONSOLE_FILE]
        verdict = check(done, None, halted=True)
        assert verdict.ok, verdict.reason
        assert verdict.new_step == 8
