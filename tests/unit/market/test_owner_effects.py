"""The job owner's shared effect handling: routing, offer targets, history, verdicts."""

from __future__ import annotations

import dataclasses
import random
from typing import Any

from kit.market import NONCE, NOW, SWARM
from kit.market import identity as _identity

from node.base.identity import NodeId
from node.market.bidder import AwardReceived, Bidder, HostPolicy, OfferReceived, ReplicaFinished
from node.market.jobs import (
    CheckpointReplicated,
    CompletionVerified,
    JobSpec,
    OfferDelivered,
    OwnerResumed,
    VerifyCompletion,
)
from node.market.message_fields import MarketKind
from node.market.messages import SendStatement
from node.market.offer_messages import Capacity, Offer, sign_bid
from node.market.owner_effects import (
    FeedLater,
    FrameRefused,
    JobOwner,
    RecordHistory,
    SendOffer,
    offer_targets,
)
from node.market.reputation import Reputation
from node.market.segment_machine import SegmentMachine
from node.market.segment_rounds import MachineConfig

OWNER = _identity(1)
HOSTS = [_identity(n) for n in range(2, 7)]
LIVE = [h.node_id for h in HOSTS]


def owner(*, keep_history: bool = True, fanout: int = 0, live: Any = None) -> JobOwner:
    core = JobOwner(
        OWNER.node_id,
        lambda: [OWNER.node_id, *LIVE] if live is None else live,
        random.Random(7),
        offer_fanout=fanout,
        keep_history=keep_history,
    )
    spec = JobSpec(
        owner=OWNER.node_id,
        nonce=NONCE,
        image="tiny",
        memory_mib=96,
        vcpus=1,
        extent_s=100,
        segments=2,
        k=2,
        ceiling=10,
        deadline=NOW + 1_000_000,
    )
    machine = SegmentMachine(OWNER, spec, MachineConfig(SWARM), Reputation(), random.Random(1))
    core.add(machine)
    return core


def start(core: JobOwner) -> tuple[bytes, list[Any]]:
    [job_id] = core.machines
    return job_id, list(core.feed(job_id, OwnerResumed(), NOW))


def test_an_offer_goes_to_the_live_members_but_the_owner_and_its_delivery_is_fed_back():
    core = owner()
    job_id, actions = start(core)
    [send] = [a for a in actions if isinstance(a, SendOffer)]
    assert send.targets == tuple(LIVE)  # the owner itself is skipped
    [offered] = [a for a in actions if isinstance(a, RecordHistory)]
    assert offered.what == "offered" and dict(offered.detail)["hosts"] == len(LIVE)
    delivered = OfferDelivered(send.offer.ref.attempt, len(LIVE), frozenset(LIVE))
    assert actions[-1] == FeedLater(job_id, delivered)


def test_a_fanout_draws_that_many_targets_from_the_random_source_handed_in():
    offer = next(a.offer for a in start(owner())[1] if isinstance(a, SendOffer))
    drawn = offer_targets(offer, OWNER.node_id, LIVE, 3, random.Random(5))
    assert drawn == tuple(random.Random(5).sample(LIVE, 3))
    assert offer_targets(offer, OWNER.node_id, LIVE, 9, random.Random(5)) == tuple(LIVE)


def test_a_frame_is_routed_to_its_job_or_refused_with_the_reason():
    core = owner()
    job_id, actions = start(core)
    offer = next(a.offer for a in actions if isinstance(a, SendOffer))
    bid = bid_blob(HOSTS[0], offer)
    routed = core.route(MarketKind.BID, bid)
    assert isinstance(routed, tuple) and routed[0] == job_id
    assert core.route(MarketKind.BID, b"\x00garbage") is FrameRefused.MALFORMED
    assert core.route(MarketKind.OFFER, offer.blob) is FrameRefused.UNEXPECTED
    stranger = JobOwner(HOSTS[4].node_id, list, random.Random(1))
    assert stranger.route(MarketKind.BID, bid) is FrameRefused.UNKNOWN_JOB


def test_an_award_is_recorded_once_per_winner_not_once_per_copy_sent():
    core = owner()
    job_id, actions = start(core)
    offer = next(a.offer for a in actions if isinstance(a, SendOffer))
    awarded: list[Any] = []
    for host in HOSTS[:2]:
        awarded += core.feed(job_id, core_event(core, bid_blob(host, offer)), NOW + 1)
    awarded += core.feed(job_id, OfferDelivered(offer.ref.attempt, 2), NOW + 1)
    copies = [a for a in awarded if isinstance(a, SendStatement) and a.kind is MarketKind.AWARD]
    rows = [a for a in awarded if isinstance(a, RecordHistory) and a.what == "awarded"]
    assert len(copies) == 2
    assert sorted(r.node for r in rows if r.node) == sorted(h.node_id for h in HOSTS[:2])


def test_a_verdict_feeds_back_the_verification_and_when_it_verified_the_owner_as_holder():
    core = owner()
    node, manifest = HOSTS[0].node_id, b"m" * 32
    assert core.after_verification(node, manifest, False) == [
        CompletionVerified(node, manifest, False)
    ]
    assert core.after_verification(node, manifest, True) == [
        CompletionVerified(node, manifest, True),
        CheckpointReplicated(OWNER.node_id, manifest),
    ]
    assert core.after_replication(manifest) == CheckpointReplicated(OWNER.node_id, manifest)


def test_without_history_no_row_is_made_and_the_actions_are_otherwise_the_same():
    with_rows = [a for a in start(owner())[1] if not isinstance(a, RecordHistory)]
    assert start(owner(keep_history=False))[1] == with_rows


def bid_blob(host: Any, offer: Offer) -> bytes:
    capacity = Capacity(vcpus=4, memory_mib=4096, disk_mib=10_000, slots=2)
    return sign_bid(host, offer.ref, price=5, finish_s=100, held_bytes=0, capacity=capacity).blob


def core_event(core: JobOwner, blob: bytes) -> Any:
    routed = core.route(MarketKind.BID, blob)
    assert isinstance(routed, tuple)
    return routed[1]


def test_a_fanout_never_draws_the_owner_or_a_moves_source():
    offer = next(a.offer for a in start(owner())[1] if isinstance(a, SendOffer))
    live = [OWNER.node_id, *LIVE]
    for seed in range(20):
        drawn = offer_targets(offer, OWNER.node_id, live, 3, random.Random(seed))
        assert len(drawn) == 3 and OWNER.node_id not in drawn
    moved = dataclasses.replace(offer, source=LIVE[0])  # a live move: its source bids not
    for seed in range(20):
        drawn = offer_targets(moved, OWNER.node_id, live, 4, random.Random(seed))
        assert sorted(drawn, key=str) == sorted(LIVE[1:], key=str)


def test_a_frame_kind_that_is_no_market_kind_is_refused_not_raised():
    core = owner()
    _, actions = start(core)
    bid = bid_blob(HOSTS[0], next(a.offer for a in actions if isinstance(a, SendOffer)))
    for kind in (2**63, 2**64 - 1, -1, True, 2.0, "2", None, [2]):
        assert core.route(kind, bid) is FrameRefused.UNEXPECTED  # type: ignore[arg-type]


def run_to_a_halted_completion(core: JobOwner) -> tuple[NodeId, SendStatement]:
    """Real bidders bid on the job's first offer; the winner's guest powers off."""
    job_id, actions = start(core)
    offer = next(a.offer for a in actions if isinstance(a, SendOffer))
    policy = HostPolicy(vcpus=4, memory_mib=4096, disk_mib=200_000, replicas=1)
    bidders = {h.node_id: Bidder(h, policy) for h in HOSTS[:2]}
    at = NOW + 1
    for node, bidder in bidders.items():
        for effect in bidder.handle(OfferReceived(offer.blob, 0), at):
            routed = core.route(effect.kind, effect.blob)
            assert isinstance(routed, tuple)
            list(core.feed(*routed, at, node))
    awarded = [
        a
        for a in core.feed(job_id, OfferDelivered(offer.ref.attempt, 2), at)
        if isinstance(a, SendStatement)
    ]
    winner = awarded[0].target
    bidders[winner].handle(AwardReceived(awarded[0].blob), at)
    finished = ReplicaFinished(offer.ref, b"M" * 32, 1000, b"P" * 32, 1234, halted=True)
    sent = bidders[winner].handle(finished, at + 10)
    [completion] = [e for e in sent if isinstance(e, SendStatement)]
    return winner, completion


def test_the_verifier_is_told_a_completion_halted_with_or_without_history():
    # the owner core used to keep the flag in a side table only while it kept history
    for keep_history in (True, False):
        core = owner(keep_history=keep_history)
        winner, completion = run_to_a_halted_completion(core)
        routed = core.route(completion.kind, completion.blob)
        assert isinstance(routed, tuple)
        actions = list(core.feed(*routed, NOW + 11, winner))
        [verify] = [a for a in actions if isinstance(a, VerifyCompletion)]
        assert verify.halted and verify.node == winner and verify.manifest == b"M" * 32


def test_a_completion_is_recorded_once_and_a_repeated_copy_not_again():
    core = owner()
    winner, completion = run_to_a_halted_completion(core)
    rows = []
    for _ in range(2):
        routed = core.route(completion.kind, completion.blob)
        assert isinstance(routed, tuple)
        rows += [a for a in core.feed(*routed, NOW + 11, winner) if isinstance(a, RecordHistory)]
    assert [(r.what, r.node, dict(r.detail)["cpu_ms"]) for r in rows] == [
        ("completion", winner, 1234)
    ]
