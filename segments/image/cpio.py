"""A newc ("070701") cpio writer and reader, written here so every field is ours.

Theory of operation
-------------------
The Linux kernel unpacks an initramfs from newc cpio archives. Each entry is a
110-byte ASCII header (the magic ``070701`` then thirteen 8-digit hex fields),
the NUL-terminated name padded to a multiple of 4 bytes, and the data padded to
a multiple of 4 bytes. The archive ends with an entry named ``TRAILER!!!``.

For a byte-for-byte reproducible archive the writer fixes everything a
general-purpose ``cpio`` copies from the build host: entries are sorted by path
(a parent always sorts before its children, so the kernel finds directories
before what they hold), inode numbers count up from 1 in that order, uid, gid
and mtime are 0, and modes come from the caller, never from the disk. Missing
parent directories are added (mode 0755). Nothing here does I/O.
"""

from __future__ import annotations

import stat
from collections.abc import Iterable
from dataclasses import dataclass

SANS_IO = True  # a core: tests/unit/test_import_graph.py holds it to no I/O

MAGIC = b"070701"
TRAILER = "TRAILER!!!"
HEADER_LEN = 110
FIELDS = 13
DIR_MODE = stat.S_IFDIR | 0o755


class CpioError(ValueError):
    """An archive is malformed, or an entry cannot be written."""


@dataclass(frozen=True, slots=True)
class Entry:
    """One archive member: `mode` holds the file type bits and the permissions."""

    path: str
    mode: int
    data: bytes = b""
    rdev_major: int = 0
    rdev_minor: int = 0

    @classmethod
    def directory(cls, path: str, perm: int = 0o755) -> Entry:
        return cls(path, stat.S_IFDIR | perm)

    @classmethod
    def file(cls, path: str, data: bytes, perm: int = 0o644) -> Entry:
        return cls(path, stat.S_IFREG | perm, data)

    @classmethod
    def symlink(cls, path: str, target: str) -> Entry:
        return cls(path, stat.S_IFLNK | 0o777, target.encode("utf-8"))

    @classmethod
    def char_device(cls, path: str, major: int, minor: int, perm: int = 0o600) -> Entry:
        return cls(path, stat.S_IFCHR | perm, b"", major, minor)


def _pad4(length: int) -> bytes:
    return b"\0" * (-length % 4)


def _normalise(path: str) -> str:
    parts = [part for part in path.split("/") if part not in ("", ".")]
    if not parts or ".." in parts:
        raise CpioError(f"bad archive path {path!r}")
    return "/".join(parts)


def _with_parents(entries: Iterable[Entry]) -> list[Entry]:
    by_path: dict[str, Entry] = {}
    for entry in entries:
        path = _normalise(entry.path)
        if path in by_path:
            raise CpioError(f"duplicate archive path {path!r}")
        by_path[path] = Entry(path, entry.mode, entry.data, entry.rdev_major, entry.rdev_minor)
    for path in list(by_path):
        parts = path.split("/")
        for depth in range(1, len(parts)):
            parent = "/".join(parts[:depth])
            existing = by_path.setdefault(parent, Entry(parent, DIR_MODE))
            if not stat.S_ISDIR(existing.mode):
                raise CpioError(f"{parent!r} is not a directory but holds {path!r}")
    return [by_path[path] for path in sorted(by_path)]


def _header(ino: int, entry: Entry, name_len: int) -> bytes:
    nlink = 2 if stat.S_ISDIR(entry.mode) else 1
    fields = (
        ino,
        entry.mode,
        0,  # uid
        0,  # gid
        nlink,
        0,  # mtime
        len(entry.data),
        0,  # devmajor
        0,  # devminor
        entry.rdev_major,
        entry.rdev_minor,
        name_len,
        0,  # check
    )
    return MAGIC + b"".join(b"%08X" % value for value in fields)


def write_newc(entries: Iterable[Entry]) -> bytes:
    """The archive of `entries` (plus missing parent directories), sorted, with fixed fields."""
    out = bytearray()
    members = _with_parents(entries)
    for ino, entry in enumerate(members, start=1):
        if entry.data and not (stat.S_ISREG(entry.mode) or stat.S_ISLNK(entry.mode)):
            raise CpioError(f"{entry.path!r}: only files and symlinks carry data")
        _append(out, _header(ino, entry, len(entry.path.encode()) + 1), entry.path, entry.data)
    _append(out, _header(0, Entry(TRAILER, 0), len(TRAILER) + 1), TRAILER, b"")
    return bytes(out)


def _append(out: bytearray, header: bytes, name: str, data: bytes) -> None:
    out += header
    out += name.encode("utf-8") + b"\0"
    out += _pad4(HEADER_LEN + len(name.encode("utf-8")) + 1)
    out += data
    out += _pad4(len(data))


def read_newc(archive: bytes) -> list[Entry]:
    """Parse a newc archive back into entries (stops at the trailer)."""
    entries: list[Entry] = []
    pos = 0
    while True:
        header = archive[pos : pos + HEADER_LEN]
        if len(header) < HEADER_LEN or header[:6] != MAGIC:
            raise CpioError(f"no newc header at offset {pos}")
        try:
            fields = [int(header[6 + 8 * i : 14 + 8 * i], 16) for i in range(FIELDS)]
        except ValueError as exc:
            raise CpioError(f"bad header field at offset {pos}") from exc
        mode, size, rmajor, rminor, name_len = (
            fields[1],
            fields[6],
            fields[9],
            fields[10],
            fields[11],
        )
        name_start = pos + HEADER_LEN
        name = archive[name_start : name_start + name_len - 1].decode("utf-8")
        data_start = name_start + name_len + len(_pad4(HEADER_LEN + name_len))
        data = archive[data_start : data_start + size]
        if len(data) != size:
            raise CpioError(f"entry {name!r} is truncated")
        pos = data_start + size + len(_pad4(size))
        if name == TRAILER:
            return entries
        entries.append(Entry(name, mode, data, rmajor, rminor))
