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
   at guest addresses plus the rest of the stream (segments.vm.savestream: the
   same page always lands in the same block, so the next host fetches only
   what changed) and turns those into a checkpoint: blocks in the store and a
   manifest signed by this node; a restore materialises both and joins them
   back, byte for byte, into the save file;
4. adds the run's console (its serial log, started fresh for every run) to the
   checkpoint as the file ``console``, and computes the run's progress digest
   from it (``segments.vm.progress``): a verifier (``segments.vm.verify``) checks the
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

Handing a running guest to another host (a draining host, issue 6)
-------------------------------------------------------------------
Instead of a checkpoint, a host H that must leave can live-migrate its guest
to a destination D, which runs the rest of the extent and checkpoints it:

* D calls ``adopt`` (before H is told to go): instead of booting or restoring,
  it waits for the domain to arrive *running* (an incoming migration shows as
  paused until its switch-over), sets ``arrived``, then runs the extent (the
  vCPU clock restarts at arrival: the QEMU process is new), pauses, saves and
  checkpoints as ``run`` does. D's files for the guest are ``replica_spec``'s
  (its serial log is ``work_dir / "serial.log"``); H needs them to relocate
  the domain.
* ``migrate_to`` (from any thread) asks H's run loop to migrate at its next
  poll, in the replica's own thread. A held guest is resumed first (a paused
  domain would arrive paused, which D cannot tell from one still arriving).
  On success the domain is gone from H and ``run`` ends with
  ``ReplicaMigrated``, carrying H's console (complete: the source QEMU has
  stopped) and the vCPU time used here until the migration began. On failure
  the guest keeps running on H and the extent goes on; ``migration_error``
  says why. Either way ``migration_done`` is set, also when the run ends
  before it could migrate.
* A checkpoint's console is the whole segment's: D waits (bounded) for H's
  console through ``set_console_prefix`` and stores H's console followed by
  its own serial log; the progress digest is computed on that joined console.
"""

from __future__ import annotations

import contextlib
import shutil
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

from node.base.identity import Identity
from segments.store.blocks import BlockStore
from segments.store.manifest import Manifest
from segments.vm.progress import console_text, encode_progress
from segments.vm.runtime import Disk, VmError, VmRuntime, VmSpec, VmState
from segments.vm.savestream import SaveStreamError, join, split

MEMORY_FILE = "memory"  # a checkpoint stored as one raw save file
RAM_FILE, REST_FILE = "ram", "rest"  # a checkpoint split by segments.vm.savestream
CONSOLE_FILE = "console"  # the run's serial log: what the guest printed in the segment
DISK_PREFIX = "disk-"  # disk-N: the guest's N-th disk (writable ones only), as the save left it
SERIAL_LOG = "serial.log"  # in the work dir: the guest's console on this host
POLL_S = 0.1
ARRIVAL_POLL_S = 0.005  # one libvirt listing each, only while a migrating guest arrives
BOOT_TIMEOUT_S = 120.0
CONSOLE_PREFIX_TIMEOUT_S = 30.0  # an adopting replica's wait for the source's console


class ReplicaError(Exception):
    """The replica could not run its segment; the message says where it failed."""


class CheckpointDiskError(ReplicaError):
    """A checkpoint's disks are not the ones the run has: other names or sizes."""


class ReplicaCancelled(ReplicaError):
    """Stopped on request (another replica won)."""


class ReplicaMigrated(ReplicaError):
    """The guest was live-migrated away (``Replica.migrate_to``): no checkpoint here.

    ``console`` is everything the guest printed on this host (for an adopted
    guest, the earlier hosts' console too); ``cpu_s`` the vCPU time it used here.
    """

    def __init__(
        self, message: str, console: bytes, cpu_s: float, downtime_ms: float = -1.0
    ) -> None:
        super().__init__(message)
        self.console = console
        self.cpu_s = cpu_s
        self.downtime_ms = downtime_ms  # libvirt's figure for the switch-over; -1: none


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
    disks: tuple[Disk, ...] = ()  # this host's files; the writable ones travel in checkpoints


@dataclass(frozen=True, slots=True)
class ReplicaResult:
    checkpoint: Manifest  # save file parts, console, writable disks; no save if powered off
    cpu_s: float
    wall_s: float
    powered_off: bool  # the guest ended (the job is done): the checkpoint is not restorable
    serial_log: Path
    progress: bytes  # segments.vm.progress.encode_progress of the checkpoint's console


@dataclass(frozen=True, slots=True)
class _MigrationRequest:
    dest_uri: str
    dest_address: str
    dest: VmSpec


def replica_spec(run: SegmentRun, work_dir: Path) -> VmSpec:
    """The VM a replica in `work_dir` runs: also the destination spec a source migrates onto."""
    return VmSpec(
        name=run.vm_name,
        kernel=run.kernel,
        initrd=run.initrd,
        cmdline=run.cmdline,
        serial_log=work_dir / SERIAL_LOG,
        memory_mb=run.memory_mb,
        vcpus=run.vcpus,
        tap=run.tap,
        disks=run.disks,
    )


def disk_files(disks: tuple[Disk, ...]) -> dict[str, Path]:
    """A checkpoint's disk files by name: ``disk-N`` for each writable disk N."""
    return {f"{DISK_PREFIX}{n}": disk.path for n, disk in enumerate(disks) if not disk.read_only}


def restore_disks(
    store: BlockStore,
    checkpoint: Manifest,
    disks: tuple[Disk, ...],
    sizes_of: tuple[Disk, ...] | None = None,
) -> None:
    """Put the checkpoint's disk contents into this host's disk files (each whole, atomically).

    Each must have the size this host gave that disk: the size of its file in
    `sizes_of` (default: `disks`, as prepared). Raises ReplicaError if the
    checkpoint's disks are not the ones `disks` expects, or not their sizes
    (CheckpointDiskError: the checkpoint's fault), or a file here is missing.
    """
    held = {entry.name for entry in checkpoint.files if entry.name.startswith(DISK_PREFIX)}
    wanted = disk_files(disks)
    if held != set(wanted):
        raise CheckpointDiskError(f"checkpoint has disks {sorted(held)}, this run {sorted(wanted)}")
    prepared = disk_files(sizes_of if sizes_of is not None else disks)
    for name, path in wanted.items():
        entry = checkpoint.file(name)
        try:
            size = prepared[name].stat().st_size
        except OSError as exc:
            raise ReplicaError(f"this host's disk {name}: {exc}") from exc
        if entry.size != size:
            raise CheckpointDiskError(
                f"checkpoint's {name} is {entry.size} bytes, this run's {size}"
            )
        store.materialize(replace(checkpoint, files=(entry,)), path)


def save_file_parts(checkpoint: Manifest) -> tuple[str, ...]:
    """The names of the checkpoint's save file parts: (ram, rest), (memory), or () if none."""
    names = {e.name for e in checkpoint.files if not e.name.startswith(DISK_PREFIX)} - {
        CONSOLE_FILE
    }
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
        self._lock = threading.Lock()  # guards the migration request and the console prefix
        self._migration: _MigrationRequest | None = None
        self._ended = False
        # migrate_to's outcome: done is set once the request was carried out or
        # failed; the error says why it failed (None: the guest left).
        self.migration_done = threading.Event()
        self.migration_error: str | None = None
        self.arrived = threading.Event()  # adopt: the guest runs here
        self.arrived_at: float | None = None  # adopt: when it arrived (wall clock, time.time())
        self._console_prefix: bytes | None = None
        self._prefix_set = threading.Event()

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

    def migrate_to(self, dest_uri: str, dest_address: str, dest: VmSpec) -> None:
        """Live-migrate the guest to `dest_uri` at the next poll (see the module docstring).

        Returns at once; ``migration_done`` is set when it was done or failed
        (``migration_error``). ReplicaError if one is under way or the run ended.
        """
        with self._lock:
            if self._ended:
                raise ReplicaError(f"replica in {self.work_dir} has ended: nothing to migrate")
            if self._migration is not None:
                raise ReplicaError(f"replica in {self.work_dir} is already migrating")
            self.migration_error = None
            self.migration_done.clear()
            self._migration = _MigrationRequest(dest_uri, dest_address, dest)

    def set_console_prefix(self, data: bytes) -> None:
        """The console the guest printed before it arrived here (adopt mode), from its source.

        The first one counts; ReplicaError if a different one comes after it.
        """
        data = bytes(data)
        with self._lock:
            if self._console_prefix is not None and self._console_prefix != data:
                raise ReplicaError(f"replica in {self.work_dir} already has a console prefix")
            self._console_prefix = data
        self._prefix_set.set()

    def run(self, run: SegmentRun, checkpoint: Manifest | None) -> ReplicaResult:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        spec = replica_spec(run, self.work_dir)
        spec.serial_log.unlink(missing_ok=True)  # the console of this run only
        started = time.monotonic()
        name = run.vm_name
        try:
            name = self._launch(spec, checkpoint)
            return self._run_and_checkpoint(run, name, spec.serial_log, started, None)
        finally:
            self._end_run()
            self._clean_up(name)

    def adopt(
        self,
        run: SegmentRun,
        arrival_timeout_s: float,
        console_prefix_timeout_s: float = CONSOLE_PREFIX_TIMEOUT_S,
    ) -> ReplicaResult:
        """Run the rest of a segment whose guest is live-migrating here (module docstring).

        Call it before the source is told to migrate. ReplicaError if the guest
        does not arrive running within `arrival_timeout_s` (whatever arrived of
        it is removed), or if the source's console (``set_console_prefix``) has
        not come `console_prefix_timeout_s` after the extent ended.
        """
        self.work_dir.mkdir(parents=True, exist_ok=True)
        serial_log = replica_spec(run, self.work_dir).serial_log
        name = run.vm_name
        arrived = False
        try:
            if self.runtime.list_vms().get(name) is None:
                serial_log.unlink(missing_ok=True)  # (an arriving guest may already write it)
            self._wait_for_arrival(name, arrival_timeout_s)
            arrived = True
            started = time.monotonic()
            return self._run_and_checkpoint(
                run, name, serial_log, started, console_prefix_timeout_s
            )
        except VmError as exc:
            raise ReplicaError(f"adopting {name}: {exc}") from exc
        finally:
            self._end_run()
            self._clean_up(name)
            if not arrived:  # leave nothing behind
                serial_log.unlink(missing_ok=True)
                with contextlib.suppress(OSError):
                    self.work_dir.rmdir()

    def _run_and_checkpoint(
        self,
        run: SegmentRun,
        name: str,
        serial_log: Path,
        started: float,
        prefix_timeout_s: float | None,
    ) -> ReplicaResult:
        """Run the extent and checkpoint it; with `prefix_timeout_s`, after the source's console."""
        prefix = None
        try:
            try:
                cpu_s, powered_off = self._run_extent(run, name, serial_log)
            except ReplicaMigrated as moved:
                if prefix_timeout_s is None:
                    raise
                prefix = self._wait_for_prefix(name, prefix_timeout_s)
                raise ReplicaMigrated(
                    str(moved), prefix + moved.console, moved.cpu_s, moved.downtime_ms
                ) from None
            if prefix_timeout_s is not None:
                prefix = self._wait_for_prefix(name, prefix_timeout_s)
            manifest, console = self._checkpoint(
                name, serial_log, not powered_off, prefix, run.disks
            )
        except VmError as exc:
            raise ReplicaError(f"segment on {name}: {exc}") from exc
        try:
            progress = encode_progress(console_text(console))
        except ValueError as exc:
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
            restore_disks(self.store, checkpoint, spec.disks)
            return self.runtime.restore(save_file, local=spec)
        except ReplicaError as exc:
            raise ReplicaError(f"restoring {spec.name}: {exc}") from exc
        except VmError as exc:
            raise ReplicaError(f"segment on {spec.name}: {exc}") from exc
        finally:
            save_file.unlink(missing_ok=True)
            shutil.rmtree(parts, ignore_errors=True)

    def _wait_for_arrival(self, name: str, timeout_s: float) -> None:
        """Poll until `name` runs here (a paused one is still arriving); set ``arrived``."""
        deadline = time.monotonic() + timeout_s
        while self.runtime.list_vms().get(name) is not VmState.RUNNING:
            if self._cancelled.is_set():
                raise ReplicaCancelled(f"adopting {name}: cancelled before it arrived")
            if time.monotonic() >= deadline:
                raise ReplicaError(
                    f"adopting {name}: it did not arrive running within {timeout_s:g} s"
                )
            time.sleep(ARRIVAL_POLL_S)  # its address is claimed the moment it runs here
        self.arrived_at = time.time()
        self.arrived.set()

    def _wait_for_prefix(self, name: str, timeout_s: float) -> bytes:
        """The source's console (``set_console_prefix``), waiting up to `timeout_s` for it."""
        deadline = time.monotonic() + timeout_s
        while not self._prefix_set.wait(min(POLL_S, max(0.0, deadline - time.monotonic()))):
            if self._cancelled.is_set():
                raise ReplicaCancelled(f"segment on {name} cancelled")
            if time.monotonic() >= deadline:
                raise ReplicaError(
                    f"adopted {name}: the source's console did not come within {timeout_s:g} s"
                )
        with self._lock:
            assert self._console_prefix is not None  # set before the event
            return self._console_prefix

    def _run_extent(self, run: SegmentRun, name: str, serial_log: Path) -> tuple[float, bool]:
        """Run until the guest used its vCPU extent (then pause) or powered off.

        Carries out a ``migrate_to`` request (ReplicaMigrated if the guest left).
        """
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
            if self._migration is not None:
                self._migrate(name, state, serial_log)
                continue  # it failed: the guest is still here (its state may have changed)
            held = self._held.is_set()
            if held and state is VmState.RUNNING:
                self.runtime.pause(name)  # the volunteer needs the CPU: the guest waits
            elif not held and state is VmState.PAUSED:
                self.runtime.resume(name)
            time.sleep(POLL_S)

    def _migrate(self, name: str, state: VmState, serial_log: Path) -> None:
        """Carry out the migration request: ReplicaMigrated if the guest left, else record why."""
        request = self._migration
        assert request is not None
        used = 0.0
        try:
            if state is VmState.PAUSED:
                self.runtime.resume(name)  # a paused guest would arrive paused: not "arrived"
            used = self.runtime.cpu_time_s(name)
            moved = self.runtime.migrate_live(
                name, request.dest_uri, request.dest_address, request.dest
            )
        except VmError as exc:
            self._settle_migration(str(exc))
            if self._confirm_gone(name) is None:
                raise ReplicaError(
                    f"segment on {name}: the migration failed but the domain left: {exc}"
                ) from exc
            return
        self._settle_migration(None)  # the guest left
        try:
            console = serial_log.read_bytes()  # complete: the source QEMU has stopped
        except OSError as exc:  # no console, no checkpoint for the destination: a failure
            raise ReplicaError(f"{name} migrated, but reading its console failed: {exc}") from exc
        message = f"{name} migrated to {request.dest_uri}"
        raise ReplicaMigrated(message, console, used, moved.downtime_ms)

    def _settle_migration(self, error: str | None) -> None:
        with self._lock:
            self._migration = None
            self.migration_error = error
        self.migration_done.set()

    def _end_run(self) -> None:
        """The run is over: a migration still asked for will not happen."""
        with self._lock:
            self._ended = True
            pending = self._migration is not None
        if pending:
            self._settle_migration("the segment ended before the guest could migrate")

    def _confirm_gone(self, name: str) -> VmState | None:
        """A domain missing from a listing: ask for it by name before believing it ended."""
        try:
            return self.runtime.state(name)
        except VmError:
            return None

    def _checkpoint(
        self,
        name: str,
        serial_log: Path,
        saved: bool,
        prefix: bytes | None,
        disks: tuple[Disk, ...],
    ) -> tuple[Manifest, bytes]:
        """Save the paused guest (if `saved`); store its parts with the console; return both.

        The console is the run's serial log, after `prefix` (an adopted guest's
        console from its source) if given.
        """
        save_file = self.work_dir / "checkpoint.save"
        parts = self.work_dir / "checkpoint.parts"
        joined = self.work_dir / CONSOLE_FILE
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
            try:
                console = serial_log.read_bytes()
                if prefix is not None:
                    console = prefix + console
                    joined.write_bytes(console)
            except OSError as exc:
                raise ReplicaError(f"reading the console of {name}: {exc}") from exc
            files[CONSOLE_FILE] = serial_log if prefix is None else joined
            files.update(disk_files(disks))  # QEMU has stopped: the disks are still
            return self.store.put_files(files, self.identity), console
        finally:
            save_file.unlink(missing_ok=True)
            joined.unlink(missing_ok=True)
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
