"""The hosts' side of the simulated market: bidders, payees, replicas, availability.

Theory of operation
-------------------
``HostSide`` plays the volunteer hosts of ``MarketWorld`` (node/sim/market_world.py)
as node/runtime/market_host.py and node/runtime/ledger_service.py do in the
agent: each host runs a ``Bidder`` and a ``PayeeLedger`` and is up or down as
its availability intervals say (node/sim/availability.py). It models:

* **a replica** runs ``(missing checkpoint bytes / bandwidth + setup_s +
  extent / speed) * LogNormal(0, run_noise)`` seconds; it then saves a
  checkpoint whose digest names the host and the offer, and the real bidder
  signs the real COMPLETION;
* **a host going down** loses its running replicas and its bidder (a crash:
  it sends nothing; with ``departure = "withdraw"`` it first withdraws them,
  as the agent's vacate does when k > 1); its disk (checkpoints, payee
  journal) survives; ``detection_s`` later every owner hears of it
  (``MemberLost``) and, if it is still down, it leaves the owners' view;
* **a message to a host that is down** on arrival is lost;
* **journals** are written at once: ``Persist`` is answered by ``Persisted``.

Every replica is recorded (``ReplicaRun``) in the world's books, with the
marks the invariants read. Its collaborators are handed in.
"""

from __future__ import annotations

import random
from typing import assert_never

from node.ledger.effects import EffectQueue
from node.ledger.journal import Persist, Persisted, ReportRefusal
from node.ledger.payee import CreditPayment, PayeeEffect, PaymentReceived, SendAck
from node.market.bidder import (
    AwardReceived,
    Bidder,
    BidderEffect,
    BidderEvent,
    CancelReceived,
    CommitReceived,
    OfferReceived,
    ReplicaFailed,
    ReplicaFinished,
    RetainCheckpoint,
    StartReplica,
    StopReplica,
)
from node.market.message_fields import MarketKind
from node.market.messages import SendStatement
from node.market.offer_messages import Offer
from node.sim.engine import Simulator
from node.sim.market_network import MarketNetwork
from node.sim.market_parts import (
    EPOCH,
    LEDGER_ACK,
    Frame,
    LiveView,
    MarketAccounts,
    ReplicaRun,
    SimHost,
    WorldConfig,
    digest_of,
    next_start,
)
from node.sim.market_timers import (
    DeathDeclared,
    HostCameUp,
    HostTimer,
    HostWentDown,
    MemberLost,
    ReplicaRan,
    Wake,
    Wakeups,
)

_STATEMENTS: dict[MarketKind, type[AwardReceived | CancelReceived | CommitReceived]] = {
    MarketKind.AWARD: AwardReceived,
    MarketKind.CANCEL: CancelReceived,
    MarketKind.COMMIT: CommitReceived,
}


class HostSide:
    """The hosts of ``MarketWorld``; see the module docstring."""

    def __init__(
        self,
        sim: Simulator,
        config: WorldConfig,
        rng: random.Random,
        hosts: list[SimHost],
        owner_count: int,
        network: MarketNetwork,
        view: LiveView,
        wakeups: Wakeups,
        accounts: MarketAccounts,
    ) -> None:
        self.sim, self.config, self.rng = sim, config, rng
        self.hosts = hosts
        self.owner_count = owner_count
        self.network = network
        self.view = view
        self.wakeups = wakeups
        self.accounts = accounts
        self.stats = accounts.stats

    def start(self) -> None:
        for host in self.hosts:
            first = host.availability.interval_at(0.0)
            start = 0.0 if first is not None else next_start(host.availability, 0.0)
            if start is not None:
                self.sim.at(EPOCH + start, ("h", host.index), HostCameUp())

    def deliver(self, host: SimHost, event: Frame | HostTimer, now: float) -> None:
        self._event(host, event, now)
        if host.bidder is not None:
            self.wakeups.arm(("h", host.index), host.bidder.next_wakeup())

    def _event(self, host: SimHost, event: Frame | HostTimer, now: float) -> None:
        match event:
            case Frame():
                if host.down_since is None:
                    self._frame(host, event, now)
                else:
                    self.stats["frames_to_down_hosts"] += 1
            case HostCameUp():
                self._up(host, now)
            case HostWentDown():
                self._down(host, now)
            case ReplicaRan(digest=digest, generation=generation):
                self._replica_ran(host, now, digest, generation)
            case DeathDeclared():
                if host.down_since is not None and host.index in self.view:
                    self.view.remove(host.index)  # still down: out of the owners' view
            case Wake():
                self.wakeups.woke(("h", host.index), now)
                if host.bidder is not None:
                    self._carry_out(host, host.bidder.tick(now), now)
            case _:
                assert_never(event)

    def _frame(self, host: SimHost, frame: Frame, now: float) -> None:
        if frame.channel == "ledger":
            self._payee_effects(host, host.payee.handle(PaymentReceived(frame.blob), now), now)
            return
        assert host.bidder is not None
        kind = MarketKind(frame.kind)
        event: BidderEvent
        if kind is MarketKind.OFFER:
            offer = frame.offer
            held = offer.checkpoint_size if offer and offer.checkpoint in host.store else 0
            event = OfferReceived(frame.blob, held)
        else:
            event = _STATEMENTS[kind](frame.blob)
        self._carry_out(host, host.bidder.handle(event, now), now)

    def _carry_out(self, host: SimHost, effects: list[BidderEffect], now: float) -> None:
        me = host.identity.node_id
        for effect in effects:
            match effect:
                case SendStatement(target=target, kind=kind, blob=blob):
                    self.network.send(me, target, "market", kind, blob)
                case StartReplica(offer=offer):
                    self._start_replica(host, offer, now)
                case StopReplica(ref=ref, reason=reason):
                    running = host.running.pop(ref.digest, None)
                    if running is not None:
                        self._end_run(running[0], now, f"stopped:{reason}")
                case RetainCheckpoint(holder=holder, commit=commit):
                    if holder:
                        host.store.add(commit.manifest)
                case _:
                    assert_never(effect)

    def _payee_effects(self, host: SimHost, effects: list[PayeeEffect], now: float) -> None:
        """As ``LedgerService._execute`` (the same ``EffectQueue``), without the journal."""
        books = self.accounts
        queue = EffectQueue(effects)
        for effect in queue:
            match effect:
                case Persist(entry=entry):
                    queue.feed(host.payee.handle(Persisted(entry.entry_id), now))
                case SendAck(target=target, blob=blob):
                    self.network.send(host.identity.node_id, target, "ledger", LEDGER_ACK, blob)
                case CreditPayment():
                    key = (effect.job_id, effect.segment)
                    books.payments.setdefault(key, []).append(host.identity.node_id)
                    self.stats["payments_accepted"] += 1
                    self.stats["units_accepted"] += effect.units
                    books.touched_segments.add(key)
                    books.touched_payees.add(host.index)
                case ReportRefusal(reason=reason):
                    self.stats[f"payee_refused_{reason.value}"] += 1
                case _:
                    assert_never(effect)

    def _start_replica(self, host: SimHost, offer: Offer, now: float) -> None:
        c = self.config
        held = offer.checkpoint_size if offer.checkpoint in host.store else 0
        fetch = (offer.checkpoint_size - held) / host.model.bandwidth
        compute = offer.extent_s / (offer.requirements.vcpus * host.model.speed)
        duration = (fetch + c.setup_s + compute) * self.rng.lognormvariate(0.0, c.run_noise)
        ref = offer.ref
        run = ReplicaRun(host.index, ref.job_id, ref.segment, ref.attempt, now)
        host.running[ref.digest] = (run, offer)
        self.accounts.runs.append(run)
        self.accounts.running_per_attempt[(ref.job_id, ref.attempt)] += 1
        self.accounts.touched_attempts.add((ref.job_id, ref.attempt))
        self.sim.after(duration, ("h", host.index), ReplicaRan(ref.digest, host.generation))

    def _replica_ran(self, host: SimHost, now: float, digest: bytes, generation: int) -> None:
        if generation != host.generation or host.bidder is None or digest not in host.running:
            return
        run, offer = host.running.pop(digest)
        self._end_run(run, now, "finished")
        manifest = digest_of(b"checkpoint", host.identity.node_id.key, digest)
        host.store.add(manifest)
        finished = ReplicaFinished(
            offer.ref,
            manifest,
            self.config.checkpoint_bytes,
            digest_of(b"progress", manifest),
            cpu_ms=offer.extent_s * 1000,
        )
        self._carry_out(host, host.bidder.handle(finished, now), now)

    def _end_run(self, run: ReplicaRun, now: float, outcome: str) -> None:
        run.ended, run.outcome = now, outcome
        self.accounts.running_per_attempt[(run.job_id, run.attempt)] -= 1

    def _up(self, host: SimHost, now: float) -> None:
        host.generation += 1
        host.down_since = None
        host.bidder = Bidder(host.identity, host.policy)
        self.view.add(host.index)
        interval = host.availability.interval_at(now - EPOCH)
        if interval is not None and interval[1] < self.config.horizon_s:
            self.sim.at(EPOCH + interval[1], ("h", host.index), HostWentDown())

    def _down(self, host: SimHost, now: float) -> None:
        if self.config.departure == "withdraw" and host.bidder is not None:
            for _, offer in list(host.running.values()):  # the agent's vacate, k > 1
                failed = ReplicaFailed(offer.ref, "host unavailable")
                self._carry_out(host, host.bidder.handle(failed, now), now)
        if host.bidder is not None:  # its counters outlive it
            self.stats.update({f"bidder_{k}": v for k, v in host.bidder.statistics().items()})
        for run, _ in host.running.values():
            self._end_run(run, now, "lost")
        host.running.clear()
        host.bidder = None
        host.down_since = now
        host.generation += 1
        for owner in range(self.owner_count):
            self.sim.after(self.config.detection_s, ("o", owner), MemberLost(host.index))
        self.sim.after(self.config.detection_s, ("h", host.index), DeathDeclared())
        start = next_start(host.availability, now - EPOCH)
        if start is not None:
            self.sim.at(EPOCH + start, ("h", host.index), HostCameUp())
