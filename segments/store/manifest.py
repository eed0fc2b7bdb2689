"""Manifests: the signed list of blocks that make up the files of one checkpoint.

Theory of operation
-------------------
A checkpoint (a VM memory save file, a disk image, or several named files of one
checkpoint) is cut into fixed-size blocks of ``block_size`` bytes (a multiple of
4 KiB); the last block of a file may be shorter. Each block is named by its
BLAKE3-256 digest (why BLAKE3 and why the default size: see ``segments.store.blocks``).
A block of only zero bytes is not stored or shipped: the manifest names it with
the well-known marker ``ZERO`` (32 zero bytes, which no BLAKE3 output is in
practice) and the file is written sparse there.

Because blocks are fixed-size, a block's offset and length follow from its
index and the file size. The encoding therefore carries, per file, only its
name, its size and one binary string of 32-byte digests, and a decoder cannot be
fed overlapping, missing or out-of-order ranges: there is no way to express them.
``BlockRef`` gives callers the explicit ``(offset, length, digest)`` view.

Wire form (msgpack)::

    [body, signature]
    body = packb({"v": 1, "alg": "blake3", "bs": block_size,
                  "producer": node key (32 bytes), "created": unix seconds,
                  "files": [[name, size, digests], ...]})

The signature is Ed25519 by ``producer`` over ``SIGNING_CONTEXT + body``; the
manifest's own name (``Manifest.digest``) is the BLAKE3 digest of ``body``.
Decoding is strict and bounded (its own limits: a big disk image has far more
blocks than a wire frame may hold) and turns every fault into
``RemoteProtocolError``: a forged or tampered manifest never gets past it.

This module is pure: no I/O, no clock (``created`` is handed in).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import blake3
import msgpack

from node.base.identity import Identity, NodeId
from node.base.wire import RemoteProtocolError, verify_signature

SANS_IO = True  # a core: tests/unit/test_import_graph.py holds it to no I/O

FORMAT_VERSION = 1
HASH_NAME = "blake3"
DIGEST_BYTES = 32
ZERO = bytes(DIGEST_BYTES)
SIGNING_CONTEXT = b"gleaner/manifest/v1\x00"
ALIGNMENT = 4096
MAX_BLOCK_SIZE = 1024 * 1024
MAX_FILES = 64
MAX_NAME_BYTES = 255
MAX_FILE_SIZE = 2**44  # 16 TiB
MAX_BLOCKS = 2**21  # 2 Mi blocks: 64 MiB of digests, 128 GiB at 64 KiB blocks
MAX_MANIFEST_BYTES = MAX_BLOCKS * DIGEST_BYTES + 64 * 1024
SIGNATURE_BYTES = 64


def block_digest(data: bytes | bytearray | memoryview) -> bytes:
    """The name of a block: its BLAKE3-256 digest (never ``ZERO`` for a real block)."""
    return blake3.blake3(data).digest()


@dataclass(frozen=True, slots=True)
class BlockRef:
    """One block of one file: where it sits and what it is (``ZERO`` for zeros)."""

    offset: int
    length: int
    digest: bytes

    @property
    def zero(self) -> bool:
        return self.digest == ZERO


@dataclass(frozen=True, slots=True)
class FileEntry:
    """One named file of a checkpoint: its size and its blocks' digests, in order."""

    name: str
    size: int
    digests: tuple[bytes, ...]

    def blocks(self, block_size: int) -> Iterator[BlockRef]:
        for index, digest in enumerate(self.digests):
            offset = index * block_size
            yield BlockRef(offset, min(block_size, self.size - offset), digest)


@dataclass(frozen=True, slots=True)
class Manifest:
    """A signed, decoded manifest. Build one with ``sign_manifest``; read with ``decode``."""

    block_size: int
    producer: NodeId
    created: int
    files: tuple[FileEntry, ...]
    body: bytes
    signature: bytes

    @property
    def digest(self) -> bytes:
        """The manifest's name: BLAKE3 of its signed body."""
        return block_digest(self.body)

    @property
    def total_size(self) -> int:
        return sum(entry.size for entry in self.files)

    def file(self, name: str) -> FileEntry:
        for entry in self.files:
            if entry.name == name:
                return entry
        raise KeyError(name)

    def blocks(self) -> Iterator[tuple[FileEntry, BlockRef]]:
        for entry in self.files:
            for ref in entry.blocks(self.block_size):
                yield entry, ref

    def block_lengths(self) -> dict[bytes, int]:
        """Every distinct non-zero block of the manifest and its length."""
        return {ref.digest: ref.length for _, ref in self.blocks() if not ref.zero}

    def encode(self) -> bytes:
        packed: bytes = msgpack.packb([self.body, self.signature], use_bin_type=True)
        return packed


def sign_manifest(
    identity: Identity,
    block_size: int,
    files: Sequence[tuple[str, int, Sequence[BlockRef]]],
    created: int,
) -> Manifest:
    """Make and sign a manifest from (name, size, block refs) per file."""
    _check_block_size(block_size, ValueError)
    if not 0 < len(files) <= MAX_FILES:
        raise ValueError(f"a manifest holds 1 to {MAX_FILES} files, got {len(files)}")
    raw_files = []
    for name, size, refs in files:
        expected = [
            (i * block_size, min(block_size, size - i * block_size))
            for i in range(_block_count(size, block_size))
        ]
        if [(ref.offset, ref.length) for ref in refs] != expected:
            raise ValueError(f"blocks of {name!r} do not tile its {size} bytes at {block_size}")
        raw_files.append([name, size, b"".join(ref.digest for ref in refs)])
    body: bytes = msgpack.packb(
        {
            "v": FORMAT_VERSION,
            "alg": HASH_NAME,
            "bs": block_size,
            "producer": identity.node_id.key,
            "created": created,
            "files": raw_files,
        },
        use_bin_type=True,
    )
    manifest = _parse_body(body, identity.sign(SIGNING_CONTEXT + body), ValueError)
    return manifest


def decode_manifest(data: bytes) -> Manifest:
    """Decode and verify a manifest from a peer. Raises only RemoteProtocolError."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise RemoteProtocolError("manifest is not bytes")
    if len(data) > MAX_MANIFEST_BYTES:
        raise RemoteProtocolError(f"manifest of {len(data)} bytes is too big")
    outer = _unpack(bytes(data))
    if not isinstance(outer, list) or len(outer) != 2:
        raise RemoteProtocolError("manifest is not [body, signature]")
    body, signature = outer
    if not isinstance(body, bytes) or not isinstance(signature, bytes):
        raise RemoteProtocolError("manifest body and signature must be bytes")
    if len(signature) != SIGNATURE_BYTES:
        raise RemoteProtocolError("manifest signature is not 64 bytes")
    manifest = _parse_body(body, signature, RemoteProtocolError)
    verify_signature(manifest.producer.key, SIGNING_CONTEXT + body, signature)
    return manifest


def _parse_body(body: bytes, signature: bytes, error: type[Exception]) -> Manifest:
    fields = _unpack(body) if error is RemoteProtocolError else msgpack.unpackb(body, raw=False)
    if not isinstance(fields, dict):
        raise error("manifest body is not a map")
    version, alg = fields.get("v"), fields.get("alg")
    if type(version) is not int or version != FORMAT_VERSION:
        raise error(f"unsupported manifest version {version!r}")
    if alg != HASH_NAME:
        raise error(f"unsupported block hash {alg!r}")
    block_size, producer, created = fields.get("bs"), fields.get("producer"), fields.get("created")
    _check_block_size(block_size, error)
    assert isinstance(block_size, int)
    if not isinstance(producer, bytes) or len(producer) != 32:
        raise error("manifest producer is not a 32-byte node id")
    if type(created) is not int or not 0 <= created < 2**63:
        raise error("manifest creation time is not a timestamp")
    raw_files = fields.get("files")
    if not isinstance(raw_files, list) or not 0 < len(raw_files) <= MAX_FILES:
        raise error(f"manifest must list 1 to {MAX_FILES} files")
    files: list[FileEntry] = []
    total_blocks = 0
    for raw in raw_files:
        entry = _parse_file(raw, block_size, error)
        if any(entry.name == seen.name for seen in files):
            raise error(f"file {entry.name!r} is listed twice")
        total_blocks += len(entry.digests)
        if total_blocks > MAX_BLOCKS:
            raise error("manifest lists too many blocks")
        files.append(entry)
    return Manifest(block_size, NodeId(producer), created, tuple(files), body, signature)


def _parse_file(raw: Any, block_size: int, error: type[Exception]) -> FileEntry:
    if not isinstance(raw, list) or len(raw) != 3:
        raise error("file entry is not [name, size, digests]")
    name, size, packed = raw
    if not isinstance(name, str) or not _safe_name(name):
        raise error(f"bad file name {name!r}")
    if type(size) is not int or not 0 <= size <= MAX_FILE_SIZE:
        raise error(f"bad size for {name!r}")
    count = _block_count(size, block_size)
    if not isinstance(packed, bytes) or len(packed) != count * DIGEST_BYTES:
        raise error(f"{name!r}: {size} bytes need {count} digests")
    digests = tuple(packed[i : i + DIGEST_BYTES] for i in range(0, len(packed), DIGEST_BYTES))
    return FileEntry(name, size, digests)


def _safe_name(name: str) -> bool:
    """A plain file name: materialize() writes it under a directory, so no paths."""
    return (
        0 < len(name.encode()) <= MAX_NAME_BYTES
        and name not in (".", "..")
        and not any(ch in name for ch in "/\\\x00")
        and name.isprintable()
    )


def _block_count(size: int, block_size: int) -> int:
    return -(-size // block_size)


def _check_block_size(block_size: Any, error: type[Exception]) -> None:
    if (
        type(block_size) is not int
        or not ALIGNMENT <= block_size <= MAX_BLOCK_SIZE
        or block_size % ALIGNMENT
    ):
        raise error(f"block size {block_size!r} is not a multiple of 4 KiB up to 1 MiB")


def _unpack(data: bytes) -> Any:
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=True,
            max_str_len=MAX_NAME_BYTES * 4,
            max_bin_len=MAX_BLOCKS * DIGEST_BYTES,
            max_array_len=MAX_FILES,
            max_map_len=16,
            max_ext_len=0,
        )
    except (ValueError, TypeError, OverflowError, msgpack.UnpackException) as exc:
        raise RemoteProtocolError(f"malformed manifest: {exc}") from None
