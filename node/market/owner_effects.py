"""The job owner's effect handling, shared by the agent and the simulator. Sans-IO.

Theory of operation
-------------------
A job owner keeps one ``SegmentMachine`` per job (node/market/segment_machine.py).
Around the machines sit decisions that are not I/O, and the agent
(node/runtime/market_owner.py) and the market simulator (node/sim/market_owners.py)
take them here, once, instead of each deciding them again:

* **routing** (``route``): a MARKET frame names its job (``peek_job``); a bid,
  completion or withdrawal becomes the machine's event, anything else a
  ``FrameRefused`` with the reason (malformed, unknown job, unexpected kind);
* **carrying out** (``feed``, ``tick``): a machine's effects become
  ``OwnerAction``\\ s, lazily and in the order the machine emitted them (a
  consumer that draws randomness between two actions, as the simulator does
  when it pays, draws it where it always did):

  - ``BroadcastOffer`` becomes ``SendOffer`` to the live members but us and the
    offer's live source (a sample of ``offer_fanout`` of them, drawn from the
    ``random.Random`` handed in, when 0 < fanout < their number), then
    ``FeedLater(OfferDelivered)``: fed after this batch, so the auction closes
    as soon as every recipient has bid;
  - ``PersistJob``, ``SendStatement``, ``VerifyCompletion``,
    ``ReplicateCheckpoint``, ``PayWinner``, ``ReportSegment`` and
    ``FinishJob`` pass through; a ``FinishJob`` job is no longer fed
    ``ReplicaLost`` (``unfinished``);
  - with ``keep_history``, ``RecordHistory`` rows follow what the job's
    history holds (``gleaner watch`` reads it): offered, awarded (once per
    award, on its first winner's copy), paid, committed (with the holders),
    finished, and, for a completion or withdrawal the machine accepted,
    completion or withdrawn;
* **answers** the owner's I/O brings back: a verified completion is
  ``CompletionVerified`` and, when it verified, ``CheckpointReplicated`` for the
  owner, who fetched it and is now its second holder (``after_verification``);
  a replicated checkpoint is ``CheckpointReplicated`` for the owner
  (``after_replication``).

The consumer carries out every action (``match`` it exhaustively), stamps the
history rows with its clock and decides how the I/O is modelled or done.
Nothing here does I/O, reads a clock or draws randomness but from the
``random.Random`` handed in (typed by the one method used, ``Sampler``).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, assert_never

from node.base.identity import NodeId
from node.base.wire import RemoteProtocolError
from node.market.jobs import (
    BidReceived,
    CheckpointReplicated,
    CompletionReceived,
    CompletionVerified,
    FinishJob,
    OfferDelivered,
    OwnerEffect,
    OwnerEvent,
    PayWinner,
    PersistJob,
    ReplicateCheckpoint,
    ReportSegment,
    SegmentState,
    VerifyCompletion,
    WithdrawReceived,
)
from node.market.message_fields import MarketKind
from node.market.messages import BroadcastOffer, SendStatement, peek_job
from node.market.offer_messages import Offer, decode_award
from node.market.outcome_messages import decode_completion
from node.market.segment_machine import SegmentMachine

T = TypeVar("T")


class Sampler(Protocol):
    """The part of ``random.Random`` used here; pass a seeded ``random.Random``."""

    def sample(self, population: Sequence[T], k: int) -> list[T]: ...


_EVENTS: dict[int, type[BidReceived | CompletionReceived | WithdrawReceived]] = {
    MarketKind.BID: BidReceived,
    MarketKind.COMPLETION: CompletionReceived,
    MarketKind.WITHDRAW: WithdrawReceived,
}


class FrameRefused(enum.Enum):
    """Why a MARKET frame for the owner reached no job's machine."""

    MALFORMED = "malformed"  # no job id to route it by
    UNKNOWN_JOB = "unknown_job"  # not a job of ours
    UNEXPECTED = "unexpected"  # a kind the owner does not take


# -- the actions: what the consumer carries out ---------------------------------------


@dataclass(frozen=True, slots=True)
class SendOffer:
    """Send ``offer`` to each of ``targets`` (a MARKET frame each)."""

    job_id: bytes
    offer: Offer
    targets: tuple[NodeId, ...]


@dataclass(frozen=True, slots=True)
class FeedLater:
    """Feed ``event`` to the job's machine after the batch being carried out."""

    job_id: bytes
    event: OwnerEvent


@dataclass(frozen=True, slots=True)
class RecordHistory:
    """Append a row to the job's history; the consumer adds the time."""

    job_id: bytes
    what: str
    segment: int | None = None
    attempt: int | None = None
    node: NodeId | None = None
    detail: tuple[tuple[str, Any], ...] = ()


OwnerAction = (
    PersistJob
    | SendOffer
    | SendStatement
    | VerifyCompletion
    | ReplicateCheckpoint
    | PayWinner
    | ReportSegment
    | FinishJob
    | FeedLater
    | RecordHistory
)


def offer_targets(
    offer: Offer,
    me: NodeId,
    live: Sequence[NodeId],
    fanout: int,
    rng: Sampler,
) -> tuple[NodeId, ...]:
    """Who gets an offer: the live members but us and a move's source (it bids not),
    or ``fanout`` of them drawn from ``rng`` when 0 < fanout < their number."""
    skip = (me, offer.source)
    targets = [n for n in live if n not in skip]
    if 0 < fanout < len(targets):
        targets = rng.sample(targets, fanout)
    return tuple(targets)


class JobOwner:
    """One owner's jobs and the pure half of running them; see the module docstring."""

    def __init__(
        self,
        me: NodeId,
        live: Callable[[], Sequence[NodeId]],
        rng: Sampler,
        *,
        offer_fanout: int = 0,
        keep_history: bool = True,
    ) -> None:
        self.me = me
        self.live = live
        self.rng = rng
        self.offer_fanout = offer_fanout
        self.keep_history = keep_history
        self.machines: dict[bytes, SegmentMachine] = {}
        self.finished: set[bytes] = set()

    def add(self, machine: SegmentMachine, *, finished: bool = False) -> None:
        job_id = machine.spec.job_id
        self.machines[job_id] = machine
        if finished:
            self.finished.add(job_id)

    def unfinished(self, job_id: bytes) -> bool:
        return job_id in self.machines and job_id not in self.finished

    # -- inbound ------------------------------------------------------------------------

    def route(self, kind: int, blob: bytes) -> tuple[bytes, OwnerEvent] | FrameRefused:
        """The job a MARKET frame is for and the event it is, or why it is refused."""
        try:
            job_id = peek_job(blob)
        except RemoteProtocolError:
            return FrameRefused.MALFORMED
        if job_id not in self.machines:
            return FrameRefused.UNKNOWN_JOB
        event = _EVENTS.get(kind) if type(kind) is int or isinstance(kind, MarketKind) else None
        if event is None:
            return FrameRefused.UNEXPECTED
        return job_id, event(blob)

    def after_verification(self, node: NodeId, manifest: bytes, ok: bool) -> list[OwnerEvent]:
        """The events to feed, in order, once ``node``'s completion is judged."""
        verdict: list[OwnerEvent] = [CompletionVerified(node, manifest, ok)]
        if ok:  # fetched here to verify it: the owner is its second holder
            verdict.append(CheckpointReplicated(self.me, manifest))
        return verdict

    def after_replication(self, manifest: bytes) -> OwnerEvent:
        return CheckpointReplicated(self.me, manifest)

    # -- the machines' effects, as actions -----------------------------------------------

    def feed(
        self, job_id: bytes, event: OwnerEvent, now: float, sender: NodeId | None = None
    ) -> Iterator[OwnerAction]:
        """Hand ``event`` to the job's machine now; its actions, to carry out in order."""
        machine = self.machines[job_id]
        if not self.keep_history or not isinstance(event, CompletionReceived | WithdrawReceived):
            return self.carry(job_id, machine.handle(event, now))
        counter = "completions" if isinstance(event, CompletionReceived) else "withdrawals"
        before = machine.statistics().get(counter, 0)
        effects = machine.handle(event, now)
        if machine.statistics().get(counter, 0) <= before:  # refused: nothing to record
            return self.carry(job_id, effects)
        if isinstance(event, WithdrawReceived):
            row = _row(job_id, "withdrawn", machine.segment, None, sender)
        else:
            completion = decode_completion(event.blob)
            ref = completion.ref
            row = _row(
                job_id,
                "completion",
                ref.segment,
                ref.attempt,
                completion.host,
                cpu_ms=completion.cpu_ms,
            )
        return self.carry(job_id, effects, after=(row,))

    def tick(self, job_id: bytes, now: float) -> Iterator[OwnerAction]:
        return self.carry(job_id, self.machines[job_id].tick(now))

    def carry(
        self,
        job_id: bytes,
        effects: list[OwnerEffect],
        after: tuple[OwnerAction, ...] = (),
    ) -> Iterator[OwnerAction]:
        """The actions of one batch of the job's effects, decided one effect at a time."""
        for effect in effects:
            yield from self._actions(job_id, effect)
        yield from after

    def _actions(self, job_id: bytes, effect: OwnerEffect) -> Iterator[OwnerAction]:
        history = self.keep_history
        match effect:
            case BroadcastOffer(offer=offer):
                targets = offer_targets(offer, self.me, self.live(), self.offer_fanout, self.rng)
                yield SendOffer(job_id, offer, targets)
                if history:
                    ref = offer.ref
                    yield _row(
                        job_id,
                        "offered",
                        ref.segment,
                        ref.attempt,
                        hosts=len(targets),
                        checkpoint=offer.checkpoint.hex() if offer.checkpoint else None,
                        live_from=str(offer.source) if offer.source else None,
                    )
                delivered = OfferDelivered(offer.ref.attempt, len(targets), frozenset(targets))
                yield FeedLater(job_id, delivered)
            case SendStatement(target=target, kind=kind, blob=blob):
                yield effect
                if history and kind is MarketKind.AWARD:
                    award = decode_award(blob)
                    if target == award.winners[0].node:  # once per award, not per copy
                        ref = award.ref
                        for w in award.winners:
                            yield _row(
                                job_id, "awarded", ref.segment, ref.attempt, w.node, units=w.price
                            )
            case PayWinner(segment=segment, node=node, units=units):
                yield effect
                if history:
                    yield _row(job_id, "paid", segment, None, node, units=units)
            case ReportSegment(state=state, segment=segment, attempt=attempt):
                yield effect
                if history and state is SegmentState.COMMITTED:
                    snap = self.machines[job_id].snapshot()
                    yield _row(
                        job_id,
                        "committed",
                        segment,
                        attempt,
                        snap.last_winner,
                        manifest=snap.manifest.hex() if snap.manifest else None,
                        holders=[str(n) for n in snap.holders],
                    )
            case FinishJob(outcome=outcome):
                self.finished.add(job_id)
                yield effect
                if history:
                    yield _row(job_id, "finished", outcome=outcome)
            case PersistJob() | VerifyCompletion() | ReplicateCheckpoint():
                yield effect
            case _:
                assert_never(effect)


def _row(
    job_id: bytes,
    what: str,
    segment: int | None = None,
    attempt: int | None = None,
    node: NodeId | None = None,
    **detail: Any,
) -> RecordHistory:
    return RecordHistory(job_id, what, segment, attempt, node, tuple(detail.items()))
