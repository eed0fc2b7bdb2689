"""Jobs: the spec, and the interface of the owner's segment machine (its table included).

Theory of operation
-------------------
A job is a VM (image, memory, vCPUs, arch, KVM and network wishes) with a
segment plan and a budget:

- ``extent_s``: one segment's length in guest vCPU-seconds (libvirt's domain
  CPU time), so a less loaded host finishes it sooner;
- ``segments``: how many segments to run, or None to run until the guest
  powers off (a completion reports ``halted``);
- ``k``: replicas per segment (the job's redundancy); ``ceiling``: the most the
  owner pays for one segment, in token units (one payment, so at most
  ``node.ledger.tokens.MAX_UNITS``); ``deadline``: Unix seconds after which the job
  stops wherever it is;
- ``owner`` and ``nonce``: ``job_id = derive_job_id(owner, nonce)`` binds the
  job, and the VM's overlay address, to the owner's key (overlay/claims.py).

A spec is checked when made: a job that cannot run raises ``JobSpecError``
naming the field and the rule it breaks. ``from_mapping`` reads one from a TOML
table (``gleaner submit``), refusing unknown keys like the config does.

``JobSnapshot`` is what the owner persists of a run (the segment machine,
node/market/segment_machine.py, emits it in ``PersistJob`` before any message that
depends on it): the next segment, the last committed checkpoint and its
holders, the attempt and route-epoch counters (persisted with every award, so
an epoch is never granted twice; an offer that drew no award may reuse its
attempt number after a crash, harmlessly: its digest differs), and the last
winner and price (so a payment lost in a crash is asked for again; the ledger
refuses a second payment for a segment, so asking twice is safe).

The owner's segment machine (node/market/segment_machine.py) has its states, events,
effects and its one transition table here, so the agent, ``gleaner watch``
and the docs need not import the machine. ``TRANSITIONS``, drawn::

    WAITING   --offer-->    OFFERED     OwnerResumed: the first event, and after a restart
    OFFERED   --offer-->    OFFERED     no eligible bid by the deadline: again after a backoff
    OFFERED   --award-->    AWARDED     the best k bids (market/auction.py) at the bid deadline,
                                        or once every host the offer reached has bid
    AWARDED   --start-->    RUNNING     ReplicaStarted (only what the owner has seen)
    AWARDED,  --complete--> COMPLETED   the first completion from an awarded replica:
      RUNNING                           VerifyCompletion; later ones queue behind it
    COMPLETED --reject-->   RUNNING     it failed verification, nothing queued, replicas run on
    AWARDED,  --offer-->    OFFERED     every replica lost (ReplicaLost, run deadline) and no
      RUNNING,                          completion left: a new attempt from the last commit
      COMPLETED                         (nothing lost but this segment's work)
    COMPLETED --commit-->   COMMITTED   verified, and its checkpoint held by >= min_holders
    COMMITTED --offer-->    OFFERED     the next segment
    COMMITTED --finish-->   DONE        the last segment, or the guest powered off
    any       --expire-->   DONE        the job's deadline passed

This module is pure: no I/O, no clock.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from node.base.identity import NodeId
from node.ledger.tokens import MAX_UNITS
from node.market.message_fields import MAX_HOLDERS, MAX_K
from node.market.messages import BroadcastOffer, SendStatement
from node.market.offer_messages import (
    MAX_ARCH_CHARS,
    MAX_ARGS_CHARS,
    MAX_EXTENT_S,
    MAX_IMAGE_CHARS,
    MAX_MEMORY_MIB,
    MAX_VCPUS,
    MAX_WORK_BYTES,
    MAX_WORK_DISK_MIB,
    MIN_MEMORY_MIB,
    MIN_WORK_DISK_MIB,
    Requirements,
    Work,
)
from overlay.claims import MAX_NONCE_BYTES, MIN_NONCE_BYTES, derive_job_id

MANIFEST_BYTES = 32
VERIFY_MODES = ("restore", "rerun")


class JobSpecError(ValueError):
    """A job spec that cannot run; the message names the field and the rule."""


@dataclass(frozen=True, slots=True)
class JobSpec:
    owner: NodeId
    nonce: bytes
    image: str
    memory_mib: int
    vcpus: int
    extent_s: int
    segments: int | None  # None: until the guest powers off
    k: int
    ceiling: int
    deadline: int
    network: bool = False
    arch: str = "x86_64"
    kvm: bool = False
    args: str = ""  # kernel command-line additions (the workload's parameters)
    work: Work | None = None  # the owner's own program (image, command, inputs, disks)
    verify: str = "restore"  # or "rerun": the owner re-runs the last segment (docs/jobs.md)

    def __post_init__(self) -> None:
        _check(isinstance(self.owner, NodeId), "owner", "must be a node id")
        nonce_ok = isinstance(self.nonce, bytes)
        nonce_ok = nonce_ok and MIN_NONCE_BYTES <= len(self.nonce) <= MAX_NONCE_BYTES
        _check(nonce_ok, "nonce", f"must be {MIN_NONCE_BYTES}..{MAX_NONCE_BYTES} bytes")
        image_ok = isinstance(self.image, str) and 0 < len(self.image) <= MAX_IMAGE_CHARS
        _check(image_ok, "image", f"must name an image (1..{MAX_IMAGE_CHARS} characters)")
        arch_ok = isinstance(self.arch, str) and 0 < len(self.arch) <= MAX_ARCH_CHARS
        _check(arch_ok, "arch", "must name an architecture")
        _integer(
            self.memory_mib,
            "memory_mib",
            MIN_MEMORY_MIB,
            MAX_MEMORY_MIB,
            "a guest kernel needs at least that",
        )
        _integer(self.vcpus, "vcpus", 1, MAX_VCPUS)
        _integer(self.extent_s, "extent_s", 1, MAX_EXTENT_S, "a segment must run for some time")
        if self.segments is not None:
            _integer(self.segments, "segments", 1, 2**32, "or None to run until power-off")
        _integer(self.k, "k", 1, MAX_K, "k replicas run each segment")
        _integer(self.ceiling, "ceiling", 1, MAX_UNITS, "units paid for one segment")
        _integer(self.deadline, "deadline", 1, 2**63, "Unix seconds")
        args_ok = isinstance(self.args, str) and len(self.args) <= MAX_ARGS_CHARS
        _check(args_ok, "args", f"must be a string of at most {MAX_ARGS_CHARS} characters")
        for name in ("network", "kvm"):
            _check(isinstance(getattr(self, name), bool), name, "must be true or false")
        if self.work is not None:
            _check_work(self.work)
        _check(self.verify in VERIFY_MODES, "verify", f"must be one of {', '.join(VERIFY_MODES)}")
        _check(
            self.verify != "rerun" or self.work is not None,
            "verify",
            '"rerun" compares a program\'s outputs: the job must run its own program',
        )
        _check(
            not self.network or self.k == 1,
            "k",
            "must be 1 for a network job: its address is at one host at a time",
        )

    @property
    def job_id(self) -> bytes:
        return derive_job_id(self.owner.key, self.nonce)

    @property
    def requirements(self) -> Requirements:
        return Requirements(self.memory_mib, self.vcpus, self.arch, self.kvm, self.network)

    @property
    def budget(self) -> int | None:
        """The most the whole job can cost (None: open-ended)."""
        return None if self.segments is None else self.segments * self.ceiling

    def check_submittable(self, now: float) -> None:
        """Refuse a job whose deadline leaves no time for even one segment."""
        if self.deadline <= now + self.extent_s / self.vcpus:
            raise JobSpecError(
                f"deadline: {self.deadline} leaves less than one segment's "
                f"{self.extent_s / self.vcpus:.0f} s from now"
            )

    @classmethod
    def from_mapping(
        cls, owner: NodeId, nonce: bytes, data: Mapping[str, Any], work: Work | None = None
    ) -> JobSpec:
        """A spec from a TOML table; ``segments = "until-poweroff"`` runs open-ended.

        `work` is the job owner's own program, made from the table's other keys
        (node/market/run_requests.py) by the owner's node."""
        unknown = set(data) - set(_TOML_KEYS)
        if unknown:
            raise JobSpecError(f"unknown job key(s): {', '.join(sorted(unknown))}")
        missing = [k for k in _REQUIRED if k not in data]
        if missing:
            raise JobSpecError(f"job lacks key(s): {', '.join(missing)}")
        segments = data.get("segments", "until-poweroff")
        if segments == "until-poweroff":
            segments = None
        fields = {_TOML_KEYS[key]: value for key, value in data.items() if key != "segments"}
        try:
            return cls(owner=owner, nonce=nonce, segments=segments, work=work, **fields)
        except TypeError as exc:
            raise JobSpecError(str(exc)) from None


def _check_work(work: Work) -> None:
    _check(isinstance(work, Work), "work", "must describe the job's own program")
    bundle_ok = isinstance(work.bundle, bytes) and len(work.bundle) == MANIFEST_BYTES
    _check(bundle_ok, "work", f"its bundle is a {MANIFEST_BYTES}-byte manifest digest")
    _integer(work.bundle_bytes, "bundle_bytes", 0, MAX_WORK_BYTES, "the image and inputs")
    for name in ("disk_mib", "output_mib"):
        _integer(getattr(work, name), name, MIN_WORK_DISK_MIB, MAX_WORK_DISK_MIB)


_TOML_KEYS = {
    "image": "image",
    "memory_mib": "memory_mib",
    "vcpus": "vcpus",
    "extent_s": "extent_s",
    "segments": "segments",
    "redundancy": "k",
    "price_ceiling": "ceiling",
    "deadline": "deadline",
    "network": "network",
    "arch": "arch",
    "kvm": "kvm",
    "args": "args",
    "verify": "verify",
}
_REQUIRED = ("image", "memory_mib", "vcpus", "extent_s", "redundancy", "price_ceiling", "deadline")


@dataclass(frozen=True, slots=True)
class JobSnapshot:
    """What the owner persists of a job's run (see the module docstring)."""

    segment: int = 0  # the next segment to run
    manifest: bytes | None = None  # the last committed checkpoint; None: boot the image
    size: int = 0
    holders: tuple[NodeId, ...] = ()
    next_attempt: int = 1
    next_epoch: int = 1
    done: bool = False
    last_winner: NodeId | None = None  # the winner of segment - 1, and its price
    last_price: int = 0

    def __post_init__(self) -> None:
        if self.manifest is not None and len(self.manifest) != MANIFEST_BYTES:
            raise ValueError(f"a checkpoint manifest digest is {MANIFEST_BYTES} bytes")
        if (self.manifest is None) != (self.segment == 0) or len(self.holders) > MAX_HOLDERS:
            raise ValueError("a snapshot past segment 0 needs a checkpoint (and few holders)")
        if min(self.segment, self.size, self.next_attempt - 1, self.next_epoch - 1) < 0:
            raise ValueError("snapshot counters must not be negative")


# -- the owner's segment machine: states, events and effects (node/market/segment_machine.py) --


class SegmentState(enum.Enum):
    WAITING = "waiting"
    OFFERED = "offered"
    AWARDED = "awarded"
    RUNNING = "running"
    COMPLETED = "completed"
    COMMITTED = "committed"
    DONE = "done"


# -- events ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OwnerResumed:
    """The owner's agent runs this job (again): the first event, and after any absence."""


@dataclass(frozen=True, slots=True)
class BidReceived:
    blob: bytes


@dataclass(frozen=True, slots=True)
class OfferDelivered:
    """The offer of ``attempt`` went to ``recipients`` hosts: close once all have bid.

    ``hosts`` names them (None: not known, any host may bid): bids from others are
    refused, and any taken before this event are dropped.
    """

    attempt: int
    recipients: int
    hosts: frozenset[NodeId] | None = None


@dataclass(frozen=True, slots=True)
class ReplicaStarted:
    node: NodeId


@dataclass(frozen=True, slots=True)
class ReplicaLost:
    """``node`` is gone (membership says dead) or reported its replica failed."""

    node: NodeId


@dataclass(frozen=True, slots=True)
class CompletionReceived:
    blob: bytes


@dataclass(frozen=True, slots=True)
class WithdrawReceived:
    """A host gave up its replica (signed WITHDRAW): it is lost, at once."""

    blob: bytes


@dataclass(frozen=True, slots=True)
class CompletionVerified:
    """The answer to ``VerifyCompletion``: the checkpoint restored and shows progress."""

    node: NodeId
    manifest: bytes
    ok: bool


@dataclass(frozen=True, slots=True)
class CheckpointReplicated:
    """``node`` holds every block of checkpoint ``manifest``."""

    node: NodeId
    manifest: bytes


OwnerEvent = (
    OwnerResumed
    | BidReceived
    | OfferDelivered
    | ReplicaStarted
    | ReplicaLost
    | CompletionReceived
    | WithdrawReceived
    | CompletionVerified
    | CheckpointReplicated
)


# -- effects ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VerifyCompletion:
    """Fetch ``manifest`` from ``node``, restore it, check the guest moved on from ``base``
    (and, if the completion says ``halted``, that the guest powered off)."""

    job_id: bytes
    segment: int
    node: NodeId
    manifest: bytes
    progress: bytes
    base: bytes | None
    halted: bool


@dataclass(frozen=True, slots=True)
class ReplicateCheckpoint:
    """Have another node fetch ``manifest`` from ``sources``; report CheckpointReplicated.

    ``targets`` are the machine's preference, best first: the segment's other
    replicas (they hold most blocks already), then the owner. When none is
    left, or none answers before the machine asks again, pick any member
    with room. Asked again every ``replicate_retry_s`` until committed.
    """

    job_id: bytes
    segment: int
    manifest: bytes
    sources: tuple[NodeId, ...]
    targets: tuple[NodeId, ...]


@dataclass(frozen=True, slots=True)
class PayWinner:
    job_id: bytes
    segment: int
    node: NodeId
    units: int


@dataclass(frozen=True, slots=True)
class PersistJob:
    job_id: bytes
    snapshot: JobSnapshot


@dataclass(frozen=True, slots=True)
class ReportSegment:
    job_id: bytes
    segment: int
    attempt: int
    state: SegmentState


@dataclass(frozen=True, slots=True)
class FinishJob:
    job_id: bytes
    outcome: str  # "completed", "halted" (the guest powered off) or "expired"
    manifest: bytes | None  # the last committed checkpoint


OwnerEffect = (
    BroadcastOffer
    | SendStatement
    | VerifyCompletion
    | ReplicateCheckpoint
    | PayWinner
    | PersistJob
    | ReportSegment
    | FinishJob
)


class JobStep(enum.Enum):
    OFFER = "offer"
    AWARD = "award"
    START = "start"
    COMPLETE = "complete"
    REJECT = "reject"
    COMMIT = "commit"
    FINISH = "finish"
    EXPIRE = "expire"


_S = SegmentState
TRANSITIONS: dict[tuple[SegmentState, JobStep], SegmentState] = {
    (_S.WAITING, JobStep.OFFER): _S.OFFERED,
    (_S.OFFERED, JobStep.OFFER): _S.OFFERED,
    (_S.OFFERED, JobStep.AWARD): _S.AWARDED,
    (_S.AWARDED, JobStep.START): _S.RUNNING,
    (_S.AWARDED, JobStep.COMPLETE): _S.COMPLETED,
    (_S.RUNNING, JobStep.COMPLETE): _S.COMPLETED,
    (_S.COMPLETED, JobStep.REJECT): _S.RUNNING,
    (_S.AWARDED, JobStep.OFFER): _S.OFFERED,
    (_S.RUNNING, JobStep.OFFER): _S.OFFERED,
    (_S.COMPLETED, JobStep.OFFER): _S.OFFERED,
    (_S.COMPLETED, JobStep.COMMIT): _S.COMMITTED,
    (_S.COMMITTED, JobStep.OFFER): _S.OFFERED,
    (_S.COMMITTED, JobStep.FINISH): _S.DONE,
    **{(state, JobStep.EXPIRE): _S.DONE for state in _S if state is not _S.DONE},
}
IN_FLIGHT = (_S.AWARDED, _S.RUNNING, _S.COMPLETED)


def _check(ok: bool, name: str, rule: str) -> None:
    if not ok:
        raise JobSpecError(f"{name}: {rule}")


def _integer(value: Any, name: str, low: int, high: int, why: str = "") -> None:
    if type(value) is not int or not low <= value <= high:
        reason = f" ({why})" if why else ""
        raise JobSpecError(f"{name}: must be an integer in {low}..{high}, got {value!r}{reason}")
