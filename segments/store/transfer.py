"""Block transfer over TCP: a block server and a fetch from several holders at once.

The receiver records the (verified) manifest in its store first, so the blocks
it fetches are referenced at once and survive a break. What it *wants* is the
manifest's non-zero blocks that its store lacks; a resume computes that again
from the store, so verified blocks are never fetched twice.

The protocol and the receiver's logic are sans-IO in ``segments.store.transfer_core``
(re-exported here). This module carries them out with trio:

- ``serve_blocks(store, listener)`` answers QUERY, GET and MANIFEST_GET on
  every connection from any ``BlockSource`` (a ``BlockStore``; a corrupt block
  there is answered with LACK, never sent, and so is a manifest it lacks or one
  too big for a frame). A connection that breaks the protocol or idles is
  closed; one whose handling fails is logged and closed. Nothing a peer does
  ends the server: at most ``MAX_CONNECTIONS`` are open, and
  ``MAX_CONNECTIONS_PER_PEER`` from one address (more are closed at once),
  and running out of descriptors pauses accepting instead of raising.
- ``fetch(manifest, holders, store, progress)`` connects only to the
  ``(host, port)`` pairs it is given, one task and one connection per holder.
  Queries go one at a time (1024 ids each), so replies never pile up behind
  unread requests; GETs are pipelined up to the core's in-flight bound. Every
  network wait is bounded by ``trio.fail_after``; any fault of a holder (bad
  frame, timeout, reset, EOF) becomes ``HolderLost`` for the core. Verified
  blocks go through a bounded queue to one writer task that stores them in
  batches (one directory sync and one index commit per batch: per-block
  commits made a 54 MB fetch 1.4 times slower), then calls
  ``progress(done, total)`` in bytes of wanted blocks. The queue is drained
  before ``fetch`` returns, even when it fails; only a crash of the process
  loses verified blocks not yet written, and those are simply fetched again.
- A GET is answered 16 blocks at a time, so a request for many large blocks
  cannot make a server hold them all in memory.
- ``fetch_manifest(digest, holders)`` gets the manifest a node knows only by
  its digest, for the caller to check and record (it stores nothing). It asks
  the holders one after another, one connection each; a holder that fails
  (unreachable, bad frame, timeout, LACK, a forged manifest or another one than
  asked for) is passed over for the next, and FetchError says what each did.
  Each network wait is bounded by ``timeout_s`` and one holder's whole exchange
  by ``EXCHANGE_TIMEOUTS * timeout_s``, so a holder that trickles bytes cannot
  hold the fetch up for long.

Blocks need no sender authentication: they are named by their hash, and the
manifest that names them is signed by its producer. A manifest needs none
either: it is named by the hash of its body and carries its producer's
signature, both checked before ``fetch_manifest`` returns it.
"""

from __future__ import annotations

import errno
import logging
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Protocol, assert_never

import trio

from node.base.wire import RemoteProtocolError
from segments.store.blocks import BlockStore, BlockStoreError
from segments.store.manifest import DIGEST_BYTES, Manifest, decode_manifest
from segments.store.transfer_core import (
    DEFAULT_IN_FLIGHT,
    DEFAULT_MAX_FAULTS,
    MAX_FRAME_BYTES,
    MAX_IDS,
    BlockArrived,
    BlockLacked,
    BlockMessage,
    DropHolder,
    Effect,
    Event,
    FetchCore,
    FetchStatistics,
    FrameReader,
    HaveAnnounced,
    Holder,
    HolderJoined,
    HolderLost,
    IdsMessage,
    Kind,
    LackMessage,
    ManifestGetMessage,
    ManifestMessage,
    Message,
    ReportFault,
    RequestBlocks,
    StoreBlock,
    decode_message,
    encode_message,
)

__all__ = [
    "BlockArrived",
    "BlockLacked",
    "BlockMessage",
    "BlockSource",
    "DropHolder",
    "Event",
    "FetchCore",
    "FetchError",
    "FetchStatistics",
    "FrameReader",
    "HaveAnnounced",
    "HolderJoined",
    "HolderLost",
    "IdsMessage",
    "Kind",
    "LackMessage",
    "ManifestGetMessage",
    "ManifestMessage",
    "RequestBlocks",
    "StoreBlock",
    "decode_message",
    "encode_message",
    "fetch",
    "fetch_manifest",
    "serve_blocks",
]

log = logging.getLogger("gleaner.transfer")

TIMEOUT_S = 30.0
MAX_CONNECTIONS = 256  # a block server's open connections, in all
MAX_CONNECTIONS_PER_PEER = 32  # ... and from one address (a fetch uses one per holder)
ACCEPT_PAUSE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
ACCEPT_PAUSE_S = 0.1
RECEIVE_BYTES = 256 * 1024
WRITE_QUEUE = 64
SERVE_BATCH = 16
WRITE_BATCH = 256
SEND_CHUNK = 256 * 1024
EXCHANGE_TIMEOUTS = 4  # one holder's manifest exchange: at most this many timeouts


class BlockSource(Protocol):
    """What a block server needs from a store (``BlockStore`` is one)."""

    def has_many(self, digests: Iterable[bytes]) -> set[bytes]: ...

    def get(self, digest: bytes) -> bytes: ...

    def manifest_bytes(self, digest: bytes) -> bytes | None: ...


class FetchError(Exception):
    """A fetch could not finish: blocks or a manifest on no reachable, honest holder."""


Progress = Callable[[int, int], None]
Connect = Callable[[str, int], Awaitable[trio.abc.Stream]]


async def serve_blocks(
    store: BlockSource,
    listener: trio.abc.Listener[trio.abc.Stream],
    *,
    timeout_s: float = TIMEOUT_S,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Answer QUERY, GET and MANIFEST_GET from `store` on every connection `listener` accepts."""

    open_by_peer: Counter[str] = Counter()

    async def handle(stream: trio.abc.Stream, peer: str) -> None:
        async with stream:
            try:
                await _serve_connection(store, stream, timeout_s)
            except (
                RemoteProtocolError,
                trio.TooSlowError,
                trio.BrokenResourceError,
                trio.ClosedResourceError,
            ) as exc:
                log.info("block server: dropped a connection: %s", exc)
            except Exception:  # a bug a peer's request found: that connection only
                log.exception("block server: a connection from %s failed", peer)
            finally:
                open_by_peer[peer] -= 1
                if open_by_peer[peer] <= 0:
                    del open_by_peer[peer]

    async with trio.open_nursery() as nursery:
        task_status.started()
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:  # out of descriptors or memory: wait, never end the agent
                if exc.errno in ACCEPT_PAUSE_ERRNOS:
                    log.warning("block server: accept: %s; pausing", exc)
                    await trio.sleep(ACCEPT_PAUSE_S)
                continue
            peer = _peer_of(stream)
            if open_by_peer[peer] >= MAX_CONNECTIONS_PER_PEER or (
                sum(open_by_peer.values()) >= MAX_CONNECTIONS
            ):
                log.info("block server: refused a connection from %s (connection caps)", peer)
                await stream.aclose()
                continue
            open_by_peer[peer] += 1
            nursery.start_soon(handle, stream, peer)


def _peer_of(stream: trio.abc.Stream) -> str:
    try:
        return str(stream.socket.getpeername()[0])  # type: ignore[attr-defined]
    except (AttributeError, OSError, IndexError):
        return "?"


async def _serve_connection(store: BlockSource, stream: trio.abc.Stream, timeout_s: float) -> None:
    reader = FrameReader(MAX_FRAME_BYTES)  # a server never receives MANIFEST
    while True:
        payload = await _receive_frame(stream, reader, timeout_s, idle_ok=True)
        if payload is None:
            return
        message = decode_message(payload)
        if isinstance(message, ManifestGetMessage):
            reply = await trio.to_thread.run_sync(_manifest_reply, store, message.digest)
            for start in range(0, len(reply), SEND_CHUNK):  # a slow reader must keep reading
                with trio.fail_after(timeout_s):
                    await stream.send_all(reply[start : start + SEND_CHUNK])
            continue
        if not isinstance(message, IdsMessage) or message.kind == Kind.HAVE:
            raise RemoteProtocolError(f"a block server got {type(message).__name__}")
        if message.kind == Kind.QUERY:
            present = await trio.to_thread.run_sync(store.has_many, message.ids)
            have = IdsMessage(Kind.HAVE, tuple(i for i in message.ids if i in present))
            with trio.fail_after(timeout_s):
                await stream.send_all(encode_message(have))
            continue
        for start in range(0, len(message.ids), SERVE_BATCH):  # bounded memory per GET
            ids = message.ids[start : start + SERVE_BATCH]
            replies = await trio.to_thread.run_sync(_read_blocks, store, ids)
            with trio.fail_after(timeout_s):
                await stream.send_all(b"".join(encode_message(reply) for reply in replies))


def _read_blocks(store: BlockSource, ids: tuple[bytes, ...]) -> list[Message]:
    """BLOCK for each block the store has and verifies, LACK for the others."""
    replies: list[Message] = []
    for digest in ids:
        try:
            replies.append(BlockMessage(digest, store.get(digest)))
        except BlockStoreError:
            replies.append(LackMessage(digest))
    return replies


def _manifest_reply(store: BlockSource, digest: bytes) -> bytes:
    """The MANIFEST frame for a stored manifest, or LACK if there is none to send."""
    encoded = store.manifest_bytes(digest)
    if encoded is not None:
        try:
            return encode_message(ManifestMessage(encoded))
        except ValueError as exc:
            log.warning("block server: manifest %s cannot be sent: %s", digest.hex()[:16], exc)
    return encode_message(LackMessage(digest))


async def _receive_frame(
    stream: trio.abc.Stream, reader: FrameReader, timeout_s: float, *, idle_ok: bool = False
) -> bytes | None:
    """The next frame payload; None at a clean end of stream."""
    while (payload := reader.next_frame()) is None:
        with trio.fail_after(timeout_s * (4 if idle_ok and reader.empty else 1)):
            data = await stream.receive_some(RECEIVE_BYTES)
        if not data:
            if reader.empty:
                return None
            raise RemoteProtocolError("stream ended inside a frame")
        reader.feed(data)
    return payload


async def fetch(
    manifest: Manifest,
    holders: Sequence[tuple[str, int]],
    store: BlockStore,
    progress: Progress | None = None,
    *,
    max_in_flight: int = DEFAULT_IN_FLIGHT,
    max_faults: int = DEFAULT_MAX_FAULTS,
    timeout_s: float = TIMEOUT_S,
    connect: Connect = trio.open_tcp_stream,
) -> FetchStatistics:
    """Fetch the blocks of `manifest` that `store` lacks from `holders`, verified.

    Connects only to the given (host, port) pairs. Calls ``progress(done, total)``
    in bytes of blocks fetched. Raises FetchError if some block could not be had.
    """
    await trio.to_thread.run_sync(store.add_manifest, manifest)
    wanted = await trio.to_thread.run_sync(store.missing, manifest)
    core = FetchCore(wanted, max_in_flight=max_in_flight, max_faults=max_faults)
    fetcher = _Fetcher(core, store, progress, timeout_s, connect)
    if not core.done:
        await fetcher.run(list(dict.fromkeys(holders)))
    missing = await trio.to_thread.run_sync(store.missing, manifest)
    if missing:
        stats = core.statistics()
        raise FetchError(
            f"{len(missing)} blocks of manifest {manifest.digest.hex()[:16]} are on no "
            f"reachable, honest holder (faults: {stats.faults})"
        )
    return core.statistics()


async def fetch_manifest(
    digest: bytes,
    holders: Sequence[tuple[str, int]],
    timeout_s: float = TIMEOUT_S,
    *,
    connect: Connect = trio.open_tcp_stream,
) -> Manifest:
    """The manifest named `digest`, from the first of `holders` that sends it, verified.

    Connects only to the given (host, port) pairs, one after another. The manifest's
    signature and digest are checked; nothing is stored. Raises FetchError, saying what
    each holder did, if none sent it.
    """
    if len(digest) != DIGEST_BYTES:
        raise ValueError(f"a manifest digest is {DIGEST_BYTES} bytes, got {len(digest)}")
    outcomes: list[str] = []
    for host, port in dict.fromkeys(holders):
        holder = f"{host}:{port}"
        try:
            with trio.fail_after(timeout_s * EXCHANGE_TIMEOUTS):
                message = await _ask_for_manifest(digest, host, port, timeout_s, connect)
            if isinstance(message, LackMessage) and message.id == digest:
                outcomes.append(f"{holder} lacks it")
                continue
            if not isinstance(message, ManifestMessage):
                raise RemoteProtocolError(f"answered with {type(message).__name__}")
            manifest = await trio.to_thread.run_sync(decode_manifest, message.encoded)
        except (
            OSError,
            trio.TooSlowError,
            trio.BrokenResourceError,
            trio.ClosedResourceError,
            RemoteProtocolError,
        ) as exc:
            log.info("holder %s: no manifest %s: %r", holder, digest.hex()[:16], exc)
            outcomes.append(f"{holder} failed ({type(exc).__name__}: {exc})")
            continue
        if manifest.digest != digest:
            log.warning("holder %s sent manifest %s for another", holder, manifest.digest.hex())
            outcomes.append(f"{holder} sent another manifest ({manifest.digest.hex()[:16]})")
            continue
        return manifest
    raise FetchError(
        f"manifest {digest.hex()[:16]} from none of {len(outcomes)} holders: "
        + ("; ".join(outcomes) or "no holders given")
    )


async def _ask_for_manifest(
    digest: bytes, host: str, port: int, timeout_s: float, connect: Connect
) -> Message:
    """One holder's answer to MANIFEST_GET, on a connection of its own."""
    with trio.fail_after(timeout_s):
        stream = await connect(host, port)
    async with stream:
        with trio.fail_after(timeout_s):
            await stream.send_all(encode_message(ManifestGetMessage(digest)))
        payload = await _receive_frame(stream, FrameReader(), timeout_s)
    if payload is None:
        raise RemoteProtocolError("the holder closed the connection")
    return decode_message(payload)


class _Fetcher:
    """Carries out a FetchCore's effects: one task and one TCP connection per holder."""

    def __init__(
        self,
        core: FetchCore,
        store: BlockStore,
        progress: Progress | None,
        timeout_s: float,
        connect: Connect,
    ) -> None:
        self.core = core
        self.store = store
        self.progress = progress
        self.timeout_s = timeout_s
        self.connect = connect
        self.outbox: dict[Holder, list[bytes]] = {}
        self.wake: dict[Holder, trio.Event] = {}
        self.scopes: dict[Holder, trio.CancelScope] = {}
        self.finished = trio.Event()
        self.total = sum(core.wanted.values())
        self.stored = 0
        self.verified, self._to_write = trio.open_memory_channel[StoreBlock](WRITE_QUEUE)

    async def run(self, holders: list[tuple[str, int]]) -> None:
        async with trio.open_nursery() as writer:
            writer.start_soon(self._writer)
            async with self.verified, trio.open_nursery() as sessions:
                for host, port in holders:
                    holder = f"{host}:{port}"
                    self.scopes[holder] = trio.CancelScope()
                    self.wake[holder] = trio.Event()
                    self.core.handle(HolderJoined(holder))
                    sessions.start_soon(self._session, holder, host, port)
                self._check()
                await self.finished.wait()
                sessions.cancel_scope.cancel()
            # The channel is closed: the writer drains what was verified, then ends.

    async def _writer(self) -> None:
        """Store verified blocks in batches: one directory sync and one commit per batch."""
        async with self._to_write:
            async for first in self._to_write:
                batch = [first]
                while len(batch) < WRITE_BATCH:
                    try:
                        batch.append(self._to_write.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                datas, ids = [b.data for b in batch], [b.id for b in batch]
                await trio.to_thread.run_sync(self.store.put_many, datas, ids)
                self.stored += sum(len(data) for data in datas)
                if self.progress is not None:
                    self.progress(self.stored, self.total)

    def _check(self) -> None:
        if self.core.done or self.core.stalled:
            self.finished.set()

    async def _apply(self, effects: list[Effect]) -> None:
        for effect in effects:
            match effect:
                case RequestBlocks():
                    self.outbox.setdefault(effect.holder, []).extend(effect.ids)
                    self.wake[effect.holder].set()
                case DropHolder():
                    log.warning("dropping holder %s: %s", effect.holder, effect.reason)
                    self.scopes[effect.holder].cancel()
                case ReportFault():
                    log.info(
                        "holder %s sent %s (fault %d)", effect.holder, effect.what, effect.faults
                    )
                case StoreBlock():
                    with trio.CancelScope(shield=True):  # verified bytes are never dropped
                        await self.verified.send(effect)
                case _:
                    assert_never(effect)
        self._check()

    async def _session(self, holder: Holder, host: str, port: int) -> None:
        with self.scopes[holder]:
            try:
                with trio.fail_after(self.timeout_s):
                    stream = await self.connect(host, port)
                async with stream:
                    await self._converse(holder, stream)
            except (
                OSError,
                trio.TooSlowError,
                trio.BrokenResourceError,
                trio.ClosedResourceError,
                RemoteProtocolError,
            ) as exc:
                log.info("holder %s lost: %s", holder, exc)
                await self._apply(self.core.handle(HolderLost(holder, str(exc))))

    async def _converse(self, holder: Holder, stream: trio.abc.Stream) -> None:
        reader = FrameReader()
        ids = list(self.core.wanted)
        queries = deque(tuple(ids[i : i + MAX_IDS]) for i in range(0, len(ids), MAX_IDS))
        query_out = False
        while True:
            frames = []
            if queries and not query_out:  # one query at a time: replies never pile up
                frames.append(encode_message(IdsMessage(Kind.QUERY, queries.popleft())))
                query_out = True
            wanted = self.outbox.pop(holder, [])
            for start in range(0, len(wanted), MAX_IDS):
                batch = tuple(wanted[start : start + MAX_IDS])
                frames.append(encode_message(IdsMessage(Kind.GET, batch)))
            if frames:
                with trio.fail_after(self.timeout_s):
                    await stream.send_all(b"".join(frames))
            if not query_out and self.core.in_flight(holder) == 0:
                self.wake[holder] = trio.Event()
                await self.wake[holder].wait()  # for work, not for the network
                continue
            payload = await _receive_frame(stream, reader, self.timeout_s)
            if payload is None:
                raise RemoteProtocolError("the holder closed the connection")
            message = decode_message(payload)
            event: Event
            if isinstance(message, IdsMessage) and message.kind == Kind.HAVE and query_out:
                query_out = False
                event = HaveAnnounced(holder, message.ids, final=not queries)
            elif isinstance(message, BlockMessage):
                event = BlockArrived(holder, message.id, message.data)
            elif isinstance(message, LackMessage):
                event = BlockLacked(holder, message.id)
            else:
                raise RemoteProtocolError(f"a holder sent an unexpected {message}")
            await self._apply(self.core.handle(event))
