"""The save-image codec: byte-exact round trips, RAM by address, and refusals.

Synthetic streams are built here record by record (QEMU 7.2's layout, see
``segments.vm.savestream``); real ones, from the demo guest saved twice by a
private libvirtd, in tests/testbed/test_savestream_vm.py.
"""

from __future__ import annotations

import hashlib
import shutil
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given
from hypothesis import strategies as st
from kit.fuzzing import fuzz_settings

from segments.vm.savestream import PAGE, SaveStreamError, join, split

ZERO, MEM_SIZE, PAGE_FLAG, EOS, CONTINUE, XBZRLE = 0x02, 0x04, 0x08, 0x10, 0x20, 0x40
BLOCKS = ((b"pc.ram", 8 * PAGE), (b"vga.vram", 2 * PAGE), (b"rom", PAGE))


def be(value: int, size: int = 8) -> bytes:
    return value.to_bytes(size, "big")


def record(address: int, flags: int, name: bytes | None = None, body: bytes = b"") -> bytes:
    label = b"" if name is None else bytes([len(name)]) + name
    return be(address | flags) + label + body


def page(address: int, data: bytes, name: bytes | None = None) -> bytes:
    flags = PAGE_FLAG if name is not None else PAGE_FLAG | CONTINUE
    return record(address, flags, name, data)


def zero(address: int, name: bytes | None = None, fill: int = 0) -> bytes:
    return record(address, ZERO if name is not None else ZERO | CONTINUE, name, bytes([fill]))


def block_list(blocks: tuple[tuple[bytes, int], ...] = BLOCKS) -> bytes:
    body = be(sum(length for _, length in blocks) | MEM_SIZE)
    return body + b"".join(bytes([len(name)]) + name + be(length) for name, length in blocks)


def section(kind: int, body: bytes, name: bytes = b"ram", section_id: int = 2) -> bytes:
    head = bytes([kind]) + be(section_id, 4)
    if kind in (1, 4):
        head += bytes([len(name)]) + name + be(0, 4) + be(4, 4)
    return head + body + be(EOS) + b"\x7e" + be(section_id, 4)


def stream(*parts: bytes, end: bytes = b"", config: bytes = b"pc-q35-7.2") -> bytes:
    """QEVM, configuration, RAM START with the block list, PARTs, END, device state."""
    head = b"QEVM" + be(3, 4) + b"\x07" + be(len(config), 4) + config
    body = b"".join(section(2, part) for part in parts)
    device = b"\x04" + be(3, 4) + b"\x06timer\x00\x00\x00\x00\x00\x00\x00\x02" + b"state" * 9
    return head + section(1, block_list()) + body + section(3, end) + device + b"\x7e\x00"


def libvirt(qemu: bytes, compressed: int = 0, version: int = 2, xml: bytes = b"<domain/>") -> bytes:
    data = xml + b"\x00" + bytes(64)
    header = struct.pack("<16s5I56x", b"LibvirtQemudSave", version, len(data), 1, compressed, 0)
    return header + data + qemu


def sample_pages() -> list[bytes]:
    return [bytes([i + 1]) * PAGE for i in range(12)]


def sample() -> bytes:
    """Pages, zero pages and CONTINUE across sections, in two blocks."""
    p = sample_pages()
    first = page(0, p[0], b"pc.ram") + zero(PAGE) + page(2 * PAGE, p[1])
    second = page(3 * PAGE, p[2]) + zero(4 * PAGE) + page(7 * PAGE, p[3])
    vram = page(PAGE, p[4], b"vga.vram") + zero(0, b"rom")
    return stream(first, second, end=vram)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def round_trip(data: bytes, work: Path) -> None:
    source = work / "source.save"
    source.write_bytes(data)
    split(source, work / "split")
    join(work / "split", work / "joined.save")
    assert sha(work / "joined.save") == sha(source)


# -- round trips -------------------------------------------------------------------------


def test_pages_land_at_their_guest_addresses(tmp_path: Path) -> None:
    source = tmp_path / "a.save"
    source.write_bytes(sample())
    result = split(source, tmp_path / "split")
    assert [(b.name, b.offset, b.length) for b in result.blocks] == [
        (b"pc.ram", 0, 8 * PAGE),
        (b"vga.vram", 8 * PAGE, 2 * PAGE),
        (b"rom", 10 * PAGE, PAGE),
    ]
    p = sample_pages()
    ram = result.ram.read_bytes()
    assert len(ram) == result.ram_bytes == 11 * PAGE
    expected = {0: p[0], 2: p[1], 3: p[2], 7: p[3], 9: p[4]}
    for index in range(11):
        assert ram[index * PAGE : (index + 1) * PAGE] == expected.get(index, bytes(PAGE))
    assert (result.pages, result.zero_pages, result.verbatim_pages) == (8, 3, 0)
    assert result.source_bytes == len(sample())
    assert result.rest_bytes == result.rest.stat().st_size < 400  # no page data in rest
    assert join(tmp_path / "split", tmp_path / "b.save") == len(sample())
    assert sha(tmp_path / "b.save") == sha(source)


def test_libvirt_header_and_xml_survive(tmp_path: Path) -> None:
    round_trip(libvirt(sample(), xml=b"<domain><name>x</name></domain>"), tmp_path)


def test_partial_libvirt_magic_is_kept(tmp_path: Path) -> None:
    data = bytearray(libvirt(sample()))
    data[:16] = b"LibvirtQemudPart"
    round_trip(bytes(data), tmp_path)


def test_repeated_pages_stay_verbatim_and_ram_keeps_the_first(tmp_path: Path) -> None:
    p = sample_pages()
    again = page(0, p[5], b"pc.ram") + page(PAGE, p[6]) + zero(2 * PAGE)
    data = stream(page(0, p[0], b"pc.ram") + zero(PAGE) + page(2 * PAGE, p[1]), again)
    source = tmp_path / "a.save"
    source.write_bytes(data)
    result = split(source, tmp_path / "split")
    assert result.verbatim_pages == 3
    assert result.ram.read_bytes()[: 3 * PAGE] == p[0] + bytes(PAGE) + p[1]
    join(tmp_path / "split", tmp_path / "b.save")
    assert (tmp_path / "b.save").read_bytes() == data


def test_odd_encodings_stay_verbatim(tmp_path: Path) -> None:
    body = page(0, bytes(PAGE), b"pc.ram") + zero(PAGE, fill=0x55) + zero(2 * PAGE)
    data = stream(body)
    source = tmp_path / "a.save"
    source.write_bytes(data)
    result = split(source, tmp_path / "split")
    assert (result.pages, result.verbatim_pages) == (1, 2)
    assert result.ram.read_bytes()[PAGE : 2 * PAGE] == b"\x55" * PAGE  # filled as QEMU would
    join(tmp_path / "split", tmp_path / "b.save")
    assert (tmp_path / "b.save").read_bytes() == data


def test_bare_stream_without_configuration_or_footers(tmp_path: Path) -> None:
    ram = b"\x01" + be(2, 4) + b"\x03ram" + be(0, 4) + be(4, 4) + block_list() + be(EOS)
    ram += b"\x03" + be(2, 4) + page(0, b"\x01" * PAGE, b"pc.ram") + be(EOS)
    round_trip(b"QEVM" + be(3, 4) + ram + b"\x00", tmp_path)


def test_commands_are_kept(tmp_path: Path) -> None:
    data = sample()
    at = data.index(b"\x01" + be(2, 4))
    round_trip(data[:at] + b"\x08" + be(2, 2) + be(4, 2) + b"ping" + data[at:], tmp_path)


def test_split_replaces_an_earlier_split(tmp_path: Path) -> None:
    round_trip(sample(), tmp_path)
    round_trip(libvirt(sample()), tmp_path)


# -- refusals ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "truncated"),
        (b"not a save image at all", "neither"),
        (libvirt(sample(), compressed=5), r"compressed \(zstd\)"),
        (libvirt(sample(), version=3), "version 3"),
        (stream(record(0, XBZRLE, b"pc.ram")), "flags 0x40"),
        (stream(page(0, b"\x01" * PAGE, b"nosuch")), "unknown RAM block"),
        (stream(page(8 * PAGE, b"\x01" * PAGE, b"pc.ram")), "beyond RAM block"),
        (
            sample().replace(b"\x01" + be(2, 4) + b"\x03ram", b"\x01" + be(2, 4) + b"\x03blk"),
            "iterable",
        ),
        (sample().replace(b"pc-q35-7.2\x01", b"pc-q35-7.2\x05"), "subsections"),
        (sample().replace(b"\x7e" + be(2, 4), b"\x7e" + be(9, 4), 1), "footer"),
        (stream(block_list()), "flags 0x4"),
    ],
)
def test_refuses_what_it_does_not_understand(tmp_path: Path, data: bytes, message: str) -> None:
    source = tmp_path / "bad.save"
    source.write_bytes(data)
    with pytest.raises(SaveStreamError, match=message):
        split(source, tmp_path / "split")
    assert list((tmp_path / "split").iterdir()) == []  # nothing half-written left


def test_continue_before_any_named_page_is_refused(tmp_path: Path) -> None:
    source = tmp_path / "bad.save"
    source.write_bytes(stream(page(0, b"\x01" * PAGE)))
    with pytest.raises(SaveStreamError, match="CONTINUE"):
        split(source, tmp_path / "split")


def test_every_truncation_before_the_device_state_is_refused(tmp_path: Path) -> None:
    data = sample()
    device_state = data.index(b"\x04" + be(3, 4))
    source = tmp_path / "cut.save"
    for cut in list(range(0, 300)) + list(range(device_state - 300, device_state + 1)):
        source.write_bytes(data[:cut])
        with pytest.raises(SaveStreamError):
            split(source, tmp_path / "split")


def test_join_refuses_damaged_splits(tmp_path: Path) -> None:
    source = tmp_path / "a.save"
    source.write_bytes(sample())
    result = split(source, tmp_path / "split")
    ram, rest = result.ram.read_bytes(), result.rest.read_bytes()
    dest = tmp_path / "b.save"

    def damaged(new_ram: bytes, new_rest: bytes, message: str) -> None:
        result.ram.write_bytes(new_ram)
        result.rest.write_bytes(new_rest)
        with pytest.raises(SaveStreamError, match=message):
            join(tmp_path / "split", dest)
        assert not dest.exists()

    flipped = bytearray(ram)
    flipped[3 * PAGE + 7] ^= 1
    damaged(bytes(flipped), rest, "differs from the original")
    turned_zero = bytearray(ram)
    turned_zero[7 * PAGE : 8 * PAGE] = bytes(PAGE)  # a page record becomes a zero record
    damaged(bytes(turned_zero), rest, "differs from the original")
    damaged(ram + bytes(PAGE), rest, "ram is")
    damaged(ram, rest[:-1], "trailer")
    damaged(ram, rest[:10], "trailer")
    damaged(ram, b"\x00" + rest, "trailer")
    flipped_rest = bytearray(rest)
    flipped_rest[20] ^= 1
    damaged(ram, bytes(flipped_rest), "differs from the original")


# -- fuzzing -----------------------------------------------------------------------------


def split_or_refuse(data: bytes, work: Path) -> None:
    """Split either raises SaveStreamError or round-trips exactly."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    source = work / "source.save"
    source.write_bytes(data)
    try:
        split(source, work / "split")
    except SaveStreamError:
        return
    join(work / "split", work / "joined.save")
    assert (work / "joined.save").read_bytes() == data


FUZZ = fuzz_settings(300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=2000))
def test_arbitrary_bytes_only_raise_save_stream_error(
    tmp_path_factory: pytest.TempPathFactory, data: bytes
) -> None:
    split_or_refuse(data, tmp_path_factory.mktemp("fuzz"))


@FUZZ
@given(st.binary(max_size=600), st.sampled_from([b"QEVM\x00\x00\x00\x03", libvirt(b"")]))
def test_arbitrary_streams_only_raise_save_stream_error(
    tmp_path_factory: pytest.TempPathFactory, data: bytes, prefix: bytes
) -> None:
    split_or_refuse(prefix + data, tmp_path_factory.mktemp("fuzz"))


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(sample()) - 1), st.integers(0, 255)), max_size=4))
def test_mutated_streams_refuse_or_round_trip(
    tmp_path_factory: pytest.TempPathFactory, edits: list[tuple[int, int]]
) -> None:
    data = bytearray(sample())
    for at, value in edits:
        data[at] = value
    split_or_refuse(bytes(data), tmp_path_factory.mktemp("fuzz"))


@FUZZ
@given(st.binary(max_size=300))
def test_garbled_meta_only_raises_save_stream_error(
    tmp_path_factory: pytest.TempPathFactory, meta: bytes
) -> None:
    work = tmp_path_factory.mktemp("meta")
    source = work / "a.save"
    source.write_bytes(sample())
    result = split(source, work / "split")
    rest = result.rest.read_bytes()
    size, verbatim, _meta_size, digest, magic = struct.unpack("<QQQ32s8s", rest[-64:])
    trailer = struct.pack("<QQQ32s8s", size, verbatim, len(meta), digest, magic)
    result.rest.write_bytes(rest[:verbatim] + meta + trailer)
    with pytest.raises(SaveStreamError):
        join(work / "split", work / "b.save")


PAGE_CHOICES = st.sampled_from(["data", "zero", "zero-data", "fill"])


@FUZZ
@given(
    st.lists(
        st.tuples(st.sampled_from(BLOCKS), st.integers(0, 7), PAGE_CHOICES, st.integers(1, 9)),
        max_size=40,
    ),
    st.sets(st.integers(0, 40), max_size=6),
)
def test_generated_streams_round_trip_and_ram_holds_first_copies(
    tmp_path_factory: pytest.TempPathFactory,
    records: list[tuple[tuple[bytes, int], int, str, int]],
    breaks: set[int],
) -> None:
    """Random pages, repeats, odd encodings and section breaks: exact, RAM as QEMU loads it."""
    offsets = {b"pc.ram": 0, b"vga.vram": 8 * PAGE, b"rom": 10 * PAGE}
    expected = bytearray(11 * PAGE)
    seen: set[int] = set()
    parts: list[bytes] = [b""]
    last = None
    for index, ((name, length), number, kind, seed) in enumerate(records):
        address = number * PAGE % length
        data = {"data": bytes([seed]) * PAGE, "zero-data": bytes(PAGE)}.get(kind)
        label = None if name == last else name
        last = name
        if data is not None:
            parts[-1] += page(address, data, label)
        else:
            parts[-1] += zero(address, label, seed if kind == "fill" else 0)
            data = bytes([seed if kind == "fill" else 0]) * PAGE
        at = offsets[name] + address
        if at not in seen:
            seen.add(at)
            expected[at : at + PAGE] = data
        if index in breaks:
            parts.append(b"")
    data = stream(*parts)
    work = tmp_path_factory.mktemp("gen")
    source = work / "a.save"
    source.write_bytes(data)
    result = split(source, work / "split")
    assert result.ram.read_bytes() == bytes(expected)
    assert result.pages + result.verbatim_pages == len(records)
    join(work / "split", work / "b.save")
    assert (work / "b.save").read_bytes() == data
