"""A guest's stable overlay address on this host: its tap, its kernel route, its claim.

A VM with network holds its overlay address on its NIC, with a default route
via ``fe80::1`` (both from its kernel command line, ``guest_cmdline``). Its
host puts ``fe80::1`` on the VM's tap, routes the address to the tap and
claims it (node.runtime.routing): from then on the whole swarm sends the address here.
``route_guest`` does that for a market replica: it waits for the tap that
libvirt creates when the guest boots or is restored, then routes and claims
the address with the award's grant; the host withdraws the claim when the
replica ends (the next segment's host claims a higher epoch from its award).
For a guest arriving by live migration it routes when the tap appears and
claims only when the guest runs here.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable
from pathlib import Path

import trio

from node.base.wire import RemoteProtocolError
from node.runtime.routing import RouteService, RoutingError
from overlay.claims import decode_grant

log = logging.getLogger("gleaner.vms")

HOST_LINK_LOCAL = "fe80::1"
TAP_POLL_S = 0.02


class GuestAddressError(Exception):
    """The guest's address could not be routed or claimed here; the message says why."""


def guest_cmdline(address: ipaddress.IPv6Address | str) -> str:
    """The kernel command-line words that give the guest its overlay address."""
    return f"gleaner.addr={address}/128 gleaner.gw={HOST_LINK_LOCAL}"


def market_tap_name(job_id: bytes) -> str:
    """The tap of a job's replica on a host (15 characters at most, as Linux wants)."""
    return f"gt{job_id.hex()[:12]}"


def grant_address(grant: bytes) -> ipaddress.IPv6Address:
    try:
        return decode_grant(grant).vm_address
    except RemoteProtocolError as exc:
        raise GuestAddressError(f"bad grant: {exc}") from None


async def configure_tap(tap: str) -> None:
    """Put the guest's gateway address on its tap and bring it up."""
    for command in (
        ["ip", "-6", "addr", "replace", f"{HOST_LINK_LOCAL}/64", "dev", tap, "nodad"],
        ["ip", "link", "set", tap, "up"],
    ):
        result = await trio.run_process(command, capture_stderr=True, check=False)
        if result.returncode != 0:
            raise GuestAddressError(f"{' '.join(command)}: {result.stderr.decode().strip()}")


async def wait_for_device(name: str) -> None:
    """Return once network device `name` exists here (libvirt made the tap)."""
    while not Path(f"/sys/class/net/{name}").exists():
        await trio.sleep(TAP_POLL_S)


ARRIVAL_POLL_S = 0.005


async def route_guest(
    routes: RouteService, grant: bytes, tap: str, arrived: Callable[[], bool] | None = None
) -> bool:
    """Once `tap` exists, route the grant's address to it and claim it; False if that
    failed (logged). The caller withdraws with ``routes.detach`` when the guest ends.

    For a guest migrating here, ``arrived`` says when it runs here: the address is
    routed to the tap as soon as the incoming QEMU makes it, but claimed only
    then, since until the switch-over the guest still answers on its source.
    """
    await wait_for_device(tap)
    try:
        await configure_tap(tap)
        if arrived is not None:
            await routes.prepare(grant, tap, None)
            while not arrived():
                await trio.sleep(ARRIVAL_POLL_S)
        claim = await routes.attach(grant, tap, None)
    except (GuestAddressError, RoutingError) as exc:
        log.warning("guest address on %s: %s", tap, exc)
        return False
    how = "claimed" if arrived is None else "claimed on arrival"
    log.info("guest address %s %s on %s at epoch %d", claim["address"], how, tap, claim["epoch"])
    return True
