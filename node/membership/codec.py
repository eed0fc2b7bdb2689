"""The update codec: what SWIM's dissemination half says, as bytes.

Theory of operation
-------------------
News travels as *updates*, each a msgpack-encoded ``bytes`` item of the
``updates`` list that PING, ACK, PING_REQ and GOSSIP carry:

    [0, record_blob]                  ALIVE: a signed peer record, self-certifying
    [1, node, incarnation, accuser]   SUSPECT: a claim by `accuser` (32-byte ids)
    [2, node, incarnation, accuser]   DEAD: likewise; accuser == node means LEFT
    [3, topic, key, payload]          BROADCAST: opaque news for a layer above

``decode_update`` checks shapes and limits and raises only RemoteProtocolError.
``SeenSet`` remembers the digests of the newest broadcasts, bounded.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass
from typing import Any

import msgpack

from node.base.identity import NodeId
from node.base.wire import MAX_SEQ, RemoteProtocolError, unpack_limited

MAX_TOPIC_BYTES = 64
MAX_KEY_BYTES = 256
MAX_BROADCAST_PAYLOAD_BYTES = 4096


class UpdateKind(enum.IntEnum):
    ALIVE = 0
    SUSPECT = 1
    DEAD = 2
    BROADCAST = 3


ALIVE_PREFIX = b"\x92\x00"  # how every encoded ALIVE update starts: msgpack [0, ...]


@dataclass(frozen=True, slots=True)
class Alive:
    blob: bytes


@dataclass(frozen=True, slots=True)
class Claim:
    kind: UpdateKind  # SUSPECT or DEAD
    node: NodeId
    incarnation: int
    accuser: NodeId


@dataclass(frozen=True, slots=True)
class Broadcast:
    topic: str
    key: bytes
    payload: bytes


Update = Alive | Claim | Broadcast


def encode_update(update: Update) -> bytes:
    if isinstance(update, Alive):
        items: list[Any] = [UpdateKind.ALIVE, update.blob]
    elif isinstance(update, Claim):
        items = [update.kind, update.node.key, update.incarnation, update.accuser.key]
    else:
        items = [UpdateKind.BROADCAST, update.topic, update.key, update.payload]
    packed: bytes = msgpack.packb(items, use_bin_type=True)
    return packed


def decode_update(data: object) -> Update:
    """Parse one update. Raises RemoteProtocolError only."""
    if not isinstance(data, bytes):
        raise RemoteProtocolError("update is not bytes")
    items = unpack_limited(data)
    if not isinstance(items, list) or not items or type(items[0]) is not int:
        raise RemoteProtocolError("update is not [kind, ...]")
    kind = items[0]
    if kind == UpdateKind.ALIVE and len(items) == 2 and isinstance(items[1], bytes):
        return Alive(items[1])
    if kind in (UpdateKind.SUSPECT, UpdateKind.DEAD) and len(items) == 4:
        _, node, incarnation, accuser = items
        if not (_is_key(node) and _is_key(accuser)):
            raise RemoteProtocolError("claim node or accuser is not a 32-byte id")
        if type(incarnation) is not int or not 0 <= incarnation <= MAX_SEQ:
            raise RemoteProtocolError("claim incarnation is not a uint64")
        return Claim(UpdateKind(kind), NodeId(node), incarnation, NodeId(accuser))
    if kind == UpdateKind.BROADCAST and len(items) == 4:
        _, topic, key, payload = items
        check_broadcast(topic, key, payload, RemoteProtocolError)
        return Broadcast(topic, key, payload)
    raise RemoteProtocolError(f"malformed update of kind {kind}")


def check_broadcast(topic: object, key: object, payload: object, error: type[Exception]) -> None:
    """Raise `error` unless topic, key and payload are within the broadcast limits."""
    if not isinstance(topic, str) or not 0 < len(topic.encode()) <= MAX_TOPIC_BYTES:
        raise error("broadcast topic is not a short string")
    if not isinstance(key, bytes) or len(key) > MAX_KEY_BYTES:
        raise error("broadcast key is not short bytes")
    if not isinstance(payload, bytes) or len(payload) > MAX_BROADCAST_PAYLOAD_BYTES:
        raise error("broadcast payload is not bytes within the limit")


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


def _is_key(value: object) -> bool:
    return isinstance(value, bytes) and len(value) == 32


class SeenSet:
    """The digests of the newest `capacity` distinct broadcasts seen."""

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._digests: dict[bytes, None] = {}

    def add(self, update: Broadcast) -> bool:
        """Remember `update`; False if it was already remembered."""
        digest = _digest(encode_update(update))
        if digest in self._digests:
            return False
        self._digests[digest] = None
        if len(self._digests) > self._capacity:
            del self._digests[next(iter(self._digests))]
        return True
