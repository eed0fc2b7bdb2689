"""Guest images for real: reproducible builds of the demo recipe, and boots under QEMU.

The build tests fetch Debian's cloud kernel with apt-get (into the package cache,
/var/cache/gleaner/packages when root, reused across runs); the first run on a
fresh machine may run `apt-get update -qq` once if apt's lists are missing. The
`vm` tests boot the image under QEMU with TCG, as plain QEMU processes that are
killed by PID on every path.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from kit.paths import DEMO_RECIPE

from segments.image import kernelpkg
from segments.image import store as images
from segments.image.cpio import read_newc
from segments.image.store import Image, ImageError, build, list_images, load
from segments.image.workload import (
    DEMO_INIT,
    check_continuity,
    kernel_cmdline,
    parse_progress,
    parse_result,
    parse_start,
    reference_result,
)

QEMU = shutil.which("qemu-system-x86_64")
BOOT_TIMEOUT_S = 180.0
needs_apt = pytest.mark.skipif(
    not (shutil.which("apt-get") and shutil.which("dpkg-deb") and images.BUSYBOX.exists()),
    reason="needs Debian's apt-get, dpkg-deb and busybox-static",
)
needs_qemu = pytest.mark.skipif(QEMU is None, reason="needs qemu-system-x86_64")


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
def test_gleaner_image_build_without_a_store_builds_where_the_agent_looks(
    built, package_cache, tmp_path, capsys
):
    # it used to write to <state>/images/ID while the agent read <state>/images/images/ID
    from node.cli.image import main as image_main
    from node.runtime import config

    state_dir = tmp_path / "state"
    agent_toml = tmp_path / "agent.toml"
    agent_toml.write_text(f'[node]\nstate_dir = "{state_dir}"\n')
    argv = ["build", str(DEMO_RECIPE), "--config", str(agent_toml), "--cache", str(package_cache)]
    assert image_main([*argv, "--json"]) == 0
    built_id = json.loads(capsys.readouterr().out)["id"]
    assert built_id == built[0].id
    assert load(config.load(agent_toml).image_store, built_id).id == built_id
    assert image_main(["list", "--config", str(agent_toml), "--json"]) == 0
    assert [json.loads(line)["id"] for line in capsys.readouterr().out.splitlines()] == [built_id]


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
@pytest.mark.netns
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
