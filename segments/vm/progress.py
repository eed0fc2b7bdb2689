"""The progress digest: 32 bytes that say how far a segment's guest got, and in which console.

Theory of operation
-------------------
A completion carries ``progress`` (32 bytes, ``node.market.messages``'s ``bin32``): what
the replica's guest printed on its console during the segment, in a form the
owner can compare and keep as the next segment's ``base``::

    bytes  0..7    the last ``gleaner-progress`` step, uint64 big-endian (0: none)
    bytes  8..15   that step's state: its 16 hex digits as 8 bytes (zeros: none)
    bytes 16..31   the first 16 bytes of BLAKE2b-512 of the console's UTF-8 bytes

The step and state come from the demo workload's lines (``segments.image.workload``);
a guest that prints none has step 0. The console digest binds the claim to
the exact console file in the checkpoint, so a verifier that reads that file
(``segments.vm.verify``) knows the replica's claim came from it. The console is
read as UTF-8 with undecodable bytes replaced (``console_text``), by the
replica and the verifier alike, so both hash the same text.

Decoding is strict: a digest from a peer that is not 32 bytes, or names a
state without a step, raises ``ValueError``. Pure: no I/O.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from segments.image.workload import STATE_HEX, parse_progress

SANS_IO = True  # a core: tests/unit/test_import_graph.py holds it to no I/O

PROGRESS_BYTES = 32
STEP_BYTES = 8
STATE_BYTES = STATE_HEX // 2
CONSOLE_DIGEST_BYTES = 16
MAX_STEP = 2**64 - 1


@dataclass(frozen=True, slots=True)
class Progress:
    """A decoded progress digest."""

    step: int  # the last gleaner-progress step, 0 if none
    state: str | None  # its state, 16 hex digits; None when step is 0
    console_digest: bytes  # 16 bytes: BLAKE2b of the console, truncated


def console_text(data: bytes) -> str:
    """A console file's bytes as text, the one way everybody decodes it."""
    return data.decode("utf-8", errors="replace")


def console_digest(text: str) -> bytes:
    """The first 16 bytes of BLAKE2b-512 of the text's UTF-8 bytes."""
    return hashlib.blake2b(text.encode("utf-8")).digest()[:CONSOLE_DIGEST_BYTES]


def encode_progress(console: str) -> bytes:
    """The 32-byte progress digest of a console's text (see the module docstring).

    Raises ValueError if the last step does not fit in 64 bits.
    """
    lines = parse_progress(console)
    step, state = lines[-1] if lines else (0, None)
    if step > MAX_STEP:
        raise ValueError(f"progress step {step} does not fit in {STEP_BYTES} bytes")
    state_bytes = bytes.fromhex(state) if state is not None else bytes(STATE_BYTES)
    return step.to_bytes(STEP_BYTES, "big") + state_bytes + console_digest(console)


def decode_progress(data: bytes) -> Progress:
    """Decode a progress digest; ValueError if it is not one."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ValueError(f"a progress digest is bytes, not {type(data).__name__}")
    data = bytes(data)
    if len(data) != PROGRESS_BYTES:
        raise ValueError(f"a progress digest is {PROGRESS_BYTES} bytes, got {len(data)}")
    step = int.from_bytes(data[:STEP_BYTES], "big")
    state_bytes = data[STEP_BYTES : STEP_BYTES + STATE_BYTES]
    if step == 0 and state_bytes != bytes(STATE_BYTES):
        raise ValueError("a progress digest names a state but no step")
    state = state_bytes.hex() if step else None
    return Progress(step, state, data[STEP_BYTES + STATE_BYTES :])
