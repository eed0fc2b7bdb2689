"""The agent's owner side of the market: the jobs this node submitted, run to the end.

``OwnerMarket`` keeps one ``SegmentMachine`` (node/market/segment_machine.py) per
job this node owns, restores them from the state database at start (each
waits at its last committed boundary, then resumes). What is decision and not
I/O (routing a frame to its job, whom an offer goes to, what the job's history
records, what a verdict feeds back) is the shared core's, ``JobOwner``
(node/market/owner_effects.py), which the market simulator runs too; this
adapter carries out the core's actions in order, and only their I/O:

- ``PersistJob``: the snapshot is committed before the next effect (an award's
  route epochs, a commit's checkpoint) can leave the node.
- ``SendOffer`` / ``SendStatement``: MARKET frames.
- ``FeedLater``: fed to the job's machine once this batch is done (the
  ``OfferDelivered`` that closes an auction as soon as all have answered).
- ``VerifyCompletion``: a task fetches the completer's checkpoint (manifest and
  the blocks we lack) from its block server, restores it here and checks the
  guest moved on from the previous checkpoint (segments.vm.verify); the core
  says what the verdict feeds back.
- ``ReplicateCheckpoint``: fetch the checkpoint here if we lack it, and report.
- ``PayWinner``: the ledger pays (journaled before the payment is sent).
- ``FinishJob``: the job's outcome, in the state database.
- ``RecordHistory``: a row of the job's history (``job_history``), stamped
  with the time: offers, awards, completions in arrival order, verdicts,
  commits, payments. ``gleaner watch`` and the tests read the same record.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, assert_never

import trio

from node.base.identity import Identity, NodeId
from node.base.wire import LocalProtocolError
from node.market.job_records import (
    JobRecordError,
    decode_history,
    decode_snapshot,
    decode_spec,
    encode_history,
    encode_snapshot,
    encode_spec,
)
from node.market.jobs import (
    FinishJob,
    JobSnapshot,
    JobSpec,
    JobSpecError,
    OwnerEvent,
    OwnerResumed,
    PayWinner,
    PersistJob,
    ReplicaLost,
    ReplicateCheckpoint,
    ReportSegment,
    VerifyCompletion,
)
from node.market.message_fields import MarketKind
from node.market.messages import SendStatement
from node.market.offer_messages import Work
from node.market.owner_effects import (
    FeedLater,
    FrameRefused,
    JobOwner,
    OwnerAction,
    RecordHistory,
    SendOffer,
)
from node.market.reputation import Reputation
from node.market.segment_machine import SegmentMachine
from node.market.segment_rounds import MachineConfig
from node.runtime.segment_service import SegmentError, SegmentService, VerifierUnavailable
from node.runtime.state import State
from overlay.addressing import vm_address
from segments.image.store import ImageError
from segments.store.transfer import FetchError, fetch, fetch_manifest

log = logging.getLogger("gleaner.jobs")

SendMarket = Callable[[NodeId, MarketKind, bytes], Awaitable[None]]
BlockEndpoint = Callable[[NodeId], "tuple[str, int] | None"]
Pay = Callable[[bytes, int, NodeId, int], Awaitable[None]]
VERIFY_TRIES = 3  # a verifier failure of our own is retried before the completion is judged
VERIFY_RETRY_S = 5.0
LOST_GRACE_S = 5.0  # a member declared dead must stay gone this long to lose its replicas


@dataclass
class _Job:
    spec: JobSpec
    machine: SegmentMachine
    submitted: float
    outcome: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


class OwnerMarket:
    def __init__(
        self,
        identity: Identity,
        state: State,
        segments: SegmentService,
        config: MachineConfig,
        send: SendMarket,
        pay: Pay,
        live_members: Callable[[], list[NodeId]],
        block_endpoint: BlockEndpoint,
        verify_timeout_s: float,
    ) -> None:
        self.identity = identity
        self.state = state
        self.segments = segments
        self.config = config
        self.send = send
        self.pay = pay
        self.live_members = live_members
        self.block_endpoint = block_endpoint
        self.verify_timeout_s = verify_timeout_s
        self.reputation = Reputation()
        self.jobs: dict[bytes, _Job] = {}
        self.stats: Counter[str] = Counter()
        self._rng = random.Random(int.from_bytes(os.urandom(8), "big"))
        self.core = JobOwner(identity.node_id, live_members, self._rng)  # offers go to all
        self._nursery: trio.Nursery | None = None
        self._wake = trio.Event()
        self._locks: dict[bytes, trio.Lock] = {}

    # -- lifecycle -----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        rows = await trio.to_thread.run_sync(self.state.jobs)
        for job_id, spec_blob, snap_blob, submitted, outcome in rows:
            history = await trio.to_thread.run_sync(self.state.job_history, job_id)
            try:
                self._restore(job_id, spec_blob, snap_blob, submitted, outcome, history)
            except (JobRecordError, LocalProtocolError) as exc:
                # Left in the database as it is: nothing is lost, the agent runs on.
                self.stats["jobs_unreadable"] += 1
                log.error("job %s cannot be restored, skipped: %s", job_id.hex()[:12], exc)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            for job_id, job in list(self.jobs.items()):
                if job.outcome is None:
                    await self._feed(job_id, OwnerResumed())
            while True:
                for job_id in list(self.jobs):
                    await self._execute(job_id, self.core.tick(job_id, time.time()))
                self._wake = trio.Event()  # after our own effects, which set the old one
                wakeup = min(
                    (j.machine.next_wakeup() for j in self.jobs.values()), default=math.inf
                )
                delay = wakeup - time.time()
                if delay > 0:
                    with trio.move_on_after(min(delay, 1.0)):
                        await self._wake.wait()

    def _restore(
        self,
        job_id: bytes,
        spec_blob: bytes,
        snap_blob: bytes | None,
        submitted: float,
        outcome: str | None,
        history: list[bytes],
    ) -> None:
        spec = decode_spec(spec_blob)
        if spec.job_id != job_id:
            raise JobRecordError("the stored spec is not this job's")
        snapshot = decode_snapshot(snap_blob) if snap_blob is not None else None
        rows = [decode_history(blob) for blob in history]
        job = self._add(spec, snapshot, submitted, outcome)
        job.outcome, job.history = outcome, rows

    def _add(
        self, spec: JobSpec, snapshot: JobSnapshot | None, submitted: float, outcome: str | None
    ) -> _Job:
        machine = SegmentMachine(
            self.identity, spec, self.config, self.reputation, self._rng, snapshot
        )
        self.core.add(machine, finished=outcome is not None)
        job = self.jobs[spec.job_id] = _Job(spec, machine, submitted)
        self._locks[spec.job_id] = trio.Lock()
        return job

    async def submit(self, spec: JobSpec) -> bytes:
        """Persist a new job, then start offering its first segment."""
        spec.check_submittable(time.time())
        try:  # the owner restores every completion to verify it: it needs the image
            await trio.to_thread.run_sync(
                self.segments.load_image, self.segments.image_store, spec.image
            )
        except ImageError as exc:
            raise JobSpecError(f"image: {exc}") from None
        submitted = time.time()
        await trio.to_thread.run_sync(self.state.add_job, spec.job_id, encode_spec(spec), submitted)
        self._add(spec, None, submitted, None)
        await self._record(spec.job_id, "submitted")
        await self._feed(spec.job_id, OwnerResumed())
        return spec.job_id

    # -- inbound -------------------------------------------------------------------------

    async def deliver(self, sender: NodeId, kind: int, blob: bytes) -> None:
        """A MARKET frame for the owner side: bids, completions and withdrawals."""
        match self.core.route(kind, blob):
            case FrameRefused.MALFORMED:
                self.stats["refused_malformed"] += 1
            case FrameRefused.UNKNOWN_JOB:
                self.stats["refused_unknown_job"] += 1
            case FrameRefused.UNEXPECTED:
                self.stats["frames_unexpected"] += 1
            case (job_id, event):
                await self._execute(job_id, self.core.feed(job_id, event, time.time(), sender))

    async def member_lost(self, node: NodeId) -> None:
        """Membership declared ``node`` dead: its replicas are lost unless it is soon back."""
        self._spawn(self._lose_unless_back, node)

    async def _lose_unless_back(self, node: NodeId) -> None:
        # On a loaded host an agent can miss its probes, be declared dead and refute it
        # a moment later; its replica ran on meanwhile. Only a node still gone after
        # the grace loses its replicas (a re-offer would throw their work away).
        await trio.sleep(LOST_GRACE_S)
        if node in self.live_members():
            self.stats["losses_refuted"] += 1
            return
        for job_id in list(self.jobs):
            if self.core.unfinished(job_id):
                await self._feed(job_id, ReplicaLost(node))

    async def _feed(self, job_id: bytes, event: OwnerEvent) -> None:
        await self._execute(job_id, self.core.feed(job_id, event, time.time()))

    # -- effects -------------------------------------------------------------------------

    async def _execute(self, job_id: bytes, actions: Iterable[OwnerAction]) -> None:
        async with self._locks[job_id]:
            for action in actions:
                await self._carry_out(job_id, action)
        self._wake.set()

    async def _carry_out(self, job_id: bytes, action: OwnerAction) -> None:
        match action:
            case PersistJob(snapshot=snapshot):
                blob = encode_snapshot(snapshot)
                await trio.to_thread.run_sync(self.state.save_job_snapshot, job_id, blob)
            case SendOffer(offer=offer, targets=targets):
                for target in targets:
                    await self.send(target, MarketKind.OFFER, offer.blob)
            case SendStatement(target=target, kind=kind, blob=blob):
                await self.send(target, kind, blob)
            case FeedLater(event=event):  # the job's lock is held: after this batch
                self._spawn(self._feed, job_id, event)
            case VerifyCompletion():
                self._spawn(self._verify, job_id, action)
            case ReplicateCheckpoint():
                self._spawn(self._replicate, job_id, action)
            case PayWinner(segment=segment, node=node, units=units):
                await self.pay(action.job_id, segment, node, units)
            case ReportSegment():
                pass  # what the history keeps of it comes as RecordHistory
            case FinishJob(outcome=outcome):
                self.jobs[job_id].outcome = outcome
                await trio.to_thread.run_sync(self.state.end_job, job_id, outcome)
                log.info("job %s %s", job_id.hex()[:12], outcome)
            case RecordHistory(what=what, segment=segment, attempt=attempt, node=node):
                await self._record(job_id, what, segment, attempt, node, **dict(action.detail))
            case _:
                assert_never(action)

    def _spawn(self, fn: Callable[..., Awaitable[None]], *args: Any) -> None:
        assert self._nursery is not None
        self._nursery.start_soon(guarded, fn, *args)

    async def _verify(self, job_id: bytes, effect: VerifyCompletion) -> None:
        job = self.jobs[job_id]
        started = time.monotonic()
        ok, reason = False, ""
        for attempt in range(1, VERIFY_TRIES + 1):
            try:
                manifest = await self._fetch_checkpoint(effect.manifest, (effect.node,))
                verdict = await self.segments.verify_completion(
                    job.spec,
                    manifest,
                    effect.progress,
                    effect.base,
                    effect.halted,
                    self.verify_timeout_s,
                )
                ok, reason = verdict.ok, verdict.reason
            except VerifierUnavailable as exc:  # our own failure: try again before judging
                reason = str(exc)
                self.stats["verifier_unavailable"] += 1
                log.warning("verifying (try %d of %d): %s", attempt, VERIFY_TRIES, reason)
                if attempt < VERIFY_TRIES:
                    await trio.sleep(VERIFY_RETRY_S * attempt)
                    continue
            except (FetchError, SegmentError) as exc:
                reason = str(exc)
            except Exception as exc:  # a bug of ours: logged, and judged as unavailable
                reason = f"verifier failed: {exc!r}"
                self.stats["verifier_unavailable"] += 1
                log.exception("verifying (try %d of %d)", attempt, VERIFY_TRIES)
                if attempt < VERIFY_TRIES:
                    await trio.sleep(VERIFY_RETRY_S * attempt)
                    continue
            break
        elapsed_ms = round((time.monotonic() - started) * 1000)
        await self._record(
            job_id,
            "verified" if ok else "rejected",
            effect.segment,
            None,
            effect.node,
            ms=elapsed_ms,
            reason=reason,
        )
        if not ok:
            log.warning("completion by %s failed verification: %s", effect.node.short, reason)
        for event in self.core.after_verification(effect.node, effect.manifest, ok):
            await self._feed(job_id, event)

    async def _replicate(self, job_id: bytes, effect: ReplicateCheckpoint) -> None:
        try:
            await self._fetch_checkpoint(effect.manifest, effect.sources)
        except FetchError as exc:
            log.warning("replicating checkpoint %s: %s", effect.manifest.hex()[:12], exc)
            return
        await self._feed(job_id, self.core.after_replication(effect.manifest))

    async def _fetch_checkpoint(self, digest: bytes, sources: tuple[NodeId, ...]) -> Any:
        """The checkpoint's manifest, with every block of it in our store."""
        store = self.segments.store
        holders = [e for e in map(self.block_endpoint, sources) if e is not None]
        manifest = store.manifest(digest)
        if manifest is None:
            manifest = await fetch_manifest(digest, holders)
        if store.manifest(digest) is None or store.missing(manifest):
            await fetch(manifest, holders, store)
        return manifest

    async def _record(
        self,
        job_id: bytes,
        what: str,
        segment: int | None = None,
        attempt: int | None = None,
        node: NodeId | None = None,
        **detail: Any,
    ) -> None:
        row = {
            "t": time.time(),
            "what": what,
            "segment": segment,
            "attempt": attempt,
            "node": str(node) if node else None,
            **detail,
        }
        self.jobs[job_id].history.append(row)
        blob = encode_history(row)
        await trio.to_thread.run_sync(self.state.append_job_history, job_id, blob)

    # -- views ---------------------------------------------------------------------------

    def statistics(self) -> dict[str, int]:
        """What this adapter refused before any job's machine saw it (``refused_malformed``:
        no job id to route by, ``refused_unknown_job``: not a job of ours)."""
        return dict(self.stats)

    def find(self, prefix: str) -> bytes:
        """A job id from its hex form or a unique prefix of it; KeyError if none or many."""
        matches = [j for j in self.jobs if j.hex().startswith(prefix.lower())]
        if len(matches) != 1 or not prefix:
            raise KeyError(f"{'no' if not matches else 'more than one'} job matches {prefix!r}")
        return matches[0]

    def summary(self, job_id: bytes) -> dict[str, Any]:
        job = self.jobs[job_id]
        spec, machine = job.spec, job.machine
        paid = [r for r in job.history if r["what"] == "paid"]
        return {
            "job_id": job_id.hex(),
            "image": spec.image,
            "segments": spec.segments,
            "k": spec.k,
            "extent_s": spec.extent_s,
            "ceiling": spec.ceiling,
            "submitted": job.submitted,
            "state": job.outcome or machine.state.value,
            "segment": machine.segment,
            "attempt": machine.attempt,
            "committed": sum(1 for r in job.history if r["what"] == "committed"),
            "paid_units": sum(r["units"] for r in paid),
            "outcome": job.outcome,
            "own_program": spec.work is not None,
        }

    def detail(self, job_id: bytes) -> dict[str, Any]:
        job = self.jobs[job_id]
        return {
            **self.summary(job_id),
            "spec": {
                "memory_mib": job.spec.memory_mib,
                "vcpus": job.spec.vcpus,
                "args": job.spec.args,
                "deadline": job.spec.deadline,
                "network": job.spec.network,
            },
            # a network job's stable overlay address, wherever its guest runs
            "address": str(vm_address(self.config.swarm_id, job_id)) if job.spec.network else None,
            "rows": segment_rows(job.history),
            "history": job.history,
            "statistics": job.machine.statistics(),
        }


async def guarded(fn: Callable[..., Awaitable[None]], *args: Any) -> None:
    """Run one job's task; a bug in it is logged and counted, and the agent runs on."""
    try:
        await fn(*args)
    except Exception:
        log.exception("market task %s failed", getattr(fn, "__name__", fn))


def segment_rows(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per segment from a job's history: replicas, completions, winner, payment."""
    rows: dict[int, dict[str, Any]] = {}
    for r in history:
        segment = r.get("segment")
        if segment is None:
            continue
        row = rows.setdefault(
            segment,
            {
                "segment": segment,
                "attempts": 0,
                "replicas": [],
                "completions": [],
                "winner": None,
                "offered_at": r["t"],
                "committed_at": None,
                "paid_units": 0,
                "paid_to": None,
                "manifest": None,
            },
        )
        what = r["what"]
        if what == "offered":
            row["attempts"] += 1  # offers of this segment (attempt numbers count per job)
        elif what == "awarded" and r["node"] not in row["replicas"]:
            row["replicas"].append(r["node"])
        elif what == "completion":
            row["completions"].append({"node": r["node"], "t": r["t"], "attempt": r["attempt"]})
        elif what == "committed":
            row.update(winner=r["node"], committed_at=r["t"], manifest=r.get("manifest"))
        elif what == "paid":
            row.update(paid_units=r["units"], paid_to=r["node"])
    return [rows[s] for s in sorted(rows)]


def spec_from_request(
    owner: Identity, data: dict[str, Any], now: float, work: Work | None = None
) -> JobSpec:
    """A new job's spec from a ``job_submit`` request (the TOML keys of ``gleaner submit``)."""
    data = dict(data)
    data.setdefault("deadline", int(now) + 86400)
    return JobSpec.from_mapping(owner.node_id, os.urandom(16), data, work)
