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
4. adds the run's console (its serial log, started fresh for every run) to the
   checkpoint as the file ``console``, and computes the run's progress digest
   from it (``segments.progress``): a verifier (``segments.verify``) checks the
   claim against that very file. A guest that powered off leaves a checkpoint
   holding only its console (``powered_off`` says it cannot be restored);
5. removes the domain and the save file: the checkpoint lives on as blocks.

A restore (``rebuild_save_file``) materialises only the save file's parts
(``ram`` and ``rest``, or ``memory``): the console is the previous run's
record, not part of the guest.

It is blocking (libvirt and file I/O); the agent runs it in a worker thread,
and `cancel` (from any thread) stops a replica at its next poll, for losers
that must stop the moment a winner's completion is accepted. `hold` pauses the
guest at the next poll (the volunteer is back; a held guest uses no vCPU time,
so its extent waits) and releases it; `finish_now` ends the segment early with
a checkpoint where the guest is (a sole replica vacating its host).
"""

from __future__ import annotations

import shutil
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

from node.identity import Identity
from segments.blocks import BlockStore
from segments.manifest import Manifest
from segments.progress import console_text, encode_progress
from segments.savestream import SaveStreamError, join, split
from segments.vm import VmError, VmRuntime, VmSpec, VmState

MEMORY_FILE = "memory"  # a checkpoint stored as one raw save file
RAM_FILE, REST_FILE = "ram", "rest"  # a checkpoint split by segments.savestream
CONSOLE_FILE = "console"  # the run's serial log: what the guest printed in the segment
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
    checkpoint: Manifest  # save file parts and console; only the console if powered off
    cpu_s: float
    wall_s: float
    powered_off: bool  # the guest ended (the job is done): the checkpoint is not restorable
    serial_log: Path
    progress: bytes  # segments.progress.encode_progress of the checkpoint's console


def save_file_parts(checkpoint: Manifest) -> tuple[str, ...]:
    """The names of the checkpoint's save file parts: (ram, rest), (memory), or () if none."""
    names = {entry.name for entry in checkpoint.files} - {CONSOLE_FILE}
    if names == {RAM_FILE, REST_FILE}:
        return (RAM_FILE, REST_FILE)
    if names == {MEMORY_FILE}:
        return (MEMORY_FILE,)
    return ()


def rebuild_save_file(
    store: BlockStore, checkpoint: Manifest, save_file: Path, parts: Path
) -> None:
    """Materialise the checkpoint's save file at `save_file` (its console is left out).

    A split checkpoint's ``ram`` and ``rest`` go to directory `parts` and are
    joined into `save_file`; the caller removes both. Raises ReplicaError if
    the checkpoint holds no save file or its parts do not join, and the block
    store's MissingBlock or CorruptBlock if a block is not here intact.
    """
    names = save_file_parts(checkpoint)
    if not names:
        held = ", ".join(sorted(entry.name for entry in checkpoint.files))
        raise ReplicaError(f"checkpoint holds no save file (files: {held})")
    # A view of the manifest with only those files, for materialize alone: its
    # body and signature still describe the whole checkpoint, so it must never
    # be encoded, stored or sent.
    view = replace(checkpoint, files=tuple(e for e in checkpoint.files if e.name in names))
    if names == (MEMORY_FILE,):
        store.materialize(view, save_file)
        return
    parts.mkdir(parents=True, exist_ok=True)
    store.materialize(view, parts)
    try:
        join(parts, save_file)
    except SaveStreamError as exc:
        raise ReplicaError(f"rebuilding the save file: {exc}") from exc


class Replica:
    def __init__(
        self, runtime: VmRuntime, store: BlockStore, identity: Identity, work_dir: Path
    ) -> None:
        self.runtime = runtime
        self.store = store
        self.identity = identity
        self.work_dir = work_dir
        self._cancelled = threading.Event()
        self._held = threading.Event()
        self._finish = threading.Event()

    def cancel(self) -> None:
        self._cancelled.set()

    def hold(self, held: bool) -> None:
        """Pause the guest at the next poll (True) or let it run again (False).

        A held guest uses no vCPU time, so its extent waits for it.
        """
        if held:
            self._held.set()
        else:
            self._held.clear()

    def finish_now(self) -> None:
        """End the segment at the next poll: checkpoint the guest where it is."""
        self._finish.set()

    def run(self, run: SegmentRun, checkpoint: Manifest | None) -> ReplicaResult:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        serial_log = self.work_dir / "serial.log"
        serial_log.unlink(missing_ok=True)  # the console of this run only
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
            manifest = self._checkpoint(name, serial_log, saved=not powered_off)
        except VmError as exc:
            raise ReplicaError(f"segment on {name}: {exc}") from exc
        finally:
            self._clean_up(name)
        try:
            progress = encode_progress(console_text(serial_log.read_bytes()))
        except (OSError, ValueError) as exc:
            raise ReplicaError(f"reading the console of {name}: {exc}") from exc
        return ReplicaResult(
            manifest, cpu_s, time.monotonic() - started, powered_off, serial_log, progress
        )

    def _launch(self, spec: VmSpec, checkpoint: Manifest | None) -> str:
        """Boot or restore; the running domain's name (a checkpoint keeps the name it had)."""
        if checkpoint is None:
            self.runtime.define(spec)
            self.runtime.start(spec.name)
            return spec.name
        save_file = self.work_dir / "restore.save"
        parts = self.work_dir / "restore.parts"
        try:
            rebuild_save_file(self.store, checkpoint, save_file, parts)
            return self.runtime.restore(save_file, local=spec)
        except ReplicaError as exc:
            raise ReplicaError(f"restoring {spec.name}: {exc}") from exc
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
            if used >= run.extent_cpu_s or self._finish.is_set():
                if state is VmState.RUNNING:
                    self.runtime.pause(name)
                return self.runtime.cpu_time_s(name), False
            held = self._held.is_set()
            if held and state is VmState.RUNNING:
                self.runtime.pause(name)  # the volunteer needs the CPU: the guest waits
            elif not held and state is VmState.PAUSED:
                self.runtime.resume(name)
            time.sleep(POLL_S)

    def _confirm_gone(self, name: str) -> VmState | None:
        """A domain missing from a listing: ask for it by name before believing it ended."""
        try:
            return self.runtime.state(name)
        except VmError:
            return None

    def _checkpoint(self, name: str, serial_log: Path, saved: bool) -> Manifest:
        """Save the paused guest (if `saved`) and store its parts with the run's console."""
        save_file = self.work_dir / "checkpoint.save"
        parts = self.work_dir / "checkpoint.parts"
        serial_log.touch()  # a guest that printed nothing has an empty console
        try:
            files: dict[str, Path] = {}
            if saved:
                self.runtime.save(name, save_file)  # QEMU stops: the console is complete
                try:
                    split_result = split(save_file, parts)
                    files = {RAM_FILE: split_result.ram, REST_FILE: split_result.rest}
                except SaveStreamError:
                    # A stream this codec does not know: store it whole (it still
                    # deduplicates, only worse) rather than fail the segment.
                    files = {MEMORY_FILE: save_file}
            files[CONSOLE_FILE] = serial_log
            return self.store.put_files(files, self.identity)
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
