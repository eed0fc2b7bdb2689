"""Signed statements: the ``[payload, signature]`` envelope and its strict field readers.

Theory of operation
-------------------
A *signed statement* is a claim one node makes that any other node can check
alone: a peer record, a route grant or claim, a token commitment, payment or
ack. All of them share one wire form::

    msgpack([payload, signature])
    payload   = msgpack map of the statement's fields, carried as bytes
    signature = Ed25519 by the signer over CONTEXT + payload (64 bytes)

Carrying the payload as bytes means the signature covers exactly the bytes sent,
never a re-encoding of them. The signer's key is one of the payload's fields;
the statement's module says which.

Domain separation: every kind of statement has its own ``CONTEXT``, a
NUL-terminated ``b"gleaner/<kind>/v<n>\\0"`` string that is signed but never
sent, so a signature made for one kind never verifies as another (and none
verifies as a wire frame, ``gleaner/frame/v1``). In use::

    gleaner/record/v1   node/base/records.py     gleaner/commit/v1   node/ledger/tokens.py
    gleaner/grant/v1    overlay/claims.py   gleaner/payment/v1  node/ledger/tokens.py
    gleaner/route/v1    overlay/claims.py   gleaner/payack/v1   node/ledger/tokens.py

(Manifests, segments/store/manifest.py, use the same envelope under
``gleaner/manifest/v1``, with their own much larger limits and parser.)

Errors. ``open_statement`` and the ``*_field`` readers are where a peer's bytes
come in: they check sizes, types and ranges strictly and raise only
``RemoteProtocolError``. ``signed_by`` answers whether a signature holds, so
each caller raises its own refusal. Signing is ours: ``sign_payload`` raises
``LocalProtocolError`` for fields msgpack cannot encode, and ``decode_own``
turns a refusal of bytes we made ourselves (just signed, or read back from our
own journal) into ``LocalProtocolError``: a bug or corruption here, not a peer's
fault.

This module is pure: no I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import msgpack

from node.base.identity import KEY_BYTES, Identity, NodeId
from node.base.wire import (
    MAX_SEQ,
    SIGNATURE_BYTES,
    LocalProtocolError,
    RemoteProtocolError,
    unpack_limited,
    verify_signature,
)

_T = TypeVar("_T")


# -- ours: signing ---------------------------------------------------------------------


def sign_payload(identity: Identity, context: bytes, fields: Mapping[str, Any]) -> bytes:
    """Encode ``fields`` as a payload and sign it under ``context``: the statement's blob."""
    try:
        payload: bytes = msgpack.packb(fields, use_bin_type=True)
    except (OverflowError, TypeError, ValueError) as exc:
        raise LocalProtocolError(f"cannot encode {fields!r}: {exc}") from exc
    blob: bytes = msgpack.packb([payload, identity.sign(context + payload)], use_bin_type=True)
    return blob


def decode_own(decode: Callable[[bytes], _T], blob: Any, failure: str = "refusing to sign") -> _T:
    """Decode bytes we made ourselves; a refusal means our inputs (or journal) were wrong."""
    try:
        return decode(blob)
    except RemoteProtocolError as exc:
        raise LocalProtocolError(f"{failure}: {exc}") from exc


# -- theirs: opening and reading (only RemoteProtocolError escapes) --------------------


def open_statement(blob: Any, what: str, limit: int) -> tuple[bytes, bytes, dict[str, Any]]:
    """Split a statement of at most ``limit`` bytes into payload, signature and fields.

    The signature is not checked here: the signer's key is among the fields.
    """
    if not isinstance(blob, bytes) or len(blob) > limit:
        raise RemoteProtocolError(f"{what} is not bytes or is over {limit} bytes")
    outer = unpack_limited(blob)
    if not isinstance(outer, list) or len(outer) != 2:
        raise RemoteProtocolError(f"{what} is not [payload, signature]")
    payload, signature = outer
    if not isinstance(payload, bytes) or not isinstance(signature, bytes):
        raise RemoteProtocolError(f"{what} payload or signature is not bytes")
    if len(signature) != SIGNATURE_BYTES:
        raise RemoteProtocolError(f"{what} signature is not {SIGNATURE_BYTES} bytes")
    fields = unpack_limited(payload)
    if not isinstance(fields, dict):
        raise RemoteProtocolError(f"{what} payload is not a map")
    return payload, signature, fields


def signed_by(key: bytes, context: bytes, payload: bytes, signature: bytes) -> bool:
    """True if ``signature`` is ``key``'s Ed25519 signature of ``context + payload``."""
    try:
        verify_signature(key, context + payload, signature)
    except RemoteProtocolError:
        return False
    return True


def bin_field(
    fields: Mapping[str, Any], name: str, what: str, low: int, high: int | None = None
) -> bytes:
    """Field ``name`` as bytes of exactly ``low`` bytes, or of ``low..high`` bytes."""
    high = low if high is None else high
    value = fields.get(name)
    if not isinstance(value, bytes) or not low <= len(value) <= high:
        size = str(low) if low == high else f"{low}..{high}"
        raise RemoteProtocolError(f"{what} {name!r} is not {size} bytes")
    return value


def key_field(fields: Mapping[str, Any], name: str, what: str) -> NodeId:
    """Field ``name`` as a node id (a 32-byte Ed25519 public key)."""
    return NodeId(bin_field(fields, name, what, KEY_BYTES))


def text_field(fields: Mapping[str, Any], name: str, what: str) -> str:
    """Field ``name`` as a non-empty string."""
    value = fields.get(name)
    if not isinstance(value, str) or not value:
        raise RemoteProtocolError(f"{what} {name!r} is not a non-empty string")
    return value


def uint_field(
    fields: Mapping[str, Any], name: str, what: str, low: int = 0, high: int = MAX_SEQ
) -> int:
    """Field ``name`` as an integer in ``low..high`` (a uint64 by default; never a bool)."""
    value = fields.get(name)
    if type(value) is not int or not low <= value <= high:
        span = "a uint64" if (low, high) == (0, MAX_SEQ) else f"an integer in {low}..{high}"
        raise RemoteProtocolError(f"{what} {name!r} is not {span}")
    return value
