"""The market: signed messages, the auction's scoring, reputation, the host's bidder."""

from __future__ import annotations

import math
import random
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kit.fuzzing import accepted_only_if_unchanged, edit_lists, mutate, signed
from kit.market import MIB, NONCE, NOW, SWARM
from kit.market import identity as _identity

from node.base.identity import Identity
from node.base.wire import LocalProtocolError, RemoteProtocolError
from node.ledger.tokens import MAX_UNITS
from node.market.auction import AuctionConfig, Auctioneer, BidOutcome, ScoreWeights, score_bids
from node.market.bidder import (
    AwardReceived,
    Bidder,
    BidderConfig,
    CancelReceived,
    CommitReceived,
    HostPolicy,
    OfferReceived,
    Phase,
    PolicyChanged,
    ReplicaFailed,
    ReplicaFinished,
    RetainCheckpoint,
    StartReplica,
    StopReplica,
    disk_need_mib,
    estimate_finish_s,
)
from node.market.message_fields import (
    MAX_HOLDERS,
    MAX_K,
    MarketKind,
    MarketRefusal,
    MarketRefused,
    OfferRef,
    refusal_of,
)
from node.market.messages import SendStatement, decode_statement, peek_job
from node.market.offer_messages import (
    AWARD_CONTEXT,
    BID_CONTEXT,
    OFFER_CONTEXT,
    Bid,
    Capacity,
    Offer,
    Requirements,
    Winner,
    decode_award,
    decode_bid,
    decode_offer,
    sign_award,
    sign_bid,
    sign_offer,
)
from node.market.outcome_messages import (
    CANCEL_CONTEXT,
    COMMIT_CONTEXT,
    CancelReason,
    decode_cancel,
    decode_commit,
    decode_completion,
    sign_cancel,
    sign_commit,
    sign_completion,
)
from node.market.reputation import Reputation, ReputationConfig
from overlay.claims import derive_job_id, sign_claim, sign_grant

OWNER, H1, H2, H3, STRANGER = (_identity(n) for n in range(1, 6))
JOB = derive_job_id(OWNER.node_id.key, NONCE)
CHECKPOINT = bytes([7]) * 32
ROOMY = Capacity(vcpus=4, memory_mib=4096, disk_mib=100_000, slots=2)


def make_offer(owner: Identity = OWNER, **over: Any) -> Offer:
    args: dict[str, Any] = {
        "job_nonce": NONCE,
        "segment": 0,
        "attempt": 1,
        "image": "tiny",
        "requirements": Requirements(memory_mib=96, vcpus=1),
        "extent_s": 100,
        "checkpoint": CHECKPOINT,
        "checkpoint_size": 10 * MIB,
        "holders": (H3.node_id,),
        "k": 2,
        "ceiling": 10,
        "bid_deadline": NOW + 3,
    }
    args.update(over)
    return sign_offer(owner, **args)


OFFER = make_offer()


def make_bid(host: Identity, offer: Offer = OFFER, **over: Any) -> Bid:
    args: dict[str, Any] = {"price": 5, "finish_s": 100, "held_bytes": 0, "capacity": ROOMY}
    args.update(over)
    return sign_bid(host, offer.ref, **args)


def grant_for(node: Identity, epoch: int, owner: Identity = OWNER, nonce: bytes = NONCE):
    return sign_grant(
        owner, swarm_id=SWARM, job_nonce=nonce, node_id=node.node_id, epoch=epoch, expires=NOW + 99
    )


def ref_fields(ref: OfferRef) -> dict[str, Any]:
    return {"job": ref.job_id, "segment": ref.segment, "attempt": ref.attempt, "offer": ref.digest}


def offer_fields(**over: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "owner": OWNER.node_id.key,
        "nonce": NONCE,
        "job": JOB,
        "segment": 0,
        "attempt": 1,
        "image": "tiny",
        "args": "",
        "memory": 96,
        "vcpus": 1,
        "arch": "x86_64",
        "kvm": False,
        "network": False,
        "extent": 100,
        "checkpoint": CHECKPOINT,
        "size": 0,
        "holders": [],
        "k": 2,
        "ceiling": 10,
        "deadline": NOW,
    }
    fields.update(over)
    return fields


def refused(decode: Any, blob: bytes) -> MarketRefusal:
    with pytest.raises(RemoteProtocolError) as info:
        decode(blob)
    return refusal_of(info.value)


# -- messages ---------------------------------------------------------------------------


def all_statements() -> list[tuple[MarketKind, Any]]:
    network_offer = make_offer(requirements=Requirements(96, 1, network=True))
    return [
        (MarketKind.OFFER, OFFER),
        (MarketKind.BID, make_bid(H1, held_bytes=5)),
        (MarketKind.AWARD, sign_award(OWNER, OFFER.ref, (Winner(H1.node_id, 5),))),
        (
            MarketKind.AWARD,
            sign_award(OWNER, network_offer.ref, (Winner(H1.node_id, 5, 3, grant_for(H1, 3)),)),
        ),
        (
            MarketKind.COMPLETION,
            sign_completion(
                H1, OFFER.ref, manifest=b"m" * 32, size=9, progress=b"p" * 32, cpu_ms=7
            ),
        ),
        (
            MarketKind.COMMIT,
            sign_commit(
                OWNER,
                OFFER.ref,
                winner=H1.node_id,
                manifest=b"m" * 32,
                size=9,
                holders=(H1.node_id, H2.node_id),
            ),
        ),
        (MarketKind.CANCEL, sign_cancel(OWNER, OFFER.ref, (H2.node_id,), CancelReason.LOST_RACE)),
    ]


@pytest.mark.parametrize(("kind", "statement"), all_statements())
def test_every_statement_round_trips(kind, statement):
    decoded = decode_statement(int(kind), statement.blob)
    assert decoded == statement
    assert decoded.blob == statement.blob
    assert peek_job(statement.blob) == JOB


def test_offer_ref_names_the_exact_offer():
    again = make_offer()
    other = make_offer(bid_deadline=NOW + 4)
    assert again.ref == OFFER.ref
    assert other.ref.digest != OFFER.ref.digest
    assert (other.ref.job_id, other.ref.segment, other.ref.attempt) == (JOB, 0, 1)


def test_a_statement_signed_by_someone_else_is_refused():
    fields = {"host": H1.node_id.key, **ref_fields(OFFER.ref), "price": 5, "finish": 1}
    fields |= {"held": 0, "vcpus": 1, "memory": 96, "disk": 1, "slots": 1}
    assert decode_bid(signed(H1, BID_CONTEXT, fields)).host == H1.node_id
    assert refused(decode_bid, signed(STRANGER, BID_CONTEXT, fields)) is MarketRefusal.BAD_SIGNATURE


def test_signatures_are_domain_separated():
    fields = {"host": H1.node_id.key, **ref_fields(OFFER.ref), "price": 5, "finish": 1}
    fields |= {"held": 0, "vcpus": 1, "memory": 96, "disk": 1, "slots": 1}
    assert refused(decode_bid, signed(H1, OFFER_CONTEXT, fields)) is MarketRefusal.BAD_SIGNATURE
    assert refused(decode_bid, signed(H1, AWARD_CONTEXT, fields)) is MarketRefusal.BAD_SIGNATURE


def test_an_offer_for_someone_elses_job_id_is_refused():
    blob = signed(OWNER, OFFER_CONTEXT, offer_fields(job=bytes(32)))
    assert refused(decode_offer, blob) is MarketRefusal.JOB_MISMATCH
    blob = signed(STRANGER, OFFER_CONTEXT, offer_fields(owner=STRANGER.node_id.key))
    assert refused(decode_offer, blob) is MarketRefusal.JOB_MISMATCH  # the stranger's key, our job


def test_the_offer_fields_the_refusal_cases_start_from_are_a_valid_offer():
    # without it every refusal case below passed for one missing field ("args")
    assert decode_offer(signed(OWNER, OFFER_CONTEXT, offer_fields())).extent_s == 100


@pytest.mark.parametrize(
    "over",
    [
        {"memory": 64},  # below MIN_MEMORY_MIB
        {"vcpus": 0},
        {"k": 0},
        {"k": MAX_K + 1},
        {"ceiling": 0},
        {"ceiling": MAX_UNITS + 1},
        {"extent": 0},
        {"kvm": 1},  # an integer is not a boolean
        {"segment": True},  # nor a boolean an integer
        {"arch": "x" * 33},
        {"image": ""},
        {"checkpoint": b"short"},
        {"holders": [H1.node_id.key, H1.node_id.key]},
        {"holders": [b"x" * 31]},
        {"holders": [H1.node_id.key] * (MAX_HOLDERS + 1)},
        {"nonce": b"short"},
        {"deadline": -1},
        # validly signed, but past what a host can act on (the estimate overflowed a bid)
        {"extent": 2**32 + 1},
        {"extent": 2**64 - 1},
        {"size": 2**41 + 1},
        {"deadline": 2**63},
    ],
)
def test_malformed_offers_are_refused(over):
    fields = offer_fields(**over)
    if "nonce" in over:
        fields["job"] = derive_job_id(OWNER.node_id.key, over["nonce"])
    assert refused(decode_offer, signed(OWNER, OFFER_CONTEXT, fields)) is MarketRefusal.MALFORMED


def test_award_grants_must_be_the_owners_for_this_job_node_and_epoch():
    def award_with(grant: Any, node: Identity = H1, epoch: int = 3, owner: Identity = OWNER):
        row = [node.node_id.key, 5, epoch, grant.blob]
        fields = {"owner": owner.node_id.key, **ref_fields(OFFER.ref), "winners": [row]}
        return signed(owner, AWARD_CONTEXT, fields)

    assert decode_award(award_with(grant_for(H1, 3))).winners[0].grant == grant_for(H1, 3)
    for blob in (
        award_with(grant_for(H2, 3)),  # another node's grant
        award_with(grant_for(H1, 4)),  # another epoch
        award_with(grant_for(H1, 3, nonce=b"another-nonce-1")),  # another job
        award_with(grant_for(H1, 3, owner=STRANGER, nonce=NONCE), owner=OWNER),
    ):
        assert refused(decode_award, blob) is MarketRefusal.BAD_GRANT
    forged = grant_for(H1, 3).blob[:-1] + b"\x00"
    row = [H1.node_id.key, 5, 3, forged]
    fields = {"owner": OWNER.node_id.key, **ref_fields(OFFER.ref), "winners": [row]}
    assert refused(decode_award, signed(OWNER, AWARD_CONTEXT, fields)) is MarketRefusal.BAD_GRANT


def test_awards_name_each_winner_once_and_k_at_most():
    row = [H1.node_id.key, 5, 0, None]
    for rows in ([row, row], [], [[bytes([n]) * 32, 5, 0, None] for n in range(9)], [row[:3]]):
        fields = {"owner": OWNER.node_id.key, **ref_fields(OFFER.ref), "winners": rows}
        assert (
            refused(decode_award, signed(OWNER, AWARD_CONTEXT, fields)) is MarketRefusal.MALFORMED
        )


def test_cancel_and_commit_are_strict():
    cancel = sign_cancel(OWNER, OFFER.ref, (H1.node_id,), CancelReason.ABANDONED)
    assert decode_cancel(cancel.blob).reason is CancelReason.ABANDONED
    fields = {"owner": OWNER.node_id.key, **ref_fields(OFFER.ref), "nodes": [H1.node_id.key]}
    bad = signed(OWNER, CANCEL_CONTEXT, fields | {"reason": 9})
    assert refused(decode_cancel, bad) is MarketRefusal.MALFORMED
    fields = {"owner": OWNER.node_id.key, **ref_fields(OFFER.ref), "winner": H1.node_id.key}
    fields |= {"manifest": b"m" * 32, "size": 1, "holders": []}
    assert refused(decode_commit, signed(OWNER, COMMIT_CONTEXT, fields)) is MarketRefusal.MALFORMED


def test_decode_statement_refuses_unknown_kinds_and_peek_refuses_garbage():
    with pytest.raises(RemoteProtocolError):
        decode_statement(99, OFFER.blob)
    with pytest.raises(RemoteProtocolError):
        peek_job(b"\x93garbage")


def test_signing_what_peers_would_refuse_is_a_local_error():
    with pytest.raises(LocalProtocolError):
        make_offer(k=0)
    with pytest.raises(LocalProtocolError):
        make_bid(H1, price=0)
    with pytest.raises(LocalProtocolError):
        sign_completion(H1, OFFER.ref, manifest=b"short", size=1, progress=b"p" * 32, cpu_ms=1)


DECODERS = [decode_offer, decode_bid, decode_award, decode_completion, decode_commit, decode_cancel]


def _only_remote_errors(blob: bytes) -> None:
    for decode in DECODERS:
        try:
            decode(blob)
        except RemoteProtocolError:
            pass


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=3000))
def test_fuzz_random_bytes(blob):
    _only_remote_errors(blob)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from([s.blob for _, s in all_statements()]), edit_lists(3000, 8))
def test_fuzz_mutated_statements(blob, edits):
    mutated = mutate(blob, edits)
    _only_remote_errors(mutated)
    for decode in DECODERS:
        accepted_only_if_unchanged(decode, blob, mutated)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(list(offer_fields())),
    st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.binary(max_size=40)),
)
def test_fuzz_signed_offers_with_wrong_fields(name, value):
    blob = signed(OWNER, OFFER_CONTEXT, offer_fields(**{name: value}))
    _only_remote_errors(blob)
    _only_remote_errors(msgpack.packb([blob, b"x" * 64]))


# -- the auction ------------------------------------------------------------------------


def test_score_formula():
    reputation = Reputation()
    offer = make_offer(ceiling=10, checkpoint_size=100)
    bids = [
        make_bid(H1, offer, price=5, finish_s=100, held_bytes=100),
        make_bid(H2, offer, price=2, finish_s=200, held_bytes=0),
    ]
    one, two = score_bids(offer, bids, reputation, ScoreWeights())
    assert one.value == pytest.approx(0.4 * 0.5 + 0.4 * 1.0 + 0.2 * 1.0)
    assert two.value == pytest.approx(0.4 * 0.8 + 0.4 * 0.5 + 0.2 * 0.0)
    assert one.reliability == pytest.approx(2 / 3)  # a newcomer's prior
    assert one.score == pytest.approx(one.reliability * one.value)


def test_auction_awards_the_best_k_and_fewer_if_fewer_bid():
    auction = Auctioneer(OFFER, NOW, AuctionConfig(), Reputation())
    assert not auction.ready(NOW)
    auction.add_bid(make_bid(H1, price=9), NOW)
    assert [s.bid.host for s in auction.select(random.Random(1))] == [H1.node_id]
    auction.add_bid(make_bid(H2, price=3), NOW)
    auction.add_bid(make_bid(H3, price=1), NOW)
    picks = auction.select(random.Random(1))
    assert [s.bid.host for s in picks] == [H3.node_id, H2.node_id]
    assert auction.ready(NOW + 3)


def test_ties_are_broken_by_the_rng_not_by_keys():
    winners = set()
    for seed in range(20):
        auction = Auctioneer(make_offer(k=1), NOW, AuctionConfig(), Reputation())
        for host in (H1, H2, H3):
            auction.add_bid(make_bid(host, auction.offer), NOW)
        first = auction.select(random.Random(seed))[0].bid.host
        assert first == auction.select(random.Random(seed))[0].bid.host  # deterministic
        winners.add(first)
    assert len(winners) == 3


def test_hosts_below_min_reliability_are_not_eligible():
    reputation = Reputation()
    for _ in range(6):
        reputation.failed(H1.node_id)
    assert reputation.score(H1.node_id) < AuctionConfig().min_reliability
    auction = Auctioneer(OFFER, NOW, AuctionConfig(), reputation)
    auction.add_bid(make_bid(H1, price=1), NOW)
    assert auction.select(random.Random(1)) == []
    auction.add_bid(make_bid(H2, price=10), NOW)
    assert [s.bid.host for s in auction.select(random.Random(1))] == [H2.node_id]


def test_auction_refuses_bids_that_do_not_fit():
    auction = Auctioneer(OFFER, NOW, AuctionConfig(max_bids=2), Reputation())
    stale = make_offer(attempt=2)
    other_job = make_offer(job_nonce=b"another-nonce-1")
    cases = [
        (make_bid(H1, stale), NOW, MarketRefusal.STALE),
        (make_bid(H1, other_job), NOW, MarketRefusal.UNKNOWN_OFFER),
        (make_bid(H1), NOW + 3.5, MarketRefusal.LATE),
        (make_bid(H1, price=11), NOW, MarketRefusal.OVER_CEILING),
        (make_bid(H1, capacity=Capacity(1, 64, 100, 1)), NOW, MarketRefusal.UNFIT),
        (make_bid(H1, capacity=Capacity(1, 96, 100, 0)), NOW, MarketRefusal.UNFIT),
    ]
    for b, at, reason in cases:
        with pytest.raises(MarketRefused) as info:
            auction.add_bid(b, at)
        assert info.value.reason is reason
    first = make_bid(H1)
    assert auction.add_bid(first, NOW) is BidOutcome.ACCEPTED
    assert auction.add_bid(decode_bid(first.blob), NOW) is BidOutcome.DUPLICATE
    with pytest.raises(MarketRefused) as info:
        auction.add_bid(make_bid(H1, price=4), NOW)
    assert info.value.reason is MarketRefusal.EQUIVOCATION
    assert auction.add_bid(make_bid(H2), NOW) is BidOutcome.ACCEPTED
    assert auction.add_bid(make_bid(H3), NOW) is BidOutcome.IGNORED
    assert [b.price for b in auction.bids] == [5, 5]


def test_auction_closes_once_every_recipient_has_bid():
    auction = Auctioneer(OFFER, NOW, AuctionConfig(), Reputation())
    auction.expect(2)
    auction.add_bid(make_bid(H1), NOW)
    assert not auction.ready(NOW)
    auction.add_bid(make_bid(H2), NOW)
    assert auction.ready(NOW)


# -- reputation -------------------------------------------------------------------------


def test_reputation_rewards_completions_and_punishes_failures_and_lateness():
    book = Reputation()
    node = H1.node_id
    assert book.score(node) == pytest.approx(2 / 3)
    book.completed(node, estimate_s=100, actual_s=100)
    assert book.score(node) == pytest.approx(3 / 4)
    book.failed(node)
    assert book.score(node) == pytest.approx(3 / 5)
    book.failed(node, bad_completion=True)
    assert book.score(node) == pytest.approx(3 / 7)
    late = Reputation(ReputationConfig(lateness_alpha=1.0))
    late.completed(node, estimate_s=100, actual_s=500)
    assert late.score(node) == pytest.approx(3 / 4 * 1.25 / 5)
    assert late.standing(node).lateness == pytest.approx(5.0)
    assert [s.node for s in book.standings()] == [node]
    assert book.statistics()["bad_completions"] == 1


@given(st.lists(st.tuples(st.booleans(), st.integers(1, 1000), st.integers(0, 5000))))
def test_scores_stay_in_range_and_move_the_right_way(history):
    book, node = Reputation(), H1.node_id
    for success, estimate, actual in history:
        before = book.standing(node)
        if success:
            book.completed(node, estimate, actual)
        else:
            book.failed(node)
            assert book.score(node) <= before.score
        assert 0 < book.score(node) <= 1


# -- the bidder -------------------------------------------------------------------------


POLICY = HostPolicy(vcpus=4, memory_mib=1024, disk_mib=10_000, replicas=2)


def bidder(identity: Identity = H1, **over: Any) -> Bidder:
    fields = {"vcpus": 4, "memory_mib": 1024, "disk_mib": 10_000, "replicas": 2} | over
    return Bidder(identity, HostPolicy(**fields))


def sent(effects: list[Any], kind: MarketKind) -> list[bytes]:
    return [e.blob for e in effects if isinstance(e, SendStatement) and e.kind is kind]


def test_bidder_bids_with_price_estimate_and_free_capacity():
    b = bidder(price_floor=4)
    effects = b.handle(OfferReceived(OFFER.blob, held_bytes=4 * MIB), NOW)
    [blob] = sent(effects, MarketKind.BID)
    bid = decode_bid(blob)
    assert bid.host == H1.node_id and bid.ref == OFFER.ref
    assert bid.price == 4  # nothing reserved yet
    assert bid.held_bytes == 4 * MIB
    assert bid.finish_s == estimate_finish_s(OFFER, b.policy, 4 * MIB)
    assert bid.finish_s == math.ceil(6 * MIB / 12_500_000 + 10 + 100)
    assert bid.capacity == Capacity(4, 1024, 10_000, 2)
    second = decode_bid(
        sent(b.handle(OfferReceived(make_offer(attempt=2).blob), NOW), MarketKind.BID)[0]
    )
    assert second.price == 6  # half the slots reserved: 4 * 1.5
    assert second.capacity == Capacity(3, 1024 - 96, 10_000 - disk_need_mib(OFFER), 1)


def test_estimate_scales_with_speed_and_vcpus():
    offer = make_offer(extent_s=400, requirements=Requirements(96, 2), checkpoint_size=0)
    fast = HostPolicy(4, 1024, 1000, 1, bench_score=2000, setup_s=0)
    slow = HostPolicy(4, 1024, 1000, 1, cpu_share=0.5, setup_s=0)
    assert estimate_finish_s(offer, fast, 0) == 100
    assert estimate_finish_s(offer, slow, 0) == 400


@pytest.mark.parametrize(
    ("over", "offer_over", "why"),
    [
        ({"draining": True}, {}, "draining"),
        ({"arch": "aarch64"}, {}, "arch"),
        ({"kvm": False}, {"requirements": Requirements(96, 1, kvm=True)}, "kvm"),
        ({"price_floor": 11}, {}, "price"),
        ({"vcpus": 0}, {}, "capacity"),
        ({"memory_mib": 95}, {}, "capacity"),
        ({"replicas": 0}, {}, "capacity"),
        ({"disk_mib": 100}, {}, "disk"),
        ({}, {"bid_deadline": NOW - 1}, "late"),
        ({}, {"bid_deadline": NOW + 3601}, "deadline_far"),
    ],
)
def test_bidder_declines(over, offer_over, why):
    b = bidder(**over)
    assert b.handle(OfferReceived(make_offer(**offer_over).blob), NOW) == []
    assert b.statistics()[f"declined_{why}"] == 1


def test_the_largest_offer_a_host_takes_still_gets_a_signed_bid():
    # extent 2**64 - 1 made the finish estimate unencodable: handle raised out of the agent
    offer = make_offer(extent_s=2**32, checkpoint_size=2**41, requirements=Requirements(96, 1))
    b = bidder(cpu_share=0.01, bench_score=1, disk_mib=2**22)
    [blob] = sent(b.handle(OfferReceived(offer.blob), NOW), MarketKind.BID)
    assert decode_bid(blob).finish_s == estimate_finish_s(offer, b.policy, 0)


def test_a_declined_far_deadline_holds_no_capacity():
    b = bidder()
    for attempt in (1, 2, 3):
        b.handle(OfferReceived(make_offer(attempt=attempt, bid_deadline=2**62).blob), NOW)
    assert b.free().slots == 2 and b.statistics()["declined_deadline_far"] == 3


def test_bidder_runs_an_award_and_reports_completion_until_committed():
    b = bidder()
    b.handle(OfferReceived(OFFER.blob), NOW)
    award = sign_award(OWNER, OFFER.ref, (Winner(H1.node_id, 1), Winner(H2.node_id, 3)))
    [start] = b.handle(AwardReceived(award.blob), NOW + 3)
    assert isinstance(start, StartReplica) and start.offer == OFFER and start.award.price == 1
    assert b.handle(AwardReceived(award.blob), NOW + 3) == []  # a duplicate
    finished = ReplicaFinished(OFFER.ref, b"m" * 32, 5 * MIB, b"p" * 32, 100_000)
    [completion] = sent(b.handle(finished, NOW + 100), MarketKind.COMPLETION)
    assert decode_completion(completion).manifest == b"m" * 32
    assert b.free().vcpus == 4 and b.free().disk_mib < 10_000  # the checkpoint is kept
    assert b.next_wakeup() == NOW + 105
    assert sent(b.tick(NOW + 105), MarketKind.COMPLETION) == [completion]
    assert b.next_wakeup() == NOW + 115  # backoff doubles
    commit = sign_commit(
        OWNER, OFFER.ref, winner=H1.node_id, manifest=b"m" * 32, size=1, holders=(H1.node_id,)
    )
    [kept] = b.handle(CommitReceived(commit.blob), NOW + 110)
    assert isinstance(kept, RetainCheckpoint) and kept.holder
    assert b.commitments() == [] and b.next_wakeup() == math.inf


def test_bidder_releases_a_lost_auction_and_an_expired_bid():
    b = bidder()
    b.handle(OfferReceived(OFFER.blob), NOW)
    award = sign_award(OWNER, OFFER.ref, (Winner(H2.node_id, 3),))
    assert b.handle(AwardReceived(award.blob), NOW + 3) == []
    assert b.statistics()["auctions_lost"] == 1 and b.commitments() == []
    b.handle(OfferReceived(make_offer(attempt=2).blob), NOW)
    assert b.next_wakeup() == NOW + 3 + BidderConfig().award_grace_s
    b.tick(NOW + 13)
    assert b.commitments() == [] and b.statistics()["bids_expired"] == 1


def test_bidder_cancel_stops_the_replica():
    b = bidder()
    b.handle(OfferReceived(OFFER.blob), NOW)
    b.handle(AwardReceived(sign_award(OWNER, OFFER.ref, (Winner(H1.node_id, 1),)).blob), NOW)
    not_ours = sign_cancel(OWNER, OFFER.ref, (H2.node_id,), CancelReason.LOST_RACE)
    assert b.handle(CancelReceived(not_ours.blob), NOW) == []
    cancel = sign_cancel(OWNER, OFFER.ref, (H1.node_id,), CancelReason.LOST_RACE)
    assert b.handle(CancelReceived(cancel.blob), NOW) == [StopReplica(OFFER.ref, "lost_race")]
    assert b.commitments() == []
    late = ReplicaFinished(OFFER.ref, b"m" * 32, 1, b"p" * 32, 1)
    assert b.handle(late, NOW) == [] and b.statistics()["finished_ignored"] == 1


def test_bidder_refuses_forged_and_mismatched_owner_messages():
    b = bidder()
    b.handle(OfferReceived(OFFER.blob), NOW)
    me = H1.node_id
    cases = [
        (AwardReceived(sign_award(STRANGER, OFFER.ref, (Winner(me, 1),)).blob), "wrong_author"),
        (
            AwardReceived(sign_award(OWNER, make_offer(attempt=5).ref, (Winner(me, 1),)).blob),
            "unknown_offer",
        ),
        (AwardReceived(sign_award(OWNER, OFFER.ref, (Winner(me, 9),)).blob), "mismatch"),
        (
            AwardReceived(sign_award(OWNER, OFFER.ref, (Winner(me, 1, 1, grant_for(H1, 1)),)).blob),
            "mismatch",
        ),
        (
            CancelReceived(sign_cancel(STRANGER, OFFER.ref, (me,), CancelReason.LOST_RACE).blob),
            "wrong_author",
        ),
        (
            CommitReceived(
                sign_commit(
                    STRANGER, OFFER.ref, winner=me, manifest=b"m" * 32, size=1, holders=(me,)
                ).blob
            ),
            "wrong_author",
        ),
        (AwardReceived(b"\x92garbage"), "malformed"),
    ]
    for event, reason in cases:
        assert b.handle(event, NOW) == []
        assert b.statistics()[f"refused_{reason}"] >= 1, reason
    assert [c.phase for c in b.commitments()] == [Phase.BID]


def test_network_award_starts_with_a_grant_the_host_can_claim():
    offer = make_offer(requirements=Requirements(96, 1, network=True))
    b = bidder()
    b.handle(OfferReceived(offer.blob), NOW)
    award = sign_award(OWNER, offer.ref, (Winner(H1.node_id, 1, 7, grant_for(H1, 7)),))
    [start] = b.handle(AwardReceived(award.blob), NOW)
    assert start.award.grant is not None
    claim = sign_claim(H1, start.award.grant, issued_at=NOW)
    assert claim.epoch == 7 and claim.node_id == H1.node_id


def test_bidder_gives_up_a_checkpoint_nobody_collects_and_handles_failure():
    b = Bidder(H1, POLICY, BidderConfig(hold_s=50))
    b.handle(OfferReceived(OFFER.blob), NOW)
    b.handle(AwardReceived(sign_award(OWNER, OFFER.ref, (Winner(H1.node_id, 1),)).blob), NOW)
    b.handle(ReplicaFinished(OFFER.ref, b"m" * 32, 1, b"p" * 32, 1), NOW)
    effects = []
    for t in range(1, 60):
        effects += b.tick(NOW + t)
    assert StopReplica(OFFER.ref, "owner silent") in effects and b.commitments() == []
    b.handle(OfferReceived(make_offer(attempt=2).blob), NOW)
    b.handle(ReplicaFailed(make_offer(attempt=2).ref, "qemu died"), NOW)
    assert b.commitments() == [] and b.statistics()["replicas_failed"] == 1


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_bidder_never_bids_beyond_its_caps(data):
    policy = HostPolicy(
        vcpus=data.draw(st.integers(0, 6)),
        memory_mib=data.draw(st.integers(0, 1024)),
        disk_mib=data.draw(st.integers(0, 2000)),
        replicas=data.draw(st.integers(0, 4)),
    )
    b = Bidder(H1, policy)
    offers: list[Offer] = []
    now = float(NOW)
    for step in range(data.draw(st.integers(1, 25))):
        action = data.draw(st.sampled_from(["offer", "offer", "award", "finish", "tick", "shrink"]))
        if action == "offer":
            memory, vcpus = data.draw(st.integers(72, 512)), data.draw(st.integers(1, 3))
            offer = make_offer(
                attempt=step + 1,
                requirements=Requirements(memory, vcpus),
                checkpoint_size=data.draw(st.integers(0, 500)) * MIB,
                bid_deadline=int(now) + 3,
            )
            offers.append(offer)
            before = b.statistics().get("bids", 0)
            b.handle(OfferReceived(offer.blob), now)
            if b.statistics().get("bids", 0) > before:  # it bid: everything held fits the caps
                active = [c for c in b.commitments() if c.phase is not Phase.FINISHED]
                assert sum(c.vcpus for c in active) <= policy.vcpus
                assert sum(c.memory_mib for c in active) <= policy.memory_mib
                assert sum(c.disk_mib for c in b.commitments()) <= policy.disk_mib
                assert len(active) <= policy.replicas
        elif action == "award" and offers:
            offer = data.draw(st.sampled_from(offers))
            b.handle(
                AwardReceived(sign_award(OWNER, offer.ref, (Winner(H1.node_id, 1),)).blob), now
            )
        elif action == "finish" and offers:
            offer = data.draw(st.sampled_from(offers))
            b.handle(ReplicaFinished(offer.ref, b"m" * 32, 1, b"p" * 32, 1), now)
        elif action == "shrink":  # the volunteer came back: caps drop below what is held
            b.handle(PolicyChanged(HostPolicy(1, 100, 100, 1)), now)
            policy = b.policy
        else:
            now += data.draw(st.integers(0, 20))
            b.tick(now)


def test_only_the_offer_s_recipients_bid_and_close_the_auction():
    auction = Auctioneer(OFFER, NOW, AuctionConfig(), Reputation())
    auction.add_bid(make_bid(STRANGER, price=1, finish_s=1), NOW)  # before the delivery is known
    auction.add_bid(make_bid(H1, price=9), NOW)
    auction.expect(2, frozenset({H1.node_id, H2.node_id}))
    assert auction.dropped == 1 and [b.host for b in auction.bids] == [H1.node_id]
    assert not auction.ready(NOW)  # the stranger's bid does not count towards closing
    with pytest.raises(MarketRefused) as refused:
        auction.add_bid(make_bid(H3, price=1), NOW)
    assert refused.value.reason is MarketRefusal.NOT_OFFERED
    auction.add_bid(make_bid(H2, price=5), NOW)
    assert auction.ready(NOW)
    assert {s.bid.host for s in auction.select(random.Random(1))} == {H1.node_id, H2.node_id}
