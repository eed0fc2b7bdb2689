"""OCI image archives (and ``docker save`` archives): read one, trusting nothing in it.

Theory of operation
-------------------
An image archive is a tar file holding an OCI image layout (``oci-layout``,
``index.json``, ``blobs/sha256/HEX``: what ``podman save``, ``skopeo copy …
oci-archive:`` and ``buildah push`` write) or Docker's own layout
(``manifest.json`` naming a config file and layer tars: what ``docker save``
wrote before Docker 25, which writes both). No daemon and no registry is
involved; the archive is a file the job owner has.

Everything in it is the image author's claim, so it is read in this order,
each step checked before the next is believed:

1. The outer tar's members are listed (regular files only, at most
   ``MAX_ARCHIVE_MEMBERS``), never extracted. JSON documents are read only up
   to ``MAX_DOCUMENT_BYTES``.
2. The index (or Docker's manifest list) picks one image manifest for
   linux/amd64. Every blob is named by a ``sha256:`` digest and its bytes are
   hashed and compared, with its declared size, before they are parsed.
3. The config gives the run settings (entrypoint, cmd, env, working folder,
   user, volumes) and the layers' ``diff_ids``: the SHA-256 of each layer's
   uncompressed tar. Each setting is type- and length-checked.
4. Each layer streams once through ``open_layer``: the compressed bytes are
   hashed against the manifest's digest, gunzipped if they are gzip, hashed
   against the config's diff_id and copied, uncompressed, to a file the caller
   chose, while ``layers.check_layer`` reads every member header. A layer is
   kept uncompressed so that identical layers are identical blocks in the
   block store, whatever compressor the image's author used.

The result, ``OciImage``, is what the image library stores. Its ``content_id``
covers the checked settings and the diff_ids, so the same image has the same
id however it was packed or compressed.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, cast

from segments.image.archive_paths import UnsafePath, safe_member_name
from segments.image.errors import ImageError
from segments.image.layers import Changeset, LayerLimits, check_layer
from segments.image.tarstream import PARSE_ERRORS, ArchiveRefused, open_archive

MAX_ARCHIVE_MEMBERS = 100_000
MAX_DOCUMENT_BYTES = 4 << 20
MAX_LAYERS = 127
MAX_STRING = 4096
MAX_LIST = 1024
DIGEST = re.compile(r"sha256:([0-9a-f]{64})")
INDEX_TYPES = {
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
}
MANIFEST_TYPES = {
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
}
LAYER_TYPES = {
    "application/vnd.oci.image.layer.v1.tar": False,
    "application/vnd.oci.image.layer.v1.tar+gzip": True,
    "application/vnd.docker.image.rootfs.diff.tar.gzip": True,
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": True,
}
GZIP_MAGIC = b"\x1f\x8b"
COPY_CHUNK = 1 << 20
MAX_TRAILER_BYTES = 1 << 20  # zeros after a layer's end-of-archive blocks (tar pads to records)


class OciError(ImageError):
    """The archive is refused; the message is one clear line."""


@dataclass(frozen=True, slots=True)
class RunSettings:
    """How the image says to run it (the OCI config's ``config`` object, checked)."""

    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    working_dir: str = ""
    user: str = ""
    volumes: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {
            "entrypoint": list(self.entrypoint),
            "cmd": list(self.cmd),
            "env": list(self.env),
            "working_dir": self.working_dir,
            "user": self.user,
            "volumes": list(self.volumes),
        }


@dataclass(frozen=True, slots=True)
class LayerRef:
    """A layer as the manifest names it: blob member, compressed digest and size, diff_id."""

    member: str
    digest: str
    size: int
    diff_id: str
    gzipped: bool | None  # None: Docker's layout says nothing, the magic decides


@dataclass(frozen=True, slots=True)
class OciImage:
    settings: RunSettings
    layers: tuple[LayerRef, ...]
    tags: tuple[str, ...]

    @property
    def diff_ids(self) -> list[str]:
        return [layer.diff_id for layer in self.layers]

    def content_id(self) -> str:
        return content_id(self.settings, self.diff_ids)


def content_id(settings: RunSettings, diff_ids: list[str]) -> str:
    """An OCI image's id: the hex BLAKE2b-256 over its run settings and its layers' diff_ids."""
    body = {"kind": "oci", "settings": settings.as_dict(), "diff_ids": diff_ids}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.blake2b(canonical, digest_size=32, person=b"gleaner-image").hexdigest()


def settings_from(raw: Any, diff_ids: Any) -> tuple[RunSettings, list[str]]:
    """Run settings and diff_ids as an image record states them (``as_dict``), checked
    exactly as an archive's config is; OciError if they are not well-formed."""
    if not isinstance(raw, dict):
        raise OciError("the image's settings are not an object")
    config = {
        "os": "linux",
        "architecture": "amd64",
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "config": {
            "Entrypoint": raw.get("entrypoint"),
            "Cmd": raw.get("cmd"),
            "Env": raw.get("env"),
            "WorkingDir": raw.get("working_dir"),
            "User": raw.get("user"),
            "Volumes": {_text(name): {} for name in _list(raw.get("volumes") or [], "volumes")},
        },
    }
    return _parse_config(config)


class OciArchive:
    """An open image archive; use as a context manager."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.file = open(path, "rb")  # noqa: SIM115 (closed by close)
        except OSError as exc:
            raise OciError(f"cannot open {path}: {exc.strerror}") from None
        self.members: dict[str, tarfile.TarInfo] = {}
        try:
            self.tar = open_archive(self.file)
            for count, info in enumerate(self.tar, start=1):
                if count > MAX_ARCHIVE_MEMBERS:
                    raise OciError(f"{path} has over {MAX_ARCHIVE_MEMBERS} members")
                if info.isreg():
                    self.members[_safe(info.name)] = info
        except ArchiveRefused as exc:
            self.close()
            raise OciError(f"{path} refused: {exc}") from None
        except (OSError, *PARSE_ERRORS) as exc:
            self.close()
            raise OciError(f"{path} is not a readable tar archive: {exc}") from None
        except OciError:
            self.close()
            raise

    def close(self) -> None:
        if hasattr(self, "tar"):
            self.tar.close()
        self.file.close()

    def __enter__(self) -> OciArchive:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- the documents ----------------------------------------------------------

    def read_image(self) -> OciImage:
        if "index.json" in self.members:
            return self._read_oci()
        if "manifest.json" in self.members:
            return self._read_docker()
        raise OciError(f"{self.path} holds neither index.json nor manifest.json")

    def _read_oci(self) -> OciImage:
        index = self._json("index.json", None, None)
        descriptor, tags = self._pick(index, depth=0)
        manifest = self._json(_blob(descriptor["digest"]), descriptor["digest"], descriptor["size"])
        if not isinstance(manifest, dict):
            raise OciError("the chosen manifest is not an object")
        media = manifest.get("mediaType")
        if media is not None and (not isinstance(media, str) or media not in MANIFEST_TYPES):
            raise OciError("the chosen manifest is not an image manifest")
        config_ref = _descriptor(manifest.get("config"), "manifest config")
        config = self._json(_blob(config_ref["digest"]), config_ref["digest"], config_ref["size"])
        settings, diff_ids = _parse_config(config)
        raw_layers = _list(manifest.get("layers"), "manifest layers")
        if len(raw_layers) != len(diff_ids):
            raise OciError(f"{len(raw_layers)} layers but {len(diff_ids)} diff_ids in the config")
        layers = []
        for raw, diff_id in zip(raw_layers, diff_ids, strict=True):
            ref = _descriptor(raw, "layer")
            media = _text(raw.get("mediaType", ""))
            if media not in LAYER_TYPES:
                raise OciError(f"layer media type {media[:100]!r} is not supported (tar or gzip)")
            layers.append(
                LayerRef(
                    _blob(ref["digest"]), ref["digest"], ref["size"], diff_id, LAYER_TYPES[media]
                )
            )
        return OciImage(settings, tuple(layers), tags)

    def _pick(self, index: Any, depth: int) -> tuple[dict[str, Any], tuple[str, ...]]:
        """The linux/amd64 image manifest an index names (following one nested index)."""
        entries = _list(index.get("manifests") if isinstance(index, dict) else None, "index")
        chosen = [
            entry
            for entry in entries
            if isinstance(entry, dict)
            and _platform_ok(entry.get("platform"))
            and isinstance(entry.get("mediaType"), str)
            and entry["mediaType"] in INDEX_TYPES | MANIFEST_TYPES
        ]
        if not chosen:
            raise OciError("the index names no linux/amd64 image")
        descriptor = _descriptor(chosen[0], "index entry")
        annotations = chosen[0].get("annotations")
        tag = (
            annotations.get("org.opencontainers.image.ref.name")
            if isinstance(annotations, dict)
            else None
        )
        tags = (_text(tag),) if isinstance(tag, str) else ()
        if chosen[0]["mediaType"] in INDEX_TYPES:
            if depth >= 1:
                raise OciError("the index nests indexes more than one deep")
            nested = self._json(
                _blob(descriptor["digest"]), descriptor["digest"], descriptor["size"]
            )
            inner, inner_tags = self._pick(nested, depth + 1)
            return inner, tags or inner_tags
        return descriptor, tags

    def _read_docker(self) -> OciImage:
        entries = _list(self._json("manifest.json", None, None), "manifest.json")
        if len(entries) != 1 or not isinstance(entries[0], dict):
            raise OciError("manifest.json must name exactly one image")
        entry = entries[0]
        config_member = _safe(_text(entry.get("Config")))
        digest = "sha256:" + _config_hex(config_member)
        config = self._json(config_member, digest, None)
        settings, diff_ids = _parse_config(config)
        members = [_safe(_text(name)) for name in _list(entry.get("Layers"), "Layers")]
        if len(members) != len(diff_ids):
            raise OciError(f"{len(members)} layers but {len(diff_ids)} diff_ids in the config")
        layers = []
        for member, diff_id in zip(members, diff_ids, strict=True):
            info = self._member(member)
            layers.append(LayerRef(member, "", info.size, diff_id, None))
        tags = tuple(_text(tag) for tag in _list(entry.get("RepoTags") or [], "RepoTags"))
        return OciImage(settings, tuple(layers), tags)

    def _member(self, name: str) -> tarfile.TarInfo:
        info = self.members.get(name)
        if info is None:
            raise OciError(f"the archive has no {name[:120]!r}")
        return info

    def _json(self, name: str, digest: str | None, size: int | None) -> Any:
        info = self._member(name)
        if info.size > MAX_DOCUMENT_BYTES:
            raise OciError(f"{name} is over {MAX_DOCUMENT_BYTES} bytes")
        if size is not None and info.size != size:
            raise OciError(f"{name} is {info.size} bytes, its descriptor says {size}")
        data = self._open(info).read(MAX_DOCUMENT_BYTES + 1)
        if digest is not None and "sha256:" + hashlib.sha256(data).hexdigest() != digest:
            raise OciError(f"{name} does not match its digest")
        try:
            return json.loads(data)
        except (ValueError, RecursionError) as exc:
            raise OciError(f"{name} is not JSON: {exc}") from None

    def _open(self, info: tarfile.TarInfo) -> IO[bytes]:
        stream = self.tar.extractfile(info)
        if stream is None:
            raise OciError(f"cannot read {info.name[:120]!r}")
        return stream

    # --- the layers -------------------------------------------------------------

    def open_layer(self, layer: LayerRef, dest: Path, limits: LayerLimits) -> Changeset:
        """Check `layer` and write it, uncompressed, to `dest`; its changeset, or OciError."""
        info = self._member(layer.member)
        if layer.digest and info.size != layer.size:
            raise OciError(
                f"layer {layer.member} is {info.size} bytes, the manifest says {layer.size}"
            )
        packed = _Hashing(self._open(info))
        gzipped = layer.gzipped
        if gzipped is None:
            gzipped = packed.peek(2) == GZIP_MAGIC
        with open(dest, "wb") as out:
            unpacked = gzip.GzipFile(fileobj=cast(IO[bytes], packed)) if gzipped else packed
            plain = _Hashing(cast(IO[bytes], unpacked), out)
            try:
                changes = check_layer(cast(IO[bytes], plain), limits)
                plain.drain(MAX_TRAILER_BYTES)  # the tar's padding is part of the diff_id
            except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile is an OSError
                raise OciError(f"layer {layer.member} cannot be unpacked: {exc}") from None
        if layer.digest:
            packed.drain()
            if "sha256:" + packed.sha256.hexdigest() != layer.digest:
                raise OciError(f"layer {layer.member} does not match its digest")
        if "sha256:" + plain.sha256.hexdigest() != layer.diff_id:
            raise OciError(f"layer {layer.member} does not match its diff_id in the config")
        return changes


class _Hashing:
    """A reader that hashes what passes through it and optionally copies it to `copy`."""

    def __init__(self, source: IO[bytes], copy: IO[bytes] | None = None) -> None:
        self.source, self.copy = source, copy
        self.sha256 = hashlib.sha256()
        self.buffer = b""

    def peek(self, count: int) -> bytes:
        if len(self.buffer) < count:
            self.buffer += self.source.read(count - len(self.buffer))
        return self.buffer[:count]

    def read(self, size: int = -1) -> bytes:
        if self.buffer:
            data, self.buffer = self.buffer, b""
            if size < 0 or size > len(data):
                data += self.source.read(-1 if size < 0 else size - len(data))
            else:
                data, self.buffer = data[:size], data[size:]
        else:
            data = self.source.read(size)
        self.sha256.update(data)
        if self.copy is not None:
            self.copy.write(data)
        return data

    def drain(self, limit: int | None = None) -> None:
        """Read to the end; with `limit`, refuse more than that or anything but zeros."""
        total = 0
        while chunk := self.read(COPY_CHUNK):
            total += len(chunk)
            if limit is not None and (total > limit or chunk.count(0) != len(chunk)):
                raise OciError(
                    f"a layer has data after its tar's end (over {limit} bytes of zeros)"
                )


def _safe(name: str) -> str:
    try:
        return safe_member_name(name)
    except UnsafePath as exc:
        raise OciError(f"image archive refused: {exc}") from None


def _blob(digest: str) -> str:
    return f"blobs/sha256/{digest.removeprefix('sha256:')}"


def _config_hex(member: str) -> str:
    """Docker's layout names the config by its digest: blobs/sha256/HEX or HEX.json."""
    stem = member.rsplit("/", 1)[-1].removesuffix(".json")
    if not re.fullmatch(r"[0-9a-f]{64}", stem):
        raise OciError(f"the config {member[:120]!r} is not named by its digest")
    return stem


def _descriptor(raw: Any, what: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise OciError(f"{what} is not a descriptor")
    digest, size = raw.get("digest"), raw.get("size")
    if not isinstance(digest, str) or not DIGEST.fullmatch(digest):
        raise OciError(f"{what} digest is not sha256:HEX")
    if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size < 1 << 40:
        raise OciError(f"{what} size is not a byte count")
    return {"digest": digest, "size": size, "mediaType": raw.get("mediaType")}


def _platform_ok(platform: Any) -> bool:
    if platform is None:
        return True  # a single-image index often says nothing; the config decides
    return (
        isinstance(platform, dict)
        and platform.get("os") == "linux"
        and platform.get("architecture") == "amd64"
    )


def _parse_config(config: Any) -> tuple[RunSettings, list[str]]:
    if not isinstance(config, dict):
        raise OciError("the image config is not an object")
    if config.get("os") != "linux" or config.get("architecture") != "amd64":
        raise OciError(
            f"the image is for {config.get('os')!r}/{config.get('architecture')!r}, not linux/amd64"
        )
    rootfs = config.get("rootfs")
    if not isinstance(rootfs, dict) or rootfs.get("type") != "layers":
        raise OciError("the image config has no rootfs of layers")
    diff_ids = [_text(value) for value in _list(rootfs.get("diff_ids"), "diff_ids")]
    if not 0 < len(diff_ids) <= MAX_LAYERS:
        raise OciError(f"an image has 1 to {MAX_LAYERS} layers, this one {len(diff_ids)}")
    if not all(DIGEST.fullmatch(value) for value in diff_ids):
        raise OciError("a diff_id is not sha256:HEX")
    run = config.get("config") or {}
    if not isinstance(run, dict):
        raise OciError("the image config's config is not an object")
    volumes = run.get("Volumes") or {}
    if not isinstance(volumes, dict) or len(volumes) > MAX_LIST:
        raise OciError("the image config's Volumes is not an object")
    settings = RunSettings(
        entrypoint=_strings(run.get("Entrypoint"), "Entrypoint"),
        cmd=_strings(run.get("Cmd"), "Cmd"),
        env=_strings(run.get("Env"), "Env"),
        working_dir=_text(run.get("WorkingDir") or ""),
        user=_text(run.get("User") or ""),
        volumes=tuple(sorted(_text(name) for name in volumes)),
    )
    if any("=" not in pair for pair in settings.env):
        raise OciError("an Env entry is not NAME=VALUE")
    return settings, diff_ids


def _strings(raw: Any, what: str) -> tuple[str, ...]:
    return tuple(_text(item) for item in _list(raw or [], what))


def _list(raw: Any, what: str) -> list[Any]:
    if not isinstance(raw, list) or len(raw) > MAX_LIST:
        raise OciError(f"{what} is not a list of at most {MAX_LIST}")
    return raw


def _text(raw: Any) -> str:
    if not isinstance(raw, str) or len(raw) > MAX_STRING or "\x00" in raw:
        raise OciError(
            f"expected a string of at most {MAX_STRING} characters, got {type(raw).__name__}"
        )
    return raw
