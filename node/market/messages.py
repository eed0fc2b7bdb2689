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

Where things are: the shared parts (kinds, refusals, the offer ref, field
readers) in node/market/message_fields.py; offer, bid and award in
node/market/offer_messages.py; completion, commit, cancel and withdraw in
node/market/outcome_messages.py. This module holds what spans them: the
``Statement`` union, ``decode_statement`` and ``peek_job``, and the effects both
market cores emit.

This module is pure: no I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from node.base.identity import NodeId
from node.base.signed import bin_field, open_statement
from node.base.wire import RemoteProtocolError
from node.market.message_fields import DIGEST_BYTES, MarketKind
from node.market.offer_messages import (
    MAX_AWARD_BYTES,
    Award,
    Bid,
    Offer,
    decode_award,
    decode_bid,
    decode_offer,
)
from node.market.outcome_messages import (
    Cancel,
    Completion,
    SegmentCommit,
    Withdraw,
    decode_cancel,
    decode_commit,
    decode_completion,
    decode_withdraw,
)

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


# -- decoding any statement ----------------------------------------------------------


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
