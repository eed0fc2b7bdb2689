"""Image archives built here, from files, the way podman/skopeo (OCI) and docker save write them.

No registry and no daemon: a layer is a tar made with ``tarfile``, the archive
an OCI image layout (or Docker's ``manifest.json`` layout) in a tar, every blob
named by its SHA-256. Hostile layers are made by passing TarInfo members.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Member = tuple[tarfile.TarInfo, bytes]


def file_member(name: str, data: bytes, mode: int = 0o644) -> Member:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), mode
    return info, data


def dir_member(name: str) -> Member:
    info = tarfile.TarInfo(name)
    info.type, info.mode = tarfile.DIRTYPE, 0o755
    return info, b""


def link_member(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> Member:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, b""


def device_member(name: str, kind: bytes = tarfile.CHRTYPE) -> Member:
    info = tarfile.TarInfo(name)
    info.type, info.devmajor, info.devminor = kind, 1, 3
    return info, b""


def layer_tar(members: Sequence[Member]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for info, data in members:
            archive.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buffer.getvalue()


def files_layer(files: dict[str, bytes]) -> list[Member]:
    """A layer of plain files (folders implied), in path order."""
    return [file_member(name, data) for name, data in sorted(files.items())]


def _plain(layer: list[Member] | bytes) -> bytes:
    return layer if isinstance(layer, bytes) else layer_tar(layer)


@dataclass
class ImageSpec:
    layers: list[list[Member] | bytes]  # members, or a layer's tar bytes as they are
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=lambda: ["/bin/sh"])
    env: list[str] = field(default_factory=lambda: ["PATH=/usr/bin:/bin"])
    working_dir: str = "/"
    architecture: str = "amd64"
    gzip_layers: bool = True
    tag: str = "latest"


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def config_json(spec: ImageSpec, diff_ids: list[str]) -> bytes:
    config: dict[str, Any] = {
        "architecture": spec.architecture,
        "os": "linux",
        "config": {
            "Entrypoint": spec.entrypoint or None,
            "Cmd": spec.cmd,
            "Env": spec.env,
            "WorkingDir": spec.working_dir,
        },
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }
    return json.dumps(config).encode()


def write_oci_archive(path: Path, spec: ImageSpec) -> Path:
    """An OCI image layout in a tar (what ``podman save --format oci-archive`` writes)."""
    blobs: dict[str, bytes] = {}
    plains = [_plain(layer) for layer in spec.layers]
    layer_descs = []
    for plain in plains:
        blob = gzip.compress(plain, mtime=0) if spec.gzip_layers else plain
        blobs[_digest(blob)] = blob
        media = "application/vnd.oci.image.layer.v1.tar" + ("+gzip" if spec.gzip_layers else "")
        layer_descs.append({"mediaType": media, "digest": _digest(blob), "size": len(blob)})
    config = config_json(spec, [_digest(plain) for plain in plains])
    blobs[_digest(config)] = config
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": _digest(config),
                "size": len(config),
            },
            "layers": layer_descs,
        }
    ).encode()
    blobs[_digest(manifest)] = manifest
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": _digest(manifest),
                "size": len(manifest),
                "annotations": {"org.opencontainers.image.ref.name": spec.tag},
            }
        ],
    }
    files = {
        "oci-layout": b'{"imageLayoutVersion": "1.0.0"}',
        "index.json": json.dumps(index).encode(),
        **{f"blobs/sha256/{d.removeprefix('sha256:')}": blob for d, blob in blobs.items()},
    }
    path.write_bytes(layer_tar(files_layer(files)))
    return path


def write_docker_archive(path: Path, spec: ImageSpec) -> Path:
    """Docker's own layout (``docker save`` before Docker 25): manifest.json, layer tars."""
    plains = [_plain(layer) for layer in spec.layers]
    config = config_json(spec, [_digest(plain) for plain in plains])
    config_name = f"{hashlib.sha256(config).hexdigest()}.json"
    files = {config_name: config}
    layer_names = []
    for plain in plains:
        name = f"{hashlib.sha256(plain).hexdigest()}/layer.tar"
        files[name] = plain
        layer_names.append(name)
    manifest = [
        {"Config": config_name, "RepoTags": [f"test/img:{spec.tag}"], "Layers": layer_names}
    ]
    files["manifest.json"] = json.dumps(manifest).encode()
    path.write_bytes(layer_tar(files_layer(files)))
    return path
