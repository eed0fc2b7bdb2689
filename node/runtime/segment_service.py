"""The agent's segment edge: its block store and block server, and replicas on request.

- The block store lives in ``<state_dir>/blocks``; its block server listens on
  the agent's overlay address (port ``BLOCK_PORT``), so peers fetch checkpoint
  blocks through WireGuard; an agent without an overlay (a test in the root
  namespace) serves on its underlay host instead.
- ``run_segment`` fetches the blocks of the previous checkpoint that this node
  lacks (from every holder it is given at once, each block verified), then
  runs a replica (segments.vm.replica) in a worker thread against this host's
  libvirt, and returns the new checkpoint's signed manifest.
- A draining host hands its running guest to another host (issue 6): the
  destination runs an order with ``adopt`` (it waits for the guest to arrive
  instead of fetching and restoring) and tells the source its files
  (``destination_spec``); the source checks them (``parse_destination_spec``)
  and asks its running replica to live-migrate (``migrate_replica``), after
  which that replica's ``run_replica`` raises ``SegmentMigrated`` with its
  console; the destination gets that console through ``set_console_prefix``
  and checkpoints the whole segment's console. Call ``set_console_prefix``
  while the adopting replica runs (it arrives after the guest did).

The market (which segment, which image, who holds what) decides *what* to run;
this service only knows how.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import trio

from node.base.identity import Identity
from node.base.records import parse_endpoint
from node.base.wire import RemoteProtocolError
from node.market.jobs import JobSpec
from node.market.offer_messages import Work
from node.runtime.guest_address import guest_cmdline
from node.runtime.job_bundles import BlockSources, BundleError, JobBundles
from node.runtime.replica_orders import (
    ReplicaOrder,
    ReplicaOutcome,
    parse_destination_spec,
)
from node.runtime.rerun_check import (
    RERUN_SLACK,
    RERUN_WALL_PER_CPU_S,
    RerunCheck,
    RerunUnavailable,
)
from segments.image.library import ImageLibrary
from segments.image.store import Image, ImageError
from segments.store.blocks import BlockStore, BlockStoreError
from segments.store.manifest import Manifest, decode_manifest
from segments.store.transfer import FetchError, fetch, serve_blocks
from segments.vm.progress import encode_progress
from segments.vm.replica import (
    CONSOLE_FILE,
    Replica,
    ReplicaError,
    ReplicaMigrated,
    ReplicaResult,
    SegmentRun,
    replica_spec,
)
from segments.vm.runtime import Disk, VmError, VmRuntime, VmSpec, VmState
from segments.vm.verify import Verdict, VerifyError, VerifySpec, verify_checkpoint

OpenRuntime = Callable[[], contextlib.AbstractContextManager[VmRuntime]]
LoadImage = Callable[[Path, str], Image]
log = logging.getLogger("gleaner.segments")

BLOCK_PORT = 7947
MARKET_VM = re.compile(r"gl-r[0-9a-f]{16}")  # replicas the market starts: gl-r<job id prefix>
MIGRATION_TIMEOUT_S = 300.0  # migrate_replica's wait for the outcome
MIGRATION_POLL_S = 0.05
DISKS = "disks"  # a replica's work folder: a job owner's program's disks (removed after)


def market_vm_name(job_id: bytes) -> str:
    """A market replica's ``ReplicaOrder.name`` (its domain is ``gl-<name>``, see MARKET_VM)."""
    return f"r{job_id.hex()[:16]}"


class SegmentError(Exception):
    """A segment request could not be carried out; the message says why."""


class VerifierUnavailable(SegmentError):
    """This host could not verify (its libvirt, image or store failed): not the replica's fault."""


class SegmentMigrated(SegmentError):
    """The replica's guest was live-migrated away (``migrate_replica``): no checkpoint here.

    It carries what the worker's ``ReplicaMigrated`` says: ``console`` (everything
    the guest printed here, the destination's console prefix), ``cpu_s`` (the vCPU
    time it used here) and ``downtime_ms`` (libvirt's switch-over figure).
    """

    def __init__(self, moved: ReplicaMigrated) -> None:
        super().__init__(str(moved))
        self.console, self.cpu_s, self.downtime_ms = moved.console, moved.cpu_s, moved.downtime_ms


class SegmentService:
    def __init__(
        self,
        identity: Identity,
        state_dir: Path,
        image_store: Path,
        open_runtime: OpenRuntime,
        load_image: LoadImage,
        library: ImageLibrary | None = None,
        image_cache_bytes: int = 20 << 30,
    ) -> None:
        """`open_runtime` opens this host's VM runtime for one worker thread (libvirt, or
        its fake twin in tests); `load_image` reads an image from a store; `library`
        holds job owners' images (None: this node runs only recipe images)."""
        self.identity = identity
        self.state_dir = state_dir
        self.image_store = image_store
        self.open_runtime = open_runtime
        self.load_image = load_image
        self.store = BlockStore(state_dir / "blocks")
        self.library = library
        self.bundles = (
            None
            if library is None
            else JobBundles(identity, self.store, library, image_cache_bytes)
        )
        self.listen: tuple[str, int] | None = None
        self.runs = 0
        self.replicas: dict[str, Replica] = {}
        self.held = False  # the volunteer is back: replicas start held

    async def serve(
        self,
        host: str,
        port: int = BLOCK_PORT,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        listeners = await trio.open_tcp_listeners(port, host=host)
        bound = listeners[0].socket.getsockname()
        self.listen = (host, bound[1])
        log.info("block server on [%s]:%d", host, bound[1])
        stores = [self.store] if self.library is None else [self.store, self.library.store]
        source = BlockSources(stores)
        await serve_blocks(source, listeners[0], task_status=task_status)

    def close(self) -> None:
        self.store.close()
        if self.library is not None:
            self.library.close()

    async def run_segment(self, params: dict[str, Any]) -> dict[str, Any]:
        """The ``segment_run`` control request: one replica, run by hand."""
        job = _text(params, "job")
        if not job.replace("-", "").isalnum() or len(job) > 40:
            raise SegmentError("job names are letters, digits and dashes, at most 40")
        checkpoint = None
        holders: list[tuple[str, int]] = []
        if params.get("checkpoint") is not None:
            try:
                checkpoint = decode_manifest(params["checkpoint"])
            except RemoteProtocolError as exc:
                raise SegmentError(f"bad checkpoint manifest: {exc}") from None
            holders = _holders(params.get("holders"))
        order = ReplicaOrder(
            name=job,
            segment=_number(params, "segment", int),
            image_id=_text(params, "image_id"),
            args=_text(params, "args"),
            vcpus=1,
            extent_cpu_s=_number(params, "extent_cpu_s", float),
        )
        outcome = await self.run_replica(order, checkpoint, holders)
        result = outcome.result
        return {
            "checkpoint": result.checkpoint.encode(),
            "checkpoint_digest": result.checkpoint.digest.hex(),
            "checkpoint_bytes": result.checkpoint.total_size,
            "progress": result.progress.hex(),
            "cpu_s": result.cpu_s,
            "wall_s": result.wall_s,
            "powered_off": result.powered_off,
            "serial_log": str(result.serial_log),
            "fetched": outcome.fetched,
            "holder": f"[{self.listen[0]}]:{self.listen[1]}" if self.listen else None,
        }

    async def run_replica(
        self,
        order: ReplicaOrder,
        checkpoint: Manifest | None,
        holders: list[tuple[str, int]],
        cancel: trio.Event | None = None,
    ) -> ReplicaOutcome:
        """Fetch what this node lacks of ``checkpoint``, then run one replica of it.

        With ``order.adopt``, no checkpoint is fetched or restored (``checkpoint``
        is ignored): the replica waits for its guest to live-migrate here and runs
        the rest of the segment (``Replica.adopt``). Setting ``cancel`` stops the
        replica at its next poll (SegmentError); a guest migrated away with
        ``migrate_replica`` ends it with SegmentMigrated.
        """
        run = await self._segment_run(order)
        work = self._work_dir(order)
        try:
            if order.work is not None:
                disks = await self._job_disks(order.work, order.work_holders, work)
                run = replace(run, disks=disks)
            return await self._run_with(run, order, checkpoint, holders, cancel, work)
        finally:
            if order.work is not None:
                await trio.to_thread.run_sync(
                    functools.partial(shutil.rmtree, work / DISKS, ignore_errors=True)
                )

    async def _job_disks(
        self, work: Work, holders: tuple[tuple[str, int], ...], folder: Path
    ) -> tuple[Disk, ...]:
        if self.bundles is None:
            raise SegmentError("this node has no image library for job owners' images")
        try:
            return await self.bundles.disks(work, holders, folder / DISKS)
        except (BundleError, BlockStoreError, OSError) as exc:
            raise SegmentError(str(exc)) from None

    async def _run_with(
        self,
        run: SegmentRun,
        order: ReplicaOrder,
        checkpoint: Manifest | None,
        holders: list[tuple[str, int]],
        cancel: trio.Event | None,
        work: Path,
    ) -> ReplicaOutcome:
        fetched: dict[str, Any] = {}
        if checkpoint is not None and not order.adopt:
            try:
                stats = await fetch(checkpoint, holders, self.store)
            except FetchError as exc:
                raise SegmentError(f"fetching the checkpoint: {exc}") from None
            fetched = {
                "blocks": stats.blocks_done,
                "bytes": stats.bytes_done,
                "bad_blocks": stats.bad_blocks,
            }
        failure: SegmentError | None = None
        async with trio.open_nursery() as nursery:
            if cancel is not None:
                nursery.start_soon(self._cancel_on, cancel, run.vm_name)
            try:
                result = await trio.to_thread.run_sync(
                    self._run_blocking, run, None if order.adopt else checkpoint, work, order
                )
            except SegmentError as exc:
                failure = exc  # raised below, outside the nursery: not as an exception group
            nursery.cancel_scope.cancel()
        if failure is not None:
            raise failure
        self.runs += 1
        return ReplicaOutcome(result, fetched)

    async def destination_spec(self, order: ReplicaOrder) -> dict[str, Any]:
        """The files this host runs ``order``'s guest on, for a source to migrate onto.

        Plain strings (and None for a job without a tap), for the wire; the
        source reads them back with ``parse_destination_spec``.
        """
        spec = replica_spec(await self._segment_run(order), self._work_dir(order))
        return {
            "kernel": str(spec.kernel),
            "initrd": str(spec.initrd),
            "serial_log": str(spec.serial_log),
            "tap": spec.tap,
        }

    async def migrate_replica(
        self,
        vm_name: str,
        dest_uri: str,
        dest_address: str,
        dest_spec: VmSpec | dict[str, Any],
        timeout_s: float = MIGRATION_TIMEOUT_S,
    ) -> str | None:
        """Live-migrate the guest of the replica running `vm_name` here; None once it left.

        `dest_spec` is the destination's files: a VmSpec, or the map a peer sent
        (``destination_spec``), checked by ``parse_destination_spec``. Returns the
        error text if the migration failed or a map was bad (the guest runs on
        here and the replica goes on); SegmentError if no such replica runs here,
        or if there is no outcome after `timeout_s` (then the replica's run will
        tell: SegmentMigrated, or it carries on).
        """
        replica = self.replicas.get(vm_name)
        if replica is None:
            raise SegmentError(f"no replica of {vm_name} runs here")
        if not isinstance(dest_spec, VmSpec):
            try:
                dest_spec = parse_destination_spec(vm_name, dest_spec)
            except ValueError as exc:
                return f"bad destination spec from {dest_uri}: {exc}"
        try:
            replica.migrate_to(dest_uri, dest_address, dest_spec)
        except ReplicaError as exc:
            raise SegmentError(str(exc)) from None
        with trio.move_on_after(timeout_s):
            while not replica.migration_done.is_set():
                await trio.sleep(MIGRATION_POLL_S)
            return replica.migration_error
        raise SegmentError(f"migrating {vm_name} to {dest_uri}: no outcome after {timeout_s:g} s")

    async def cpu_time_s(self, vm_name: str) -> float:
        """The vCPU time the guest of the replica running `vm_name` here has used so far.

        Counted from its start, restore or arrival here (the QEMU process's
        clock); SegmentError if no such replica runs here or libvirt failed.
        """
        if vm_name not in self.replicas:
            raise SegmentError(f"no replica of {vm_name} runs here")

        def read() -> float:
            with self.open_runtime() as runtime:
                return runtime.cpu_time_s(vm_name)

        try:
            return await trio.to_thread.run_sync(read)
        except VmError as exc:
            raise SegmentError(str(exc)) from None

    def set_console_prefix(self, vm_name: str, data: bytes) -> None:
        """Hand the adopting replica of `vm_name` its guest's console from the source host.

        ValueError if `data` is not bytes; SegmentError if no such replica runs
        here or it already has a different one.
        """
        if not isinstance(data, bytes):
            raise ValueError(f"a console is bytes, not {type(data).__name__}")
        replica = self.replicas.get(vm_name)
        if replica is None:
            raise SegmentError(f"no replica of {vm_name} runs here")
        try:
            replica.set_console_prefix(data)
        except ReplicaError as exc:
            raise SegmentError(str(exc)) from None

    async def verify_completion(
        self,
        job: JobSpec,
        manifest: Manifest,
        claimed: bytes,
        base_checkpoint: bytes | None,
        halted: bool,
        timeout_s: float,
    ) -> Verdict:
        """Restore a completed segment's checkpoint here and check the guest moved on.

        ``base_checkpoint`` is the previous committed checkpoint (held here: the
        owner verified it), whose console gives the progress to continue from.
        """
        try:
            image = await trio.to_thread.run_sync(self.load_image, self.image_store, job.image)
        except ImageError as exc:
            raise VerifierUnavailable(str(exc)) from None
        base = None
        if base_checkpoint is not None:
            console = await self.console_of(base_checkpoint)
            if console is None:
                raise VerifierUnavailable("the previous checkpoint's console is not held here")
            base = encode_progress(console)
        folder = self.state_dir / "verify" / f"job-{job.job_id.hex()[:16]}"
        await trio.to_thread.run_sync(functools.partial(shutil.rmtree, folder, ignore_errors=True))
        try:  # one verification of a job at a time (the owner's machine asks so)
            disks: tuple[Disk, ...] = ()
            if job.work is not None and not halted:  # a halted guest is not restored
                disks = await self._job_disks(job.work, (), folder)
            spec = VerifySpec(
                kernel=image.kernel,
                initrd=image.initrd,
                cmdline=f"{image.cmdline} {job.args}".strip(),
                memory_mb=job.memory_mib,
                vcpus=job.vcpus,
                work_dir=self.state_dir / "verify",
                tap=f"gv{job.job_id.hex()[:12]}" if job.network else None,  # not a replica's
                disks=disks,
            )

            def verify() -> Verdict:
                with self.open_runtime() as runtime:
                    return verify_checkpoint(
                        runtime, self.store, spec, manifest, claimed, base, halted, timeout_s
                    )

            verdict = await trio.to_thread.run_sync(verify)
            if verdict.ok and halted and job.work is not None:
                verdict = await self._check_outputs(manifest, folder / "outputs", verdict)
            if verdict.ok and halted and job.verify == "rerun":
                rerun_s = timeout_s + job.extent_s * RERUN_SLACK * RERUN_WALL_PER_CPU_S
                verdict = await self._rerun(
                    job, image, manifest, base_checkpoint, folder, verdict, rerun_s
                )
            return verdict
        except SegmentError as exc:
            raise VerifierUnavailable(str(exc)) from None
        except (VerifyError, VmError, BlockStoreError, OSError) as exc:
            raise VerifierUnavailable(f"verifier: {exc}") from None
        finally:
            await trio.to_thread.run_sync(
                functools.partial(shutil.rmtree, folder, ignore_errors=True)
            )

    async def _check_outputs(self, manifest: Manifest, dest: Path, verdict: Verdict) -> Verdict:
        """A halted program's outputs must read as a safe tar within the caps (docs/jobs.md)."""
        assert self.bundles is not None
        try:
            files = await trio.to_thread.run_sync(self.bundles.outputs, manifest.digest, dest)
        except BundleError as exc:
            return replace(verdict, ok=False, reason=str(exc))
        return replace(verdict, reason=f"{verdict.reason}; {len(files)} output files read")

    async def _rerun(
        self,
        job: JobSpec,
        image: Image,
        manifest: Manifest,
        base_checkpoint: bytes | None,
        folder: Path,
        verdict: Verdict,
        timeout_s: float,
    ) -> Verdict:
        assert job.work is not None and self.bundles is not None
        base = None if base_checkpoint is None else self.store.manifest(base_checkpoint)
        if base_checkpoint is not None and base is None:
            raise VerifierUnavailable("rerun: the segment's starting checkpoint is not held here")
        disks = await self._job_disks(job.work, (), folder / "rerun")
        run = SegmentRun(
            vm_name=f"gl-{market_vm_name(job.job_id)}",  # a restore keeps the saved name
            kernel=image.kernel,
            initrd=image.initrd,
            cmdline=f"{image.cmdline} {job.args}".strip(),
            memory_mb=job.memory_mib,
            vcpus=job.vcpus,
            extent_cpu_s=float(job.extent_s) * RERUN_SLACK,
            disks=disks,
        )
        check = RerunCheck(self.open_runtime, self.store, self.identity, self.bundles)
        try:
            return await check.run(run, base, manifest, folder, verdict, timeout_s)
        except RerunUnavailable as exc:
            raise VerifierUnavailable(str(exc)) from None

    async def reap_orphans(self) -> list[str]:
        """Stop market replicas a crashed run of this agent left running in libvirt."""

        def reap() -> list[str]:
            reaped = []
            with self.open_runtime() as runtime:
                for name, state in runtime.list_vms().items():
                    if not MARKET_VM.fullmatch(name):
                        continue
                    if state in (VmState.RUNNING, VmState.PAUSED, VmState.SHUTTING_DOWN):
                        runtime.destroy(name)
                    try:
                        runtime.undefine(name)
                    except VmError:
                        pass  # a transient domain is gone once destroyed
                    reaped.append(name)
            return reaped

        try:
            return await trio.to_thread.run_sync(reap)
        except VmError as exc:
            log.warning("could not look for orphaned replicas: %s", exc)
            return []

    async def console_of(self, digest: bytes) -> str | None:
        """The guest console a checkpoint carries (None: not held here, or no console)."""

        def read() -> str | None:
            manifest = self.store.manifest(digest)
            if manifest is None or CONSOLE_FILE not in {f.name for f in manifest.files}:
                return None
            try:
                data = self.store.read_file(manifest, CONSOLE_FILE)
            except BlockStoreError:
                return None
            return data.decode("utf-8", "replace")

        return await trio.to_thread.run_sync(read)

    async def _cancel_on(self, cancel: trio.Event, vm_name: str) -> None:
        await cancel.wait()
        while (replica := self.replicas.get(vm_name)) is None:  # not started yet
            await trio.sleep(0.05)
        replica.cancel()

    async def _segment_run(self, order: ReplicaOrder) -> SegmentRun:
        try:
            image = await trio.to_thread.run_sync(self.load_image, self.image_store, order.image_id)
        except ImageError as exc:
            raise SegmentError(str(exc)) from None
        network = guest_cmdline(order.address) if order.address else ""
        return SegmentRun(
            vm_name=f"gl-{order.name}",
            kernel=image.kernel,
            initrd=image.initrd,
            cmdline=" ".join(part for part in (image.cmdline, order.args, network) if part),
            memory_mb=order.memory_mib or image.memory_mb,
            vcpus=order.vcpus,
            extent_cpu_s=order.extent_cpu_s,
            tap=order.tap,
        )

    def _work_dir(self, order: ReplicaOrder) -> Path:
        return self.state_dir / "replicas" / f"{order.name}-{order.segment}-{order.attempt}"

    def _run_blocking(
        self, run: SegmentRun, checkpoint: Any, work: Path, order: ReplicaOrder
    ) -> ReplicaResult:
        try:
            with self.open_runtime() as runtime:
                replica = Replica(runtime, self.store, self.identity, work)
                replica.hold(self.held)
                self.replicas[run.vm_name] = replica
                try:
                    if order.adopt:
                        return replica.adopt(run, order.arrival_timeout_s)
                    return replica.run(run, checkpoint)
                finally:
                    self.replicas.pop(run.vm_name, None)
        except ReplicaMigrated as exc:
            raise SegmentMigrated(exc) from None
        except (ReplicaError, VmError) as exc:
            raise SegmentError(str(exc)) from None


def _holders(value: Any) -> list[tuple[str, int]]:
    if not isinstance(value, list) or not value or not all(isinstance(h, str) for h in value):
        raise SegmentError("parameter 'holders' must list at least one HOST:PORT")
    try:
        return [parse_endpoint(holder) for holder in value]
    except ValueError as exc:
        raise SegmentError(f"parameter 'holders': {exc}") from None


def _text(params: dict[str, Any], name: str) -> str:
    value = params.get(name, "")
    if not isinstance(value, str):
        raise SegmentError(f"parameter {name!r} must be a string")
    return value


def _number(params: dict[str, Any], name: str, kind: type) -> Any:
    value = params.get(name)
    if type(value) not in ((int,) if kind is int else (int, float)):
        raise SegmentError(f"parameter {name!r} must be a number")
    return kind(value)
