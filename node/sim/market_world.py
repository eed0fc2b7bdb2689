"""The market's world in the simulator: owners and volunteer hosts running the real cores.

Theory of operation
-------------------
``MarketWorld`` drives, on one ``Simulator``, the same sans-IO cores the agent
runs, through the same events and effects its adapters use
(node/runtime/market_owner.py, node/runtime/market_host.py, node/runtime/ledger_service.py):

* each **owner** runs one ``SegmentMachine`` per job, one ``Reputation`` and
  one ``PayerLedger``; owners are always up (an assumption: job owners are
  servers here);
* each **host** runs a ``Bidder`` and a ``PayeeLedger``; it is up or down as
  its availability intervals say (node/sim/availability.py).

The owners' half (routing to the machines and payers, and carrying out their
effects) is node/sim/market_owners.py; this module holds the hosts' half, the
network and the timers. What is modelled instead of real things:

* **network**: a message takes ``latency_s + Exp(jitter_s)`` and is lost with
  probability ``loss``; a message to a host that is down on arrival is lost;
* **membership**: a host that goes down stays in the owners' view of live
  members for ``detection_s``; then, if it is still down, every job is fed
  ``ReplicaLost`` (as ``OwnerMarket.member_lost`` does after its grace); a host
  back within ``detection_s`` refutes its death, as in the agent;
* **offers** go to ``offer_fanout`` members drawn from that view (0: all, as
  the agent does); ``OfferDelivered`` follows after the batch;
* **a replica** runs ``(missing checkpoint bytes / bandwidth + setup_s +
  extent / speed) * LogNormal(0, run_noise)`` seconds; it then saves a
  checkpoint whose digest names the host and the offer, and the real bidder
  signs the real COMPLETION;
* **a host going down** loses its running replicas and its bidder (a crash:
  it sends nothing; with ``departure = "withdraw"`` it first withdraws them,
  as the agent's vacate does when k > 1); its disk (checkpoints, payee
  journal) survives;
* **verification**: the owner fetches the checkpoint (size / the slower
  bandwidth; it fails if the completer goes down meanwhile, as a FetchError
  does in the agent), then spends ``verify_s``; then ``CompletionVerified``
  and, when it verified, ``CheckpointReplicated`` for the owner (which then
  holds it, so the replication the machine asks for is a no-op, as in the
  agent);
* **journals** are written at once: ``Persist`` is answered by ``Persisted``.

Every replica is recorded (``ReplicaRun``) for the study's accounting; a core's
timers are kept by one pending "wake" per node (``next_wakeup``). The
invariants checked after every step are node/sim/market_invariants.py.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from typing import Any

from node.base.identity import Identity, NodeId
from node.ledger.journal import Persist, Persisted, Refused
from node.ledger.payee import PayeeConfig, PayeeLedger, PaymentAccepted, PaymentReceived, SendAck
from node.ledger.payer import (
    PayerLedger,
)
from node.ledger.tokens import HashChain
from node.market.auction import AuctionConfig
from node.market.bidder import (
    AwardReceived,
    Bidder,
    CancelReceived,
    CheckpointCommitted,
    CommitReceived,
    HostPolicy,
    OfferReceived,
    ReplicaFailed,
    ReplicaFinished,
    StartReplica,
    StopReplica,
)
from node.market.jobs import (
    JobSpec,
)
from node.market.messages import MarketKind, Offer, SendStatement
from node.market.reputation import Reputation
from node.market.segment_machine import MachineConfig, SegmentMachine
from node.sim.availability import HostAvailability, IntervalIndex
from node.sim.engine import Simulator
from node.sim.market_invariants import MarketInvariants
from node.sim.market_owners import OwnerSide
from node.sim.market_parts import (
    EPOCH,
    LEDGER_ACK,
    LEDGER_PAYMENT,
    Frame,
    HostModel,
    ReplicaRun,
    SimHost,
    SimOwner,
    Timer,
    WorldConfig,
    digest_of,
    make_identity,
    next_start,
)

__all__ = [
    "EPOCH",
    "LEDGER_PAYMENT",
    "Frame",
    "HostModel",
    "MarketWorld",
    "ReplicaRun",
    "WorldConfig",
]


class MarketWorld(OwnerSide):
    """Owners, hosts and their cores on one simulator. See the module docstring."""

    def __init__(
        self,
        sim: Simulator,
        config: WorldConfig,
        availability: list[HostAvailability],
        models: list[HostModel],
    ) -> None:
        self.sim, self.config = sim, config
        self.rng = sim.fork(f"market/k={config.k}")
        self.net = sim.fork(f"network/k={config.k}")
        keys = sim.fork("identities")
        self.hosts = [
            self._make_host(i, make_identity(keys), a, m)
            for i, (a, m) in enumerate(zip(availability, models, strict=True))
        ]
        self.owners = [
            SimOwner(i, ident, PayerLedger(ident))
            for i, ident in enumerate(make_identity(keys) for _ in config.jobs_per_owner)
        ]
        self.by_node: dict[NodeId, tuple[str, int]] = {
            h.identity.node_id: ("h", h.index) for h in self.hosts
        }
        self.by_node.update({o.identity.node_id: ("o", o.index) for o in self.owners})
        self.live: list[int] = []  # hosts in the owners' membership view
        self._live_at: dict[int, int] = {}
        self._wake_at: dict[Any, float] = {}
        self.runs: list[ReplicaRun] = []
        self.stats: Counter[str] = Counter()
        self.commits: dict[tuple[bytes, int], tuple[NodeId, int, float]] = {}  # winner, attempt, t
        self._committing: dict[tuple[bytes, int], tuple[int, float]] = {}
        self.payments: dict[tuple[bytes, int], list[NodeId]] = {}
        self.chains: dict[bytes, HashChain] = {}  # the payers' secret chains, by chain id
        self.first_offer: float | None = None
        self.finished: dict[bytes, float] = {}
        self.running_per_attempt: Counter[tuple[bytes, int]] = Counter()
        self.job_owner: dict[bytes, SimOwner] = {}
        self._create_jobs(keys)
        self.watch = MarketInvariants(self)

    # -- setup --------------------------------------------------------------------------

    def _make_host(self, i: int, ident: Identity, a: HostAvailability, m: HostModel) -> SimHost:
        policy = HostPolicy(
            vcpus=1,
            memory_mib=4096,
            disk_mib=200_000,
            replicas=1,
            price_floor=m.price_floor,
            bench_score=max(1, round(m.speed * 1000)),
            bandwidth_bytes_s=m.bandwidth,
            setup_s=self.config.setup_s,
        )
        payee = PayeeLedger(ident, PayeeConfig(accept_self_issued=True))
        return SimHost(i, ident, IntervalIndex(a), m, policy, payee)

    def _create_jobs(self, keys: random.Random) -> None:
        c = self.config
        machine_config = MachineConfig(  # as node.runtime.market_owner.machine_config builds it
            "sim",
            auction=AuctionConfig(bid_window_s=c.bid_window_s),
            reoffer_s=max(c.bid_window_s, 1.0),
            run_grace_s=c.run_grace_s,
            replicate_retry_s=30.0,
        )
        for owner, count in zip(self.owners, c.jobs_per_owner, strict=True):
            reputation = Reputation()
            for _ in range(count):
                spec = JobSpec(
                    owner=owner.identity.node_id,
                    nonce=keys.randbytes(16),
                    image="sim",
                    memory_mib=c.memory_mib,
                    vcpus=1,
                    extent_s=c.extent_s,
                    segments=c.segments,
                    k=c.k,
                    ceiling=c.ceiling,
                    deadline=int(EPOCH + c.horizon_s),
                )
                machine = SegmentMachine(owner.identity, spec, machine_config, reputation, self.rng)
                owner.machines[spec.job_id] = machine
                self.job_owner[spec.job_id] = owner

    def start(self) -> None:
        for host in self.hosts:
            first = host.availability.interval_at(0.0)
            start = 0.0 if first is not None else next_start(host.availability, 0.0)
            if start is not None:
                self.sim.at(EPOCH + start, ("h", host.index), Timer("up"))
        for owner in self.owners:
            for job_id in owner.machines:
                self.sim.at(EPOCH, ("o", owner.index), Timer("submit", (job_id,)))

    def statistics(self) -> dict[str, int]:
        """The world's counters, with every bidder's (``bidder_*``, summed over hosts)."""
        stats = Counter(self.stats)
        for host in self.hosts:
            if host.bidder is not None:
                stats.update({f"bidder_{k}": v for k, v in host.bidder.statistics().items()})
        stats.pop("bidder_commitments", None)
        return dict(stats)

    def done(self) -> bool:
        jobs = sum(len(o.machines) for o in self.owners)
        unacked = sum(o.payer.statistics()["unacknowledged"] for o in self.owners)
        return len(self.finished) == jobs and unacked == 0

    # -- the one entry point: the simulator's deliver callback --------------------------

    def deliver(self, now: float, node: Any, event: Any) -> None:
        side, index = node
        if side == "o":
            self._owner_event(self.owners[index], event, now)
            self._arm_owner(self.owners[index])
        else:
            self._host_event(self.hosts[index], event, now)
            self._arm_host(self.hosts[index])

    # -- hosts --------------------------------------------------------------------------

    def _host_event(self, host: SimHost, event: Any, now: float) -> None:
        if isinstance(event, Frame):
            if host.down_since is None:
                self._host_frame(host, event, now)
            else:
                self.stats["frames_to_down_hosts"] += 1
            return
        what, args = event.what, event.args
        if what == "up":
            self._host_up(host, now)
        elif what == "down":
            self._host_down(host, now)
        elif what == "done":
            self._replica_done(host, now, *args)
        elif what == "leave_view":
            self._leave_view(host)
        elif what == "wake":
            if self._wake_at.get(("h", host.index), math.inf) <= now:
                del self._wake_at[("h", host.index)]
            if host.bidder is not None:
                self._host_effects(host, host.bidder.tick(now), now)

    def _host_frame(self, host: SimHost, frame: Frame, now: float) -> None:
        if frame.channel == "ledger":
            effects = host.payee.handle(PaymentReceived(frame.blob), now)
            self._payee_effects(host, effects, now)
            return
        assert host.bidder is not None
        kind = MarketKind(frame.kind)
        if kind is MarketKind.OFFER:
            offer = frame.offer
            held = offer.checkpoint_size if offer and offer.checkpoint in host.store else 0
            event: Any = OfferReceived(frame.blob, held)
        else:
            event = {
                MarketKind.AWARD: AwardReceived,
                MarketKind.CANCEL: CancelReceived,
                MarketKind.COMMIT: CommitReceived,
            }[kind](frame.blob)
        self._host_effects(host, host.bidder.handle(event, now), now)

    def _host_effects(self, host: SimHost, effects: list[Any], now: float) -> None:
        me = host.identity.node_id
        for effect in effects:
            if isinstance(effect, SendStatement):
                self._send(me, effect.target, "market", effect.kind, effect.blob)
            elif isinstance(effect, StartReplica):
                self._start_replica(host, effect.offer, now)
            elif isinstance(effect, StopReplica):
                running = host.running.pop(effect.ref.digest, None)
                if running is not None:
                    self._end_run(running[0], now, f"stopped:{effect.reason}")
            elif isinstance(effect, CheckpointCommitted) and effect.holder:
                host.store.add(effect.commit.manifest)

    def _payee_effects(self, host: SimHost, effects: list[Any], now: float) -> None:
        pending = list(effects)
        while pending:
            effect = pending.pop(0)
            if isinstance(effect, Persist):
                pending[:0] = host.payee.handle(Persisted(effect.entry.entry_id), now)
            elif isinstance(effect, SendAck):
                self._send(host.identity.node_id, effect.target, "ledger", LEDGER_ACK, effect.blob)
            elif isinstance(effect, PaymentAccepted):
                key = (effect.job_id, effect.segment)
                self.payments.setdefault(key, []).append(host.identity.node_id)
                self.stats["payments_accepted"] += 1
                self.stats["units_accepted"] += effect.units
                self.watch.segments.add(key)
                self.watch.payees.add(host.index)
            elif isinstance(effect, Refused):
                self.stats[f"payee_refused_{effect.reason.value}"] += 1

    def _start_replica(self, host: SimHost, offer: Offer, now: float) -> None:
        c = self.config
        held = offer.checkpoint_size if offer.checkpoint in host.store else 0
        fetch = (offer.checkpoint_size - held) / host.model.bandwidth
        compute = offer.extent_s / (offer.requirements.vcpus * host.model.speed)
        duration = (fetch + c.setup_s + compute) * self.rng.lognormvariate(0.0, c.run_noise)
        ref = offer.ref
        run = ReplicaRun(host.index, ref.job_id, ref.segment, ref.attempt, now)
        host.running[ref.digest] = (run, offer)
        self.runs.append(run)
        self.running_per_attempt[(ref.job_id, ref.attempt)] += 1
        self.watch.attempts.add((ref.job_id, ref.attempt))
        self.sim.after(duration, ("h", host.index), Timer("done", (ref.digest, host.generation)))

    def _replica_done(self, host: SimHost, now: float, digest: bytes, generation: int) -> None:
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
        self._host_effects(host, host.bidder.handle(finished, now), now)

    def _end_run(self, run: ReplicaRun, now: float, outcome: str) -> None:
        run.ended, run.outcome = now, outcome
        self.running_per_attempt[(run.job_id, run.attempt)] -= 1

    def _host_up(self, host: SimHost, now: float) -> None:
        host.generation += 1
        host.down_since = None
        host.bidder = Bidder(host.identity, host.policy)
        if host.index not in self._live_at:
            self._live_at[host.index] = len(self.live)
            self.live.append(host.index)
        interval = host.availability.interval_at(now - EPOCH)
        if interval is not None and interval[1] < self.config.horizon_s:
            self.sim.at(EPOCH + interval[1], ("h", host.index), Timer("down"))

    def _host_down(self, host: SimHost, now: float) -> None:
        if self.config.departure == "withdraw" and host.bidder is not None:
            for _, offer in list(host.running.values()):  # the agent's vacate, k > 1
                failed = ReplicaFailed(offer.ref, "host unavailable")
                self._host_effects(host, host.bidder.handle(failed, now), now)
        if host.bidder is not None:  # its counters outlive it
            self.stats.update({f"bidder_{k}": v for k, v in host.bidder.statistics().items()})
        for run, _ in host.running.values():
            self._end_run(run, now, "lost")
        host.running.clear()
        host.bidder = None
        host.down_since = now
        host.generation += 1
        for owner in self.owners:
            self.sim.after(
                self.config.detection_s, ("o", owner.index), Timer("member_lost", (host.index,))
            )
        self.sim.after(self.config.detection_s, ("h", host.index), Timer("leave_view"))
        start = next_start(host.availability, now - EPOCH)
        if start is not None:
            self.sim.at(EPOCH + start, ("h", host.index), Timer("up"))

    def _leave_view(self, host: SimHost) -> None:
        """Membership declares the host dead (it is still down): out of the live view."""
        if host.down_since is None or host.index not in self._live_at:
            return
        slot = self._live_at.pop(host.index)
        last = self.live.pop()
        if last != host.index:
            self.live[slot] = last
            self._live_at[last] = slot

    # -- network and timers -------------------------------------------------------------

    def _send(
        self,
        sender: NodeId,
        target: NodeId,
        channel: str,
        kind: int,
        blob: bytes,
        offer: Offer | None = None,
    ) -> None:
        self.stats[f"messages_{channel}"] += 1
        if self.config.loss and self.net.random() < self.config.loss:
            self.stats["messages_lost"] += 1
            return
        delay = self.config.latency_s + self.net.expovariate(1 / self.config.jitter_s)
        self.sim.after(delay, self.by_node[target], Frame(sender, channel, kind, blob, offer))

    def _arm(self, key: tuple[str, int], when: float) -> None:
        when = max(when, self.sim.now)  # a core already due is woken now
        if math.isfinite(when) and when < self._wake_at.get(key, math.inf):
            self._wake_at[key] = when
            self.sim.at(when, key, Timer("wake"))

    def _arm_owner(self, owner: SimOwner) -> None:
        wakeups = [m.next_wakeup() for j, m in owner.machines.items() if j not in self.finished]
        self._arm(("o", owner.index), min([*wakeups, owner.payer.next_wakeup()]))

    def _arm_host(self, host: SimHost) -> None:
        if host.bidder is not None:
            self._arm(("h", host.index), host.bidder.next_wakeup())
