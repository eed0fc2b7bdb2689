"""The transfer protocol's sans-IO half: its wire codec and the receiver's fetch core.

Frames are length-prefixed msgpack (4-byte big-endian length, then
``[kind, ...]``):

    receiver -> holder   QUERY [ids]         which of these do you have?
    holder -> receiver   HAVE  [ids]         these (one HAVE per QUERY, in order)
    receiver -> holder   GET   [ids]         send these
    holder -> receiver   BLOCK id data       (or LACK id: not here after all)
    receiver -> holder   MANIFEST_GET digest send the manifest of this digest
    holder -> receiver   MANIFEST encoded    the encoded, signed manifest (or LACK digest)

A frame is at most ``MAX_FRAME_BYTES``, except MANIFEST: a manifest is
``DIGEST_BYTES`` per block (a 76 MB checkpoint's is about 231 KB), so a
MANIFEST frame may take up to ``MAX_MANIFEST_FRAME_BYTES``. A frame announced
over ``MAX_FRAME_BYTES`` must show that it is one as soon as its first two
payload bytes arrive (``0x92 0x07``: msgpack for a 2-array starting with
MANIFEST, the only form ``encode_message`` writes), so a peer cannot make a
reader buffer megabytes of anything else; a reader on the serving side, which
never receives MANIFEST, keeps the small limit altogether. MANIFEST carries the
manifest's bytes undecoded: the receiver decodes and checks them with
``segments.store.manifest.decode_manifest`` (signature included) and accepts them only
if their digest is the one it asked for, so the frame itself need not name it.
A manifest needs no state machine: one request, one answer, and the edge
(``segments.store.transfer.fetch_manifest``) asks holders one after another.

``decode_message`` and ``FrameReader`` are where a peer's bytes come in; every
fault there is ``RemoteProtocolError``. ``encode_message`` refuses (ValueError)
to write a frame the peer's reader would refuse.

``FetchCore`` is the receiver: ``handle(event) -> list[Effect]``, no sockets,
no clock (timeouts are the edge's: a holder that stalls is reported lost). It
keeps, per holder, what it has (from HAVE), a queue of candidates and the
requests in flight (at most ``max_in_flight``). Every holder pulls the next
pending block it has, so faster holders take more. A block that arrives is
verified (length and BLAKE3) before ``StoreBlock`` is emitted. A bad block
counts a fault against its holder and goes back to pending, offered first to
holders that have not failed on it (the faulty one only if no other has it, as
a flipped bit may be transient); after ``max_faults`` faults a holder is
dropped. A lost holder's requests go back to pending for the others. The fetch
is *done* when every wanted block is verified, and *stalled* when blocks remain
that no live holder offers, nothing is in flight and no holder is still
answering queries.

Invariants: a block is requested from at most one holder at a time; a verified
block is never requested again; ``StoreBlock`` carries only verified bytes.
"""

from __future__ import annotations

import enum
import struct
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack

from node.base.wire import RemoteProtocolError
from segments.store.manifest import DIGEST_BYTES, MAX_BLOCK_SIZE, ZERO, block_digest

SANS_IO = True  # a core: tests/unit/test_import_graph.py holds it to no I/O


MAX_IDS = 1024
MAX_FRAME_BYTES = MAX_BLOCK_SIZE + 1024
MAX_MANIFEST_FRAME_BYTES = 8 * 1024 * 1024  # MANIFEST only: about 260,000 blocks
LENGTH = struct.Struct(">I")
DEFAULT_IN_FLIGHT = 8
DEFAULT_MAX_FAULTS = 3


# -- wire ----------------------------------------------------------------------


class Kind(enum.IntEnum):
    QUERY = 1
    HAVE = 2
    GET = 3
    BLOCK = 4
    LACK = 5
    MANIFEST_GET = 6
    MANIFEST = 7


# How every frame over MAX_FRAME_BYTES begins: msgpack for a 2-array, then MANIFEST.
MANIFEST_PREFIX = bytes([0x92, Kind.MANIFEST])


@dataclass(frozen=True, slots=True)
class IdsMessage:
    """QUERY, HAVE or GET: a list of block ids."""

    kind: Kind
    ids: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class BlockMessage:
    id: bytes
    data: bytes


@dataclass(frozen=True, slots=True)
class LackMessage:
    """Not here: a block (answer to GET) or a manifest (answer to MANIFEST_GET)."""

    id: bytes


@dataclass(frozen=True, slots=True)
class ManifestGetMessage:
    """MANIFEST_GET: send the manifest whose digest is this."""

    digest: bytes


@dataclass(frozen=True, slots=True)
class ManifestMessage:
    """MANIFEST: an encoded manifest, not yet decoded or verified."""

    encoded: bytes


Message = IdsMessage | BlockMessage | LackMessage | ManifestGetMessage | ManifestMessage


def encode_message(message: Message) -> bytes:
    """One frame: length prefix and msgpack payload. ValueError if a peer would refuse it."""
    body: list[Any]
    limit = MAX_FRAME_BYTES
    if isinstance(message, IdsMessage):
        if len(message.ids) > MAX_IDS:
            raise ValueError(f"{len(message.ids)} ids in one message, over {MAX_IDS}")
        body = [int(message.kind), list(message.ids)]
    elif isinstance(message, BlockMessage):
        body = [int(Kind.BLOCK), message.id, message.data]
    elif isinstance(message, LackMessage):
        body = [int(Kind.LACK), message.id]
    elif isinstance(message, ManifestGetMessage):
        body = [int(Kind.MANIFEST_GET), message.digest]
    else:
        body = [int(Kind.MANIFEST), message.encoded]
        limit = MAX_MANIFEST_FRAME_BYTES
    payload: bytes = msgpack.packb(body, use_bin_type=True)
    if len(payload) > limit:
        raise ValueError(f"a {Kind(body[0]).name} frame of {len(payload)} bytes, over {limit}")
    return LENGTH.pack(len(payload)) + payload


def decode_message(payload: bytes) -> Message:
    """Decode one frame's payload strictly. Raises only RemoteProtocolError."""
    if len(payload) > MAX_FRAME_BYTES and (
        len(payload) > MAX_MANIFEST_FRAME_BYTES or not payload.startswith(MANIFEST_PREFIX)
    ):
        raise RemoteProtocolError(f"transfer frame of {len(payload)} bytes is too big")
    try:
        body = msgpack.unpackb(
            payload,
            raw=False,
            strict_map_key=True,
            max_str_len=0,
            max_bin_len=MAX_MANIFEST_FRAME_BYTES,  # bounded by the frame; BLOCK checked below
            max_array_len=MAX_IDS,
            max_map_len=0,
            max_ext_len=0,
        )
    except (ValueError, TypeError, OverflowError, msgpack.UnpackException) as exc:
        raise RemoteProtocolError(f"malformed transfer frame: {exc}") from None
    if not isinstance(body, list) or not body or type(body[0]) is not int:
        raise RemoteProtocolError("transfer frame is not [kind, ...]")
    kind, args = body[0], body[1:]
    if kind in (Kind.QUERY, Kind.HAVE, Kind.GET) and len(args) == 1 and isinstance(args[0], list):
        return IdsMessage(Kind(kind), tuple(_block_id(item) for item in args[0]))
    if kind == Kind.BLOCK and len(args) == 2 and _is_block_data(args[1]):
        return BlockMessage(_block_id(args[0]), args[1])
    if kind == Kind.LACK and len(args) == 1:
        return LackMessage(_block_id(args[0]))
    if kind == Kind.MANIFEST_GET and len(args) == 1:
        return ManifestGetMessage(_block_id(args[0]))
    if kind == Kind.MANIFEST and len(args) == 1 and isinstance(args[0], bytes) and args[0]:
        return ManifestMessage(args[0])
    raise RemoteProtocolError(f"bad transfer frame of kind {kind}")


def _block_id(value: Any) -> bytes:
    """A block's or a manifest's name: a 32-byte digest, never ZERO."""
    if not isinstance(value, bytes) or len(value) != DIGEST_BYTES or value == ZERO:
        raise RemoteProtocolError("id is not a 32-byte digest")
    return value


def _is_block_data(value: Any) -> bool:
    return isinstance(value, bytes) and len(value) <= MAX_BLOCK_SIZE


class FrameReader:
    """Sans-IO splitter of a byte stream into frame payloads.

    Frames up to ``max_frame_bytes``; those over ``MAX_FRAME_BYTES`` only if they
    begin as MANIFEST. A server, which never receives MANIFEST, passes
    ``MAX_FRAME_BYTES``.
    """

    def __init__(self, max_frame_bytes: int = MAX_MANIFEST_FRAME_BYTES) -> None:
        self.max_frame_bytes = max_frame_bytes
        self._buffer = bytearray()

    def feed(self, data: bytes | bytearray) -> None:
        self._buffer += data

    def next_frame(self) -> bytes | None:
        """The next complete payload, or None until more bytes are fed."""
        if len(self._buffer) < LENGTH.size:
            return None
        (length,) = LENGTH.unpack_from(self._buffer)
        if not 0 < length <= self.max_frame_bytes:
            raise RemoteProtocolError(f"frame length {length} out of range")
        if length > MAX_FRAME_BYTES:  # only MANIFEST may be this big: see it before buffering
            prefix = self._buffer[LENGTH.size : LENGTH.size + len(MANIFEST_PREFIX)]
            if len(prefix) < len(MANIFEST_PREFIX):
                return None
            if prefix != MANIFEST_PREFIX:
                raise RemoteProtocolError(f"a frame of {length} bytes that is not MANIFEST")
        if len(self._buffer) < LENGTH.size + length:
            return None
        payload = bytes(self._buffer[LENGTH.size : LENGTH.size + length])
        del self._buffer[: LENGTH.size + length]
        return payload

    @property
    def empty(self) -> bool:
        return not self._buffer


# -- receiver core -----------------------------------------------------------------

Holder = str


@dataclass(frozen=True, slots=True)
class HolderJoined:
    holder: Holder


@dataclass(frozen=True, slots=True)
class HaveAnnounced:
    holder: Holder
    ids: tuple[bytes, ...]
    final: bool = True  # this holder has now answered every query


@dataclass(frozen=True, slots=True)
class BlockArrived:
    holder: Holder
    id: bytes
    data: bytes


@dataclass(frozen=True, slots=True)
class BlockLacked:
    holder: Holder
    id: bytes


@dataclass(frozen=True, slots=True)
class HolderLost:
    holder: Holder
    reason: str


Event = HolderJoined | HaveAnnounced | BlockArrived | BlockLacked | HolderLost


@dataclass(frozen=True, slots=True)
class RequestBlocks:
    holder: Holder
    ids: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class StoreBlock:
    id: bytes
    data: bytes


@dataclass(frozen=True, slots=True)
class DropHolder:
    holder: Holder
    reason: str


@dataclass(frozen=True, slots=True)
class ReportFault:
    """Tell the operator what a holder did wrong (the core keeps no log of its own)."""

    holder: Holder
    what: str
    faults: int


Effect = RequestBlocks | StoreBlock | DropHolder | ReportFault


@dataclass
class _HolderState:
    has: set[bytes] = field(default_factory=set)
    queue: deque[bytes] = field(default_factory=deque)
    in_flight: set[bytes] = field(default_factory=set)
    failed_on: set[bytes] = field(default_factory=set)
    faults: int = 0
    live: bool = True
    announcing: bool = True


@dataclass(frozen=True, slots=True)
class FetchStatistics:
    bytes_done: int
    bytes_total: int
    blocks_done: int
    blocks_total: int
    bad_blocks: int
    faults: dict[Holder, int]
    dropped: tuple[Holder, ...]


class FetchCore:
    """The receiver's want/have state machine (see the module docstring)."""

    def __init__(
        self,
        wanted: Mapping[bytes, int],
        *,
        max_in_flight: int = DEFAULT_IN_FLIGHT,
        max_faults: int = DEFAULT_MAX_FAULTS,
    ) -> None:
        self.wanted = dict(wanted)
        self.max_in_flight = max_in_flight
        self.max_faults = max_faults
        self.holders: dict[Holder, _HolderState] = {}
        self._pending: dict[bytes, None] = dict.fromkeys(self.wanted)
        self._in_flight: dict[bytes, Holder] = {}
        self._bytes_done = 0
        self._bad_blocks = 0

    @property
    def done(self) -> bool:
        return not self._pending and not self._in_flight

    @property
    def stalled(self) -> bool:
        """Blocks remain that no live holder offers, and nothing can change that."""
        if self.done or self._in_flight:
            return False
        live = [h for h in self.holders.values() if h.live]
        if any(h.announcing for h in live):
            return False
        return not any(digest in h.has for h in live for digest in self._pending)

    def in_flight(self, holder: Holder) -> int:
        state = self.holders.get(holder)
        return len(state.in_flight) if state else 0

    def handle(self, event: Event) -> list[Effect]:
        effects: list[Effect] = []
        state = self.holders.get(event.holder)
        if isinstance(event, HolderJoined):
            if state is None:
                self.holders[event.holder] = _HolderState()
            return effects
        if state is None or not state.live:
            return effects  # late news from a holder we gave up on
        if isinstance(event, HaveAnnounced):
            for digest in event.ids:
                if digest in self.wanted and digest not in state.has:
                    state.has.add(digest)
                    state.queue.append(digest)
            state.announcing = not event.final
        elif isinstance(event, BlockArrived):
            self._arrived(event, state, effects)
        elif isinstance(event, BlockLacked):
            if event.id not in state.in_flight:
                self._fault(event.holder, state, "LACK for a block not asked for", effects)
            else:
                state.in_flight.discard(event.id)
                del self._in_flight[event.id]
                state.has.discard(event.id)
                self._requeue(event.id)
        elif isinstance(event, HolderLost):
            self._lose(event.holder, state)
        self._assign(effects)
        return effects

    def _arrived(self, event: BlockArrived, state: _HolderState, effects: list[Effect]) -> None:
        if event.id not in state.in_flight:
            self._fault(event.holder, state, "a block not asked for", effects)
            return
        state.in_flight.discard(event.id)
        del self._in_flight[event.id]
        length = self.wanted[event.id]
        if len(event.data) != length or block_digest(event.data) != event.id:
            self._bad_blocks += 1
            state.failed_on.add(event.id)
            self._requeue(event.id)
            self._fault(event.holder, state, "a block that does not match its digest", effects)
            return
        self._bytes_done += length
        effects.append(StoreBlock(event.id, event.data))

    def _fault(self, holder: Holder, state: _HolderState, what: str, effects: list[Effect]) -> None:
        state.faults += 1
        effects.append(ReportFault(holder, what, state.faults))
        if state.faults >= self.max_faults:
            self._lose(holder, state)
            effects.append(DropHolder(holder, f"{state.faults} faults"))

    def _lose(self, holder: Holder, state: _HolderState) -> None:
        """Give up on a holder: what it was to send goes back to the others."""
        state.live = False
        state.announcing = False
        orphaned = [*state.in_flight, *(d for d in state.queue if d in self._pending)]
        for digest in state.in_flight:
            del self._in_flight[digest]
        state.in_flight.clear()
        state.queue.clear()
        for digest in orphaned:
            self._requeue(digest)

    def _requeue(self, digest: bytes) -> None:
        """Put a block back in play, first for holders that have not failed on it."""
        self._pending[digest] = None
        having = [h for h in self.holders.values() if h.live and digest in h.has]
        clean = [h for h in having if digest not in h.failed_on]
        for state in clean or having:
            state.queue.appendleft(digest)

    def _assign(self, effects: list[Effect]) -> None:
        self._assign_queued(effects)
        if self._pending and not self._in_flight:
            # Nothing moves: offer every pending block again to each live holder that
            # has it, so a lost queue entry can only ever cost a stall check, not a hang.
            for state in self.holders.values():
                if state.live:
                    state.queue = deque(d for d in self._pending if d in state.has)
            self._assign_queued(effects)

    def _assign_queued(self, effects: list[Effect]) -> None:
        for holder, state in self.holders.items():
            if not state.live:
                continue
            batch: list[bytes] = []
            while state.queue and len(state.in_flight) < self.max_in_flight:
                digest = state.queue.popleft()
                if digest not in self._pending or self._better_elsewhere(digest, state):
                    continue
                del self._pending[digest]
                self._in_flight[digest] = holder
                state.in_flight.add(digest)
                batch.append(digest)
            if batch:
                effects.append(RequestBlocks(holder, tuple(batch)))

    def _better_elsewhere(self, digest: bytes, state: _HolderState) -> bool:
        if digest not in state.failed_on:
            return False
        return any(
            h.live and digest in h.has and digest not in h.failed_on for h in self.holders.values()
        )

    def statistics(self) -> FetchStatistics:
        return FetchStatistics(
            bytes_done=self._bytes_done,
            bytes_total=sum(self.wanted.values()),
            blocks_done=len(self.wanted) - len(self._pending) - len(self._in_flight),
            blocks_total=len(self.wanted),
            bad_blocks=self._bad_blocks,
            faults={holder: state.faults for holder, state in self.holders.items()},
            dropped=tuple(holder for holder, state in self.holders.items() if not state.live),
        )
