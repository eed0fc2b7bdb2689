"""The run workload's disks, host side: the command by OCI's rules, the job tar, the image disk."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest
from kit.oci import ImageSpec, files_layer, write_oci_archive

from node.base.identity import Identity
from segments.image.errors import ImageError
from segments.image.job_disks import IMAGE, JOB, Command, command_for, prepare, write_job_tar
from segments.image.library import ImageLibrary, ImportedImage
from segments.image.runner import BLOCK, image_disk_header, layer_offsets, parse_exit, run_script
from segments.store.blocks import BlockStore
from segments.vm.replica import ReplicaError, restore_disks, save_file_parts
from segments.vm.runtime import Disk, VmSpec, domain_xml, relocated_xml

IDENTITY = Identity.from_seeds(b"\x51" * 32, b"\x52" * 32)


def oci(settings: dict) -> ImportedImage:
    return ImportedImage("0" * 64, "oci", settings, (), None, 0, 0.0)


def test_the_command_follows_oci_rules() -> None:
    image = oci({"entrypoint": ["/bin/app"], "cmd": ["--default"], "env": ["A=1", "B=2"]})
    assert command_for(image).argv == ("/bin/app", "--default")
    assert command_for(image, command=["--mine"]).argv == ("/bin/app", "--mine")
    assert command_for(image, entrypoint=[], command=["/bin/sh"]).argv == ("/bin/sh",)
    assert command_for(image, entrypoint=["/bin/other"]).argv == ("/bin/other",)  # Cmd dropped
    assert command_for(image, env=["B=3", "C=4"]).env == ("A=1", "B=3", "C=4")
    assert command_for(image).working_dir == "/"
    with pytest.raises(ImageError, match="no command"):
        command_for(oci({}))
    for bad in ("oops", "-u=x", "=x", "A B=1"):
        with pytest.raises(ImageError, match="NAME=VALUE"):
            command_for(image, env=[bad])


def test_run_script_quotes_every_word_and_enters_the_folder_in_the_new_root() -> None:
    script = run_script(["/bin/echo", "it's $HOME; rm -rf /"], ["X=a b"], "/work dir")
    assert "'it'\"'\"'s $HOME; rm -rf /'" in script and "'X=a b'" in script
    assert "chroot /newroot /.gleaner-bin/sh -c" in script and "'/work dir'" in script
    with pytest.raises(ValueError, match="not absolute"):
        run_script(["/bin/true"], [], "relative")


def test_the_image_disk_header_places_layers_on_block_boundaries() -> None:
    placed = layer_offsets([1, BLOCK, BLOCK + 1])
    assert placed == [(BLOCK, 1), (2 * BLOCK, BLOCK), (3 * BLOCK, BLOCK + 1)]
    header = image_disk_header(placed)
    assert len(header) == BLOCK
    assert header.split(b"\n\n")[0].decode().splitlines() == [
        "gleaner-layers 1",
        f"{BLOCK} 1",
        f"{2 * BLOCK} {BLOCK}",
        f"{3 * BLOCK} {BLOCK + 1}",
    ]
    with pytest.raises(ValueError):
        image_disk_header([(100, 5)])


def test_the_exit_status_is_the_last_one_printed() -> None:
    assert parse_exit("x\r\ngleaner-exit 0\r\ny\ngleaner-exit 17\n") == 17
    assert parse_exit("gleaner-exit-like 3\nno status") is None


def test_the_job_tar_holds_the_script_and_inputs_and_refuses_bad_ones(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.write_bytes(b"12345")
    command = Command(("/bin/true",), (), "/")
    write_job_tar(command, {"sub/data.txt": data}, tmp_path / "job.tar", 100)
    with tarfile.open(tmp_path / "job.tar") as archive:
        assert archive.getnames() == ["job/run.sh", "in/sub/data.txt"]
        assert archive.extractfile("in/sub/data.txt").read() == b"12345"
    assert (tmp_path / "job.tar").stat().st_size % 512 == 0
    for inputs, words in [
        ({"../x": data}, "climbs out"),
        ({"/etc/x": data}, "absolute"),
        ({"x": tmp_path}, "not a file"),
        ({"a": data, "b": data}, "over 9 bytes"),
    ]:
        with pytest.raises(ImageError, match=words):
            write_job_tar(command, inputs, tmp_path / "bad.tar", 9)


def test_the_image_disk_holds_each_layer_at_its_offset(tmp_path: Path) -> None:
    spec = ImageSpec([files_layer({"a": b"1" * 20000}), files_layer({"b": b"2"})], cmd=["/b"])
    archive = write_oci_archive(tmp_path / "img.tar", spec)
    with ImageLibrary(tmp_path / "store") as library:
        image = library.import_archive(archive, IDENTITY, None).image
        disks = prepare(library, image, command_for(image), {}, tmp_path / "d", 16 << 20, 16 << 20)
        assert [d.read_only for d in disks] == [False, True, True, False]
        disk = (tmp_path / "d" / IMAGE).read_bytes()
        lines = disk[:BLOCK].split(b"\n\n")[0].decode().splitlines()[1:]
        for line, layer in zip(lines, image.layers, strict=True):
            offset, size = map(int, line.split())
            manifest = library.store.manifest(bytes.fromhex(layer["manifest"]))
            assert disk[offset : offset + size] == library.store.read_file(manifest, "layer.tar")
    assert (tmp_path / "d" / JOB).exists()
    for scratch, output in [(1 << 20, 16 << 20), (2**63, 16 << 20), (16 << 20, -1)]:
        with pytest.raises(ImageError, match="disks take"):
            prepare(library, image, command_for(image), {}, tmp_path / "e", scratch, output)


def test_disks_appear_in_the_domain_in_order_and_follow_the_checkpoint(tmp_path: Path) -> None:
    disks = (Disk(tmp_path / "s"), Disk(tmp_path / "i", read_only=True))
    spec = VmSpec("gl-x", tmp_path / "k", tmp_path / "r", "", tmp_path / "log", disks=disks)
    xml = domain_xml(spec, kvm=False)
    assert xml.index('dev="vda"') < xml.index('dev="vdb"') and xml.count("<readonly />") == 1
    moved = (Disk(tmp_path / "s2"), Disk(tmp_path / "i2", read_only=True))
    local = VmSpec("gl-x", tmp_path / "k", tmp_path / "r", "", tmp_path / "log", disks=moved)
    relocated = relocated_xml(xml, local)
    assert str(tmp_path / "s2") in relocated and str(tmp_path / "s") + '"' not in relocated
    with pytest.raises(ValueError, match="at most"):
        domain_xml(VmSpec("gl-x", tmp_path, tmp_path, "", tmp_path, disks=disks * 5), kvm=False)


def test_a_checkpoint_s_disks_are_restored_whole_and_must_be_the_run_s(tmp_path: Path) -> None:
    store = BlockStore(tmp_path / "blocks")
    try:
        scratch, ram = tmp_path / "scratch", tmp_path / "ram"
        scratch.write_bytes(b"\x00" * 40000 + b"written in segment 1")
        ram.write_bytes(b"r" * 100)
        files = {"memory": ram, "console": ram, "disk-0": scratch}
        checkpoint = store.put_files(files, IDENTITY)
        assert save_file_parts(checkpoint) == ("memory",)  # disks are not part of the save file
        here = (Disk(tmp_path / "here"), Disk(tmp_path / "image", read_only=True))
        (tmp_path / "here").write_bytes(b"stale")
        with pytest.raises(ReplicaError, match="40020 bytes, this run's 5"):
            restore_disks(store, checkpoint, here)  # a disk of another size
        (tmp_path / "here").write_bytes(bytes(40020))
        restore_disks(store, checkpoint, here)
        assert (tmp_path / "here").read_bytes() == scratch.read_bytes()
        with pytest.raises(ReplicaError, match="disks"):
            restore_disks(store, checkpoint, (*here, Disk(tmp_path / "out")))
    finally:
        store.close()


def test_a_saved_domain_s_disks_are_rebuilt_here_never_taken_from_the_save(
    tmp_path: Path,
) -> None:
    local = VmSpec(
        "gl-x", tmp_path / "k", tmp_path / "r", "", tmp_path / "log", disks=(Disk(tmp_path / "s"),)
    )
    hostile = (
        "<domain><os/><devices>"
        '<disk type="file" device="disk"><driver name="qemu" type="qcow2"/>'
        '<source file="/var/lib/other/secret.qcow2"/><target dev="vda" bus="virtio"/></disk>'
        "</devices></domain>"
    )
    relocated = relocated_xml(hostile, local)
    assert "qcow2" not in relocated and "secret" not in relocated
    assert f'file="{tmp_path / "s"}"' in relocated and 'type="raw"' in relocated
    extra = hostile.replace(
        "</devices>",
        '<disk type="block"><source dev="/dev/sda"/><target dev="vdb"/></disk></devices>',
    )
    with pytest.raises(ValueError, match="2 disks, this run 1"):
        relocated_xml(extra, local)
