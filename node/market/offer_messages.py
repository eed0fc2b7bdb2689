"""The market's auction statements: offer, bid and award.

The owner offers a segment attempt, hosts bid for it, and the owner awards it to
k of them (with route grants for a network job). The exchange, the wire forms
and the error rules are in node/market/messages.py; the shared parts in
node/market/message_fields.py.

This module is pure: no I/O, no clock.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from node.base.identity import Identity, NodeId
from node.base.signed import bin_field, decode_own, key_field, sign_payload, uint_field
from node.base.wire import RemoteProtocolError
from node.ledger.tokens import MAX_UNITS
from node.market.message_fields import (
    DIGEST_BYTES,
    MAX_HOLDERS,
    MAX_K,
    MarketRefusal,
    MarketRefused,
    OfferRef,
    bool_field,
    keys_field,
    open_authored,
    optional_text,
    read_ref,
    ref_fields,
    short_text,
)
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
OFFER_DIGEST_PERSON = b"gleaner-offer"
MAX_ARCH_CHARS = 32
MAX_IMAGE_CHARS = 128
MAX_ARGS_CHARS = 512  # the job's kernel command-line additions
MIN_MEMORY_MIB = 72  # below this no guest kernel boots
MAX_MEMORY_MIB = 1 << 20
MAX_VCPUS = 256
# A segment's extent, in guest vCPU-seconds (a job spec allows the same): a larger one
# would make a host's finish estimate overflow the bid's uint64 when it signs its bid.
MAX_EXTENT_S = 2**32
# A checkpoint is at most a full manifest: 2 Mi blocks of at most 1 MiB.
MAX_CHECKPOINT_BYTES = 2**41
MAX_UNIX_S = 2**63 - 1  # deadlines are Unix seconds, stored as SQLite integers
MAX_OFFER_BYTES = 2048 + MAX_ARGS_CHARS
MAX_WORK_BYTES = 2**41  # a job's image and inputs, uncompressed (a full manifest, as above)
MIN_WORK_DISK_MIB = 16  # segments/image/job_disks.py: MIN_DISK_BYTES
MAX_WORK_DISK_MIB = 1 << 20  # ... and MAX_DISK_BYTES (a sparse file's size)
MAX_BID_BYTES = 1024
MAX_AWARD_BYTES = 2048 + MAX_K * 1024


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
class Work:
    """A job owner's own program (segments/image/job_disks.py): what a host needs to run it.

    ``bundle`` is the digest of a manifest the owner signed and serves, holding the
    image's record (``image.json``) and the job's tar (``job.tar``: the command
    and the inputs). ``bundle_bytes`` is what a host lacking all of it fetches
    (the image's layers or disk and the tar); ``disk_mib`` and ``output_mib``
    size the guest's scratch and output disks.
    """

    bundle: bytes
    bundle_bytes: int
    disk_mib: int
    output_mib: int


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
    work: Work | None = None  # a job owner's own program; None: the image is the whole job
    blob: bytes = field(default=b"", compare=False, repr=False)

    @property
    def fetch_bytes(self) -> int:
        """What a host holding nothing of the job fetches before it runs: checkpoint, bundle."""
        return self.checkpoint_size + (self.work.bundle_bytes if self.work is not None else 0)


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
    work: Work | None = None,
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
    if work is not None:
        payload["work"] = [work.bundle, work.bundle_bytes, work.disk_mib, work.output_mib]
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
        image=short_text(fields, "image", what, MAX_IMAGE_CHARS),
        requirements=Requirements(
            memory_mib=uint_field(fields, "memory", what, MIN_MEMORY_MIB, MAX_MEMORY_MIB),
            vcpus=uint_field(fields, "vcpus", what, 1, MAX_VCPUS),
            arch=short_text(fields, "arch", what, MAX_ARCH_CHARS),
            kvm=bool_field(fields, "kvm", what),
            network=bool_field(fields, "network", what),
        ),
        extent_s=uint_field(fields, "extent", what, 1, MAX_EXTENT_S),
        checkpoint=None
        if checkpoint is None
        else bin_field(fields, "checkpoint", what, DIGEST_BYTES),
        checkpoint_size=uint_field(fields, "size", what, 0, MAX_CHECKPOINT_BYTES),
        holders=keys_field(fields, "holders", what, 0, MAX_HOLDERS),
        k=uint_field(fields, "k", what, 1, MAX_K),
        ceiling=uint_field(fields, "ceiling", what, 1, MAX_UNITS),
        bid_deadline=uint_field(fields, "deadline", what, 0, MAX_UNIX_S),
        args=optional_text(fields, "args", what, MAX_ARGS_CHARS),
        source=None if fields.get("source") is None else key_field(fields, "source", what),
        work=None if fields.get("work") is None else _read_work(fields["work"]),
        blob=blob,
    )


def _read_work(row: Any) -> Work:
    what = "offer work"
    if not isinstance(row, list) or len(row) != 4:
        raise RemoteProtocolError(f"{what} is not [bundle, bytes, disk, outputs]")
    fields = dict(zip(("bundle", "bytes", "disk", "outputs"), row, strict=True))
    return Work(
        bundle=bin_field(fields, "bundle", what, DIGEST_BYTES),
        bundle_bytes=uint_field(fields, "bytes", what, 0, MAX_WORK_BYTES),
        disk_mib=uint_field(fields, "disk", what, MIN_WORK_DISK_MIB, MAX_WORK_DISK_MIB),
        output_mib=uint_field(fields, "outputs", what, MIN_WORK_DISK_MIB, MAX_WORK_DISK_MIB),
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
