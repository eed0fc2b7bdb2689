"""Tar archives someone else wrote, read with the parser's worst cases fenced off.

Theory of operation
-------------------
Image archives and their layers (from an image's author) and output disks
(from a guest) are tar files read with ``tarfile``. Two parts of that parser
trust the archive too much, so ``open_archive`` and ``open_stream`` hand it a
``TarInfo`` subclass that refuses them before they run, with
``ArchiveRefused``. Every other way the parser gives up on hostile bytes is
one of ``PARSE_ERRORS`` (a long chain of pax headers recurses):

* metadata headers (pax, GNU long names): this Python's pax parser takes time
  quadratic in a header's size (CVE-2024-6232, fixed in 3.11.10; one 65 KB
  header took 9.6 s here, 1 MiB would take about 40 minutes). Each header is
  capped at ``MAX_META_BYTES``, and a stream's headers together by
  ``META_WORK``, a budget of the sum of their squared sizes: 10,000 one-block
  headers fit, and the worst stream within it costs about 10 s of CPU;
* GNU sparse maps, whose readers trust the stream's counts and can read
  unbounded data: a sparse member is refused outright (busybox, GNU tar
  without ``-S`` and every image builder write none).

``_proc_member`` is the hook ``tarfile`` names for subclasses; the sparse
readers are private methods, replaced by name, so a new Python should be
checked against tests/unit/segments/test_outputs.py.
"""

from __future__ import annotations

import tarfile
from typing import IO

SANS_IO = True

MAX_META_BYTES = 8 * 1024  # a 4096-byte path and then some
META_WORK = 4 << 30
META_TYPES = (  # pax, pax global, Solaris pax, GNU long name, GNU long link target
    tarfile.XHDTYPE,
    tarfile.XGLTYPE,
    tarfile.SOLARIS_XHDTYPE,
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
)


# What each tar member type is, for messages that say why a member is refused.
MEMBER_TYPES = {
    tarfile.SYMTYPE: "a symbolic link",
    tarfile.LNKTYPE: "a hard link",
    tarfile.CHRTYPE: "a character device",
    tarfile.BLKTYPE: "a block device",
    tarfile.FIFOTYPE: "a FIFO",
    tarfile.CONTTYPE: "a contiguous file",
    tarfile.GNUTYPE_SPARSE: "a GNU sparse file",
}


def member_type(kind: bytes) -> str:
    """What a member of tar type `kind` is, in words."""
    return MEMBER_TYPES.get(kind, f"of unknown type {kind!r}")


class ArchiveRefused(ValueError):
    """The stream's metadata is refused before the parser reads it."""


class _GuardedTarFile(tarfile.TarFile):
    meta_work_left = META_WORK  # this stream's budget, spent by _GuardedTarInfo


class _GuardedTarInfo(tarfile.TarInfo):
    def _proc_member(self, archive: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type in META_TYPES:
            assert isinstance(archive, _GuardedTarFile)
            if not 0 <= self.size <= MAX_META_BYTES:
                raise ArchiveRefused(f"a tar metadata header is over {MAX_META_BYTES} bytes")
            archive.meta_work_left -= max(self.size, tarfile.BLOCKSIZE) ** 2
            if archive.meta_work_left < 0:
                raise ArchiveRefused("the tar metadata headers are too many or too big")
        return super()._proc_member(archive)  # type: ignore[misc,no-any-return]

    def _refuse_sparse(self, *args: object) -> None:
        member = args[0] if args and isinstance(args[0], tarfile.TarInfo) else self
        raise ArchiveRefused(f"archive member {member.name[:80]!r} is a GNU sparse file")

    _proc_sparse = _proc_gnusparse_00 = _proc_gnusparse_01 = _proc_gnusparse_10 = _refuse_sparse


PARSE_ERRORS = (tarfile.TarError, EOFError, ValueError, OverflowError, RecursionError)


def open_archive(fileobj: IO[bytes]) -> tarfile.TarFile:
    """A random-access tar reader over the open, seekable `fileobj`, with the guards above.

    The caller opens (and closes) the file: this module does no I/O of its own.
    """
    return _GuardedTarFile.open(
        fileobj=fileobj,
        mode="r:",
        tarinfo=_GuardedTarInfo,
        encoding="utf-8",
        errors="surrogateescape",
    )


def open_stream(fileobj: IO[bytes]) -> tarfile.TarFile:
    """A forward-only tar reader over `fileobj` with the guards above; use as a context."""
    return _GuardedTarFile.open(
        fileobj=fileobj,
        mode="r|",
        tarinfo=_GuardedTarInfo,
        encoding="utf-8",
        errors="surrogateescape",
    )
