"""Helpers the fuzz tests share: their example budget, byte-level mutations, raw signing.

``fuzz_settings(n)`` runs a fuzz test on ``n`` examples, times GLEANER_FUZZ_SCALE when
that is set: ``make check`` (the fast lane) sets it to 0.1, the full suite leaves it at 1.
"""

from __future__ import annotations

import os
from typing import Any

import msgpack
from hypothesis import settings
from hypothesis import strategies as st

from node.base.identity import Identity
from node.base.wire import MessageType, encode_frame

FUZZ_SCALE = float(os.environ.get("GLEANER_FUZZ_SCALE", "1"))
MIN_EXAMPLES = 50


def fuzz_settings(max_examples: int, **options: Any) -> settings:
    """Hypothesis settings with `max_examples` scaled by GLEANER_FUZZ_SCALE, never below
    50 (or `max_examples` itself, when that is smaller)."""
    scaled = max(min(max_examples, MIN_EXAMPLES), round(max_examples * FUZZ_SCALE))
    return settings(max_examples=scaled, **options)


Edit = tuple[int, int, int]  # (kind: 0 set, 1 delete, 2 insert, 3 cut; position; byte)


def edit_lists(max_position: int, max_size: int) -> st.SearchStrategy[list[Edit]]:
    """Lists of 1 to ``max_size`` edits for ``mutate``."""
    return st.lists(
        st.tuples(st.integers(0, 3), st.integers(0, max_position), st.integers(0, 255)),
        min_size=1,
        max_size=max_size,
    )


def mutate(data: bytes, edits: list[Edit]) -> bytes:
    """Apply ``edits`` to ``data``: set, delete or insert a byte, or cut the rest off."""
    mutated = bytearray(data)
    for kind, position, value in edits:
        if not mutated:
            mutated.append(value)
            continue
        position %= len(mutated)
        if kind == 0:
            mutated[position] = value
        elif kind == 1:
            del mutated[position]
        elif kind == 2:
            mutated.insert(position, value)
        else:
            del mutated[position:]
    return bytes(mutated)


def valid_frames(identity: Identity) -> list[bytes]:
    """Well-formed frames of five message types from `identity`, to mutate."""
    return [
        encode_frame(identity, MessageType.PING, 1, {"nonce": 7}),
        encode_frame(identity, MessageType.ACK, 2, {"nonce": 7, "updates": [b"u1", b"u2"]}),
        encode_frame(
            identity, MessageType.PING_REQ, 3, {"nonce": 1, "target": b"x" * 32}, sign=True
        ),
        encode_frame(identity, MessageType.JOIN_REPLY, 4, {"records": [b"r" * 100]}),
        encode_frame(identity, MessageType.NACK, 5, {"nonce": 3, "updates": [b"u"]}),
    ]


def signed(identity: Identity, context: bytes, fields: dict[str, Any]) -> bytes:
    """Sign an arbitrary payload, to build statements the signing helpers refuse to make."""
    payload = msgpack.packb(fields, use_bin_type=True)
    return msgpack.packb([payload, identity.sign(context + payload)], use_bin_type=True)


def accepted_only_if_unchanged(decode, original: bytes, mutated: bytes) -> None:
    """A mutated signed statement is refused, or it says exactly what the original said.

    Re-encodings of the outer msgpack array (another length prefix, say) may still
    decode; a changed payload under the original signature never may.
    """
    import msgpack

    from node.base.wire import RemoteProtocolError

    try:
        decode(mutated)
    except RemoteProtocolError:
        return
    assert msgpack.unpackb(mutated)[0] == msgpack.unpackb(original)[0], (
        "a tampered payload verified"
    )
