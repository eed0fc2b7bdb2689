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

Where things are: the machine's settings and its round and replica records in
node/market/segment_rounds.py; its state and the steps it takes on its own
account (the transition, offers, awards, verification, commit, cancels) in
node/market/segment_actions.py; here, how it reacts to events and time.
"""

from __future__ import annotations

import math

from node.base.identity import NodeId
from node.base.wire import RemoteProtocolError
from node.market.auction import Auctioneer
from node.market.jobs import (
    IN_FLIGHT,
    BidReceived,
    CheckpointReplicated,
    CompletionReceived,
    CompletionVerified,
    JobSnapshot,
    JobStep,
    OfferDelivered,
    OwnerEffect,
    OwnerEvent,
    OwnerResumed,
    PayWinner,
    PersistJob,
    ReplicaLost,
    ReplicaStarted,
    SegmentState,
    WithdrawReceived,
)
from node.market.message_fields import MarketKind, MarketRefusal, MarketRefused, refusal_of
from node.market.messages import BroadcastOffer, SendStatement
from node.market.offer_messages import decode_bid, sign_award
from node.market.outcome_messages import (
    CancelReason,
    Completion,
    Withdraw,
    decode_completion,
    decode_withdraw,
    sign_cancel,
)
from node.market.segment_actions import SegmentActions
from node.market.segment_rounds import MoveAuction, Replica, Round

_S = SegmentState


class SegmentMachine(SegmentActions):
    """One job, run by its owner. See the module docstring."""

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
                    self._expect(auction, event)
                    self._maybe_close(auction, now)
                elif move is not None and move.offer.ref.attempt == event.attempt:
                    self._expect(move.auction, event)
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

    def _expect(self, auction: Auctioneer, event: OfferDelivered) -> None:
        before = auction.dropped
        auction.expect(event.recipients, event.hosts)
        if auction.dropped > before:  # bids from hosts the offer never reached
            self._stats[f"refused_{MarketRefusal.NOT_OFFERED.value}"] += auction.dropped - before

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

    # -- events ------------------------------------------------------------------------

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

    def _next_candidate(self, round_: Round, now: float) -> None:
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

    # -- losses and withdrawals --------------------------------------------------------

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

    def _run_out(self, round_: Round, now: float) -> None:
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

    def _open_move(self, replica: Replica, withdraw: Withdraw, now: float) -> None:
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
        round_.move = MoveAuction(
            move, Auctioneer(move, now, self.config.auction, self._reputation)
        )
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
        moved = Round(move.offer, None)
        moved.replicas[node] = Replica(node, pick.bid.price, pick.bid.finish_s)
        moved.awarded_at = now
        slack, grace = self.config.finish_slack, self.config.run_grace_s
        moved.run_deadline = now + pick.bid.finish_s * slack + grace
        self._reputation.awarded(node)
        self._round, self._attempt = moved, move.offer.ref.attempt
        self._stats["moves_awarded"] += 1
        self._emit(PersistJob(self.job_id, self._snap))
        for bid in move.auction.bids:
            self._emit(SendStatement(bid.host, MarketKind.AWARD, award.blob))
