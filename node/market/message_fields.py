"""The market messages' shared parts: kinds, refusals, the offer ref, field readers.

Every market statement (node/market/messages.py has the exchange and the wire
forms) is opened by ``open_authored``, names its offer by an ``OfferRef``
(``ref_fields`` writes it, ``read_ref`` reads it) and reads its fields with the
readers here and in ``node.base.signed``; a reader raises only
``RemoteProtocolError``, and ``MarketRefused`` says why a message was refused.

This module is pure: no I/O, no clock.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from node.base.identity import NodeId
from node.base.signed import bin_field, key_field, open_statement, signed_by, text_field, uint_field
from node.base.wire import RemoteProtocolError

DIGEST_BYTES = 32  # job ids, offer digests, manifest digests, progress digests
MAX_K = 8
MAX_HOLDERS = 16


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
    NOT_OFFERED = "not_offered"  # a bid from a host the offer was not sent to


class MarketRefused(RemoteProtocolError):
    """A peer's market message is refused, for ``reason``."""

    def __init__(self, reason: MarketRefusal, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def refusal_of(exc: RemoteProtocolError) -> MarketRefusal:
    """The reason to count for ``exc``: its own, or MALFORMED."""
    return exc.reason if isinstance(exc, MarketRefused) else MarketRefusal.MALFORMED


@dataclass(frozen=True, slots=True)
class OfferRef:
    """Names one offer: every message after the offer carries it."""

    job_id: bytes
    segment: int
    attempt: int
    digest: bytes


# -- field readers ---------------------------------------------------------------------


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


def keys_field(
    fields: Mapping[str, Any], name: str, what: str, low: int, high: int
) -> tuple[NodeId, ...]:
    value = fields.get(name)
    if not isinstance(value, list) or not low <= len(value) <= high:
        raise RemoteProtocolError(f"{what} {name!r} is not a list of {low}..{high} node ids")
    keys = tuple(key_field({name: item}, name, what) for item in value)
    if len(set(keys)) != len(keys):
        raise RemoteProtocolError(f"{what} {name!r} names a node twice")
    return keys


def short_text(fields: Mapping[str, Any], name: str, what: str, limit: int) -> str:
    value = text_field(fields, name, what)
    if len(value) > limit:
        raise RemoteProtocolError(f"{what} {name!r} is over {limit} characters")
    return value


def optional_text(fields: Mapping[str, Any], name: str, what: str, limit: int) -> str:
    value = fields.get(name)
    if not isinstance(value, str) or len(value) > limit:
        raise RemoteProtocolError(f"{what} {name!r} is not a string of at most {limit} characters")
    return value


def bool_field(fields: Mapping[str, Any], name: str, what: str) -> bool:
    value = fields.get(name)
    if not isinstance(value, bool):
        raise RemoteProtocolError(f"{what} {name!r} is not a boolean")
    return value
