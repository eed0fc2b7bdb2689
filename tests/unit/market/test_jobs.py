"""Jobs: the spec, and the owner's segment machine driven over simulated hosts."""

from __future__ import annotations

import hashlib
import math
import random
from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings, target
from hypothesis import strategies as st
from kit.market import MIB, NONCE, NOW, SWARM
from kit.market import identity as _identity

from node.base.identity import Identity, NodeId
from node.ledger.journal import ReportRefusal
from node.ledger.payer import ChainAdded, PayerLedger
from node.ledger.tokens import HashChain, TokenRefusal, sign_commitment
from node.market.auction import AuctionConfig
from node.market.bidder import (
    AwardReceived,
    Bidder,
    CancelReceived,
    CommitReceived,
    HostPolicy,
    OfferReceived,
    Phase,
    ReplicaFailed,
    ReplicaFinished,
    RetainCheckpoint,
    StartReplica,
    StopReplica,
)
from node.market.jobs import (
    TRANSITIONS,
    BidReceived,
    CheckpointReplicated,
    CompletionReceived,
    CompletionVerified,
    FinishJob,
    JobSnapshot,
    JobSpec,
    JobSpecError,
    JobStep,
    OfferDelivered,
    OwnerResumed,
    PayWinner,
    PersistJob,
    ReplicaLost,
    ReplicaStarted,
    ReplicateCheckpoint,
    ReportSegment,
    SegmentState,
    VerifyCompletion,
    WithdrawReceived,
)
from node.market.message_fields import MarketKind
from node.market.messages import BroadcastOffer, SendStatement
from node.market.offer_messages import (
    Award,
    Capacity,
    Offer,
    Winner,
    decode_award,
    decode_bid,
    sign_award,
    sign_bid,
    sign_offer,
)
from node.market.outcome_messages import (
    Cancel,
    CancelReason,
    SegmentCommit,
    decode_cancel,
    decode_commit,
    decode_completion,
    decode_withdraw,
    sign_cancel,
    sign_commit,
    sign_completion,
    sign_withdraw,
)
from node.market.reputation import Reputation
from node.market.segment_machine import SegmentMachine
from node.market.segment_rounds import MachineConfig
from overlay.claims import derive_job_id, sign_claim
from overlay.routes import RouteTable

OWNER, STRANGER = _identity(1), _identity(99)
HOSTS = [_identity(n) for n in range(2, 9)]


def job(**over: Any) -> JobSpec:
    fields: dict[str, Any] = {
        "owner": OWNER.node_id,
        "nonce": NONCE,
        "image": "tiny",
        "memory_mib": 96,
        "vcpus": 1,
        "extent_s": 100,
        "segments": 5,
        "k": 2,
        "ceiling": 10,
        "deadline": NOW + 1_000_000,
    }
    fields.update(over)
    return JobSpec(**fields)


# -- the spec ---------------------------------------------------------------------------


def test_spec_binds_the_job_to_its_owner():
    spec = job()
    assert spec.job_id == derive_job_id(OWNER.node_id.key, NONCE)
    assert spec.budget == 50 and job(segments=None).budget is None
    assert spec.requirements.memory_mib == 96 and not spec.requirements.network


@pytest.mark.parametrize(
    ("over", "field_name"),
    [
        ({"k": 0}, "k"),
        ({"k": 9}, "k"),
        ({"extent_s": 0}, "extent_s"),
        ({"extent_s": -5}, "extent_s"),
        ({"memory_mib": 64}, "memory_mib"),
        ({"memory_mib": 96.0}, "memory_mib"),
        ({"vcpus": 0}, "vcpus"),
        ({"segments": 0}, "segments"),
        ({"ceiling": 0}, "ceiling"),
        ({"ceiling": 5000}, "ceiling"),  # one payment cannot carry more than MAX_UNITS
        ({"nonce": b"short"}, "nonce"),
        ({"image": ""}, "image"),
        ({"network": 1}, "network"),
        ({"deadline": 0}, "deadline"),
    ],
)
def test_a_job_that_cannot_run_is_refused_with_a_clear_error(over, field_name):
    with pytest.raises(JobSpecError, match=f"^{field_name}: "):
        job(**over)


def test_spec_from_toml_table():
    table = {
        "image": "tiny",
        "memory_mib": 128,
        "vcpus": 2,
        "extent_s": 600,
        "redundancy": 3,
        "price_ceiling": 8,
        "deadline": NOW + 86_400,
    }
    spec = JobSpec.from_mapping(OWNER.node_id, NONCE, table)
    assert (spec.k, spec.ceiling, spec.segments, spec.network) == (3, 8, None, False)
    networked = table | {"network": True, "redundancy": 1}
    assert JobSpec.from_mapping(OWNER.node_id, NONCE, networked).network
    with pytest.raises(JobSpecError, match=r"^k: must be 1 for a network job"):
        JobSpec.from_mapping(OWNER.node_id, NONCE, networked | {"redundancy": 2})
    assert JobSpec.from_mapping(OWNER.node_id, NONCE, table | {"segments": 4}).segments == 4
    with pytest.raises(JobSpecError, match="unknown job key"):
        JobSpec.from_mapping(OWNER.node_id, NONCE, table | {"redundnacy": 2})
    with pytest.raises(JobSpecError, match="lacks key"):
        JobSpec.from_mapping(OWNER.node_id, NONCE, {"image": "tiny"})
    with pytest.raises(JobSpecError, match=r"^k: "):
        JobSpec.from_mapping(OWNER.node_id, NONCE, table | {"redundancy": 0})
    with pytest.raises(JobSpecError, match=r"^memory_mib: must be an integer in 72\.\."):
        JobSpec.from_mapping(OWNER.node_id, NONCE, table | {"memory_mib": (1 << 20) + 1})


def test_deadline_must_leave_time_for_a_segment():
    job(deadline=NOW + 1000).check_submittable(NOW)
    with pytest.raises(JobSpecError, match="deadline"):
        job(deadline=NOW + 50).check_submittable(NOW)


def test_transition_table_covers_the_documented_machine():
    assert TRANSITIONS[(SegmentState.COMPLETED, JobStep.COMMIT)] is SegmentState.COMMITTED
    assert all(
        TRANSITIONS[(state, JobStep.EXPIRE)] is SegmentState.DONE
        for state in SegmentState
        if state is not SegmentState.DONE
    )
    assert not any(state is SegmentState.DONE for state, _ in TRANSITIONS)


# -- a tiny swarm: one owner machine, hosts with real bidders, effects routed by hand ------


def manifest_of(*parts: Any) -> bytes:
    return hashlib.blake2b(repr(parts).encode(), digest_size=32).digest()


@dataclass
class Host:
    identity: Identity
    run_s: float
    price_floor: int = 1
    bench: int = 1000
    black_hole: bool = False  # every replica dies 5 s after it starts
    bad: bool = False  # its checkpoints fail verification
    fail_segments: set[int] = field(default_factory=set)
    halt_at: int | None = None
    bidder: Bidder = field(init=False)
    running: dict[bytes, tuple[float, Offer]] = field(default_factory=dict)
    store: set[bytes] = field(default_factory=set)

    def __post_init__(self) -> None:
        policy = HostPolicy(
            vcpus=4,
            memory_mib=2048,
            disk_mib=100_000,
            replicas=2,
            price_floor=self.price_floor,
            bench_score=self.bench,
        )
        self.bidder = Bidder(self.identity, policy)

    @property
    def node(self) -> NodeId:
        return self.identity.node_id


OWNER_TARGET = "owner"


class Swarm:
    """Routes every effect by hand; no latency, FIFO unless a test picks the order."""

    def __init__(
        self,
        hosts: list[Host],
        *,
        spec: JobSpec | None = None,
        config: MachineConfig | None = None,
        owner_keeps_copy: bool = True,
        seed: int = 1,
    ) -> None:
        self.now = float(NOW)
        self.spec = spec or job()
        self.reputation = Reputation()
        self.machine = SegmentMachine(
            OWNER, self.spec, config or MachineConfig(SWARM), self.reputation, random.Random(seed)
        )
        self.hosts = {h.node: h for h in hosts}
        self.owner_keeps_copy = owner_keeps_copy
        self.owner_online = True
        self.pool: list[tuple[Any, Any, bool]] = []  # (target, event, local)
        self.effects: list[Any] = []
        self.paid: list[PayWinner] = []
        self.arrivals: dict[tuple[int, int], list[NodeId]] = defaultdict(list)
        self.offers: list[Offer] = []
        self.awards: list[Award] = []
        self.commits: dict[int, SegmentCommit] = {}
        self.cancels: list[tuple[NodeId, Cancel]] = []
        self.stopped: list[tuple[NodeId, StopReplica]] = []
        self.finished: list[FinishJob] = []
        self.snapshots: list[JobSnapshot] = []

    # -- routing ---------------------------------------------------------------------

    def start(self) -> None:
        self.to_owner(OwnerResumed())

    def to_owner(self, event: Any) -> None:
        if not self.owner_online:
            return
        before = self.machine.statistics().get("completions", 0)
        effects = self.machine.handle(event, self.now)
        if self.machine.statistics().get("completions", 0) > before:
            completion = decode_completion(event.blob)
            self.arrivals[(completion.ref.segment, completion.ref.attempt)].append(completion.host)
        self.owner_effects(effects)

    def owner_effects(self, effects: list[Any]) -> None:
        self.effects += effects
        for e in effects:
            if isinstance(e, BroadcastOffer):
                self.offers.append(e.offer)
                for host in self.hosts.values():
                    held = e.offer.checkpoint_size if e.offer.checkpoint in host.store else 0
                    self.post(host.node, OfferReceived(e.offer.blob, held))
            elif isinstance(e, SendStatement):
                kind = {
                    MarketKind.AWARD: AwardReceived,
                    MarketKind.CANCEL: CancelReceived,
                    MarketKind.COMMIT: CommitReceived,
                }[e.kind]
                if e.kind is MarketKind.AWARD and decode_award(e.blob) not in self.awards:
                    self.awards.append(decode_award(e.blob))
                if e.kind is MarketKind.COMMIT:
                    commit = decode_commit(e.blob)
                    self.commits.setdefault(commit.ref.segment, commit)
                if e.kind is MarketKind.CANCEL:
                    self.cancels.append((e.target, decode_cancel(e.blob)))
                self.post(e.target, kind(e.blob))
            elif isinstance(e, VerifyCompletion):
                ok = not self.hosts[e.node].bad
                self.post(OWNER_TARGET, CompletionVerified(e.node, e.manifest, ok), local=True)
                if ok and self.owner_keeps_copy:
                    replicated = CheckpointReplicated(OWNER.node_id, e.manifest)
                    self.post(OWNER_TARGET, replicated, local=True)
            elif isinstance(e, ReplicateCheckpoint):
                spare = [n for n in self.hosts if n not in e.sources]
                target = (e.targets or tuple(spare))[0]
                if target in self.hosts:
                    self.hosts[target].store.add(e.manifest)
                self.post(OWNER_TARGET, CheckpointReplicated(target, e.manifest), local=True)
            elif isinstance(e, PayWinner):
                self.paid.append(e)
            elif isinstance(e, PersistJob):
                self.snapshots.append(e.snapshot)
            elif isinstance(e, FinishJob):
                self.finished.append(e)

    def to_host(self, node: NodeId, event: Any) -> None:
        host = self.hosts[node]
        for e in host.bidder.handle(event, self.now):
            self.host_effect(host, e)

    def host_effect(self, host: Host, e: Any) -> None:
        if isinstance(e, SendStatement):
            event = {
                MarketKind.BID: BidReceived,
                MarketKind.COMPLETION: CompletionReceived,
                MarketKind.WITHDRAW: WithdrawReceived,
            }[e.kind]
            self.post(OWNER_TARGET, event(e.blob))
        elif isinstance(e, StartReplica):
            fails = host.black_hole or e.offer.ref.segment in host.fail_segments
            host.running[e.offer.ref.digest] = (self.now + (5 if fails else host.run_s), e.offer)
        elif isinstance(e, StopReplica):
            host.running.pop(e.ref.digest, None)
            self.stopped.append((host.node, e))
        elif isinstance(e, RetainCheckpoint) and e.holder:
            host.store.add(e.commit.manifest)

    def post(self, target: Any, event: Any, local: bool = False) -> None:
        self.pool.append((target, event, local))

    def deliver(self, item: tuple[Any, Any, bool]) -> None:
        target, event, _ = item
        if target == OWNER_TARGET:
            self.to_owner(event)
        elif target in self.hosts:
            self.to_host(target, event)

    def deliver_all(self) -> None:
        while self.pool:
            self.deliver(self.pool.pop(0))

    # -- time ------------------------------------------------------------------------

    def advance(self) -> bool:
        """Move the clock to the next thing that happens and let it happen."""
        times = [h.bidder.next_wakeup() for h in self.hosts.values()]
        times += [at for h in self.hosts.values() for at, _ in h.running.values()]
        if self.owner_online:
            times.append(self.machine.next_wakeup())
        at = min(times, default=math.inf)
        if at == math.inf:
            return False
        self.now = max(self.now, at)
        for host in self.hosts.values():
            for digest, (end, offer) in list(host.running.items()):
                if end <= self.now:
                    del host.running[digest]
                    self.replica_ended(host, offer)
        if self.owner_online:
            self.owner_effects(self.machine.tick(self.now))
        for host in self.hosts.values():
            for e in host.bidder.tick(self.now):
                self.host_effect(host, e)
        return True

    def replica_ended(self, host: Host, offer: Offer) -> None:
        segment = offer.ref.segment
        if host.black_hole or segment in host.fail_segments:
            self.to_host(host.node, ReplicaFailed(offer.ref, "no memory after all"))
            self.post(OWNER_TARGET, ReplicaLost(host.node), local=True)  # membership says
            return
        manifest = manifest_of(host.node.key, offer.ref)
        host.store.add(manifest)
        halted = host.halt_at is not None and segment >= host.halt_at
        finished = ReplicaFinished(offer.ref, manifest, 8 * MIB, manifest_of("p", manifest), 1)
        self.to_host(host.node, replace(finished, halted=halted))

    def run(self, until: Any = None, limit: float = NOW + 200_000) -> None:
        for _ in range(100_000):
            self.deliver_all()
            if (until is not None and until()) or self.now >= limit or not self.advance():
                break
        self.deliver_all()

    # -- views -------------------------------------------------------------------------

    def committed_attempt(self, segment: int) -> int:
        [attempt] = [
            e.attempt
            for e in self.effects
            if isinstance(e, ReportSegment)
            and e.state is SegmentState.COMMITTED
            and e.segment == segment
        ]
        return attempt

    def award_of(self, segment: int, attempt: int) -> Award:
        [award] = [a for a in self.awards if (a.ref.segment, a.ref.attempt) == (segment, attempt)]
        return award

    def awarded_nodes(self, segment: int) -> set[NodeId]:
        return {w.node for a in self.awards if a.ref.segment == segment for w in a.winners}


def four_hosts(**over: Any) -> list[Host]:
    return [Host(HOSTS[i], run_s=100 + 20 * i, price_floor=i + 1, **over) for i in range(4)]


def assert_paid_first_completers(swarm: Swarm) -> None:
    segments = [p.segment for p in swarm.paid]
    assert len(segments) == len(set(segments)), "a segment paid twice"
    for payment in swarm.paid:
        attempt = swarm.committed_attempt(payment.segment)
        good = [n for n in swarm.arrivals[(payment.segment, attempt)] if not swarm.hosts[n].bad]
        assert payment.node == good[0], "paid someone other than the first valid completer"
        assert swarm.commits[payment.segment].winner == payment.node
        winner = swarm.award_of(payment.segment, attempt).winner(payment.node)
        assert winner is not None and payment.units == winner.price


# -- the happy path ----------------------------------------------------------------------


def test_five_segments_k2_over_four_hosts():
    swarm = Swarm(four_hosts())
    swarm.start()
    swarm.run(until=lambda: swarm.finished)
    spec = swarm.spec
    last = swarm.commits[4]
    assert swarm.finished == [FinishJob(spec.job_id, "completed", last.manifest)]
    assert [p.segment for p in swarm.paid] == [0, 1, 2, 3, 4]
    assert_paid_first_completers(swarm)
    for segment in range(5):
        attempt = swarm.committed_attempt(segment)
        award = swarm.award_of(segment, attempt)
        assert len(award.winners) == 2
        winner = swarm.commits[segment].winner
        [loser] = [w.node for w in award.winners if w.node != winner]
        assert any(
            node == loser and c.ref == award.ref and c.reason is CancelReason.LOST_RACE
            for node, c in swarm.cancels
        )
        assert (loser, StopReplica(award.ref, "lost_race")) in swarm.stopped
        assert len(swarm.commits[segment].holders) >= 2
        # each segment starts from the one before
        offer = next(o for o in swarm.offers if o.ref == award.ref)
        previous = swarm.commits[segment - 1].manifest if segment else None
        assert offer.checkpoint == previous
    final = swarm.snapshots[-1]
    assert (final.segment, final.manifest, final.done) == (5, last.manifest, True)
    assert swarm.machine.state is SegmentState.DONE
    for host in swarm.hosts.values():
        assert host.bidder.commitments() == [] and not host.running
    assert swarm.machine.statistics().get("abandoned", 0) == 0
    assert not any(k.startswith("refused_") for k in swarm.machine.statistics())


def test_commit_needs_a_second_holder_and_asks_the_losers():
    swarm = Swarm(four_hosts(), owner_keeps_copy=False)
    swarm.start()
    swarm.run(until=lambda: swarm.finished)
    assert len(swarm.paid) == 5
    asks = [e for e in swarm.effects if isinstance(e, ReplicateCheckpoint)]
    assert len(asks) == 5
    for ask in asks:
        commit = swarm.commits[ask.segment]
        assert ask.sources == (commit.winner,)
        assert commit.holders == (commit.winner, ask.targets[0])
        assert ask.targets[-1] == OWNER.node_id  # the owner is the last resort


def test_pay_winner_feeds_the_payers_ledger():
    swarm = Swarm(four_hosts())
    swarm.start()
    swarm.run(until=lambda: swarm.finished)
    ledger = PayerLedger(OWNER)
    for n, host in enumerate(swarm.hosts.values()):
        chain = HashChain(hashlib.sha256(b"seed %d" % n).digest(), 100)
        commitment = sign_commitment(
            OWNER,
            chain,
            payer=OWNER.node_id,
            payee=host.node,
            unit_value=1,
            expires=NOW + 10**7,
        )
        ledger.handle(ChainAdded(chain, commitment), swarm.now)
    for p in swarm.paid:
        effects = ledger.pay_winner(p.job_id, p.segment, p.node, p.units, swarm.now)
        assert not any(isinstance(e, ReportRefusal) for e in effects)
    again = swarm.paid[-1]
    [refusal] = ledger.pay_winner(again.job_id, again.segment, again.node, again.units, swarm.now)
    assert isinstance(refusal, ReportRefusal) and refusal.reason is TokenRefusal.DUPLICATE_PAYMENT


# -- failures ----------------------------------------------------------------------------


def test_one_replica_lost_the_other_completes():
    hosts = four_hosts()
    hosts[0].fail_segments = {1}
    hosts[1].fail_segments = set()
    swarm = Swarm(hosts)
    swarm.start()
    swarm.run(until=lambda: swarm.finished)
    assert hosts[0].node in swarm.awarded_nodes(1)
    assert [p.segment for p in swarm.paid] == [0, 1, 2, 3, 4]
    assert swarm.paid[1].node != hosts[0].node
    assert swarm.machine.statistics()["replicas_lost"] == 1
    assert swarm.machine.statistics().get("abandoned", 0) == 0
    assert swarm.reputation.standing(hosts[0].node).failures == 1
    assert_paid_first_completers(swarm)


def test_all_replicas_lost_reoffers_from_the_last_committed_checkpoint():
    hosts = four_hosts()
    swarm = Swarm(hosts)
    swarm.start()
    swarm.run(until=lambda: 1 in swarm.commits)
    for host in hosts:
        host.fail_segments = {2}  # whoever is awarded segment 2 loses it
    swarm.run(until=lambda: swarm.machine.statistics().get("abandoned"))
    for host in hosts:
        host.fail_segments = set()
    swarm.run(until=lambda: swarm.finished)
    offers_of_2 = [o for o in swarm.offers if o.ref.segment == 2]
    assert len(offers_of_2) == 2 and offers_of_2[0].ref.attempt < offers_of_2[1].ref.attempt
    assert {o.checkpoint for o in offers_of_2} == {swarm.commits[1].manifest}
    assert swarm.committed_attempt(2) == offers_of_2[1].ref.attempt
    assert [p.segment for p in swarm.paid] == [0, 1, 2, 3, 4]
    assert_paid_first_completers(swarm)


def test_a_completion_that_fails_verification_is_not_paid():
    hosts = four_hosts()
    hosts[0].bad = True  # the fastest and cheapest: first to complete, every time
    swarm = Swarm(hosts)
    swarm.start()
    swarm.run(until=lambda: swarm.finished)
    assert len(swarm.paid) == 5
    assert hosts[0].node not in {p.node for p in swarm.paid}
    assert swarm.machine.statistics()["verifications_failed"] >= 1
    assert swarm.reputation.statistics()["bad_completions"] >= 1
    assert_paid_first_completers(swarm)


def test_black_hole_stops_winning():
    hosts = [
        Host(HOSTS[0], run_s=100, price_floor=1, bench=4000, black_hole=True),
        *(Host(HOSTS[n], run_s=100 + 10 * n, price_floor=2 + n) for n in range(1, 4)),
    ]
    swarm = Swarm(hosts, spec=job(segments=12))
    swarm.start()
    swarm.run(until=lambda: swarm.finished)
    hole = hosts[0].node
    assert len(swarm.paid) == 12 and hole not in {p.node for p in swarm.paid}
    won = [segment for segment in range(12) if hole in swarm.awarded_nodes(segment)]
    assert won[0] == 0, "a newcomer with the best bid wins at first"
    assert max(won) < 8, "after a few failures it stops winning"
    assert swarm.reputation.score(hole) < min(swarm.reputation.score(h.node) for h in hosts[1:])
    assert_paid_first_completers(swarm)


def test_owner_offline_the_job_waits_and_resumes():
    config = MachineConfig(SWARM, resume_grace_s=300)
    swarm = Swarm(four_hosts(), config=config)
    swarm.start()
    swarm.run(until=lambda: swarm.machine.state is SegmentState.AWARDED and 0 in swarm.commits)
    segment, attempt = swarm.machine.segment, swarm.machine.attempt
    paid = len(swarm.paid)
    swarm.owner_online = False
    swarm.run(limit=swarm.now + 2000)
    assert (swarm.machine.segment, swarm.machine.attempt) == (segment, attempt)
    assert len(swarm.paid) == paid
    finished = [c for h in swarm.hosts.values() for c in h.bidder.commitments()]
    assert [c.phase for c in finished] == [Phase.FINISHED, Phase.FINISHED]  # checkpoints kept
    swarm.owner_online = True
    swarm.to_owner(OwnerResumed())
    swarm.run(until=lambda: swarm.finished)
    assert [p.segment for p in swarm.paid] == [0, 1, 2, 3, 4]
    assert swarm.committed_attempt(segment) == attempt  # nothing was re-run
    assert all(s.failures == 0 for s in swarm.reputation.standings())  # the owner's absence
    assert_paid_first_completers(swarm)


def test_a_restored_owner_waits_at_the_boundary_and_asks_for_the_last_payment_again():
    swarm = Swarm(four_hosts())
    swarm.start()
    swarm.run(until=lambda: 2 in swarm.commits)
    snapshot = next(s for s in reversed(swarm.snapshots) if s.segment == 3)
    machine = SegmentMachine(
        OWNER, swarm.spec, MachineConfig(SWARM), Reputation(), random.Random(2), snapshot
    )
    assert machine.state is SegmentState.WAITING and machine.tick(swarm.now) == []
    effects = machine.handle(OwnerResumed(), swarm.now)
    assert effects[0] == PayWinner(swarm.spec.job_id, 2, swarm.paid[2].node, swarm.paid[2].units)
    [offer] = [e.offer for e in effects if isinstance(e, BroadcastOffer)]
    assert (offer.ref.segment, offer.ref.attempt) == (3, snapshot.next_attempt)
    assert offer.checkpoint == swarm.commits[2].manifest
    assert offer.holders == swarm.commits[2].holders
    assert not any(isinstance(e, PayWinner) for e in machine.handle(OwnerResumed(), swarm.now))


def test_an_open_ended_job_ends_when_the_guest_powers_off():
    hosts = four_hosts(halt_at=2)
    swarm = Swarm(hosts, spec=job(segments=None))
    swarm.start()
    swarm.run(until=lambda: swarm.finished)
    assert [p.segment for p in swarm.paid] == [0, 1, 2]
    assert swarm.finished[0].outcome == "halted"


def test_a_network_job_awards_route_grants_with_fresh_epochs():
    swarm = Swarm(four_hosts(), spec=job(network=True, segments=3, k=1))
    swarm.start()
    swarm.run(until=lambda: swarm.finished)
    epochs = [w.epoch for a in swarm.awards for w in a.winners]
    assert epochs == sorted(epochs) and len(set(epochs)) == len(epochs) and epochs[0] == 1
    table = RouteTable(SWARM, HOSTS[-1].node_id)
    award = swarm.awards[-1]
    for winner in award.winners:
        assert winner.grant is not None and winner.grant.node_id == winner.node
        host = swarm.hosts[winner.node]
        table.offer(sign_claim(host.identity, winner.grant, issued_at=NOW).blob, swarm.now)
    route = table.route(award.winners[0].grant.vm_address)
    assert route is not None and route.epoch == max(w.epoch for w in award.winners)
    # the epochs are persisted before the award that uses them is sent
    for n, effect in enumerate(swarm.effects):
        if isinstance(effect, SendStatement) and effect.kind is MarketKind.AWARD:
            persisted = [e for e in swarm.effects[:n] if isinstance(e, PersistJob)]
            used = max(w.epoch for w in decode_award(effect.blob).winners)
            assert persisted[-1].snapshot.next_epoch > used


# -- the machine, event by event -----------------------------------------------------------


def machine(spec: JobSpec | None = None, **config: Any) -> SegmentMachine:
    return SegmentMachine(
        OWNER,
        spec or job(),
        MachineConfig(SWARM, **config),
        Reputation(),
        random.Random(1),
    )


def of(kind: type, effects: list[Any]) -> list[Any]:
    return [e for e in effects if isinstance(e, kind)]


def offered(m: SegmentMachine) -> Offer:
    [broadcast] = of(BroadcastOffer, m.handle(OwnerResumed(), NOW))
    return broadcast.offer


def bid_blob(host: Identity, offer: Offer, price: int = 5, finish_s: int = 100) -> bytes:
    capacity = Capacity(4, 4096, 100_000, 2)
    return sign_bid(
        host, offer.ref, price=price, finish_s=finish_s, held_bytes=0, capacity=capacity
    ).blob


def completion_blob(host: Identity, offer: Offer, manifest: bytes | None = None) -> bytes:
    manifest = manifest or manifest_of(host.node_id.key)
    return sign_completion(
        host, offer.ref, manifest=manifest, size=1, progress=b"p" * 32, cpu_ms=1
    ).blob


def awarded(m: SegmentMachine, *hosts: Identity) -> Offer:
    offer = offered(m)
    for host in hosts:
        m.handle(BidReceived(bid_blob(host, offer)), NOW)
    m.tick(NOW + 4)
    assert m.state is SegmentState.AWARDED
    return offer


def test_queued_completion_wins_when_the_first_fails_verification():
    a, b = HOSTS[0], HOSTS[1]
    m = machine()
    offer = awarded(m, a, b)
    [verify] = of(VerifyCompletion, m.handle(CompletionReceived(completion_blob(a, offer)), NOW))
    assert verify.node == a.node_id and m.state is SegmentState.COMPLETED
    assert m.handle(CompletionReceived(completion_blob(b, offer)), NOW) == []  # queued
    effects = m.handle(CompletionVerified(a.node_id, verify.manifest, ok=False), NOW)
    [cancel] = of(SendStatement, effects)
    assert cancel.target == a.node_id and decode_cancel(cancel.blob).nodes == (a.node_id,)
    [verify_b] = of(VerifyCompletion, effects)
    assert verify_b.node == b.node_id
    effects = m.handle(CompletionVerified(b.node_id, verify_b.manifest, ok=True), NOW)
    assert of(PayWinner, effects) == []  # not before the checkpoint is safe
    [ask] = of(ReplicateCheckpoint, effects)
    assert ask.targets == (OWNER.node_id,)  # a, the only other replica, failed
    effects = m.handle(CheckpointReplicated(OWNER.node_id, verify_b.manifest), NOW)
    kinds = [type(e).__name__ for e in effects]
    assert kinds.index("PersistJob") < kinds.index("PayWinner") < kinds.index("SendStatement")
    assert of(PayWinner, effects) == [PayWinner(m.job_id, 0, b.node_id, 5)]
    [commit] = [decode_commit(e.blob) for e in of(SendStatement, effects)]
    assert commit.holders == (b.node_id, OWNER.node_id)
    assert m.segment == 1 and m.state is SegmentState.OFFERED


def test_identical_checkpoints_count_as_holders_and_lost_commits_are_resent():
    a, b = HOSTS[0], HOSTS[1]
    m = machine()
    offer = awarded(m, a, b)
    same = manifest_of("deterministic guest")
    m.handle(CompletionReceived(completion_blob(a, offer, same)), NOW)
    m.handle(CompletionReceived(completion_blob(b, offer, same)), NOW)
    effects = m.handle(CompletionVerified(a.node_id, same, ok=True), NOW)
    assert of(PayWinner, effects) == [PayWinner(m.job_id, 0, a.node_id, 5)]
    assert of(ReplicateCheckpoint, effects) == []  # b holds the same bytes: two holders
    [to_a, to_b] = of(SendStatement, effects)
    assert (to_a.target, to_b.target) == (a.node_id, b.node_id) and to_a.kind is MarketKind.COMMIT
    resent = m.handle(CompletionReceived(completion_blob(b, offer, same)), NOW + 5)
    assert [e.target for e in of(SendStatement, resent)] == [b.node_id]
    assert decode_commit(resent[0].blob).holders == (a.node_id, b.node_id)
    assert m.statistics()["commits_resent"] == 1


def test_a_cancelled_loser_that_keeps_asking_is_cancelled_again():
    a, b = HOSTS[0], HOSTS[1]
    m = machine(min_holders=1)
    offer = awarded(m, a, b)
    m.handle(ReplicaStarted(a.node_id), NOW)
    assert m.state is SegmentState.RUNNING
    [verify] = of(VerifyCompletion, m.handle(CompletionReceived(completion_blob(a, offer)), NOW))
    assert m.handle(ReplicaLost(HOSTS[5].node_id), NOW) == []  # not a replica
    m.handle(CompletionVerified(a.node_id, verify.manifest, ok=True), NOW)
    effects = m.handle(CompletionReceived(completion_blob(b, offer)), NOW)
    [cancel] = of(SendStatement, effects)  # b's round is over (the cancel crossed its report)
    assert cancel.target == b.node_id and decode_cancel(cancel.blob).ref == offer.ref
    assert m.statistics()["refused_stale"] == 1


def test_forged_and_mismatched_messages_are_refused_and_counted():
    a, b = HOSTS[0], HOSTS[1]
    m = machine()
    offer = offered(m)
    foreign = offered(machine(job(nonce=b"another-nonce-1")))
    forged = bytearray(bid_blob(a, offer))
    forged[-1] ^= 1
    cases = [
        (BidReceived(bytes(forged)), "bad_signature"),
        (BidReceived(b"\x92\x01"), "malformed"),
        (BidReceived(bid_blob(a, foreign)), "unknown_offer"),
        (BidReceived(bid_blob(a, offer, price=11)), "over_ceiling"),
        (CompletionReceived(completion_blob(a, offer)), "not_awarded"),
    ]
    for event, reason in cases:
        assert m.handle(event, NOW) == []
        assert m.statistics()[f"refused_{reason}"] == 1, reason
    m.handle(BidReceived(bid_blob(a, offer)), NOW)
    m.handle(BidReceived(bid_blob(b, offer)), NOW)
    m.tick(NOW + 4)
    later = [
        (BidReceived(bid_blob(HOSTS[2], offer)), "late"),
        (CompletionReceived(completion_blob(HOSTS[2], offer)), "not_awarded"),
        (CompletionReceived(completion_blob(STRANGER, offer)[:-1] + b"\x00"), "bad_signature"),
    ]
    for event, reason in later:
        assert m.handle(event, NOW + 4) == []
        assert m.statistics()[f"refused_{reason}"] >= 1, reason
    m.handle(CompletionReceived(completion_blob(a, offer)), NOW + 5)
    assert m.handle(CompletionReceived(completion_blob(a, offer, b"x" * 32)), NOW + 5) == []
    assert m.statistics()["refused_equivocation"] == 1
    assert m.handle(CompletionVerified(b.node_id, b"x" * 32, ok=True), NOW + 5) == []
    assert m.statistics()["verifications_ignored"] == 1
    # an owner's forged award, cancel or commit reaches a host: refused there, nothing runs
    host = Bidder(a, HostPolicy(4, 2048, 100_000, 2))
    host.handle(OfferReceived(offer.blob), NOW)
    forged_cancel = sign_cancel(STRANGER, offer.ref, (a.node_id,), CancelReason.LOST_RACE)
    forged_commit = sign_commit(
        STRANGER, offer.ref, winner=a.node_id, manifest=b"m" * 32, size=1, holders=(a.node_id,)
    )
    for event in (CancelReceived(forged_cancel.blob), CommitReceived(forged_commit.blob)):
        assert host.handle(event, NOW) == []
    assert host.statistics()["refused_wrong_author"] == 2


def test_no_bids_reoffers_with_backoff_and_new_attempts():
    m = machine()
    first = offered(m)
    assert m.next_wakeup() == NOW + AuctionConfig().bid_window_s
    assert m.tick(NOW + 3) == []  # empty auction
    assert m.next_wakeup() == NOW + 8
    [second] = [e.offer for e in of(BroadcastOffer, m.tick(NOW + 8))]
    assert second.ref.attempt == first.ref.attempt + 1 and second.ref.segment == 0
    m.tick(NOW + 11)
    assert m.next_wakeup() == NOW + 21  # doubled
    effects = m.handle(OfferDelivered(second.ref.attempt + 1, 0), NOW + 12)
    assert effects == []  # that attempt is not open yet
    [third] = [e.offer for e in of(BroadcastOffer, m.tick(NOW + 21))]
    m.handle(OfferDelivered(third.ref.attempt, 1), NOW + 21)
    m.handle(BidReceived(bid_blob(HOSTS[0], third)), NOW + 21)
    assert m.state is SegmentState.AWARDED  # all recipients answered: no need to wait


def test_the_deadline_ends_the_job_and_cancels_its_replicas():
    a, b = HOSTS[0], HOSTS[1]
    m = machine(job(deadline=NOW + 500))
    offer = awarded(m, a, b)
    assert m.next_wakeup() <= NOW + 500
    effects = m.tick(NOW + 500)
    cancels = [decode_cancel(e.blob) for e in of(SendStatement, effects)]
    assert {c.reason for c in cancels} == {CancelReason.JOB_ENDED}
    assert set(cancels[0].nodes) == {a.node_id, b.node_id} and cancels[0].ref == offer.ref
    assert of(FinishJob, effects) == [FinishJob(m.job_id, "expired", None)]
    assert m.state is SegmentState.DONE and m.snapshot().done
    assert m.tick(NOW + 600) == [] and m.next_wakeup() == math.inf


def test_run_deadline_loses_silent_replicas_and_reoffers():
    a, b = HOSTS[0], HOSTS[1]
    m = machine()
    offer = awarded(m, a, b)
    deadline = m.next_wakeup()
    assert deadline == NOW + 4 + 100 * 2 + 60
    effects = m.tick(deadline)
    [again] = [e.offer for e in of(BroadcastOffer, effects)]
    assert again.ref.attempt == offer.ref.attempt + 1
    [cancel] = {decode_cancel(e.blob) for e in of(SendStatement, effects)}
    assert cancel.reason is CancelReason.ABANDONED
    assert m.statistics()["replicas_timed_out"] == 2


# -- properties ----------------------------------------------------------------------------


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_random_orders_drops_and_duplicates_never_pay_wrongly(data):
    count = data.draw(st.integers(2, 4), label="hosts")
    hosts = [
        Host(
            HOSTS[n],
            run_s=data.draw(st.integers(20, 200)),
            price_floor=data.draw(st.integers(1, 10)),
            bad=data.draw(st.booleans()) and n > 0,
        )
        for n in range(count)
    ]
    spec = job(k=data.draw(st.integers(1, 3)), segments=3)
    swarm = Swarm(hosts, spec=spec, seed=data.draw(st.integers(0, 1000)))
    swarm.start()
    for _ in range(data.draw(st.integers(20, 300), label="steps")):
        if swarm.pool and data.draw(st.integers(0, 3)):
            item = swarm.pool.pop(data.draw(st.integers(0, len(swarm.pool) - 1)))
            fate = data.draw(st.sampled_from(["deliver"] * 5 + ["drop", "twice"]))
            if fate == "drop" and not item[2]:  # the network loses it (local answers are kept)
                continue
            if fate == "twice":
                swarm.pool.append(item)
            swarm.deliver(item)
        elif not swarm.advance():
            break
        segments = [p.segment for p in swarm.paid]
        assert len(segments) == len(set(segments))
        committed = [
            e.segment
            for e in swarm.effects
            if isinstance(e, ReportSegment) and e.state is SegmentState.COMMITTED
        ]
        assert len(committed) == len(set(committed)) and sorted(committed) == segments
        assert_paid_first_completers(swarm)
    target(float(len(swarm.paid)), label="segments paid")


def test_a_withdrawn_replica_is_lost_at_once_and_its_sibling_completes():
    m = machine()
    offer = awarded(m, HOSTS[0], HOSTS[1])
    withdraw = sign_withdraw(HOSTS[0], offer.ref, "the volunteer is back")
    effects = m.handle(WithdrawReceived(withdraw.blob), NOW + 10)
    assert m.statistics()["withdrawals"] == 1 and m.statistics()["replicas_lost"] == 1
    assert not of(BroadcastOffer, effects), "the sibling runs on: no re-offer"
    m.handle(CompletionReceived(completion_blob(HOSTS[1], offer)), NOW + 20)
    assert m.state is SegmentState.COMPLETED


def test_both_replicas_withdrawn_reoffers_and_forged_withdrawals_are_refused():
    m = machine()
    offer = awarded(m, HOSTS[0], HOSTS[1])
    forged = sign_withdraw(STRANGER, offer.ref, "not mine")
    m.handle(WithdrawReceived(forged.blob), NOW + 5)
    payload, _ = msgpack.unpackb(sign_withdraw(HOSTS[0], offer.ref, "x").blob)
    tampered = msgpack.packb([payload, bytes(64)])
    m.handle(WithdrawReceived(tampered), NOW + 5)
    stats = m.statistics()
    assert stats["refused_not_awarded"] == 1 and stats["refused_bad_signature"] == 1
    assert stats.get("replicas_lost", 0) == 0
    m.handle(WithdrawReceived(sign_withdraw(HOSTS[0], offer.ref, "gone").blob), NOW + 10)
    effects = m.handle(WithdrawReceived(sign_withdraw(HOSTS[1], offer.ref, "gone").blob), NOW + 11)
    [again] = of(BroadcastOffer, effects)
    assert again.offer.ref.segment == offer.ref.segment
    assert again.offer.ref.attempt > offer.ref.attempt


def test_a_failed_replica_tells_its_owner():
    host = Host(HOSTS[0], run_s=10)
    offer = sign_offer(
        OWNER, job_nonce=NONCE, segment=0, attempt=1, image="tiny",
        requirements=job().requirements, extent_s=100, checkpoint=None, checkpoint_size=0,
        holders=(), k=2, ceiling=10, bid_deadline=NOW + 10,
    )  # fmt: skip
    [bid] = host.bidder.handle(OfferReceived(offer.blob), NOW)
    award = sign_award(
        OWNER, offer.ref, (Winner(HOSTS[0].node_id, decode_bid(bid.blob).price, 0, None),)
    )
    host.bidder.handle(AwardReceived(award.blob), NOW + 1)
    [sent] = host.bidder.handle(ReplicaFailed(offer.ref, "disk full"), NOW + 2)
    assert sent.kind is MarketKind.WITHDRAW and sent.target == OWNER.node_id
    assert decode_withdraw(sent.blob).reason == "disk full"


# -- live hand-off (a drain moves a network job's running guest) ------------------------


def moving(m: SegmentMachine, used_ms: int = 40_000) -> tuple[Offer, Offer]:
    """A network job running on HOSTS[0]; its host asks to hand it on live."""
    offer = awarded(m, HOSTS[0])
    withdraw = sign_withdraw(HOSTS[0], offer.ref, "draining", live=True, used_ms=used_ms)
    [broadcast] = of(BroadcastOffer, m.handle(WithdrawReceived(withdraw.blob), NOW + 5))
    return offer, broadcast.offer


def test_a_live_withdraw_auctions_the_rest_of_the_extent_and_keeps_the_guest_running():
    m = machine(job(network=True, k=1))
    offer, move = moving(m)
    assert move.source == HOSTS[0].node_id and move.ref.attempt > offer.ref.attempt
    assert move.extent_s == offer.extent_s - 40 and move.checkpoint == offer.checkpoint
    assert m.statistics().get("replicas_lost", 0) == 0 and m.state is SegmentState.AWARDED
    # the source cannot take its own guest; another host can
    m.handle(BidReceived(bid_blob(HOSTS[0], move)), NOW + 6)
    assert m.statistics()["refused_unfit"] == 1
    m.handle(BidReceived(bid_blob(HOSTS[1], move)), NOW + 6)
    effects = m.tick(NOW + 10)
    [persist] = of(PersistJob, effects)
    [award_sent] = of(SendStatement, effects)
    award = decode_award(award_sent.blob)
    assert award.ref == move.ref and [w.node for w in award.winners] == [HOSTS[1].node_id]
    assert (
        award.winners[0].grant is not None and persist.snapshot.next_epoch > award.winners[0].epoch
    )
    assert effects.index(persist) < effects.index(award_sent), "epochs persisted first"
    # the old attempt is history; the destination's completion is the one verified
    old = m.handle(CompletionReceived(completion_blob(HOSTS[0], offer)), NOW + 20)
    assert decode_cancel(of(SendStatement, old)[0].blob).reason is CancelReason.ABANDONED
    [verify] = of(
        VerifyCompletion, m.handle(CompletionReceived(completion_blob(HOSTS[1], move)), NOW + 30)
    )
    assert verify.node == HOSTS[1].node_id and verify.base == offer.checkpoint


def test_a_move_nobody_takes_leaves_the_guest_where_it_is():
    m = machine(job(network=True, k=1))
    offer, _ = moving(m)
    assert of(SendStatement, m.tick(NOW + 60)) == []
    assert m.statistics()["moves_unplaced"] == 1
    [verify] = of(
        VerifyCompletion, m.handle(CompletionReceived(completion_blob(HOSTS[0], offer)), NOW + 70)
    )
    assert verify.node == HOSTS[0].node_id  # the source checkpointed where it was


def test_only_a_network_jobs_sole_replica_moves_live():
    m = machine(job(k=2))
    offer = awarded(m, HOSTS[0], HOSTS[1])
    withdraw = sign_withdraw(HOSTS[0], offer.ref, "draining", live=True, used_ms=1)
    assert of(BroadcastOffer, m.handle(WithdrawReceived(withdraw.blob), NOW + 5)) == []
    assert m.statistics()["moves_refused"] == 1 and m.statistics().get("replicas_lost", 0) == 0


def test_bids_from_hosts_the_offer_never_reached_are_dropped_and_counted():
    m = machine()
    offer = offered(m)
    m.handle(BidReceived(bid_blob(STRANGER, offer, price=1, finish_s=1)), NOW)  # it raced ahead
    m.handle(OfferDelivered(offer.ref.attempt, 1, frozenset({HOSTS[0].node_id})), NOW)
    assert m.state is SegmentState.OFFERED  # the recipient has not bid: no award yet
    m.handle(BidReceived(bid_blob(HOSTS[1], offer)), NOW)  # not a recipient either
    assert m.statistics()["refused_not_offered"] == 2
    [award] = [
        decode_award(e.blob)
        for e in of(SendStatement, m.handle(BidReceived(bid_blob(HOSTS[0], offer)), NOW))
        if e.kind is MarketKind.AWARD
    ][:1]
    assert [w.node for w in award.winners] == [HOSTS[0].node_id]
