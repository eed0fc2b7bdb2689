"""The VM adapter: one small interface, a libvirt implementation and an in-memory twin.

Theory of operation
-------------------
A segment of a job runs in one VM on one host. The agent drives that VM through
``VmRuntime``: define it from a ``VmSpec``, start, pause, resume, save to a
file, restore from one, live-migrate it to another host's libvirtd, destroy and
undefine it, and read its state and guest CPU time. Every call blocks; the
agent runs them in worker threads (``trio.to_thread.run_sync``).

``LibvirtRuntime`` talks to one libvirtd (in Gleaner, the host's private daemon
from ``segments.vm.libvirtd``). Domains boot their kernel directly
(kernel, initrd, cmdline), write the serial console to a file with
``append='on'`` so the log survives save, restore and migration, and may have
one ``type='ethernet'`` tap that libvirt creates under the given name on
whichever host runs the domain. The domain type is ``kvm`` only where
``kvm_usable()`` says KVM can run an ordinary guest, else ``qemu`` (TCG).

``FakeVmRuntime`` (in ``segments.vm.fake``, to keep each module small) keeps
the same state machine in memory; its guest CPU clock moves only when the test
calls ``advance``; ``migrate_live`` moves a domain to another fake registered
under the destination URI.

Semantics both keep (they are libvirt's):

* A domain's UUID is derived from its name (``domain_uuid``), so ``define`` of
  an existing name updates its definition, and a name means the same domain
  on every host. ``start`` needs a defined, shut-off domain; ``pause`` a
  running one, ``resume`` a paused one.
* ``save`` stops the domain (a persistent one stays defined, shut off);
  ``restore`` starts it again from the file, running unless ``paused``.
* ``destroy`` stops an active domain; ``undefine`` of an active domain leaves it
  running as a transient one, which disappears when it stops.
* ``cpu_time_s`` is guest vCPU time used by the domain's *current* QEMU process:
  it restarts from zero after restore and on the destination of a migration,
  and is 0.0 for an inactive domain. It grows while running, not while paused.
* ``migrate_live`` leaves the domain persistent on the destination and gone
  from the source; the result carries libvirt's measured downtime. On failure
  the domain keeps running on the source. Given the destination's ``VmSpec``,
  the domain arrives on the destination's files (kernel, initrd, serial log,
  tap; ``relocated_xml``): from the switch-over on, the guest's console goes
  to the destination's serial log.

Every failure is a ``VmError`` naming the operation and the domain.
"""

from __future__ import annotations

import enum
import fcntl
import functools
import os
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

import libvirt

KVM_DEVICE = "/dev/kvm"
KVM_GET_API_VERSION = 0xAE00
KVM_API_VERSION = 12
HARDWARE_KVM_MODULES = ("kvm_intel", "kvm_amd")
GUEST_ARCH = "x86_64"
MAX_DISKS = 8  # vda..vdh: the run workload uses four
POLL_INTERVAL_S = 0.05
R = TypeVar("R")
UUID_NAMESPACE = uuid.UUID("6d1b0c4e-4f57-4a43-9b8e-676c65616e72")  # fixed: UUIDs stay stable
MIGRATE_FLAGS = (
    libvirt.VIR_MIGRATE_LIVE
    | libvirt.VIR_MIGRATE_PERSIST_DEST
    | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
)


class VmError(Exception):
    """A VM operation failed; the message names the operation and the domain."""


class VmState(enum.Enum):
    RUNNING = "running"
    PAUSED = "paused"
    SHUTTING_DOWN = "shutting-down"
    SHUTOFF = "shutoff"
    CRASHED = "crashed"
    UNKNOWN = "unknown"


ACTIVE_STATES = frozenset({VmState.RUNNING, VmState.PAUSED, VmState.SHUTTING_DOWN})


@dataclass(frozen=True, slots=True)
class Disk:
    """A raw disk file given to the guest as the next virtio disk (vda, vdb, ...)."""

    path: Path
    read_only: bool = False


@dataclass(frozen=True, slots=True)
class VmSpec:
    name: str
    kernel: Path
    initrd: Path
    cmdline: str
    serial_log: Path
    memory_mb: int = 96
    vcpus: int = 1
    tap: str | None = None
    kvm: bool | None = None  # None: kvm_usable() decides at define time
    disks: tuple[Disk, ...] = ()


@dataclass(frozen=True, slots=True)
class MigrationResult:
    downtime_ms: float  # libvirt's measure: guest paused on source to running on destination
    total_ms: float  # libvirt's measure of the migration job
    call_ms: float  # wall time of the whole call, handshakes included


class VmRuntime(Protocol):
    def define(self, spec: VmSpec) -> str: ...
    def start(self, name: str) -> None: ...
    def pause(self, name: str) -> None: ...
    def resume(self, name: str) -> None: ...
    def save(self, name: str, path: Path) -> None: ...
    def restore(self, path: Path, paused: bool = False, local: VmSpec | None = None) -> str: ...
    def destroy(self, name: str) -> None: ...
    def undefine(self, name: str) -> None: ...
    def state(self, name: str) -> VmState: ...
    def list_vms(self) -> dict[str, VmState]: ...
    def cpu_time_s(self, name: str) -> float: ...
    def wait_for_state(
        self, name: str, states: Collection[VmState], timeout_s: float
    ) -> VmState: ...
    def migrate_live(
        self, name: str, dest_uri: str, dest_tcp_address: str, dest: VmSpec | None = None
    ) -> MigrationResult: ...


@functools.cache
def kvm_usable() -> bool:
    """True only where KVM can be trusted to run an ordinary guest; TCG otherwise.

    An openable /dev/kvm proves little: on paravirtualised hosts it may be served
    by a backend (such as kvm_pvm) under which a normal guest kernel aborts or
    hangs. So this asks for all of: a hardware virtualisation flag in
    /proc/cpuinfo, a hardware KVM module loaded (and no kvm_pvm), and a
    /dev/kvm that opens read-write and answers KVM_GET_API_VERSION with 12.
    """
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    if "vmx" not in flags and "svm" not in flags:
        return False
    modules = Path("/sys/module")
    if (modules / "kvm_pvm").exists():
        return False
    if not any((modules / name).exists() for name in HARDWARE_KVM_MODULES):
        return False
    try:
        fd = os.open(KVM_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return fcntl.ioctl(fd, KVM_GET_API_VERSION) == KVM_API_VERSION
    except OSError:
        return False
    finally:
        os.close(fd)


def domain_uuid(name: str) -> str:
    """The domain's UUID, derived from its name, so that defining a name again updates it."""
    return str(uuid.uuid5(UUID_NAMESPACE, name))


def domain_xml(spec: VmSpec, kvm: bool) -> str:
    """The libvirt domain XML for `spec` (pure: no I/O)."""
    domain = ET.Element("domain", type="kvm" if kvm else "qemu")
    ET.SubElement(domain, "name").text = spec.name
    ET.SubElement(domain, "uuid").text = domain_uuid(spec.name)
    ET.SubElement(domain, "memory", unit="MiB").text = str(spec.memory_mb)
    ET.SubElement(domain, "vcpu").text = str(spec.vcpus)
    os_element = ET.SubElement(domain, "os")
    ET.SubElement(os_element, "type", arch=GUEST_ARCH).text = "hvm"
    ET.SubElement(os_element, "kernel").text = str(spec.kernel)
    ET.SubElement(os_element, "initrd").text = str(spec.initrd)
    ET.SubElement(os_element, "cmdline").text = spec.cmdline
    ET.SubElement(ET.SubElement(domain, "features"), "acpi")
    for event in ("on_poweroff", "on_reboot", "on_crash"):
        ET.SubElement(domain, event).text = "destroy"
    devices = ET.SubElement(domain, "devices")
    serial = ET.SubElement(devices, "serial", type="file")
    ET.SubElement(serial, "source", path=str(spec.serial_log), append="on")
    ET.SubElement(serial, "target", port="0")
    if len(spec.disks) > MAX_DISKS:
        raise ValueError(f"a guest takes at most {MAX_DISKS} disks, not {len(spec.disks)}")
    for index, disk in enumerate(spec.disks):
        _add_disk(devices, index, disk)
    if spec.tap is not None:
        interface = ET.SubElement(devices, "interface", type="ethernet")
        ET.SubElement(interface, "target", dev=spec.tap)
        ET.SubElement(interface, "model", type="virtio")
    ET.SubElement(devices, "memballoon", model="none")
    return ET.tostring(domain, encoding="unicode")


def relocated_xml(image_xml: str, local: VmSpec) -> str:
    """A saved VM's XML pointed at this host's files: kernel, initrd, serial log, tap, disks.

    A checkpoint made on another host names that host's paths. None of them is
    part of the guest's ABI (the kernel is already in the saved RAM), so libvirt
    accepts them changed at restore. Pure: no I/O.
    """
    domain = ET.fromstring(image_xml)
    os_element = domain.find("os")
    if os_element is not None:
        for tag, value in (("kernel", local.kernel), ("initrd", local.initrd)):
            element = os_element.find(tag)
            if element is not None:
                element.text = str(value)
    for serial in domain.iterfind("devices/serial"):
        source = serial.find("source")
        if source is not None:
            source.set("path", str(local.serial_log))
    for interface in domain.iterfind("devices/interface"):
        target = interface.find("target")
        if target is not None and local.tap is not None:
            target.set("dev", local.tap)
    devices = domain.find("devices")
    saved = [] if devices is None else devices.findall("disk")
    if len(saved) != len(local.disks):
        raise ValueError(f"the saved domain has {len(saved)} disks, this run {len(local.disks)}")
    for element in saved:  # rebuilt from this host's own spec, never taken from the save
        assert devices is not None
        devices.remove(element)
    if devices is not None:
        for index, disk in enumerate(local.disks):
            _add_disk(devices, index, disk)
    return ET.tostring(domain, encoding="unicode")


def _add_disk(devices: ET.Element, index: int, disk: Disk) -> None:
    element = ET.SubElement(devices, "disk", type="file", device="disk")
    ET.SubElement(element, "driver", name="qemu", type="raw", cache="writeback")
    ET.SubElement(element, "source", file=str(disk.path))
    ET.SubElement(element, "target", dev=f"vd{chr(ord('a') + index)}", bus="virtio")
    if disk.read_only:
        ET.SubElement(element, "readonly")


_LIBVIRT_STATES = {
    libvirt.VIR_DOMAIN_RUNNING: VmState.RUNNING,
    libvirt.VIR_DOMAIN_BLOCKED: VmState.RUNNING,
    libvirt.VIR_DOMAIN_PAUSED: VmState.PAUSED,
    libvirt.VIR_DOMAIN_PMSUSPENDED: VmState.PAUSED,
    libvirt.VIR_DOMAIN_SHUTDOWN: VmState.SHUTTING_DOWN,
    libvirt.VIR_DOMAIN_SHUTOFF: VmState.SHUTOFF,
    libvirt.VIR_DOMAIN_CRASHED: VmState.CRASHED,
}


def _failed(context: str, exc: libvirt.libvirtError) -> VmError:
    """A VmError naming what we were doing, followed by libvirt's own words."""
    return VmError(f"{context}: {exc.get_error_message() or exc}")


def _ignore_libvirt_error(_ctx: object, _err: object) -> None:
    """libvirt errors arrive as exceptions; keep the C library from also printing them."""


class LibvirtRuntime:
    """``VmRuntime`` over one libvirt connection (thread-safe, as libvirt's are)."""

    def __init__(self, uri: str) -> None:
        libvirt.registerErrorHandler(_ignore_libvirt_error, None)
        self.uri = uri
        try:
            self._conn = libvirt.open(uri)
        except libvirt.libvirtError as exc:
            raise _failed(f"connecting to {uri}", exc) from exc

    def close(self) -> None:
        try:
            self._conn.close()
        except libvirt.libvirtError:
            pass  # already closed or the daemon is gone; nothing left to release

    def __enter__(self) -> LibvirtRuntime:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def define(self, spec: VmSpec) -> str:
        """Define (or redefine) the domain; return its UUID (``domain_uuid(name)``)."""
        kvm = kvm_usable() if spec.kvm is None else spec.kvm
        try:
            return str(self._conn.defineXML(domain_xml(spec, kvm)).UUIDString())
        except libvirt.libvirtError as exc:
            raise _failed(f"defining {spec.name} at {self.uri}", exc) from exc

    def start(self, name: str) -> None:
        self._call(name, f"starting {name}", lambda d: d.create())

    def pause(self, name: str) -> None:
        self._call(name, f"pausing {name}", lambda d: d.suspend())

    def resume(self, name: str) -> None:
        self._call(name, f"resuming {name}", lambda d: d.resume())

    def save(self, name: str, path: Path) -> None:
        self._call(name, f"saving {name} to {path}", lambda d: d.save(str(path)))

    def restore(self, path: Path, paused: bool = False, local: VmSpec | None = None) -> str:
        """Restore a saved VM; with `local`, on this host's files (see ``relocated_xml``)."""
        flag = libvirt.VIR_DOMAIN_SAVE_PAUSED if paused else libvirt.VIR_DOMAIN_SAVE_RUNNING
        try:
            image_xml = self._conn.saveImageGetXMLDesc(str(path), 0)
            name = ET.fromstring(image_xml).findtext("name") or ""
            dxml = relocated_xml(image_xml, local) if local is not None else None
            self._conn.restoreFlags(str(path), dxml, flag)
        except libvirt.libvirtError as exc:
            raise _failed(f"restoring from {path} at {self.uri}", exc) from exc
        except (ValueError, ET.ParseError) as exc:
            raise VmError(f"restoring from {path}: the saved domain: {exc}") from exc
        return name

    def destroy(self, name: str) -> None:
        self._call(name, f"destroying {name}", lambda d: d.destroy())

    def undefine(self, name: str) -> None:
        self._call(name, f"undefining {name}", lambda d: d.undefine())

    def state(self, name: str) -> VmState:
        code = self._call(name, f"reading the state of {name}", lambda d: d.state()[0])
        return _LIBVIRT_STATES.get(code, VmState.UNKNOWN)

    def list_vms(self) -> dict[str, VmState]:
        try:
            domains = self._conn.listAllDomains(0)
        except libvirt.libvirtError as exc:
            raise _failed(f"listing domains at {self.uri}", exc) from exc
        states = {}
        for domain in domains:
            try:
                states[domain.name()] = _LIBVIRT_STATES.get(domain.state()[0], VmState.UNKNOWN)
            except libvirt.libvirtError:
                continue  # a transient domain that ended between listing and asking
        return states

    def cpu_time_s(self, name: str) -> float:
        """Summed vCPU time (utime + stime of the vCPU threads, 10 ms ticks) in seconds."""
        domain = self._domain(name)
        try:
            if not domain.isActive():
                return 0.0
            records = self._conn.domainListGetStats([domain], libvirt.VIR_DOMAIN_STATS_VCPU)
        except libvirt.libvirtError as exc:
            raise _failed(f"reading vCPU time of {name} at {self.uri}", exc) from exc
        stats = records[0][1] if records else {}
        count = int(stats.get("vcpu.current", 0))
        return sum(int(stats.get(f"vcpu.{i}.time", 0)) for i in range(count)) / 1e9

    def wait_for_state(self, name: str, states: Collection[VmState], timeout_s: float) -> VmState:
        """Poll until the domain is in one of `states`; VmError after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while True:
            current = self.state(name)
            if current in states:
                return current
            if time.monotonic() >= deadline:
                wanted = ", ".join(sorted(s.value for s in states))
                raise VmError(
                    f"waiting for {name} at {self.uri} to be {wanted}: still {current.value} "
                    f"after {timeout_s:g} s"
                )
            time.sleep(POLL_INTERVAL_S)

    def migrate_live(
        self, name: str, dest_uri: str, dest_tcp_address: str, dest: VmSpec | None = None
    ) -> MigrationResult:
        """Live-migrate to the daemon at `dest_uri`, QEMU streaming to `dest_tcp_address`.

        With `dest`, the destination's definition is this domain's migratable
        XML relocated to the destination's files (``relocated_xml``: kernel,
        initrd, serial log, tap), handed to libvirt as the destination XML;
        without, the domain keeps this host's paths (which must then exist
        there too).

        The client drives both daemons (not peer-to-peer). The source QEMU
        connects to `dest_tcp_address` (reachable from the source host's network
        namespace); the destination QEMU listens on its daemon's
        ``migration_address`` (every address if unset). Downtime and total come
        from the destination's record of the completed job (the source's record
        leaves with the domain); -1 where libvirt kept none, which does not make
        a finished migration fail.
        """
        context = f"migrating {name} from {self.uri} to {dest_uri} via {dest_tcp_address}"
        host = f"[{dest_tcp_address}]" if ":" in dest_tcp_address else dest_tcp_address
        domain = self._domain(name)
        started = time.monotonic()
        dxml = None
        if dest is not None:
            try:
                dxml = relocated_xml(domain.XMLDesc(libvirt.VIR_DOMAIN_XML_MIGRATABLE), dest)
            except libvirt.libvirtError as exc:
                raise _failed(f"{context}: reading the domain's XML", exc) from exc
            except (ValueError, ET.ParseError) as exc:
                raise VmError(f"{context}: the domain's XML: {exc}") from exc
        try:
            dest_conn = libvirt.open(dest_uri)
        except libvirt.libvirtError as exc:
            raise _failed(f"{context}: connecting to the destination", exc) from exc
        try:
            moved = domain.migrate2(dest_conn, dxml, MIGRATE_FLAGS, None, f"tcp://{host}", 0)
            call_ms = (time.monotonic() - started) * 1000
            try:
                stats = moved.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
            except libvirt.libvirtError:
                stats = {}  # the guest has moved; only the figures are missing
        except libvirt.libvirtError as exc:
            raise _failed(context, exc) from exc
        finally:
            dest_conn.close()
        return MigrationResult(
            downtime_ms=float(stats.get("downtime", -1)),
            total_ms=float(stats.get("time_elapsed", -1)),
            call_ms=call_ms,
        )

    def _domain(self, name: str) -> libvirt.virDomain:
        try:
            return self._conn.lookupByName(name)
        except libvirt.libvirtError as exc:
            raise _failed(f"looking up {name} at {self.uri}", exc) from exc

    def _call(self, name: str, context: str, fn: Callable[[libvirt.virDomain], R]) -> R:
        domain = self._domain(name)
        try:
            return fn(domain)
        except libvirt.libvirtError as exc:
            raise _failed(f"{context} at {self.uri}", exc) from exc
