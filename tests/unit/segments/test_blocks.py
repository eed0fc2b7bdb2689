"""The block store and manifests: round trips, zeros, refcounts, corruption, forgery."""

from __future__ import annotations

import os
import random
import sqlite3
from collections.abc import Mapping
from pathlib import Path

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node.base.identity import Identity
from node.base.wire import RemoteProtocolError
from segments.store.blocks import (
    SCHEMA_VERSION,
    BlockStore,
    BlockStoreError,
    CorruptBlock,
    MissingBlock,
)
from segments.store.manifest import (
    SIGNING_CONTEXT,
    ZERO,
    BlockRef,
    Manifest,
    block_digest,
    decode_manifest,
    sign_manifest,
)

BS = 4096
IDENTITY = Identity.from_seeds(b"\x01" * 32, b"\x02" * 32)
OTHER = Identity.from_seeds(b"\x03" * 32, b"\x04" * 32)


def make_file(path: Path, pattern: str, seed: int = 1) -> bytes:
    """One block per character: 'r' random, 'z' zeros, 'a'/'b' fixed contents; 't' a short tail."""
    rng = random.Random(seed)
    parts = []
    for ch in pattern:
        if ch == "r":
            parts.append(rng.randbytes(BS))
        elif ch == "z":
            parts.append(bytes(BS))
        elif ch == "t":
            parts.append(rng.randbytes(100))
        else:
            parts.append(ch.encode() * BS)
    data = b"".join(parts)
    path.write_bytes(data)
    return data


@pytest.fixture
def store(tmp_path: Path) -> BlockStore:
    return BlockStore(tmp_path / "store", block_size=BS)


def test_round_trip(store: BlockStore, tmp_path: Path) -> None:
    data = make_file(tmp_path / "mem", "rrzzzarzt")
    manifest = store.put_file(tmp_path / "mem", IDENTITY, created=1000)
    assert manifest.total_size == len(data)
    assert manifest.producer == IDENTITY.node_id
    refs = [ref for _, ref in manifest.blocks()]
    assert [ref.offset for ref in refs] == [i * BS for i in range(9)]
    assert refs[-1].length == 100
    store.materialize(manifest, tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == data
    assert store.missing(manifest) == {}
    assert store.chunk_file(tmp_path / "mem") == refs


def test_zero_blocks_are_not_stored_and_become_holes(store: BlockStore, tmp_path: Path) -> None:
    make_file(tmp_path / "mem", "a" + "z" * 255 + "a")
    manifest = store.put_file(tmp_path / "mem", IDENTITY, created=1)
    digests = manifest.files[0].digests
    assert digests.count(ZERO) == 255
    assert store.statistics().blocks == 1  # two 'a' blocks, stored once; zeros never
    assert not any(p.name.startswith("00" * 32) for p in (store.root / "blocks").rglob("*"))
    out = tmp_path / "out"
    store.materialize(manifest, out)
    assert out.read_bytes() == (tmp_path / "mem").read_bytes()
    assert out.stat().st_blocks * 512 < 64 * BS  # sparse: the zeros took no space


def test_same_block_is_stored_once(store: BlockStore, tmp_path: Path) -> None:
    make_file(tmp_path / "mem", "aaaab")
    store.put_file(tmp_path / "mem", IDENTITY, created=1)
    assert store.statistics().blocks == 2
    assert store.statistics().bytes == 2 * BS


def test_refcounts_follow_manifests_and_gc_deletes_unreferenced(
    store: BlockStore, tmp_path: Path
) -> None:
    make_file(tmp_path / "one", "abr", seed=1)
    make_file(tmp_path / "two", "abr", seed=2)  # shares 'a' and 'b', differs in 'r'
    first = store.put_file(tmp_path / "one", IDENTITY, created=1)
    second = store.put_file(tmp_path / "two", IDENTITY, created=2)
    shared, own = first.files[0].digests[0], first.files[0].digests[2]
    assert store.refcount(shared) == 2 and store.refcount(own) == 1
    assert store.gc().blocks_deleted == 0

    assert store.remove_manifest(first.digest)
    assert store.refcount(shared) == 1 and store.refcount(own) == 0
    result = store.gc()
    assert (result.blocks_deleted, result.bytes_freed) == (1, BS)
    assert not store.has(own) and not store.path_for(own).exists()
    assert store.has(shared)
    store.materialize(second, tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == (tmp_path / "two").read_bytes()

    assert store.remove_manifest(second.digest)
    assert not store.remove_manifest(second.digest)
    assert store.gc().blocks_deleted == 3
    assert store.statistics().blocks == 0
    assert not [p for p in (store.root / "blocks").rglob("*") if p.is_file()]


def test_gc_sweeps_unindexed_files(store: BlockStore) -> None:
    stray = store.path_for(block_digest(b"stray"))
    stray.parent.mkdir(parents=True, exist_ok=True)
    stray.write_bytes(b"stray")
    (stray.parent / ".deadbeef.1.2.tmp").write_bytes(b"half")
    assert store.gc().orphans_swept == 2
    assert not stray.exists()


def test_flipped_byte_on_disk_is_detected_and_never_returned(
    store: BlockStore, tmp_path: Path
) -> None:
    make_file(tmp_path / "mem", "rrr")
    manifest = store.put_file(tmp_path / "mem", IDENTITY, created=1)
    victim = manifest.files[0].digests[1]
    path = store.path_for(victim)
    raw = bytearray(path.read_bytes())
    raw[1234] ^= 0x01
    path.write_bytes(bytes(raw))

    with pytest.raises(CorruptBlock) as caught:
        store.get(victim)
    assert caught.value.digest == victim
    assert not store.has(victim)
    assert store.missing(manifest) == {victim: BS}
    assert len(list((store.root / "quarantine").iterdir())) == 1
    assert store.statistics().corrupt_found == 1
    with pytest.raises(MissingBlock):
        store.get(victim)
    with pytest.raises(MissingBlock):
        store.materialize(manifest, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out*"))
    # The good copy put back heals the store.
    store.put(make_file(tmp_path / "again", "rrr")[BS : 2 * BS])
    store.materialize(manifest, tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == (tmp_path / "mem").read_bytes()


def test_indexed_block_whose_file_vanished_is_corrupt(store: BlockStore) -> None:
    digest = store.put(b"x" * BS)
    store.path_for(digest).unlink()
    with pytest.raises(CorruptBlock):
        store.get(digest)
    assert not store.has(digest)


def test_truncated_block_is_corrupt(store: BlockStore) -> None:
    digest = store.put(b"y" * BS)
    store.path_for(digest).write_bytes(b"y" * (BS - 1))
    with pytest.raises(CorruptBlock):
        store.get(digest)


def test_put_checks_the_digest_it_is_given(store: BlockStore) -> None:
    with pytest.raises(ValueError):
        store.put(b"data", block_digest(b"other"))
    assert store.statistics().blocks == 0


def test_several_files_in_one_manifest(store: BlockStore, tmp_path: Path) -> None:
    make_file(tmp_path / "memory.save", "rzr", seed=5)
    make_file(tmp_path / "disk.qcow2", "zzrt", seed=6)
    manifest = store.put_files(
        {"memory.save": tmp_path / "memory.save", "disk.qcow2": tmp_path / "disk.qcow2"},
        IDENTITY,
        created=7,
    )
    assert [entry.name for entry in manifest.files] == ["memory.save", "disk.qcow2"]
    store.materialize(manifest, tmp_path / "restore")
    for name in ("memory.save", "disk.qcow2"):
        assert (tmp_path / "restore" / name).read_bytes() == (tmp_path / name).read_bytes()


def test_index_survives_reopen_and_refuses_newer_schema(tmp_path: Path) -> None:
    make_file(tmp_path / "mem", "ra")
    store = BlockStore(tmp_path / "s", block_size=BS)
    manifest = store.put_file(tmp_path / "mem", IDENTITY, created=1)
    assert store.schema_version == SCHEMA_VERSION
    store.close()
    again = BlockStore(tmp_path / "s", block_size=BS)
    assert again.manifest(manifest.digest) == manifest
    assert again.manifest_digests() == [manifest.digest]
    assert again.missing(manifest) == {}
    again.close()
    db = sqlite3.connect(tmp_path / "s" / "index.sqlite")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(BlockStoreError):
        BlockStore(tmp_path / "s")


# -- manifests ---------------------------------------------------------------------


def small_manifest(identity: Identity = IDENTITY) -> Manifest:
    refs = [BlockRef(0, BS, block_digest(b"a" * BS)), BlockRef(BS, 10, ZERO)]
    return sign_manifest(identity, BS, [("mem", BS + 10, refs)], created=42)


def test_manifest_round_trip() -> None:
    manifest = small_manifest()
    decoded = decode_manifest(manifest.encode())
    assert decoded == manifest
    assert decoded.digest == block_digest(manifest.body)
    assert decoded.block_lengths() == {block_digest(b"a" * BS): BS}


def test_manifest_of_a_72_mib_file_decodes() -> None:
    count = 72 * 1024 * 1024 // BS  # 18,432 entries at 4 KiB
    refs = [BlockRef(i * BS, BS, block_digest(i.to_bytes(4, "big"))) for i in range(count)]
    manifest = sign_manifest(IDENTITY, BS, [("mem", count * BS, refs)], created=1)
    assert decode_manifest(manifest.encode()).files[0].digests == manifest.files[0].digests


def test_tampered_manifest_is_rejected() -> None:
    body, signature = msgpack.unpackb(small_manifest().encode())
    fields = msgpack.unpackb(body)
    fields["files"][0][1] += 1  # claim a longer file
    for forged_body in (msgpack.packb(fields), body[:-1] + bytes([body[-1] ^ 1])):
        with pytest.raises(RemoteProtocolError):
            decode_manifest(msgpack.packb([forged_body, signature]))


def test_manifest_signed_by_someone_else_is_rejected() -> None:
    body, _ = msgpack.unpackb(small_manifest().encode())
    forged = OTHER.sign(SIGNING_CONTEXT + body)  # body still names IDENTITY as producer
    with pytest.raises(RemoteProtocolError, match="signature"):
        decode_manifest(msgpack.packb([body, forged]))


@pytest.mark.parametrize(
    "change",
    [
        {"v": 2},
        {"alg": "sha1"},
        {"bs": 1000},
        {"bs": 8 * 1024 * 1024},
        {"producer": b"short"},
        {"created": -1},
        {"files": []},
        {"files": [["../etc/passwd", 1, b"\x00" * 32]]},
        {"files": [["mem", BS + 10, b"\x00" * 32]]},
        {"files": [["mem", 1, b"\x00" * 32], ["mem", 1, b"\x00" * 32]]},
    ],
)
def test_manifest_with_bad_fields_is_rejected(change: dict[str, object]) -> None:
    body, _ = msgpack.unpackb(small_manifest().encode())
    fields = {**msgpack.unpackb(body), **change}
    forged_body = msgpack.packb(fields)
    signature = IDENTITY.sign(SIGNING_CONTEXT + forged_body)  # validly signed, still refused
    with pytest.raises(RemoteProtocolError):
        decode_manifest(msgpack.packb([forged_body, signature]))


def test_sign_manifest_refuses_refs_that_do_not_tile_the_file() -> None:
    refs = [BlockRef(0, BS, block_digest(b"a"))]
    with pytest.raises(ValueError):
        sign_manifest(IDENTITY, BS, [("mem", 2 * BS, refs)], created=1)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_arbitrary_bytes_as_manifest_only_raise_protocol_error(data: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        decode_manifest(data)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_manifest_is_refused_or_unchanged(data: st.DataObject) -> None:
    encoded = bytearray(small_manifest().encode())
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(encoded) - 1))
        encoded[position] = data.draw(st.integers(0, 255))
    try:
        decoded = decode_manifest(bytes(encoded))
    except RemoteProtocolError:
        return
    assert decoded == small_manifest()


def test_is_zero_block_marker_cannot_be_stored(store: BlockStore) -> None:
    assert store.has(ZERO)
    assert os.path.basename(store.path_for(ZERO)) == "00" * 32


def test_gc_spares_blocks_a_put_is_still_writing(store: BlockStore, tmp_path: Path) -> None:
    make_file(tmp_path / "mem", "rr")
    original = store._store

    def store_then_gc(
        blocks: Mapping[bytes, bytes],
    ) -> None:  # a gc runs between a block's write and its manifest
        original(blocks)
        assert store.gc().blocks_deleted == 0

    store._store = store_then_gc  # type: ignore[method-assign]
    manifest = store.put_file(tmp_path / "mem", IDENTITY, created=1)
    store._store = original  # type: ignore[method-assign]
    assert store.missing(manifest) == {}
    assert store.gc().blocks_deleted == 0
