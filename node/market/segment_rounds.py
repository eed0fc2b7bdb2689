"""The owner's segment machine's bookkeeping: its settings, rounds and replicas.

A *round* is one attempt of one segment (node/market/segment_machine.py): its
offer, its open auction, the replicas it awarded, the completions waiting for
verification, the winner and who holds the winner's checkpoint, and a live
hand-off's *move* auction beside it. These are plain records; the machine alone
changes them.

This module is pure: no I/O, no clock.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from node.base.identity import NodeId
from node.market.auction import AuctionConfig, Auctioneer
from node.market.message_fields import MAX_HOLDERS
from node.market.offer_messages import Offer
from node.market.outcome_messages import Completion


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


def machine_config(swarm_id: str, bid_window_s: float, run_grace_s: float) -> MachineConfig:
    """The settings a job owner runs its machines with, from its two market settings
    (the agent's ``market.*`` config, the simulator's world): one place for both."""
    return MachineConfig(
        swarm_id,
        auction=AuctionConfig(bid_window_s=bid_window_s),
        reoffer_s=max(bid_window_s, 1.0),
        run_grace_s=run_grace_s,
        replicate_retry_s=30.0,
    )


@dataclass(slots=True)
class Replica:
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
class MoveAuction:
    """The auction for a live hand-off; the guest still runs at ``offer.source``."""

    offer: Offer
    auction: Auctioneer


@dataclass(slots=True)
class Round:
    """One attempt of one segment."""

    offer: Offer
    auction: Auctioneer | None
    replicas: dict[NodeId, Replica] = field(default_factory=dict)
    awarded_at: float = 0.0
    run_deadline: float = math.inf
    queue: list[NodeId] = field(default_factory=list)  # completed, not yet verified
    candidate: NodeId | None = None  # being verified
    winner: NodeId | None = None  # verified
    copies: dict[bytes, dict[NodeId, None]] = field(default_factory=dict)  # manifest -> nodes
    replicate_at: float = math.inf
    excused: bool = False  # the owner was away: losses are not the hosts' fault
    move: MoveAuction | None = None  # a live hand-off of the sole replica, being auctioned

    def winning(self) -> Completion:
        assert self.winner is not None
        completion = self.replicas[self.winner].completion
        assert completion is not None
        return completion
