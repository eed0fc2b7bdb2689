"""The owners' side of the simulated market: job machines, payers, and their effects.

Theory of operation
-------------------
``OwnerSide`` is the half of ``MarketWorld`` (node/sim/market_world.py) that
plays the job owners, as node/runtime/market_owner.py and node/runtime/ledger_service.py do in
the agent: it routes bids, completions and withdrawals to each job's
``SegmentMachine`` (by the job id the message names), acks to the
``PayerLedger``, and carries out their effects: offers to a sample of the
membership view (``OfferDelivered`` after the batch), statements, the
modelled fetch and check of a completion, checkpoint replication (to the
owner itself, as the agent does), payment at
commit (a chain opened on ``ChainNeeded``, as ``LedgerService.pay`` does).
It also turns a membership death into ``ReplicaLost`` for every job unless
the host is back. The world's state it uses is declared below.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from typing import Any, Protocol

from node.base.identity import NodeId
from node.base.wire import RemoteProtocolError
from node.ledger.effects import EffectQueue, open_chain
from node.ledger.journal import Persist, Persisted, Refused
from node.ledger.payer import (
    AckReceived,
    ChainNeeded,
    PaymentRequested,
    SendPayment,
)
from node.ledger.tokens import HashChain
from node.market.jobs import (
    BidReceived,
    CheckpointReplicated,
    CompletionReceived,
    CompletionVerified,
    JobFinished,
    OfferDelivered,
    OwnerResumed,
    PayWinner,
    ReplicaLost,
    ReplicateCheckpoint,
    SegmentChanged,
    SegmentState,
    VerifyCompletion,
    WithdrawReceived,
)
from node.market.messages import BroadcastOffer, MarketKind, Offer, SendStatement, peek_job
from node.sim.engine import Simulator
from node.sim.market_invariants import MarketInvariants
from node.sim.market_parts import (
    LEDGER_PAYMENT,
    Frame,
    SimHost,
    SimOwner,
    Timer,
    WorldConfig,
)


class SendFrame(Protocol):
    """Send one market or ledger frame through the world's network model."""

    def __call__(
        self,
        sender: NodeId,
        target: NodeId,
        channel: str,
        kind: int,
        blob: bytes,
        offer: Offer | None = None,
    ) -> None: ...


class OwnerSide:
    """The owners' half of ``MarketWorld``; see the module docstring."""

    sim: Simulator
    config: WorldConfig
    rng: random.Random
    hosts: list[SimHost]
    owners: list[SimOwner]
    by_node: dict[NodeId, tuple[str, int]]
    live: list[int]
    stats: Counter[str]
    commits: dict[tuple[bytes, int], tuple[NodeId, int, float]]
    chains: dict[bytes, HashChain]
    first_offer: float | None
    finished: dict[bytes, float]
    watch: MarketInvariants
    _committing: dict[tuple[bytes, int], tuple[int, float]]
    _wake_at: dict[Any, float]
    _send: SendFrame  # the world's network model

    def _owner_event(self, owner: SimOwner, event: Any, now: float) -> None:
        if isinstance(event, Frame):
            self._owner_frame(owner, event, now)
            return
        what, args = event.what, event.args
        if what == "submit":
            self._feed(owner, args[0], OwnerResumed(), now)
        elif what == "wake":
            if self._wake_at.get(("o", owner.index), math.inf) <= now:
                del self._wake_at[("o", owner.index)]
            for job_id, machine in owner.machines.items():
                self._owner_effects(owner, job_id, machine.tick(now), now)
            self._payer_effects(owner, owner.payer.tick(now), now)
        elif what == "delivered":
            self._feed(owner, args[0], OfferDelivered(args[1], args[2]), now)
        elif what == "member_lost":
            host = self.hosts[args[0]]
            if host.down_since is None:
                self.stats["losses_refuted"] += 1
                return
            for job_id in owner.machines:
                if job_id not in self.finished:
                    self._feed(owner, job_id, ReplicaLost(host.identity.node_id), now)
        elif what == "fetched":
            self._fetched(owner, now, *args)
        elif what == "verified":
            job_id, node, manifest = args
            owner.store.add(manifest)  # fetched to verify: replicating it here is a no-op
            self._feed(owner, job_id, CompletionVerified(node, manifest, True), now)
            replicated = CheckpointReplicated(owner.identity.node_id, manifest)
            self._feed(owner, job_id, replicated, now)
        elif what == "replicated":
            job_id, manifest, index, generation = args
            if index >= 0 and self.hosts[index].generation != generation:
                self.stats["replications_failed"] += 1  # the source went down: asked again
                return
            owner.store.add(manifest)
            self._feed(owner, job_id, CheckpointReplicated(owner.identity.node_id, manifest), now)

    def _owner_frame(self, owner: SimOwner, frame: Frame, now: float) -> None:
        if frame.channel == "ledger":
            self._payer_effects(owner, owner.payer.handle(AckReceived(frame.blob), now), now)
            return
        try:
            job_id = peek_job(frame.blob)
        except RemoteProtocolError:
            self.stats["owner_refused_malformed"] += 1
            return
        event = {
            MarketKind.BID: BidReceived,
            MarketKind.COMPLETION: CompletionReceived,
            MarketKind.WITHDRAW: WithdrawReceived,
        }.get(MarketKind(frame.kind))
        if event is None or job_id not in owner.machines:
            self.stats["owner_frames_unexpected"] += 1
            return
        self._feed(owner, job_id, event(frame.blob), now)

    def _feed(self, owner: SimOwner, job_id: bytes, event: Any, now: float) -> None:
        self._owner_effects(owner, job_id, owner.machines[job_id].handle(event, now), now)

    def _owner_effects(
        self, owner: SimOwner, job_id: bytes, effects: list[Any], now: float
    ) -> None:
        me = owner.identity.node_id
        for effect in effects:
            if isinstance(effect, BroadcastOffer):
                self._broadcast(owner, job_id, effect.offer, now)
            elif isinstance(effect, SendStatement):
                self._send(me, effect.target, "market", effect.kind, effect.blob)
            elif isinstance(effect, VerifyCompletion):
                self._start_verify(owner, effect, now)
            elif isinstance(effect, ReplicateCheckpoint):
                self._replicate(owner, effect, now)
            elif isinstance(effect, PayWinner):
                self._pay(owner, effect, now)
            elif isinstance(effect, SegmentChanged):
                self._segment_changed(effect, now)
            elif isinstance(effect, JobFinished):
                self.finished[job_id] = now
                self.stats[f"jobs_{effect.outcome}"] += 1

    def _broadcast(self, owner: SimOwner, job_id: bytes, offer: Offer, now: float) -> None:
        if self.first_offer is None:
            self.first_offer = now
        fanout = self.config.offer_fanout
        targets = list(self.live)
        if 0 < fanout < len(targets):
            targets = self.rng.sample(targets, fanout)
        me = owner.identity.node_id
        for index in targets:
            self._send(
                me,
                self.hosts[index].identity.node_id,
                "market",
                MarketKind.OFFER,
                offer.blob,
                offer,
            )
        self.stats["offers"] += 1
        delivered = Timer("delivered", (job_id, offer.ref.attempt, len(targets)))
        self.sim.at(now, ("o", owner.index), delivered)  # after this batch, as the agent does

    def _start_verify(self, owner: SimOwner, effect: VerifyCompletion, now: float) -> None:
        _, index = self.by_node[effect.node]
        host = self.hosts[index]
        generation = host.generation if host.down_since is None else -1
        bandwidth = min(host.model.bandwidth, self.config.owner_bandwidth)
        delay = self.config.checkpoint_bytes / bandwidth
        args = (effect.job_id, effect.node, effect.manifest, index, generation)
        self.sim.after(delay, ("o", owner.index), Timer("fetched", args))

    def _fetched(
        self,
        owner: SimOwner,
        now: float,
        job_id: bytes,
        node: NodeId,
        manifest: bytes,
        index: int,
        generation: int,
    ) -> None:
        host = self.hosts[index]
        if host.generation != generation or host.down_since is not None:
            self.stats["verify_fetch_failed"] += 1  # the agent's FetchError: ok False
            self._feed(owner, job_id, CompletionVerified(node, manifest, False), now)
            return
        self.sim.after(
            self.config.verify_s, ("o", owner.index), Timer("verified", (job_id, node, manifest))
        )

    def _replicate(self, owner: SimOwner, effect: ReplicateCheckpoint, now: float) -> None:
        """As ``OwnerMarket._replicate``: the owner fetches the checkpoint here, then reports."""
        key = ("o", owner.index)
        if effect.manifest in owner.store:  # verified here already: nothing to fetch
            self.sim.at(now, key, Timer("replicated", (effect.job_id, effect.manifest, -1, 0)))
            return
        sources = [self.by_node[n][1] for n in effect.sources if self.by_node[n][0] == "h"]
        sources = [i for i in sources if self.hosts[i].down_since is None]
        if not sources:
            self.stats["replications_no_source"] += 1
            return
        source = self.hosts[sources[0]]
        bandwidth = min(self.config.owner_bandwidth, source.model.bandwidth)
        args = (effect.job_id, effect.manifest, source.index, source.generation)
        self.sim.after(self.config.checkpoint_bytes / bandwidth, key, Timer("replicated", args))

    def _pay(self, owner: SimOwner, effect: PayWinner, now: float) -> None:
        key = (effect.job_id, effect.segment)
        attempt, committed_at = self._committing.pop(key, (-1, now))
        self.commits[key] = (effect.node, attempt, committed_at)
        self.watch.jobs.add(effect.job_id)
        effects = owner.payer.pay_winner(
            effect.job_id, effect.segment, effect.node, effect.units, now
        )
        self._payer_effects(owner, effects, now)
        if any(isinstance(e, ChainNeeded) for e in effects):  # as LedgerService.pay does
            request = PaymentRequested(effect.job_id, effect.segment, effect.node, effect.units)
            self._payer_effects(owner, owner.payer.handle(request, now), now)

    def _payer_effects(self, owner: SimOwner, effects: list[Any], now: float) -> None:
        """As ``LedgerService._execute`` (the same ``EffectQueue``), without the journal."""
        queue = EffectQueue(effects)
        for effect in queue:
            if isinstance(effect, Persist):
                queue.feed(owner.payer.handle(Persisted(effect.entry.entry_id), now))
            elif isinstance(effect, SendPayment):
                self._send(
                    owner.identity.node_id, effect.target, "ledger", LEDGER_PAYMENT, effect.blob
                )
            elif isinstance(effect, ChainNeeded):
                seed = self.rng.randbytes(32)
                added = open_chain(owner.identity, effect, seed, self.config.chain_length, now)
                self.chains[added.chain.chain_id] = added.chain
                queue.feed(owner.payer.handle(added, now))
            elif isinstance(effect, Refused):
                self.stats[f"payer_refused_{effect.reason.value}"] += 1

    def _segment_changed(self, effect: SegmentChanged, now: float) -> None:
        if effect.state is SegmentState.COMMITTED:  # PayWinner follows in the same batch
            self._committing[(effect.job_id, effect.segment)] = (effect.attempt, now)
        elif effect.state is SegmentState.OFFERED:
            self.stats["attempts"] += 1
