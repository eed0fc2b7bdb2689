"""The wire format: one msgpack envelope per frame, decoded strictly.

Theory of operation
-------------------
Every agent-to-agent message is a *frame*: a msgpack array of six items,

    [version, type, sender, seq, body, signature]

- ``version``  protocol version (int); frames of another version are refused.
- ``type``     message type (int, see ``MessageType``); unknown types are refused.
- ``sender``   the sender's node id: its 32-byte Ed25519 public key.
- ``seq``      the sender's message counter (uint64), for replay detection.
- ``body``     a msgpack *map* carried as bytes, so the signature covers the exact
               bytes sent, not a re-encoding of them.
- ``signature``64 bytes of Ed25519 over ``SIGNING_CONTEXT + packb(header) + body``,
               or nil. Types that must convince a third party require it.

Decoding is the one place where outside bytes enter the protocol. It enforces
hard limits (frame size, nesting depth, string, binary and container lengths),
checks every known body field's type, and turns *every* failure into
``RemoteProtocolError``. Nothing else may escape ``decode_frame``: a fuzz test
feeds it random and mutated frames to hold it to that. Errors made by this node
itself (encoding a body that breaks its own schema) are ``LocalProtocolError``.

Unknown body fields are kept and ignored, so a later minor version can add
fields without breaking older nodes; the version number changes only when a
field's meaning does.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgpack
from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

from node.base.identity import Identity, NodeId

PROTOCOL_VERSION = 1
SIGNING_CONTEXT = b"gleaner/frame/v1\x00"

MAX_FRAME_BYTES = 60 * 1024
MAX_DEPTH = 6
MAX_STR_BYTES = 4096
MAX_BIN_BYTES = MAX_FRAME_BYTES
MAX_CONTAINER_ITEMS = 1024
MAX_SEQ = 2**64 - 1
SIGNATURE_BYTES = 64


class RemoteProtocolError(Exception):
    """A peer sent something that breaks the protocol. Drop it and count it."""


class LocalProtocolError(Exception):
    """This node tried to send something that breaks the protocol: a bug here."""


class MessageType(enum.IntEnum):
    PING = 1
    ACK = 2
    PING_REQ = 3
    JOIN = 4
    JOIN_REPLY = 5
    RECORD = 6
    GOSSIP = 7
    MARKET = 8  # a signed market statement (node/market/messages.py): {kind, blob}
    LEDGER = 9  # a signed ledger statement (node/ledger/tokens.py): {kind, blob}
    NACK = 10  # a PING_REQ helper's "the target did not answer me in time" (Lifeguard)


@dataclass(frozen=True, slots=True)
class Field:
    """One body field: its Python type after decoding and whether it must be there."""

    kind: type
    required: bool = True
    item: type | None = None  # for list fields: the type of every item


@dataclass(frozen=True, slots=True)
class MessageSpec:
    type: MessageType
    fields: Mapping[str, Field]
    signed: bool = False


SPECS: dict[MessageType, MessageSpec] = {
    spec.type: spec
    for spec in (
        MessageSpec(MessageType.PING, {"nonce": Field(int), "updates": Field(list, False, bytes)}),
        MessageSpec(MessageType.ACK, {"nonce": Field(int), "updates": Field(list, False, bytes)}),
        MessageSpec(
            MessageType.PING_REQ,
            {"nonce": Field(int), "target": Field(bytes), "updates": Field(list, False, bytes)},
        ),
        MessageSpec(MessageType.JOIN, {"record": Field(bytes)}),
        MessageSpec(MessageType.JOIN_REPLY, {"records": Field(list, True, bytes)}),
        MessageSpec(MessageType.RECORD, {"record": Field(bytes)}),
        MessageSpec(MessageType.GOSSIP, {"updates": Field(list, True, bytes)}),
        MessageSpec(MessageType.MARKET, {"kind": Field(int), "blob": Field(bytes)}),
        MessageSpec(MessageType.LEDGER, {"kind": Field(int), "blob": Field(bytes)}),
        MessageSpec(MessageType.NACK, {"nonce": Field(int), "updates": Field(list, False, bytes)}),
    )
}


@dataclass(frozen=True, slots=True)
class Envelope:
    """A decoded, checked frame."""

    version: int
    type: MessageType
    sender: NodeId
    seq: int
    body: dict[str, Any]
    signature: bytes | None


def encode_frame(
    identity: Identity,
    msg_type: MessageType,
    seq: int,
    body: Mapping[str, Any],
    *,
    sign: bool | None = None,
) -> bytes:
    """Encode one frame from this node. Signs when the type requires it or `sign` is set."""
    spec = SPECS.get(msg_type)
    if spec is None:
        raise LocalProtocolError(f"no spec for message type {msg_type!r}")
    try:
        _check_body(spec, body)
    except RemoteProtocolError as exc:
        raise LocalProtocolError(f"encoding {msg_type.name}: {exc}") from exc
    if not 0 <= seq <= MAX_SEQ:
        raise LocalProtocolError(f"seq {seq} out of range")
    body_bytes: bytes = msgpack.packb(dict(body), use_bin_type=True)
    header = [PROTOCOL_VERSION, int(msg_type), identity.node_id.key, seq]
    signature = None
    if spec.signed if sign is None else sign:
        signature = identity.sign(_signed_bytes(header, body_bytes))
    frame: bytes = msgpack.packb([*header, body_bytes, signature], use_bin_type=True)
    if len(frame) > MAX_FRAME_BYTES:
        raise LocalProtocolError(f"{msg_type.name} frame is {len(frame)} bytes, over the limit")
    return frame


def decode_frame(data: bytes) -> Envelope:
    """Decode and check one frame. Raises only RemoteProtocolError."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise RemoteProtocolError("frame is not bytes")
    if len(data) > MAX_FRAME_BYTES:
        raise RemoteProtocolError(f"frame of {len(data)} bytes is over {MAX_FRAME_BYTES}")
    outer = unpack_limited(bytes(data))
    if not isinstance(outer, list) or len(outer) != 6:
        raise RemoteProtocolError("frame is not an array of 6 items")
    version, raw_type, sender, seq, body_bytes, signature = outer
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise RemoteProtocolError(f"unsupported protocol version {version!r}")
    if type(raw_type) is not int:
        raise RemoteProtocolError("message type is not an integer")
    try:
        msg_type = MessageType(raw_type)
    except ValueError:
        raise RemoteProtocolError(f"unknown message type {raw_type}") from None
    if not isinstance(sender, bytes) or len(sender) != 32:
        raise RemoteProtocolError("sender is not a 32-byte node id")
    if type(seq) is not int or not 0 <= seq <= MAX_SEQ:
        raise RemoteProtocolError("seq is not a uint64")
    if not isinstance(body_bytes, bytes):
        raise RemoteProtocolError("body is not bytes")
    if signature is not None and (
        not isinstance(signature, bytes) or len(signature) != SIGNATURE_BYTES
    ):
        raise RemoteProtocolError("signature is not 64 bytes")
    spec = SPECS[msg_type]
    if spec.signed and signature is None:
        raise RemoteProtocolError(f"{msg_type.name} must be signed")
    if signature is not None:
        header = [version, raw_type, sender, seq]
        verify_signature(sender, _signed_bytes(header, body_bytes), signature)
    body = unpack_limited(body_bytes)
    if not isinstance(body, dict):
        raise RemoteProtocolError("body is not a map")
    _check_body(spec, body)
    return Envelope(version, msg_type, NodeId(sender), seq, body, signature)


def verify_signature(signer: bytes, message: bytes, signature: bytes) -> None:
    """Check an Ed25519 signature by the node key `signer`; RemoteProtocolError if bad."""
    try:
        VerifyKey(signer).verify(message, signature)
    except (BadSignatureError, ValueError, TypeError) as exc:
        raise RemoteProtocolError("bad signature") from exc


def unpack_limited(data: bytes) -> Any:
    """msgpack-decode `data` within the protocol's limits; RemoteProtocolError otherwise."""
    try:
        value = msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=True,
            max_str_len=MAX_STR_BYTES,
            max_bin_len=MAX_BIN_BYTES,
            max_array_len=MAX_CONTAINER_ITEMS,
            max_map_len=MAX_CONTAINER_ITEMS,
            max_ext_len=0,
            ext_hook=_refuse_ext,
        )
    except RemoteProtocolError:
        raise
    except (ValueError, TypeError, OverflowError, msgpack.UnpackException) as exc:
        raise RemoteProtocolError(f"malformed msgpack: {exc}") from None
    _check_depth(value)
    return value


def _refuse_ext(code: int, data: bytes) -> Any:
    raise RemoteProtocolError(f"msgpack extension type {code} is not allowed")


def _check_depth(value: Any) -> None:
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, list | dict):
            if depth > MAX_DEPTH:
                raise RemoteProtocolError(f"nesting deeper than {MAX_DEPTH}")
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
        elif not isinstance(item, str | bytes | int | float | bool | None):
            raise RemoteProtocolError(f"unexpected value of type {type(item).__name__}")


def _check_body(spec: MessageSpec, body: Mapping[str, Any]) -> None:
    for name, field in spec.fields.items():
        if name not in body:
            if field.required:
                raise RemoteProtocolError(f"{spec.type.name} lacks field {name!r}")
            continue
        value = body[name]
        if not _is_kind(value, field.kind):
            raise RemoteProtocolError(
                f"{spec.type.name}.{name} is {type(value).__name__}, expected {field.kind.__name__}"
            )
        if field.item is not None:
            for element in value:
                if not _is_kind(element, field.item):
                    raise RemoteProtocolError(
                        f"{spec.type.name}.{name} holds a {type(element).__name__}, "
                        f"expected {field.item.__name__}"
                    )


def _is_kind(value: Any, kind: type) -> bool:
    # bool is a subclass of int in Python; on the wire they are different types.
    if kind is int:
        return type(value) is int
    return isinstance(value, kind)


def _signed_bytes(header: list[Any], body_bytes: bytes) -> bytes:
    packed_header: bytes = msgpack.packb(header, use_bin_type=True)
    return SIGNING_CONTEXT + packed_header + body_bytes
