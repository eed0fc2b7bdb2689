"""OCI and Docker image archives: read, checked, flattened, stored; hostile ones refused."""

from __future__ import annotations

import hashlib
import io
import json
import random
import tarfile
from pathlib import Path

import pytest
from kit.oci import (
    ImageSpec,
    device_member,
    dir_member,
    file_member,
    files_layer,
    layer_tar,
    link_member,
    write_docker_archive,
    write_oci_archive,
)

from node.base.identity import Identity
from segments.image.errors import ImageError
from segments.image.layers import LayerLimits, check_layer, flatten
from segments.image.library import ImageLibrary, normalise_name
from segments.image.oci import OciArchive

IDENTITY = Identity.from_seeds(b"\x21" * 32, b"\x22" * 32)
BASE = {"bin/tool": b"#!/bin/sh\necho tool\n", "etc/os-release": b"ID=test\n"}


def base_layer() -> list:
    return [dir_member("bin"), dir_member("etc"), *files_layer(BASE)]


def import_spec(tmp_path: Path, spec: ImageSpec, name: str | None = "test/img:1"):
    archive = write_oci_archive(tmp_path / "img.tar", spec)
    with ImageLibrary(tmp_path / "store") as library:
        return library.import_archive(archive, IDENTITY, name)


# --- reading ---------------------------------------------------------------------


def test_an_oci_archive_gives_its_settings_layers_and_tag(tmp_path: Path) -> None:
    spec = ImageSpec([base_layer()], entrypoint=["/bin/tool"], cmd=["--fast"], tag="v2")
    with OciArchive(write_oci_archive(tmp_path / "img.tar", spec)) as archive:
        image = archive.read_image()
    assert image.settings.entrypoint == ("/bin/tool",) and image.settings.cmd == ("--fast",)
    assert image.settings.env == ("PATH=/usr/bin:/bin",) and image.tags == ("v2",)
    assert len(image.layers) == 1 and image.layers[0].gzipped is True


def test_the_same_image_has_one_id_however_it_was_packed(tmp_path: Path) -> None:
    layers = [base_layer(), files_layer({"data/x": b"x" * 5000})]
    ids = set()
    for number, (writer, gz) in enumerate(
        [(write_oci_archive, True), (write_oci_archive, False), (write_docker_archive, False)]
    ):
        archive = writer(tmp_path / f"{number}.tar", ImageSpec(layers, gzip_layers=gz))
        with ImageLibrary(tmp_path / f"store{number}") as library:
            ids.add(library.import_archive(archive, IDENTITY, None).image.id)
    assert len(ids) == 1


def test_whiteouts_delete_and_opaque_folders_hide_what_lower_layers_put(tmp_path: Path) -> None:
    lower = layer_tar(
        [*files_layer({"a/keep": b"1", "a/gone": b"2", "b/x": b"3", "b/y": b"4", "c": b"5"})]
    )
    upper = layer_tar(
        [
            file_member("a/.wh.gone", b""),
            file_member("b/.wh..wh..opq", b""),
            file_member("b/new", b"6"),
            file_member(".wh.c", b""),  # a file turns into a folder only through a whiteout
            dir_member("c"),
            file_member("c/inside", b"7"),
        ]
    )
    changesets = [check_layer(_stream(lower)), check_layer(_stream(upper))]
    root = flatten(changesets)
    assert sorted(root) == ["a/keep", "b/new", "c", "c/inside"]
    assert root["a/keep"].layer == 0 and root["b/new"].layer == 1


def test_symbolic_links_are_kept_for_the_guest_and_never_followed_here(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    spec = ImageSpec([[link_member("etc", str(victim)), link_member("bin", "usr/bin")]])
    result = import_spec(tmp_path, spec)
    assert list(victim.iterdir()) == []
    assert result.image.kind == "oci"


# --- the library -------------------------------------------------------------------


def test_names_map_to_ids_and_a_shared_base_layer_is_stored_once(tmp_path: Path) -> None:
    big = random.Random(1).randbytes(1 << 20)  # 1 MiB of distinct blocks
    first_spec = ImageSpec([[*base_layer(), file_member("lib/big", big)]])
    extra = random.Random(2).randbytes(100_000)
    second_spec = ImageSpec([*first_spec.layers, files_layer({"app/run": extra})])
    with ImageLibrary(tmp_path / "store") as library:
        first = library.import_archive(
            write_oci_archive(tmp_path / "a.tar", first_spec), IDENTITY, "tools/base"
        )
        second = library.import_archive(
            write_oci_archive(tmp_path / "b.tar", second_spec), IDENTITY, "tools/app:1.0"
        )
        assert library.names() == {
            "tools/base:latest": first.image.id,
            "tools/app:1.0": second.image.id,
        }
        assert library.resolve("tools/app:1.0").id == second.image.id
        assert library.resolve(first.image.id).names == ("tools/base:latest",)
        assert [image.id for image in library.list()] == [first.image.id, second.image.id]
    assert first.new_bytes >= len(big)
    assert second.skipped_layers == 1
    assert len(extra) <= second.new_bytes <= 1.05 * second.image.layers[1]["size"]


def test_importing_again_moves_a_name_and_keeps_the_old_image(tmp_path: Path) -> None:
    with ImageLibrary(tmp_path / "store") as library:
        old = library.import_archive(
            write_oci_archive(tmp_path / "a.tar", ImageSpec([base_layer()])), IDENTITY, "x/y"
        )
        new = library.import_archive(
            write_oci_archive(tmp_path / "b.tar", ImageSpec([base_layer()], cmd=["/bin/tool"])),
            IDENTITY,
            "x/y",
        )
        assert old.image.id != new.image.id
        assert library.resolve("x/y").id == new.image.id
        assert library.load(old.image.id).names == ()


@pytest.mark.parametrize("name", ["UPPER/case", "a//b", "-a", "a:b:c", "a:" + "t" * 200, ""])
def test_a_bad_name_is_refused(name: str) -> None:
    with pytest.raises(ImageError, match="not an image name"):
        normalise_name(name)


# --- hostile archives ----------------------------------------------------------------


HOSTILE_LAYERS = {
    "dot-dot": [file_member("../escape", b"x")],
    "deep dot-dot": [file_member("a/../../escape", b"x")],
    "absolute": [file_member("/etc/escape", b"x")],
    "char device": [device_member("dev/mem")],
    "block device": [device_member("dev/sda", tarfile.BLKTYPE)],
    "hard link out": [link_member("h", "../../etc/shadow", tarfile.LNKTYPE)],
    "hard link to nothing": [link_member("h", "etc/shadow", tarfile.LNKTYPE)],
    "through a link": [link_member("etc", "/tmp"), file_member("etc/escape", b"x")],
    "under a file": [file_member("f", b"1"), file_member("f/g", b"2")],
    "control character": [file_member("x\n../bin/.wh.sh", b"")],
}


@pytest.mark.parametrize("case", sorted(HOSTILE_LAYERS))
def test_a_hostile_layer_is_refused_and_nothing_is_stored(tmp_path: Path, case: str) -> None:
    sentinel = tmp_path / "victim"
    sentinel.write_text("untouched")
    with pytest.raises(ImageError, match="refused"):
        import_spec(tmp_path, ImageSpec([base_layer(), HOSTILE_LAYERS[case]]))
    _assert_nothing_kept(tmp_path)
    assert sentinel.read_text() == "untouched" and not (tmp_path / "escape").exists()


@pytest.mark.parametrize("whiteout", ["a/.wh.bin", "a/etc/.wh..wh..opq"])
def test_a_whiteout_cannot_reach_through_a_lower_layer_s_link(
    tmp_path: Path, whiteout: str
) -> None:
    with pytest.raises(ImageError, match="lies under"):
        import_spec(tmp_path, ImageSpec([[link_member("a", "/")], [file_member(whiteout, b"")]]))
    _assert_nothing_kept(tmp_path)


def test_a_link_in_a_lower_layer_cannot_carry_a_file_out_in_an_upper_one(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="lies under"):
        import_spec(tmp_path, ImageSpec([[link_member("etc", "/")], files_layer({"etc/x": b"1"})]))
    _assert_nothing_kept(tmp_path)


def test_a_folder_cannot_replace_a_link_or_file_without_a_whiteout(tmp_path: Path) -> None:
    for lower, upper in [
        ([link_member("a", "/")], [dir_member("a"), file_member("a/bin/sh", b"x")]),
        ([dir_member("d"), file_member("d/x", b"1")], [file_member("d", b"2")]),
    ]:
        with pytest.raises(ImageError, match="without a whiteout"):
            import_spec(tmp_path, ImageSpec([lower, upper]))
        _assert_nothing_kept(tmp_path)


def test_data_after_a_layer_s_end_is_refused_not_stored(tmp_path: Path) -> None:
    plain = layer_tar(files_layer({"f": b"x"}))
    bomb = plain + b"\x00" * (2 << 20)  # zeros past the trailer cap: a gzip bomb's shape
    junk = plain + b"not zeros"
    for layer in (bomb, junk):
        archive = write_oci_archive(tmp_path / "img.tar", ImageSpec([layer]))
        with (
            pytest.raises(ImageError, match="data after its tar's end"),
            ImageLibrary(tmp_path / "store") as library,
        ):
            library.import_archive(archive, IDENTITY, None)
        _assert_nothing_kept(tmp_path)


def test_a_hostile_outer_archive_is_refused_with_one_line(tmp_path: Path) -> None:
    chain = tmp_path / "chain.tar"
    info, data = file_member("index.json", b"{}")
    info.pax_headers = {"comment": "9" * 65_000}
    chain.write_bytes(layer_tar([(info, data)]))
    with pytest.raises(ImageError, match="metadata header is over"), OciArchive(chain):
        pass
    spec = ImageSpec([files_layer(BASE)])
    archive = write_oci_archive(tmp_path / "img.tar", spec)

    def list_media(name: str, data: bytes) -> bytes:
        if name != "index.json":
            return data
        index = json.loads(data)
        index["manifests"][0]["mediaType"] = ["x"]
        return json.dumps(index).encode()

    _rewrite_members(archive, list_media)
    with pytest.raises(ImageError, match="no linux/amd64 image"), OciArchive(archive) as oci:
        oci.read_image()


def test_a_layer_over_the_limits_is_refused(tmp_path: Path) -> None:
    archive = write_oci_archive(tmp_path / "img.tar", ImageSpec([files_layer({"f": b"x" * 5000})]))
    for limits, words in [
        (LayerLimits(max_file_bytes=4096), "over 4096 bytes"),
        (LayerLimits(max_layer_bytes=4096), "layer is over"),
        (LayerLimits(max_members=0), "over 0 members"),
    ]:
        with (
            ImageLibrary(tmp_path / "store", limits) as library,
            pytest.raises(ImageError, match=words),
        ):
            library.import_archive(archive, IDENTITY, "x/y")
    _assert_nothing_kept(tmp_path)


def test_a_layer_whose_pax_header_would_stall_the_parser_is_refused(tmp_path: Path) -> None:
    info, data = file_member("f", b"x")
    info.pax_headers = {"comment": "9" * 65_000}  # quadratic to parse in Python < 3.11.10
    archive = write_oci_archive(tmp_path / "img.tar", ImageSpec([[(info, data)]]))
    with (
        pytest.raises(ImageError, match="metadata header is over"),
        ImageLibrary(tmp_path / "store") as library,
    ):
        library.import_archive(archive, IDENTITY, None)
    _assert_nothing_kept(tmp_path)


def test_a_tampered_layer_does_not_match_its_digest(tmp_path: Path) -> None:
    spec = ImageSpec([files_layer(BASE)], gzip_layers=False)
    archive = write_oci_archive(tmp_path / "img.tar", spec)

    def flip(name: str, data: bytes) -> bytes:  # one byte of a file in the layer, same size
        return data.replace(b"echo tool", b"echo TOOL") if name.startswith("blobs/") else data

    _rewrite_members(archive, flip)
    with (
        pytest.raises(ImageError, match="does not match its digest"),
        ImageLibrary(tmp_path / "store") as library,
    ):
        library.import_archive(archive, IDENTITY, None)
    _assert_nothing_kept(tmp_path)


def test_a_damaged_compressed_layer_is_refused(tmp_path: Path) -> None:
    big = random.Random(3).randbytes(50_000)
    archive = write_oci_archive(tmp_path / "img.tar", ImageSpec([files_layer({"f": big})]))

    def damage(name: str, data: bytes) -> bytes:  # same size, garbage in the deflate stream
        if not name.startswith("blobs/") or data[:2] != b"\x1f\x8b":
            return data
        middle = len(data) // 2
        return (
            data[:middle]
            + bytes(b ^ 0x55 for b in data[middle : middle + 64])
            + data[middle + 64 :]
        )

    _rewrite_members(archive, damage)
    with (
        pytest.raises(ImageError, match=r"cannot be unpacked|digest|not a readable tar"),
        ImageLibrary(tmp_path / "store") as library,
    ):
        library.import_archive(archive, IDENTITY, None)
    _assert_nothing_kept(tmp_path)


def test_a_layer_that_is_not_the_config_s_diff_id_is_refused(tmp_path: Path) -> None:
    archive = write_docker_archive(tmp_path / "img.tar", ImageSpec([files_layer(BASE)]))

    def swap(name: str, data: bytes) -> bytes:
        return layer_tar(files_layer({"other": b"y"})) if name.endswith("layer.tar") else data

    _rewrite_members(archive, swap)
    with pytest.raises(ImageError, match="diff_id"), ImageLibrary(tmp_path / "store") as library:
        library.import_archive(archive, IDENTITY, None)
    _assert_nothing_kept(tmp_path)


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        (lambda c: {**c, "architecture": "arm64"}, "not linux/amd64"),
        (lambda c: {**c, "rootfs": {"type": "layers", "diff_ids": []}}, "1 to 127 layers"),
        (lambda c: {**c, "config": {"Env": ["NOEQUALS"]}}, "NAME=VALUE"),
        (lambda c: {**c, "config": {"Cmd": [1, 2]}}, "expected a string"),
        (lambda c: {**c, "config": {"Cmd": "x" * 5000}}, "not a list"),
    ],
)
def test_a_bad_config_is_refused(tmp_path: Path, edit, words: str) -> None:
    archive = write_docker_archive(tmp_path / "img.tar", ImageSpec([files_layer(BASE)]))
    with tarfile.open(archive) as tar:
        files = {info.name: tar.extractfile(info).read() for info in tar if info.isreg()}
    manifest = json.loads(files.pop("manifest.json"))
    config = json.dumps(edit(json.loads(files.pop(manifest[0]["Config"])))).encode()
    manifest[0]["Config"] = f"{hashlib.sha256(config).hexdigest()}.json"  # named by its digest
    files[manifest[0]["Config"]] = config
    files["manifest.json"] = json.dumps(manifest).encode()
    archive.write_bytes(layer_tar(files_layer(files)))
    with pytest.raises(ImageError, match=words), ImageLibrary(tmp_path / "store") as library:
        library.import_archive(archive, IDENTITY, None)
    _assert_nothing_kept(tmp_path)


def test_a_file_that_is_no_image_archive_is_refused(tmp_path: Path) -> None:
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"\x00garbage" * 1000)
    with pytest.raises(ImageError), ImageLibrary(tmp_path / "store") as library:
        library.import_archive(junk, IDENTITY, None)
    plain = tmp_path / "plain.tar"
    plain.write_bytes(layer_tar(files_layer({"readme": b"hello"})))
    with (
        pytest.raises(ImageError, match=r"neither index\.json nor manifest\.json"),
        ImageLibrary(tmp_path / "store") as library,
    ):
        library.import_archive(plain, IDENTITY, None)


# --- helpers ------------------------------------------------------------------------


def _stream(data: bytes) -> io.BytesIO:
    return io.BytesIO(data)


def _assert_nothing_kept(tmp_path: Path) -> None:
    store = tmp_path / "store"
    if not store.exists():
        return
    assert list((store / "imported").glob("*.json")) == []
    assert not (store / "names.json").exists()
    assert list(store.glob(".import-*")) == []
    assert list((store / "imported" / "layers").iterdir()) == []


def _rewrite_members(archive: Path, edit) -> None:
    with tarfile.open(archive) as tar:
        files = {info.name: tar.extractfile(info).read() for info in tar if info.isreg()}
    archive.write_bytes(layer_tar(files_layer({n: edit(n, d) for n, d in files.items()})))
