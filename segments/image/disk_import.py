"""A job owner's root disk: check a raw or qcow2 image from a stranger, convert it to raw.

Theory of operation
-------------------
The disk image comes from someone we do not trust, and ``qemu-img`` will follow
what the image says. The attacks:

* **backing file**: a qcow2 names ``/etc/shadow`` as its backing file; every
  cluster the overlay does not hold is read from there, so converting it copies
  the host's secrets into the guest's disk;
* **external data file**: a qcow2 (v3, incompatible feature bit 2) keeps its
  data in another file it names, with the same effect (CVE-2024-4467 was
  ``qemu-img info`` alone opening it);
* **format confusion**: a file we take as raw but ``qemu-img`` probes as qcow2
  (or vmdk, whose descriptor names extent files) gains all of the above, so we
  detect the format ourselves and pass ``-f FORMAT`` to every ``qemu-img`` run:
  it never probes. A raw file that begins with the qcow2 magic is refused as
  ambiguous;
* **huge virtual size**: a small qcow2 that declares 8 EiB, or a compressed
  bomb, would fill the host's disk; the size is capped (``max_virtual_bytes``)
  and the raw output is sparse (``-S 16k``).

The checks, in order, all on one open file (``/dev/fd/N`` is handed to
``qemu-img``, so a path swapped between the checks and the conversion changes
nothing; rewriting the file itself needs write access to our own download):

1. the magic: qcow2, else raw; vmdk, vdi, vhd, vhdx, qed, luks, parallels and
   dmg magics are refused by name;
2. for qcow2, our own read of the header: version 2 or 3, no backing file, no
   encryption, no external data file, virtual size within the cap;
3. ``qemu-img info --output=json -f FMT``, read as hostile (types checked): the
   same refusals, and its format must be the one we asked for;
4. ``qemu-img convert`` with the options given as ``json:{...}`` with
   ``"backing": null``, so QEMU opens no backing file even if every check above
   were wrong (tested on its own; QEMU 7.2 has no such switch for a data file,
   which is why check 2 reads the same open file), into a temporary file beside
   the destination, with a timeout of 60 s + 1 s per 64 MiB;
5. the raw result must hold a root file system: an ext2/3/4 superblock, a GPT
   or an MBR with a partition. Only then is it renamed into place.
"""

from __future__ import annotations

import json
import os
import stat
import struct
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from segments.image.errors import ImageError

QEMU_IMG = "/usr/bin/qemu-img"
MAX_VIRTUAL_BYTES = 64 << 30
INFO_TIMEOUT_S = 30.0
FORMATS = ("raw", "qcow2")
QCOW2_MAGIC = b"QFI\xfb"
QCOW2_DATA_FILE_BIT = 1 << 2
FOREIGN = (  # (offset, magic, format); offset -512: in the file's last 512 bytes
    (0, b"KDMV", "vmdk"),
    (0, b"COWD", "vmdk"),
    (0, b"# Disk DescriptorFile", "vmdk"),
    (0x40, b"\x7f\x10\xda\xbe", "vdi"),
    (0, b"conectix", "vhd"),
    (-512, b"conectix", "vhd"),
    (0, b"vhdxfile", "vhdx"),
    (0, b"QED\x00", "qed"),
    (0, b"LUKS\xba\xbe", "luks"),
    (0, b"WithoutFreeSpace", "parallels"),
    (0, b"WithouFreSpacExt", "parallels"),
    (-512, b"koly", "dmg"),
)
EXT4_INCOMPAT = 0x40 | 0x80 | 0x200  # extents, 64bit, flex_bg
EXT_HAS_JOURNAL = 0x4


class DiskImageError(ImageError):
    """A job owner's disk image is refused or cannot be converted; one clear line."""


@dataclass(frozen=True, slots=True)
class DiskInfo:
    """What the checks found out about a disk image before conversion."""

    format: str  # "raw" or "qcow2"
    virtual_bytes: int


@dataclass(frozen=True, slots=True)
class DiskProbe:
    """A converted disk: its source format, size and root file system (or partition table)."""

    format: str
    virtual_bytes: int
    file_system: str  # "ext4", "ext3", "ext2", "gpt" or "mbr"


# --- our own look at the bytes -----------------------------------------------------


def _sniff(head: bytes, tail: bytes, fmt: str | None) -> str:
    for at, magic, name in FOREIGN:
        if (head[at:] if at >= 0 else tail).startswith(magic):  # tail: the last 512 bytes
            raise DiskImageError(f"this is a {name} image; only raw and qcow2 are accepted")
    found = "qcow2" if head.startswith(QCOW2_MAGIC) else "raw"
    if fmt is not None and fmt not in FORMATS:
        raise DiskImageError(f"disk format {fmt!r} is not accepted (raw or qcow2)")
    if fmt == "raw" and found == "qcow2":
        raise DiskImageError("said to be raw but begins with the qcow2 magic (ambiguous)")
    if fmt == "qcow2" and found == "raw":
        raise DiskImageError("said to be qcow2 but has no qcow2 magic")
    return found


def _check_qcow2_header(head: bytes, max_virtual_bytes: int) -> None:
    if len(head) < 72:
        raise DiskImageError("truncated qcow2 header")
    version, backing_offset = struct.unpack_from(">IQ", head, 4)
    (size,) = struct.unpack_from(">Q", head, 24)
    (crypt_method,) = struct.unpack_from(">I", head, 32)
    if version not in (2, 3):
        raise DiskImageError(f"qcow2 version {version} is not supported (2 or 3)")
    if backing_offset:
        raise DiskImageError("the qcow2 header names a backing file")
    if crypt_method:
        raise DiskImageError("the qcow2 header says it is encrypted")
    if version == 3:
        if len(head) < 104:
            raise DiskImageError("truncated qcow2 header")
        if struct.unpack_from(">Q", head, 72)[0] & QCOW2_DATA_FILE_BIT:
            raise DiskImageError("the qcow2 header names an external data file")
    if size > max_virtual_bytes:  # zero is left to check 3
        raise DiskImageError(
            f"the qcow2 header declares {size} bytes, over the cap of {max_virtual_bytes}"
        )


def file_system(head: bytes) -> str | None:
    """The root file system or partition table in a raw disk's first 2 KiB, if any."""
    if len(head) >= 1084 and head[1080:1082] == b"\x53\xef":
        compat, incompat = struct.unpack_from("<II", head, 1024 + 92)
        if incompat & EXT4_INCOMPAT:
            return "ext4"
        return "ext3" if compat & EXT_HAS_JOURNAL else "ext2"
    if head[512:520] == b"EFI PART":
        return "gpt"
    has_partition = len(head) >= 512 and any(head[446 + 16 * i + 4] for i in range(4))
    return "mbr" if has_partition and head[510:512] == b"\x55\xaa" else None


# --- qemu-img ------------------------------------------------------------------------


@contextmanager
def _pinned(path: Path) -> Iterator[int]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise DiskImageError(f"cannot open disk image {path}: {exc.strerror}") from exc
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise DiskImageError(f"disk image {path} is not a regular file")
        yield fd
    finally:
        os.close(fd)


def _source(fd: int, fmt: str) -> str:
    """The image as QEMU options: our open file, and for qcow2 no backing file, ever."""
    options: dict[str, Any] = {"file": {"driver": "file", "filename": f"/dev/fd/{fd}"}}
    if fmt == "qcow2":
        options["backing"] = None
    return "json:" + json.dumps(options)


def _qemu_img(args: list[str], fd: int, what: str, timeout_s: float) -> str:
    try:
        result = subprocess.run(
            [QEMU_IMG, *args],
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout_s,
            pass_fds=(fd,),
            env={**os.environ, "LC_ALL": "C"},
        )
    except FileNotFoundError as exc:
        raise DiskImageError(f"{what}: {QEMU_IMG} is not installed (qemu-utils)") from exc
    except subprocess.TimeoutExpired as exc:
        raise DiskImageError(f"{what}: qemu-img took over {timeout_s:.0f} s") from exc
    if result.returncode != 0:
        lines = [line.strip() for line in result.stderr.splitlines() if line.strip()]
        first = (lines or [f"exit status {result.returncode}"])[0].removeprefix("qemu-img: ")
        for arg in args:  # our json:{...} options are noise in a message
            first = first.replace(f"'{arg}'", "the image") if arg.startswith("json:") else first
        raise DiskImageError(f"{what}: {first[:300]}")
    return result.stdout


def check_info(text: str, fmt: str, max_virtual_bytes: int) -> int:
    """The virtual size from ``qemu-img info --output=json`` (check 3); raise DiskImageError."""
    try:
        info = json.loads(text)
    except ValueError:
        raise DiskImageError("qemu-img info gave no JSON") from None
    if not isinstance(info, dict):
        raise DiskImageError("qemu-img info gave no JSON object")
    if info.get("format") != fmt:
        raise DiskImageError(f"qemu-img reads format {info.get('format')!r}, not {fmt}")
    for key in ("backing-filename", "full-backing-filename", "backing-filename-format"):
        if key in info:
            raise DiskImageError(f"qemu-img info shows a backing file ({key} {info[key]!r:.80})")
    specific = info.get("format-specific")
    data = specific.get("data") if isinstance(specific, dict) else None
    if isinstance(data, dict) and "data-file" in data:
        raise DiskImageError(f"qemu-img info shows a data file ({data['data-file']!r:.80})")
    if info.get("encrypted", False) is not False:
        raise DiskImageError("qemu-img info shows the image is encrypted")
    size = info.get("virtual-size")
    if not isinstance(size, int) or isinstance(size, bool):
        raise DiskImageError("qemu-img info gave no virtual size")
    if size <= 0:
        raise DiskImageError(f"virtual size {size} bytes: the disk is empty")
    if size > max_virtual_bytes:
        raise DiskImageError(f"virtual size {size} bytes is over the cap of {max_virtual_bytes}")
    return size


def _probe_fd(fd: int, path: Path, fmt: str | None, max_virtual_bytes: int) -> DiskInfo:
    length = os.fstat(fd).st_size
    head = os.pread(fd, 4096, 0)
    tail = os.pread(fd, 512, max(0, length - 512)) if length >= 1024 else b""
    try:
        found = _sniff(head, tail, fmt)
        if found == "qcow2":
            _check_qcow2_header(head, max_virtual_bytes)
        args = ["info", "--output=json", "-f", found, _source(fd, found)]
        text = _qemu_img(args, fd, "qemu-img info", INFO_TIMEOUT_S)
        return DiskInfo(found, check_info(text, found, max_virtual_bytes))
    except DiskImageError as exc:
        raise DiskImageError(f"disk image {path.name}: {exc}") from None


def probe(
    path: Path, fmt: str | None = None, *, max_virtual_bytes: int = MAX_VIRTUAL_BYTES
) -> DiskInfo:
    """Check a disk image (checks 1 to 3 of the module docstring); raise DiskImageError."""
    with _pinned(path) as fd:
        return _probe_fd(fd, path, fmt, max_virtual_bytes)


def qemu_convert(fd: int, fmt: str, out: Path, timeout_s: float) -> None:
    """Check 4 alone (call `convert_to_raw`): open file `fd` as `fmt` to raw `out`, no backing."""
    args = ["convert", "-f", fmt, "-O", "raw", "-S", "16k", _source(fd, fmt), str(out)]
    _qemu_img(args, fd, "qemu-img convert", timeout_s)


def convert_to_raw(
    path: Path, dest: Path, fmt: str | None = None, *, max_virtual_bytes: int = MAX_VIRTUAL_BYTES
) -> DiskProbe:
    """Check `path`, convert it to a sparse raw disk at `dest` and check it holds a root disk."""
    dest = dest.absolute()
    with _pinned(path) as fd:
        info = _probe_fd(fd, path, fmt, max_virtual_bytes)
        try:
            handle, name = tempfile.mkstemp(
                dir=dest.parent, prefix=f".{dest.name}.", suffix=".part"
            )
        except OSError as exc:
            raise DiskImageError(f"cannot write beside {dest}: {exc.strerror}") from exc
        os.close(handle)
        tmp = Path(name)
        try:
            qemu_convert(fd, info.format, tmp, 60.0 + info.virtual_bytes / (64 << 20))
            with tmp.open("rb") as raw:
                size, found = os.fstat(raw.fileno()).st_size, file_system(raw.read(2048))
            if size != info.virtual_bytes:
                raise DiskImageError(f"converted disk has {size} bytes, not {info.virtual_bytes}")
            if found is None:
                raise DiskImageError("it holds no ext file system or partition table")
            os.replace(tmp, dest)
        except (DiskImageError, OSError) as exc:
            tmp.unlink(missing_ok=True)
            reason = f"writing {dest}: {exc.strerror}" if isinstance(exc, OSError) else exc
            raise DiskImageError(f"disk image {path.name}: {reason}") from exc
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return DiskProbe(info.format, info.virtual_bytes, found)
