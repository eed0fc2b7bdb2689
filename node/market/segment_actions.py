"""What the owner's segment machine does: its one transition step and its effects.

``SegmentActions`` holds the machine's state (node/market/segment_machine.py has
the theory of operation; ``SegmentMachine`` reacts to events and time on top of
it) and the steps it takes on its own account: ``_move`` along the transition
table of node/market/jobs.py (refusing any other step), offer an attempt, award
an auction's winners (with route grants), ask for verification and replication,
commit and pay, cancel replicas, abandon an attempt, expire the job. Each step
queues its effects in order; ``_drain`` hands them over.

This module is pure: no I/O, no clock.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import replace

from node.base.identity import Identity, NodeId
from node.base.wire import LocalProtocolError
from node.market.auction import Auctioneer
from node.market.jobs import (
    TRANSITIONS,
    FinishJob,
    JobSnapshot,
    JobSpec,
    JobStep,
    OwnerEffect,
    PayWinner,
    PersistJob,
    ReplicateCheckpoint,
    ReportSegment,
    SegmentState,
    VerifyCompletion,
)
from node.market.message_fields import (
    MAX_HOLDERS,
    MarketKind,
    MarketRefusal,
    MarketRefused,
    OfferRef,
)
from node.market.messages import BroadcastOffer, SendStatement
from node.market.offer_messages import Offer, Winner, sign_award, sign_offer
from node.market.outcome_messages import CancelReason, SegmentCommit, sign_cancel, sign_commit
from node.market.reputation import Reputation
from node.market.segment_rounds import MachineConfig, Replica, Round
from node.membership.random_set import RandomSource
from overlay.claims import sign_grant

_S = SegmentState


class SegmentActions:
    """The segment machine's state and its own steps; ``SegmentMachine`` drives them."""

    def __init__(
        self,
        owner: Identity,
        spec: JobSpec,
        config: MachineConfig,
        reputation: Reputation,
        rng: RandomSource,
        snapshot: JobSnapshot | None = None,
    ) -> None:
        if spec.owner != owner.node_id:
            raise LocalProtocolError("a job is run by its owner")
        self.spec, self.config = spec, config
        self.job_id = spec.job_id
        self._owner = owner
        self._reputation = reputation
        self._rng = rng
        self._snap = snapshot or JobSnapshot()
        self._state = _S.DONE if self._snap.done else _S.WAITING
        self._repay = self._snap.last_winner is not None
        self._round: Round | None = None
        self._last_commit: SegmentCommit | None = None
        self._reoffer_at = math.inf
        self._backoff = config.reoffer_s
        self._attempt = 0
        self._stats: Counter[str] = Counter()
        self._out: list[OwnerEffect] = []

    # -- offer and award ---------------------------------------------------------------

    def _open_offer(self, now: float) -> None:
        offer = self._next_offer(now, self.spec.extent_s)
        self._attempt = offer.ref.attempt
        self._round = Round(offer, Auctioneer(offer, now, self.config.auction, self._reputation))
        self._reoffer_at = math.inf
        self._stats["offers"] += 1
        self._move(JobStep.OFFER)
        self._emit(BroadcastOffer(offer))

    def _next_offer(self, now: float, extent_s: int, source: NodeId | None = None) -> Offer:
        """The current segment's next attempt, from the last commit (attempts never repeat)."""
        spec, snap = self.spec, self._snap
        self._snap = replace(snap, next_attempt=snap.next_attempt + 1)
        return sign_offer(
            self._owner,
            job_nonce=spec.nonce,
            segment=snap.segment,
            attempt=snap.next_attempt,
            image=spec.image,
            requirements=spec.requirements,
            extent_s=extent_s,
            checkpoint=snap.manifest,
            checkpoint_size=snap.size,
            holders=snap.holders,
            k=spec.k,
            ceiling=spec.ceiling,
            bid_deadline=math.ceil(now + self.config.auction.bid_window_s),
            args=spec.args,
            source=source,
            work=spec.work,
        )

    def _maybe_close(self, auction: Auctioneer, now: float) -> None:
        round_ = self._round
        if round_ is None or round_.auction is not auction or not auction.ready(now):
            return
        round_.auction = None
        picks = auction.select(self._rng)
        if not picks:
            self._stats["auctions_empty"] += 1
            self._reoffer_at = now + self._backoff
            self._backoff = min(2 * self._backoff, self.config.max_reoffer_s)
            return
        self._backoff = self.config.reoffer_s
        winners = tuple(self._winner(p.bid.host, p.bid.price) for p in picks)
        award = sign_award(self._owner, round_.offer.ref, winners)
        for pick in picks:
            node = pick.bid.host
            round_.replicas[node] = Replica(node, pick.bid.price, pick.bid.finish_s)
            self._reputation.awarded(node)
        slowest = max(p.bid.finish_s for p in picks)
        round_.awarded_at = now
        round_.run_deadline = now + slowest * self.config.finish_slack + self.config.run_grace_s
        self._stats["awards"] += 1
        self._move(JobStep.AWARD)
        self._emit(PersistJob(self.job_id, self._snap))
        for bid in auction.bids:
            self._emit(SendStatement(bid.host, MarketKind.AWARD, award.blob))

    def _winner(self, node: NodeId, price: int) -> Winner:
        if not self.spec.network:
            return Winner(node, price)
        epoch = self._snap.next_epoch
        self._snap = replace(self._snap, next_epoch=epoch + 1)
        grant = sign_grant(
            self._owner,
            swarm_id=self.config.swarm_id,
            job_nonce=self.spec.nonce,
            node_id=node,
            epoch=epoch,
            expires=self.spec.deadline,
        )
        return Winner(node, price, epoch, grant)

    # -- verification and commit -------------------------------------------------------

    def _verify(self, round_: Round, node: NodeId) -> None:
        completion = round_.replicas[node].completion
        assert completion is not None
        self._emit(
            VerifyCompletion(
                self.job_id,
                round_.offer.ref.segment,
                node,
                completion.manifest,
                completion.progress,
                round_.offer.checkpoint,
                completion.halted,
            )
        )

    def _maybe_commit(self, round_: Round, now: float) -> None:
        completion = round_.winning()
        holders = tuple(round_.copies[completion.manifest])[:MAX_HOLDERS]
        if len(holders) < self.config.min_holders:
            self._ask_replication(round_, now)
            return
        winner = round_.replicas[completion.host]
        commit = sign_commit(
            self._owner,
            round_.offer.ref,
            winner=winner.node,
            manifest=completion.manifest,
            size=completion.size,
            holders=holders,
        )
        previous, snap = self._snap.holders, self._snap
        last = self.spec.segments is not None and snap.segment + 1 >= self.spec.segments
        done = completion.halted or last
        self._snap = replace(
            snap,
            segment=snap.segment + 1,
            manifest=completion.manifest,
            size=completion.size,
            holders=holders,
            done=done,
            last_winner=winner.node,
            last_price=winner.price,
        )
        self._last_commit, self._round = commit, None
        self._stats["commits"] += 1
        self._move(JobStep.COMMIT, segment=snap.segment)
        self._emit(PersistJob(self.job_id, self._snap))
        self._emit(PayWinner(self.job_id, snap.segment, winner.node, winner.price))
        for node in dict.fromkeys((*holders, *previous)):
            if node != self._owner.node_id:
                self._emit(SendStatement(node, MarketKind.COMMIT, commit.blob))
        if done:
            self._move(JobStep.FINISH)
            outcome = "halted" if completion.halted else "completed"
            self._emit(FinishJob(self.job_id, outcome, completion.manifest))
        else:
            self._open_offer(now)

    def _ask_replication(self, round_: Round, now: float) -> None:
        completion = round_.winning()
        holders = tuple(round_.copies[completion.manifest])
        spare = [r.node for r in round_.replicas.values() if not r.lost]
        targets = tuple(n for n in (*spare, self._owner.node_id) if n not in holders)
        round_.replicate_at = now + self.config.replicate_retry_s
        self._stats["replications_asked"] += 1
        self._emit(
            ReplicateCheckpoint(
                self.job_id, round_.offer.ref.segment, completion.manifest, holders, targets
            )
        )

    # -- cancel, abandon, expire -------------------------------------------------------

    def _cancel(
        self, round_: Round, nodes: tuple[NodeId, ...], reason: CancelReason, mark: bool = True
    ) -> None:
        if not nodes:
            return
        cancel = sign_cancel(self._owner, round_.offer.ref, nodes, reason)
        for node in nodes:
            if mark:
                round_.replicas[node].cancelled = True
            self._emit(SendStatement(node, MarketKind.CANCEL, cancel.blob))

    def _abandon(self, round_: Round, now: float) -> None:
        """Give the attempt up and offer the segment again from the last commit."""
        self._stats["abandoned"] += 1
        live = tuple(r.node for r in round_.replicas.values() if not r.cancelled)
        self._cancel(round_, live, CancelReason.ABANDONED)
        self._open_offer(now)

    def _expire(self) -> None:
        if self._round is not None:
            live = tuple(r.node for r in self._round.replicas.values() if not r.cancelled)
            self._cancel(self._round, live, CancelReason.JOB_ENDED)
        self._round = None
        self._snap = replace(self._snap, done=True)
        self._move(JobStep.EXPIRE)
        self._emit(PersistJob(self.job_id, self._snap))
        self._emit(FinishJob(self.job_id, "expired", self._snap.manifest))

    # -- helpers -----------------------------------------------------------------------

    def _judge_ref(self, ref: OfferRef, round_: Round | None) -> None:
        if ref.job_id != self.job_id:
            raise MarketRefused(MarketRefusal.UNKNOWN_OFFER, "names another job")
        if round_ is None or ref != round_.offer.ref:
            raise MarketRefused(MarketRefusal.STALE, "names an earlier segment or attempt")

    def _replica(self, node: NodeId) -> Replica | None:
        return self._round.replicas.get(node) if self._round is not None else None

    def _any_alive(self, round_: Round) -> bool:
        return any(not r.lost and not r.cancelled for r in round_.replicas.values())

    def _move(self, step: JobStep, segment: int | None = None) -> None:
        new = TRANSITIONS.get((self._state, step))
        if new is None:
            raise LocalProtocolError(f"segment machine: no {step.value} from {self._state.value}")
        self._state = new
        segment = self._snap.segment if segment is None else segment
        self._emit(ReportSegment(self.job_id, segment, self._attempt, new))

    def _emit(self, effect: OwnerEffect) -> None:
        self._out.append(effect)

    def _drain(self) -> list[OwnerEffect]:
        out, self._out = self._out, []
        return out
