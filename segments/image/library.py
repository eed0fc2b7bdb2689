"""The image library: images people bring (OCI archives, raw and qcow2 disks), by name.

Theory of operation
-------------------
Besides the recipe images of ``store.py``, an image store keeps images that job
owners import. Their content lives in a block store beside the recipes
(``STORE/blocks``, ``segments.store.blocks``), so it is deduplicated, verified
on every read and shipped block by block like a checkpoint:

* an OCI or Docker archive is checked by ``oci.py``; each layer is stored
  uncompressed as its own manifest (one file, ``layer.tar``), found again by
  its diff_id in ``STORE/imported/layers/HEX``. A layer two images share is
  stored once and, since a layer's blocks start at its first byte, a host that
  holds one image's layers holds those blocks of the other;
* a raw or qcow2 disk is checked and converted to raw by ``disk_import.py``
  and stored as one manifest (``disk.raw``; zero blocks are holes).

``STORE/imported/ID.json`` records an image: its kind, run settings, layers or
disk, and the manifests that hold them. The id covers content only (the
settings and diff_ids, or the disk's block digests), so it is the same on
every host that imports the same image. ``STORE/names.json`` maps
``NAME:TAG`` to ids, in the manner of a registry's tags; a name moves when it
is imported again, an id never changes.

Order of writes (persist before promise): blocks and manifests first (the
block store is durable), then the layer records, then the image record, then
the name, each written to a temporary file, fsynced and renamed. A crash
leaves at most unreferenced blocks, which the block store's ``gc`` sweeps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any, cast

from node.base.identity import Identity
from segments.image.disk_import import MAX_VIRTUAL_BYTES, convert_to_raw, file_system
from segments.image.errors import ImageError
from segments.image.layers import Changeset, LayerLimits, check_layer, flatten
from segments.image.oci import OciArchive, OciImage, content_id, settings_from
from segments.store.blocks import BlockStore
from segments.store.manifest import ZERO, FileEntry, Manifest

BLOCKS, IMPORTED, LAYERS, NAMES = "blocks", "imported", "layers", "names.json"
LAYER_FILE, DISK_FILE = "layer.tar", "disk.raw"
ID_PATTERN = re.compile(r"[0-9a-f]{64}")
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
NAME_PATTERN = re.compile(
    rf"({_COMPONENT}(?:/{_COMPONENT})*)(?::([A-Za-z0-9_][A-Za-z0-9._-]{{0,127}}))?"
)
MAX_NAME = 255
MAX_RECORD_BYTES = 1 << 20
Fetch = Callable[[bytes, int], Manifest]  # (manifest digest, most bytes it may hold) -> it, here


@dataclass(frozen=True, slots=True)
class ImportedImage:
    """An imported image as its record says; `size_bytes` is its content, uncompressed."""

    id: str
    kind: str  # "oci" or "disk"
    settings: dict[str, Any]
    layers: tuple[dict[str, Any], ...]
    disk: dict[str, Any] | None
    size_bytes: int
    created: float
    names: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ImportResult:
    image: ImportedImage
    new_bytes: int  # block bytes this import added to the store
    seconds: float
    skipped_layers: int = 0
    tags: tuple[str, ...] = field(default=())


def normalise_name(name: str) -> str:
    """``NAME:TAG`` with the tag ``latest`` filled in; ImageError if it is not a name."""
    match = NAME_PATTERN.fullmatch(name) if len(name) <= MAX_NAME else None
    if match is None:
        raise ImageError(
            f"not an image name: {name[:80]!r} (lower-case path, optional :tag, e.g. tools/sim:1.2)"
        )
    return f"{match.group(1)}:{match.group(2) or 'latest'}"


class ImageLibrary:
    """The imported images of one image store. Thread-safe as its block store is."""

    def __init__(self, root: Path, limits: LayerLimits | None = None) -> None:
        self.root, self.limits = root, limits or LayerLimits()
        (root / IMPORTED / LAYERS).mkdir(parents=True, exist_ok=True)
        self.store = BlockStore(root / BLOCKS)

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> ImageLibrary:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- importing --------------------------------------------------------------

    def import_archive(self, path: Path, identity: Identity, name: str | None) -> ImportResult:
        """Check and store an OCI or Docker image archive; tag it `name` if given.

        Every layer is checked and unpacked into a staging folder first, and the
        stack flattened, so a refused image stores nothing at all.
        """
        started = time.monotonic()
        wanted = normalise_name(name) if name else None
        with self._locked(), OciArchive(path) as archive, self._staging() as staging:
            image = archive.read_image()
            plains = [staging / f"{index:03d}.tar" for index in range(len(image.layers))]
            changesets = [
                archive.open_layer(ref, plain, self.limits)
                for ref, plain in zip(image.layers, plains, strict=True)
            ]
            root = flatten(changesets, self.limits)
            total = sum(plain.stat().st_size for plain in plains)
            if total > self.limits.max_image_bytes:
                raise ImageError(f"the image is over {self.limits.max_image_bytes} bytes in all")
            layers: list[dict[str, Any]] = []
            records: dict[str, bytes] = {}
            new_bytes = skipped = 0
            for ref, plain, changes in zip(image.layers, plains, changesets, strict=True):
                held = self._held_layer(ref.diff_id)
                if held is None:
                    added, held = self._store_file(plain, identity, LAYER_FILE)
                    new_bytes += added
                    records[ref.diff_id] = held.digest.hex().encode()
                else:
                    skipped += 1
                layers.append(
                    {
                        "diff_id": ref.diff_id,
                        "size": held.total_size,
                        "manifest": held.digest.hex(),
                        "entries": len(changes.entries),
                    }
                )
            for diff_id, manifest_hex in records.items():  # once every layer is stored
                _write_durable(self._layer_record(diff_id), manifest_hex)
            record = {
                "id": image.content_id(),
                "kind": "oci",
                "files": len(root),
                "settings": image.settings.as_dict(),
                "layers": layers,
                "disk": None,
                "size_bytes": sum(layer["size"] for layer in layers),
                "created": time.time(),
                "source": path.name,
            }
            stored = self._record(record, wanted)
            return ImportResult(stored, new_bytes, time.monotonic() - started, skipped, image.tags)

    def import_disk(
        self, path: Path, identity: Identity, name: str | None, fmt: str | None = None
    ) -> ImportResult:
        """Check, convert to raw and store a disk image holding a root file system."""
        started = time.monotonic()
        wanted = normalise_name(name) if name else None
        with self._locked():
            with self._staging() as staging:
                raw = staging / DISK_FILE
                probe = convert_to_raw(path, raw, fmt)
                new_bytes, manifest = self._store_file(raw, identity, DISK_FILE)
            entry = manifest.file(DISK_FILE)
            record = {
                "id": disk_id(entry.size, entry.digests),
                "kind": "disk",
                "settings": {},
                "layers": [],
                "disk": {
                    "manifest": manifest.digest.hex(),
                    "format": probe.format,
                    "file_system": probe.file_system,
                    "virtual_bytes": probe.virtual_bytes,
                },
                "size_bytes": entry.size,
                "created": time.time(),
                "source": path.name,
            }
            stored = self._record(record, wanted)
            return ImportResult(stored, new_bytes, time.monotonic() - started)

    # --- images that travel ------------------------------------------------------

    def record(self, image_id: str) -> bytes:
        """What another host needs to take this image: its id, kind, settings and content."""
        image = self.load(image_id)
        body = {
            "id": image.id,
            "kind": image.kind,
            "settings": image.settings,
            "layers": [
                {"diff_id": ly["diff_id"], "manifest": ly["manifest"]} for ly in image.layers
            ],
            "disk": None if image.disk is None else {"manifest": image.disk["manifest"]},
        }
        return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()

    def adopt(self, record: bytes, fetch: Fetch) -> ImportedImage:
        """Take an image another host described (``record``), checking it as an import does.

        `fetch(digest, max_bytes)` makes a manifest and its blocks present in this
        library's store (from the owner or any holder) and returns it; it must
        refuse a manifest over `max_bytes` before fetching any block (the caps are
        checked here again all the same). Nothing in `record`
        is believed: the id must be the content's, each layer's bytes must hash
        to its diff_id and pass the same member checks and flattening as an
        archive's; a disk must hash to the id and hold a root file system.
        """
        with self._locked(), self._staging() as staging:
            raw = _record_json(record)
            if raw["kind"] == "disk":
                return self._adopt_disk(raw, fetch)
            settings, diff_ids = settings_from(
                raw.get("settings"), [layer.get("diff_id") for layer in raw["layers"]]
            )
            if content_id(settings, diff_ids) != raw["id"]:
                raise ImageError(f"image {raw['id'][:12]}: its record does not hash to its id")
            changesets: list[Changeset] = []
            layers: list[dict[str, Any]] = []
            total = 0
            for number, (layer, diff_id) in enumerate(zip(raw["layers"], diff_ids, strict=True)):
                cap = min(self.limits.max_layer_bytes, self.limits.max_image_bytes - total)
                manifest = fetch(_digest_of(layer.get("manifest")), cap)
                entry = _only_file(manifest, LAYER_FILE, cap)
                total += entry.size
                plain = staging / f"{number:03d}.tar"
                self.store.materialize(replace(manifest, files=(entry,)), plain)
                with open(plain, "rb") as stream:
                    hashing = _Sha256(stream)
                    changesets.append(check_layer(cast(IO[bytes], hashing), self.limits))
                    hashing.drain()
                if "sha256:" + hashing.digest.hexdigest() != diff_id:
                    raise ImageError(f"image {raw['id'][:12]}: layer {number} is not its diff_id")
                layers.append(
                    {
                        "diff_id": diff_id,
                        "size": entry.size,
                        "manifest": manifest.digest.hex(),
                        "entries": len(changesets[-1].entries),
                    }
                )
            root = flatten(changesets, self.limits)
            for layer in layers:
                _write_durable(self._layer_record(layer["diff_id"]), layer["manifest"].encode())
            return self._record(
                {
                    "id": raw["id"],
                    "kind": "oci",
                    "files": len(root),
                    "settings": settings.as_dict(),
                    "layers": layers,
                    "disk": None,
                    "size_bytes": sum(layer["size"] for layer in layers),
                    "created": time.time(),
                    "source": "adopted",
                },
                None,
            )

    def _adopt_disk(self, raw: dict[str, Any], fetch: Fetch) -> ImportedImage:
        disk = raw.get("disk")
        if not isinstance(disk, dict):
            raise ImageError("a disk image's record names no disk")
        manifest = fetch(_digest_of(disk.get("manifest")), MAX_VIRTUAL_BYTES)
        entry = _only_file(manifest, DISK_FILE, MAX_VIRTUAL_BYTES)
        if disk_id(entry.size, entry.digests) != raw["id"]:
            raise ImageError(f"image {raw['id'][:12]}: its disk does not hash to its id")
        first = entry.digests[0] if entry.digests else ZERO  # the superblock is in block 0
        found = file_system(bytes(2048) if first == ZERO else self.store.get(first)[:2048])
        if found is None:
            raise ImageError(f"image {raw['id'][:12]}: its disk holds no root file system")
        return self._record(
            {
                "id": raw["id"],
                "kind": "disk",
                "settings": {},
                "layers": [],
                "disk": {
                    "manifest": manifest.digest.hex(),
                    "format": "raw",
                    "file_system": found,
                    "virtual_bytes": entry.size,
                },
                "size_bytes": entry.size,
                "created": time.time(),
                "source": "adopted",
            },
            None,
        )

    # --- the cache --------------------------------------------------------------

    def touch(self, image_id: str) -> None:
        """Note that `image_id` was just used (its record's mtime: the cache's LRU order)."""
        os.utime(self.root / IMPORTED / f"{image_id}.json")

    def evict(self, cap_bytes: int, keep: frozenset[str] = frozenset()) -> list[str]:
        """Remove unnamed images, least recently used first, until the store holds at most
        `cap_bytes` of blocks; never a named one or one in `keep`. The ids removed."""
        removed: list[str] = []
        with self._locked():
            while self.store.statistics().bytes > cap_bytes:
                candidates = [
                    image for image in self.list() if not image.names and image.id not in keep
                ]
                if not candidates:
                    break
                oldest = min(candidates, key=lambda image: (self._last_used(image.id), image.id))
                self._remove(oldest.id)
                removed.append(oldest.id)
        return removed

    def _last_used(self, image_id: str) -> float:
        try:
            return (self.root / IMPORTED / f"{image_id}.json").stat().st_mtime
        except OSError:
            return 0.0

    def _held_layer(self, diff_id: str) -> Manifest | None:
        try:
            digest = bytes.fromhex(self._layer_record(diff_id).read_text().strip())
        except (OSError, ValueError):
            return None
        manifest = self.store.manifest(digest)
        if manifest is None or self.store.missing(manifest):
            return None
        return manifest

    def _store_file(self, path: Path, identity: Identity, name: str) -> tuple[int, Manifest]:
        """Store `path` as a one-file manifest; (block bytes that were new, manifest)."""
        lengths = {ref.digest: ref.length for ref in self.store.chunk_file(path) if not ref.zero}
        present = self.store.has_many(lengths)
        manifest = self.store.put_file(path, identity, name=name)
        return sum(n for digest, n in lengths.items() if digest not in present), manifest

    def _layer_record(self, diff_id: str) -> Path:
        return self.root / IMPORTED / LAYERS / diff_id.removeprefix("sha256:")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """One import or removal at a time on this store, across processes and threads.

        A removal's ``gc`` sweeps block files the index does not know yet, which
        a concurrent import may be writing; and an import that found a layer
        held must not see it removed before its own record names it.
        """
        with open(self.root / ".library.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    @contextlib.contextmanager
    def _staging(self) -> Iterator[Path]:
        with tempfile.TemporaryDirectory(prefix=".import-", dir=self.root) as tmp:
            yield Path(tmp)

    def _record(self, record: dict[str, Any], name: str | None) -> ImportedImage:
        path = self.root / IMPORTED / f"{record['id']}.json"
        if not path.exists():
            _write_durable(path, (json.dumps(record, indent=2, sort_keys=True) + "\n").encode())
        if name is not None:
            self.tag(name, record["id"])
        return self.load(record["id"])

    # --- names and look-ups -----------------------------------------------------

    def tag(self, name: str, image_id: str) -> None:
        """Point `name` at an image held here."""
        wanted = normalise_name(name)
        self.load(image_id)
        with self._names_locked() as names:
            names[wanted] = image_id

    def names(self) -> dict[str, str]:
        try:
            raw = json.loads((self.root / NAMES).read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise ImageError(f"{self.root / NAMES} is damaged: {exc}") from None
        if not isinstance(raw, dict):
            raise ImageError(f"{self.root / NAMES} is not a name table")
        return {
            str(key): str(value)
            for key, value in raw.items()
            if isinstance(value, str) and ID_PATTERN.fullmatch(value)
        }

    @contextlib.contextmanager
    def _names_locked(self) -> Iterator[dict[str, str]]:
        with open(self.root / ".names.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            names = self.names()
            yield names
            _write_durable(
                self.root / NAMES, (json.dumps(names, indent=2, sort_keys=True) + "\n").encode()
            )

    def remove(self, reference: str) -> tuple[ImportedImage, int]:
        """Forget an image, its names and the layers no other image uses; (it, bytes freed).

        The record goes first, so a crash half-way leaves layers no image names,
        which a later ``remove`` or the block store's ``gc`` releases.
        """
        with self._locked():
            return self._remove(reference)

    def _remove(self, reference: str) -> tuple[ImportedImage, int]:
        image = self.resolve(reference)
        with self._names_locked() as names:
            for name in [n for n, ident in names.items() if ident == image.id]:
                del names[name]
            (self.root / IMPORTED / f"{image.id}.json").unlink(missing_ok=True)
        still_used = {layer["manifest"] for other in self.list() for layer in other.layers}
        still_used |= {other.disk["manifest"] for other in self.list() if other.disk}
        mine = [(layer["manifest"], layer["diff_id"]) for layer in image.layers]
        if image.disk:
            mine.append((image.disk["manifest"], None))
        for manifest, diff_id in mine:
            if manifest not in still_used:
                self.store.remove_manifest(bytes.fromhex(manifest))
                if diff_id is not None:
                    self._layer_record(diff_id).unlink(missing_ok=True)
        return image, self.store.gc().bytes_freed

    def resolve(self, reference: str) -> ImportedImage:
        """The image a name (``NAME[:TAG]``) or an id names."""
        if ID_PATTERN.fullmatch(reference):
            return self.load(reference)
        wanted = normalise_name(reference)
        image_id = self.names().get(wanted)
        if image_id is None:
            raise ImageError(f"no image named {wanted} in {self.root}")
        return self.load(image_id)

    def load(self, image_id: str) -> ImportedImage:
        if not ID_PATTERN.fullmatch(image_id):
            raise ImageError(f"not an image id (64 hex digits): {image_id[:80]!r}")
        path = self.root / IMPORTED / f"{image_id}.json"
        try:
            raw = json.loads(path.read_text())
            image = ImportedImage(
                id=raw["id"],
                kind=raw["kind"],
                settings=dict(raw["settings"]),
                layers=tuple(raw["layers"]),
                disk=raw["disk"],
                size_bytes=int(raw["size_bytes"]),
                created=float(raw["created"]),
            )
        except FileNotFoundError:
            raise ImageError(f"no imported image {image_id} in {self.root}") from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ImageError(f"imported image {image_id} is damaged: {exc}") from None
        names = tuple(sorted(n for n, ident in self.names().items() if ident == image_id))
        return dataclasses.replace(image, names=names)

    def list(self) -> list[ImportedImage]:
        """Every imported image, oldest first."""
        ids = sorted(
            p.stem for p in (self.root / IMPORTED).glob("*.json") if ID_PATTERN.fullmatch(p.stem)
        )
        return sorted((self.load(ident) for ident in ids), key=lambda i: (i.created, i.id))


def disk_id(size: int, digests: tuple[bytes, ...]) -> str:
    """A disk image's id: the hex BLAKE2b-256 over its size and its blocks' digests."""
    digest = hashlib.blake2b(digest_size=32, person=b"gleaner-image")
    digest.update(b"disk\x00" + size.to_bytes(8, "big") + b"".join(digests))
    return digest.hexdigest()


def _record_json(record: bytes) -> dict[str, Any]:
    if not isinstance(record, bytes) or len(record) > MAX_RECORD_BYTES:
        raise ImageError(f"an image record is bytes, at most {MAX_RECORD_BYTES}")
    try:
        raw = json.loads(record)
    except (ValueError, RecursionError) as exc:
        raise ImageError(f"an image record is not JSON: {exc}") from None
    if not isinstance(raw, dict) or raw.get("kind") not in ("oci", "disk"):
        raise ImageError("an image record names no kind (oci or disk)")
    if not isinstance(raw.get("id"), str) or not ID_PATTERN.fullmatch(raw["id"]):
        raise ImageError("an image record's id is not 64 hex digits")
    layers = raw.get("layers")
    if raw["kind"] == "oci" and (
        not isinstance(layers, list) or not all(isinstance(layer, dict) for layer in layers)
    ):
        raise ImageError("an image record's layers are not a list of objects")
    return raw


def _digest_of(value: Any) -> bytes:
    if not isinstance(value, str) or not ID_PATTERN.fullmatch(value):
        raise ImageError("an image record names a manifest that is not 64 hex digits")
    return bytes.fromhex(value)


def _only_file(manifest: Manifest, name: str, max_bytes: int) -> FileEntry:
    if [entry.name for entry in manifest.files] != [name]:
        raise ImageError(f"manifest {manifest.digest.hex()[:12]} is not one {name}")
    if manifest.files[0].size > max_bytes:
        raise ImageError(
            f"manifest {manifest.digest.hex()[:12]}'s {name} is over {max_bytes} bytes"
        )
    return manifest.files[0]


class _Sha256:
    """A reader that hashes what passes through it."""

    def __init__(self, source: IO[bytes]) -> None:
        self.source, self.digest = source, hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.source.read(size)
        self.digest.update(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


def _write_durable(path: Path, data: bytes) -> None:
    """Write `path` whole or not at all, and on disk before this returns."""
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(name, 0o644)
        os.replace(name, path)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


__all__ = ["ImageLibrary", "ImportResult", "ImportedImage", "OciImage", "normalise_name"]
