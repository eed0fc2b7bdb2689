"""Guest images and the demo workload: recipes, cpio, the chain and its checks.

Real builds (Debian's cloud kernel fetched with apt-get) and real boots under
QEMU are tests/testbed/test_image_build.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tomllib

import pytest
from kit.paths import REPO_ROOT

from segments.image.cpio import CpioError, Entry, read_newc, write_newc
from segments.image.recipe import load_recipe, parse_recipe, recipe_toml
from segments.image.store import ImageError, build
from segments.image.workload import (
    ContinuityError,
    check_continuity,
    kernel_cmdline,
    parse_progress,
    parse_result,
    parse_start,
    reference_result,
    reference_states,
)

ROOT = REPO_ROOT
DEMO_RECIPE = ROOT / "deploy" / "recipes" / "demo.toml"


# --- recipes ---------------------------------------------------------------------


def test_demo_recipe_parses_with_defaults_filled_in():
    recipe = load_recipe(DEMO_RECIPE)
    assert recipe["image"] == {"workload": "demo", "memory_mb": 96}
    assert recipe["kernel"]["package"] == "linux-image-cloud-amd64"
    assert recipe["kernel"]["modules"] == ["virtio_pci", "virtio_net"]
    assert recipe["init"]["every"] == 1
    assert parse_recipe({}) == parse_recipe({"image": {"memory_mb": 96}})


def test_written_recipe_reads_back_the_same():
    recipe = parse_recipe({"init": {"seed": "x-1", "extra": 3}, "kernel": {"version": "1:2.3-4"}})
    assert parse_recipe(tomllib.loads(recipe_toml(recipe))) == recipe


@pytest.mark.parametrize(
    ("recipe", "words"),
    [
        ({"images": {}}, "unknown key recipe.images"),
        ({"image": {"memroy_mb": 96}}, "unknown key image.memroy_mb"),
        ({"image": {"memory_mb": "96"}}, "image.memory_mb must be a int"),
        ({"image": {"memory_mb": True}}, "image.memory_mb must be a int"),
        ({"image": {"memory_mb": 64}}, "at least 72"),
        ({"image": {"workload": "mine"}}, "unknown workload 'mine'"),
        ({"kernel": "linux"}, "[kernel] must be a table"),
        ({"kernel": {"package": "Linux Image"}}, "kernel.package has unsafe"),
        ({"kernel": {"modules": "virtio_net"}}, "kernel.modules must be a list"),
        ({"kernel": {"modules": ["virtio net"]}}, "kernel.modules[0] has unsafe"),
        ({"kernel": {"cmdline": "a\nb"}}, "one printable line"),
        ({"init": {"seed": "a;reboot"}}, "init.seed has unsafe"),
        ({"init": {"seed": ""}}, "init.seed must not be empty"),
        ({"init": {"steps": -1}}, "init.steps must be >= 0"),
        ({"init": {"Steps": 1}}, "bad init setting name 'Steps'"),
        ({"init": {"modules": "x"}}, "bad init setting name 'modules'"),
        ({"init": {"flag": True}}, "init.flag must be a string or an integer"),
    ],
)
def test_bad_recipe_is_one_clear_line(recipe, words):
    with pytest.raises(ImageError) as caught:
        parse_recipe(recipe)
    assert words in str(caught.value)
    assert "\n" not in str(caught.value)


def test_bad_recipe_files(tmp_path):
    with pytest.raises(ImageError, match="no such file"):
        load_recipe(tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[image\nworkload = 'demo'\n")
    with pytest.raises(ImageError, match="not valid TOML"):
        load_recipe(broken)
    wrong = tmp_path / "wrong.toml"
    wrong.write_text("[image]\nmemory_mb = 16\n")
    with pytest.raises(ImageError, match=r"wrong\.toml: recipe: image\.memory_mb"):
        build(wrong, tmp_path / "store")


# --- cpio ------------------------------------------------------------------------


ENTRIES = [
    Entry.file("init", b"#!/bin/sh\necho hi\n", 0o755),
    Entry.symlink("bin/sh", "busybox"),
    Entry.file("bin/busybox", b"\x7fELF" + bytes(1001), 0o755),
    Entry.char_device("dev/console", 5, 1),
    Entry.file("lib/modules/a.ko", b"abc"),
    Entry.directory("tmp", 0o1777),
]


def test_cpio_round_trips_sorted_with_parents():
    archive = write_newc(ENTRIES)
    entries = read_newc(archive)
    assert [e.path for e in entries] == [
        "bin",
        "bin/busybox",
        "bin/sh",
        "dev",
        "dev/console",
        "init",
        "lib",
        "lib/modules",
        "lib/modules/a.ko",
        "tmp",
    ]
    by_path = {e.path: e for e in entries}
    for original in ENTRIES:
        assert by_path[original.path] == original
    assert by_path["lib"].mode == 0o40755
    assert write_newc(reversed(ENTRIES)) == archive  # order of input does not matter
    assert len(archive) % 4 == 0


@pytest.mark.skipif(shutil.which("cpio") is None, reason="needs GNU cpio")
def test_gnu_cpio_reads_our_archive(tmp_path):
    archive = tmp_path / "a.cpio"
    archive.write_bytes(write_newc(ENTRIES))
    listing = subprocess.run(
        ["cpio", "-t", "--quiet", "-F", str(archive)], capture_output=True, text=True, check=True
    )
    assert listing.stdout.split() == [e.path for e in read_newc(archive.read_bytes())]
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run(
        ["cpio", "-i", "-d", "--quiet", "--no-absolute-filenames", "-F", str(archive)],
        cwd=out,
        check=True,
        capture_output=True,
        input=b"",
    )
    assert (out / "init").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert os.readlink(out / "bin" / "sh") == "busybox"


@pytest.mark.parametrize(
    "entries",
    [
        [Entry.file("a", b"1"), Entry.file("./a", b"2")],
        [Entry.file("../etc/passwd", b"")],
        [Entry.file("a", b""), Entry.file("a/b", b"")],
        [Entry.char_device("dev/x", 1, 3), Entry("dev/y", 0o20600, b"data")],
    ],
)
def test_cpio_refuses_bad_entries(entries):
    with pytest.raises(CpioError):
        write_newc(entries)


def test_cpio_reader_refuses_garbage():
    with pytest.raises(CpioError):
        read_newc(b"not an archive")
    with pytest.raises(CpioError):
        read_newc(write_newc([Entry.file("a", b"x" * 100)])[:150])


# --- the workload, outside the VM -------------------------------------------------


def test_reference_chain():
    # Printed by busybox sha256sum in a real guest (gleaner.steps=6 gleaner.seed=abc).
    assert reference_states("abc", 2) == ["ba7816bf8f01cfea", "32b5899f8da421c5"]
    assert reference_result("abc", 6) == "e4ce0d56260f8712"
    assert reference_result("abc", 0) == "abc"
    with pytest.raises(ValueError):
        reference_states("abc", -1)


def test_parse_serial_log():
    states = reference_states("s", 3)
    log = (
        "[    1.6] Run /init as init process\r\n"
        "gleaner-start 3 s\r\n"
        + "".join(f"gleaner-progress {i} {st}\r\n" for i, st in enumerate(states, 1))
        + "gleaner-progress 4 nothex\n"
        + f"gleaner-result {states[-1]}\r\n[    2.0] reboot: Power down\n"
    )
    assert parse_progress(log) == list(enumerate(states, 1))
    assert parse_result(log) == states[-1]
    assert parse_start(log) == (3, "s")
    assert parse_result("gleaner-progress 1 x") is None


def test_continuity_accepts_one_unbroken_run():
    lines = list(enumerate(reference_states("s", 10), 1))
    assert check_continuity(lines, seed="s").last_step == 10
    tail = lines[4:]
    assert check_continuity(tail, after_step=None).first_step == 5
    assert check_continuity(tail, seed="s", after_step=4).last_state == lines[-1][1]
    assert check_continuity(lines[1::2], seed="s", every=2).last_step == 10


@pytest.mark.parametrize(
    ("mutate", "words"),
    [
        (lambda ls: ls[:5] + ls[:3], "reset: step 1 follows step 5"),
        (lambda ls: ls[:3] + ls[5:], "gap: step 6 follows step 3"),
        (lambda ls: [*ls[:3], (4, "0" * 16), *ls[4:]], "step 4: state 0000000000000000"),
        (lambda ls: ls[2:], "starts at step 3, expected 1"),
        (lambda ls: [], "no gleaner-progress lines"),
    ],
)
def test_continuity_names_the_break(mutate, words):
    lines = list(enumerate(reference_states("s", 8), 1))
    with pytest.raises(ContinuityError, match=words.replace("(", r"\(")):
        check_continuity(mutate(lines))


def test_continuity_checks_the_seed():
    with pytest.raises(ContinuityError, match="not the chain from seed 'other'"):
        check_continuity(list(enumerate(reference_states("s", 3), 1)), seed="other")


def test_kernel_cmdline():
    assert kernel_cmdline(6, "abc") == "console=ttyS0 panic=-1 gleaner.steps=6 gleaner.seed=abc"
    assert kernel_cmdline(0, "a", addr="fd00::5/128").endswith("gleaner.addr=fd00::5/128")
