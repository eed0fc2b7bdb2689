"""The simulated market's parts: its configuration, hosts, owners, messages and timers.

Theory of operation
-------------------
Plain data for node/sim/market_world.py: ``WorldConfig`` (every modelled
quantity of one run), ``HostModel`` (a host's speed, bandwidth and price
floor), ``ReplicaRun`` (one replica, for accounting), ``SimHost`` and ``SimOwner``
(a node's cores and the world's view of it), and the two kinds of heap entry
besides the engine's own: ``Frame`` (a message arriving) and ``Timer`` (a
modelled delay ending). Also the few helpers both the world and the tests use.
"""

from __future__ import annotations

import hashlib
import random
from bisect import bisect_right
from dataclasses import dataclass, field
from typing import Any

from node.base.identity import Identity, NodeId
from node.ledger.payee import PayeeLedger
from node.ledger.payer import PayerLedger
from node.market.bidder import Bidder, HostPolicy
from node.market.messages import Offer
from node.market.segment_machine import SegmentMachine
from node.sim.availability import IntervalIndex

EPOCH = 1_800_000_000.0  # simulated Unix time of the run's start (a Monday, 00:00 UTC)
LEDGER_PAYMENT, LEDGER_ACK = 2, 3  # node.runtime.ledger_service.LedgerKind values


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
    machines: dict[bytes, SegmentMachine] = field(default_factory=dict)
    store: set[bytes] = field(default_factory=set)  # checkpoints fetched here


@dataclass(frozen=True, slots=True)
class Frame:
    """A message arriving: ``channel`` is "market" or "ledger"; ``offer`` is sim metadata."""

    sender: NodeId
    channel: str
    kind: int
    blob: bytes
    offer: Offer | None = None


@dataclass(frozen=True, slots=True)
class Timer:
    """A scheduled occurrence in the world (``what`` names it, ``args`` its data)."""

    what: str
    args: tuple[Any, ...] = ()


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
