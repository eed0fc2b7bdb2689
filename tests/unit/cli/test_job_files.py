"""`gleaner submit job.toml`: a job file's inputs are the owner's files, checked before sending."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from node.cli.common import CliError
from node.cli.job_files import input_files
from node.cli.market import job_settings


def test_inputs_are_files_and_folders_named_as_they_are(tmp_path: Path) -> None:
    (tmp_path / "numbers.txt").write_text("1\n")
    (tmp_path / "data" / "deep").mkdir(parents=True)
    (tmp_path / "data" / "a.csv").write_text("a")
    (tmp_path / "data" / "deep" / "b.csv").write_text("b")
    assert input_files(["numbers.txt", "data"], tmp_path) == {
        "numbers.txt": str(tmp_path / "numbers.txt"),
        "data/a.csv": str(tmp_path / "data" / "a.csv"),
        "data/deep/b.csv": str(tmp_path / "data" / "deep" / "b.csv"),
    }
    assert input_files({"n.txt": "numbers.txt"}, tmp_path) == {
        "n.txt": str(tmp_path / "numbers.txt")
    }


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (["absent.txt"], "not a file or folder"),
        ("numbers.txt", "a list of paths or a table"),
        ([5], "each entry is a path"),
        ({"n": "numbers.txt", "m": "absent"}, "not a file or folder"),
        (["numbers.txt", "sub/numbers.txt"], "given twice"),
    ],
)
def test_a_bad_input_is_refused_in_one_line_naming_inputs(tmp_path, value, message) -> None:
    (tmp_path / "numbers.txt").write_text("1\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "numbers.txt").write_text("2\n")
    with pytest.raises(CliError, match=message) as info:
        input_files(value, tmp_path)
    assert str(info.value).startswith("inputs:") and "\n" not in str(info.value)


def test_inputs_over_the_cap_are_refused_before_anything_is_sent(tmp_path: Path) -> None:
    (tmp_path / "big").write_bytes(b"x" * 2000)
    with pytest.raises(CliError, match="over 1000 bytes"):
        input_files(["big"], tmp_path, max_bytes=1000)


def test_a_job_file_s_inputs_are_found_beside_it(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "in.txt").write_text("x")
    job = tmp_path / "jobs" / "job.toml"
    job.write_text('image = "tools:1"\nmemory_mib = 128\ninputs = ["in.txt"]\n')
    monkeypatch.chdir(tmp_path)  # not the job file's folder
    args = argparse.Namespace(
        job_file=job,
        image=None,
        memory_mib=None,
        vcpus=None,
        extent_s=None,
        redundancy=None,
        price_ceiling=None,
        network=None,
        args=None,
        segments=None,
        deadline=None,
    )
    settings = job_settings(args)
    assert settings["inputs"] == {"in.txt": str(tmp_path / "jobs" / "in.txt")}
    assert settings["image"] == "tools:1"  # a name, not a file: left for the agent
