"""The market's signed messages: offer, bid, award, completion, commit and cancel.

Theory of operation
-------------------
Each segment of a job is sold in one small exchange (node/market/jobs.py runs the
owner's side, node/market/bidder.py the host's, node/market/auction.py scores the bids)::

    owner --OFFER--> hosts        "segment i of job J, attempt a: these terms"
    host  --BID----> owner        "I'll run it for p units, done in t s, I hold b bytes"
    owner --AWARD--> bidders      "these k run it, at these prices (and route epochs)"
    host  --COMPLETION--> owner   "done: new checkpoint M, guest progress P"
    owner --CANCEL--> the others  "you lost the race (or the attempt is abandoned)"
    owner --COMMIT--> holders     "segment i is committed as M, held by these nodes"
    host  --WITHDRAW--> owner     "I give up my replica" (it failed, or the volunteer is back)

A network job's sole replica can be handed on *live* (a drain): its host sends
WITHDRAW with ``live``; the owner offers the rest of the extent with ``source``
naming that host, and the winner pulls the running guest from it (HANDOFF and
HANDED_OFF, node/market/handoff.py) instead of restoring a checkpoint.

Every message is a signed statement in the envelope of ``node.base.signed``: msgpack
``[payload, signature]``, Ed25519 by its author over CONTEXT + payload, each kind
under its own context so a signature for one kind never verifies as another.
Every message after the offer names the offer by its *ref*: job id, segment,
attempt and the offer's digest (BLAKE2b-256 of the offer's payload). A re-offer
of a segment is a new attempt, so nothing said about an abandoned attempt can be
mistaken for the current one. Wire forms (``ref`` = the four fields ``job: bin32,
segment: uint, attempt: uint, offer: bin32``)::

    offer:      by owner, "gleaner/offer/v1\\0", {owner: bin32, nonce: bin 8..64,
                job: bin32 (= derive_job_id(owner, nonce)), segment, attempt, image: str,
                memory: MiB, vcpus, arch: str, kvm: bool (wanted), network: bool,
                extent: guest vCPU-seconds, checkpoint: bin32 | nil (nil: boot the image),
                size: checkpoint bytes, holders: [bin32] (who serves the checkpoint),
                k: 1..MAX_K, ceiling: 1..MAX_UNITS (units per segment), deadline: bid deadline,
                args: str (the job's kernel command-line additions, may be empty),
                source: bin32 | nil (optional: the host the running guest migrates from)}
    bid:        by host, "gleaner/bid/v1\\0", {host, ref, price: 1..MAX_UNITS,
                finish: estimated seconds, held: checkpoint bytes already held,
                vcpus, memory, disk (MiB), slots: the host's free capacity before this run}
    award:      by owner, "gleaner/award/v1\\0", {owner, ref,
                winners: [[node: bin32, price: uint, epoch: uint, grant: bin | nil]] 1..MAX_K}
    completion: by host, "gleaner/completion/v1\\0", {host, ref, manifest: bin32,
                size: bytes, progress: bin32, cpu_ms: uint, halted: bool (guest powered off)}
    commit:     by owner, "gleaner/segment-commit/v1\\0", {owner, ref, winner: bin32,
                manifest: bin32, size: bytes, holders: [bin32] 1..MAX_HOLDERS (who hold
                the checkpoint now: the winner, unless it left after verification)}
    cancel:     by owner, "gleaner/cancel/v1\\0", {owner, ref, nodes: [bin32] 1..MAX_K,
                reason: 1 LOST_RACE | 2 ABANDONED | 3 JOB_ENDED}
    withdraw:   by host, "gleaner/withdraw/v1\\0", {host, ref, reason: str (<= 200 characters),
                live: bool (optional: hand the running guest on), used_ms: uint (optional:
                the guest's vCPU time in this segment so far)}

All integers are uint64 unless a range is given; times are Unix seconds.

The award authorises route claims: for a network job each winner's entry
carries the owner's route grant (``overlay.claims``) for the job's VM address
at that winner's epoch, which the winner claims with ``sign_claim``; the decoder
checks that every grant is the award owner's, for this job, node and epoch.

Errors. Decoding is where outside bytes come in: only ``RemoteProtocolError``
escapes it, as ``MarketRefused`` with a ``MarketRefusal`` for a forgery (bad signature,
a job id not the owner's, a grant not matching) and plain for malformed input.
Whether a well-formed message fits (is this the current offer? was this host
awarded?) is the cores' judgement; they refuse with the same class and count
every refusal. Signing decodes what it just signed, so inputs peers would
refuse raise ``LocalProtocolError``.

This module is pure: no I/O, no clock.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from node.base.identity import Identity, NodeId
from node.base.signed import (
    bin_field,
    decode_own,
    key_field,
    open_statement,
    sign_payload,
    signed_by,
    text_field,
    uint_field,
)
from node.base.wire import RemoteProtocolError
from node.ledger.tokens import MAX_UNITS
from overlay.claims import (
    MAX_NONCE_BYTES,
    MIN_NONCE_BYTES,
    Grant,
    decode_grant,
    derive_job_id,
)

OFFER_CONTEXT = b"gleaner/offer/v1\x00"
BID_CONTEXT = b"gleaner/bid/v1\x00"
AWARD_CONTEXT = b"gleaner/award/v1\x00"
COMPLETION_CONTEXT = b"gleaner/completion/v1\x00"
COMMIT_CONTEXT = b"gleaner/segment-commit/v1\x00"  # "gleaner/commit/v1" is a token commitment
CANCEL_CONTEXT = b"gleaner/cancel/v1\x00"
WITHDRAW_CONTEXT = b"gleaner/withdraw/v1\x00"
OFFER_DIGEST_PERSON = b"gleaner-offer"
DIGEST_BYTES = 32  # job ids, offer digests, manifest digests, progress digests
MAX_K = 8
MAX_HOLDERS = 16
MAX_ARCH_CHARS = 32
MAX_IMAGE_CHARS = 128
MAX_ARGS_CHARS = 512  # the job's kernel command-line additions
MIN_MEMORY_MIB = 72  # below this no guest kernel boots
MAX_MEMORY_MIB = 1 << 20
MAX_VCPUS = 256
MAX_OFFER_BYTES = 2048 + MAX_ARGS_CHARS
MAX_BID_BYTES = 1024
MAX_AWARD_BYTES = 2048 + MAX_K * 1024
MAX_COMPLETION_BYTES = 1024
MAX_COMMIT_BYTES = 2048
MAX_CANCEL_BYTES = 1024
MAX_WITHDRAW_BYTES = 1024
MAX_REASON_CHARS = 200


class MarketKind(enum.IntEnum):
    OFFER = 1
    BID = 2
    AWARD = 3
    COMPLETION = 4
    COMMIT = 5
    CANCEL = 6
    WITHDRAW = 7
    HANDOFF = (
        8  # winner -> source of a live offer: "migrate the guest to me" (node/market/handoff.py)
    )
    HANDED_OFF = 9  # source -> winner: "it is yours; here is its console so far"


class MarketRefusal(enum.Enum):
    """Why a market message was refused, counted as ``refused_<value>`` by the cores."""

    MALFORMED = "malformed"
    BAD_SIGNATURE = "bad_signature"  # not signed by the key it names as author
    JOB_MISMATCH = "job_mismatch"  # job id is not derive_job_id(owner, nonce)
    BAD_GRANT = "bad_grant"  # an award's grant is not for this owner, job, node and epoch
    UNKNOWN_OFFER = "unknown_offer"  # names no offer this core knows (another job, never bid)
    STALE = "stale"  # names an earlier segment or an abandoned attempt
    WRONG_AUTHOR = "wrong_author"  # award, cancel or commit not by the offer's owner
    LATE = "late"  # a bid after the bid deadline
    OVER_CEILING = "over_ceiling"  # a bid above the offer's price ceiling
    UNFIT = "unfit"  # a bid whose own capacity snapshot cannot hold the offer
    NOT_AWARDED = "not_awarded"  # a completion from a host that was not awarded
    EQUIVOCATION = "equivocation"  # a second, different bid or completion from one host
    MISMATCH = "mismatch"  # an award naming another price, or a grant the job needs lacks


class MarketRefused(RemoteProtocolError):
    """A peer's market message is refused, for ``reason``."""

    def __init__(self, reason: MarketRefusal, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def refusal_of(exc: RemoteProtocolError) -> MarketRefusal:
    """The reason to count for ``exc``: its own, or MALFORMED."""
    return exc.reason if isinstance(exc, MarketRefused) else MarketRefusal.MALFORMED


class CancelReason(enum.IntEnum):
    LOST_RACE = 1  # another replica's completion was accepted
    ABANDONED = 2  # the attempt is given up; the segment is offered again
    JOB_ENDED = 3  # the job passed its deadline or was stopped


@dataclass(frozen=True, slots=True)
class OfferRef:
    """Names one offer: every message after the offer carries it."""

    job_id: bytes
    segment: int
    attempt: int
    digest: bytes


@dataclass(frozen=True, slots=True)
class Requirements:
    memory_mib: int
    vcpus: int
    arch: str = "x86_64"
    kvm: bool = False  # wanted; a host without KVM may still bid (TCG) unless refused by policy
    network: bool = False


@dataclass(frozen=True, slots=True)
class Capacity:
    """A host's free capacity, as its bid reports it (before the bid's own run)."""

    vcpus: int
    memory_mib: int
    disk_mib: int
    slots: int


@dataclass(frozen=True, slots=True)
class Offer:
    owner: NodeId
    job_nonce: bytes
    ref: OfferRef
    image: str
    requirements: Requirements
    extent_s: int
    checkpoint: bytes | None
    checkpoint_size: int
    holders: tuple[NodeId, ...]
    k: int
    ceiling: int
    bid_deadline: int
    args: str = ""
    source: NodeId | None = None  # a live hand-off: the guest runs there and migrates
    blob: bytes = field(default=b"", compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class Bid:
    host: NodeId
    ref: OfferRef
    price: int
    finish_s: int
    held_bytes: int
    capacity: Capacity
    blob: bytes = field(default=b"", compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class Winner:
    """One awarded replica: its host, the price it is paid if first, its route epoch."""

    node: NodeId
    price: int
    epoch: int = 0
    grant: Grant | None = None


@dataclass(frozen=True, slots=True)
class Award:
    owner: NodeId
    ref: OfferRef
    winners: tuple[Winner, ...]
    blob: bytes = field(default=b"", compare=False, repr=False)

    def winner(self, node: NodeId) -> Winner | None:
        return next((w for w in self.winners if w.node == node), None)


@dataclass(frozen=True, slots=True)
class Completion:
    host: NodeId
    ref: OfferRef
    manifest: bytes
    size: int
    progress: bytes
    cpu_ms: int
    halted: bool
    blob: bytes = field(default=b"", compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class SegmentCommit:
    owner: NodeId
    ref: OfferRef
    winner: NodeId
    manifest: bytes
    size: int
    holders: tuple[NodeId, ...]
    blob: bytes = field(default=b"", compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class Cancel:
    owner: NodeId
    ref: OfferRef
    nodes: tuple[NodeId, ...]
    reason: CancelReason
    blob: bytes = field(default=b"", compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class Withdraw:
    """A host gives up its replica (it failed, or the volunteer needs the machine)."""

    host: NodeId
    ref: OfferRef
    reason: str
    live: bool = False  # hand the running guest on (a network job's sole replica)
    used_ms: int = 0  # vCPU time the guest used in this segment so far
    blob: bytes = field(default=b"", compare=False, repr=False)


Statement = Offer | Bid | Award | Completion | SegmentCommit | Cancel | Withdraw


# -- effects both market cores emit ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class SendStatement:
    """Effect: send the signed ``blob`` of ``kind`` to ``target``."""

    target: NodeId
    kind: MarketKind
    blob: bytes


@dataclass(frozen=True, slots=True)
class BroadcastOffer:
    """Effect: send ``offer`` to the members whose capabilities could meet it."""

    offer: Offer


# -- signing (our own statements; a failure here is LocalProtocolError) ----------------


def sign_offer(
    owner: Identity,
    *,
    job_nonce: bytes,
    segment: int,
    attempt: int,
    image: str,
    requirements: Requirements,
    extent_s: int,
    checkpoint: bytes | None,
    checkpoint_size: int,
    holders: tuple[NodeId, ...],
    k: int,
    ceiling: int,
    bid_deadline: int,
    args: str = "",
    source: NodeId | None = None,
) -> Offer:
    """As job owner, offer ``segment`` (attempt ``attempt``) of the job ``job_nonce`` names."""
    payload = {
        "owner": owner.node_id.key,
        "nonce": job_nonce,
        "job": derive_job_id(owner.node_id.key, job_nonce),
        "segment": segment,
        "attempt": attempt,
        "image": image,
        "memory": requirements.memory_mib,
        "vcpus": requirements.vcpus,
        "arch": requirements.arch,
        "kvm": requirements.kvm,
        "network": requirements.network,
        "extent": extent_s,
        "checkpoint": checkpoint,
        "size": checkpoint_size,
        "holders": [node.key for node in holders],
        "k": k,
        "ceiling": ceiling,
        "deadline": bid_deadline,
        "args": args,
    }
    if source is not None:
        payload["source"] = source.key
    return decode_own(decode_offer, sign_payload(owner, OFFER_CONTEXT, payload))


def sign_bid(
    host: Identity, ref: OfferRef, *, price: int, finish_s: int, held_bytes: int, capacity: Capacity
) -> Bid:
    payload = {
        "host": host.node_id.key,
        **ref_fields(ref),
        "price": price,
        "finish": finish_s,
        "held": held_bytes,
        "vcpus": capacity.vcpus,
        "memory": capacity.memory_mib,
        "disk": capacity.disk_mib,
        "slots": capacity.slots,
    }
    return decode_own(decode_bid, sign_payload(host, BID_CONTEXT, payload))


def sign_award(owner: Identity, ref: OfferRef, winners: tuple[Winner, ...]) -> Award:
    rows = [
        [w.node.key, w.price, w.epoch, None if w.grant is None else w.grant.blob] for w in winners
    ]
    payload = {"owner": owner.node_id.key, **ref_fields(ref), "winners": rows}
    return decode_own(decode_award, sign_payload(owner, AWARD_CONTEXT, payload))


def sign_completion(
    host: Identity,
    ref: OfferRef,
    *,
    manifest: bytes,
    size: int,
    progress: bytes,
    cpu_ms: int,
    halted: bool = False,
) -> Completion:
    payload = {
        "host": host.node_id.key,
        **ref_fields(ref),
        "manifest": manifest,
        "size": size,
        "progress": progress,
        "cpu_ms": cpu_ms,
        "halted": halted,
    }
    return decode_own(decode_completion, sign_payload(host, COMPLETION_CONTEXT, payload))


def sign_commit(
    owner: Identity,
    ref: OfferRef,
    *,
    winner: NodeId,
    manifest: bytes,
    size: int,
    holders: tuple[NodeId, ...],
) -> SegmentCommit:
    payload = {
        "owner": owner.node_id.key,
        **ref_fields(ref),
        "winner": winner.key,
        "manifest": manifest,
        "size": size,
        "holders": [node.key for node in holders],
    }
    return decode_own(decode_commit, sign_payload(owner, COMMIT_CONTEXT, payload))


def sign_cancel(
    owner: Identity, ref: OfferRef, nodes: tuple[NodeId, ...], reason: CancelReason
) -> Cancel:
    payload = {
        "owner": owner.node_id.key,
        **ref_fields(ref),
        "nodes": [node.key for node in nodes],
        "reason": int(reason),
    }
    return decode_own(decode_cancel, sign_payload(owner, CANCEL_CONTEXT, payload))


def sign_withdraw(
    host: Identity, ref: OfferRef, reason: str, *, live: bool = False, used_ms: int = 0
) -> Withdraw:
    payload: dict[str, Any] = {
        "host": host.node_id.key,
        **ref_fields(ref),
        "reason": reason[:MAX_REASON_CHARS],
    }
    if live:
        payload.update(live=True, used_ms=used_ms)
    return decode_own(decode_withdraw, sign_payload(host, WITHDRAW_CONTEXT, payload))


# -- decoding (where outside bytes come in; only RemoteProtocolError escapes) ----------


def decode_offer(blob: bytes) -> Offer:
    what = "offer"
    owner, payload, fields = open_authored(blob, what, MAX_OFFER_BYTES, OFFER_CONTEXT, "owner")
    nonce = bin_field(fields, "nonce", what, MIN_NONCE_BYTES, MAX_NONCE_BYTES)
    job_id = bin_field(fields, "job", what, DIGEST_BYTES)
    if job_id != derive_job_id(owner.key, nonce):
        raise MarketRefused(MarketRefusal.JOB_MISMATCH, "offer's job id is not its owner's")
    digest = hashlib.blake2b(payload, digest_size=DIGEST_BYTES, person=OFFER_DIGEST_PERSON)
    ref = OfferRef(
        job_id,
        uint_field(fields, "segment", what),
        uint_field(fields, "attempt", what),
        digest.digest(),
    )
    checkpoint = fields.get("checkpoint")
    return Offer(
        owner=owner,
        job_nonce=nonce,
        ref=ref,
        image=_short_text(fields, "image", what, MAX_IMAGE_CHARS),
        requirements=Requirements(
            memory_mib=uint_field(fields, "memory", what, MIN_MEMORY_MIB, MAX_MEMORY_MIB),
            vcpus=uint_field(fields, "vcpus", what, 1, MAX_VCPUS),
            arch=_short_text(fields, "arch", what, MAX_ARCH_CHARS),
            kvm=_bool_field(fields, "kvm", what),
            network=_bool_field(fields, "network", what),
        ),
        extent_s=uint_field(fields, "extent", what, 1),
        checkpoint=None
        if checkpoint is None
        else bin_field(fields, "checkpoint", what, DIGEST_BYTES),
        checkpoint_size=uint_field(fields, "size", what),
        holders=_keys_field(fields, "holders", what, 0, MAX_HOLDERS),
        k=uint_field(fields, "k", what, 1, MAX_K),
        ceiling=uint_field(fields, "ceiling", what, 1, MAX_UNITS),
        bid_deadline=uint_field(fields, "deadline", what),
        args=_optional_text(fields, "args", what, MAX_ARGS_CHARS),
        source=None if fields.get("source") is None else key_field(fields, "source", what),
        blob=blob,
    )


def decode_bid(blob: bytes) -> Bid:
    what = "bid"
    host, _, fields = open_authored(blob, what, MAX_BID_BYTES, BID_CONTEXT, "host")
    return Bid(
        host=host,
        ref=read_ref(fields, what),
        price=uint_field(fields, "price", what, 1, MAX_UNITS),
        finish_s=uint_field(fields, "finish", what),
        held_bytes=uint_field(fields, "held", what),
        capacity=Capacity(
            vcpus=uint_field(fields, "vcpus", what),
            memory_mib=uint_field(fields, "memory", what),
            disk_mib=uint_field(fields, "disk", what),
            slots=uint_field(fields, "slots", what),
        ),
        blob=blob,
    )


def decode_award(blob: bytes) -> Award:
    what = "award"
    owner, _, fields = open_authored(blob, what, MAX_AWARD_BYTES, AWARD_CONTEXT, "owner")
    ref = read_ref(fields, what)
    rows = fields.get("winners")
    if not isinstance(rows, list) or not 1 <= len(rows) <= MAX_K:
        raise RemoteProtocolError(f"award winners is not a list of 1..{MAX_K}")
    winners = tuple(_read_winner(row, owner, ref) for row in rows)
    if len({w.node for w in winners}) != len(winners):
        raise RemoteProtocolError("award names a winner twice")
    return Award(owner, ref, winners, blob)


def decode_completion(blob: bytes) -> Completion:
    what = "completion"
    host, _, fields = open_authored(blob, what, MAX_COMPLETION_BYTES, COMPLETION_CONTEXT, "host")
    return Completion(
        host=host,
        ref=read_ref(fields, what),
        manifest=bin_field(fields, "manifest", what, DIGEST_BYTES),
        size=uint_field(fields, "size", what),
        progress=bin_field(fields, "progress", what, DIGEST_BYTES),
        cpu_ms=uint_field(fields, "cpu_ms", what),
        halted=_bool_field(fields, "halted", what),
        blob=blob,
    )


def decode_commit(blob: bytes) -> SegmentCommit:
    what = "commit"
    owner, _, fields = open_authored(blob, what, MAX_COMMIT_BYTES, COMMIT_CONTEXT, "owner")
    return SegmentCommit(
        owner=owner,
        ref=read_ref(fields, what),
        winner=key_field(fields, "winner", what),
        manifest=bin_field(fields, "manifest", what, DIGEST_BYTES),
        size=uint_field(fields, "size", what),
        holders=_keys_field(fields, "holders", what, 1, MAX_HOLDERS),
        blob=blob,
    )


def decode_cancel(blob: bytes) -> Cancel:
    what = "cancel"
    owner, _, fields = open_authored(blob, what, MAX_CANCEL_BYTES, CANCEL_CONTEXT, "owner")
    raw_reason = uint_field(fields, "reason", what)
    if raw_reason not in tuple(CancelReason):
        raise RemoteProtocolError(f"cancel reason {raw_reason} is unknown")
    return Cancel(
        owner=owner,
        ref=read_ref(fields, what),
        nodes=_keys_field(fields, "nodes", what, 1, MAX_K),
        reason=CancelReason(raw_reason),
        blob=blob,
    )


def decode_withdraw(blob: bytes) -> Withdraw:
    what = "withdraw"
    host, _, fields = open_authored(blob, what, MAX_WITHDRAW_BYTES, WITHDRAW_CONTEXT, "host")
    return Withdraw(
        host=host,
        ref=read_ref(fields, what),
        reason=_optional_text(fields, "reason", what, MAX_REASON_CHARS),
        live=_bool_field(fields, "live", what) if "live" in fields else False,
        used_ms=uint_field(fields, "used_ms", what) if "used_ms" in fields else 0,
        blob=blob,
    )


DECODERS: dict[MarketKind, Callable[[bytes], Statement]] = {
    MarketKind.OFFER: decode_offer,
    MarketKind.BID: decode_bid,
    MarketKind.AWARD: decode_award,
    MarketKind.COMPLETION: decode_completion,
    MarketKind.COMMIT: decode_commit,
    MarketKind.CANCEL: decode_cancel,
    MarketKind.WITHDRAW: decode_withdraw,
}


def decode_statement(kind: int, blob: bytes) -> Statement:
    """Decode a market message of ``kind`` (a ``MarketKind`` value)."""
    if kind not in tuple(DECODERS):
        raise RemoteProtocolError(f"market message kind {kind!r} is not a market statement")
    return DECODERS[MarketKind(kind)](blob)


def peek_job(blob: bytes) -> bytes:
    """The job id a market message names, *unverified*: only to route it to a job's core."""
    _, _, fields = open_statement(blob, "market message", MAX_AWARD_BYTES)
    return bin_field(fields, "job", "market message", DIGEST_BYTES)


# -- helpers ---------------------------------------------------------------------------


def open_authored(
    blob: bytes, what: str, limit: int, context: bytes, author: str
) -> tuple[NodeId, bytes, dict[str, Any]]:
    payload, signature, fields = open_statement(blob, what, limit)
    node = key_field(fields, author, what)
    if not signed_by(node.key, context, payload, signature):
        raise MarketRefused(MarketRefusal.BAD_SIGNATURE, f"{what} is not signed by its {author}")
    return node, payload, fields


def ref_fields(ref: OfferRef) -> dict[str, Any]:
    return {"job": ref.job_id, "segment": ref.segment, "attempt": ref.attempt, "offer": ref.digest}


def read_ref(fields: Mapping[str, Any], what: str) -> OfferRef:
    return OfferRef(
        job_id=bin_field(fields, "job", what, DIGEST_BYTES),
        segment=uint_field(fields, "segment", what),
        attempt=uint_field(fields, "attempt", what),
        digest=bin_field(fields, "offer", what, DIGEST_BYTES),
    )


def _read_winner(row: Any, owner: NodeId, ref: OfferRef) -> Winner:
    what = "award winner"
    if not isinstance(row, list) or len(row) != 4:
        raise RemoteProtocolError(f"{what} is not [node, price, epoch, grant]")
    fields = dict(zip(("node", "price", "epoch", "grant"), row, strict=True))
    winner = Winner(
        node=key_field(fields, "node", what),
        price=uint_field(fields, "price", what, 1, MAX_UNITS),
        epoch=uint_field(fields, "epoch", what),
    )
    if fields["grant"] is None:
        return winner
    try:
        grant = decode_grant(bin_field(fields, "grant", what, 1, 1024))
    except RemoteProtocolError as exc:
        raise MarketRefused(MarketRefusal.BAD_GRANT, f"{what}'s grant: {exc}") from None
    if (grant.owner_key, grant.job_id, grant.node_id, grant.epoch) != (
        owner.key,
        ref.job_id,
        winner.node,
        winner.epoch,
    ):
        raise MarketRefused(
            MarketRefusal.BAD_GRANT, f"{what}'s grant is for another job, node or epoch"
        )
    return Winner(winner.node, winner.price, winner.epoch, grant)


def _keys_field(
    fields: Mapping[str, Any], name: str, what: str, low: int, high: int
) -> tuple[NodeId, ...]:
    value = fields.get(name)
    if not isinstance(value, list) or not low <= len(value) <= high:
        raise RemoteProtocolError(f"{what} {name!r} is not a list of {low}..{high} node ids")
    keys = tuple(key_field({name: item}, name, what) for item in value)
    if len(set(keys)) != len(keys):
        raise RemoteProtocolError(f"{what} {name!r} names a node twice")
    return keys


def _short_text(fields: Mapping[str, Any], name: str, what: str, limit: int) -> str:
    value = text_field(fields, name, what)
    if len(value) > limit:
        raise RemoteProtocolError(f"{what} {name!r} is over {limit} characters")
    return value


def _optional_text(fields: Mapping[str, Any], name: str, what: str, limit: int) -> str:
    value = fields.get(name)
    if not isinstance(value, str) or len(value) > limit:
        raise RemoteProtocolError(f"{what} {name!r} is not a string of at most {limit} characters")
    return value


def _bool_field(fields: Mapping[str, Any], name: str, what: str) -> bool:
    value = fields.get(name)
    if not isinstance(value, bool):
        raise RemoteProtocolError(f"{what} {name!r} is not a boolean")
    return value
