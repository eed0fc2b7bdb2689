"""A job's output files: read the guest's tar stream off its output disk, refuse what harms.

Theory of operation
-------------------
The guest writes its outputs as one tar stream (ustar, with GNU long names or
pax headers, as busybox or GNU ``tar -c`` write) at offset 0 of the raw output
disk, a fixed-size plain file on the host; the rest of the disk is zeros, so
an all-zero disk is an empty output. The host never mounts the guest's file
system: ``read_outputs`` reads the stream with ``tarfile`` in stream mode
(uncompressed, forward only) and writes the files itself.

The threat: a hostile guest controls every byte of the disk. So

* only regular files and folders are taken. A symbolic or hard link could point
  anywhere on the host, a device node could open the host's disks, a FIFO
  could block the reader; GNU sparse and contiguous files are formats busybox
  never writes, and sparse maps make ``tarfile`` read unbounded data;
* every name goes through ``archive_paths.safe_member_name`` (no absolute
  names, no ``..``), after pax and GNU long-name headers have replaced it;
* a path may appear once, and nothing may lie under a path that is a file;
* member count, each file's size and the total size are capped, checked
  against the header *before* any data is read and again on the bytes written;
* metadata headers (pax, GNU long names) are capped before ``tarfile`` reads
  them (``tarstream``: this Python's pax parser is quadratic, CVE-2024-6232);
* nothing is read past the disk's size when opened, even if the file grows;
* modes are ``0o644``, or ``0o755`` when the header has any execute bit:
  never setuid, setgid or sticky, never the tar's owners or times.

Every failure of the stream, tarfile's own errors included, becomes one
``OutputError``, as does an ``OSError`` while writing a member (a guest can
ask for a name the host's file system refuses). Files are written into a
fresh ``.outputs-*`` folder beside ``dest``, created with ``O_EXCL`` and
``O_NOFOLLOW``, and the folder is renamed to ``dest`` only when the whole
stream was accepted; on any failure it is removed, so ``dest`` never holds a
partial output and nothing else on the host is touched.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, cast

from segments.image.archive_paths import UnsafePath, names_the_root, safe_member_name
from segments.image.tarstream import ArchiveRefused, member_type, open_stream

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

__all__ = ["OutputError", "OutputFile", "OutputLimits", "read_outputs"]

CHUNK_BYTES = 1 << 20
FILE_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE)


class OutputError(ValueError):
    """The output stream is refused; the message is one clear line."""


@dataclass(frozen=True, slots=True)
class OutputLimits:
    max_members: int = 10_000
    max_file_bytes: int = 1 << 30
    max_total_bytes: int = 4 << 30


@dataclass(frozen=True, slots=True)
class OutputFile:
    path: str  # normalised relative path
    size: int
    sha256: str  # hex


class _DiskReader(io.RawIOBase):
    """The disk's bytes up to `size`, its size when opened, and never beyond."""

    def __init__(self, raw: io.BufferedReader, size: int) -> None:
        super().__init__()
        self._raw, self._left = raw, size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        with memoryview(buffer) as view:
            got = self._raw.readinto(view[: self._left]) or 0
        self._left -= got
        return got


def read_outputs(disk: Path, dest: Path, limits: OutputLimits = OutputLimits()) -> list[OutputFile]:
    """Write the files of `disk`'s tar stream into the new folder `dest`; list them by path.

    Raises OutputError when the stream is refused (then `dest` does not exist),
    FileExistsError when `dest` already exists.
    """
    if os.path.lexists(dest):
        raise FileExistsError(f"output folder {dest} already exists")
    staging = Path(tempfile.mkdtemp(prefix=".outputs-", dir=dest.parent))
    accepted = False
    try:
        with open(disk, "rb") as raw:
            files = _extract(_DiskReader(raw, os.fstat(raw.fileno()).st_size), staging, limits)
        os.chmod(staging, 0o755)
        os.rename(staging, dest)
        accepted = True
    finally:
        if not accepted:
            shutil.rmtree(staging, ignore_errors=True)
    return sorted(files, key=lambda file: file.path)


def _extract(reader: _DiskReader, root: Path, limits: OutputLimits) -> list[OutputFile]:
    kinds: dict[str, str] = {}  # path -> "file", "folder" or "implied folder"
    files: list[OutputFile] = []
    total, path = 0, ""
    try:
        with open_stream(cast(IO[bytes], reader)) as tar:
            for count, member in enumerate(tar, start=1):
                if count > limits.max_members:
                    raise OutputError(f"the output has over {limits.max_members} members")
                if member.isdir() and names_the_root(member.name):
                    continue  # busybox writes "./" first
                path = _check_member(member, kinds, limits, total)
                if member.isdir():
                    _make_folders(root, path, kinds)
                    kinds[path] = "folder"
                    continue
                _make_folders(root, path.rpartition("/")[0], kinds)
                kinds[path] = "file"
                data = tar.extractfile(member)
                assert data is not None  # a regular file always has data
                files.append(_write_file(root / path, path, member, data, limits, total))
                total += files[-1].size
    except (OutputError, UnsafePath, ArchiveRefused) as exc:
        raise OutputError(str(exc)) from exc
    except OSError as exc:
        raise OutputError(f"the output could not be copied (at {path[:80]!r}): {exc}") from exc
    except (tarfile.TarError, EOFError, ValueError, OverflowError, RecursionError) as exc:
        raise OutputError(f"the output disk holds no valid tar stream: {exc}") from exc
    return files


def _check_member(
    member: tarfile.TarInfo, kinds: dict[str, str], limits: OutputLimits, total: int
) -> str:
    """The member's normalised path, or OutputError; reads no data."""
    path = safe_member_name(member.name)
    label = f"archive member {path[:80]!r}"
    if member.type not in (*FILE_TYPES, tarfile.DIRTYPE):
        kind = member_type(member.type)
        raise OutputError(f"{label} is {kind}: only files and folders are taken")
    if member.sparse is not None or any(
        key.startswith("GNU.sparse.") for key in member.pax_headers
    ):
        raise OutputError(f"{label} is a GNU sparse file")
    previous = kinds.get(path)
    if previous is not None and not (member.isdir() and previous == "implied folder"):
        raise OutputError(f"{label} appears twice")
    parts = path.split("/")
    if any(kinds.get("/".join(parts[:depth])) == "file" for depth in range(1, len(parts))):
        raise OutputError(f"{label} lies under a file")
    if member.isdir():
        return path
    if member.size < 0:
        raise OutputError(f"{label} has a negative size")
    if member.size > limits.max_file_bytes:
        raise OutputError(f"{label} is over the {limits.max_file_bytes}-byte limit for one file")
    if total + member.size > limits.max_total_bytes:
        raise OutputError(f"the output is over its {limits.max_total_bytes}-byte limit")
    return path


def _make_folders(root: Path, path: str, kinds: dict[str, str]) -> None:
    """Create `path` and its missing parents under `root`, mode 0o755, noting them in `kinds`."""
    parts = path.split("/") if path else []
    for depth in range(1, len(parts) + 1):
        folder = "/".join(parts[:depth])
        if folder not in kinds:
            os.mkdir(root / folder, 0o755)
            os.chmod(root / folder, 0o755)  # whatever the umask
            kinds[folder] = "implied folder"


def _write_file(
    target: Path,
    path: str,
    member: tarfile.TarInfo,
    data: IO[bytes],
    limits: OutputLimits,
    total: int,
) -> OutputFile:
    """Copy `data` to the new file `target`, counting the bytes against the limits."""
    mode = 0o755 if member.mode & 0o111 else 0o644
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    digest, size = hashlib.sha256(), 0
    with os.fdopen(os.open(target, flags, mode), "wb") as out:
        os.fchmod(out.fileno(), mode)  # whatever the umask
        while chunk := data.read(CHUNK_BYTES):
            size += len(chunk)
            if size > member.size or size > limits.max_file_bytes:
                raise OutputError(f"archive member {path[:80]!r} holds more than it declared")
            if total + size > limits.max_total_bytes:
                raise OutputError(f"the output is over its {limits.max_total_bytes}-byte limit")
            digest.update(chunk)
            out.write(chunk)
    return OutputFile(path=path, size=size, sha256=digest.hexdigest())
