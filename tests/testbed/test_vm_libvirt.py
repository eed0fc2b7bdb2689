"""The libvirt VM adapter against real libvirtd and QEMU (TCG), in namespaces the test makes.

Two "hosts" are network namespaces ``glv-<tag>-a`` and ``glv-<tag>-b`` joined by
a veth pair (198.51.100.221/24 and .222/24), each with its own private libvirtd
(``segments.vm.libvirtd``). The guest is the demo image (``segments.image.store``,
recipe deploy/recipes/demo.toml) running its hash chain forever; its serial log
must show one unbroken chain (``workload.check_continuity``) across pause,
save/restore and live migration. Daemons, QEMU and namespaces are removed on every path
(``ExitStack`` in ``two_hosts``). The hosts, the guest and their fixtures (``guest``,
``lab``, ``hosts``) live in tests/kit/vm_lab.py, shared with the other VM tests.
Timings are printed (``pytest -s``), never asserted, except that a paused guest's
CPU clock must not move.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
from kit.agents import needs_root
from kit.vm_lab import SEED, Guest, Host, Lab, figure, two_hosts

from node.testbed import netns
from segments.image import workload
from segments.vm import libvirtd as libvirtd_module
from segments.vm.libvirtd import Libvirtd, LibvirtdError
from segments.vm.runtime import VmError, VmSpec, VmState

pytestmark = [
    needs_root,
    pytest.mark.netns,
    pytest.mark.vm,
    pytest.mark.skipif(shutil.which("libvirtd") is None, reason="needs libvirtd"),
]

BOOT_TIMEOUT_S = 60.0
STEP_TIMEOUT_S = 20.0


# -- the guest's chain --------------------------------------------------------------


def steps(log: Path) -> list[int]:
    try:
        text = log.read_text(errors="replace")
    except FileNotFoundError:
        return []
    return [step for step, _state in workload.parse_progress(text)]


def wait_for_step(log: Path, above: int, timeout_s: float = STEP_TIMEOUT_S) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        seen = steps(log)
        if seen and seen[-1] > above:
            return seen[-1]
        time.sleep(0.05)
    raise AssertionError(f"guest step stayed at or below {above} for {timeout_s} s in {log}")


def wait_until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def assert_no_reset(log: Path) -> None:
    """One unbroken run of the hash chain from step 1: no reset, no gap, no wrong state."""
    workload.check_continuity(workload.parse_progress(log.read_text(errors="replace")), SEED)


# -- the hosts -------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False


def spec_for(
    guest: Guest, work: Path, name: str, tap: str | None = None, cmdline: str | None = None
) -> VmSpec:
    return VmSpec(
        name=name,
        kernel=guest.kernel,
        initrd=guest.initrd,
        cmdline=cmdline or guest.cmdline,
        serial_log=work / f"{name}.serial.log",
        memory_mb=guest.memory_mb,
        tap=tap,
    )


def boot(host: Host, spec: VmSpec) -> None:
    started = time.monotonic()
    host.runtime.define(spec)
    figure("define", time.monotonic() - started)
    started = time.monotonic()
    host.runtime.start(spec.name)
    figure("start", time.monotonic() - started)
    started = time.monotonic()
    wait_for_step(spec.serial_log, 0, BOOT_TIMEOUT_S)
    figure("start_to_first_step", time.monotonic() - started)


# -- tests -----------------------------------------------------------------------------


def test_pause_resume_and_cpu_time(hosts: Lab, guest: Guest, tmp_path: Path) -> None:
    runtime = hosts.a.runtime
    spec = spec_for(guest, tmp_path, "glv-pause")
    boot(hosts.a, spec)
    assert runtime.state(spec.name) is VmState.RUNNING

    before = runtime.cpu_time_s(spec.name)
    deadline = time.monotonic() + 60
    while runtime.cpu_time_s(spec.name) <= before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert runtime.cpu_time_s(spec.name) > before  # a running guest uses vCPU time

    runtime.pause(spec.name)
    assert runtime.state(spec.name) is VmState.PAUSED
    paused_cpu = runtime.cpu_time_s(spec.name)
    paused_step = steps(spec.serial_log)[-1]
    time.sleep(1.0)
    assert runtime.cpu_time_s(spec.name) - paused_cpu < 0.05
    assert steps(spec.serial_log)[-1] == paused_step

    runtime.resume(spec.name)
    assert runtime.wait_for_state(spec.name, {VmState.RUNNING}, 5.0) is VmState.RUNNING
    wait_for_step(spec.serial_log, paused_step)
    deadline = time.monotonic() + 5.0  # the clock ticks in 10 ms steps
    while runtime.cpu_time_s(spec.name) <= paused_cpu and time.monotonic() < deadline:
        time.sleep(0.05)
    assert runtime.cpu_time_s(spec.name) > paused_cpu
    assert_no_reset(spec.serial_log)


def test_save_restore_continues(hosts: Lab, guest: Guest, tmp_path: Path) -> None:
    runtime = hosts.a.runtime
    spec = spec_for(guest, tmp_path, "glv-save")
    boot(hosts.a, spec)
    step = wait_for_step(spec.serial_log, 5)

    saved = tmp_path / "glv-save.image"
    started = time.monotonic()
    runtime.save(spec.name, saved)
    figure("save", time.monotonic() - started)
    figure("save_file", saved.stat().st_size / 2**20, "MiB")
    assert runtime.state(spec.name) is VmState.SHUTOFF
    assert runtime.cpu_time_s(spec.name) == 0.0
    saved_step = steps(spec.serial_log)[-1]
    assert saved_step >= step

    started = time.monotonic()
    assert runtime.restore(saved) == spec.name
    figure("restore", time.monotonic() - started)
    assert runtime.state(spec.name) is VmState.RUNNING
    wait_for_step(spec.serial_log, saved_step + 3)
    assert_no_reset(spec.serial_log)


def test_live_migration_to_other_host(hosts: Lab, guest: Guest, tmp_path: Path) -> None:
    spec = spec_for(guest, tmp_path, "glv-move", tap="glvtap0")
    boot(hosts.a, spec)
    assert "glvtap0" in netns.ip("-br", "link", netns=hosts.a.netns)
    step = wait_for_step(spec.serial_log, 5)

    result = hosts.a.runtime.migrate_live(spec.name, hosts.b.daemon.uri, hosts.b.address)
    figure("migration_downtime", result.downtime_ms, "ms")
    figure("migration_total", result.total_ms, "ms")
    figure("migration_call", result.call_ms, "ms")
    assert result.downtime_ms > 0

    assert spec.name not in hosts.a.runtime.list_vms()
    assert hosts.b.runtime.list_vms() == {spec.name: VmState.RUNNING}
    assert "glvtap0" not in netns.ip("-br", "link", netns=hosts.a.netns)
    assert "glvtap0" in netns.ip("-br", "link", netns=hosts.b.netns)
    wait_for_step(spec.serial_log, step + 5)
    assert_no_reset(spec.serial_log)


def test_live_migration_onto_the_destinations_files(
    hosts: Lab, guest: Guest, tmp_path: Path
) -> None:
    """With the destination's VmSpec, the guest's console goes on in the destination's log."""
    spec = spec_for(guest, tmp_path / "a", "glv-reloc", tap="glvtapa")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    dest = replace(spec, serial_log=tmp_path / "b" / "serial.log", tap="glvtapb")
    boot(hosts.a, spec)
    step = wait_for_step(spec.serial_log, 3)

    result = hosts.a.runtime.migrate_live(spec.name, hosts.b.daemon.uri, hosts.b.address, dest)
    figure("relocated_migration_downtime", result.downtime_ms, "ms")
    source_console = spec.serial_log.read_bytes()  # the source QEMU is gone: complete
    assert spec.name not in hosts.a.runtime.list_vms()
    assert hosts.b.runtime.list_vms() == {spec.name: VmState.RUNNING}
    assert "glvtapa" not in netns.ip("-br", "link", netns=hosts.a.netns)
    links_b = netns.ip("-br", "link", netns=hosts.b.netns)
    assert "glvtapb" in links_b and "glvtapa" not in links_b
    last_here = steps(spec.serial_log)[-1]
    assert last_here >= step
    wait_for_step(dest.serial_log, last_here + 3)
    assert spec.serial_log.read_bytes() == source_console, "nothing more lands in A's log"
    joined = (source_console + dest.serial_log.read_bytes()).decode(errors="replace")
    workload.check_continuity(workload.parse_progress(joined), SEED)
    there = workload.parse_progress(dest.serial_log.read_text(errors="replace"))
    assert there and there[0][0] > step  # B's log starts mid-run, where A's stopped


def test_guest_that_finishes_is_shut_off(hosts: Lab, guest: Guest, tmp_path: Path) -> None:
    cmdline = workload.kernel_cmdline(steps=8, seed=SEED, base=guest.base_cmdline)
    spec = spec_for(guest, tmp_path, "glv-done", cmdline=cmdline)
    boot(hosts.a, spec)
    runtime = hosts.a.runtime
    assert runtime.wait_for_state(spec.name, {VmState.SHUTOFF}, STEP_TIMEOUT_S) is VmState.SHUTOFF
    assert workload.parse_result(spec.serial_log.read_text()) == workload.reference_result(SEED, 8)
    assert runtime.list_vms() == {spec.name: VmState.SHUTOFF}  # still defined


def test_failures_name_operation_and_domain(hosts: Lab, guest: Guest, tmp_path: Path) -> None:
    runtime = hosts.a.runtime
    with pytest.raises(VmError, match="looking up glv-nobody"):
        runtime.start("glv-nobody")
    spec = spec_for(guest, tmp_path, "glv-fail")
    runtime.define(spec)
    with pytest.raises(VmError, match="pausing glv-fail"):
        runtime.pause(spec.name)  # not running
    boot(hosts.a, spec)
    # B's QEMU cannot listen on A's address: the migration fails, the guest stays on A.
    with pytest.raises(VmError, match=r"migrating glv-fail .* via 198\.51\.100\.221") as failed:
        runtime.migrate_live(spec.name, hosts.b.daemon.uri, hosts.a.address)
    print(f"\nfailed migration: {failed.value.__cause__}")
    assert runtime.state(spec.name) is VmState.RUNNING
    assert hosts.b.runtime.list_vms() == {}
    step = steps(spec.serial_log)[-1]
    wait_for_step(spec.serial_log, step)


def test_daemon_that_cannot_start_reports_its_log(tmp_path_factory: pytest.TempPathFactory) -> None:
    root = tmp_path_factory.mktemp("glv-bad")
    daemon = Libvirtd("bad", root, "glv-no-such-namespace", str(uuid.uuid4()))
    with pytest.raises(LibvirtdError, match="starting libvirtd for bad: exited with") as failed:
        daemon.start()
    assert "glv-no-such-namespace" in str(failed.value)  # ip netns exec's complaint, from the log
    assert not daemon.is_running()


def test_private_etc_leaves_host_domains_and_autostarts_behind(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path_factory.mktemp("etc-libvirt")
    (source / "qemu" / "networks" / "autostart").mkdir(parents=True)
    (source / "qemu" / "networks" / "default.xml").write_text("<network/>")
    (source / "qemu" / "networks" / "autostart" / "default.xml").symlink_to("../default.xml")
    (source / "qemu" / "hostvm.xml").write_text("<domain/>")
    (source / "secrets").mkdir()
    (source / "qemu.conf").write_text('user = "libvirt-qemu"\n')
    monkeypatch.setattr(libvirtd_module, "ETC_SOURCE", source)
    host_uuid = "1d4f0c2e-0000-4000-8000-0000000000aa"
    daemon = Libvirtd("p", tmp_path_factory.mktemp("glv-prep"), None, host_uuid)
    daemon.prepare()
    etc = daemon.root_dir / "etc"
    assert (etc / "qemu" / "networks" / "default.xml").exists()
    assert not (etc / "qemu" / "networks" / "autostart" / "default.xml").exists()
    assert not (etc / "qemu" / "hostvm.xml").exists()
    assert not (etc / "secrets").exists()
    assert 'user = "root"' in (etc / "qemu.conf").read_text()
    assert "migration_address" not in (etc / "qemu.conf").read_text()
    assert f'host_uuid = "{host_uuid}"' in (etc / "libvirtd.conf").read_text()
    with pytest.raises(LibvirtdError, match=r"socket path .* is longer"):
        Libvirtd("long", Path("/tmp") / ("x" * 100), None, "u")


def test_stop_leaves_nothing_behind(guest: Guest, tmp_path_factory: pytest.TempPathFactory) -> None:
    """A fresh pair (B not warmed up: the first migration pays B's QEMU probe), then teardown.

    B is stopped in order (its daemon destroys its domain); A's daemon is killed
    first, so its QEMU must be found and stopped by PID.
    """
    work = tmp_path_factory.mktemp("glv-stop")
    pids: list[int] = []
    with two_hosts(work, seed_b_from_a=False) as fresh:
        spec = spec_for(guest, work, "glv-stop")
        boot(fresh.a, spec)
        result = fresh.a.runtime.migrate_live(spec.name, fresh.b.daemon.uri, fresh.b.address)
        figure("first_migration_into_fresh_daemon_call", result.call_ms, "ms")
        figure("first_migration_into_fresh_daemon_downtime", result.downtime_ms, "ms")
        spec_a = spec_for(guest, work, "glv-stay")
        boot(fresh.a, spec_a)
        for host in (fresh.a, fresh.b):
            assert host.daemon.pid is not None
            assert host.daemon.qemu_pids(), f"no QEMU on {host.name}"
            pids += [host.daemon.pid, *host.daemon.qemu_pids()]
        namespaces = fresh.namespaces
        # A's daemon dies; its QEMU lives on (libvirt daemonises QEMU) until stop() sweeps it.
        os.kill(fresh.a.daemon.pid, signal.SIGKILL)
        wait_until(lambda: not fresh.a.daemon.is_running())
        assert fresh.a.daemon.qemu_pids()
    assert [pid for pid in pids if _alive(pid)] == []
    assert not set(namespaces) & set(netns.list_namespaces())
