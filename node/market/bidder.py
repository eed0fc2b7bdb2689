"""The host's side of the market: bid within the caps, run what is awarded, report it.

Theory of operation
-------------------
``Bidder`` is one host's sans-IO market core: ``handle(event, now)`` and
``tick(now)`` return effects, ``next_wakeup()`` says when ``tick`` has work.

*Policy.* The agent hands in a ``HostPolicy`` snapshot (``PolicyChanged``
whenever it changes): the caps the volunteer allows Gleaner right now (vCPUs,
memory, disk, concurrent replicas), whether the host is draining, its price
floor, and what it is (arch, KVM, benchmark score, CPU share, bandwidth).

*Commitments.* Every bid reserves what its run would take: the offer's vCPUs,
memory and a replica slot, and disk for the incoming checkpoint plus the save
image it will write (checkpoint size + guest memory), plus, for a job owner's
own program, its bundle and its scratch and output disks. A reservation lives

    BID       from the bid until an award (won: RUNNING; lost: released), or until
              ``award_grace_s`` past the bid deadline (released)
    RUNNING   until the replica finishes (FINISHED), fails, or is cancelled
    FINISHED  vCPUs, memory and slot released; the disk is held, and the completion
              resent with backoff, until the owner's COMMIT or CANCEL, or ``hold_s``

A host bids only if every reservation, this one included, fits the caps, so
it never promises more than it has, even with many offers in flight at once.

*Declining.* No bid when draining, on another arch, without KVM for an offer
that wants it, when the caps would be exceeded, when the price floor is
above the ceiling, for the live move of a guest running here (its
``source`` is us), or when the offer's bids close more than ``max_bid_wait_s``
ahead (a bid holds capacity until then); each counted as ``declined_<why>``.

*Live hand-off.* ``HandOffRequested`` sends the owner a live WITHDRAW for a
running replica, which keeps its reservation until ``ReplicaHandedOff`` (the
guest migrated away) or the usual end of the replica.

*Price and estimate.* ``price = min(ceiling, ceil(floor * (1 + busy)))`` with
``busy`` the share of replica slots already reserved: a host asks more as it
fills, so work spreads over the swarm. The finish estimate is the seconds to
fetch the checkpoint bytes not held (and a job owner's image and inputs: the
offer's ``work``), plus ``setup_s`` (restore and save), plus
the extent (guest vCPU-seconds) over the guest's vCPUs times this host's speed
(``cpu_share * bench_score / BENCH_REFERENCE``).

*Checks.* Awards, cancels and commits must be signed by the owner of the offer
we bid on and name it exactly; an award must pay our bid's price and carry a
route grant exactly when the job wants a network. Anything else is refused and
counted (``refused_<reason>``); nothing a peer sends raises.

Invariants: the reservations of BID and RUNNING replicas never exceed the caps
in force when each was made; at most one bid and one replica per offer; a
completion is sent only for a replica this host was awarded.
"""

from __future__ import annotations

import enum
import math
from collections import Counter
from dataclasses import dataclass

from node.base.identity import Identity, NodeId
from node.base.wire import RemoteProtocolError
from node.market.message_fields import (
    MarketKind,
    MarketRefusal,
    MarketRefused,
    OfferRef,
    refusal_of,
)
from node.market.messages import SendStatement
from node.market.offer_messages import (
    Bid,
    Capacity,
    Offer,
    Winner,
    decode_award,
    decode_offer,
    sign_bid,
)
from node.market.outcome_messages import (
    SegmentCommit,
    decode_cancel,
    decode_commit,
    sign_completion,
    sign_withdraw,
)

BENCH_REFERENCE = 1000  # the benchmark score of one reference vCPU
MIB = 1 << 20
MAX_KNOWN_JOBS = 4096


@dataclass(frozen=True, slots=True)
class HostPolicy:
    """What this host may take on now (caps) and what it is."""

    vcpus: int
    memory_mib: int
    disk_mib: int
    replicas: int
    draining: bool = False
    price_floor: int = 1
    arch: str = "x86_64"
    kvm: bool = True
    bench_score: int = BENCH_REFERENCE  # 0: unknown, taken as the reference
    cpu_share: float = 1.0
    bandwidth_bytes_s: int = 12_500_000  # 100 Mbit/s
    setup_s: int = 10

    def __post_init__(self) -> None:
        if min(self.vcpus, self.memory_mib, self.disk_mib, self.replicas, self.bench_score) < 0:
            raise ValueError("caps and bench_score must be >= 0")
        if self.price_floor < 1 or not 0 < self.cpu_share <= 1 or self.bandwidth_bytes_s < 1:
            raise ValueError("need price_floor >= 1, 0 < cpu_share <= 1, bandwidth >= 1")


@dataclass(frozen=True, slots=True)
class BidderConfig:
    award_grace_s: float = 10.0
    resend_s: float = 5.0
    max_resend_s: float = 120.0
    hold_s: float = 3600.0
    # An offer whose bids close further ahead than this is declined ("deadline_far"):
    # a bid holds capacity until its deadline, so one far off would hold it for ever.
    # An owner's bid window is at most 600 s; the rest is room for its clock's skew.
    max_bid_wait_s: float = 3600.0

    def __post_init__(self) -> None:
        if min(self.award_grace_s, self.hold_s) < 0 or not 0 < self.resend_s <= self.max_resend_s:
            raise ValueError("need grace and hold >= 0, 0 < resend_s <= max_resend_s")
        if self.max_bid_wait_s <= 0:
            raise ValueError("need max_bid_wait_s > 0")


# -- events ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OfferReceived:
    """An offer arrived; ``held_bytes``: how much of its checkpoint our block store holds."""

    blob: bytes
    held_bytes: int = 0


@dataclass(frozen=True, slots=True)
class AwardReceived:
    blob: bytes


@dataclass(frozen=True, slots=True)
class CancelReceived:
    blob: bytes


@dataclass(frozen=True, slots=True)
class CommitReceived:
    blob: bytes


@dataclass(frozen=True, slots=True)
class ReplicaFinished:
    """Our replica of ``ref`` ran its extent and saved checkpoint ``manifest``."""

    ref: OfferRef
    manifest: bytes
    size: int
    progress: bytes
    cpu_ms: int
    halted: bool = False


@dataclass(frozen=True, slots=True)
class ReplicaFailed:
    ref: OfferRef
    reason: str


@dataclass(frozen=True, slots=True)
class HandOffRequested:
    """Our sole replica of a network job must leave: ask its owner to move it live."""

    ref: OfferRef
    reason: str
    used_ms: int


@dataclass(frozen=True, slots=True)
class ReplicaHandedOff:
    """Our replica's guest migrated to the host the owner chose: nothing more to report."""

    ref: OfferRef


@dataclass(frozen=True, slots=True)
class PolicyChanged:
    policy: HostPolicy


BidderEvent = (
    OfferReceived
    | AwardReceived
    | CancelReceived
    | CommitReceived
    | ReplicaFinished
    | ReplicaFailed
    | HandOffRequested
    | ReplicaHandedOff
    | PolicyChanged
)


# -- effects ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StartReplica:
    """Fetch the offer's checkpoint, restore (or boot) and run its extent; claim the route."""

    offer: Offer
    award: Winner
    award_blob: bytes = b""  # the owner's signed award (a live move shows it to the source)


@dataclass(frozen=True, slots=True)
class StopReplica:
    """Stop the replica of ``ref`` (if running) and drop its new checkpoint."""

    ref: OfferRef
    reason: str


@dataclass(frozen=True, slots=True)
class RetainCheckpoint:
    """The owner committed a segment: keep its checkpoint if ``holder``; older ones may go."""

    commit: SegmentCommit
    holder: bool


BidderEffect = SendStatement | StartReplica | StopReplica | RetainCheckpoint


# -- the core --------------------------------------------------------------------------


class Phase(enum.Enum):
    BID = "bid"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True)
class _Hold:
    offer: Offer
    bid: Bid
    phase: Phase
    expires: float
    completion: bytes = b""
    resend_at: float = math.inf
    backoff: float = 0.0


@dataclass(frozen=True, slots=True)
class Reservation:
    """A view of one reservation, for ``gleaner status``."""

    ref: OfferRef
    phase: Phase
    vcpus: int
    memory_mib: int
    disk_mib: int


def disk_need_mib(offer: Offer) -> int:
    """Disk for the incoming checkpoint plus the save image the run writes.

    A job owner's own program also needs its image and inputs (at most the
    bundle) and its scratch and output disks (sparse, but they may fill up).
    """
    need = math.ceil(offer.checkpoint_size / MIB) + offer.requirements.memory_mib
    work = offer.work
    if work is not None:
        need += math.ceil(work.bundle_bytes / MIB) + work.disk_mib + work.output_mib
    return need


def estimate_finish_s(offer: Offer, policy: HostPolicy, held_bytes: int) -> int:
    """Seconds from award to completion on this host (see the module docstring).

    `held_bytes` counts what this host holds of ``offer.fetch_bytes``.
    """
    speed = policy.cpu_share * (policy.bench_score or BENCH_REFERENCE) / BENCH_REFERENCE
    missing = max(0, offer.fetch_bytes - held_bytes)
    run = offer.extent_s / (offer.requirements.vcpus * speed)
    return math.ceil(missing / policy.bandwidth_bytes_s + policy.setup_s + run)


class Bidder:
    """One host's market core. See the module docstring."""

    def __init__(
        self, identity: Identity, policy: HostPolicy, config: BidderConfig | None = None
    ) -> None:
        self._identity = identity
        self._id = identity.node_id
        self.policy = policy
        self.config = config or BidderConfig()
        self._holds: dict[bytes, _Hold] = {}
        self._owners: dict[bytes, NodeId] = {}  # job id -> owner, from offers we bid on
        self._stats: Counter[str] = Counter()
        self._out: list[BidderEffect] = []

    @property
    def node_id(self) -> NodeId:
        return self._id

    def handle(self, event: BidderEvent, now: float) -> list[BidderEffect]:
        try:
            if isinstance(event, OfferReceived):
                self._on_offer(decode_offer(event.blob), event.held_bytes, now)
            elif isinstance(event, AwardReceived):
                self._on_award(event.blob)
            elif isinstance(event, CancelReceived):
                self._on_cancel(event.blob)
            elif isinstance(event, CommitReceived):
                self._on_commit(event.blob)
            elif isinstance(event, ReplicaFinished):
                self._on_finished(event, now)
            elif isinstance(event, ReplicaFailed):
                self._on_failed(event)
            elif isinstance(event, HandOffRequested):
                self._on_hand_off(event)
            elif isinstance(event, ReplicaHandedOff):
                if self._holds.pop(event.ref.digest, None) is not None:
                    self._stats["replicas_handed_off"] += 1
            elif isinstance(event, PolicyChanged):
                self.policy = event.policy
        except RemoteProtocolError as exc:
            self._stats[f"refused_{refusal_of(exc).value}"] += 1
        return self._drain()

    def tick(self, now: float) -> list[BidderEffect]:
        for digest, hold in list(self._holds.items()):
            if hold.expires <= now:
                del self._holds[digest]
                if hold.phase is Phase.FINISHED:
                    self._stats["completions_abandoned"] += 1
                    self._out.append(StopReplica(hold.offer.ref, "owner silent"))
                else:
                    self._stats["bids_expired"] += 1
            elif hold.resend_at <= now:
                self._stats["completions_resent"] += 1
                self._out.append(
                    SendStatement(hold.offer.owner, MarketKind.COMPLETION, hold.completion)
                )
                hold.backoff = min(2 * hold.backoff, self.config.max_resend_s)
                hold.resend_at = now + hold.backoff
        return self._drain()

    def next_wakeup(self) -> float:
        return min((min(h.expires, h.resend_at) for h in self._holds.values()), default=math.inf)

    def commitments(self) -> list[Reservation]:
        return [Reservation(h.offer.ref, h.phase, *self._reserved(h)) for h in self._holds.values()]

    def free(self) -> Capacity:
        """What the caps leave after every reservation."""
        used = [self._reserved(h) for h in self._holds.values()]
        policy = self.policy
        slots = sum(1 for h in self._holds.values() if h.phase is not Phase.FINISHED)
        return Capacity(
            vcpus=policy.vcpus - sum(u[0] for u in used),
            memory_mib=policy.memory_mib - sum(u[1] for u in used),
            disk_mib=policy.disk_mib - sum(u[2] for u in used),
            slots=policy.replicas - slots,
        )

    def statistics(self) -> dict[str, int]:
        return {**self._stats, "commitments": len(self._holds)}

    # -- transitions -------------------------------------------------------------------

    def _on_offer(self, offer: Offer, held_bytes: int, now: float) -> None:
        self._stats["offers"] += 1
        if offer.ref.digest in self._holds:
            self._stats["offers_duplicate"] += 1
            return
        why = self._decline(offer, now)
        if why is not None:
            self._stats[f"declined_{why}"] += 1
            return
        policy, free = self.policy, self.free()
        busy = 1 - free.slots / policy.replicas
        price = min(offer.ceiling, math.ceil(policy.price_floor * (1 + busy)))
        bid = sign_bid(
            self._identity,
            offer.ref,
            price=price,
            finish_s=estimate_finish_s(offer, policy, held_bytes),
            held_bytes=min(held_bytes, offer.fetch_bytes),
            capacity=Capacity(free.vcpus, free.memory_mib, free.disk_mib, free.slots),
        )
        expires = offer.bid_deadline + self.config.award_grace_s
        self._holds[offer.ref.digest] = _Hold(offer, bid, Phase.BID, expires)
        self._remember_owner(offer)
        self._stats["bids"] += 1
        self._out.append(SendStatement(offer.owner, MarketKind.BID, bid.blob))

    def _decline(self, offer: Offer, now: float) -> str | None:
        policy, need, free = self.policy, offer.requirements, self.free()
        if now > offer.bid_deadline:
            return "late"
        if offer.bid_deadline > now + self.config.max_bid_wait_s:
            return "deadline_far"
        if policy.draining:
            return "draining"
        if offer.source == self._id:
            return "own_guest"  # a live move of a guest running here
        if need.arch != policy.arch:
            return "arch"
        if need.kvm and not policy.kvm:
            return "kvm"
        if policy.price_floor > offer.ceiling:
            return "price"
        if free.slots < 1 or need.vcpus > free.vcpus or need.memory_mib > free.memory_mib:
            return "capacity"
        if disk_need_mib(offer) > free.disk_mib:
            return "disk"
        return None

    def _on_award(self, blob: bytes) -> None:
        award = decode_award(blob)
        hold = self._hold_for(award.ref, award.owner)
        if hold.phase is not Phase.BID:
            self._stats["awards_duplicate"] += 1
            return
        mine = award.winner(self._id)
        if mine is None:
            del self._holds[award.ref.digest]
            self._stats["auctions_lost"] += 1
            return
        if mine.price != hold.bid.price:
            raise MarketRefused(
                MarketRefusal.MISMATCH, f"award pays {mine.price}, bid {hold.bid.price}"
            )
        if hold.offer.requirements.network != (mine.grant is not None):
            raise MarketRefused(MarketRefusal.MISMATCH, "award's route grant does not fit the job")
        hold.phase, hold.expires = Phase.RUNNING, math.inf
        self._stats["awards_won"] += 1
        self._out.append(StartReplica(hold.offer, mine, award.blob))

    def _on_cancel(self, blob: bytes) -> None:
        cancel = decode_cancel(blob)
        hold = self._hold_for(cancel.ref, cancel.owner)
        if self._id not in cancel.nodes:
            self._stats["cancels_not_ours"] += 1
            return
        del self._holds[cancel.ref.digest]
        self._stats["cancels"] += 1
        if hold.phase is not Phase.BID:
            self._out.append(StopReplica(cancel.ref, cancel.reason.name.lower()))

    def _on_commit(self, blob: bytes) -> None:
        commit = decode_commit(blob)
        if self._owners.get(commit.ref.job_id) is None:
            raise MarketRefused(MarketRefusal.UNKNOWN_OFFER, "commit for a job we never bid on")
        if commit.owner != self._owners[commit.ref.job_id]:
            raise MarketRefused(MarketRefusal.WRONG_AUTHOR, "commit not signed by the job's owner")
        holder = self._id in commit.holders
        hold = self._holds.get(commit.ref.digest)
        if hold is not None:
            if hold.offer.ref != commit.ref:
                raise MarketRefused(
                    MarketRefusal.MISMATCH, "commit names the offer with other fields"
                )
            del self._holds[commit.ref.digest]
            if hold.phase is not Phase.BID and not holder:
                self._out.append(StopReplica(commit.ref, "committed elsewhere"))
        self._stats["commits"] += 1
        self._out.append(RetainCheckpoint(commit, holder))

    def _on_failed(self, event: ReplicaFailed) -> None:
        """Our replica failed or was given up: tell the owner at once, so it need not wait."""
        hold = self._holds.pop(event.ref.digest, None)
        if hold is None:
            return
        self._stats["replicas_failed"] += 1
        if hold.phase is Phase.RUNNING:
            withdraw = sign_withdraw(self._identity, hold.offer.ref, event.reason)
            self._out.append(SendStatement(hold.offer.owner, MarketKind.WITHDRAW, withdraw.blob))

    def _on_hand_off(self, event: HandOffRequested) -> None:
        """Ask the owner to move our running replica live; we keep it until it moves."""
        hold = self._holds.get(event.ref.digest)
        if hold is None or hold.phase is not Phase.RUNNING:
            return
        self._stats["hand_offs_requested"] += 1
        withdraw = sign_withdraw(
            self._identity, hold.offer.ref, event.reason, live=True, used_ms=event.used_ms
        )
        self._out.append(SendStatement(hold.offer.owner, MarketKind.WITHDRAW, withdraw.blob))

    def _on_finished(self, event: ReplicaFinished, now: float) -> None:
        hold = self._holds.get(event.ref.digest)
        if hold is None or hold.phase is not Phase.RUNNING:
            self._stats["finished_ignored"] += 1  # cancelled meanwhile
            return
        completion = sign_completion(
            self._identity,
            hold.offer.ref,
            manifest=event.manifest,
            size=event.size,
            progress=event.progress,
            cpu_ms=event.cpu_ms,
            halted=event.halted,
        )
        hold.phase, hold.completion = Phase.FINISHED, completion.blob
        hold.expires = now + self.config.hold_s
        hold.backoff = self.config.resend_s
        hold.resend_at = now + hold.backoff
        self._stats["completions_sent"] += 1
        self._out.append(SendStatement(hold.offer.owner, MarketKind.COMPLETION, completion.blob))

    # -- helpers -----------------------------------------------------------------------

    def _hold_for(self, ref: OfferRef, author: NodeId) -> _Hold:
        hold = self._holds.get(ref.digest)
        if hold is None:
            raise MarketRefused(
                MarketRefusal.UNKNOWN_OFFER, "names no offer we hold a bid or run for"
            )
        if author != hold.offer.owner:
            raise MarketRefused(MarketRefusal.WRONG_AUTHOR, "not signed by the offer's owner")
        if ref != hold.offer.ref:
            raise MarketRefused(MarketRefusal.MISMATCH, "names the offer with other fields")
        return hold

    def _reserved(self, hold: _Hold) -> tuple[int, int, int]:
        disk = disk_need_mib(hold.offer)
        if hold.phase is Phase.FINISHED:
            return 0, 0, disk
        return hold.offer.requirements.vcpus, hold.offer.requirements.memory_mib, disk

    def _remember_owner(self, offer: Offer) -> None:
        self._owners.pop(offer.ref.job_id, None)
        self._owners[offer.ref.job_id] = offer.owner
        if len(self._owners) > MAX_KNOWN_JOBS:
            del self._owners[next(iter(self._owners))]

    def _drain(self) -> list[BidderEffect]:
        out, self._out = self._out, []
        return out
