"""The owner's opt-in check of a finished program: run the last segment again, compare.

A job with ``verify = "rerun"`` (docs/jobs.md) is not believed when it says its
guest powered off: the owner restores the checkpoint the last segment started
from (or boots the program afresh, for a one-segment job) on its own libvirt,
runs it for up to ``RERUN_SLACK`` times the extent, and requires that its
guest powers off too, with the same exit status and the same output files
(paths, sizes and SHA-256 of each, read from both output disks as safe tar
streams). The rerun's own checkpoint is dropped afterwards. A host cannot
pass by making outputs up; a program that is not deterministic cannot pass at
all.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import trio

from node.base.identity import Identity
from node.runtime.job_bundles import BundleError, JobBundles
from segments.image.runner import parse_exit
from segments.store.blocks import BlockStore, BlockStoreError
from segments.store.manifest import Manifest
from segments.vm.replica import (
    CONSOLE_FILE,
    Replica,
    ReplicaCancelled,
    ReplicaError,
    ReplicaResult,
    SegmentRun,
)
from segments.vm.runtime import VmError, VmRuntime
from segments.vm.verify import Verdict

RERUN_SLACK = 2.0  # a rerun of the last segment may take this many times its extent
RERUN_WALL_PER_CPU_S = 4.0  # wall seconds allowed per vCPU-second of it (TCG, a busy host)


class RerunUnavailable(Exception):
    """This node could not rerun (its libvirt or store failed). The owner retries; if it
    keeps failing, the completion is rejected (the owner cannot tell it from a bad one)."""


class RerunCheck:
    def __init__(
        self,
        open_runtime: Callable[[], contextlib.AbstractContextManager[VmRuntime]],
        store: BlockStore,
        identity: Identity,
        bundles: JobBundles,
    ) -> None:
        self.open_runtime = open_runtime
        self.store = store
        self.identity = identity
        self.bundles = bundles

    async def run(
        self,
        run: SegmentRun,
        base: Manifest | None,
        claimed: Manifest,
        folder: Path,
        verdict: Verdict,
        timeout_s: float,
    ) -> Verdict:
        """`verdict` as it stands, or a failed one saying how the rerun differs.

        The rerun is stopped after `timeout_s` of wall time (a program that waits
        rather than computes never reaches its extent): a failed verdict.
        """
        started: list[Replica] = []

        def rerun() -> ReplicaResult:
            with self.open_runtime() as runtime:
                replica = Replica(runtime, self.store, self.identity, folder / "run")
                started.append(replica)
                return replica.run(run, base)

        result: ReplicaResult | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._stop_after, started, timeout_s)
            try:
                result = await trio.to_thread.run_sync(rerun)
            except ReplicaCancelled:
                pass  # stopped by _stop_after: result stays None
            except (ReplicaError, VmError, BlockStoreError, OSError) as exc:
                raise RerunUnavailable(f"rerun: {exc}") from None
            finally:
                nursery.cancel_scope.cancel()
        if result is None:
            return replace(verdict, ok=False, reason=f"rerun: no power-off in {timeout_s:.0f} s")
        try:
            if not result.powered_off:
                return replace(
                    verdict,
                    ok=False,
                    reason=f"rerun: the guest ran on past {RERUN_SLACK:g} times the extent",
                )
            return await trio.to_thread.run_sync(
                self._compare, claimed, result.checkpoint, folder, verdict
            )
        finally:
            await trio.to_thread.run_sync(self._drop, result.checkpoint)

    async def _stop_after(self, started: list[Replica], timeout_s: float) -> None:
        await trio.sleep(timeout_s)
        while not started:
            await trio.sleep(0.05)
        started[0].cancel()

    def _drop(self, checkpoint: Manifest) -> None:
        self.store.remove_manifest(checkpoint.digest)
        self.store.gc()

    def _compare(
        self, claimed: Manifest, mine: Manifest, folder: Path, verdict: Verdict
    ) -> Verdict:
        try:
            theirs_files = self.bundles.outputs(
                claimed.digest, folder / "claimed-outputs", fresh=True
            )
            my_files = self.bundles.outputs(mine.digest, folder / "rerun-outputs", fresh=True)
            exits = [
                parse_exit(self.store.read_file(m, CONSOLE_FILE).decode("utf-8", "replace"))
                for m in (claimed, mine)
            ]
        except (BundleError, BlockStoreError, KeyError) as exc:
            return replace(verdict, ok=False, reason=f"rerun: {exc}")
        if exits[0] != exits[1]:
            return replace(
                verdict, ok=False, reason=f"rerun: exit status {exits[1]}, not {exits[0]}"
            )
        if theirs_files != my_files:
            differ = sorted({f.path for f in theirs_files} ^ {f.path for f in my_files}) or [
                a.path for a, b in zip(theirs_files, my_files, strict=False) if a != b
            ]
            return replace(verdict, ok=False, reason=f"rerun: outputs differ ({differ[:3]})")
        return replace(
            verdict, reason=f"{verdict.reason}; a rerun here made the same {len(my_files)} outputs"
        )
