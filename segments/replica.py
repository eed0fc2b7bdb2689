"""One host's run of one segment: restore (or boot), run the extent, pause, save, chunk.

Theory of operation
-------------------
A segment is measured in guest vCPU-seconds (libvirt's domain CPU time), so a
faster or less loaded host finishes it sooner. A replica:

1. boots the job's image (segment 0), or restores the previous checkpoint:
   its memory save file is materialised from the block store (every block
   verified) and restored with this host's kernel, initrd, serial log and tap
   (``vm.relocated_xml``);
2. lets the guest run until it has used ``extent_cpu_s`` of vCPU time since
   the start or restore (the clock restarts at every restore: it counts the
   QEMU process), or until the guest powers off (the job is done);
3. pauses it at once, saves it, splits the save file into guest RAM laid out
   at guest addresses plus the rest of the stream (segments.savestream: the
   same page always lands in the same block, so the next host fetches only
   what changed) and turns those into a checkpoint: blocks in the store and a
   manifest signed by this node; a restore materialises both and joins them
   back, byte for byte, into the save file;
4. removes the domain and the save file: the checkpoint lives on as blocks.

It is blocking (libvirt and file I/O); the agent runs it in a worker thread,
and `cancel` (from any thread) stops a replica at its next poll, for losers
that must stop the moment a winner's completion is accepted.
"""

from __future__ import annotations

import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from node.identity import Identity
from segments.blocks import BlockStore
from segments.manifest import Manifest
from segments.savestream import SaveStreamError, join, split
from segments.vm import VmError, VmRuntime, VmSpec, VmState

MEMORY_FILE = "memory"  # a checkpoint stored as one raw save file
RAM_FILE, REST_FILE = "ram", "rest"  # a checkpoint split by segments.savestream
POLL_S = 0.1
BOOT_TIMEOUT_S = 120.0


class ReplicaError(Exception):
    """The replica could not run its segment; the message says where it failed."""


class ReplicaCancelled(ReplicaError):
    """Stopped on request (another replica won)."""


@dataclass(frozen=True, slots=True)
class SegmentRun:
    """What a replica needs to run one segment of one job."""

    vm_name: str
    kernel: Path
    initrd: Path
    cmdline: str
    memory_mb: int
    vcpus: int
    extent_cpu_s: float
    tap: str | None = None


@dataclass(frozen=True, slots=True)
class ReplicaResult:
    checkpoint: Manifest | None  # None when the guest powered off (the job is done)
    cpu_s: float
    wall_s: float
    powered_off: bool
    serial_log: Path


class Replica:
    def __init__(
        self, runtime: VmRuntime, store: BlockStore, identity: Identity, work_dir: Path
    ) -> None:
        self.runtime = runtime
        self.store = store
        self.identity = identity
        self.work_dir = work_dir
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        self._cancelled.set()

    def run(self, run: SegmentRun, checkpoint: Manifest | None) -> ReplicaResult:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        serial_log = self.work_dir / "serial.log"
        spec = VmSpec(
            name=run.vm_name,
            kernel=run.kernel,
            initrd=run.initrd,
            cmdline=run.cmdline,
            serial_log=serial_log,
            memory_mb=run.memory_mb,
            vcpus=run.vcpus,
            tap=run.tap,
        )
        started = time.monotonic()
        name = run.vm_name
        try:
            name = self._launch(spec, checkpoint)
            cpu_s, powered_off = self._run_extent(run, name)
            manifest = None if powered_off else self._checkpoint(name)
        except VmError as exc:
            raise ReplicaError(f"segment on {name}: {exc}") from exc
        finally:
            self._clean_up(name)
        return ReplicaResult(manifest, cpu_s, time.monotonic() - started, powered_off, serial_log)

    def _launch(self, spec: VmSpec, checkpoint: Manifest | None) -> str:
        """Boot or restore; the running domain's name (a checkpoint keeps the name it had)."""
        if checkpoint is None:
            self.runtime.define(spec)
            self.runtime.start(spec.name)
            return spec.name
        save_file = self.work_dir / "restore.save"
        parts = self.work_dir / "restore.parts"
        try:
            if {entry.name for entry in checkpoint.files} == {RAM_FILE, REST_FILE}:
                parts.mkdir(exist_ok=True)
                self.store.materialize(checkpoint, parts)
                join(parts, save_file)
            else:
                self.store.materialize(checkpoint, save_file)
            return self.runtime.restore(save_file, local=spec)
        except SaveStreamError as exc:
            raise ReplicaError(f"rebuilding the save file of {spec.name}: {exc}") from exc
        finally:
            save_file.unlink(missing_ok=True)
            shutil.rmtree(parts, ignore_errors=True)

    def _run_extent(self, run: SegmentRun, name: str) -> tuple[float, bool]:
        """Run until the guest used its vCPU extent (then pause) or powered off."""
        used = 0.0
        while True:
            if self._cancelled.is_set():
                raise ReplicaCancelled(f"segment on {name} cancelled")
            state = self.runtime.list_vms().get(name)
            if state is None:
                state = self._confirm_gone(name)
            if state not in (VmState.RUNNING, VmState.PAUSED):
                return used, True  # powered off: gone (transient) or shut off (defined)
            used = self.runtime.cpu_time_s(name)
            if used >= run.extent_cpu_s:
                self.runtime.pause(name)
                return self.runtime.cpu_time_s(name), False
            time.sleep(POLL_S)

    def _confirm_gone(self, name: str) -> VmState | None:
        """A domain missing from a listing: ask for it by name before believing it ended."""
        try:
            return self.runtime.state(name)
        except VmError:
            return None

    def _checkpoint(self, name: str) -> Manifest:
        save_file = self.work_dir / "checkpoint.save"
        parts = self.work_dir / "checkpoint.parts"
        try:
            self.runtime.save(name, save_file)
            try:
                split_result = split(save_file, parts)
            except SaveStreamError:
                # A stream this codec does not know: store it whole (it still
                # deduplicates, only worse) rather than fail the segment.
                return self.store.put_files({MEMORY_FILE: save_file}, self.identity)
            return self.store.put_files(
                {RAM_FILE: split_result.ram, REST_FILE: split_result.rest}, self.identity
            )
        finally:
            save_file.unlink(missing_ok=True)
            shutil.rmtree(parts, ignore_errors=True)

    def _clean_up(self, name: str) -> None:
        vms = self.runtime.list_vms()
        if name not in vms:
            return
        try:
            if vms[name] in (VmState.RUNNING, VmState.PAUSED, VmState.SHUTTING_DOWN):
                self.runtime.destroy(name)
        except VmError:
            pass
        try:
            self.runtime.undefine(name)
        except VmError:
            pass
