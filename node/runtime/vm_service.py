"""Long-running VMs with network on this host: start, live-migrate, and adopt on arrival.

A VM with network gets a tap device (libvirt ``type='ethernet'``) on its
current host; the guest holds its stable overlay address on its NIC with a
default route via ``fe80::1``, which the host puts on the tap. The host routes
the address to the tap and claims it (node.runtime.routing), so the whole swarm sends
it here.

A live migration (libvirt, A → B) moves the guest, and with it its tap: the
destination's QEMU, and so its tap, exists from the start of the migration,
but the guest runs there only from the switch-over. So the destination is told
beforehand (``expect``: the owner's grant for the next epoch and the tap's
name); it watches its libvirt, and the moment the guest runs there it routes
the address to the new tap and claims it. The source, seeing the newer claim,
withdraws after its linger (its tap is already gone).
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Any

import trio

from node.base.wire import RemoteProtocolError
from node.runtime.guest_address import GuestAddressError, configure_tap, guest_cmdline
from node.runtime.routing import RouteService, RoutingError, is_interface_name
from overlay.claims import decode_grant
from segments.image.store import ImageError, load
from segments.vm.runtime import LibvirtRuntime, VmError, VmSpec, VmState

log = logging.getLogger("gleaner.vms")

ARRIVAL_POLL_S = 0.005
ARRIVAL_TIMEOUT_S = 120.0
VM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # a libvirt name and a file name


class VmServiceError(Exception):
    """A VM request could not be carried out; the message says why."""


class VmService:
    def __init__(
        self, libvirt_uri: str, image_store: Path, work_dir: Path, routes: RouteService
    ) -> None:
        self.libvirt_uri = libvirt_uri
        self.image_store = image_store
        self.work_dir = work_dir
        self.routes = routes

    async def start(self, params: dict[str, Any]) -> dict[str, Any]:
        """Boot a VM with a tap, route its overlay address to it and claim it.

        Every parameter is checked before anything is booted; if routing or
        claiming then fails, the VM is destroyed again: nothing is left half done.
        """
        name, tap = _vm_name(params), _tap(params)
        grant_blob = _grant(params)
        try:
            address = str(decode_grant(grant_blob).vm_address)
        except RemoteProtocolError as exc:
            raise VmServiceError(f"bad grant: {exc}") from None
        if params.get("address", address) != address:
            raise VmServiceError(f"the grant is for {address}, not {params['address']}")
        try:
            image = await trio.to_thread.run_sync(load, self.image_store, _text(params, "image_id"))
        except ImageError as exc:
            raise VmServiceError(str(exc)) from None
        spec = VmSpec(
            name=name,
            kernel=image.kernel,
            initrd=image.initrd,
            cmdline=f"{image.cmdline} {_text(params, 'args')} {guest_cmdline(address)}",
            serial_log=self.work_dir / f"{name}.serial.log",
            memory_mb=image.memory_mb,
            tap=tap,
        )
        self.work_dir.mkdir(parents=True, exist_ok=True)

        def boot() -> None:
            with LibvirtRuntime(self.libvirt_uri) as runtime:
                runtime.define(spec)
                runtime.start(name)

        try:
            await trio.to_thread.run_sync(boot)
        except VmError as exc:
            raise VmServiceError(str(exc)) from None
        try:
            return await self._adopt(grant_blob, tap)
        except (VmServiceError, RoutingError):
            await trio.to_thread.run_sync(self._discard, name)
            raise

    def _discard(self, name: str) -> None:
        with LibvirtRuntime(self.libvirt_uri) as runtime:
            for step in (runtime.destroy, runtime.undefine):
                try:
                    step(name)
                except VmError:
                    pass

    async def migrate(self, params: dict[str, Any]) -> dict[str, Any]:
        """Live-migrate a VM of this host to another host's libvirt."""
        name = _vm_name(params)

        def move() -> Any:
            with LibvirtRuntime(self.libvirt_uri) as runtime:
                return runtime.migrate_live(
                    name, _text(params, "dest_uri"), _text(params, "dest_address")
                )

        try:
            result = await trio.to_thread.run_sync(move)
        except VmError as exc:
            raise VmServiceError(str(exc)) from None
        log.info("migrated %s: downtime %.0f ms (libvirt)", name, result.downtime_ms)
        return {
            "downtime_ms": result.downtime_ms,
            "total_ms": result.total_ms,
            "call_ms": result.call_ms,
        }

    async def expect(self, params: dict[str, Any]) -> dict[str, Any]:
        """Wait for a VM migrating here to run, then route and claim its address at once."""
        name, tap = _vm_name(params), _tap(params)
        grant = _grant(params)
        deadline = time.monotonic() + ARRIVAL_TIMEOUT_S
        prepared = False
        runtime = await self._open()
        try:
            while time.monotonic() < deadline:
                if not prepared and Path(f"/sys/class/net/{tap}").exists():
                    await _configure(tap)  # the incoming QEMU made it: route now
                    await self.routes.prepare(grant, tap, None)
                    prepared = True
                state = await trio.to_thread.run_sync(lambda: runtime.list_vms().get(name))
                if state is VmState.RUNNING:
                    arrived = time.time()
                    claim = await self._adopt(grant, tap, configured=prepared)
                    claim["arrived_at"] = arrived
                    prepared = False  # claimed: the route is the claim's now
                    return claim
                await trio.sleep(ARRIVAL_POLL_S)
            raise VmServiceError(f"{name} did not arrive within {ARRIVAL_TIMEOUT_S:g} s")
        finally:
            runtime.close()
            if prepared:  # it never arrived (or the claim failed): leave no route behind
                with trio.CancelScope(shield=True):
                    await self.routes.unprepare(decode_grant(grant).vm_address)

    async def _open(self) -> LibvirtRuntime:
        """Connect to libvirt off the trio thread (a slow daemon must not stall the agent)."""
        try:
            return await trio.to_thread.run_sync(LibvirtRuntime, self.libvirt_uri)
        except VmError as exc:
            raise VmServiceError(str(exc)) from None

    async def _adopt(self, grant: bytes, tap: str, configured: bool = False) -> dict[str, Any]:
        if not configured:
            await _configure(tap)
        return await self.routes.attach(grant, tap, None)


async def _configure(tap: str) -> None:
    try:
        await configure_tap(tap)
    except GuestAddressError as exc:
        raise VmServiceError(str(exc)) from None


def _grant(params: dict[str, Any]) -> bytes:
    grant = params.get("grant")
    if not isinstance(grant, bytes):
        raise VmServiceError("parameter 'grant' must be the owner's signed grant (bytes)")
    return grant


def _vm_name(params: dict[str, Any]) -> str:
    """The VM's libvirt name; it also names its serial log under the work dir."""
    name = _text(params, "name")
    if not VM_NAME.fullmatch(name):
        raise VmServiceError(f"parameter 'name' must match {VM_NAME.pattern}, not {name!r:.40}")
    return name


def _tap(params: dict[str, Any]) -> str:
    tap = _text(params, "tap")
    if not is_interface_name(tap):
        raise VmServiceError(f"parameter 'tap' must be an interface name, not {tap!r:.40}")
    return tap


def _text(params: dict[str, Any], name: str) -> str:
    value = params.get(name)
    if not isinstance(value, str) or not value:
        raise VmServiceError(f"parameter {name!r} must be a non-empty string")
    return value
