"""A replica's running guest handed to another host by live migration, on real libvirtd.

Two real libvirtd "hosts" (the ``hosts`` lab of tests/kit/vm_lab.py, QEMU TCG, the
demo image); the destination's checkpoint is verified by restoring it. The same
hand-off on fakes is tests/unit/runtime/test_replica_handoff.py.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import replace
from pathlib import Path

import pytest
from kit.agents import needs_root
from kit.replica import IDENTITY, SEED, VM, log_steps, moved_of, threads, wait_until
from kit.vm_lab import Guest, Lab

from segments.image import workload
from segments.store.blocks import BlockStore
from segments.vm.progress import console_text, encode_progress
from segments.vm.replica import CONSOLE_FILE, Replica, ReplicaResult, SegmentRun, replica_spec
from segments.vm.verify import VerifySpec, verify_checkpoint

real = pytest.mark.skipif(shutil.which("libvirtd") is None, reason="needs libvirtd")
STEP_TIMEOUT_S = 60.0
VERIFY_TIMEOUT_S = 60.0
FAILED_HAND_OFF_EXTENT_S = 12.0


def real_run(guest: Guest, extent: float, tap: str | None) -> SegmentRun:
    return SegmentRun(
        VM, guest.kernel, guest.initrd, guest.cmdline, guest.memory_mb, 1, extent, tap
    )


@needs_root
@pytest.mark.netns
@pytest.mark.vm
@real
def test_real_hand_off_continues_the_console_and_restores(
    hosts: Lab,
    guest: Guest,
    tmp_path: Path,
) -> None:
    store_a, store_b = BlockStore(tmp_path / "blocks-a"), BlockStore(tmp_path / "blocks-b")
    source = Replica(hosts.a.runtime, store_a, IDENTITY, tmp_path / "a")
    dest = Replica(hosts.b.runtime, store_b, IDENTITY, tmp_path / "b")
    rest = real_run(guest, 2.0, "glhtb")
    try:
        with threads(source, dest) as pool:
            adopting = pool.submit(dest.adopt, rest, STEP_TIMEOUT_S)
            running = pool.submit(source.run, real_run(guest, 600.0, "glhta"), None)
            wait_until(lambda: len(log_steps(tmp_path / "a" / "serial.log")) >= 3, STEP_TIMEOUT_S)
            started = time.monotonic()
            source.migrate_to(
                hosts.b.daemon.uri, hosts.b.address, replica_spec(rest, dest.work_dir)
            )
            assert source.migration_done.wait(STEP_TIMEOUT_S)
            print(f"\nFIGURE hand_off_migration = {time.monotonic() - started:.3f} s")
            assert source.migration_error is None
            moved = moved_of(running)
            assert dest.arrived.wait(STEP_TIMEOUT_S)
            dest.set_console_prefix(moved.console)
            result: ReplicaResult = adopting.result(timeout=STEP_TIMEOUT_S)
        assert hosts.a.runtime.list_vms() == {} and hosts.b.runtime.list_vms() == {}
        source_log, dest_log = tmp_path / "a" / "serial.log", tmp_path / "b" / "serial.log"
        assert moved.console == source_log.read_bytes()
        console = store_b.read_file(result.checkpoint, CONSOLE_FILE)
        assert console == moved.console + dest_log.read_bytes()
        assert log_steps(dest_log), "the guest printed on B after the switch-over"
        chain = workload.check_continuity(workload.parse_progress(console_text(console)), SEED)
        print(f"FIGURE steps_on_a = {log_steps(source_log)[-1]}, last = {chain.last_step}")
        assert result.progress == encode_progress(console_text(console))

        spec = VerifySpec(
            guest.kernel, guest.initrd, guest.cmdline, guest.memory_mb, 1, tmp_path / "v", VM
        )
        verdict = verify_checkpoint(
            hosts.a.runtime,
            store_b,
            replace(spec, tap="glhtv"),
            result.checkpoint,
            result.progress,
            None,  # segment 0: the joined console starts at gleaner-start
            False,
            VERIFY_TIMEOUT_S,
        )
        assert verdict.ok, verdict.reason
        assert verdict.new_step == chain.last_step + 1
    finally:
        store_a.close()
        store_b.close()


@needs_root
@pytest.mark.netns
@pytest.mark.vm
@real
def test_real_failed_hand_off_completes_the_segment_here(
    hosts: Lab,
    guest: Guest,
    tmp_path: Path,
) -> None:
    store = BlockStore(tmp_path / "blocks")
    source = Replica(hosts.a.runtime, store, IDENTITY, tmp_path / "a")
    # Boot alone takes 2.5-4 vCPU-s under TCG, more on a loaded machine: the extent
    # leaves room for the migration attempt while the guest is still mid-segment.
    run = real_run(guest, FAILED_HAND_OFF_EXTENT_S, None)
    try:
        with threads(source) as pool:
            running = pool.submit(source.run, run, None)
            serial_log = tmp_path / "a" / "serial.log"
            wait_until(lambda: running.done() or len(log_steps(serial_log)) >= 2, STEP_TIMEOUT_S)
            assert not running.done(), f"the segment ended before its second step: {running}"
            # B's QEMU cannot listen on A's address: the migration fails mid-way
            source.migrate_to(hosts.b.daemon.uri, hosts.a.address, replica_spec(run, tmp_path))
            assert source.migration_done.wait(STEP_TIMEOUT_S)
            print(f"\nfailed hand-off: {source.migration_error}")
            assert source.migration_error and "migrating gl-handoff" in source.migration_error
            result = running.result(timeout=STEP_TIMEOUT_S)
        assert not result.powered_off and result.cpu_s >= FAILED_HAND_OFF_EXTENT_S
        console = store.read_file(result.checkpoint, CONSOLE_FILE)
        workload.check_continuity(workload.parse_progress(console_text(console)), SEED)
        assert hosts.a.runtime.list_vms() == {} and hosts.b.runtime.list_vms() == {}
    finally:
        store.close()
