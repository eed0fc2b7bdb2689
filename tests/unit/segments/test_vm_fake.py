"""The VM adapter's fake twin, its contract with libvirt, and the pure helpers.

The lifecycle contract runs twice: against ``FakeVmRuntime`` and against
``LibvirtRuntime`` on libvirt's in-process ``test:///default`` driver, so the
fake keeps libvirt's state machine. (That driver cannot restore with flags,
migrate, or report vCPU time; those are the fake's own tests here and the real
daemon's in test_vm_libvirt.py.)
"""

from __future__ import annotations

import itertools
import json
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

from segments.vm.fake import FakeMigration, FakeVmRuntime
from segments.vm.runtime import (
    LibvirtRuntime,
    MigrationResult,
    VmError,
    VmRuntime,
    VmSpec,
    VmState,
    domain_uuid,
    domain_xml,
    kvm_usable,
)

_names = itertools.count()


def make_spec(tmp_path: Path, name: str | None = None, **changes: object) -> VmSpec:
    fields: dict[str, object] = {
        "name": name or f"gl-fake-{next(_names)}",
        "kernel": tmp_path / "vmlinuz",
        "initrd": tmp_path / "initrd.img",
        "cmdline": "console=ttyS0 panic=-1",
        "serial_log": tmp_path / "serial.log",
    }
    fields.update(changes)
    return VmSpec(**fields)  # type: ignore[arg-type]


# -- the contract, fake and libvirt's test driver ------------------------------------


@pytest.fixture(params=["fake", "libvirt-test"])
def runtime(request: pytest.FixtureRequest) -> Iterator[VmRuntime]:
    if request.param == "fake":
        yield FakeVmRuntime()
        return
    real = LibvirtRuntime("test:///default")  # one shared in-process driver: unique names
    made = set(real.list_vms())
    try:
        yield real
    finally:
        for name, state in real.list_vms().items():
            if name in made:
                continue
            if state is not VmState.SHUTOFF:
                real.destroy(name)
            if name in real.list_vms():
                real.undefine(name)
        real.close()


def test_define_is_idempotent_and_keeps_the_uuid(runtime: VmRuntime, tmp_path: Path) -> None:
    spec = make_spec(tmp_path)
    first = runtime.define(spec)
    assert first == domain_uuid(spec.name)
    assert runtime.define(make_spec(tmp_path, spec.name, memory_mb=128)) == first
    assert runtime.state(spec.name) is VmState.SHUTOFF
    assert runtime.list_vms()[spec.name] is VmState.SHUTOFF
    assert runtime.cpu_time_s(spec.name) == 0.0


def test_lifecycle_transitions(runtime: VmRuntime, tmp_path: Path) -> None:
    name = make_spec(tmp_path).name
    runtime.define(make_spec(tmp_path, name))
    for refused in (runtime.pause, runtime.resume, runtime.destroy):
        with pytest.raises(VmError, match=name):
            refused(name)
    runtime.start(name)
    assert runtime.state(name) is VmState.RUNNING
    with pytest.raises(VmError, match=f"starting {name}"):
        runtime.start(name)
    with pytest.raises(VmError, match=f"resuming {name}"):
        runtime.resume(name)
    runtime.pause(name)
    assert runtime.state(name) is VmState.PAUSED
    with pytest.raises(VmError, match=f"pausing {name}"):
        runtime.pause(name)
    runtime.resume(name)
    assert runtime.wait_for_state(name, {VmState.RUNNING}, 1.0) is VmState.RUNNING
    runtime.destroy(name)
    assert runtime.state(name) is VmState.SHUTOFF
    runtime.undefine(name)
    assert name not in runtime.list_vms()


def test_unknown_domain(runtime: VmRuntime) -> None:
    for call in (runtime.start, runtime.state, runtime.cpu_time_s, runtime.undefine):
        with pytest.raises(VmError, match="gl-nobody"):
            call("gl-nobody")


def test_save_stops_a_persistent_domain_and_keeps_it(runtime: VmRuntime, tmp_path: Path) -> None:
    name = make_spec(tmp_path).name
    runtime.define(make_spec(tmp_path, name))
    runtime.start(name)
    runtime.save(name, tmp_path / "saved")
    assert (tmp_path / "saved").exists()
    assert runtime.state(name) is VmState.SHUTOFF
    with pytest.raises(VmError, match=f"saving {name} to"):
        runtime.save(name, tmp_path / "again")


def test_undefine_while_running_leaves_a_transient_domain(
    runtime: VmRuntime, tmp_path: Path
) -> None:
    name = make_spec(tmp_path).name
    runtime.define(make_spec(tmp_path, name))
    runtime.start(name)
    runtime.undefine(name)
    assert runtime.list_vms()[name] is VmState.RUNNING
    runtime.destroy(name)
    assert name not in runtime.list_vms()


def test_wait_for_state_times_out_with_context(runtime: VmRuntime, tmp_path: Path) -> None:
    name = make_spec(tmp_path).name
    runtime.define(make_spec(tmp_path, name))
    with pytest.raises(VmError, match=f"waiting for {name} .* still shutoff"):
        runtime.wait_for_state(name, {VmState.RUNNING}, 0.1)


# -- the fake's own semantics ------------------------------------------------------------


def test_guest_cpu_clock_moves_only_while_running(tmp_path: Path) -> None:
    fake = FakeVmRuntime()
    one, two = make_spec(tmp_path, "one"), make_spec(tmp_path, "two", vcpus=2)
    for spec in (one, two):
        fake.define(spec)
        fake.start(spec.name)
    fake.advance(3.0)
    assert (fake.cpu_time_s("one"), fake.cpu_time_s("two")) == (3.0, 6.0)
    fake.pause("one")
    fake.advance(2.0)
    fake.advance(1.0, name="two")
    assert (fake.cpu_time_s("one"), fake.cpu_time_s("two")) == (3.0, 12.0)
    fake.resume("one")
    fake.advance(0.5)
    assert fake.cpu_time_s("one") == 3.5
    fake.destroy("one")
    assert fake.cpu_time_s("one") == 0.0
    fake.start("one")
    assert fake.cpu_time_s("one") == 0.0  # a new process: the clock starts again


def test_save_and_restore_elsewhere(tmp_path: Path) -> None:
    a, b = FakeVmRuntime("fake:///a"), FakeVmRuntime("fake:///b")
    spec = make_spec(tmp_path, "job", tap="gltap1")
    a.define(spec)
    a.start(spec.name)
    a.advance(5.0)
    a.save(spec.name, tmp_path / "job.image")
    assert json.loads((tmp_path / "job.image").read_text())["spec"]["tap"] == "gltap1"

    assert b.restore(tmp_path / "job.image", paused=True) == "job"
    assert b.list_vms() == {"job": VmState.PAUSED}
    assert b.cpu_time_s("job") == 0.0
    b.resume("job")
    b.destroy("job")
    assert b.list_vms() == {}  # restored where it was not defined: transient

    assert a.restore(tmp_path / "job.image") == "job"
    assert a.state("job") is VmState.RUNNING
    with pytest.raises(VmError, match="already active"):
        a.restore(tmp_path / "job.image")
    a.destroy("job")
    assert a.list_vms() == {"job": VmState.SHUTOFF}  # persistent: still defined


def test_restore_refuses_what_is_not_an_image(tmp_path: Path) -> None:
    fake = FakeVmRuntime()
    (tmp_path / "junk").write_text("{}")
    for path in (tmp_path / "junk", tmp_path / "missing"):
        with pytest.raises(VmError, match=f"restoring from {path}"):
            fake.restore(path)


def test_live_migration_between_registered_fakes(tmp_path: Path) -> None:
    registry: dict[str, FakeVmRuntime] = {}
    a = FakeVmRuntime("fake:///a", registry, downtime_ms=120.0, total_ms=800.0)
    b = FakeVmRuntime("fake:///b", registry)
    spec = make_spec(tmp_path, "job")
    uuid = a.define(spec)
    a.start("job")
    a.advance(4.0)
    result = a.migrate_live("job", "fake:///b", "198.51.100.222")
    assert result == MigrationResult(downtime_ms=120.0, total_ms=800.0, call_ms=800.0)
    assert a.list_vms() == {}
    assert b.list_vms() == {"job": VmState.RUNNING}
    assert b.define(spec) == uuid  # persistent on the destination, same UUID
    assert b.cpu_time_s("job") == 0.0

    b.pause("job")
    b.migrate_live("job", "fake:///a", "198.51.100.221")
    assert a.state("job") is VmState.PAUSED  # a paused domain arrives paused


def test_live_migration_onto_the_destinations_files(tmp_path: Path) -> None:
    registry: dict[str, FakeVmRuntime] = {}
    a, b = FakeVmRuntime("fake:///a", registry), FakeVmRuntime("fake:///b", registry)
    spec = make_spec(tmp_path, "job", tap="gltapa")
    a.define(spec)
    a.start("job")
    dest = make_spec(
        tmp_path, "job", kernel=tmp_path / "b-k", serial_log=tmp_path / "b.log", tap="gltapb"
    )
    a.migrate_live("job", "fake:///b", "198.51.100.222", dest)
    assert a.migrations == [FakeMigration("job", "fake:///b", "198.51.100.222", dest)]
    assert b.list_vms() == {"job": VmState.RUNNING}
    moved = b.domains["job"].spec
    assert (moved.kernel, moved.serial_log, moved.tap) == (dest.kernel, dest.serial_log, "gltapb")
    assert moved.cmdline == spec.cmdline  # only the host's files change, not the guest
    assert b.migrations == []


def test_migration_failures_leave_the_source_alone(tmp_path: Path) -> None:
    registry: dict[str, FakeVmRuntime] = {}
    a, b = FakeVmRuntime("fake:///a", registry), FakeVmRuntime("fake:///b", registry)
    spec = make_spec(tmp_path, "job")
    a.define(spec)
    with pytest.raises(VmError, match=r"migrating job .* domain is shutoff"):
        a.migrate_live("job", "fake:///b", "198.51.100.222")
    a.start("job")
    with pytest.raises(VmError, match="no such destination"):
        a.migrate_live("job", "fake:///nowhere", "198.51.100.222")
    b.define(spec)
    b.start("job")
    with pytest.raises(VmError, match="already has a domain named job"):
        a.migrate_live("job", "fake:///b", "198.51.100.222")
    assert a.state("job") is VmState.RUNNING
    assert a.migrations == []


def test_guest_powering_off(tmp_path: Path) -> None:
    fake = FakeVmRuntime()
    fake.define(make_spec(tmp_path, "job"))
    fake.start("job")
    fake.guest_powered_off("job")
    assert fake.wait_for_state("job", {VmState.SHUTOFF}, 0.0) is VmState.SHUTOFF
    with pytest.raises(VmError, match="powering off job"):
        fake.guest_powered_off("job")


def test_injected_failures_fire_once_and_calls_are_recorded(tmp_path: Path) -> None:
    fake = FakeVmRuntime()
    fake.define(make_spec(tmp_path, "job"))
    fake.fail_next("start", "no memory")
    with pytest.raises(VmError, match="starting job at fake:///a: no memory"):
        fake.start("job")
    fake.start("job")
    assert fake.calls == [("define", "job"), ("start", "job"), ("start", "job")]
    with pytest.raises(ValueError, match="no operation"):
        fake.fail_next("reboot")


def test_fake_is_a_vm_runtime() -> None:
    runtime: VmRuntime = FakeVmRuntime()  # mypy checks the structural match
    assert runtime.list_vms() == {}


# -- pure helpers --------------------------------------------------------------------------


def test_domain_xml_direct_kernel_boot_and_serial_log(tmp_path: Path) -> None:
    spec = make_spec(tmp_path, "job", memory_mb=96, vcpus=2)
    root = ET.fromstring(domain_xml(spec, kvm=False))
    assert root.get("type") == "qemu"
    assert root.findtext("name") == "job"
    assert root.findtext("uuid") == domain_uuid("job")
    assert (root.findtext("memory"), root.find("memory").get("unit")) == ("96", "MiB")  # type: ignore[union-attr]
    assert root.findtext("vcpu") == "2"
    assert root.findtext("os/kernel") == str(spec.kernel)
    assert root.findtext("os/initrd") == str(spec.initrd)
    assert root.findtext("os/cmdline") == spec.cmdline
    source = root.find("devices/serial/source")
    assert source is not None
    assert source.attrib == {"path": str(spec.serial_log), "append": "on"}
    assert root.find("devices/interface") is None
    assert ET.fromstring(domain_xml(spec, kvm=True)).get("type") == "kvm"


def test_domain_xml_tap_interface(tmp_path: Path) -> None:
    root = ET.fromstring(domain_xml(make_spec(tmp_path, "job", tap="gltap7"), kvm=False))
    interface = root.find("devices/interface")
    assert interface is not None and interface.get("type") == "ethernet"
    assert interface.find("target").get("dev") == "gltap7"  # type: ignore[union-attr]
    assert interface.find("model").get("type") == "virtio"  # type: ignore[union-attr]


def test_domain_xml_escapes_text(tmp_path: Path) -> None:
    spec = make_spec(tmp_path, "job", cmdline="a=<b> & 'c'")
    assert ET.fromstring(domain_xml(spec, kvm=False)).findtext("os/cmdline") == "a=<b> & 'c'"


def test_kvm_detection_refuses_a_paravirtual_kvm() -> None:
    if not Path("/sys/module/kvm_pvm").exists():
        pytest.skip("only machines with kvm_pvm show the case that matters (LAB-NOTES)")
    assert kvm_usable() is False  # this lab's /dev/kvm cannot boot a normal guest
