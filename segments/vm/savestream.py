"""A lossless codec for libvirt/QEMU save images: guest RAM by address, and the rest.

Theory of operation
-------------------
A libvirt save image (``virDomainSave``) is a 92-byte header (magic
``LibvirtQemudSave``, or ``LibvirtQemudPart`` while unfinished; version 2;
the length of the data after it; the compression, which must be raw), that
data (domain XML, save cookie, zero padding) and a QEMU migration stream. A
bare stream (``migrate "exec:cat > file"``) is accepted too.

The stream (QEMU 7.2, ``migration/savevm.c``, ``migration/ram.c``) is ``QEVM``,
version 3, a configuration section (the machine type), then sections. The
iterable ``ram`` section comes first: ``SECTION_START`` holds the RAM block
list (``MEM_SIZE`` with the total, then each block's name and length), then
``SECTION_PART`` and ``SECTION_END`` pieces; each piece is 8-byte big-endian
records ``address | flags`` closed by ``EOS``, and may be followed by a footer.
A page record names its block unless ``CONTINUE`` (the block of the record
before) and carries the page (``PAGE``) or one fill byte (``ZERO``). Device
state follows in ``SECTION_FULL`` sections, which carry no lengths: from the
first of them (or ``EOF``) to the end of the file, the stream is kept verbatim.

``split`` reads the file once and writes ``ram``, every RAM block (in stream
order, each padded to whole pages) with each page at its guest address and
zero pages left as holes, and ``rest``, from which ``join`` rebuilds the file::

    rest = verbatim bytes || meta || trailer
    meta = msgpack [1, [[block name, length], ...], ops]
    op   = [0, n]                              copy n verbatim bytes
         | [1, block, first, count, named]     regenerate `count` page records
    trailer = source size, verbatim size, meta size, BLAKE3 of the source, magic

A run regenerates one record per page from ``ram``: ``ZERO`` with fill 0 if the
page is all zeros there, else ``PAGE`` with its bytes; the first record names
the block if ``named``, the others say ``CONTINUE``. ``split`` puts into runs
only records this rule reproduces exactly: a page's *first* copy in the
stream, at the next address of the same block, a ``PAGE`` that is not all
zeros or a ``ZERO`` filled with 0. The rest (a later copy of a page, an
all-zero ``PAGE``, a ``ZERO`` with another fill) stays verbatim; ``ram``
holds each page's first copy. What ``split`` does not understand (compressed
libvirt images, XBZRLE, compressed or multifd pages, iterable sections other
than RAM, configuration subsections, unknown blocks, truncation) raises
``SaveStreamError``. ``join`` checks size and digest before the rebuilt file
appears (by rename): a damaged ``ram`` or ``rest`` raises, it never yields a
wrong image. Both stream with bounded memory (1 MiB reads, RAM written in
coalesced runs, output flushed every 4 MiB); beyond that they hold the ops
and one bit per guest page.
"""

from __future__ import annotations

import io
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import blake3
import msgpack

__all__ = ["RamBlock", "SaveStreamError", "SplitResult", "join", "split"]

PAGE = 4096
ZERO_PAGE = bytes(PAGE)
RAM_FILE, REST_FILE = "ram", "rest"
LIBVIRT_MAGICS = (b"LibvirtQemudSave", b"LibvirtQemudPart")
LIBVIRT_VERSION = 2
LIBVIRT_FORMATS = {1: "gzip", 2: "bzip2", 3: "xz", 4: "lzop", 5: "zstd"}
LIBVIRT_HEADER = struct.Struct("<16s5I56x")  # magic, version, data_len, running, format, cookie
QEVM = b"QEVM\x00\x00\x00\x03"
EOF, START, PART, END, FULL, SUBSECTION, CONFIGURATION, COMMAND, FOOTER = (
    0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x07, 0x08, 0x7E,
)  # fmt: skip
F_ZERO, F_MEM_SIZE, F_PAGE, F_EOS, F_CONTINUE = 0x02, 0x04, 0x08, 0x10, 0x20
ADDRESS_MASK = (1 << 64) - PAGE
RAM_VERSION = 4
MAX_RAM_BYTES = 256 << 30
OP_RAW, OP_RUN = 0, 1
META_VERSION = 1
REST_MAGIC = b"GLSPLIT1"
TRAILER = struct.Struct("<QQQ32s8s")
BE16, BE32, BE64 = struct.Struct(">H"), struct.Struct(">I"), struct.Struct(">Q")
READ_BYTES = 1 << 20
WRITE_BYTES = 4 << 20


class SaveStreamError(Exception):
    """The file is not a save image this codec understands, or a split is damaged."""


@dataclass(frozen=True, slots=True)
class RamBlock:
    """One QEMU RAM block: its name, where it starts in ``ram``, its length."""

    name: bytes
    offset: int
    length: int

    @property
    def pages(self) -> int:
        return -(-self.length // PAGE)


@dataclass(frozen=True, slots=True)
class SplitResult:
    ram: Path
    rest: Path
    source_bytes: int
    ram_bytes: int
    rest_bytes: int
    digest: bytes  # BLAKE3 of the source
    blocks: tuple[RamBlock, ...]
    pages: int  # page records regenerated from ram (zero_pages of them zero)
    zero_pages: int
    verbatim_pages: int  # page records kept verbatim in rest


class _Reader:
    """The source through one buffer: ``need(n)`` returns where in ``buf`` n bytes start."""

    def __init__(self, source: io.FileIO) -> None:
        self.source = source
        self.buf = bytearray(READ_BYTES)
        self.view = memoryview(self.buf)
        self.pos = self.end = self.base = 0
        self.hasher = blake3.blake3()

    @property
    def offset(self) -> int:
        return self.base + self.pos

    def need(self, n: int) -> int:
        if self.end - self.pos < n:
            self.buf[: self.end - self.pos] = self.buf[self.pos : self.end]
            self.base, self.end, self.pos = self.base + self.pos, self.end - self.pos, 0
            while self.end < n:
                if not self._fill():
                    raise SaveStreamError(f"truncated: {n} bytes wanted at offset {self.offset}")
        return self.pos

    def _fill(self) -> int:
        got = self.source.readinto(self.view[self.end :]) or 0
        self.hasher.update(self.view[self.end : self.end + got])
        self.end += got
        return got

    def chunks(self, limit: int | None) -> Iterator[memoryview]:
        """Consume `limit` bytes (None: all left) as views, each valid until the next."""
        while limit is None or limit > 0:
            if self.pos == self.end:
                self.base, self.pos, self.end = self.base + self.pos, 0, 0
                if not self._fill():
                    if limit is None:
                        return
                    raise SaveStreamError(f"truncated: {limit} bytes short at {self.offset}")
            take = self.end - self.pos if limit is None else min(limit, self.end - self.pos)
            self.pos += take
            limit = None if limit is None else limit - take
            yield self.view[self.pos - take : self.pos]


class _Splitter:
    """One pass: verbatim bytes to ``rest``, first page copies to ``ram``, ops in memory."""

    def __init__(self, reader: _Reader, rest: BinaryIO, ram_fd: int) -> None:
        self.r, self.rest, self.ram_fd = reader, rest, ram_fd
        self.blocks: list[RamBlock] = []
        self.names: dict[bytes, int] = {}
        self.ram_bytes = 0
        self.seen = bytearray()  # one bit per guest page
        self.ops: list[list[int]] = []
        self.verbatim = 0  # bytes kept since the last op
        self.run: list[int] | None = None  # [OP_RUN, block, first, count, named]
        self.block: int | None = None  # the block a CONTINUE record means
        self.ram_section: int | None = None
        self.ram_ended = False
        self.pending = bytearray()  # pages to write, contiguous in ram from pending_at
        self.pending_at = 0
        self.pages = self.zero_pages = self.verbatim_pages = 0

    def fail(self, what: str) -> SaveStreamError:
        return SaveStreamError(f"{what} (at offset {self.r.offset})")

    def keep(self, n: int | None) -> None:
        """Copy the next n bytes (None: all left) to rest verbatim."""
        self.close_run()
        for chunk in self.r.chunks(n):
            self.rest.write(chunk)
            self.verbatim += len(chunk)

    def close_run(self) -> None:
        if self.run is not None:
            self.ops.append(self.run)
            self.run = None

    def run_page(self, block: int, page: int, named: bool) -> None:
        if self.verbatim:
            self.ops.append([OP_RAW, self.verbatim])
            self.verbatim = 0
        run = self.run
        if run is not None and not named and run[1] == block and run[2] + run[3] == page:
            run[3] += 1
        else:
            self.close_run()
            self.run = [OP_RUN, block, page, 1, int(named)]

    def write_ram(self, at: int, data: bytes | memoryview) -> None:
        if self.pending and at != self.pending_at + len(self.pending):
            self.flush_ram()
        if not self.pending:
            self.pending_at = at
        self.pending += data
        if len(self.pending) >= READ_BYTES:
            self.flush_ram()

    def flush_ram(self) -> None:
        with memoryview(self.pending) as view:
            done = 0
            while done < len(view):
                done += os.pwrite(self.ram_fd, view[done:], self.pending_at + done)
        self.pending.clear()

    def parse(self) -> None:
        r = self.r
        p = r.need(8)
        if r.buf[p : p + 8] == LIBVIRT_MAGICS[0][:8]:
            p = r.need(LIBVIRT_HEADER.size)
            if r.buf[p : p + 16] in LIBVIRT_MAGICS:
                self.libvirt_header()
                p = r.need(8)
        if r.buf[p : p + 8] != QEVM:
            raise self.fail("neither a libvirt save image nor a QEMU migration stream (v3)")
        self.keep(8)
        if r.buf[r.need(1)] == CONFIGURATION:
            self.keep(5 + BE32.unpack_from(r.buf, r.need(5) + 1)[0])
            if r.buf[r.need(1)] == SUBSECTION:
                raise self.fail("configuration subsections (x-ignore-shared, uuid, page bits)")
        while r.buf[r.need(1)] not in (FULL, EOF):
            self.section()
        if not self.ram_ended:
            raise self.fail("device state before the end of the RAM section")
        self.keep(None)
        self.ops.append([OP_RAW, self.verbatim])
        self.flush_ram()

    def libvirt_header(self) -> None:
        fields = LIBVIRT_HEADER.unpack_from(self.r.buf, self.r.pos)
        swapped = struct.unpack_from(">16s5I56x", self.r.buf, self.r.pos)  # libvirt reads both
        if fields[1] != LIBVIRT_VERSION and swapped[1] == LIBVIRT_VERSION:
            fields = swapped
        _magic, version, data_len, _running, compressed, _cookie = fields
        if version != LIBVIRT_VERSION:
            raise self.fail(f"libvirt save image version {version} is not supported")
        if compressed:
            name = LIBVIRT_FORMATS.get(compressed, f"format {compressed}")
            raise self.fail(f"libvirt save image is compressed ({name}); only raw is supported")
        self.keep(LIBVIRT_HEADER.size + data_len)

    def section(self) -> None:
        r = self.r
        p = r.need(5)
        kind, section_id = r.buf[p], BE32.unpack_from(r.buf, p + 1)[0]
        if kind == COMMAND:
            self.keep(5 + BE16.unpack_from(r.buf, p + 3)[0])
            return
        if kind == START:
            size = 6 + r.buf[r.need(6) + 5] + 8
            p = r.need(size)
            name = bytes(r.buf[p + 6 : p + size - 8])
            version = BE32.unpack_from(r.buf, p + size - 4)[0]
            if name != b"ram":
                raise self.fail(f"iterable section {name!r} is not supported (only RAM)")
            if self.ram_section is not None or version != RAM_VERSION:
                raise self.fail(f"a second RAM section, or RAM version {version} (not 4)")
            self.ram_section = section_id
            self.keep(size)
        elif kind in (PART, END):
            if section_id != self.ram_section or self.ram_ended:
                raise self.fail(f"section {section_id} goes on but is not an open RAM section")
            self.ram_ended = kind == END
            self.keep(5)
        else:
            raise self.fail(f"unknown section type {kind:#x}")
        self.ram_records(start=kind == START)
        if r.buf[r.need(1)] == FOOTER:
            if BE32.unpack_from(r.buf, r.need(5) + 1)[0] != section_id:
                raise self.fail(f"footer does not match section {section_id}")
            self.keep(5)

    def ram_records(self, start: bool) -> None:
        while True:
            word = BE64.unpack_from(self.r.buf, self.r.need(8))[0]
            flags = word & (PAGE - 1)
            kind = flags & ~F_CONTINUE
            if kind == F_EOS:
                self.keep(8)
                return
            if kind == F_MEM_SIZE and start and not self.blocks:
                self.block_list(word & ADDRESS_MASK)
            elif kind in (F_ZERO, F_PAGE):
                self.page(word & ADDRESS_MASK, flags)
            else:
                raise self.fail(f"RAM record flags {flags:#x} (only ZERO, PAGE, one MEM_SIZE, EOS)")

    def block_list(self, total: int) -> None:
        r = self.r
        if not 0 < total <= MAX_RAM_BYTES:
            raise self.fail(f"RAM size {total} is out of range")
        self.keep(8)
        while total > 0:
            n = r.buf[r.need(1)]
            p = r.need(1 + n + 8)
            name, length = bytes(r.buf[p + 1 : p + 1 + n]), BE64.unpack_from(r.buf, p + 1 + n)[0]
            if not 0 < length <= total or name in self.names:
                raise self.fail(f"RAM block {name!r} of {length} bytes does not fit the list")
            self.names[name] = len(self.blocks)
            self.blocks.append(RamBlock(name, self.ram_bytes, length))
            self.ram_bytes += -(-length // PAGE) * PAGE
            total -= length
            self.keep(1 + n + 8)
        os.ftruncate(self.ram_fd, self.ram_bytes)
        self.seen = bytearray((self.ram_bytes // PAGE + 7) // 8)

    def page(self, address: int, flags: int) -> None:
        r = self.r
        named = not flags & F_CONTINUE
        header = 9 + r.buf[r.need(9) + 8] if named else 8
        size = header + (1 if flags & F_ZERO else PAGE)
        p = r.need(size)
        block = self.names.get(bytes(r.buf[p + 9 : p + header])) if named else self.block
        if block is None and named:
            raise self.fail(f"page of unknown RAM block {bytes(r.buf[p + 9 : p + header])!r}")
        if block is None:
            raise self.fail("CONTINUE page before any named page")
        self.block, where, p = block, self.blocks[block], p + header
        if address >= where.length:
            raise self.fail(f"page {address:#x} beyond RAM block {where.name!r}")
        at = where.offset + address
        index, bit = at // PAGE >> 3, 1 << (at // PAGE & 7)
        first = not self.seen[index] & bit
        self.seen[index] |= bit
        if flags & F_ZERO:
            exact = r.buf[p] == 0
            if first and not exact:
                self.write_ram(at, bytes([r.buf[p]]) * PAGE)
        else:
            exact = not r.buf.startswith(ZERO_PAGE, p)
            if first and exact:
                self.write_ram(at, r.view[p : p + PAGE])
        if first and exact:
            self.run_page(block, address // PAGE, named)
            self.pages += 1
            self.zero_pages += bool(flags & F_ZERO)
            r.pos += size
        else:
            self.verbatim_pages += 1
            self.keep(size)


def split(save_path: Path, out_dir: Path) -> SplitResult:
    """Split a save image into ``out_dir/ram`` and ``out_dir/rest`` (each replaced by rename)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    ram_path, rest_path = out_dir / RAM_FILE, out_dir / REST_FILE
    ram_tmp, rest_tmp = _temporary(ram_path), _temporary(rest_path)
    try:
        with (
            open(save_path, "rb", buffering=0) as source,
            open(rest_tmp, "wb", buffering=READ_BYTES) as rest,
        ):
            ram_fd = os.open(ram_tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                reader = _Reader(source)
                splitter = _Splitter(reader, rest, ram_fd)
                splitter.parse()
            finally:
                os.close(ram_fd)
            blocks = [[block.name, block.length] for block in splitter.blocks]
            meta = msgpack.packb([META_VERSION, blocks, splitter.ops], use_bin_type=True)
            verbatim, digest = rest.tell(), reader.hasher.digest()
            rest.write(meta + TRAILER.pack(reader.offset, verbatim, len(meta), digest, REST_MAGIC))
        os.replace(ram_tmp, ram_path)
        os.replace(rest_tmp, rest_path)
    except BaseException:
        ram_tmp.unlink(missing_ok=True)
        rest_tmp.unlink(missing_ok=True)
        raise
    return SplitResult(
        ram_path,
        rest_path,
        source_bytes=reader.offset,
        ram_bytes=splitter.ram_bytes,
        rest_bytes=verbatim + len(meta) + TRAILER.size,
        digest=digest,
        blocks=tuple(splitter.blocks),
        pages=splitter.pages,
        zero_pages=splitter.zero_pages,
        verbatim_pages=splitter.verbatim_pages,
    )


def join(split_dir: Path, dest: Path) -> int:
    """Rebuild at `dest` the image ``split`` read into `split_dir`; return its size.

    `dest` appears (by rename) only if size and BLAKE3 digest match what
    ``split`` recorded; otherwise SaveStreamError.
    """
    tmp = _temporary(dest)
    try:
        with (
            open(split_dir / REST_FILE, "rb") as rest,
            open(split_dir / RAM_FILE, "rb", buffering=0) as ram,
            open(tmp, "wb", buffering=0) as out,
        ):
            size, digest, blocks, ops = _read_rest(rest)
            ram_bytes = os.fstat(ram.fileno()).st_size
            if blocks and ram_bytes != blocks[-1].offset + blocks[-1].pages * PAGE:
                raise SaveStreamError(f"ram is {ram_bytes} bytes, not what rest describes")
            rest.seek(0)
            output = _Output(out)
            for op in ops:
                if op[0] == OP_RAW:
                    output.copy(rest, op[1])
                else:
                    output.pages(ram.fileno(), blocks[op[1]], op[2], op[3], op[4])
            output.flush()
        if output.size != size or output.hasher.digest() != digest:
            raise SaveStreamError(f"rebuilt image ({output.size} bytes) differs from the original")
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return size


class _Output:
    """The rebuilt image, hashed and counted as it is written."""

    def __init__(self, out: io.FileIO) -> None:
        self.out, self.hasher, self.size = out, blake3.blake3(), 0
        self.pending = bytearray()
        self.buf = bytearray(READ_BYTES)
        self.view = memoryview(self.buf)

    def flush(self, data: bytes | bytearray | memoryview | None = None) -> None:
        for piece in (self.pending, data or b""):
            done = 0
            while done < len(piece):
                done += self.out.write(memoryview(piece)[done:]) or 0
            self.hasher.update(piece)
            self.size += len(piece)
        self.pending.clear()

    def copy(self, rest: io.BufferedReader, n: int) -> None:
        while n:
            got = rest.readinto(self.view[: min(n, READ_BYTES)])
            if not got:
                raise SaveStreamError("rest is shorter than its verbatim bytes")
            self.flush(self.view[:got])
            n -= got

    def pages(self, ram_fd: int, block: RamBlock, page: int, count: int, named: int) -> None:
        buf, view, out = self.buf, self.view, self.pending
        name = bytes([len(block.name)]) + block.name
        flag = 0 if named else F_CONTINUE
        while count:
            length = min(count * PAGE, READ_BYTES)
            at = block.offset + page * PAGE
            if os.preadv(ram_fd, [view[:length]], at) != length:
                raise SaveStreamError(f"ram is shorter than {at + length} bytes")
            for off in range(0, length, PAGE):
                zero = buf.startswith(ZERO_PAGE, off)
                out += BE64.pack(page * PAGE | (F_ZERO if zero else F_PAGE) | flag)
                if not flag:
                    out += name
                    flag = F_CONTINUE
                out += b"\x00" if zero else view[off : off + PAGE]
                page += 1
            count -= length // PAGE
            if len(out) >= WRITE_BYTES:
                self.flush()


def _read_rest(rest: io.BufferedReader) -> tuple[int, bytes, list[RamBlock], list[list[int]]]:
    """From rest's trailer and meta: the source's size and digest, its blocks and ops."""
    total = os.fstat(rest.fileno()).st_size
    if total < TRAILER.size:
        raise SaveStreamError("rest is too short to hold its trailer")
    rest.seek(total - TRAILER.size)
    size, verbatim, meta_size, digest, magic = TRAILER.unpack(rest.read(TRAILER.size))
    if magic != REST_MAGIC or verbatim + meta_size + TRAILER.size != total:
        raise SaveStreamError("rest has no valid trailer (not made by split, or damaged)")
    rest.seek(verbatim)
    try:
        version, raw_blocks, ops = msgpack.unpackb(rest.read(meta_size), raw=False)
        blocks: list[RamBlock] = []
        for name, length in raw_blocks:
            offset = blocks[-1].offset + blocks[-1].pages * PAGE if blocks else 0
            blocks.append(RamBlock(name, offset, length))
            if not (isinstance(name, bytes) and _count(length) and 0 < length <= MAX_RAM_BYTES):
                raise ValueError(f"block {name!r}")
        raw = 0
        for op in ops:
            if not (isinstance(op, list) and all(_count(value) for value in op)):
                raise ValueError("op is not a list of counts")
            if op[0] == OP_RAW and len(op) == 2:
                raw += op[1]
            elif not (op[0] == OP_RUN and len(op) == 5 and op[1] < len(blocks) and op[4] < 2):
                raise ValueError(f"op {op[:5]}")
            elif not 0 < op[3] <= blocks[op[1]].pages - op[2]:
                raise ValueError(f"page run {op[2:4]} outside block {op[1]}")
        if version != META_VERSION or raw != verbatim:
            raise ValueError("version, or verbatim bytes unaccounted for")
    except (ValueError, TypeError, LookupError, msgpack.UnpackException) as exc:
        raise SaveStreamError(f"rest meta is malformed: {exc}") from None
    return size, digest, blocks, ops


def _count(value: Any) -> bool:
    return type(value) is int and value >= 0


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")
