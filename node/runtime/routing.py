"""VM address routing on this node: claims, kernel routes, make-before-break moves.

The route table core (overlay.routes) decides who holds each VM address. This
service is its edge on one node:

- ``attach``: a VM (or the testbed's stand-in) is reachable on a local device.
  Add the kernel route first (the address is up here), then claim it: the claim
  is persisted *before* it is spread (persist before you promise), then pushed
  straight to every peer we have a session with and queued for gossip.
- a claim from elsewhere that takes an address we hold: keep forwarding to the
  local device for ``move_linger_s`` (peers that have not heard of the move yet
  still send here), then withdraw the claim and remove the kernel route.
- every accepted change updates the WireGuard desired state at once.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import trio

from node.base.identity import Identity
from node.base.wire import LocalProtocolError, RemoteProtocolError
from node.runtime.state import State
from overlay.claims import decode_grant
from overlay.routes import ApplyRoute, RouteTable

if TYPE_CHECKING:
    from overlay.wireguard.service import OverlayService

log = logging.getLogger("gleaner.routing")

HISTORY = 256  # route changes kept for `routes` (when each move reached this node)
IFNAME = re.compile(r"[A-Za-z0-9_.-]{1,15}")  # a Linux interface name (IFNAMSIZ - 1)


def is_interface_name(name: object) -> bool:
    return isinstance(name, str) and bool(IFNAME.fullmatch(name)) and name not in (".", "..")


Spread = Callable[[bytes, bytes], Awaitable[None]]


class RoutingError(Exception):
    """A local routing request could not be carried out."""


def check_route_target(device: str, gateway: str | None) -> None:
    """RoutingError unless `device` is an interface name and `gateway` an IPv6 address."""
    if not is_interface_name(device):
        raise RoutingError(f"device {device!r:.40} is not an interface name")
    if gateway:
        try:
            ipaddress.IPv6Address(gateway)
        except (ValueError, TypeError):
            raise RoutingError(f"gateway {gateway!r:.60} is not an IPv6 address") from None


class RouteService:
    def __init__(
        self,
        identity: Identity,
        swarm_id: str,
        state: State,
        overlay: OverlayService | None,
        spread: Spread,
        linger_s: float,
    ) -> None:
        self.identity = identity
        self.table = RouteTable(swarm_id, identity.node_id)
        self.state = state
        self.overlay = overlay
        self.spread = spread
        self.linger_s = linger_s
        self.devices: dict[ipaddress.IPv6Address, tuple[str, str | None]] = {}  # -> (dev, via)
        self.history: deque[dict[str, Any]] = deque(maxlen=HISTORY)
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        blobs = await trio.to_thread.run_sync(self.state.route_claims)
        self.table.restore(blobs, time.time())
        self._publish()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            while True:
                expiry = self.table.next_expiry()
                await trio.sleep(
                    1.0 if expiry is None else max(0.05, min(1.0, expiry - time.time()))
                )
                await self._changed(self.table.tick(time.time()))

    async def attach(self, grant_blob: bytes, device: str, gateway: str | None) -> dict[str, Any]:
        """Route a local VM address to `device` (via `gateway`, or on-link) and claim it."""
        check_route_target(device, gateway)
        try:
            grant = decode_grant(grant_blob)
        except RemoteProtocolError as exc:
            raise RoutingError(f"bad grant: {exc}") from None
        if grant.node_id != self.identity.node_id:
            raise RoutingError("the grant names another node")
        address = grant.vm_address
        if self.devices.get(address) != (device, gateway):
            await self._kernel_route("replace", address, device, gateway)
            self.devices[address] = (device, gateway)
        try:
            blob, effects = self.table.claim_local(grant, self.identity, time.time())
        except (RemoteProtocolError, LocalProtocolError) as exc:  # e.g. a stale or expired grant
            await self.unprepare(address)
            raise RoutingError(f"cannot claim {address}: {exc}") from None
        self.history.append(
            {
                "address": str(address),
                "node_id": str(self.identity.node_id),
                "epoch": grant.epoch,
                "at": time.time(),
                "event": "claimed",
            }
        )
        await self._persist()
        await self.spread(address.packed, blob)
        await self._changed(effects)
        log.info("claimed %s at epoch %d on %s", address, grant.epoch, device)
        return {"address": str(address), "epoch": grant.epoch}

    async def prepare(self, grant_blob: bytes, device: str, gateway: str | None) -> None:
        """Route an arriving VM's address to its device ahead of the claim (no claim yet).

        For a live migration: the destination's tap exists before the guest runs
        here; routing it now leaves only the claim for the switch-over.
        """
        check_route_target(device, gateway)
        try:
            address = decode_grant(grant_blob).vm_address
        except RemoteProtocolError as exc:
            raise RoutingError(f"bad grant: {exc}") from None
        await self._kernel_route("replace", address, device, gateway)
        self.devices[address] = (device, gateway)

    async def offer(self, payload: bytes) -> None:
        """A claim or withdrawal heard from the swarm."""
        try:
            effects = self.table.offer(payload, time.time())
        except RemoteProtocolError as exc:
            log.debug("route update refused: %s", exc)
            return
        # Another node's claim is no promise of ours: route first (every
        # millisecond here is a millisecond of replies dropped by WireGuard's
        # source check), then persist.
        await self._changed(effects)
        if effects:
            await self._persist()

    async def _changed(self, effects: list[ApplyRoute]) -> None:
        if not effects:
            return
        for effect in effects:
            holder = effect.node_id.short if effect.node_id else "nobody"
            log.info("route %s -> %s (epoch %d)", effect.vm_address, holder, effect.epoch)
            self.history.append(
                {
                    "address": str(effect.vm_address),
                    "node_id": str(effect.node_id) if effect.node_id else None,
                    "epoch": effect.epoch,
                    "at": time.time(),
                    "event": "routed",
                }
            )
            if effect.node_id != self.identity.node_id and effect.vm_address in self.devices:
                assert self._nursery is not None
                self._nursery.start_soon(self._release_after_linger, effect.vm_address)
        self._publish()
        if self.overlay is not None:
            await self.overlay.reconcile()

    def _publish(self) -> None:
        if self.overlay is not None:
            self.overlay.set_routes(self.table.allowed_ips())

    async def unprepare(self, address: ipaddress.IPv6Address) -> None:
        """Undo `prepare` (or a failed `attach`): drop the kernel route, forget the device."""
        device = self.devices.pop(address, None)
        if device is not None:
            await self._kernel_route("del", address, *device)

    async def _release_after_linger(self, address: ipaddress.IPv6Address) -> None:
        await trio.sleep(self.linger_s)
        route = self.table.route(address)
        if route is not None and route.node_id == self.identity.node_id:
            return  # it came back here during the linger (A -> B -> A): keep it
        if address in self.devices and await self.detach(address):
            log.info("withdrew %s after %.1f s linger", address, self.linger_s)

    async def detach(self, address: ipaddress.IPv6Address) -> bool:
        """The VM behind `address` is gone from here: drop its kernel route and withdraw
        our claim on it (persisted before it is spread). True if there was one."""
        device = self.devices.pop(address, None)
        if device is not None:
            await self._kernel_route("del", address, *device)
        try:  # withdrawn even if a newer claim moved it: stale there, news elsewhere
            blob, effects = self.table.withdraw_local(address, self.identity, time.time())
        except LocalProtocolError:
            return False  # only prepared here, never claimed: nothing to withdraw
        await self._persist()
        await self.spread(address.packed, blob)
        await self._changed(effects)
        return True

    async def _persist(self) -> None:
        await trio.to_thread.run_sync(self.state.save_route_claims, self.table.snapshot())

    async def _kernel_route(
        self, action: str, address: ipaddress.IPv6Address, device: str, gateway: str | None
    ) -> None:
        via = ["via", gateway] if gateway else []
        command = ["ip", "-6", "route", action, f"{address}/128", *via, "dev", device]
        result = await trio.run_process(
            command, capture_stdout=True, capture_stderr=True, check=False
        )
        if result.returncode != 0 and action != "del":
            raise RoutingError(f"{' '.join(command)}: {result.stderr.decode().strip()}")

    def local_addresses(self) -> list[str]:
        return sorted(str(address) for address in self.devices)

    def view(self) -> dict[str, Any]:
        routes = []
        for address_text in sorted({str(a) for a in self._known_addresses()}):
            route = self.table.route(ipaddress.IPv6Address(address_text))
            if route is not None:
                routes.append(
                    {
                        "address": address_text,
                        "node_id": str(route.node_id) if route.node_id else None,
                        "epoch": route.epoch,
                    }
                )
        return {
            "local": self.local_addresses(),
            "routes": routes,
            "history": list(self.history),
            "stats": self.table.statistics(),
        }

    def _known_addresses(self) -> list[ipaddress.IPv6Address]:
        found = [
            network.network_address
            for nets in self.table.allowed_ips().values()
            for network in nets
        ]
        return found + list(self.table.local_addresses()) + list(self.devices)
