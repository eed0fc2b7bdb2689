"""The owners' side of the simulated market: job machines, payers, and their effects.

Theory of operation
-------------------
``OwnerSide`` plays the job owners of ``MarketWorld`` (node/sim/market_world.py)
as node/runtime/market_owner.py and node/runtime/ledger_service.py do in the
agent, with the same shared cores: each owner's ``JobOwner``
(node/market/owner_effects.py) routes bids, completions and withdrawals to its
jobs' ``SegmentMachine``\\ s and turns their effects into actions, and the
ledger's ``EffectQueue`` runs the ``PayerLedger``'s. What this module adds is
the I/O, modelled: offers and statements go through the network model (offers
to a sample of the membership view, ``FeedLater`` as a ``FeedDue`` after the
batch), a completion's checkpoint is fetched (size over the slower bandwidth;
it fails if the completer goes down meanwhile, as a FetchError does in the
agent) and checked (``verify_s``), a checkpoint is replicated to the owner,
and the winner is paid at commit (a chain opened on ``CreateChain``, as
``LedgerService.pay`` does). A membership death becomes ``ReplicaLost`` for
every unfinished job unless the host is back. What it does is written in the
world's books (``MarketAccounts``).

Its collaborators are handed in: the simulator, the hosts and owners, the
network model, the owners' view of live hosts, the pending wakes and the books.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from typing import assert_never

from node.ledger.effects import EffectQueue, open_chain
from node.ledger.journal import Persist, Persisted, ReportRefusal
from node.ledger.payer import (
    AckReceived,
    CreateChain,
    PayerEffect,
    PaymentRequested,
    SendPayment,
)
from node.market.jobs import (
    FinishJob,
    OwnerEvent,
    OwnerResumed,
    PayWinner,
    PersistJob,
    ReplicaLost,
    ReplicateCheckpoint,
    ReportSegment,
    SegmentState,
    VerifyCompletion,
)
from node.market.message_fields import MarketKind
from node.market.messages import SendStatement
from node.market.owner_effects import (
    FeedLater,
    FrameRefused,
    OwnerAction,
    RecordHistory,
    SendOffer,
)
from node.sim.engine import Simulator
from node.sim.market_network import MarketNetwork
from node.sim.market_parts import (
    EPOCH,
    LEDGER_PAYMENT,
    Frame,
    MarketAccounts,
    SimHost,
    SimOwner,
    WorldConfig,
)
from node.sim.market_timers import (
    CheckpointChecked,
    CheckpointFetched,
    FeedDue,
    JobSubmitted,
    MemberLost,
    OwnerTimer,
    ReplicationEnded,
    Wake,
    Wakeups,
)


class OwnerSide:
    """The owners of ``MarketWorld``; see the module docstring."""

    def __init__(
        self,
        sim: Simulator,
        config: WorldConfig,
        rng: random.Random,
        hosts: list[SimHost],
        owners: list[SimOwner],
        network: MarketNetwork,
        wakeups: Wakeups,
        accounts: MarketAccounts,
    ) -> None:
        self.sim, self.config, self.rng = sim, config, rng
        self.hosts, self.owners = hosts, owners
        self.network = network
        self.wakeups = wakeups
        self.accounts = accounts
        self.stats = accounts.stats
        self._committing: dict[tuple[bytes, int], tuple[int, float]] = {}

    def start(self) -> None:
        for owner in self.owners:
            for job_id in owner.core.machines:
                self.sim.at(EPOCH, ("o", owner.index), JobSubmitted(job_id))

    def deliver(self, owner: SimOwner, event: Frame | OwnerTimer, now: float) -> None:
        self._event(owner, event, now)
        wakeups = [
            m.next_wakeup()
            for j, m in owner.core.machines.items()
            if j not in self.accounts.finished
        ]
        self.wakeups.arm(("o", owner.index), min([*wakeups, owner.payer.next_wakeup()]))

    def _event(self, owner: SimOwner, event: Frame | OwnerTimer, now: float) -> None:
        match event:
            case Frame():
                self._frame(owner, event, now)
            case JobSubmitted(job_id=job_id):
                self._feed(owner, job_id, OwnerResumed(), now)
            case Wake():
                self.wakeups.woke(("o", owner.index), now)
                for job_id in owner.core.machines:
                    self._carry_out(owner, job_id, owner.core.tick(job_id, now), now)
                self._payer_effects(owner, owner.payer.tick(now), now)
            case FeedDue(job_id=job_id, event=fed):
                self._feed(owner, job_id, fed, now)
            case MemberLost(host=index):
                self._member_lost(owner, self.hosts[index], now)
            case CheckpointFetched():
                self._fetched(owner, event, now)
            case CheckpointChecked(job_id=job_id, node=node, manifest=manifest):
                owner.store.add(manifest)  # fetched to verify: replicating it here is a no-op
                for verdict in owner.core.after_verification(node, manifest, True):
                    self._feed(owner, job_id, verdict, now)
            case ReplicationEnded(job_id=job_id, manifest=manifest, host=index):
                if index >= 0 and self.hosts[index].generation != event.generation:
                    self.stats["replications_failed"] += 1  # the source went down: asked again
                    return
                owner.store.add(manifest)
                self._feed(owner, job_id, owner.core.after_replication(manifest), now)
            case _:
                assert_never(event)

    def _frame(self, owner: SimOwner, frame: Frame, now: float) -> None:
        if frame.channel == "ledger":
            self._payer_effects(owner, owner.payer.handle(AckReceived(frame.blob), now), now)
            return
        match owner.core.route(frame.kind, frame.blob):
            case FrameRefused.MALFORMED:
                self.stats["owner_refused_malformed"] += 1
            case FrameRefused.UNKNOWN_JOB | FrameRefused.UNEXPECTED:
                self.stats["owner_frames_unexpected"] += 1
            case (job_id, event):
                self._feed(owner, job_id, event, now)

    def _member_lost(self, owner: SimOwner, host: SimHost, now: float) -> None:
        if host.down_since is None:  # back within detection_s: it refuted its death
            self.stats["losses_refuted"] += 1
            return
        for job_id in owner.core.machines:
            if owner.core.unfinished(job_id):
                self._feed(owner, job_id, ReplicaLost(host.identity.node_id), now)

    def _feed(self, owner: SimOwner, job_id: bytes, event: OwnerEvent, now: float) -> None:
        self._carry_out(owner, job_id, owner.core.feed(job_id, event, now), now)

    def _carry_out(
        self, owner: SimOwner, job_id: bytes, actions: Iterable[OwnerAction], now: float
    ) -> None:
        """The core's actions, in order, with their I/O modelled (as ``OwnerMarket._carry_out``)."""
        me = owner.identity.node_id
        for action in actions:
            match action:
                case SendOffer(offer=offer, targets=targets):
                    if self.accounts.first_offer is None:
                        self.accounts.first_offer = now
                    for target in targets:
                        self.network.send(me, target, "market", MarketKind.OFFER, offer.blob, offer)
                    self.stats["offers"] += 1
                case SendStatement(target=target, kind=kind, blob=blob):
                    self.network.send(me, target, "market", kind, blob)
                case FeedLater(event=event):  # after this batch, as the agent does
                    self.sim.at(now, ("o", owner.index), FeedDue(job_id, event))
                case VerifyCompletion():
                    self._start_verify(owner, action)
                case ReplicateCheckpoint():
                    self._replicate(owner, action, now)
                case PayWinner():
                    self._pay(owner, action, now)
                case ReportSegment(state=state):
                    if state is SegmentState.COMMITTED:  # PayWinner follows in this batch
                        self._committing[(job_id, action.segment)] = (action.attempt, now)
                    elif state is SegmentState.OFFERED:
                        self.stats["attempts"] += 1
                case FinishJob(outcome=outcome):
                    self.accounts.finished[job_id] = now
                    self.stats[f"jobs_{outcome}"] += 1
                case PersistJob() | RecordHistory():
                    pass  # journals are written at once; the simulator keeps no history
                case _:
                    assert_never(action)

    def _start_verify(self, owner: SimOwner, effect: VerifyCompletion) -> None:
        _, index = self.network.by_node[effect.node]
        host = self.hosts[index]
        generation = host.generation if host.down_since is None else -1
        bandwidth = min(host.model.bandwidth, self.config.owner_bandwidth)
        delay = self.config.checkpoint_bytes / bandwidth
        fetched = CheckpointFetched(effect.job_id, effect.node, effect.manifest, index, generation)
        self.sim.after(delay, ("o", owner.index), fetched)

    def _fetched(self, owner: SimOwner, fetched: CheckpointFetched, now: float) -> None:
        host = self.hosts[fetched.host]
        if host.generation != fetched.generation or host.down_since is not None:
            self.stats["verify_fetch_failed"] += 1  # the agent's FetchError: ok False
            for verdict in owner.core.after_verification(fetched.node, fetched.manifest, False):
                self._feed(owner, fetched.job_id, verdict, now)
            return
        checked = CheckpointChecked(fetched.job_id, fetched.node, fetched.manifest)
        self.sim.after(self.config.verify_s, ("o", owner.index), checked)

    def _replicate(self, owner: SimOwner, effect: ReplicateCheckpoint, now: float) -> None:
        """As ``OwnerMarket._replicate``: the owner fetches the checkpoint here, then reports."""
        key = ("o", owner.index)
        if effect.manifest in owner.store:  # verified here already: nothing to fetch
            self.sim.at(now, key, ReplicationEnded(effect.job_id, effect.manifest, -1, 0))
            return
        by_node = self.network.by_node
        sources = [by_node[n][1] for n in effect.sources if by_node[n][0] == "h"]
        sources = [i for i in sources if self.hosts[i].down_since is None]
        if not sources:
            self.stats["replications_no_source"] += 1
            return
        source = self.hosts[sources[0]]
        bandwidth = min(self.config.owner_bandwidth, source.model.bandwidth)
        ended = ReplicationEnded(effect.job_id, effect.manifest, source.index, source.generation)
        self.sim.after(self.config.checkpoint_bytes / bandwidth, key, ended)

    def _pay(self, owner: SimOwner, effect: PayWinner, now: float) -> None:
        key = (effect.job_id, effect.segment)
        attempt, committed_at = self._committing.pop(key, (-1, now))
        self.accounts.commits[key] = (effect.node, attempt, committed_at)
        self.accounts.touched_jobs.add(effect.job_id)
        effects = owner.payer.pay_winner(
            effect.job_id, effect.segment, effect.node, effect.units, now
        )
        self._payer_effects(owner, effects, now)
        if any(isinstance(e, CreateChain) for e in effects):  # as LedgerService.pay does
            request = PaymentRequested(effect.job_id, effect.segment, effect.node, effect.units)
            self._payer_effects(owner, owner.payer.handle(request, now), now)

    def _payer_effects(self, owner: SimOwner, effects: list[PayerEffect], now: float) -> None:
        """As ``LedgerService._execute`` (the same ``EffectQueue``), without the journal."""
        queue = EffectQueue(effects)
        for effect in queue:
            match effect:
                case Persist(entry=entry):
                    queue.feed(owner.payer.handle(Persisted(entry.entry_id), now))
                case SendPayment(target=target, blob=blob):
                    me = owner.identity.node_id
                    self.network.send(me, target, "ledger", LEDGER_PAYMENT, blob)
                case CreateChain():
                    seed = self.rng.randbytes(32)
                    added = open_chain(owner.identity, effect, seed, self.config.chain_length, now)
                    self.accounts.chains[added.chain.chain_id] = added.chain
                    queue.feed(owner.payer.handle(added, now))
                case ReportRefusal(reason=reason):
                    self.stats[f"payer_refused_{reason.value}"] += 1
                case _:
                    assert_never(effect)
