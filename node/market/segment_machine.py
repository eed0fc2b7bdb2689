"""The owner's segment machine: run a job segment by segment through the market.

Theory of operation
-------------------
``SegmentMachine`` is the job owner's sans-IO core for one job (node/market/jobs.py):
``handle(event, now)`` and ``tick(now)`` return effects, ``next_wakeup()`` says
when ``tick`` has work; ties in the auction are broken by the rng handed in.
One segment runs at a time, from the last committed checkpoint; every offer of
it is a new *attempt* (messages name the attempt, so an abandoned one cannot be
mistaken for the current one). The states and the one transition table, drawn,
are in node/market/jobs.py (``TRANSITIONS``); ``_move`` refuses any other step.

*First valid completion wins.* Completions are verified one at a time in
arrival order; the first that verifies is the winner, and only then are the
other replicas cancelled (a loser keeps running while the leader is checked, a
free backup if the leader's checkpoint is bad). One segment has one winner.

*Commit, then pay.* The winner's checkpoint must be held by ``min_holders``
nodes: the winner, any replica whose checkpoint is byte-identical, and every
node that reports ``CheckpointReplicated`` (the owner after verifying it, or the
nodes ``ReplicateCheckpoint`` asks). Then ``PersistJob``, ``PayWinner`` (the
winner's award price, for ``PayerLedger.pay_winner``), COMMIT to the new and the
previous holders, and the next offer. Paying at commit, not at verification,
keeps one payment per segment index even when a winner vanishes before its
checkpoint is safe: that segment is then run again, and the ledger keys
payments by (job, segment).

*Failures.* A replica lost, or past the run deadline (``finish_slack`` times
the slowest winner's estimate plus ``run_grace_s``), is charged to its host's
reputation; the others go on. A completion that fails verification is charged
double and the next queued one is verified.

*Live hand-off.* A network job's sole replica whose host must leave (a drain)
is moved, not restarted: its host's live WITHDRAW (with the vCPU time used)
opens a *move* auction beside the running round, for the rest of the extent,
with ``source`` naming that host. The guest keeps running meanwhile. If the
move finds a host, that host is awarded (with the next route epoch) and its
round replaces the current one; the source migrates the guest to it
(node/market/handoff.py) and the segment is verified and paid as usual, to whoever
completes it. If it finds none, nothing changes: the source falls back to
checkpointing where it is, a completion of the running round.

*Owner offline.* A machine that gets no events does not move: the job waits
where it is and the hosts keep their checkpoints, resending completions. On
``OwnerResumed`` the machine re-offers an open auction, gives running replicas
``resume_grace_s`` more (losses it then sees in that attempt are not charged:
the owner was away), and re-asks for pending verification and replication. Feed
``OwnerResumed`` before ``tick`` after an absence.

*Persistence.* Effects are carried out in order, and ``PersistJob`` must be
durable before the effects after it: the route epochs in an award, the
checkpoint in a commit. A machine restored from a ``JobSnapshot`` waits at
that boundary and asks again for the last payment on ``OwnerResumed``.

Invariants
----------
- At most one winner per segment index; ``PayWinner`` once per segment index,
  only to the first completer (in arrival order) whose completion verified
  (after a restore, once more for the last commit, which the ledger refuses).
- Awards name at most k distinct hosts; route epochs and attempts never repeat.
- Nothing a peer sends raises: refusals are counted as ``refused_<reason>``. A
  completion for an abandoned attempt is refused and answered with a CANCEL, so
  its host stops resending it.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field, replace

from node.base.identity import Identity, NodeId
from node.base.wire import LocalProtocolError, RemoteProtocolError
from node.market.auction import AuctionConfig, Auctioneer
from node.market.jobs import (
    IN_FLIGHT,
    TRANSITIONS,
    BidReceived,
    CheckpointReplicated,
    CompletionReceived,
    CompletionVerified,
    JobFinished,
    JobSnapshot,
    JobSpec,
    JobStep,
    OfferDelivered,
    OwnerEffect,
    OwnerEvent,
    OwnerResumed,
    PayWinner,
    PersistJob,
    ReplicaLost,
    ReplicaStarted,
    ReplicateCheckpoint,
    SegmentChanged,
    SegmentState,
    VerifyCompletion,
    WithdrawReceived,
)
from node.market.messages import (
    MAX_HOLDERS,
    BroadcastOffer,
    CancelReason,
    Completion,
    MarketKind,
    MarketRefusal,
    MarketRefused,
    Offer,
    OfferRef,
    SegmentCommit,
    SendStatement,
    Winner,
    Withdraw,
    decode_bid,
    decode_completion,
    decode_withdraw,
    refusal_of,
    sign_award,
    sign_cancel,
    sign_commit,
    sign_offer,
)
from node.market.reputation import Reputation
from node.membership.dissemination import RandomSource
from overlay.claims import sign_grant

_S = SegmentState


@dataclass(frozen=True, slots=True)
class MachineConfig:
    swarm_id: str  # route grants name it
    auction: AuctionConfig = field(default_factory=AuctionConfig)
    reoffer_s: float = 5.0  # first wait before re-offering after an empty auction; doubles
    max_reoffer_s: float = 300.0
    finish_slack: float = 2.0
    run_grace_s: float = 60.0
    resume_grace_s: float = 120.0
    replicate_retry_s: float = 60.0
    min_holders: int = 2

    def __post_init__(self) -> None:
        if not 0 < self.reoffer_s <= self.max_reoffer_s or self.finish_slack < 1:
            raise ValueError("need 0 < reoffer_s <= max_reoffer_s and finish_slack >= 1")
        if not 1 <= self.min_holders <= MAX_HOLDERS or self.replicate_retry_s <= 0:
            raise ValueError(f"need 1 <= min_holders <= {MAX_HOLDERS}, replicate_retry_s > 0")


# -- the core --------------------------------------------------------------------------


@dataclass(slots=True)
class _Replica:
    node: NodeId
    price: int
    estimate_s: int
    lost: bool = False
    cancelled: bool = False
    completion: Completion | None = None
    completed_at: float = 0.0

    @property
    def running(self) -> bool:
        return not self.lost and not self.cancelled and self.completion is None


@dataclass(slots=True)
class _Move:
    """The auction for a live hand-off; the guest still runs at ``offer.source``."""

    offer: Offer
    auction: Auctioneer


@dataclass(slots=True)
class _Round:
    """One attempt of one segment."""

    offer: Offer
    auction: Auctioneer | None
    replicas: dict[NodeId, _Replica] = field(default_factory=dict)
    awarded_at: float = 0.0
    run_deadline: float = math.inf
    queue: list[NodeId] = field(default_factory=list)  # completed, not yet verified
    candidate: NodeId | None = None  # being verified
    winner: NodeId | None = None  # verified
    copies: dict[bytes, dict[NodeId, None]] = field(default_factory=dict)  # manifest -> nodes
    replicate_at: float = math.inf
    excused: bool = False  # the owner was away: losses are not the hosts' fault
    move: _Move | None = None  # a live hand-off of the sole replica, being auctioned

    def winning(self) -> Completion:
        assert self.winner is not None
        completion = self.replicas[self.winner].completion
        assert completion is not None
        return completion


class SegmentMachine:
    """One job, run by its owner. See the module docstring."""

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
        self._round: _Round | None = None
        self._last_commit: SegmentCommit | None = None
        self._reoffer_at = math.inf
        self._backoff = config.reoffer_s
        self._attempt = 0
        self._stats: Counter[str] = Counter()
        self._out: list[OwnerEffect] = []

    @property
    def state(self) -> SegmentState:
        return self._state

    @property
    def segment(self) -> int:
        """The segment running or next to run."""
        return self._snap.segment

    @property
    def attempt(self) -> int:
        return self._attempt

    def snapshot(self) -> JobSnapshot:
        return self._snap

    def statistics(self) -> dict[str, int]:
        return dict(self._stats)

    def handle(self, event: OwnerEvent, now: float) -> list[OwnerEffect]:
        try:
            if isinstance(event, OwnerResumed):
                self._resume(now)
            elif isinstance(event, BidReceived):
                self._on_bid(event.blob, now)
            elif isinstance(event, OfferDelivered):
                auction = self._round.auction if self._round else None
                move = self._round.move if self._round else None
                if auction is not None and auction.offer.ref.attempt == event.attempt:
                    auction.expect(event.recipients)
                    self._maybe_close(auction, now)
                elif move is not None and move.offer.ref.attempt == event.attempt:
                    move.auction.expect(event.recipients)
                    self._maybe_close_move(now)
            elif isinstance(event, ReplicaStarted):
                replica = self._replica(event.node)
                if self._state is _S.AWARDED and replica is not None and replica.running:
                    self._move(JobStep.START)
            elif isinstance(event, ReplicaLost):
                self._on_lost(event.node, now)
            elif isinstance(event, CompletionReceived):
                self._on_completion(decode_completion(event.blob), now)
            elif isinstance(event, WithdrawReceived):
                self._on_withdraw(decode_withdraw(event.blob), now)
            elif isinstance(event, CompletionVerified):
                self._on_verified(event, now)
            elif isinstance(event, CheckpointReplicated):
                self._on_replicated(event, now)
        except RemoteProtocolError as exc:
            self._stats[f"refused_{refusal_of(exc).value}"] += 1
        return self._drain()

    def tick(self, now: float) -> list[OwnerEffect]:
        if self._state is _S.DONE:
            return []
        if now >= self.spec.deadline:
            self._expire()
            return self._drain()
        round_ = self._round
        if self._state is _S.OFFERED and round_ is not None:
            if round_.auction is not None:
                self._maybe_close(round_.auction, now)
            elif now >= self._reoffer_at:
                self._open_offer(now)
        elif self._state in IN_FLIGHT and round_ is not None:
            if round_.move is not None:
                self._maybe_close_move(now)
            if now >= round_.run_deadline:
                self._run_out(round_, now)
            if round_.winner is not None and now >= round_.replicate_at:
                self._ask_replication(round_, now)
        return self._drain()

    def next_wakeup(self) -> float:
        if self._state is _S.DONE:
            return math.inf
        wakeup, round_ = float(self.spec.deadline), self._round
        if self._state is _S.OFFERED and round_ is not None:
            auction = round_.auction
            wakeup = min(wakeup, auction.deadline if auction is not None else self._reoffer_at)
        elif self._state in IN_FLIGHT and round_ is not None:
            wakeup = min(wakeup, round_.run_deadline, round_.replicate_at)
            if round_.move is not None:
                wakeup = min(wakeup, round_.move.auction.deadline)
        return wakeup

    # -- offer and award ---------------------------------------------------------------

    def _resume(self, now: float) -> None:
        round_, snap = self._round, self._snap
        if self._state is _S.DONE:
            return
        if self._repay and snap.last_winner is not None:
            self._repay = False
            self._emit(PayWinner(self.job_id, snap.segment - 1, snap.last_winner, snap.last_price))
        if self._state in (_S.WAITING, _S.OFFERED) or round_ is None:
            self._open_offer(now)
            return
        round_.excused = True
        round_.run_deadline = max(round_.run_deadline, now + self.config.resume_grace_s)
        if round_.candidate is not None:
            self._verify(round_, round_.candidate)
        if round_.winner is not None:
            self._ask_replication(round_, now)

    def _open_offer(self, now: float) -> None:
        offer = self._next_offer(now, self.spec.extent_s)
        self._attempt = offer.ref.attempt
        self._round = _Round(offer, Auctioneer(offer, now, self.config.auction, self._reputation))
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
        )

    def _on_bid(self, blob: bytes, now: float) -> None:
        bid = decode_bid(blob)
        round_ = self._round
        move = round_.move if round_ is not None else None
        if move is not None and bid.ref == move.offer.ref:
            if bid.host == move.offer.source:
                raise MarketRefused(MarketRefusal.UNFIT, "the source of a move cannot take it")
            self._stats[f"bids_{move.auction.add_bid(bid, now).value}"] += 1
            self._maybe_close_move(now)
            return
        self._judge_ref(bid.ref, round_)
        assert round_ is not None
        auction = round_.auction
        if auction is None or self._state is not _S.OFFERED:
            raise MarketRefused(MarketRefusal.LATE, f"bid from {bid.host.short} after the award")
        self._stats[f"bids_{auction.add_bid(bid, now).value}"] += 1
        self._maybe_close(auction, now)

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
            round_.replicas[node] = _Replica(node, pick.bid.price, pick.bid.finish_s)
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

    # -- replicas, completions, verification -------------------------------------------

    def _on_completion(self, completion: Completion, now: float) -> None:
        round_ = self._round
        last = self._last_commit
        if last is not None and completion.ref == last.ref and completion.host in last.holders:
            self._stats["commits_resent"] += 1  # our commit was lost: the host still asks
            self._emit(SendStatement(completion.host, MarketKind.COMMIT, last.blob))
            return
        stale = completion.ref.job_id == self.job_id and (
            round_ is None or completion.ref != round_.offer.ref
        )
        if stale:  # an abandoned attempt, or a lost cancel: tell the host to stop asking
            cancel = sign_cancel(
                self._owner, completion.ref, (completion.host,), CancelReason.ABANDONED
            )
            self._emit(SendStatement(completion.host, MarketKind.CANCEL, cancel.blob))
        self._judge_ref(completion.ref, round_)
        assert round_ is not None
        replica = round_.replicas.get(completion.host)
        if replica is None:
            raise MarketRefused(
                MarketRefusal.NOT_AWARDED, f"{completion.host.short} was not awarded"
            )
        if replica.completion is not None and replica.completion.blob != completion.blob:
            raise MarketRefused(MarketRefusal.EQUIVOCATION, f"{replica.node.short} completed twice")
        if replica.cancelled:  # the cancel crossed it, or was lost: say it again
            self._stats["cancels_resent"] += 1
            self._cancel(round_, (replica.node,), CancelReason.LOST_RACE, mark=False)
            return
        if replica.completion is not None:
            self._stats["completions_duplicate"] += 1
            return
        replica.completion, replica.completed_at, replica.lost = completion, now, False
        self._stats["completions"] += 1
        if round_.candidate is None and round_.winner is None:
            round_.candidate = replica.node
            self._move(JobStep.COMPLETE)
            self._verify(round_, replica.node)
        else:
            round_.queue.append(replica.node)

    def _verify(self, round_: _Round, node: NodeId) -> None:
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
            )
        )

    def _on_verified(self, event: CompletionVerified, now: float) -> None:
        round_ = self._round
        if round_ is None or round_.candidate != event.node:
            self._stats["verifications_ignored"] += 1
            return
        replica = round_.replicas[event.node]
        if replica.completion is None or replica.completion.manifest != event.manifest:
            self._stats["verifications_ignored"] += 1
            return
        round_.candidate = None
        if not event.ok:
            self._stats["verifications_failed"] += 1
            replica.lost = True
            self._reputation.failed(replica.node, bad_completion=True)
            self._cancel(round_, (replica.node,), CancelReason.LOST_RACE)
            self._next_candidate(round_, now)
            return
        self._stats["verified"] += 1
        round_.winner = replica.node
        manifest = replica.completion.manifest
        copies = round_.copies.setdefault(manifest, {})
        for other in round_.replicas.values():
            if other.completion is not None and not other.lost:
                took = other.completed_at - round_.awarded_at
                self._reputation.completed(other.node, other.estimate_s, took)
                if other.completion.manifest == manifest:
                    copies[other.node] = None
        copies.pop(replica.node, None)
        holders = round_.copies[manifest] = {replica.node: None, **copies}  # the winner first
        round_.queue.clear()
        losers = [r.node for r in round_.replicas.values() if r.node not in holders]
        losers = [node for node in losers if not round_.replicas[node].cancelled]
        self._cancel(round_, tuple(losers), CancelReason.LOST_RACE)
        self._maybe_commit(round_, now)

    def _next_candidate(self, round_: _Round, now: float) -> None:
        while round_.queue:
            node = round_.queue.pop(0)
            replica = round_.replicas[node]
            if not replica.lost and not replica.cancelled:
                round_.candidate = node
                self._verify(round_, node)
                return
        if any(r.running for r in round_.replicas.values()):
            self._move(JobStep.REJECT)
        else:
            self._abandon(round_, now)

    def _on_withdraw(self, withdraw: Withdraw, now: float) -> None:
        self._judge_ref(withdraw.ref, self._round)
        replica = self._replica(withdraw.host)
        if replica is None:
            raise MarketRefused(MarketRefusal.NOT_AWARDED, f"{withdraw.host.short} was not awarded")
        if withdraw.live:
            self._open_move(replica, withdraw, now)
            return
        self._stats["withdrawals"] += 1
        self._on_lost(withdraw.host, now)

    # -- live hand-off -----------------------------------------------------------------

    def _open_move(self, replica: _Replica, withdraw: Withdraw, now: float) -> None:
        """Auction the rest of the segment to a host the running guest can migrate to."""
        round_ = self._round
        assert round_ is not None
        movable = (
            self.spec.network
            and self.spec.k == 1
            and replica.running
            and self._state in (_S.AWARDED, _S.RUNNING)
            and round_.move is None
        )
        if not movable:
            self._stats["moves_refused"] += 1  # its host checkpoints where it is instead
            return
        rest = max(1, round_.offer.extent_s - withdraw.used_ms // 1000)
        move = self._next_offer(now, rest, source=replica.node)  # the round's checkpoint too
        round_.move = _Move(move, Auctioneer(move, now, self.config.auction, self._reputation))
        self._stats["moves_offered"] += 1
        self._emit(BroadcastOffer(move))

    def _maybe_close_move(self, now: float) -> None:
        round_ = self._round
        move = round_.move if round_ is not None else None
        if round_ is None or move is None or not move.auction.ready(now):
            return
        round_.move = None
        source = self._replica(move.offer.source) if move.offer.source else None
        picks = move.auction.select(self._rng)
        if not picks or source is None or not source.running or round_.winner is not None:
            self._stats["moves_unplaced"] += 1  # the guest stays; its host checkpoints
            return
        pick = picks[0]
        node = pick.bid.host
        award = sign_award(self._owner, move.offer.ref, (self._winner(node, pick.bid.price),))
        moved = _Round(move.offer, None)
        moved.replicas[node] = _Replica(node, pick.bid.price, pick.bid.finish_s)
        moved.awarded_at = now
        slack, grace = self.config.finish_slack, self.config.run_grace_s
        moved.run_deadline = now + pick.bid.finish_s * slack + grace
        self._reputation.awarded(node)
        self._round, self._attempt = moved, move.offer.ref.attempt
        self._stats["moves_awarded"] += 1
        self._emit(PersistJob(self.job_id, self._snap))
        for bid in move.auction.bids:
            self._emit(SendStatement(bid.host, MarketKind.AWARD, award.blob))

    def _on_lost(self, node: NodeId, now: float) -> None:
        round_ = self._round
        for copies in round_.copies.values() if round_ is not None else ():
            copies.pop(node, None)
        replica = self._replica(node)
        if round_ is None or replica is None or replica.lost or replica.cancelled:
            self._stats["losses_ignored"] += 1
            return
        replica.lost = True
        self._stats["replicas_lost"] += 1
        if not round_.excused:
            self._reputation.failed(node)
        if node == round_.winner:
            if round_.copies[round_.winning().manifest]:  # others hold it: replicate from them
                self._ask_replication(round_, now)
            else:
                self._abandon(round_, now)
        elif node == round_.candidate:
            round_.candidate = None
            self._next_candidate(round_, now)
        elif self._state in (_S.AWARDED, _S.RUNNING) and not self._any_alive(round_):
            self._abandon(round_, now)

    def _run_out(self, round_: _Round, now: float) -> None:
        """The run deadline passed: replicas still running are lost."""
        round_.run_deadline = math.inf
        for replica in round_.replicas.values():
            if replica.running:
                replica.lost = True
                self._stats["replicas_timed_out"] += 1
                if not round_.excused:
                    self._reputation.failed(replica.node)
        if self._state is not _S.COMPLETED and not self._any_alive(round_):
            self._abandon(round_, now)

    def _abandon(self, round_: _Round, now: float) -> None:
        """Give the attempt up and offer the segment again from the last commit."""
        self._stats["abandoned"] += 1
        live = tuple(r.node for r in round_.replicas.values() if not r.cancelled)
        self._cancel(round_, live, CancelReason.ABANDONED)
        self._open_offer(now)

    # -- commit ------------------------------------------------------------------------

    def _on_replicated(self, event: CheckpointReplicated, now: float) -> None:
        round_ = self._round
        known = round_ is not None and any(
            r.completion is not None and r.completion.manifest == event.manifest
            for r in round_.replicas.values()
        )
        if round_ is None or not known or self._state is not _S.COMPLETED:
            self._stats["replications_ignored"] += 1
            return
        round_.copies.setdefault(event.manifest, {})[event.node] = None
        self._stats["replications"] += 1
        if round_.winner is not None:
            self._maybe_commit(round_, now)

    def _maybe_commit(self, round_: _Round, now: float) -> None:
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
            self._emit(JobFinished(self.job_id, outcome, completion.manifest))
        else:
            self._open_offer(now)

    def _ask_replication(self, round_: _Round, now: float) -> None:
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

    # -- helpers -----------------------------------------------------------------------

    def _expire(self) -> None:
        if self._round is not None:
            live = tuple(r.node for r in self._round.replicas.values() if not r.cancelled)
            self._cancel(self._round, live, CancelReason.JOB_ENDED)
        self._round = None
        self._snap = replace(self._snap, done=True)
        self._move(JobStep.EXPIRE)
        self._emit(PersistJob(self.job_id, self._snap))
        self._emit(JobFinished(self.job_id, "expired", self._snap.manifest))

    def _cancel(
        self, round_: _Round, nodes: tuple[NodeId, ...], reason: CancelReason, mark: bool = True
    ) -> None:
        if not nodes:
            return
        cancel = sign_cancel(self._owner, round_.offer.ref, nodes, reason)
        for node in nodes:
            if mark:
                round_.replicas[node].cancelled = True
            self._emit(SendStatement(node, MarketKind.CANCEL, cancel.blob))

    def _judge_ref(self, ref: OfferRef, round_: _Round | None) -> None:
        if ref.job_id != self.job_id:
            raise MarketRefused(MarketRefusal.UNKNOWN_OFFER, "names another job")
        if round_ is None or ref != round_.offer.ref:
            raise MarketRefused(MarketRefusal.STALE, "names an earlier segment or attempt")

    def _replica(self, node: NodeId) -> _Replica | None:
        return self._round.replicas.get(node) if self._round is not None else None

    def _any_alive(self, round_: _Round) -> bool:
        return any(not r.lost and not r.cancelled for r in round_.replicas.values())

    def _move(self, step: JobStep, segment: int | None = None) -> None:
        new = TRANSITIONS.get((self._state, step))
        if new is None:
            raise LocalProtocolError(f"segment machine: no {step.value} from {self._state.value}")
        self._state = new
        segment = self._snap.segment if segment is None else segment
        self._emit(SegmentChanged(self.job_id, segment, self._attempt, new))

    def _emit(self, effect: OwnerEffect) -> None:
        self._out.append(effect)

    def _drain(self) -> list[OwnerEffect]:
        out, self._out = self._out, []
        return out
