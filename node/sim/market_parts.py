"""The simulated market's parts: its configuration, hosts, owners, books and messages.

Theory of operation
-------------------
Plain data for node/sim/market_world.py and the collaborators it composes:
``WorldConfig`` (every modelled quantity of one run), ``HostModel`` (a host's
speed, bandwidth and price floor), ``ReplicaRun`` (one replica, for
accounting), ``SimHost`` and ``SimOwner`` (a node's cores and the world's view
of it), ``MarketAccounts`` (the world's books: what the study sums up and what
node/sim/market_invariants.py checks, with the keys each step touched),
``LiveView`` (the hosts in the owners' membership view) and ``Frame`` (a
message arriving; the modelled delays are node/sim/market_timers.py). Also the
few helpers both the world and the tests use.
"""

from __future__ import annotations

import hashlib
import random
from bisect import bisect_right
from collections import Counter
from dataclasses import dataclass, field

from node.base.identity import Identity, NodeId
from node.ledger.payee import PayeeLedger
from node.ledger.payer import PayerLedger
from node.ledger.tokens import HashChain
from node.market.bidder import Bidder, HostPolicy
from node.market.offer_messages import Offer
from node.market.owner_effects import JobOwner
from node.market.segment_machine import SegmentMachine
from node.sim.availability import IntervalIndex

EPOCH = 1_800_000_000.0  # simulated Unix time of the run's start (a Monday, 00:00 UTC)
LEDGER_PAYMENT, LEDGER_ACK = 2, 3  # node.runtime.ledger_service.LedgerKind values
NodeKey = tuple[str, int]  # ("h", host index) or ("o", owner index): a node on the heap
SegmentKey = tuple[bytes, int]  # job id, segment
AttemptKey = tuple[bytes, int]  # job id, attempt


@dataclass(frozen=True, slots=True)
class WorldConfig:
    k: int
    jobs_per_owner: tuple[int, ...]
    segments: int
    extent_s: int
    memory_mib: int
    checkpoint_bytes: int
    ceiling: int
    horizon_s: float
    offer_fanout: int
    latency_s: float
    jitter_s: float
    loss: float
    detection_s: float
    verify_s: float
    setup_s: int
    run_noise: float
    owner_bandwidth: int
    departure: str
    bid_window_s: float
    run_grace_s: float
    chain_length: int


@dataclass(slots=True)
class HostModel:
    """What the world knows of one host beyond its availability."""

    speed: float  # guest vCPU-seconds per second
    bandwidth: int  # bytes per second
    price_floor: int


@dataclass(slots=True)
class ReplicaRun:
    """One replica, for accounting: who, what, when, and how it ended."""

    host: int
    job_id: bytes
    segment: int
    attempt: int
    started: float
    ended: float | None = None
    outcome: str = "running"  # finished | lost (host down) | stopped:<reason> | running


@dataclass(slots=True)
class SimHost:
    index: int
    identity: Identity
    availability: IntervalIndex
    model: HostModel
    policy: HostPolicy
    payee: PayeeLedger
    bidder: Bidder | None = None
    generation: int = 0
    store: set[bytes] = field(default_factory=set)
    running: dict[bytes, tuple[ReplicaRun, Offer]] = field(default_factory=dict)  # by offer digest
    down_since: float | None = 0.0


@dataclass(slots=True)
class SimOwner:
    index: int
    identity: Identity
    payer: PayerLedger
    core: JobOwner  # its jobs' machines, and the owner's effect handling the agent runs
    store: set[bytes] = field(default_factory=set)  # checkpoints fetched here


@dataclass(slots=True)
class MarketAccounts:
    """The world's books, kept as the steps go: the study's figures and the invariants'
    input. ``touched_*`` name what the last steps changed (the invariants drain them)."""

    payees: list[PayeeLedger]  # by host index
    payers: dict[NodeId, PayerLedger]  # by owner
    machines: dict[bytes, SegmentMachine]  # every job's, by job id
    stats: Counter[str] = field(default_factory=Counter)
    runs: list[ReplicaRun] = field(default_factory=list)
    running_per_attempt: Counter[AttemptKey] = field(default_factory=Counter)
    commits: dict[SegmentKey, tuple[NodeId, int, float]] = field(default_factory=dict)
    payments: dict[SegmentKey, list[NodeId]] = field(default_factory=dict)  # payees, in order
    chains: dict[bytes, HashChain] = field(default_factory=dict)  # payers' secret chains
    first_offer: float | None = None
    finished: dict[bytes, float] = field(default_factory=dict)  # job id -> when
    touched_segments: set[SegmentKey] = field(default_factory=set)
    touched_payees: set[int] = field(default_factory=set)
    touched_jobs: set[bytes] = field(default_factory=set)
    touched_attempts: set[AttemptKey] = field(default_factory=set)


class LiveView:
    """The hosts in the owners' membership view, in a list that is cheap to sample."""

    def __init__(self) -> None:
        self.members: list[int] = []
        self._slot: dict[int, int] = {}

    def __contains__(self, index: int) -> bool:
        return index in self._slot

    def add(self, index: int) -> None:
        if index not in self._slot:
            self._slot[index] = len(self.members)
            self.members.append(index)

    def remove(self, index: int) -> None:
        slot = self._slot.pop(index)
        last = self.members.pop()
        if last != index:
            self.members[slot] = last
            self._slot[last] = slot


@dataclass(frozen=True, slots=True)
class Frame:
    """A message arriving: ``channel`` is "market" or "ledger"; ``offer`` is sim metadata."""

    sender: NodeId
    channel: str
    kind: int
    blob: bytes
    offer: Offer | None = None


def make_identity(rng: random.Random) -> Identity:
    return Identity.from_seeds(rng.randbytes(32), rng.randbytes(32))


def digest_of(*parts: bytes) -> bytes:
    return hashlib.blake2b(b"".join(parts), digest_size=32).digest()


def next_start(index: IntervalIndex, t: float) -> float | None:
    """The start of the first interval after ``t``."""
    for start, _ in index.intervals[max(0, bisect_right(index.starts, t) - 1) :]:
        if start > t:
            return start
    return None
