"""Guest images and the demo workload: recipes, cpio, reproducible builds, real boots.

The build tests fetch Debian's cloud kernel with apt-get (into the package cache,
/var/cache/gleaner/packages when root, reused across runs); the first run on a
fresh machine may run `apt-get update -qq` once if apt's lists are missing. The
`vm` tests boot the image under QEMU with TCG, as plain QEMU processes that are
killed by PID on every path.
"""

from __future__ import annotations

import gzip
import os
import shutil
import socket
import subprocess
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from kit.paths import REPO_ROOT

from segments.image import kernelpkg
from segments.image import store as images
from segments.image.cpio import CpioError, Entry, read_newc, write_newc
from segments.image.recipe import load_recipe, parse_recipe, recipe_toml
from segments.image.store import Image, ImageError, build, list_images, load
from segments.image.workload import (
    DEMO_INIT,
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
QEMU = shutil.which("qemu-system-x86_64")
BOOT_TIMEOUT_S = 180.0
needs_apt = pytest.mark.skipif(
    not (shutil.which("apt-get") and shutil.which("dpkg-deb") and images.BUSYBOX.exists()),
    reason="needs Debian's apt-get, dpkg-deb and busybox-static",
)
needs_qemu = pytest.mark.skipif(QEMU is None, reason="needs qemu-system-x86_64")


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


# --- real builds -------------------------------------------------------------------


@pytest.fixture(scope="module")
def package_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if os.geteuid() == 0:
        return images.DEFAULT_CACHE
    return tmp_path_factory.mktemp("packages")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, package_cache: Path) -> tuple[Image, Image]:
    """The demo image built into two fresh stores."""
    if not (shutil.which("apt-get") and shutil.which("dpkg-deb") and images.BUSYBOX.exists()):
        pytest.skip("needs Debian's apt-get, dpkg-deb and busybox-static")
    first = build(DEMO_RECIPE, tmp_path_factory.mktemp("store1"), package_cache)
    second = build(DEMO_RECIPE, tmp_path_factory.mktemp("store2"), package_cache)
    return first, second


@needs_apt
def test_same_recipe_same_id_same_bytes(built):
    first, second = built
    assert first.id == second.id
    assert first.kernel.read_bytes() == second.kernel.read_bytes()
    assert first.initrd.read_bytes() == second.initrd.read_bytes()
    assert (first.directory / "recipe.toml").read_bytes() == (
        second.directory / "recipe.toml"
    ).read_bytes()
    assert first.size_bytes == first.kernel.stat().st_size + first.initrd.stat().st_size
    assert first.memory_mb == 96 and first.cmdline == "console=ttyS0 panic=-1"
    images.verify(first)


@needs_apt
def test_second_build_in_same_store_does_no_work(built, package_cache, monkeypatch):
    first, _ = built
    mtimes = {p.name: p.stat().st_mtime_ns for p in first.directory.iterdir()}
    calls: list[str] = []

    def forbidden(name: str) -> Callable[..., None]:
        def call(*_args: object, **_kwargs: object) -> None:
            calls.append(name)
            raise AssertionError(f"{name} called on a second build")

        return call

    for name in ("fetch_kernel", "download", "extract", "unpack_kernel"):
        monkeypatch.setattr(kernelpkg, name, forbidden(name))
    again = build(DEMO_RECIPE, first.directory.parent.parent, package_cache)
    assert again == first
    assert calls == []
    assert {p.name: p.stat().st_mtime_ns for p in first.directory.iterdir()} == mtimes


@needs_apt
def test_store_load_and_list(built, tmp_path):
    first, _ = built
    store = first.directory.parent.parent
    assert load(store, first.id) == first
    assert list_images(store) == [first]
    assert list_images(tmp_path) == []
    with pytest.raises(ImageError, match="no image"):
        load(tmp_path, first.id)
    with pytest.raises(ImageError, match="not an image id"):
        load(store, "../etc")


@needs_apt
def test_initramfs_holds_busybox_modules_and_init(built):
    first, _ = built
    entries = {e.path: e for e in read_newc(gzip.decompress(first.initrd.read_bytes()))}
    assert entries["init"].data == DEMO_INIT.encode()
    assert entries["bin/busybox"].data == images.BUSYBOX.read_bytes()
    assert entries["bin/sh"].data == b"busybox"
    assert (entries["dev/console"].rdev_major, entries["dev/console"].rdev_minor) == (5, 1)
    assert b"g_steps='100'" in entries["etc/gleaner.conf"].data
    loaded = [p.removeprefix("lib/modules/").removesuffix(".ko") for p in entries if ".ko" in p]
    conf = entries["etc/gleaner.conf"].data.decode()
    order = conf.split("g_modules='")[1].split("'")[0].split()
    assert sorted(order) == sorted(loaded)
    assert {"virtio_net", "virtio_pci", "net_failover", "failover", "virtio"} <= set(order)
    for position, name in enumerate(order):  # dependencies load first
        depends = kernelpkg.modinfo(entries[f"lib/modules/{name}.ko"].data)["depends"]
        assert all(order.index(dep) < position for dep in filter(None, depends.split(",")))
    assert all(e.mode & 0o7777 != 0 for e in entries.values())


# --- real boots under QEMU (TCG) --------------------------------------------------


class Qemu:
    """One QEMU process, killed by its PID when the test ends, whatever happened."""

    def __init__(self, argv: list[str]) -> None:
        self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, 9)
        self.process.wait(timeout=30)


@pytest.fixture
def qemu() -> Iterator[Callable[[list[str]], Qemu]]:
    started: list[Qemu] = []

    def start(argv: list[str]) -> Qemu:
        started.append(Qemu(argv))
        return started[-1]

    try:
        yield start
    finally:
        for vm in started:
            vm.stop()


def qemu_argv(image: Image, cmdline: str, *extra: str) -> list[str]:
    return [
        str(QEMU),
        *("-machine", "accel=tcg", "-m", str(image.memory_mb)),
        *("-kernel", str(image.kernel), "-initrd", str(image.initrd), "-append", cmdline),
        *("-no-reboot", "-display", "none", "-nodefaults", *extra),
    ]


def wait_for_log(log: Path, done: Callable[[str], bool], vm: Qemu | None = None) -> str:
    deadline = time.monotonic() + BOOT_TIMEOUT_S
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace") if log.exists() else ""
        if done(text):
            return text
        if vm is not None and vm.process.poll() is not None:
            raise AssertionError(f"QEMU exited {vm.process.returncode}: {text[-2000:]}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting on {log}: {text[-2000:]}")


@needs_apt
@needs_qemu
@pytest.mark.vm
def test_real_boot_runs_the_demo(built, qemu, tmp_path):
    first, _ = built
    log = tmp_path / "serial.log"
    cmdline = "console=ttyS0 panic=-1 gleaner.steps=6 gleaner.seed=abc"
    vm = qemu(qemu_argv(first, cmdline, "-nographic", "-serial", f"file:{log}"))
    vm.process.wait(timeout=BOOT_TIMEOUT_S)
    text = log.read_text(errors="replace")
    lines = parse_progress(text)
    assert [step for step, _ in lines] == [1, 2, 3, 4, 5, 6], text[-2000:]
    check_continuity(lines, seed="abc")
    assert parse_start(text) == (6, "abc")
    assert parse_result(text) == reference_result("abc", 6)


class Monitor:
    """QEMU's human monitor over a unix socket: send a command, read to the next prompt."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(BOOT_TIMEOUT_S)
        deadline = time.monotonic() + 30
        while True:
            try:
                self.sock.connect(str(path))
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self._read_prompt()

    def _read_prompt(self) -> str:
        data = b""
        while not data.endswith(b"(qemu) "):
            chunk = self.sock.recv(4096)
            if not chunk:
                break
            data += chunk
        return data.decode(errors="replace")

    def command(self, line: str) -> str:
        self.sock.sendall(line.encode() + b"\n")
        return self._read_prompt()


@needs_apt
@needs_qemu
@pytest.mark.vm
def test_saved_and_restored_guest_continues_with_no_reset_or_gap(built, qemu, tmp_path):
    first, _ = built
    log, state, monitor = tmp_path / "serial.log", tmp_path / "vm.state", tmp_path / "mon.sock"
    cmdline = kernel_cmdline(0, "restore-me")
    serial = ("-chardev", f"file,id=s0,path={log},append=on", "-serial", "chardev:s0")
    argv = qemu_argv(first, cmdline, *serial)
    vm = qemu([*argv, "-monitor", f"unix:{monitor},server=on,wait=off"])
    wait_for_log(log, lambda text: len(parse_progress(text)) >= 20, vm)
    hmp = Monitor(monitor)
    hmp.command("stop")
    hmp.command(f'migrate "exec:cat > {state}"')
    vm.stop()
    saved_at = parse_progress(log.read_text())[-1][0]

    # The saved state says "paused" (we stopped the guest first, as a checkpoint
    # does), so once the state is in, the restored QEMU waits for `cont`.
    monitor2 = tmp_path / "mon2.sock"
    restored = qemu(
        [*argv, "-incoming", f"exec:cat {state}", "-monitor", f"unix:{monitor2},server=on,wait=off"]
    )
    hmp2 = Monitor(monitor2)
    deadline = time.monotonic() + BOOT_TIMEOUT_S
    while "inmigrate" in hmp2.command("info status") and time.monotonic() < deadline:
        time.sleep(0.05)
    hmp2.command("cont")
    text = wait_for_log(log, lambda t: parse_progress(t)[-1][0] >= saved_at + 20, restored)
    restored.stop()
    assert text.count("gleaner-start") == 1  # not booted again
    run = check_continuity(parse_progress(text), seed="restore-me")
    assert run.first_step == 1 and run.last_step >= saved_at + 20


@needs_apt
@needs_qemu
@pytest.mark.vm
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for a network namespace and a tap")
def test_guest_answers_ping_at_its_overlay_address(built, qemu, tmp_path):
    first, _ = built
    namespace, tap, address = f"glimg-{os.getpid()}", "gltap0", "fd00:6c65:616e::5"
    log = tmp_path / "serial.log"

    def ip(*args: str) -> None:
        subprocess.run(["ip", "-n", namespace, *args], check=True, capture_output=True)

    subprocess.run(["ip", "netns", "add", namespace], check=True, capture_output=True)
    try:
        ip("link", "set", "lo", "up")
        ip("tuntap", "add", "dev", tap, "mode", "tap")
        ip("link", "set", tap, "up")
        ip("-6", "addr", "add", "fe80::1/64", "dev", tap, "nodad")
        ip("-6", "route", "add", f"{address}/128", "dev", tap)
        cmdline = kernel_cmdline(0, "net", addr=f"{address}/128", gw="fe80::1")
        netdev = ("-netdev", f"tap,id=n0,ifname={tap},script=no,downscript=no")
        nic = ("-device", "virtio-net-pci,netdev=n0")
        argv = qemu_argv(first, cmdline, "-serial", f"file:{log}", *netdev, *nic)
        vm = qemu(["ip", "netns", "exec", namespace, *argv])  # ip execs QEMU: same PID
        text = wait_for_log(log, lambda t: "gleaner-progress 1 " in t, vm)
        assert f"gleaner-net {address}/128" in text, text[-2000:]
        ping = subprocess.run(
            ["ip", "netns", "exec", namespace, "ping", "-6", "-c", "3", "-W", "5", address],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert ping.returncode == 0, ping.stdout + ping.stderr
        vm.stop()
    finally:
        subprocess.run(["ip", "netns", "del", namespace], capture_output=True)
