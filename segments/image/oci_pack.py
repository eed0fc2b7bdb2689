"""Pack local folders into an OCI image archive: one layer per folder, no daemon, no registry.

Theory of operation
-------------------
A job owner with a root file system in a folder (debootstrap, a build's
output) needs an image without Docker. ``pack`` writes each folder as one
layer, lowest first, and an OCI image layout around them in a tar, which
``gleaner image import`` (and podman, skopeo) read. A later folder's files
replace an earlier one's; whiteouts are not written, so a layer can add and
replace but not delete.

The archive is reproducible: members in path order, owner 0:0, mtime 0, gzip
with mtime 0 and no name, so the same folders give the same bytes and the
same layer digests on any host. Only files, folders and symbolic links are
packed; sockets, devices and FIFOs are skipped (a root file system's /dev is
the kernel's). Hard links are packed as separate copies.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import stat
import tarfile
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from segments.image.oci import RunSettings

INDEX_MEDIA = "application/vnd.oci.image.index.v1+json"
MANIFEST_MEDIA = "application/vnd.oci.image.manifest.v1+json"
CONFIG_MEDIA = "application/vnd.oci.image.config.v1+json"
LAYER_MEDIA = "application/vnd.oci.image.layer.v1.tar+gzip"


def pack(folders: Sequence[Path], out: Path, settings: RunSettings, tag: str = "latest") -> Path:
    """Write an OCI archive at `out` whose layers are `folders`, lowest first."""
    with tempfile.TemporaryDirectory(prefix=".pack-", dir=out.parent) as tmp:
        blobs: dict[str, Path] = {}
        layers: list[dict[str, Any]] = []
        diff_ids: list[str] = []
        for number, folder in enumerate(folders):
            plain, packed = Path(tmp) / f"{number}.tar", Path(tmp) / f"{number}.tar.gz"
            _write_layer(folder, plain)
            diff_ids.append(_digest_file(plain))
            with (
                open(plain, "rb") as source,
                open(packed, "wb") as raw,
                gzip.GzipFile(
                    filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6
                ) as zipped,
            ):
                while chunk := source.read(1 << 20):
                    zipped.write(chunk)
            digest = _digest_file(packed)
            blobs[digest] = packed
            layers.append(
                {"mediaType": LAYER_MEDIA, "digest": digest, "size": packed.stat().st_size}
            )
        run: dict[str, Any] = {
            "Entrypoint": list(settings.entrypoint) or None,
            "Cmd": list(settings.cmd) or None,
            "Env": list(settings.env),
            "WorkingDir": settings.working_dir,
            "User": settings.user,
            "Volumes": {name: {} for name in settings.volumes} or None,
        }
        config = {
            "architecture": "amd64",
            "os": "linux",
            "config": run,
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }
        config_ref = _document(Path(tmp), blobs, config, CONFIG_MEDIA)
        manifest = {"schemaVersion": 2, "mediaType": MANIFEST_MEDIA, "config": config_ref}
        manifest_ref = _document(Path(tmp), blobs, {**manifest, "layers": layers}, MANIFEST_MEDIA)
        manifest_ref["annotations"] = {"org.opencontainers.image.ref.name": tag}
        index = {"schemaVersion": 2, "mediaType": INDEX_MEDIA, "manifests": [manifest_ref]}
        with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as archive:
            _add_bytes(archive, "oci-layout", b'{"imageLayoutVersion": "1.0.0"}')
            _add_bytes(archive, "index.json", json.dumps(index, sort_keys=True).encode())
            for digest in sorted(blobs):
                info = _info(f"blobs/sha256/{digest.removeprefix('sha256:')}")
                info.size = blobs[digest].stat().st_size
                with open(blobs[digest], "rb") as data:
                    archive.addfile(info, data)
    return out


def _write_layer(folder: Path, dest: Path) -> None:
    with tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as layer:
        for path, name in _walk(folder):
            mode = path.lstat()
            info = _info(name)
            info.mode = stat.S_IMODE(mode.st_mode)
            if stat.S_ISDIR(mode.st_mode):
                info.type = tarfile.DIRTYPE
                layer.addfile(info)
            elif stat.S_ISLNK(mode.st_mode):
                info.type, info.linkname = tarfile.SYMTYPE, os.readlink(path)
                layer.addfile(info)
            elif stat.S_ISREG(mode.st_mode):
                info.size = mode.st_size
                with open(path, "rb") as data:
                    layer.addfile(info, data)


def _walk(folder: Path) -> Iterator[tuple[Path, str]]:
    """Every entry under `folder` in path order, with its name in the layer."""
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        path = Path(entry.path)
        name = path.relative_to(folder).as_posix()
        yield path, name
        if entry.is_dir(follow_symlinks=False):
            yield from ((sub, f"{name}/{rest}") for sub, rest in _walk(path))


def _info(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mtime = 0
    return info


def _add_bytes(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = _info(name)
    info.size, info.mode = len(data), 0o644
    archive.addfile(info, io.BytesIO(data))


def _document(
    tmp: Path, blobs: dict[str, Path], body: dict[str, Any], media: str
) -> dict[str, Any]:
    data = json.dumps(body, sort_keys=True).encode()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    path = tmp / digest.removeprefix("sha256:")
    path.write_bytes(data)
    blobs[digest] = path
    return {"mediaType": media, "digest": digest, "size": len(data)}


def _digest_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as source:
        while chunk := source.read(1 << 20):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()
