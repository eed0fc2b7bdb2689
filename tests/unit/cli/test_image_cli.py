"""`gleaner image import` and `gleaner image list`, as a job owner types them."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
from pathlib import Path

import pytest
from kit.oci import ImageSpec, files_layer, link_member, write_docker_archive, write_oci_archive

from node.cli.image import main as image_main
from segments.image.layers import LayerLimits, flatten
from segments.image.oci import OciArchive


@pytest.fixture
def agent_toml(tmp_path: Path) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(f'[node]\nstate_dir = "{tmp_path / "state"}"\n')
    return path


def test_import_then_list_shows_names_and_ids(
    tmp_path: Path, agent_toml: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = files_layer({"bin/tool": b"tool", "etc/os-release": b"ID=t\n"})
    oci = write_oci_archive(tmp_path / "a.tar", ImageSpec([base], cmd=["/bin/tool"]))
    docker = write_docker_archive(tmp_path / "b.tar", ImageSpec([base, files_layer({"x": b"1"})]))
    config = ["--config", str(agent_toml), "--json"]
    assert image_main(["import", str(oci), "--name", "lab/tool:1", *config]) == 0
    first = json.loads(capsys.readouterr().out)
    assert image_main(["import", str(docker), "--name", "lab/tool2", *config]) == 0
    second = json.loads(capsys.readouterr().out)
    assert first["kind"] == second["kind"] == "oci" and first["id"] != second["id"]
    assert first["settings"]["cmd"] == ["/bin/tool"] and first["names"] == ["lab/tool:1"]
    assert second["skipped_layers"] == 1  # the base layer was held already
    assert image_main(["list", *config]) == 0
    listed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {(tuple(i["names"]), i["id"]) for i in listed} == {
        (("lab/tool:1",), first["id"]),
        (("lab/tool2:latest",), second["id"]),
    }
    assert image_main(["list", "--config", str(agent_toml)]) == 0
    text = capsys.readouterr().out
    assert "lab/tool:1" in text and first["id"][:12] in text


def test_a_refused_import_says_why_in_one_line_and_stores_nothing(
    tmp_path: Path, agent_toml: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    hostile = ImageSpec([[link_member("etc", "/"), *files_layer({"etc/x": b"1"})]])
    archive = write_oci_archive(tmp_path / "a.tar", hostile)
    assert (
        image_main(["import", str(archive), "--name", "bad/one", "--config", str(agent_toml)]) == 1
    )
    err = capsys.readouterr().err.strip()
    assert err.startswith("gleaner image: layer refused") and "\n" not in err
    assert image_main(["list", "--config", str(agent_toml), "--json"]) == 0
    assert capsys.readouterr().out == ""
    assert image_main(["import", str(tmp_path / "none.tar"), "--config", str(agent_toml)]) == 1
    assert "no file" in capsys.readouterr().err


@pytest.mark.skipif(
    not (shutil.which("qemu-img") and Path("/usr/sbin/mkfs.ext4").exists()),
    reason="needs qemu-img and mkfs.ext4",
)
def test_a_qcow2_root_disk_imports_as_the_same_image_as_its_raw_twin(
    tmp_path: Path, agent_toml: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "hostname").write_text("guest\n")
    raw = tmp_path / "root.raw"
    subprocess.run(["/usr/sbin/mkfs.ext4", "-q", "-F", "-d", str(root), str(raw), "8M"], check=True)
    qcow2 = tmp_path / "root.qcow2"
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2)], check=True
    )
    config = ["--config", str(agent_toml), "--json"]
    assert image_main(["import", str(qcow2), "--name", "disks/root:q", *config]) == 0
    from_qcow2 = json.loads(capsys.readouterr().out)
    assert image_main(["import", str(raw), "--name", "disks/root:r", *config]) == 0
    from_raw = json.loads(capsys.readouterr().out)
    assert from_qcow2["kind"] == "disk" and from_qcow2["disk"]["file_system"] == "ext4"
    assert from_qcow2["id"] == from_raw["id"] and from_raw["new_bytes"] == 0
    assert sorted(from_raw["names"]) == ["disks/root:q", "disks/root:r"]


def test_packed_folders_import_as_layers_with_their_files_and_command(
    tmp_path: Path, agent_toml: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base, app = tmp_path / "base", tmp_path / "app"
    (base / "usr" / "bin").mkdir(parents=True)
    (base / "usr" / "bin" / "tool").write_bytes(b"#!/bin/sh\necho hi\n")
    (base / "usr" / "bin" / "tool").chmod(0o755)
    (base / "bin").symlink_to("usr/bin")
    (app / "srv").mkdir(parents=True)
    (app / "srv" / "data.txt").write_text("input\n")
    argv = [str(base), str(app), "--cmd", "/bin/tool --fast 'two words'", "--env", "A=1"]
    assert image_main(["pack", *argv, "-o", str(tmp_path / "one.tar")]) == 0
    assert image_main(["pack", *argv, "-o", str(tmp_path / "two.tar")]) == 0
    capsys.readouterr()
    assert (tmp_path / "one.tar").read_bytes() == (tmp_path / "two.tar").read_bytes()
    config = ["--config", str(agent_toml), "--json"]
    assert image_main(["import", str(tmp_path / "one.tar"), "--name", "lab/app", *config]) == 0
    imported = json.loads(capsys.readouterr().out)
    assert imported["settings"]["cmd"] == ["/bin/tool", "--fast", "two words"]
    assert imported["settings"]["env"] == ["A=1"] and len(imported["layers"]) == 2
    with OciArchive(tmp_path / "one.tar") as archive:
        image = archive.read_image()
        changesets = [
            archive.open_layer(ref, tmp_path / f"{n}.layer", LayerLimits())
            for n, ref in enumerate(image.layers)
        ]
    root = flatten(changesets)
    assert sorted(root) == ["bin", "srv", "srv/data.txt", "usr", "usr/bin", "usr/bin/tool"]
    assert root["bin"].entry.link == "usr/bin" and root["usr/bin/tool"].entry.mode == 0o755
    assert root["srv/data.txt"].layer == 1
    assert image_main(["pack", str(tmp_path / "nothing"), "-o", str(tmp_path / "x.tar")]) == 1


def test_rm_removes_an_image_and_only_the_layers_no_other_image_uses(
    tmp_path: Path, agent_toml: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shared = files_layer({"base": random.Random(5).randbytes(200_000)})
    own = files_layer({"own": random.Random(6).randbytes(100_000)})
    one = write_oci_archive(tmp_path / "one.tar", ImageSpec([shared, own]))
    two = write_oci_archive(tmp_path / "two.tar", ImageSpec([shared]))
    config = ["--config", str(agent_toml)]
    assert image_main(["import", str(one), "--name", "lab/one", *config]) == 0
    assert image_main(["import", str(two), "--name", "lab/two", *config]) == 0
    capsys.readouterr()
    assert image_main(["rm", "lab/one", *config]) == 0
    freed = float(capsys.readouterr().out.split(": ")[-1].split()[0])
    assert 0.09 <= freed <= 0.2  # its own layer's 100 KB went, the shared one stayed
    assert image_main(["list", *config, "--json"]) == 0
    assert [json.loads(line)["names"] for line in capsys.readouterr().out.splitlines()] == [
        ["lab/two:latest"]
    ]
    assert image_main(["rm", "lab/two", *config]) == 0
    assert image_main(["rm", "lab/two", *config]) == 1
    assert "no image named lab/two:latest" in capsys.readouterr().err
