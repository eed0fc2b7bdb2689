"""A replica's running guest handed to another host by live migration (issue 6).

The source's ``Replica.run`` migrates its guest at ``migrate_to`` and ends with
``ReplicaMigrated``; the destination's ``Replica.adopt`` waits for it, runs the
rest of the extent and checkpoints the whole segment's console (the source's,
then its own). The logic runs on ``ChainFake``s (tests/kit/replica.py: fakes whose
guest prints the demo chain, one step per vCPU-time reading, into whatever serial
log its domain has now); the service plumbing on the same fakes. The hand-off on
two real libvirtd hosts is tests/testbed/test_replica_handoff_vm.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import trio
from kit.replica import (
    IDENTITY,
    SEED,
    VM,
    WAIT_S,
    ChainFake,
    fake_host_service,
    log_steps,
    moved_of,
    threads,
    wait_until,
)

from node.runtime.replica_orders import ReplicaOrder, parse_destination_spec
from node.runtime.segment_service import SegmentError, SegmentMigrated, SegmentService
from segments.image import workload
from segments.store.blocks import BlockStore
from segments.vm import replica as replica_module
from segments.vm.fake import FakeMigration
from segments.vm.progress import console_text, decode_progress, encode_progress
from segments.vm.replica import (
    CONSOLE_FILE,
    Replica,
    ReplicaCancelled,
    ReplicaError,
    ReplicaResult,
    SegmentRun,
    replica_spec,
)
from segments.vm.runtime import VmSpec, VmState

ADDRESS_B = "198.51.100.222"


# -- two hosts on fakes ---------------------------------------------------------------------


def run_of(tmp_path: Path, extent: float, tap: str | None = None) -> SegmentRun:
    for name in ("vmlinuz", "initrd.img"):
        (tmp_path / name).write_bytes(b"x")
    return SegmentRun(
        vm_name=VM,
        kernel=tmp_path / "vmlinuz",
        initrd=tmp_path / "initrd.img",
        cmdline=workload.kernel_cmdline(steps=0, seed=SEED),
        memory_mb=96,
        vcpus=1,
        extent_cpu_s=extent,
        tap=tap,
    )


@pytest.fixture
def fast_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(replica_module, "POLL_S", 0.005)


@pytest.fixture
def pair(tmp_path: Path, fast_polls: None) -> Iterator[SimpleNamespace]:
    """Hosts A and B as fakes sharing a registry and the guests' chain, with block stores."""
    registry: dict = {}
    chain: dict[str, int] = {}
    made = SimpleNamespace(
        a=ChainFake("fake:///a", registry, chain),
        b=ChainFake("fake:///b", registry, chain),
        store_a=BlockStore(tmp_path / "blocks-a"),
        store_b=BlockStore(tmp_path / "blocks-b"),
    )
    try:
        yield made
    finally:
        made.store_a.close()
        made.store_b.close()


# -- the hand-off, on fakes -------------------------------------------------------------------


@pytest.mark.parametrize("held", [False, True], ids=["running", "held"])
def test_a_guest_handed_off_mid_extent_goes_on_at_the_destination(
    tmp_path: Path, pair: SimpleNamespace, held: bool
) -> None:
    source = Replica(pair.a, pair.store_a, IDENTITY, tmp_path / "a")
    dest = Replica(pair.b, pair.store_b, IDENTITY, tmp_path / "b")
    run = run_of(tmp_path, extent=100.0)
    rest = replace(run, extent_cpu_s=0.5)
    with threads(source, dest) as pool:
        adopting = pool.submit(dest.adopt, rest, WAIT_S)
        running = pool.submit(source.run, run, None)
        wait_until(lambda: len(log_steps(tmp_path / "a" / "serial.log")) >= 5)
        if held:  # a held guest is resumed to go: one arriving paused is not "arrived"
            source.hold(True)
            wait_until(lambda: pair.a.list_vms().get(VM) is VmState.PAUSED)
        target = replica_spec(rest, tmp_path / "b")
        source.migrate_to("fake:///b", ADDRESS_B, target)
        assert source.migration_done.wait(WAIT_S)
        assert source.migration_error is None
        moved = moved_of(running)
        assert dest.arrived.wait(WAIT_S) and dest.arrived_at is not None
        dest.set_console_prefix(moved.console)
        result: ReplicaResult = adopting.result(timeout=WAIT_S)

    source_log, dest_log = tmp_path / "a" / "serial.log", tmp_path / "b" / "serial.log"
    assert moved.console == source_log.read_bytes()  # everything the guest printed on A
    assert moved.cpu_s > 0
    assert pair.a.migrations == [FakeMigration(VM, "fake:///b", ADDRESS_B, target)]
    assert pair.a.list_vms() == {} and pair.b.list_vms() == {}
    assert not result.powered_off and result.cpu_s >= 0.5  # B's clock: from arrival
    console = pair.store_b.read_file(result.checkpoint, CONSOLE_FILE)
    assert console == source_log.read_bytes() + dest_log.read_bytes()
    assert log_steps(dest_log)[0] == log_steps(source_log)[-1] + 1  # no gap at the switch
    chain = workload.check_continuity(workload.parse_progress(console_text(console)), SEED)
    assert result.progress == encode_progress(console_text(console))
    assert decode_progress(result.progress).step == chain.last_step
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["serial.log"]

    restored = Replica(pair.a, pair.store_b, IDENTITY, tmp_path / "c").run(
        replace(run, extent_cpu_s=0.3), result.checkpoint
    )
    assert log_steps(restored.serial_log)[0] == chain.last_step + 1


def test_a_failed_migration_leaves_the_guest_running_here(
    tmp_path: Path, pair: SimpleNamespace
) -> None:
    source = Replica(pair.a, pair.store_a, IDENTITY, tmp_path / "a")
    run = run_of(tmp_path, extent=2.0)
    with threads(source) as pool:
        running = pool.submit(source.run, run, None)
        wait_until(lambda: len(log_steps(tmp_path / "a" / "serial.log")) >= 3)
        source.migrate_to("fake:///nowhere", ADDRESS_B, replica_spec(run, tmp_path / "b"))
        assert source.migration_done.wait(WAIT_S)
        assert "no such destination" in (source.migration_error or "")
        result = running.result(timeout=WAIT_S)
    assert not result.powered_off and result.cpu_s >= 2.0  # the whole extent, here
    console = pair.store_a.read_file(result.checkpoint, CONSOLE_FILE)
    workload.check_continuity(workload.parse_progress(console_text(console)), SEED)
    assert pair.a.migrations == [] and pair.a.list_vms() == {} and pair.b.list_vms() == {}


def test_migration_requests_are_one_at_a_time_and_settled_when_the_run_ends(
    tmp_path: Path, pair: SimpleNamespace
) -> None:
    source = Replica(pair.a, pair.store_a, IDENTITY, tmp_path / "a")
    run = run_of(tmp_path, extent=0.5)
    target = replica_spec(run, tmp_path / "b")
    source.migrate_to("fake:///b", ADDRESS_B, target)  # before the run: served at its first poll
    with pytest.raises(ReplicaError, match="already migrating"):
        source.migrate_to("fake:///b", ADDRESS_B, target)
    source.finish_now()  # ... but the run ends first (a checkpoint wins over a migration)
    result = source.run(run, None)
    assert result.checkpoint.files
    assert source.migration_done.is_set()
    assert source.migration_error == "the segment ended before the guest could migrate"
    with pytest.raises(ReplicaError, match="has ended"):
        source.migrate_to("fake:///b", ADDRESS_B, target)


def test_adopt_waits_for_a_running_guest_and_leaves_nothing_if_none_comes(
    tmp_path: Path, pair: SimpleNamespace
) -> None:
    dest = Replica(pair.b, pair.store_b, IDENTITY, tmp_path / "b")
    run = run_of(tmp_path, extent=0.2)
    with pytest.raises(
        ReplicaError, match=f"adopting {VM}: it did not arrive running within 0.2 s"
    ):
        dest.adopt(run, 0.2)
    assert not dest.arrived.is_set() and not (tmp_path / "b").exists()

    # An incoming migration shows paused until its switch-over: not arrived, and removed
    (tmp_path / "b").mkdir()
    pair.b.define(replica_spec(run, tmp_path / "b"))
    pair.b.start(VM)
    pair.b.pause(VM)
    dest = Replica(pair.b, pair.store_b, IDENTITY, tmp_path / "b")
    with pytest.raises(ReplicaError, match="did not arrive"):
        dest.adopt(run, 0.2)
    assert pair.b.list_vms() == {} and not (tmp_path / "b").exists()


def test_a_paused_arrival_counts_once_it_runs(tmp_path: Path, pair: SimpleNamespace) -> None:
    run = run_of(tmp_path, extent=0.2)
    pair.b.define(replica_spec(run, tmp_path / "b"))
    pair.b.start(VM)  # (prints gleaner-start: the fake's guest "booted" here)
    pair.b.pause(VM)
    dest = Replica(pair.b, pair.store_b, IDENTITY, tmp_path / "b")
    with threads(dest) as pool:
        adopting = pool.submit(dest.adopt, run, WAIT_S)
        time.sleep(0.1)
        assert not dest.arrived.is_set()
        pair.b.resume(VM)
        assert dest.arrived.wait(WAIT_S)
        dest.set_console_prefix(b"before\r\n")
        result = adopting.result(timeout=WAIT_S)
    console = pair.store_b.read_file(result.checkpoint, CONSOLE_FILE)
    assert console.startswith(b"before\r\ngleaner-start 0 glv\r\ngleaner-progress 1 ")
    with pytest.raises(ReplicaError, match="already has a console prefix"):
        dest.set_console_prefix(b"another")


def test_adopt_fails_clearly_without_the_sources_console(
    tmp_path: Path, pair: SimpleNamespace
) -> None:
    run = run_of(tmp_path, extent=0.2)
    pair.b.define(replica_spec(run, tmp_path / "b"))
    pair.b.start(VM)
    dest = Replica(pair.b, pair.store_b, IDENTITY, tmp_path / "b")
    with pytest.raises(ReplicaError, match=f"adopted {VM}: the source's console did not come"):
        dest.adopt(run, WAIT_S, console_prefix_timeout_s=0.1)
    assert pair.b.list_vms() == {}
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["serial.log"]


def test_adopt_can_be_cancelled_held_and_finished_early(
    tmp_path: Path, pair: SimpleNamespace
) -> None:
    run = run_of(tmp_path, extent=100.0)
    dest = Replica(pair.b, pair.store_b, IDENTITY, tmp_path / "b")
    dest.cancel()
    with pytest.raises(ReplicaCancelled, match="cancelled before it arrived"):
        dest.adopt(run, WAIT_S)

    pair.b.define(replica_spec(run, tmp_path / "b"))
    pair.b.start(VM)
    dest = Replica(pair.b, pair.store_b, IDENTITY, tmp_path / "b")
    dest.set_console_prefix(b"")
    with threads(dest) as pool:
        adopting = pool.submit(dest.adopt, run, WAIT_S)
        assert dest.arrived.wait(WAIT_S)
        dest.hold(True)
        wait_until(lambda: pair.b.list_vms().get(VM) is VmState.PAUSED)
        dest.finish_now()
        result = adopting.result(timeout=WAIT_S)
    assert not result.powered_off and result.cpu_s < 100.0 and result.checkpoint.files


# -- the service's plumbing, on fakes -----------------------------------------------------------


def order_of(adopt: bool, extent: float) -> ReplicaOrder:
    return ReplicaOrder(
        name="handoff",
        segment=3,
        image_id="0" * 64,
        args=workload.kernel_cmdline(steps=0, seed=SEED, base=""),
        vcpus=1,
        extent_cpu_s=extent,
        tap="glhtap0",
        adopt=adopt,
        arrival_timeout_s=WAIT_S,
    )


async def wait_for(condition: Callable[[], bool], timeout_s: float = WAIT_S) -> None:
    with trio.fail_after(timeout_s):
        while not condition():
            await trio.sleep(0.01)


def test_the_service_hands_a_replica_off_and_adopts_it(
    tmp_path: Path, pair: SimpleNamespace
) -> None:
    stub = SimpleNamespace(
        kernel=tmp_path / "vmlinuz", initrd=tmp_path / "initrd.img", cmdline="", memory_mb=96
    )
    host_a = fake_host_service(tmp_path, "a", pair.a, stub)
    host_b = fake_host_service(tmp_path, "b", pair.b, stub)
    outcome: dict[str, Any] = {}

    async def run_on(host: SegmentService, order: ReplicaOrder) -> None:
        try:
            outcome[order.adopt] = await host.run_replica(order, None, [])
        except SegmentError as exc:
            outcome[order.adopt] = exc

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_on, host_b, order_of(True, 0.5))
            nursery.start_soon(run_on, host_a, order_of(False, 100.0))
            await wait_for(lambda: VM in host_a.replicas and VM in host_b.replicas)
            with pytest.raises(SegmentError, match="no replica of gl-nobody runs here"):
                await host_a.migrate_replica("gl-nobody", "fake:///b", ADDRESS_B, {})
            assert await host_a.cpu_time_s(VM) > 0

            fields = await host_b.destination_spec(order_of(True, 0.5))
            assert fields == {
                "kernel": str(tmp_path / "vmlinuz"),
                "initrd": str(tmp_path / "initrd.img"),
                "serial_log": str(tmp_path / "b" / "replicas" / "handoff-3-0" / "serial.log"),
                "tap": "glhtap0",
            }
            bad = await host_a.migrate_replica(VM, "fake:///b", ADDRESS_B, {**fields, "x": 1})
            assert bad is not None and "unknown 'x'" in bad  # a peer's bad map: a failure
            assert await host_a.migrate_replica(VM, "fake:///b", ADDRESS_B, fields) is None
            await wait_for(lambda: False in outcome)
            moved = outcome[False]
            assert isinstance(moved, SegmentMigrated), moved
            with pytest.raises(ValueError, match="a console is bytes, not str"):
                host_b.set_console_prefix(VM, "text")  # type: ignore[arg-type]
            host_b.set_console_prefix(VM, moved.console)

    trio.run(main)
    moved, adopted = outcome[False], outcome[True]
    assert moved.cpu_s > 0 and moved.console.startswith(b"gleaner-start 0 glv\r\n")
    assert not isinstance(adopted, Exception), adopted
    console = host_b.store.read_file(adopted.result.checkpoint, CONSOLE_FILE)
    for host in (host_a, host_b):
        host.close()
    assert console.startswith(moved.console) and len(console) > len(moved.console)
    workload.check_continuity(workload.parse_progress(console_text(console)), SEED)
    assert pair.a.migrations[0].dest is not None and pair.a.migrations[0].dest.tap == "glhtap0"
    assert host_a.runs == 0 and host_b.runs == 1


GOOD = {"kernel": "/k", "initrd": "/i", "serial_log": "/w/serial.log", "tap": "gl0"}


def test_a_destination_spec_round_trips() -> None:
    assert parse_destination_spec(VM, GOOD) == VmSpec(
        VM, Path("/k"), Path("/i"), "", Path("/w/serial.log"), tap="gl0"
    )
    assert parse_destination_spec(VM, {**GOOD, "tap": None}).tap is None


@pytest.mark.parametrize(
    ("fields", "complaint"),
    [
        ([1], "a map, not list"),
        ({"kernel": "/k"}, "missing initrd, serial_log, tap"),
        ({**GOOD, "extra": 1}, "unknown 'extra'"),
        ({**GOOD, "kernel": b"/k"}, "'kernel' must be a path \\(a string\\), not bytes"),
        ({**GOOD, "initrd": "relative/i"}, "'initrd' must be an absolute path"),
        ({**GOOD, "serial_log": "/" + "x" * 5000}, "'serial_log' must be an absolute path"),
        ({**GOOD, "serial_log": "/w/\nlog"}, "must be printable"),
        ({**GOOD, "kernel": "/w/../etc/k"}, "without '..'"),
        ({**GOOD, "tap": "a-tap-name-too-long"}, "'tap' must be an interface name"),
        ({**GOOD, "tap": "tap/0"}, "'tap' must be an interface name"),
        ({**GOOD, "tap": ".."}, "'tap' must be an interface name"),
        ({**GOOD, "tap": 7}, "'tap' must be an interface name"),
    ],
)
def test_a_bad_destination_spec_is_a_value_error(fields: object, complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint):
        parse_destination_spec(VM, fields)
