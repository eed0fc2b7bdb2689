"""The market's run statements: completion, commit, cancel and withdraw.

A host reports a finished run (completion) or gives its replica up (withdraw);
the owner commits the segment to the holders of the winning checkpoint (commit)
and stops the other replicas (cancel). The exchange, the wire forms and the
error rules are in node/market/messages.py; the shared parts in
node/market/message_fields.py.

This module is pure: no I/O, no clock.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from node.base.identity import Identity, NodeId
from node.base.signed import bin_field, decode_own, key_field, sign_payload, uint_field
from node.base.wire import RemoteProtocolError
from node.market.message_fields import (
    DIGEST_BYTES,
    MAX_HOLDERS,
    MAX_K,
    OfferRef,
    bool_field,
    keys_field,
    open_authored,
    optional_text,
    read_ref,
    ref_fields,
)

COMPLETION_CONTEXT = b"gleaner/completion/v1\x00"
COMMIT_CONTEXT = b"gleaner/segment-commit/v1\x00"  # "gleaner/commit/v1" is a token commitment
CANCEL_CONTEXT = b"gleaner/cancel/v1\x00"
WITHDRAW_CONTEXT = b"gleaner/withdraw/v1\x00"
MAX_COMPLETION_BYTES = 1024
MAX_COMMIT_BYTES = 2048
MAX_CANCEL_BYTES = 1024
MAX_WITHDRAW_BYTES = 1024
MAX_REASON_CHARS = 200


class CancelReason(enum.IntEnum):
    LOST_RACE = 1  # another replica's completion was accepted
    ABANDONED = 2  # the attempt is given up; the segment is offered again
    JOB_ENDED = 3  # the job passed its deadline or was stopped


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


# -- signing (our own statements; a failure here is LocalProtocolError) ----------------


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
        halted=bool_field(fields, "halted", what),
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
        holders=keys_field(fields, "holders", what, 1, MAX_HOLDERS),
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
        nodes=keys_field(fields, "nodes", what, 1, MAX_K),
        reason=CancelReason(raw_reason),
        blob=blob,
    )


def decode_withdraw(blob: bytes) -> Withdraw:
    what = "withdraw"
    host, _, fields = open_authored(blob, what, MAX_WITHDRAW_BYTES, WITHDRAW_CONTEXT, "host")
    return Withdraw(
        host=host,
        ref=read_ref(fields, what),
        reason=optional_text(fields, "reason", what, MAX_REASON_CHARS),
        live=bool_field(fields, "live", what) if "live" in fields else False,
        used_ms=uint_field(fields, "used_ms", what) if "used_ms" in fields else 0,
        blob=blob,
    )
