"""A job owner's own program on this node: its bundle, its image and its guest's disks.

Theory of operation
-------------------
A job that runs the owner's own image and command (``Work`` in its offers)
needs, on every host that runs a segment and on the owner that verifies one,
the four disks of ``segments/image/job_disks.py``. Two of them (the image
and the job tar) are read-only and the same everywhere; the other two (the
scratch and output disks) travel in the checkpoints.

* **The owner** makes the job's *bundle* when it is submitted (``make``): it
  resolves the image in its image library, applies OCI's command rules
  (``command_for``), writes the job tar (the command and the input files,
  within ``MAX_INPUT_BYTES``), and stores a manifest it signs in its segment
  store holding ``image.json`` (the library's record of the image) and
  ``job.tar``. The offer names that manifest's digest, the bytes a host
  lacking all of it would fetch, and the two disk sizes.
* **A host** (``disks``) makes the bundle's manifest and blocks present in its
  segment store (the manifest is named by its hash and signed, so any holder
  will do; it must hold exactly those two files, within their caps), then the
  image: held in its library under the record's id (ids cover content, and
  what the library holds was checked when it came), or else *adopted*
  (``ImageLibrary.adopt``), which fetches each layer's manifest and blocks from
  the same holders and checks them as an import does. It then writes the
  disks into the run's folder and evicts least-recently-used images that
  other jobs brought beyond the cache cap (``vm.image_cache_mib``).
* **Serving.** The block server answers from the segment store and the
  library's store (``BlockSources``), so a host that ran a job's segment can
  serve its image's blocks to the next, as the owner does.

The library's calls block (files, a lock); they run in worker threads, and
the adopting thread fetches through the trio loop (``trio.from_thread``).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path

import trio

from node.base.identity import Identity
from node.market.offer_messages import Work
from node.market.run_requests import RunRequest
from segments.image.errors import ImageError
from segments.image.job_disks import (
    JOB,
    MAX_INPUT_BYTES,
    Command,
    command_for,
    prepare_disks,
    write_job_tar,
)
from segments.image.library import ID_PATTERN, MAX_RECORD_BYTES, ImageLibrary, ImportedImage
from segments.image.outputs import OutputError, OutputFile, read_outputs
from segments.image.store import list_images
from segments.store.blocks import BlockStore, BlockStoreError
from segments.store.manifest import Manifest
from segments.store.transfer import FetchError, fetch, fetch_manifest
from segments.vm.runtime import Disk

log = logging.getLogger("gleaner.jobs")

RECORD_FILE, JOB_TAR = "image.json", "job.tar"
OUTPUT_DISK = "disk-3"  # a checkpoint's copy of the fourth disk (job_disks: outputs)
MAX_JOB_TAR_BYTES = MAX_INPUT_BYTES + (64 << 20)  # the inputs, the script and tar headers
MIB = 1 << 20
MAX_TAKEN_BUNDLES = 8  # bundles of other owners' jobs kept (their inputs can be large)
Holders = Sequence[tuple[str, int]]


class BundleError(Exception):
    """The job's bundle or image could not be made or taken here; the message says why."""


class BlockSources:
    """The block server's view: blocks and manifests of several stores, the first first."""

    def __init__(self, stores: Sequence[BlockStore]) -> None:
        self.stores = tuple(stores)

    def has_many(self, digests: Iterable[bytes]) -> set[bytes]:
        wanted, held = set(digests), set[bytes]()
        for store in self.stores:
            held |= store.has_many(wanted - held)
        return held

    def get(self, digest: bytes) -> bytes:
        for store in self.stores[:-1]:
            if store.has(digest):
                return store.get(digest)
        return self.stores[-1].get(digest)

    def manifest_bytes(self, digest: bytes) -> bytes | None:
        for store in self.stores:
            body = store.manifest_bytes(digest)
            if body is not None:
                return body
        return None


class JobBundles:
    def __init__(
        self,
        identity: Identity,
        store: BlockStore,
        library: ImageLibrary,
        cache_bytes: int,
    ) -> None:
        """`store` is the segment store; `library` this node's image library."""
        self.identity = identity
        self.store = store
        self.library = library
        self.cache_bytes = cache_bytes
        self.in_use: dict[str, int] = {}  # image id -> runs preparing or using it here
        self._taken: dict[bytes, None] = {}  # bundles other nodes made, oldest first
        self._image_ids: dict[bytes, str] = {}  # bundle digest -> its image's id
        self.stats = {
            "bundles_made": 0,
            "bundles_dropped": 0,
            "images_adopted": 0,
            "images_evicted": 0,
        }

    # -- the owner ------------------------------------------------------------------------

    async def make(self, request: RunRequest) -> Work:
        """Store the bundle of `request` here (signed by this node); the offer's Work."""
        return await trio.to_thread.run_sync(self._make, request)

    def _make(self, request: RunRequest) -> Work:
        try:
            image = self.library.resolve(request.image)
            command = command_for(
                image, request.command, request.entrypoint, request.env, request.working_dir
            )
            with tempfile.TemporaryDirectory(prefix="bundle-") as folder:
                tar, record = Path(folder) / JOB_TAR, Path(folder) / RECORD_FILE
                inputs = {name: Path(path) for name, path in request.inputs.items()}
                write_job_tar(command, inputs, tar, MAX_INPUT_BYTES)
                record.write_bytes(self.library.record(image.id))
                manifest = self.store.put_files({RECORD_FILE: record, JOB_TAR: tar}, self.identity)
        except (ImageError, BlockStoreError, OSError) as exc:
            raise BundleError(str(exc)) from None
        self.stats["bundles_made"] += 1
        return Work(
            bundle=manifest.digest,
            bundle_bytes=image.size_bytes + manifest.total_size,
            disk_mib=request.disk_mib,
            output_mib=request.output_mib,
        )

    def boot_image(self, image_store: Path, wanted: str | None) -> str:
        """The swarm image that boots a job owner's program: `wanted`, else the newest
        image built here from a "run" recipe (deploy/recipes/run.toml)."""
        images = list_images(image_store)
        if wanted is not None:
            if not any(image.id == wanted for image in images):
                raise BundleError(f"boot: no image {wanted[:16]} in {image_store}")
            return wanted
        runs = [i for i in images if i.recipe.get("image", {}).get("workload") == "run"]
        if not runs:
            raise BundleError(
                f"boot: no run image in {image_store} (gleaner image build deploy/recipes/run.toml)"
            )
        return max(runs, key=lambda image: image.created).id

    def command(self, request: RunRequest) -> Command:
        """The program `request` runs (to show the owner), by OCI's rules."""
        try:
            return command_for(
                self.library.resolve(request.image),
                request.command,
                request.entrypoint,
                request.env,
                request.working_dir,
            )
        except ImageError as exc:
            raise BundleError(str(exc)) from None

    def outputs(self, checkpoint: bytes, dest: Path, fresh: bool = False) -> list[OutputFile]:
        """The files the guest left in /gleaner/out, from a final checkpoint held here.

        They are read from the output disk's tar stream (never mounted), with
        ``outputs.read_outputs``' caps and path checks, into `dest` (made here). If
        `dest` exists it is what an earlier call extracted, and is listed (without
        hashes), unless `fresh` asks for it to be read again.
        """
        manifest = self.store.manifest(checkpoint)
        if manifest is None:
            raise BundleError("the job's last checkpoint is not held here")
        try:
            entry = manifest.file(OUTPUT_DISK)
        except KeyError:
            raise BundleError(
                f"the job's last checkpoint has no output disk ({OUTPUT_DISK})"
            ) from None
        if fresh:
            shutil.rmtree(dest, ignore_errors=True)
        if not dest.exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(prefix="outputs-", dir=dest.parent) as folder:
                raw = Path(folder) / "outputs.raw"
                try:
                    self.store.materialize(replace(manifest, files=(entry,)), raw)
                    return read_outputs(raw, dest)
                except (OutputError, BlockStoreError, OSError) as exc:
                    if not (dest.is_dir() and isinstance(exc, OSError)):
                        raise BundleError(f"the job's outputs: {exc}") from None
                    # another call extracted them meanwhile: list what it wrote
        return [
            OutputFile(path.relative_to(dest).as_posix(), path.stat().st_size, "")
            for path in sorted(dest.rglob("*"))
            if path.is_file()
        ]

    # -- a host (and the owner, to verify) ------------------------------------------------

    async def disks(self, work: Work, holders: Holders, folder: Path) -> tuple[Disk, ...]:
        """The guest's four disks for `work`, written into `folder` (fetched as needed).

        What is fetched never exceeds ``work.bundle_bytes`` (the size the offer
        declared, which the bid reserved disk for): the bundle and then the image's
        layers or disk count against it.
        """
        bundle = await self._bundle(work, holders)
        record = await trio.to_thread.run_sync(self._read_record, bundle)
        try:
            image_id = _record_id(record)
        except ValueError as exc:
            raise BundleError(str(exc)) from None
        self.in_use[image_id] = self.in_use.get(image_id, 0) + 1  # before eviction can see it
        try:
            budget = work.bundle_bytes - bundle.total_size
            image = await self._image(image_id, record, holders, budget)
            return await trio.to_thread.run_sync(self._write_disks, bundle, image, work, folder)
        finally:
            self.in_use[image_id] -= 1
            if not self.in_use[image_id]:
                del self.in_use[image_id]

    def image_held(self, work: Work) -> int:
        """The bytes of `work`'s bundle and image this node holds already (for a bid)."""
        bundle = self.store.manifest(work.bundle)
        if bundle is None:
            return 0
        held = bundle.total_size - sum(self.store.missing(bundle).values())
        image_id = self._image_ids.get(work.bundle)
        try:
            if image_id is None:
                image_id = self._image_ids[work.bundle] = _record_id(self._read_record(bundle))
            return held + self.library.load(image_id).size_bytes
        except (BundleError, ImageError, ValueError):
            return held

    async def _bundle(self, work: Work, holders: Holders) -> Manifest:
        try:
            manifest = self.store.manifest(work.bundle)
            if manifest is None:
                if not holders:
                    raise BundleError("the job's bundle is not here and nobody holds it")
                manifest = await fetch_manifest(work.bundle, list(holders))
                _check_bundle(manifest, work)
                await trio.to_thread.run_sync(self.store.add_manifest, manifest)
            else:
                _check_bundle(manifest, work)
            self._taken_bundle(manifest)
            if self.store.missing(manifest):
                await fetch(manifest, list(holders), self.store)
        except FetchError as exc:
            raise BundleError(f"fetching the job's bundle: {exc}") from None
        except BlockStoreError as exc:
            raise BundleError(f"storing the job's bundle: {exc}") from None
        return manifest

    def _taken_bundle(self, manifest: Manifest) -> None:
        """Keep the newest ``MAX_TAKEN_BUNDLES`` bundles other nodes made; drop the rest."""
        if manifest.producer == self.identity.node_id:
            return  # ours: the owner serves and verifies from it for the job's life
        self._taken.pop(manifest.digest, None)
        self._taken[manifest.digest] = None
        while len(self._taken) > MAX_TAKEN_BUNDLES:
            oldest = next(iter(self._taken))
            del self._taken[oldest]
            self._image_ids.pop(oldest, None)
            self.store.remove_manifest(oldest)
            self.stats["bundles_dropped"] += 1

    def _read_record(self, bundle: Manifest) -> bytes:
        try:
            return self.store.read_file(bundle, RECORD_FILE)
        except (BlockStoreError, KeyError) as exc:
            raise BundleError(f"the bundle's image record: {exc}") from None

    async def _image(
        self, image_id: str, record: bytes, holders: Holders, budget: int
    ) -> ImportedImage:
        try:
            return await trio.to_thread.run_sync(self.library.load, image_id)
        except ImageError:
            pass  # not here: adopt it
        remaining = [budget]

        def fetch_layer(digest: bytes, max_bytes: int) -> Manifest:
            cap = min(max_bytes, remaining[0])
            manifest = trio.from_thread.run(self._fetch_layer, digest, cap, holders)
            remaining[0] -= manifest.total_size
            return manifest

        def adopt() -> ImportedImage:
            adopted = self.library.adopt(record, fetch_layer)
            self.stats["images_adopted"] += 1
            keep = frozenset(self.in_use) | {adopted.id}
            evicted = self.library.evict(self.cache_bytes, keep)
            self.stats["images_evicted"] += len(evicted)
            return adopted

        try:
            image = await trio.to_thread.run_sync(adopt)
        except (ImageError, BlockStoreError, OSError) as exc:
            raise BundleError(f"taking the job's image: {exc}") from None
        log.info("adopted image %s (%d MiB)", image.id[:12], image.size_bytes // MIB)
        return image

    async def _fetch_layer(self, digest: bytes, max_bytes: int, holders: Holders) -> Manifest:
        store = self.library.store
        manifest = store.manifest(digest)
        if manifest is None:
            try:
                manifest = await fetch_manifest(digest, list(holders))
            except FetchError as exc:
                raise ImageError(f"fetching a layer: {exc}") from None
            if manifest.total_size > max_bytes:
                raise ImageError(f"a layer of {manifest.total_size} bytes is over {max_bytes}")
            await trio.to_thread.run_sync(store.add_manifest, manifest)
        if store.missing(manifest):
            try:
                await fetch(manifest, list(holders), store)
            except FetchError as exc:
                raise ImageError(f"fetching a layer: {exc}") from None
        return manifest

    def _write_disks(
        self, bundle: Manifest, image: ImportedImage, work: Work, folder: Path
    ) -> tuple[Disk, ...]:
        folder.mkdir(parents=True, exist_ok=True)
        tar = folder / JOB
        try:
            self.store.materialize(replace(bundle, files=(bundle.file(JOB_TAR),)), tar)
            return prepare_disks(
                self.library, image, tar, folder, work.disk_mib * MIB, work.output_mib * MIB
            )
        except (ImageError, BlockStoreError, OSError) as exc:
            raise BundleError(f"preparing the job's disks: {exc}") from None


def _check_bundle(manifest: Manifest, work: Work) -> None:
    if manifest.total_size > work.bundle_bytes:
        raise BundleError(f"a job bundle of {manifest.total_size} bytes, over what was offered")
    names = {entry.name: entry.size for entry in manifest.files}
    if set(names) != {RECORD_FILE, JOB_TAR} or len(manifest.files) != 2:
        raise BundleError(f"a job bundle holds {RECORD_FILE} and {JOB_TAR}, not {sorted(names)}")
    if names[RECORD_FILE] > MAX_RECORD_BYTES or names[JOB_TAR] > MAX_JOB_TAR_BYTES:
        raise BundleError("a job bundle's record or tar is over its cap")


def _record_id(record: bytes) -> str:
    try:
        value = json.loads(record)
    except ValueError as exc:
        raise ValueError(f"the bundle's image record is not JSON: {exc}") from None
    image_id = value.get("id") if isinstance(value, dict) else None
    if not isinstance(image_id, str) or not ID_PATTERN.fullmatch(image_id):
        raise ValueError("the bundle's image record has no image id")
    return image_id
