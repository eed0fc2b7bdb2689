"""Manifests by digest: MANIFEST_GET / MANIFEST on the wire, the server, fetch_manifest."""

from __future__ import annotations

import random
from collections.abc import Iterable
from pathlib import Path

import msgpack
import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st
from kit.fuzzing import Edit, edit_lists, mutate
from kit.transfer import start_server

from node.base.identity import Identity
from node.base.wire import RemoteProtocolError
from segments.store.blocks import BlockStore, MissingBlock
from segments.store.manifest import (
    MAX_BLOCK_SIZE,
    SIGNING_CONTEXT,
    ZERO,
    BlockRef,
    Manifest,
    block_digest,
    decode_manifest,
    sign_manifest,
)
from segments.store.transfer import (
    EXCHANGE_TIMEOUTS,
    BlockMessage,
    FetchError,
    FrameReader,
    IdsMessage,
    Kind,
    LackMessage,
    ManifestGetMessage,
    ManifestMessage,
    decode_message,
    encode_message,
    fetch_manifest,
)
from segments.store.transfer_core import (
    LENGTH,
    MANIFEST_PREFIX,
    MAX_FRAME_BYTES,
    MAX_MANIFEST_FRAME_BYTES,
    Message,
)

BS = 4096
IDENTITY = Identity.from_seeds(b"\x05" * 32, b"\x06" * 32)
MALLORY = Identity.from_seeds(b"\x07" * 32, b"\x08" * 32)
BIG_BLOCKS = 40_000  # 1.28 MB of digests: over MAX_FRAME_BYTES


def make_manifest(blocks: int, seed: int = 0, identity: Identity = IDENTITY) -> Manifest:
    """A signed manifest of one file of `blocks` made-up blocks (nothing stored)."""
    size = blocks * BS - 100
    refs = [
        BlockRef(i * BS, min(BS, size - i * BS), block_digest(f"{seed}/{i}".encode()))
        for i in range(blocks)
    ]
    return sign_manifest(identity, BS, [("memory.save", size, refs)], created=1 + seed)


SMALL = make_manifest(20)
SMALL_PAYLOAD = encode_message(ManifestMessage(SMALL.encode()))[LENGTH.size :]


class Manifests:
    """A BlockSource twin that holds only manifests, as given: it may lie about them."""

    def __init__(self, by_digest: dict[bytes, bytes]) -> None:
        self.by_digest = by_digest
        self.asked: list[bytes] = []

    def has_many(self, digests: Iterable[bytes]) -> set[bytes]:
        return set()

    def get(self, digest: bytes) -> bytes:
        raise MissingBlock("this twin holds no blocks")

    def manifest_bytes(self, digest: bytes) -> bytes | None:
        self.asked.append(digest)
        return self.by_digest.get(digest)


def holding(*manifests: Manifest) -> Manifests:
    return Manifests({m.digest: m.encode() for m in manifests})


# -- codec ---------------------------------------------------------------------------


def test_manifest_kinds_round_trip_and_their_encoding() -> None:
    digest = SMALL.digest
    get_frame = encode_message(ManifestGetMessage(digest))
    assert get_frame[LENGTH.size :] == msgpack.packb([6, digest], use_bin_type=True)
    assert msgpack.packb([7, SMALL.encode()], use_bin_type=True) == SMALL_PAYLOAD
    assert SMALL_PAYLOAD.startswith(MANIFEST_PREFIX)
    for message in (
        ManifestGetMessage(digest),
        ManifestMessage(SMALL.encode()),
        LackMessage(digest),
    ):
        reader = FrameReader()
        reader.feed(encode_message(message))
        assert decode_message(reader.next_frame() or b"") == message
        assert reader.empty


def test_a_big_manifest_crosses_in_one_frame_that_only_a_receiver_accepts() -> None:
    big = make_manifest(BIG_BLOCKS)
    frame = encode_message(ManifestMessage(big.encode()))
    assert MAX_FRAME_BYTES < len(frame) - LENGTH.size <= MAX_MANIFEST_FRAME_BYTES
    reader = FrameReader()
    for start in range(0, len(frame), 65536):
        assert reader.next_frame() is None
        reader.feed(frame[start : start + 65536])
    message = decode_message(reader.next_frame() or b"")
    assert isinstance(message, ManifestMessage)
    assert decode_manifest(message.encoded) == big
    server_side = FrameReader(MAX_FRAME_BYTES)
    server_side.feed(frame[:64])
    with pytest.raises(RemoteProtocolError, match="out of range"):
        server_side.next_frame()


def test_a_big_frame_of_another_kind_is_refused_before_it_is_buffered() -> None:
    reader = FrameReader()
    reader.feed(LENGTH.pack(MAX_FRAME_BYTES + 1) + b"\x93")
    assert reader.next_frame() is None  # cannot tell yet
    reader.feed(b"\x04")  # [BLOCK, ...
    with pytest.raises(RemoteProtocolError, match="not MANIFEST"):
        reader.next_frame()
    block = msgpack.packb([4, SMALL.digest, bytes(MAX_FRAME_BYTES)], use_bin_type=True)
    with pytest.raises(RemoteProtocolError, match="too big"):
        decode_message(block)  # handed over without a reader: refused all the same
    with pytest.raises(RemoteProtocolError):
        decode_message(MANIFEST_PREFIX + bytes(MAX_MANIFEST_FRAME_BYTES))


def test_block_data_keeps_its_own_limit() -> None:
    too_long = msgpack.packb([4, SMALL.digest, bytes(MAX_BLOCK_SIZE + 1)], use_bin_type=True)
    assert len(too_long) <= MAX_FRAME_BYTES
    with pytest.raises(RemoteProtocolError):
        decode_message(too_long)


def test_encode_refuses_a_manifest_frame_a_peer_would_refuse() -> None:
    with pytest.raises(ValueError, match="MANIFEST"):
        encode_message(ManifestMessage(bytes(MAX_MANIFEST_FRAME_BYTES)))


@pytest.mark.parametrize(
    "body",
    [
        [6],
        [6, b"short"],
        [6, ZERO],
        [6, "x" * 32],
        [6, SMALL.digest, SMALL.digest],
        [6, [SMALL.digest]],
        [7],
        [7, b""],
        [7, 5],
        [7, b"x", b"y"],
        [7, SMALL.digest, SMALL.encode()],
    ],
)
def test_bad_manifest_frames_raise_protocol_error(body: list[object]) -> None:
    with pytest.raises(RemoteProtocolError):
        decode_message(msgpack.packb(body, use_bin_type=True))


def receive(payload: bytes) -> Manifest | None:
    """What a receiver makes of a frame payload: a verified manifest, or None for others."""
    message = decode_message(payload)
    return decode_manifest(message.encoded) if isinstance(message, ManifestMessage) else None


@settings(max_examples=400, deadline=None)
@given(edit_lists(len(SMALL_PAYLOAD), 6))
def test_mutated_manifest_frames_only_raise_protocol_error(edits: list[Edit]) -> None:
    try:
        manifest = receive(mutate(SMALL_PAYLOAD, edits))
    except RemoteProtocolError:
        return
    # Accepted only as a re-encoding: the signed body and signature are the original's.
    assert manifest is None or (manifest.body, manifest.signature) == (SMALL.body, SMALL.signature)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_arbitrary_manifest_frames_only_raise_protocol_error(data: bytes) -> None:
    try:
        receive(MANIFEST_PREFIX + data)
    except RemoteProtocolError:
        pass


def test_every_bit_flip_in_a_manifest_frame_is_refused_or_harmless() -> None:
    refused = 0
    for position in range(len(SMALL_PAYLOAD)):
        for bit in (0x01, 0x80):
            flipped = bytearray(SMALL_PAYLOAD)
            flipped[position] ^= bit
            try:
                manifest = receive(bytes(flipped))
            except RemoteProtocolError:
                refused += 1
                continue
            assert manifest is None or manifest.body == SMALL.body
    assert refused >= 2 * len(SMALL_PAYLOAD) - 8  # all but a few header bits


# -- over loopback -----------------------------------------------------------------------


async def closed_port() -> int:
    (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port: int = listener.socket.getsockname()[1]
    await listener.aclose()  # nothing listens there any more
    return port


async def test_fetch_manifest_from_a_block_store(tmp_path: Path) -> None:
    rng = random.Random(3)
    (tmp_path / "memory.save").write_bytes(rng.randbytes(10 * BS) + bytes(BS))
    producer = BlockStore(tmp_path / "producer", block_size=BS)
    manifest = producer.put_file(tmp_path / "memory.save", IDENTITY, created=1)
    assert producer.manifest_bytes(manifest.digest) == manifest.encode()
    assert producer.manifest_bytes(SMALL.digest) is None
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            scope, port = await start_server(nursery, producer)
            got = await fetch_manifest(manifest.digest, [("127.0.0.1", port)], timeout_s=10)
            with pytest.raises(FetchError, match=f"127.0.0.1:{port} lacks it"):
                await fetch_manifest(SMALL.digest, [("127.0.0.1", port)], timeout_s=10)
            scope.cancel()
    assert got == manifest and got.digest == manifest.digest
    assert producer.statistics().manifests == 1


async def test_a_big_manifest_crosses_loopback() -> None:
    big = make_manifest(BIG_BLOCKS, seed=1)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            scope, port = await start_server(nursery, holding(big))
            got = await fetch_manifest(big.digest, [("127.0.0.1", port)], timeout_s=10)
            scope.cancel()
    assert got == big and len(got.files[0].digests) == BIG_BLOCKS


async def test_a_lying_holder_is_refused_and_the_next_one_used() -> None:
    wanted, other = SMALL, make_manifest(20, seed=9)  # both validly signed by the producer
    liar = Manifests({wanted.digest: other.encode()})
    honest = holding(wanted)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            liar_scope, liar_port = await start_server(nursery, liar)
            honest_scope, honest_port = await start_server(nursery, honest)
            with pytest.raises(FetchError, match="sent another manifest"):
                await fetch_manifest(wanted.digest, [("127.0.0.1", liar_port)], timeout_s=10)
            got = await fetch_manifest(
                wanted.digest, [("127.0.0.1", liar_port), ("127.0.0.1", honest_port)], timeout_s=10
            )
            liar_scope.cancel()
            honest_scope.cancel()
    assert got == wanted
    assert liar.asked == [wanted.digest, wanted.digest] and honest.asked == [wanted.digest]


async def test_a_forged_signature_is_refused_and_the_next_one_used() -> None:
    forged = msgpack.packb(
        [SMALL.body, MALLORY.sign(SIGNING_CONTEXT + SMALL.body)], use_bin_type=True
    )
    forger = Manifests({SMALL.digest: forged})  # the right digest, the wrong signer
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            forger_scope, forger_port = await start_server(nursery, forger)
            honest_scope, honest_port = await start_server(nursery, holding(SMALL))
            with pytest.raises(FetchError, match="failed \\(RemoteProtocolError"):
                await fetch_manifest(SMALL.digest, [("127.0.0.1", forger_port)], timeout_s=10)
            got = await fetch_manifest(
                SMALL.digest, [("127.0.0.1", forger_port), ("127.0.0.1", honest_port)], 10
            )
            forger_scope.cancel()
            honest_scope.cancel()
    assert got == SMALL and forger.asked == [SMALL.digest, SMALL.digest]


async def test_a_holder_that_is_down_is_skipped() -> None:
    down = await closed_port()
    with trio.fail_after(60):
        with pytest.raises(FetchError, match=f"127.0.0.1:{down} failed"):
            await fetch_manifest(SMALL.digest, [("127.0.0.1", down)], timeout_s=10)
        async with trio.open_nursery() as nursery:
            scope, port = await start_server(nursery, holding(SMALL))
            got = await fetch_manifest(
                SMALL.digest, [("127.0.0.1", down), ("127.0.0.1", port)], timeout_s=10
            )
            scope.cancel()
    assert got == SMALL


async def test_no_holders_and_a_bad_digest() -> None:
    with pytest.raises(FetchError, match="no holders given"):
        await fetch_manifest(SMALL.digest, [])
    with pytest.raises(ValueError):
        await fetch_manifest(SMALL.digest[:16], [("127.0.0.1", 9)])


async def test_a_manifest_too_big_for_a_frame_is_answered_with_lack() -> None:
    source = Manifests({SMALL.digest: bytes(MAX_MANIFEST_FRAME_BYTES)})
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            scope, port = await start_server(nursery, source)
            with pytest.raises(FetchError, match="lacks it"):
                await fetch_manifest(SMALL.digest, [("127.0.0.1", port)], timeout_s=10)
            scope.cancel()
    assert source.asked == [SMALL.digest]


async def test_one_connection_carries_manifest_and_block_requests() -> None:
    unknown = make_manifest(1, seed=5).digest
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            scope, port = await start_server(nursery, holding(SMALL))
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(
                encode_message(ManifestGetMessage(SMALL.digest))
                + encode_message(ManifestGetMessage(unknown))
                + encode_message(IdsMessage(Kind.QUERY, (unknown,)))
            )
            reader, replies = FrameReader(), list[Message]()
            while len(replies) < 3:
                reader.feed(await stream.receive_some(65536))
                while (payload := reader.next_frame()) is not None:
                    replies.append(decode_message(payload))
            # A client may not send MANIFEST, least of all a big one: the server hangs up.
            await stream.send_all(LENGTH.pack(MAX_FRAME_BYTES + 1) + MANIFEST_PREFIX)
            assert await stream.receive_some(100) == b""
            await stream.aclose()
            scope.cancel()
    assert replies == [
        ManifestMessage(SMALL.encode()),
        LackMessage(unknown),
        IdsMessage(Kind.HAVE, ()),
    ]


# -- bounded waits, on a virtual clock -------------------------------------------------------


class ScriptedHolders:
    """A `connect` twin: each port's holder answers with fixed bytes, or stays silent."""

    def __init__(self, scripts: dict[int, bytes | None]) -> None:
        self.scripts = scripts
        self.connected: list[int] = []
        self.peers: list[trio.abc.Stream] = []  # kept open, so a silent holder stays silent

    async def connect(self, host: str, port: int) -> trio.abc.Stream:
        assert host == "127.0.0.1"
        self.connected.append(port)
        client, server = trio.testing.memory_stream_pair()
        self.peers.append(server)
        script = self.scripts[port]
        if script is not None:
            await server.send_all(script)
            await server.send_eof()  # then hang up
        return client


async def test_silent_closing_and_confused_holders_are_passed_over(
    autojump_clock: trio.testing.MockClock,
) -> None:
    holders = ScriptedHolders(
        {
            1: None,  # accepts, never answers
            2: b"",  # hangs up at once
            3: encode_message(BlockMessage(SMALL.digest, b"data")),  # answers another kind
            4: encode_message(LackMessage(make_manifest(1, seed=5).digest)),  # lacks another
            5: encode_message(ManifestMessage(SMALL.encode())),
        }
    )
    got = await fetch_manifest(
        SMALL.digest, [("127.0.0.1", port) for port in range(1, 6)], 7.0, connect=holders.connect
    )
    assert got == SMALL and holders.connected == [1, 2, 3, 4, 5]


async def test_every_wait_is_bounded(autojump_clock: trio.testing.MockClock) -> None:
    timeout_s = 7.0
    holders = ScriptedHolders({1: None, 2: b"", 3: encode_message(BlockMessage(SMALL.digest, b""))})
    start = trio.current_time()
    with trio.fail_after(10_000), pytest.raises(FetchError) as caught:  # virtual seconds
        await fetch_manifest(
            SMALL.digest, [("127.0.0.1", p) for p in (1, 2, 3)], timeout_s, connect=holders.connect
        )
    assert trio.current_time() - start == pytest.approx(timeout_s)  # only the silent one waits
    message = str(caught.value)
    assert "127.0.0.1:1 failed (TooSlowError" in message
    assert "127.0.0.1:2 failed (RemoteProtocolError: the holder closed" in message
    assert "127.0.0.1:3 failed (RemoteProtocolError: answered with BlockMessage" in message


async def test_a_trickling_holder_is_cut_off(autojump_clock: trio.testing.MockClock) -> None:
    timeout_s = 7.0
    client, server = trio.testing.memory_stream_pair()

    async def trickle() -> None:
        await server.send_all(LENGTH.pack(MAX_FRAME_BYTES + 1) + MANIFEST_PREFIX)
        while True:  # one byte just inside every receive timeout, never a whole frame
            await trio.sleep(timeout_s * 0.9)
            await server.send_all(b"\x00")

    async def connect(host: str, port: int) -> trio.abc.Stream:
        return client

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trickle)
        with trio.fail_after(10_000), pytest.raises(FetchError, match="TooSlowError"):
            await fetch_manifest(SMALL.digest, [("127.0.0.1", 1)], timeout_s, connect=connect)
        nursery.cancel_scope.cancel()
    assert trio.current_time() - start == pytest.approx(EXCHANGE_TIMEOUTS * timeout_s)
