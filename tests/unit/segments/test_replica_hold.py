"""A replica's guest can be held (the volunteer is back) and ended early (vacating)."""

from __future__ import annotations

from pathlib import Path

from node.base.identity import Identity
from segments.image import workload
from segments.store.blocks import BlockStore
from segments.vm.fake import FakeVmRuntime
from segments.vm.replica import Replica, SegmentRun
from segments.vm.runtime import VmState

IDENTITY = Identity.from_seeds(b"\x07" * 32, b"\x08" * 32)


class ScriptedFake(FakeVmRuntime):
    """Each vCPU-time reading advances running guests by `tick`, then runs `script[n]`."""

    def __init__(self, tick: float, script: dict) -> None:
        super().__init__()
        self.tick, self.script, self.readings = tick, script, 0
        self.states: list[VmState] = []

    def cpu_time_s(self, name: str) -> float:
        self.advance(self.tick, name)
        self.readings += 1
        self.states.append(self.domains[name].state)
        action = self.script.get(self.readings)
        if action is not None:
            action()
        return super().cpu_time_s(name)


def run_of(tmp_path: Path, extent: float) -> SegmentRun:
    for name in ("vmlinuz", "initrd.img"):
        (tmp_path / name).write_bytes(b"x")
    return SegmentRun(
        vm_name="gl-hold",
        kernel=tmp_path / "vmlinuz",
        initrd=tmp_path / "initrd.img",
        cmdline=workload.kernel_cmdline(steps=0, seed="s"),
        memory_mb=96,
        vcpus=1,
        extent_cpu_s=extent,
    )


def test_a_held_guest_pauses_uses_no_extent_and_runs_on_when_released(tmp_path):
    store = BlockStore(tmp_path / "blocks")
    replica = Replica.__new__(Replica)  # bound below; the script needs the object first
    script = {2: lambda: replica.hold(True), 8: lambda: replica.hold(False)}
    runtime = ScriptedFake(0.25, script)
    Replica.__init__(replica, runtime, store, IDENTITY, tmp_path / "work")
    result = replica.run(run_of(tmp_path, 1.0), None)
    store.close()
    paused = [i for i, s in enumerate(runtime.states) if s is VmState.PAUSED]
    assert paused, "the guest was paused while held"
    resumed = [i for i, s in enumerate(runtime.states) if s is VmState.RUNNING and i > paused[0]]
    assert resumed, "and running again once released"
    assert not result.powered_off and result.cpu_s >= 1.0  # the whole extent, none while held
    running = len(runtime.states) - len(paused)
    assert running == 4, "1.0 vCPU-s in 0.25 s ticks: only the running readings counted"


def test_finish_now_checkpoints_before_the_extent(tmp_path):
    store = BlockStore(tmp_path / "blocks")
    replica = Replica.__new__(Replica)
    runtime = ScriptedFake(0.25, {3: lambda: replica.finish_now()})
    Replica.__init__(replica, runtime, store, IDENTITY, tmp_path / "work")
    result = replica.run(run_of(tmp_path, 100.0), None)
    store.close()
    assert not result.powered_off
    assert result.cpu_s < 100.0, "ended early"
    assert result.checkpoint.files, "with a checkpoint of where the guest was"
    assert runtime.list_vms() == {}
