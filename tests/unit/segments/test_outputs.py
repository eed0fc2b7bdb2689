"""A guest's outputs read off its output disk: what is written, and every stream refused.

Each hostile disk is built here with ``tarfile`` (headers written with
``TarInfo.tobuf``, so a header may claim what its data does not hold) and padded
with zeros, as the guest's output disk would be. A refusal must leave the host
as it was: no ``dest``, no ``.outputs-*`` folder, the sentinel ``victim``
untouched and nothing at the path the hostile member aimed at.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import stat
import tarfile
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given
from kit.fuzzing import edit_lists, fuzz_settings, mutate

from segments.image.outputs import OutputError, OutputFile, OutputLimits, read_outputs

DISK_BYTES = 1 << 20
PRECIOUS = b"the host's own file\n"
DEFAULT_LIMITS = OutputLimits()


def member(name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, **fields: object) -> bytes:
    """One pax-format member: header (with `fields` set, `size` defaulting to the data) and data."""
    info = tarfile.TarInfo(name)
    info.type, info.size, info.mode, info.mtime = kind, len(data), 0o644, 1_000_000
    for field, value in fields.items():
        setattr(info, field, value)
    header = info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    return header + data + b"\0" * (-len(data) % tarfile.BLOCKSIZE)


def write_disk(tmp_path: Path, *members: bytes, pad: bool = True) -> Path:
    stream = b"".join(members) + (b"\0" * 2 * tarfile.BLOCKSIZE if pad else b"")
    disk = tmp_path / "disk.img"
    disk.write_bytes(stream + b"\0" * (DISK_BYTES - len(stream)) if pad else stream)
    return disk


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    path = tmp_path / "victim"
    path.write_bytes(PRECIOUS)
    path.chmod(0o600)
    return path


def assert_refused(
    tmp_path: Path,
    disk: Path,
    match: str,
    aimed: tuple[Path, ...] = (),
    limits: OutputLimits = DEFAULT_LIMITS,
) -> None:
    dest = tmp_path / "out"
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(OutputError, match=match):
        read_outputs(disk, dest, limits)
    assert not os.path.lexists(dest)
    assert list(tmp_path.glob(".outputs-*")) == []
    assert sorted(os.listdir(tmp_path)) == before
    victim = tmp_path / "victim"
    assert victim.read_bytes() == PRECIOUS
    assert stat.S_IMODE(victim.lstat().st_mode) == 0o600
    for path in aimed:
        assert not os.path.lexists(path), f"something was made at {path}"


# --- accepted streams --------------------------------------------------------------


def test_a_good_stream_writes_nested_files_with_plain_modes_and_right_digests(
    tmp_path: Path,
) -> None:
    files = {
        "top.txt": (b"top\n", 0o600),
        "docs/readme.txt": (b"read me\n" * 1000, 0o664),
        "bin/run": (b"#!/bin/sh\necho hi\n", 0o4755),  # setuid asked for, never given
        "deep/a/b/c.dat": (bytes(range(256)) * 5000, 0o640),  # over one copy chunk
        "deep/empty": (b"", 0o1744),  # sticky and owner-exec: 0o755
    }
    disk = write_disk(
        tmp_path,
        member("docs", kind=tarfile.DIRTYPE, mode=0o700),
        member("./top.txt", files["top.txt"][0], mode=0o600, uid=4242, gid=4242),
        *(
            member(name, data, mode=mode)
            for name, (data, mode) in files.items()
            if name != "top.txt"
        ),
    )
    dest = tmp_path / "out"

    written = read_outputs(disk, dest)

    assert written == [
        OutputFile(path=name, size=len(data), sha256=hashlib.sha256(data).hexdigest())
        for name, (data, _) in sorted(files.items())
    ]
    for name, (data, mode) in files.items():
        status = (dest / name).lstat()
        assert (dest / name).read_bytes() == data
        assert stat.S_ISREG(status.st_mode)
        assert stat.S_IMODE(status.st_mode) == (0o755 if mode & 0o111 else 0o644)
        assert status.st_uid == os.getuid() and status.st_mtime > 1_000_000
    for folder in ("", "docs", "bin", "deep", "deep/a", "deep/a/b"):
        assert stat.S_IMODE((dest / folder).lstat().st_mode) == 0o755
    assert sorted(os.listdir(tmp_path)) == ["disk.img", "out"]


def test_an_all_zero_disk_is_an_empty_output(tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\0" * DISK_BYTES)
    assert read_outputs(disk, tmp_path / "out") == []
    assert os.listdir(tmp_path / "out") == []
    assert list(tmp_path.glob(".outputs-*")) == []


def test_an_existing_dest_is_left_alone(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "kept").write_bytes(b"kept")
    with pytest.raises(FileExistsError):
        read_outputs(write_disk(tmp_path, member("kept", b"pwned")), tmp_path / "out")
    assert (tmp_path / "out" / "kept").read_bytes() == b"kept"
    assert list(tmp_path.glob(".outputs-*")) == []


# --- refused streams ---------------------------------------------------------------


def test_a_name_climbing_out_with_dotdot_is_refused(tmp_path: Path, victim: Path) -> None:
    disk = write_disk(tmp_path, member("../escaped", b"pwned"), member("../victim", b"pwned"))
    assert_refused(tmp_path, disk, "climbs out", aimed=(tmp_path / "escaped",))


def test_a_pax_path_climbing_out_under_an_innocent_name_is_refused(
    tmp_path: Path, victim: Path
) -> None:
    disk = write_disk(tmp_path, member("innocent", b"pwned", pax_headers={"path": "../escaped"}))
    assert_refused(tmp_path, disk, "climbs out", aimed=(tmp_path / "escaped",))


def test_an_absolute_name_is_refused(tmp_path: Path, victim: Path) -> None:
    target = tmp_path / "absolute-target"
    disk = write_disk(tmp_path, member(str(target), b"pwned"))
    assert_refused(tmp_path, disk, "absolute path", aimed=(target,))


@pytest.mark.parametrize("relative", [True, False], ids=["relative", "absolute"])
def test_a_symbolic_link_is_refused(tmp_path: Path, victim: Path, relative: bool) -> None:
    target = "../victim" if relative else str(victim)
    disk = write_disk(
        tmp_path,
        member("link", kind=tarfile.SYMTYPE, linkname=target),
        member("link", b"pwned through the link"),
    )
    assert_refused(tmp_path, disk, "'link' is a symbolic link")


def test_a_hard_link_is_refused(tmp_path: Path, victim: Path) -> None:
    disk = write_disk(
        tmp_path,
        member("hard", kind=tarfile.LNKTYPE, linkname=str(victim)),
        member("hard", b"pwned through the link"),
    )
    assert_refused(tmp_path, disk, "'hard' is a hard link")


@pytest.mark.parametrize(
    ("kind", "words"),
    [
        (tarfile.CHRTYPE, "a character device"),
        (tarfile.BLKTYPE, "a block device"),
        (tarfile.FIFOTYPE, "a FIFO"),
        (tarfile.CONTTYPE, "a contiguous file"),
        (b"Z", "of unknown type"),
    ],
    ids=["char-device", "block-device", "fifo", "contiguous", "unknown"],
)
def test_a_special_file_is_refused(tmp_path: Path, victim: Path, kind: bytes, words: str) -> None:
    disk = write_disk(tmp_path, member("node", kind=kind, devmajor=8, devminor=0))
    assert_refused(tmp_path, disk, f"'node' is {words}")


def test_a_gnu_sparse_file_is_refused(tmp_path: Path, victim: Path) -> None:
    info = tarfile.TarInfo("holes")
    info.type, info.size = tarfile.GNUTYPE_SPARSE, 512
    header = info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape")
    disk = write_disk(tmp_path, header + b"x" * 512)
    assert_refused(tmp_path, disk, "'holes' is a GNU sparse file")


def test_a_pax_sparse_file_with_a_runaway_map_is_refused(tmp_path: Path, victim: Path) -> None:
    sparse = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": "holes"}
    map_that_never_ends = b"999999999999\n" + b"1\n" * 2000
    disk = write_disk(tmp_path, member("x", map_that_never_ends, pax_headers=sparse))
    assert_refused(tmp_path, disk, "sparse file")


def test_a_file_with_stray_gnu_sparse_keys_is_refused(tmp_path: Path, victim: Path) -> None:
    keys = {"GNU.sparse.name": "holes", "GNU.sparse.realsize": "3"}  # no map: tarfile reads it flat
    disk = write_disk(tmp_path, member("x", b"abc", pax_headers=keys))
    assert_refused(tmp_path, disk, "'holes' is a GNU sparse file")


def test_a_duplicate_path_is_refused(tmp_path: Path, victim: Path) -> None:
    disk = write_disk(tmp_path, member("a.txt", b"first"), member("./a.txt", b"second"))
    assert_refused(tmp_path, disk, "'a.txt' appears twice")


def test_a_file_under_an_earlier_file_is_refused(tmp_path: Path, victim: Path) -> None:
    disk = write_disk(tmp_path, member("a", b"a file"), member("a/b", b"under it"))
    assert_refused(tmp_path, disk, "'a/b' lies under a file")


def test_a_header_over_the_file_limit_is_refused_before_its_data_is_read(
    tmp_path: Path, victim: Path
) -> None:
    # 2 GiB claimed on a 1 MiB disk: reading first would fail as a truncated stream instead
    disk = write_disk(tmp_path, member("big", size=2 << 30))
    assert_refused(tmp_path, disk, "'big' is over the 1073741824-byte limit for one file")


def test_a_pax_size_over_the_file_limit_is_refused(tmp_path: Path, victim: Path) -> None:
    disk = write_disk(tmp_path, member("big", b"small", pax_headers={"size": str(1 << 40)}))
    assert_refused(tmp_path, disk, "'big' is over the 1073741824-byte limit")


def test_a_negative_size_is_refused(tmp_path: Path, victim: Path) -> None:
    disk = write_disk(tmp_path, member("neg", b"", pax_headers={"size": "-5"}))
    assert_refused(tmp_path, disk, "'neg' has a negative size")


def test_files_over_the_total_limit_are_refused(tmp_path: Path, victim: Path) -> None:
    disk = write_disk(tmp_path, *(member(f"f{index}", b"x" * 600) for index in range(3)))
    limits = OutputLimits(max_total_bytes=1500)
    assert_refused(tmp_path, disk, "over its 1500-byte limit", limits=limits)


def test_a_header_over_the_total_limit_is_refused_before_its_data_is_read(
    tmp_path: Path, victim: Path
) -> None:
    claim = member("f2", size=4 << 20)[: tarfile.BLOCKSIZE]  # past the 1 MiB disk: reading fails
    disk = write_disk(tmp_path, member("f0", b"x" * 600), member("f1", b"x" * 600), claim)
    limits = OutputLimits(max_total_bytes=1500)
    assert_refused(tmp_path, disk, "over its 1500-byte limit", limits=limits)


def test_too_many_members_are_refused(tmp_path: Path, victim: Path) -> None:
    disk = write_disk(tmp_path, *(member(f"f{index}", b"x") for index in range(4)))
    assert_refused(tmp_path, disk, "over 3 members", limits=OutputLimits(max_members=3))


def test_a_huge_pax_header_is_refused_before_it_is_read(tmp_path: Path, victim: Path) -> None:
    info = tarfile.TarInfo("././@PaxHeader")
    info.type, info.size = tarfile.XHDTYPE, 1 << 20
    header = info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
    disk = write_disk(tmp_path, header + b"9" * (1 << 19))
    assert_refused(tmp_path, disk, "metadata header is over 8192 bytes")


def pax_heavy(count: int) -> list[bytes]:
    return [
        member(f"f{index}", b"x", pax_headers={"comment": "c" * 7980}) for index in range(count)
    ]


def test_fifty_big_pax_headers_fit_the_metadata_budget(tmp_path: Path) -> None:
    assert len(read_outputs(write_disk(tmp_path, *pax_heavy(50)), tmp_path / "out")) == 50


def test_eighty_big_pax_headers_overspend_the_metadata_budget(tmp_path: Path, victim: Path) -> None:
    disk = write_disk(tmp_path, *pax_heavy(80))
    assert_refused(tmp_path, disk, "metadata headers are too many or too big")


def test_a_long_chain_of_pax_headers_is_refused(tmp_path: Path, victim: Path) -> None:
    pax = member("x", pax_headers={"comment": "chain"})[: -tarfile.BLOCKSIZE]  # header only
    disk = write_disk(tmp_path, pax * 5000, member("end", b"end"))
    assert_refused(tmp_path, disk, "no valid tar stream")


def test_garbage_bytes_are_refused(tmp_path: Path, victim: Path) -> None:
    disk = write_disk(tmp_path, random.Random(7).randbytes(4096))
    assert_refused(tmp_path, disk, "no valid tar stream")


def test_a_stream_cut_short_by_the_end_of_the_disk_is_refused(tmp_path: Path, victim: Path) -> None:
    cut = member("cut", size=10_000)[: tarfile.BLOCKSIZE] + b"y" * 100
    disk = write_disk(tmp_path, cut, pad=False)
    assert disk.stat().st_size == tarfile.BLOCKSIZE + 100
    assert_refused(tmp_path, disk, "no valid tar stream", aimed=(tmp_path / "out" / "cut",))


# --- fuzzing: a mangled stream is accepted whole or refused with OutputError ----------

GOOD = b"".join(
    [
        member("docs", kind=tarfile.DIRTYPE),
        member("docs/a.txt", b"alpha" * 100),
        member("run", b"#!/bin/sh\n", mode=0o755),
        member("n" * 150, b"a long name takes a pax header"),
    ]
)


@fuzz_settings(300, deadline=None, suppress_health_check=list(HealthCheck))
@given(edits=edit_lists(max_position=len(GOOD), max_size=8))
def test_a_mangled_stream_is_accepted_or_refused_and_never_escapes(
    edits: list[tuple[int, int, int]],
) -> None:
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        disk = root / "disk.img"
        disk.write_bytes(mutate(GOOD, edits) + b"\0" * 8192)
        try:
            files = read_outputs(disk, root / "out", OutputLimits(max_total_bytes=64 << 10))
        except OutputError:
            assert sorted(os.listdir(root)) == ["disk.img"]
        else:
            assert sorted(os.listdir(root)) == ["disk.img", "out"]
            for file in files:
                data = (root / "out" / file.path).read_bytes()
                assert hashlib.sha256(data).hexdigest() == file.sha256


def test_the_helper_builds_a_stream_tarfile_reads_back(tmp_path: Path) -> None:
    with tarfile.open(fileobj=io.BytesIO(GOOD + b"\0" * 1024)) as tar:
        assert tar.getnames() == ["docs", "docs/a.txt", "run", "n" * 150]
