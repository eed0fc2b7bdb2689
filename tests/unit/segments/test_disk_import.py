"""A stranger's root disk: raw and qcow2 accepted, backing and data files never read.

Real qemu-img and mkfs.ext4 on files of a few MiB. The attacks are built so that,
were a check missing, the conversion would succeed and carry the secret out: the
"host file" is itself an ext4 disk holding a marker, and a control run of plain
``qemu-img convert`` shows that it does leak there.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from segments.image.disk_import import (
    DiskImageError,
    DiskProbe,
    check_info,
    convert_to_raw,
    file_system,
    probe,
    qemu_convert,
)

QEMU_IMG = "/usr/bin/qemu-img"
MKFS_EXT4 = "/usr/sbin/mkfs.ext4"
MIB = 1 << 20

pytestmark = pytest.mark.skipif(
    not (os.access(QEMU_IMG, os.X_OK) and os.access(MKFS_EXT4, os.X_OK)),
    reason="needs qemu-img (qemu-utils) and mkfs.ext4 (e2fsprogs)",
)


def run(*command: str | Path) -> None:
    subprocess.run([str(c) for c in command], check=True, capture_output=True, timeout=60)


def make_ext(path: Path, content: dict[str, bytes], kind: str = "ext4") -> Path:
    source = path.with_name(path.name + ".d")
    source.mkdir()
    for name, data in content.items():
        (source / name).write_bytes(data)
    run(MKFS_EXT4, "-q", "-F", "-t", kind, "-d", source, path, "8M")
    shutil.rmtree(source)
    return path


def leaks(folder: Path, marker: bytes) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and marker in p.read_bytes()]


def refusal(path: Path, dest: Path, fmt: str | None = None, **kwargs: int) -> str:
    with pytest.raises(DiskImageError) as caught:
        convert_to_raw(path, dest, fmt, **kwargs)
    message = str(caught.value)
    assert message and "\n" not in message
    assert list(dest.parent.iterdir()) == [], "a refused conversion leaves no file"
    return message


@pytest.fixture
def root_raw(tmp_path: Path) -> Path:
    return make_ext(tmp_path / "root.raw", {"hello.txt": b"hello from the guest\n"})


@pytest.fixture
def out(tmp_path: Path) -> Path:
    (tmp_path / "out").mkdir()
    return tmp_path / "out"


@pytest.fixture
def marker() -> bytes:
    return b"GLEANER-HOST-SECRET-" + uuid.uuid4().hex.encode()


@pytest.fixture
def secret(tmp_path: Path, marker: bytes) -> Path:
    """A "host file" that, read as a disk, is a perfectly good root disk holding the marker."""
    return make_ext(tmp_path / "secret", {"shadow": marker * 64})


@pytest.fixture
def backed_overlay(tmp_path: Path, secret: Path) -> Path:
    overlay = tmp_path / "overlay.qcow2"
    run(QEMU_IMG, "create", "-f", "qcow2", "-F", "raw", "-b", secret, overlay)
    return overlay


def unguarded_convert(source: Path, fmt: str, target: Path) -> bytes:
    run(QEMU_IMG, "convert", "-f", fmt, "-O", "raw", source, target)
    data = target.read_bytes()
    target.unlink()
    return data


# --- accepted ------------------------------------------------------------------------


def test_a_raw_ext4_disk_converts_to_the_same_bytes(root_raw: Path, out: Path) -> None:
    result = convert_to_raw(root_raw, out / "disk.raw")
    assert result == DiskProbe("raw", 8 * MIB, "ext4")
    assert (out / "disk.raw").read_bytes() == root_raw.read_bytes()
    assert [p.name for p in out.iterdir()] == ["disk.raw"]
    assert (out / "disk.raw").stat().st_blocks * 512 < 8 * MIB  # sparse: zeros are holes


def test_a_qcow2_of_it_converts_to_identical_raw_bytes(
    root_raw: Path, tmp_path: Path, out: Path
) -> None:
    qcow2 = tmp_path / "root.qcow2"
    run(QEMU_IMG, "convert", "-f", "raw", "-O", "qcow2", root_raw, qcow2)
    assert probe(qcow2).format == "qcow2"
    assert convert_to_raw(qcow2, out / "disk.raw") == DiskProbe("qcow2", 8 * MIB, "ext4")
    assert (out / "disk.raw").read_bytes() == root_raw.read_bytes()


@pytest.mark.parametrize("kind", ["ext2", "ext3", "ext4"])
def test_the_ext_flavour_is_told_from_the_superblock(kind: str, tmp_path: Path) -> None:
    disk = make_ext(tmp_path / "disk.raw", {"a": b"a"}, kind)
    assert file_system(disk.read_bytes()[:2048]) == kind


def test_partition_tables_count_as_a_root_disk_and_an_empty_mbr_does_not() -> None:
    mbr = bytearray(2048)
    mbr[510:512] = b"\x55\xaa"
    assert file_system(bytes(mbr)) is None
    mbr[446 + 4] = 0x83  # one Linux partition
    assert file_system(bytes(mbr)) == "mbr"
    gpt = bytearray(mbr)
    gpt[512:520] = b"EFI PART"
    assert file_system(bytes(gpt)) == "gpt"


# --- backing files and data files ------------------------------------------------------


def test_a_qcow2_backed_by_a_host_file_is_refused_and_nothing_of_it_is_written(
    backed_overlay: Path, secret: Path, marker: bytes, tmp_path: Path, out: Path
) -> None:
    assert marker in unguarded_convert(backed_overlay, "qcow2", tmp_path / "control.raw")
    assert refusal(backed_overlay, out / "disk.raw") == (
        "disk image overlay.qcow2: the qcow2 header names a backing file"
    )
    assert leaks(out, marker) == []


def test_qemu_img_info_of_a_backed_qcow2_is_refused_on_its_own(backed_overlay: Path) -> None:
    text = subprocess.run(
        [QEMU_IMG, "info", "--output=json", "-f", "qcow2", str(backed_overlay)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    with pytest.raises(
        DiskImageError, match=r"^qemu-img info shows a backing file \(backing-filename "
    ):
        check_info(text, "qcow2", 64 * MIB)


def test_the_conversion_alone_never_opens_a_backing_file(
    backed_overlay: Path, marker: bytes, tmp_path: Path
) -> None:
    assert marker in unguarded_convert(backed_overlay, "qcow2", tmp_path / "control.raw")
    fd = os.open(backed_overlay, os.O_RDONLY)
    try:
        qemu_convert(fd, "qcow2", tmp_path / "guarded.raw", timeout_s=30)
    finally:
        os.close(fd)
    converted = (tmp_path / "guarded.raw").read_bytes()
    assert marker not in converted
    assert converted == bytes(8 * MIB)  # the overlay holds nothing of its own


def test_a_qcow2_with_an_external_data_file_is_refused_by_the_header_and_by_info(
    tmp_path: Path, out: Path, marker: bytes
) -> None:
    data_file = tmp_path / "host-file"
    image = tmp_path / "data.qcow2"
    options = f"data_file={data_file},data_file_raw=on,preallocation=metadata"
    run(QEMU_IMG, "create", "-f", "qcow2", "-o", options, image, "8M")
    data_file.write_bytes(make_ext(tmp_path / "secret", {"shadow": marker * 64}).read_bytes())
    assert marker in unguarded_convert(image, "qcow2", tmp_path / "control.raw")

    assert refusal(image, out / "disk.raw") == (
        "disk image data.qcow2: the qcow2 header names an external data file"
    )
    assert leaks(out, marker) == []
    text = subprocess.run(
        [QEMU_IMG, "info", "--output=json", "-f", "qcow2", str(image)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    with pytest.raises(DiskImageError, match=r"^qemu-img info shows a data file"):
        check_info(text, "qcow2", 64 * MIB)


# --- other refusals --------------------------------------------------------------------


def test_a_virtual_size_over_the_cap_is_refused(tmp_path: Path, out: Path) -> None:
    big = tmp_path / "big.qcow2"
    run(QEMU_IMG, "create", "-f", "qcow2", big, "1G")
    message = refusal(big, out / "disk.raw", max_virtual_bytes=16 * MIB)
    assert message.endswith(
        f"the qcow2 header declares {1 << 30} bytes, over the cap of {16 * MIB}"
    )
    raw = tmp_path / "big.raw"
    raw.write_bytes(bytes(2 * MIB))
    message = refusal(raw, out / "disk.raw", max_virtual_bytes=MIB)
    assert message.endswith(f"virtual size {2 * MIB} bytes is over the cap of {MIB}")


def test_an_encrypted_qcow2_is_refused(tmp_path: Path, out: Path) -> None:
    image = tmp_path / "locked.qcow2"
    run(QEMU_IMG, "create", "-f", "qcow2", image, "8M")
    with image.open("r+b") as file:  # crypt_method 2 (LUKS); making a real one takes seconds
        file.seek(32)
        file.write((2).to_bytes(4, "big"))
    assert refusal(image, out / "disk.raw").endswith("the qcow2 header says it is encrypted")


def test_a_qcow2_said_to_be_raw_is_refused_as_ambiguous(
    root_raw: Path, tmp_path: Path, out: Path
) -> None:
    qcow2 = tmp_path / "root.qcow2"
    run(QEMU_IMG, "convert", "-f", "raw", "-O", "qcow2", root_raw, qcow2)
    assert "ambiguous" in refusal(qcow2, out / "disk.raw", "raw")
    assert "has no qcow2 magic" in refusal(root_raw, out / "disk.raw", "qcow2")
    assert "not accepted" in refusal(root_raw, out / "disk.raw", "vmdk")


def test_a_qcow2_that_fails_to_convert_says_why_and_leaves_nothing(
    root_raw: Path, tmp_path: Path, out: Path
) -> None:
    image = tmp_path / "broken.qcow2"
    run(QEMU_IMG, "convert", "-f", "raw", "-O", "qcow2", root_raw, image)
    with image.open("r+b") as file:  # point the first L2 table at an unaligned offset
        file.seek(40)
        file.seek(int.from_bytes(file.read(8), "big"))
        file.write(((1 << 63) | 0x12345).to_bytes(8, "big"))
    assert probe(image).virtual_bytes == 8 * MIB  # the header and qemu-img info see no fault
    assert refusal(image, out / "disk.raw").startswith(
        "disk image broken.qcow2: qemu-img convert: qcow2: Image is corrupt: L2 table offset"
    )


@pytest.mark.parametrize(
    ("qemu_format", "options", "named"),
    [
        ("vmdk", "", "vmdk"),
        ("vdi", "", "vdi"),
        ("vpc", "", "vhd"),
        ("vpc", "subformat=fixed", "vhd"),  # the magic is only in the footer
        ("vhdx", "", "vhdx"),
        ("qed", "", "qed"),
    ],
)
def test_other_formats_are_refused_by_name(
    qemu_format: str, options: str, named: str, root_raw: Path, tmp_path: Path, out: Path
) -> None:
    image = tmp_path / f"root.{qemu_format}"
    extra = ["-o", options] if options else []
    run(QEMU_IMG, "convert", "-f", "raw", "-O", qemu_format, *extra, root_raw, image)
    assert refusal(image, out / "disk.raw") == (
        f"disk image {image.name}: this is a {named} image; only raw and qcow2 are accepted"
    )


def test_a_raw_disk_without_a_file_system_is_refused_and_removed(tmp_path: Path, out: Path) -> None:
    zeros = tmp_path / "zeros.raw"
    zeros.write_bytes(bytes(4 * MIB))
    assert "holds no ext file system or partition table" in refusal(zeros, out / "disk.raw")


def test_garbage_behind_the_qcow2_magic_is_refused_in_one_line(tmp_path: Path, out: Path) -> None:
    junk = tmp_path / "junk.qcow2"
    junk.write_bytes(b"QFI\xfb" + bytes(range(256)) * 64)
    assert "qcow2" in refusal(junk, out / "disk.raw")
    for header in (b"\x00\x00\x00\x03" + bytes(96), b"\x00\x00\x00\x02" + bytes(200)):
        junk.write_bytes(b"QFI\xfb" + header)  # versions we take, nonsense behind them
        assert refusal(junk, out / "disk.raw").startswith("disk image junk.qcow2: ")


GOOD_INFO = {"format": "qcow2", "virtual-size": 8 * MIB}


@pytest.mark.parametrize(
    "change",
    [
        {"virtual-size": True},
        {"virtual-size": "8388608"},
        {"virtual-size": 0},
        {"virtual-size": 65 * MIB},
        {"format": "raw"},
        {"format": None},
        {"encrypted": True},
        {"encrypted": "no"},
        {"backing-filename-format": "raw"},
        {"full-backing-filename": None},
        {"format-specific": {"type": "qcow2", "data": {"data-file": 1}}},
    ],
)
def test_hostile_info_json_is_refused(change: dict[str, object]) -> None:
    assert check_info(json.dumps(GOOD_INFO), "qcow2", 64 * MIB) == 8 * MIB
    with pytest.raises(DiskImageError):
        check_info(json.dumps({**GOOD_INFO, **change}), "qcow2", 64 * MIB)


@pytest.mark.parametrize("text", ["not json", "[]", "null", '{"format": "qcow2"}'])
def test_info_that_is_no_json_object_with_a_size_is_refused(text: str) -> None:
    with pytest.raises(DiskImageError):
        check_info(text, "qcow2", 64 * MIB)


def test_a_conversion_that_outlasts_its_timeout_is_a_clear_error(
    root_raw: Path, tmp_path: Path
) -> None:
    fd = os.open(root_raw, os.O_RDONLY)
    try:
        with pytest.raises(DiskImageError, match=r"took over 0 s"):
            qemu_convert(fd, "raw", tmp_path / "slow.raw", timeout_s=0.001)
    finally:
        os.close(fd)
