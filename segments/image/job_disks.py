"""The host side of a job owner's program: the four disks its guest boots with.

Theory of operation
-------------------
``runner.py`` says what the guest's ``/init`` expects: a scratch disk (vda),
the image (vdb), the job (vdc) and an output disk (vdd). ``prepare`` writes
them into a folder from an imported image (``library.py``), the job's
command and its input files:

* **scratch** is a sparse file of the job's disk size. For an OCI image it is
  empty (the guest makes its file system and unpacks the layers into it);
  for a disk image it is the image's raw disk, grown to the job's size;
* **image** is a header block and the layers' tars at block-aligned offsets,
  written block by block from the library's verified blocks (zero blocks
  stay holes); a disk image gets only the header saying "the root is on
  scratch";
* **job** is a tar, made here from trusted parts: ``job/run.sh`` (the
  command, as ``runner.run_script`` quotes it) and ``in/`` with the inputs,
  regular files only, names checked by ``archive_paths``, within
  ``max_input_bytes``;
* **outputs** is a sparse, zeroed file of the output size; after the guest
  powers off, ``outputs.read_outputs`` reads it.

The command follows OCI's (and ``docker run``'s) rules: the job's command
replaces the image's ``Cmd``, its entrypoint (if given) the image's
``Entrypoint`` and drops the image's ``Cmd``, and the program runs as
``ENTRYPOINT + CMD``, found by the image's ``PATH`` (not busybox's
applets); the job's env adds to and overrides the image's; the working
folder is the job's, else the image's, else ``/``.
"""

from __future__ import annotations

import io
import os
import re
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from segments.image.archive_paths import UnsafePath, safe_member_name
from segments.image.errors import ImageError
from segments.image.library import DISK_FILE, LAYER_FILE, ImageLibrary, ImportedImage
from segments.image.runner import (
    image_disk_header,
    layer_offsets,
    root_disk_header,
    run_script,
)
from segments.store.manifest import Manifest
from segments.vm.runtime import Disk

SCRATCH, IMAGE, JOB, OUTPUTS = "scratch.raw", "image.raw", "job.raw", "outputs.raw"
MAX_INPUT_BYTES = 1 << 30
MIN_DISK_BYTES = 16 << 20
MAX_DISK_BYTES = 1 << 40  # a sparse file's size; the offer and the host's disk cap come first
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True, slots=True)
class Command:
    argv: tuple[str, ...]
    env: tuple[str, ...]
    working_dir: str


def command_for(
    image: ImportedImage,
    command: Sequence[str] | None = None,
    entrypoint: Sequence[str] | None = None,
    env: Sequence[str] = (),
    working_dir: str | None = None,
) -> Command:
    """The program the guest runs, by OCI's rules (see the module docstring)."""
    settings = image.settings
    head = list(entrypoint if entrypoint is not None else settings.get("entrypoint", []))
    if command is not None:
        tail = list(command)
    elif entrypoint is not None:
        tail = []  # a new entrypoint drops the image's Cmd, as docker run does
    else:
        tail = list(settings.get("cmd", []))
    merged: dict[str, str] = {}
    for pair in [*settings.get("env", []), *env]:
        name, separator, value = pair.partition("=")
        if not separator or not ENV_NAME.fullmatch(name):
            raise ImageError(f"env entry {pair[:80]!r} is not NAME=VALUE")
        merged[name] = value
    folder = working_dir or settings.get("working_dir") or "/"
    argv = tuple(head + tail)
    if not argv:
        raise ImageError("the job has no command: the image has none and the job gives none")
    return Command(argv, tuple(f"{k}={v}" for k, v in merged.items()), folder)


def prepare(
    library: ImageLibrary,
    image: ImportedImage,
    command: Command,
    inputs: Mapping[str, Path],
    folder: Path,
    scratch_bytes: int,
    output_bytes: int,
    max_input_bytes: int = MAX_INPUT_BYTES,
) -> tuple[Disk, ...]:
    """Write the guest's four disks into `folder`; the Disks in the order the guest wants."""
    check_disk_sizes(scratch_bytes, output_bytes)
    folder.mkdir(parents=True, exist_ok=True)
    write_job_tar(command, inputs, folder / JOB, max_input_bytes)
    return prepare_disks(library, image, folder / JOB, folder, scratch_bytes, output_bytes)


def check_disk_sizes(scratch_bytes: int, output_bytes: int) -> None:
    for size in (scratch_bytes, output_bytes):
        if not MIN_DISK_BYTES <= size <= MAX_DISK_BYTES:
            raise ImageError(
                f"scratch and output disks take {MIN_DISK_BYTES} to {MAX_DISK_BYTES} bytes"
            )


def prepare_disks(
    library: ImageLibrary,
    image: ImportedImage,
    job_tar: Path,
    folder: Path,
    scratch_bytes: int,
    output_bytes: int,
) -> tuple[Disk, ...]:
    """The four disks, with a job tar already made (``write_job_tar``, here or by the owner).

    `job_tar` is used as it is (copied into `folder` unless it is already there):
    the guest reads it, the host never parses it. Its size must be whole sectors.
    """
    check_disk_sizes(scratch_bytes, output_bytes)
    folder.mkdir(parents=True, exist_ok=True)
    job = folder / JOB
    if job_tar.resolve() != job.resolve():
        _copy_sparse(job_tar, job)
    if job.stat().st_size % 512 or job.stat().st_size == 0:
        raise ImageError("the job tar is not whole 512-byte sectors")
    library.touch(image.id)  # the cache keeps what runs
    scratch, image_disk = folder / SCRATCH, folder / IMAGE
    with open(scratch, "wb") as out:
        if image.kind == "disk":
            assert image.disk is not None
            manifest = _manifest(library, image.disk["manifest"])
            size = manifest.file(DISK_FILE).size
            if size > scratch_bytes:
                raise ImageError(f"the image's disk is {size} bytes, over the job's disk size")
            library.store.write_into(manifest, DISK_FILE, out.fileno(), 0)
        out.truncate(scratch_bytes)
    with open(image_disk, "wb") as out:
        if image.kind == "disk":
            out.write(root_disk_header())
        else:
            manifests = [_manifest(library, layer["manifest"]) for layer in image.layers]
            sizes = [manifest.file(LAYER_FILE).size for manifest in manifests]
            placed = layer_offsets(sizes)
            out.write(image_disk_header(placed))
            for manifest, (offset, _) in zip(manifests, placed, strict=True):
                library.store.write_into(manifest, LAYER_FILE, out.fileno(), offset)
            end = placed[-1][0] + sizes[-1]
            out.truncate(end + (-end % 512))  # a block device is whole sectors
    with open(folder / OUTPUTS, "wb") as out:
        out.truncate(output_bytes)
    return (
        Disk(scratch),
        Disk(image_disk, read_only=True),
        Disk(job, read_only=True),
        Disk(folder / OUTPUTS),
    )


def _copy_sparse(source: Path, dest: Path) -> None:
    with open(source, "rb") as src, open(dest, "wb") as out:
        while chunk := src.read(1 << 20):
            if chunk.count(0) == len(chunk):
                out.seek(len(chunk), os.SEEK_CUR)
            else:
                out.write(chunk)
        out.truncate(src.tell())


def write_job_tar(
    command: Command, inputs: Mapping[str, Path], dest: Path, max_input_bytes: int
) -> None:
    """``job/run.sh`` and ``in/NAME`` for each input file, as one tar padded to sectors."""
    try:
        script = run_script(command.argv, command.env, command.working_dir).encode()
    except ValueError as exc:
        raise ImageError(str(exc)) from None
    checked, total = [], 0
    for name, path in sorted(inputs.items()):
        try:
            member = safe_member_name(name)
        except UnsafePath as exc:
            raise ImageError(f"input {exc}") from None
        if not path.is_file():
            raise ImageError(f"input {name!r}: {path} is not a file")
        total += path.stat().st_size
        if total > max_input_bytes:
            raise ImageError(f"the inputs are over {max_input_bytes} bytes")
        checked.append((member, path))
    with open(dest, "wb") as out:
        with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as archive:
            _add(archive, "job/run.sh", io.BytesIO(script), len(script), 0o755)
            for member, path in checked:
                with open(path, "rb") as data:
                    _add(archive, f"in/{member}", data, os.fstat(data.fileno()).st_size, 0o644)
        out.truncate(-(-out.tell() // 512) * 512)


def _add(archive: tarfile.TarFile, name: str, data: IO[bytes], size: int, mode: int) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode = size, mode
    archive.addfile(info, data)


def _manifest(library: ImageLibrary, digest_hex: str) -> Manifest:
    manifest = library.store.manifest(bytes.fromhex(digest_hex))
    if manifest is None or library.store.missing(manifest):
        raise ImageError(f"the image's blocks are not all here (manifest {digest_hex[:12]})")
    return manifest


__all__ = ["Command", "command_for", "prepare", "prepare_disks", "write_job_tar"]
