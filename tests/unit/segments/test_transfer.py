"""Block transfer: the wire codec, the sans-IO fetch core, and real fetches on loopback."""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from kit.import_graph import imported_roots
from kit.paths import REPO_ROOT
from kit.transfer import start_server

from node.base.identity import Identity
from node.base.wire import RemoteProtocolError
from segments.store.blocks import BlockStore
from segments.store.manifest import block_digest
from segments.store.transfer import (
    MAX_CONNECTIONS_PER_PEER,
    BlockArrived,
    BlockLacked,
    BlockMessage,
    DropHolder,
    Event,
    FetchCore,
    FetchError,
    FrameReader,
    HaveAnnounced,
    HolderJoined,
    HolderLost,
    IdsMessage,
    Kind,
    LackMessage,
    ReportFault,
    RequestBlocks,
    StoreBlock,
    decode_message,
    encode_message,
    fetch,
)

BS = 4096
IDENTITY = Identity.from_seeds(b"\x05" * 32, b"\x06" * 32)


# -- codec ---------------------------------------------------------------------------


def test_messages_round_trip() -> None:
    ids = tuple(block_digest(bytes([i])) for i in range(3))
    for message in (
        IdsMessage(Kind.QUERY, ids),
        IdsMessage(Kind.HAVE, ()),
        IdsMessage(Kind.GET, ids[:1]),
        BlockMessage(ids[0], b"data"),
        LackMessage(ids[1]),
    ):
        reader = FrameReader()
        frame = encode_message(message)
        reader.feed(frame[:3])
        assert reader.next_frame() is None
        reader.feed(frame[3:] + frame)
        assert decode_message(reader.next_frame() or b"") == message
        assert decode_message(reader.next_frame() or b"") == message
        assert reader.next_frame() is None and reader.empty


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\xc1",
        b"\x90",
        b"\x91\x09",
        b"\x92\x04\xc4\x01x",
        b"\x92\x01\xa3abc",
        b"\x93\x05\x01\x02",
    ],
)
def test_bad_payloads_raise_protocol_error(payload: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        decode_message(payload)


def test_oversized_frame_length_is_refused() -> None:
    reader = FrameReader()
    reader.feed(b"\xff\xff\xff\xff")
    with pytest.raises(RemoteProtocolError):
        reader.next_frame()


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=512))
def test_arbitrary_bytes_as_payload_only_raise_protocol_error(data: bytes) -> None:
    try:
        decode_message(data)
    except RemoteProtocolError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=8))
def test_arbitrary_stream_only_yields_frames_or_protocol_error(chunks: list[bytes]) -> None:
    reader = FrameReader()
    try:
        for chunk in chunks:
            reader.feed(chunk)
            while (payload := reader.next_frame()) is not None:
                decode_message(payload)
    except RemoteProtocolError:
        pass


# -- core ------------------------------------------------------------------------------


def make_blocks(count: int, seed: int = 0) -> dict[bytes, bytes]:
    rng = random.Random(seed)
    datas = [rng.randbytes(BS) for _ in range(count)]
    return {block_digest(data): data for data in datas}


Reply = Callable[[str, bytes], Event | None]


class Swarm:
    """Drives a FetchCore by hand: each holder answers its requests, one per round."""

    def __init__(self, core: FetchCore, blocks: dict[bytes, bytes]) -> None:
        self.core = core
        self.blocks = blocks
        self.queues: dict[str, deque[bytes]] = {}
        self.requests: list[tuple[str, bytes]] = []
        self.stored: dict[bytes, bytes] = {}
        self.dropped: list[str] = []

    def feed(self, event: Event) -> None:
        for effect in self.core.handle(event):
            if isinstance(effect, RequestBlocks):
                self.queues.setdefault(effect.holder, deque()).extend(effect.ids)
                self.requests.extend((effect.holder, digest) for digest in effect.ids)
            elif isinstance(effect, StoreBlock):
                assert effect.id not in self.stored, "a verified block was fetched twice"
                assert block_digest(effect.data) == effect.id
                self.stored[effect.id] = effect.data
            elif isinstance(effect, DropHolder):
                self.dropped.append(effect.holder)
        for holder, state in self.core.holders.items():
            assert len(state.in_flight) <= self.core.max_in_flight
            assert not state.in_flight or state.live, holder

    def join(self, holder: str, has: list[bytes] | None = None) -> None:
        self.feed(HolderJoined(holder))
        self.feed(HaveAnnounced(holder, tuple(self.blocks if has is None else has)))

    def honest(self, holder: str, digest: bytes) -> Event:
        return BlockArrived(holder, digest, self.blocks[digest])

    def run(self, replies: dict[str, Reply], max_rounds: int = 10_000) -> None:
        for _ in range(max_rounds):
            if self.core.done or self.core.stalled:
                return
            moved = False
            for holder, reply in replies.items():
                queue = self.queues.get(holder)
                if queue:
                    moved = True
                    event = reply(holder, queue.popleft())
                    if event is not None:
                        self.feed(event)
            if not moved:
                return


def test_several_holders_share_the_work() -> None:
    blocks = make_blocks(40)
    swarm = Swarm(FetchCore({d: BS for d in blocks}, max_in_flight=4), blocks)
    for holder in ("a", "b", "c"):
        swarm.join(holder)
    swarm.run({h: swarm.honest for h in "abc"})
    assert swarm.core.done and swarm.stored == blocks
    served = {h: sum(1 for holder, _ in swarm.requests if holder == h) for h in "abc"}
    assert all(count >= 10 for count in served.values()), served
    assert len(swarm.requests) == 40
    stats = swarm.core.statistics()
    assert (stats.bytes_done, stats.bytes_total, stats.blocks_done) == (40 * BS, 40 * BS, 40)


def test_a_corrupt_block_is_fetched_again_from_another_holder() -> None:
    blocks = make_blocks(20)
    victim = next(iter(blocks))
    swarm = Swarm(FetchCore({d: BS for d in blocks}), blocks)
    swarm.join("liar")
    swarm.join("good")

    def liar(holder: str, digest: bytes) -> Event:
        data = blocks[digest]
        if digest == victim:
            data = bytes([data[0] ^ 1]) + data[1:]
        return BlockArrived(holder, digest, data)

    swarm.run({"liar": liar, "good": swarm.honest})
    assert swarm.core.done and swarm.stored == blocks
    assert ("liar", victim) in swarm.requests and ("good", victim) in swarm.requests
    stats = swarm.core.statistics()
    assert stats.faults == {"liar": 1, "good": 0} and stats.bad_blocks == 1
    assert stats.dropped == ()


def test_a_holder_is_dropped_after_too_many_faults() -> None:
    blocks = make_blocks(20)
    swarm = Swarm(FetchCore({d: BS for d in blocks}, max_faults=3), blocks)
    swarm.join("liar")
    swarm.join("good")
    swarm.run({"liar": lambda h, d: BlockArrived(h, d, b"garbage"), "good": swarm.honest})
    assert swarm.core.done and swarm.stored == blocks
    assert swarm.dropped == ["liar"]
    stats = swarm.core.statistics()
    assert stats.dropped == ("liar",) and stats.faults["liar"] == 3 and stats.bad_blocks == 3


def test_the_only_holder_is_retried_after_a_transient_bad_block() -> None:
    blocks = make_blocks(5)
    flipped: set[bytes] = set()
    swarm = Swarm(FetchCore({d: BS for d in blocks}), blocks)
    swarm.join("flaky")

    def flaky(holder: str, digest: bytes) -> Event:
        if not flipped:
            flipped.add(digest)
            return BlockArrived(holder, digest, b"\x00" + blocks[digest][1:])
        return swarm.honest(holder, digest)

    swarm.run({"flaky": flaky})
    assert swarm.core.done and swarm.stored == blocks
    assert swarm.core.statistics().faults == {"flaky": 1}


def test_a_lost_holder_s_requests_go_to_the_others_without_refetching() -> None:
    blocks = make_blocks(30)
    swarm = Swarm(FetchCore({d: BS for d in blocks}, max_in_flight=4), blocks)
    swarm.join("doomed")
    swarm.join("steady")
    served = 0

    def doomed(holder: str, digest: bytes) -> Event:
        nonlocal served
        served += 1
        return swarm.honest(holder, digest) if served <= 5 else HolderLost(holder, "reset")

    swarm.run({"doomed": doomed, "steady": swarm.honest})
    assert swarm.core.done and swarm.stored == blocks
    from_doomed = {d for h, d in swarm.requests if h == "doomed"}
    from_steady = [d for h, d in swarm.requests if h == "steady"]
    verified_from_doomed = from_doomed - set(from_steady)
    assert len(verified_from_doomed) == 5  # the five served blocks were never asked again
    assert len(from_steady) == len(set(from_steady)) == 25
    assert swarm.core.in_flight("doomed") == 0
    swarm.feed(BlockArrived("doomed", from_steady[0], blocks[from_steady[0]]))  # late: ignored


def test_lack_sends_the_block_to_another_holder() -> None:
    blocks = make_blocks(6)
    swarm = Swarm(FetchCore({d: BS for d in blocks}), blocks)
    swarm.join("forgetful")
    swarm.join("good")
    swarm.run({"forgetful": lambda h, d: BlockLacked(h, d), "good": swarm.honest})
    assert swarm.core.done and swarm.stored == blocks
    assert swarm.core.statistics().faults["forgetful"] == 0


def test_unsolicited_blocks_count_as_faults() -> None:
    blocks = make_blocks(3)
    digest = next(iter(blocks))
    core = FetchCore({d: BS for d in blocks}, max_faults=2)
    core.handle(HolderJoined("pushy"))
    core.handle(HaveAnnounced("pushy", ()))
    assert core.handle(BlockArrived("pushy", digest, blocks[digest])) == [
        ReportFault("pushy", "a block not asked for", 1)
    ]
    assert core.handle(BlockLacked("pushy", digest)) == [
        ReportFault("pushy", "LACK for a block not asked for", 2),
        DropHolder("pushy", "2 faults"),
    ]
    assert core.stalled and not core.done


def test_stalled_when_no_holder_has_a_block() -> None:
    blocks = make_blocks(4)
    digests = list(blocks)
    swarm = Swarm(FetchCore({d: BS for d in blocks}), blocks)
    swarm.feed(HolderJoined("partial"))
    assert not swarm.core.stalled  # still answering queries
    swarm.feed(HaveAnnounced("partial", tuple(digests[:3])))
    swarm.run({"partial": swarm.honest})
    assert swarm.core.stalled and not swarm.core.done
    assert set(swarm.stored) == set(digests[:3])


def test_resume_after_a_break_never_refetches_verified_blocks() -> None:
    blocks = make_blocks(24)
    first = Swarm(FetchCore({d: BS for d in blocks}, max_in_flight=2), blocks)
    first.join("a")
    count = 0

    def breaks(holder: str, digest: bytes) -> Event:
        nonlocal count
        count += 1
        return first.honest(holder, digest) if count <= 10 else HolderLost(holder, "break")

    first.run({"a": breaks})
    assert first.core.stalled and len(first.stored) == 10
    # After the break the receiver computes what it wants from its store again.
    wanted = {d: BS for d in blocks if d not in first.stored}
    second = Swarm(FetchCore(wanted), blocks)
    second.join("b")
    second.run({"b": second.honest})
    assert second.core.done
    assert not {d for _, d in second.requests} & set(first.stored)
    assert {**first.stored, **second.stored} == blocks


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    liars=st.integers(0, 3),
    quitters=st.integers(0, 3),
    in_flight=st.integers(1, 6),
    flaky=st.booleans(),
)
def test_one_honest_holder_is_enough(
    seed: int, liars: int, quitters: int, in_flight: int, flaky: bool
) -> None:
    """One holder that stays and (eventually) sends good copies finishes any fetch."""
    rng = random.Random(seed)
    blocks = make_blocks(25, seed)
    core = FetchCore({d: BS for d in blocks}, max_in_flight=in_flight, max_faults=1000)
    swarm = Swarm(core, blocks)
    flipped: set[bytes] = set()

    def honest(holder: str, digest: bytes) -> Event:
        if flaky and digest not in flipped and rng.random() < 0.3:
            flipped.add(digest)  # a transient bit flip on the first copy
            return BlockArrived(holder, digest, b"\xff" + blocks[digest][1:])
        return swarm.honest(holder, digest)

    replies: dict[str, Reply] = {"honest": honest}
    for i in range(liars):
        replies[f"liar{i}"] = lambda h, d: (
            BlockArrived(h, d, rng.randbytes(rng.choice([1, BS])))
            if rng.random() < 0.5
            else HolderLost(h, "gone")
        )
    for i in range(quitters):
        replies[f"quitter{i}"] = lambda h, d: (
            HolderLost(h, "gone") if rng.random() < 0.2 else swarm.honest(h, d)
        )
    for holder in sorted(replies, key=lambda _: rng.random()):
        swarm.join(holder)
    swarm.run(replies)
    assert swarm.core.done and swarm.stored == blocks


# -- over loopback -----------------------------------------------------------------------


class CorruptFirst:
    """A block source that flips a byte of the first block it serves."""

    def __init__(self, store: BlockStore) -> None:
        self.store = store
        self.corrupted: bytes | None = None

    def has_many(self, digests: Iterable[bytes]) -> set[bytes]:
        return self.store.has_many(digests)

    def get(self, digest: bytes) -> bytes:
        data = self.store.get(digest)
        if self.corrupted is None:
            self.corrupted = digest
            return bytes([data[0] ^ 0xFF]) + data[1:]
        return data

    def manifest_bytes(self, digest: bytes) -> bytes | None:
        return self.store.manifest_bytes(digest)


class DiesAfter:
    """A block source that has its server killed after it served `count` blocks."""

    def __init__(self, store: BlockStore, count: int, kill: Callable[[], None]) -> None:
        self.store = store
        self.count = count
        self.kill = kill
        self.served = 0

    def has_many(self, digests: Iterable[bytes]) -> set[bytes]:
        return self.store.has_many(digests)

    def get(self, digest: bytes) -> bytes:
        self.served += 1
        if self.served == self.count:
            trio.from_thread.run_sync(self.kill)
        return self.store.get(digest)

    def manifest_bytes(self, digest: bytes) -> bytes | None:
        return self.store.manifest_bytes(digest)


def source_file(path: Path, blocks: int = 96) -> bytes:
    rng = random.Random(7)
    data = b"".join(bytes(BS) if i % 7 == 3 else rng.randbytes(BS) for i in range(blocks))
    path.write_bytes(data + rng.randbytes(123))
    return path.read_bytes()


async def test_fetch_from_a_corrupting_and_a_dying_holder(tmp_path: Path) -> None:
    original = source_file(tmp_path / "memory.save")
    producer = BlockStore(tmp_path / "producer", block_size=BS)
    manifest = producer.put_file(tmp_path / "memory.save", IDENTITY, created=1)
    receiver = BlockStore(tmp_path / "receiver", block_size=BS)
    progress: list[tuple[int, int]] = []
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            liar = CorruptFirst(producer)
            scope_a, port_a = await start_server(nursery, liar)
            killed = trio.Event()
            scopes: list[trio.CancelScope] = []

            def kill() -> None:
                scopes[0].cancel()  # the server's task and its listener go away
                killed.set()

            dying = DiesAfter(producer, 4, kill)
            scope_b, port_b = await start_server(nursery, dying)
            scopes.append(scope_b)
            stats = await fetch(
                manifest,
                [("127.0.0.1", port_a), ("127.0.0.1", port_b)],
                receiver,
                lambda done, total: progress.append((done, total)),
                max_in_flight=3,
                timeout_s=10,
            )
            scope_a.cancel()
    assert killed.is_set() and liar.corrupted is not None
    assert stats.faults[f"127.0.0.1:{port_a}"] == 1 and stats.bad_blocks == 1
    assert f"127.0.0.1:{port_b}" in stats.dropped
    receiver.materialize(manifest, tmp_path / "restored.save")
    assert (tmp_path / "restored.save").read_bytes() == original
    total = sum(manifest.block_lengths().values())
    assert progress[-1] == (total, total)
    assert [done for done, _ in progress] == sorted(done for done, _ in progress)


async def test_fetch_resumes_after_a_break_without_refetching(tmp_path: Path) -> None:
    original = source_file(tmp_path / "memory.save", blocks=40)
    producer = BlockStore(tmp_path / "producer", block_size=BS)
    manifest = producer.put_file(tmp_path / "memory.save", IDENTITY, created=1)
    receiver = BlockStore(tmp_path / "receiver", block_size=BS)
    wanted = len(manifest.block_lengths())
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            scopes: list[trio.CancelScope] = []
            dying = DiesAfter(producer, 10, lambda: scopes[0].cancel())
            scope, port = await start_server(nursery, dying)
            scopes.append(scope)
            with pytest.raises(FetchError):
                await fetch(manifest, [("127.0.0.1", port)], receiver, max_in_flight=1)
            held = wanted - len(receiver.missing(manifest))
            assert held >= 9  # what arrived before the break is kept, verified

            counting = DiesAfter(producer, 10**9, lambda: None)
            scope, port = await start_server(nursery, counting)
            stats = await fetch(manifest, [("127.0.0.1", port)], receiver)
            scope.cancel()
    assert counting.served == wanted - held == stats.blocks_total
    receiver.materialize(manifest, tmp_path / "restored.save")
    assert (tmp_path / "restored.save").read_bytes() == original


async def test_nothing_to_fetch_connects_to_no_one(tmp_path: Path) -> None:
    source_file(tmp_path / "f", blocks=3)
    store = BlockStore(tmp_path / "s", block_size=BS)
    manifest = store.put_file(tmp_path / "f", IDENTITY, created=1)

    async def refuse(host: str, port: int) -> trio.abc.Stream:
        raise AssertionError("connected although nothing was missing")

    stats = await fetch(manifest, [("127.0.0.1", 9)], store, connect=refuse)
    assert stats.blocks_total == 0


async def test_unreachable_holders_end_in_fetch_error(tmp_path: Path) -> None:
    source_file(tmp_path / "f", blocks=3)
    manifest = BlockStore(tmp_path / "p", block_size=BS).put_file(tmp_path / "f", IDENTITY)
    receiver = BlockStore(tmp_path / "r", block_size=BS)
    (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listener.socket.getsockname()[1]
    await listener.aclose()  # nothing listens there any more
    with trio.fail_after(30), pytest.raises(FetchError):
        await fetch(manifest, [("127.0.0.1", port)], receiver, timeout_s=5)


async def test_server_drops_a_garbage_connection_and_keeps_serving(tmp_path: Path) -> None:
    source_file(tmp_path / "f", blocks=5)
    producer = BlockStore(tmp_path / "p", block_size=BS)
    manifest = producer.put_file(tmp_path / "f", IDENTITY, created=1)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            scope, port = await start_server(nursery, producer)
            bad = await trio.open_tcp_stream("127.0.0.1", port)
            await bad.send_all(b"\x00\x00\x00\x03\x92\x04\xc0")  # BLOCK from a client
            assert await bad.receive_some(100) == b""
            await bad.aclose()
            receiver = BlockStore(tmp_path / "r", block_size=BS)
            await fetch(manifest, [("127.0.0.1", port)], receiver)
            scope.cancel()
    assert receiver.missing(manifest) == {}


async def test_a_silent_holder_times_out_and_the_other_finishes(tmp_path: Path) -> None:
    original = source_file(tmp_path / "f", blocks=12)
    producer = BlockStore(tmp_path / "p", block_size=BS)
    manifest = producer.put_file(tmp_path / "f", IDENTITY, created=1)
    receiver = BlockStore(tmp_path / "r", block_size=BS)
    (silent,) = await trio.open_tcp_listeners(0, host="127.0.0.1")  # accepts, never answers
    silent_port = silent.socket.getsockname()[1]
    with trio.fail_after(60):
        with pytest.raises(FetchError):  # the wait for the silent holder is bounded
            await fetch(manifest, [("127.0.0.1", silent_port)], receiver, timeout_s=0.5)
        async with trio.open_nursery() as nursery:
            scope, port = await start_server(nursery, producer)
            await fetch(
                manifest,
                [("127.0.0.1", silent_port), ("127.0.0.1", port)],
                receiver,
                timeout_s=5.0,  # generous: the working holder must answer under load too
            )
            scope.cancel()
    await silent.aclose()
    receiver.materialize(manifest, tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == original


@pytest.mark.parametrize(
    "module", ["segments/store/transfer_core.py", "segments/store/manifest.py"]
)
def test_cores_import_no_io(module: str) -> None:
    imported = imported_roots(REPO_ROOT / module)
    forbidden = {"trio", "socket", "time", "random", "os", "subprocess", "asyncio", "sqlite3"}
    assert not imported & forbidden


def test_a_block_queued_at_a_holder_that_dies_goes_back_to_the_faulty_one() -> None:
    blocks = make_blocks(3)
    d0, d1, d2 = blocks
    core = FetchCore({d: BS for d in blocks}, max_in_flight=1)
    for holder in ("a", "b"):
        core.handle(HolderJoined(holder))
    assert core.handle(HaveAnnounced("a", (d0, d1, d2))) == [RequestBlocks("a", (d0,))]
    assert core.handle(HaveAnnounced("b", (d0, d1, d2))) == [RequestBlocks("b", (d1,))]
    # a sends d0 corrupted (a fault, reported): d0 is queued for b, a moves on to d2.
    assert core.handle(BlockArrived("a", d0, b"bad")) == [
        ReportFault("a", "a block that does not match its digest", 1),
        RequestBlocks("a", (d2,)),
    ]
    # b dies before getting to d0: d1 and d0 must go back to a.
    assert core.handle(HolderLost("b", "reset")) == []
    effects = core.handle(BlockArrived("a", d2, blocks[d2]))
    assert effects[0] == StoreBlock(d2, blocks[d2])
    asked = []
    while not core.done:
        assert isinstance(effects[-1], RequestBlocks) and effects[-1].holder == "a"
        (digest,) = effects[-1].ids
        asked.append(digest)
        effects = core.handle(BlockArrived("a", digest, blocks[digest]))
        assert effects[0] == StoreBlock(digest, blocks[digest])
    assert sorted(asked) == sorted([d0, d1])


class _BuggySource:
    """A store whose reads fail the way a bug would (not a protocol error)."""

    def __init__(self, store: BlockStore) -> None:
        self.store = store
        self.broken = True

    def has_many(self, digests: Iterable[bytes]) -> set[bytes]:
        return self.store.has_many(digests)

    def get(self, digest: bytes) -> bytes:
        if self.broken:
            raise ValueError("a bug in a block source")
        return self.store.get(digest)

    def manifest_bytes(self, digest: bytes) -> bytes | None:
        return self.store.manifest_bytes(digest)


async def test_no_peer_ends_the_server_connections_are_capped_and_failures_contained(
    tmp_path: Path,
) -> None:
    source_file(tmp_path / "f", blocks=5)
    producer = BlockStore(tmp_path / "p", block_size=BS)
    manifest = producer.put_file(tmp_path / "f", IDENTITY, created=1)
    source = _BuggySource(producer)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            scope, port = await start_server(nursery, source)
            with pytest.raises(FetchError):  # the handler's failure closed that connection
                await fetch(
                    manifest, [("127.0.0.1", port)], BlockStore(tmp_path / "r0"), timeout_s=2
                )
            idle = [
                await trio.open_tcp_stream("127.0.0.1", port)
                for _ in range(MAX_CONNECTIONS_PER_PEER)
            ]
            await trio.sleep(0.2)  # all accepted and counted
            extra = await trio.open_tcp_stream("127.0.0.1", port)
            assert await extra.receive_some(100) == b""  # over the cap: closed at once
            await extra.aclose()
            for stream in idle:
                await stream.aclose()
            await trio.sleep(0.2)
            source.broken = False
            receiver = BlockStore(tmp_path / "r", block_size=BS)
            await fetch(manifest, [("127.0.0.1", port)], receiver)  # still serving
            scope.cancel()
    assert receiver.missing(manifest) == {}
