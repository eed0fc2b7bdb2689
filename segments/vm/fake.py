"""``FakeVmRuntime``: the in-memory twin of ``segments.vm.runtime.LibvirtRuntime``.

It keeps libvirt's domain state machine as ``segments.vm.runtime`` describes it, with
no daemon, no clock and no randomness, so core and simulator tests drive VMs
deterministically. What a test controls:

* the guest CPU clock: ``advance(seconds)`` adds seconds x vCPUs to running
  domains (paused and stopped ones do not move);
* the guest: ``guest_powered_off(name)`` is the guest shutting itself down;
* failures: ``fail_next(operation)`` makes the next call of that method raise
  ``VmError``; every call is recorded in ``calls``.

Fakes that share a registry may be driven from several threads at once (a
replica migrating out on one, another adopting it on the other), as libvirt
connections may: each change is one dict operation and every walk over the
domains takes a snapshot first, so no call sees a dict change under it
(CPython's GIL makes those single operations atomic).
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from segments.vm.runtime import (
    ACTIVE_STATES,
    MigrationResult,
    VmError,
    VmSpec,
    VmState,
    domain_uuid,
)

# Method name -> the words LibvirtRuntime's errors use, so messages read alike.
_VERBS = {
    "define": "defining",
    "start": "starting",
    "pause": "pausing",
    "resume": "resuming",
    "save": "saving",
    "restore": "restoring from",
    "destroy": "destroying",
    "undefine": "undefining",
    "state": "reading the state of",
    "list_vms": "listing domains",
    "cpu_time_s": "reading vCPU time of",
    "wait_for_state": "waiting for",
    "migrate_live": "migrating",
    "guest_powered_off": "powering off",
}


@dataclass(frozen=True, slots=True)
class FakeMigration:
    """A completed ``migrate_live``: which domain went where, on which files."""

    name: str
    dest_uri: str
    dest_tcp_address: str
    dest: VmSpec | None  # the destination's files, as given (None: the source's paths)


@dataclass(slots=True)
class _FakeDomain:
    spec: VmSpec
    uuid: str
    state: VmState = VmState.SHUTOFF
    persistent: bool = True
    cpu_s: float = 0.0


class FakeVmRuntime:
    """``VmRuntime`` in memory, deterministic; see the module docstring.

    Fakes that share a `registry` (URI -> runtime) can migrate to each other.
    ``save`` writes a small JSON image to the path, so an image can be copied
    and restored by another fake. ``wait_for_state`` never waits: nothing
    changes unless the test says so, so it answers at once or raises.
    """

    IMAGE_MAGIC = "gleaner-fake-vm-image"

    def __init__(
        self,
        uri: str = "fake:///a",
        registry: dict[str, FakeVmRuntime] | None = None,
        downtime_ms: float = 150.0,
        total_ms: float = 750.0,
    ) -> None:
        self.uri = uri
        self.registry = registry if registry is not None else {}
        self.registry[uri] = self
        self.downtime_ms = downtime_ms
        self.total_ms = total_ms
        self.domains: dict[str, _FakeDomain] = {}
        self.failures: dict[str, str] = {}  # operation -> message, raised once
        self.calls: list[tuple[str, str]] = []  # (operation, domain name or path)
        self.migrations: list[FakeMigration] = []  # what left this runtime, oldest first

    # -- test controls -------------------------------------------------------------

    def advance(self, seconds: float, name: str | None = None) -> None:
        """Move the guest CPU clock of running domains (or just `name`) by `seconds` per vCPU."""
        for domain_name, domain in list(self.domains.items()):
            if domain.state is VmState.RUNNING and name in (None, domain_name):
                domain.cpu_s += seconds * domain.spec.vcpus

    def guest_powered_off(self, name: str) -> None:
        """The guest shut itself down (its job finished, or it crashed into a reboot)."""
        self._stop(self._get("guest_powered_off", name, ACTIVE_STATES))

    def fail_next(self, operation: str, message: str = "injected failure") -> None:
        """Make the next call of `operation` (a method name) raise ``VmError``."""
        if operation not in _VERBS:
            raise ValueError(f"no operation {operation!r}")
        self.failures[operation] = message

    # -- VmRuntime -----------------------------------------------------------------

    def define(self, spec: VmSpec) -> str:
        self._enter("define", spec.name)
        domain = self.domains.get(spec.name)
        if domain is None:
            domain = _FakeDomain(spec, domain_uuid(spec.name))
            self.domains[spec.name] = domain
        domain.spec, domain.persistent = spec, True
        return domain.uuid

    def start(self, name: str) -> None:
        domain = self._get("start", name, {VmState.SHUTOFF, VmState.CRASHED})
        domain.state, domain.cpu_s = VmState.RUNNING, 0.0

    def pause(self, name: str) -> None:
        self._get("pause", name, {VmState.RUNNING}).state = VmState.PAUSED

    def resume(self, name: str) -> None:
        self._get("resume", name, {VmState.PAUSED}).state = VmState.RUNNING

    def save(self, name: str, path: Path) -> None:
        domain = self._get("save", name)
        context = f"saving {name} to {path} at {self.uri}"
        if domain.state not in (VmState.RUNNING, VmState.PAUSED):
            raise VmError(f"{context}: domain is {domain.state.value}")
        spec = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(domain.spec).items()}
        image = {"magic": self.IMAGE_MAGIC, "uuid": domain.uuid, "spec": spec}
        try:
            path.write_text(json.dumps(image))
        except OSError as exc:
            raise VmError(f"{context}: {exc}") from exc
        self._stop(domain)

    def restore(self, path: Path, paused: bool = False, local: VmSpec | None = None) -> str:
        self._enter("restore", str(path))
        try:
            image = json.loads(path.read_text())
            if image.get("magic") != self.IMAGE_MAGIC:
                raise ValueError("not a fake VM image")
            fields = image["spec"]
            for key in ("kernel", "initrd", "serial_log"):
                fields[key] = Path(fields[key])
            spec = VmSpec(**fields)
            if local is not None:
                spec = _relocated(spec, local)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise VmError(f"restoring from {path} at {self.uri}") from exc
        existing = self.domains.get(spec.name)
        if existing is not None and existing.state in ACTIVE_STATES:
            raise VmError(f"restoring from {path} at {self.uri}: {spec.name} is already active")
        domain = existing or _FakeDomain(spec, image["uuid"], persistent=False)
        domain.state = VmState.PAUSED if paused else VmState.RUNNING
        domain.cpu_s = 0.0
        self.domains[spec.name] = domain
        return spec.name

    def destroy(self, name: str) -> None:
        self._stop(self._get("destroy", name, ACTIVE_STATES))

    def undefine(self, name: str) -> None:
        domain = self._get("undefine", name)
        if domain.state in ACTIVE_STATES:
            domain.persistent = False
        else:
            del self.domains[name]

    def state(self, name: str) -> VmState:
        return self._get("state", name).state

    def list_vms(self) -> dict[str, VmState]:
        self._enter("list_vms", "")
        return {name: domain.state for name, domain in list(self.domains.items())}

    def cpu_time_s(self, name: str) -> float:
        domain = self._get("cpu_time_s", name)
        return domain.cpu_s if domain.state in ACTIVE_STATES else 0.0

    def wait_for_state(self, name: str, states: Collection[VmState], timeout_s: float) -> VmState:
        current = self._get("wait_for_state", name).state
        if current not in states:
            wanted = ", ".join(sorted(s.value for s in states))
            raise VmError(f"waiting for {name} at {self.uri} to be {wanted}: still {current.value}")
        return current

    def migrate_live(
        self, name: str, dest_uri: str, dest_tcp_address: str, dest: VmSpec | None = None
    ) -> MigrationResult:
        """Move the domain to the fake at `dest_uri` (on `dest`'s files, if given).

        It arrives in the state it left (running, or paused), persistent, with
        its vCPU clock at zero (a new QEMU process), and leaves this fake.
        """
        context = f"migrating {name} from {self.uri} to {dest_uri} via {dest_tcp_address}"
        domain = self._get("migrate_live", name, {VmState.RUNNING, VmState.PAUSED})
        target = self.registry.get(dest_uri)
        if target is None or target is self or not dest_tcp_address:
            raise VmError(f"{context}: no such destination")
        there = target.domains.get(name)
        if there is not None and (there.state in ACTIVE_STATES or there.uuid != domain.uuid):
            raise VmError(f"{context}: the destination already has a domain named {name}")
        spec = domain.spec if dest is None else _relocated(domain.spec, dest)
        target.domains[name] = _FakeDomain(spec, domain.uuid, domain.state)
        del self.domains[name]
        self.migrations.append(FakeMigration(name, dest_uri, dest_tcp_address, dest))
        return MigrationResult(self.downtime_ms, self.total_ms, self.total_ms)

    # -- internals -----------------------------------------------------------------

    def _enter(self, operation: str, subject: str) -> None:
        self.calls.append((operation, subject))
        message = self.failures.pop(operation, None)
        if message is not None:
            raise VmError(f"{self._context(operation, subject)}: {message}")

    def _context(self, operation: str, subject: str) -> str:
        return " ".join(filter(None, (_VERBS[operation], subject, "at", self.uri)))

    def _get(
        self, operation: str, name: str, allowed: Collection[VmState] | None = None
    ) -> _FakeDomain:
        self._enter(operation, name)
        domain = self.domains.get(name)
        if domain is None:
            raise VmError(f"{self._context(operation, name)}: no such domain")
        if allowed is not None and domain.state not in allowed:
            raise VmError(f"{self._context(operation, name)}: domain is {domain.state.value}")
        return domain

    def _stop(self, domain: _FakeDomain) -> None:
        domain.state, domain.cpu_s = VmState.SHUTOFF, 0.0
        if not domain.persistent:
            del self.domains[domain.spec.name]


def _relocated(spec: VmSpec, local: VmSpec) -> VmSpec:
    """``vm.relocated_xml`` for fakes: the guest on `local`'s files (its tap, if it names one)."""
    return replace(
        spec,
        kernel=local.kernel,
        initrd=local.initrd,
        serial_log=local.serial_log,
        tap=local.tap or spec.tap,
    )
