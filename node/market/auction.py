"""The auction of one offer: collect bids until the deadline, score them, pick the best k.

Theory of operation
-------------------
``Auctioneer`` holds the bids for one offer (one attempt of one segment); the
owner's segment machine (node/market/jobs.py) opens it when it signs the offer, feeds
it the bids, and closes it when ``ready(now)``: the bid deadline has passed, or
every host the offer reached has answered (``expect``). ``select`` then ranks
the eligible bids and returns the best ``k`` (fewer if fewer bid; none means
the machine re-offers later).

A bid is refused (``MarketRefused``, counted by the machine) if it names
another offer, arrives after the deadline, asks more than the ceiling, or
reports free capacity that cannot hold the offer's requirements. A second,
different bid from the same host is equivocation and is refused; the first
stands. An identical copy is a duplicate and changes nothing.

Scoring. For offer ceiling ``C``, checkpoint size ``S``, and bid ``b``::

    price     p = 1 - b.price / C                    (0 at the ceiling)
    finish    f = min(finish over bids) / b.finish   (1 for the fastest estimate)
    locality  l = min(b.held, S) / S                 (0 when S = 0: booting an image)
    value     = w_price * p + w_finish * f + w_locality * l    (0.4, 0.4, 0.2)
    score     = reputation(b.host) * value

Price and finish matter equally (the owner pays for one and waits for the
other); locality is the tie-breaker it deserves to be: bytes already held
shorten the transfer, which a good finish estimate already includes. The
finish term is relative, so it means the same for a 10 s and a 10 h segment.
Reputation multiplies rather than adds: a bid's promises are worth the
probability that its host keeps them (node/market/reputation.py), so no price can buy
back a record of failures, and bids from hosts below ``min_reliability`` are
not eligible at all. Equal scores are ordered by the rng the machine passes,
so no host wins ties by the accident of its key.

Invariants: at most ``k`` winners, all distinct, all with a bid at or under
the ceiling that arrived by the deadline; ``select`` never returns a host
below ``min_reliability``.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field

from node.base.identity import NodeId
from node.market.message_fields import MarketRefusal, MarketRefused
from node.market.offer_messages import Bid, Offer
from node.market.reputation import Reputation
from node.membership.random_set import RandomSource


@dataclass(frozen=True, slots=True)
class ScoreWeights:
    price: float = 0.4
    finish: float = 0.4
    locality: float = 0.2

    def __post_init__(self) -> None:
        weights = (self.price, self.finish, self.locality)
        if min(weights) < 0 or sum(weights) <= 0:
            raise ValueError("score weights must be >= 0 and not all 0")


@dataclass(frozen=True, slots=True)
class AuctionConfig:
    bid_window_s: float = 3.0
    weights: ScoreWeights = field(default_factory=ScoreWeights)
    min_reliability: float = 0.25  # bids from hosts scoring lower are not eligible
    max_bids: int = 256  # per offer; later bids are ignored

    def __post_init__(self) -> None:
        if self.bid_window_s <= 0 or not 0 <= self.min_reliability < 1 or self.max_bids < 1:
            raise ValueError("need bid_window_s > 0, 0 <= min_reliability < 1, max_bids >= 1")


@dataclass(frozen=True, slots=True)
class ScoredBid:
    bid: Bid
    reliability: float
    value: float

    @property
    def score(self) -> float:
        return self.reliability * self.value


class BidOutcome(enum.Enum):
    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"
    IGNORED = "ignored"  # the auction holds max_bids already


def score_bids(
    offer: Offer, bids: Iterable[Bid], reputation: Reputation, weights: ScoreWeights
) -> list[ScoredBid]:
    """Score ``bids`` for ``offer`` (see the module docstring), in the order given."""
    bids = list(bids)
    if not bids:
        return []
    fastest = min(max(b.finish_s, 1) for b in bids)
    size = offer.fetch_bytes
    total = weights.price + weights.finish + weights.locality
    scored = []
    for b in bids:
        price = 1 - b.price / offer.ceiling
        finish = fastest / max(b.finish_s, 1)
        locality = min(b.held_bytes, size) / size if size else 0.0
        value = weights.price * price + weights.finish * finish + weights.locality * locality
        scored.append(ScoredBid(b, reputation.score(b.host), value / total))
    return scored


class Auctioneer:
    """The bids for one offer. See the module docstring."""

    def __init__(
        self, offer: Offer, opened_at: float, config: AuctionConfig, reputation: Reputation
    ) -> None:
        self.offer = offer
        self.config = config
        self.deadline = opened_at + config.bid_window_s
        self._reputation = reputation
        self._bids: dict[NodeId, Bid] = {}
        self._expected: int | None = None
        self._hosts: frozenset[NodeId] | None = None  # the offer's recipients, once known
        self.dropped = 0  # bids taken before the recipients were known, from others

    @property
    def bids(self) -> tuple[Bid, ...]:
        return tuple(self._bids.values())

    def add_bid(self, bid: Bid, now: float) -> BidOutcome:
        """Take ``bid``; raise ``MarketRefused`` if it does not fit this offer."""
        offer = self.offer
        if bid.ref.job_id != offer.ref.job_id:
            raise MarketRefused(MarketRefusal.UNKNOWN_OFFER, "bid for another job")
        if bid.ref != offer.ref:
            raise MarketRefused(MarketRefusal.STALE, "bid for another segment or attempt")
        if self._hosts is not None and bid.host not in self._hosts:
            raise MarketRefused(MarketRefusal.NOT_OFFERED, f"{bid.host.short} was not offered it")
        if now > self.deadline:
            raise MarketRefused(MarketRefusal.LATE, f"bid from {bid.host.short} after the deadline")
        if bid.price > offer.ceiling:
            raise MarketRefused(
                MarketRefusal.OVER_CEILING, f"bid of {bid.price} over {offer.ceiling}"
            )
        need, free = offer.requirements, bid.capacity
        if free.vcpus < need.vcpus or free.memory_mib < need.memory_mib or free.slots < 1:
            raise MarketRefused(
                MarketRefusal.UNFIT, f"{bid.host.short} reports too little capacity"
            )
        held = self._bids.get(bid.host)
        if held is not None:
            if held.blob == bid.blob:
                return BidOutcome.DUPLICATE
            raise MarketRefused(MarketRefusal.EQUIVOCATION, f"{bid.host.short} bid twice")
        if len(self._bids) >= self.config.max_bids:
            return BidOutcome.IGNORED
        self._bids[bid.host] = bid
        return BidOutcome.ACCEPTED

    def expect(self, recipients: int, hosts: frozenset[NodeId] | None = None) -> None:
        """The offer reached ``recipients`` hosts: close as soon as all of them have bid.

        With ``hosts`` (who they are), only they may bid: a bid already taken from
        another host is dropped (counted in ``dropped``), later ones are refused.
        """
        self._expected = recipients
        if hosts is not None:
            self._hosts = hosts
            strangers = [node for node in self._bids if node not in hosts]
            for node in strangers:
                del self._bids[node]
            self.dropped += len(strangers)

    def ready(self, now: float) -> bool:
        answered = self._expected is not None and len(self._bids) >= self._expected
        return now >= self.deadline or answered

    def select(self, rng: RandomSource) -> list[ScoredBid]:
        """The best ``k`` eligible bids, best first (ties in ``rng``'s order)."""
        scored = score_bids(self.offer, self._bids.values(), self._reputation, self.config.weights)
        eligible = [s for s in scored if s.reliability >= self.config.min_reliability]
        rng.shuffle(eligible)
        eligible.sort(key=lambda s: -s.score)
        return eligible[: self.offer.k]
