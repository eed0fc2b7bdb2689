"""The agent's overlay: its wireguard-go, and a reconciler that keeps it as desired.

The agent tells this service *what* the overlay should be (members, routes, the
active set); the service computes the full desired device state
(``overlay.desired``), reads the device's actual state, applies
``wgstate.diff`` between them as one transaction, and logs every change. It
runs on every change (so a route move reaches the device at once) and once a
second anyway (to notice drift, refresh handshake times, and restart a dead
wireguard-go, after which the next pass re-applies everything).

Peers that this node has not exchanged traffic with for ``idle_expiry_s`` drop
out of the active set; in a large swarm that removes their WireGuard peer.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Protocol

import trio

from node.base.host.procs import stop_recorded
from node.base.identity import Identity, NodeId
from node.base.records import PeerRecord
from overlay.addressing import PREFIX_LEN, node_address
from overlay.desired import DEFAULT_EAGER_LIMIT, desired_device
from overlay.errors import OverlayError
from overlay.wgstate import (
    AddPeer,
    DeviceConfig,
    DeviceStatus,
    PeerStatus,
    RemovePeer,
    diff,
    short_key,
)
from overlay.wireguard.backend import WireGuardBackend

log = logging.getLogger("gleaner.overlay")

RECONCILE_PERIOD_S = 1.0
ORPHAN_STOP_S = 5.0
DATA_PLANE_PRIORITY = 10  # wireguard-go runs at nice -10: packets before bookkeeping
FAST_PERIOD_S = 0.05
KICK_AFTER_S = 0.15  # a handshake with a peer that knows us takes ~5 ms
KICK_INTERVAL_S = 1.5
SESSION_FRESH_S = 180.0
IDLE_EXPIRY_S = 120.0


class WireGuardProcess(Protocol):
    """The process that holds the WireGuard device (``WireGuardGo``), as the service
    uses it: started and stopped once, watched, and its link addressed."""

    @property
    def ifname(self) -> str: ...

    @property
    def pid(self) -> int | None: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def is_healthy(self) -> bool: ...

    def configure_link(self, address: ipaddress.IPv6Interface) -> None: ...


class OverlayService:
    """The reconciler of one device: ``process`` holds it (wireguard-go, at
    ``DATA_PLANE_PRIORITY``), ``backend`` reads and changes it (``UapiBackend``);
    the agent builds both, tests may hand in twins."""

    def __init__(
        self,
        identity: Identity,
        swarm_id: str,
        wg_port: int,
        state_dir: Path,
        backend: WireGuardBackend,
        process: WireGuardProcess,
        eager_limit: int = DEFAULT_EAGER_LIMIT,
        idle_expiry_s: float = IDLE_EXPIRY_S,
    ) -> None:
        self.identity = identity
        self.swarm_id = swarm_id
        self.wg_port = wg_port
        self.ifname = process.ifname
        self.address = node_address(swarm_id, identity.node_id.key)
        self.process = process
        self.pid_file = state_dir / "wireguard-go.pid"
        self.backend = backend
        self.members: dict[NodeId, PeerRecord] = {}
        self.routes: Mapping[NodeId, frozenset[ipaddress.IPv6Network]] = {}
        self.last_used: dict[NodeId, float] = {}
        self.device: DeviceStatus | None = None
        self.changes_applied = 0
        self.restarts = 0
        self.handshake_kicks = 0
        self._added_at: dict[bytes, float] = {}
        self._kicked_at: dict[bytes, float] = {}
        self.eager_limit = eager_limit
        self.idle_expiry_s = idle_expiry_s
        self._lock = trio.Lock()
        self._wake = trio.Event()

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        """Start wireguard-go and address its link. Blocking; call once at start-up."""
        self._stop_orphan()
        self.process.start()
        if self.process.pid:
            self.pid_file.write_text(str(self.process.pid))
        self.process.configure_link(ipaddress.IPv6Interface((self.address, PREFIX_LEN)))

    def stop(self) -> None:
        self.process.stop()
        self.pid_file.unlink(missing_ok=True)

    def _stop_orphan(self) -> None:
        """A wireguard-go left running by a killed agent of ours holds our interface name."""
        markers = (b"wireguard-go", self.ifname.encode())
        pid = stop_recorded(self.pid_file, markers, ORPHAN_STOP_S)
        if pid is not None:
            log.info("stopped wireguard-go PID %d left by a previous run", pid)

    async def run(self) -> None:
        while True:
            period = FAST_PERIOD_S if self._awaiting_handshake() else RECONCILE_PERIOD_S
            with trio.move_on_after(period):
                await self._wake.wait()
            self._wake = trio.Event()
            await self.check_health()
            await self.reconcile()
            await self.kick_stalled_handshakes()

    def _awaiting_handshake(self) -> bool:
        return self.device is not None and any(
            not peer.last_handshake for peer in self.device.peers.values()
        )

    async def kick_stalled_handshakes(self) -> None:
        """Re-create peers whose first handshake was lost to a race.

        When two nodes add each other within a few milliseconds, each one's
        handshake initiation can reach the other before it knows the sender, and
        be dropped; WireGuard then waits REKEY_TIMEOUT (5 s) before it tries
        again, and refuses to initiate sooner. A re-created peer has no such
        memory and initiates at once (its persistent keepalive), and by now the
        other side knows us. So a peer still without a handshake KICK_AFTER_S
        after it was added is removed and added again, at most every
        KICK_INTERVAL_S.
        """
        if self.device is None:
            return
        now = time.monotonic()
        for gone in (self._added_at.keys() | self._kicked_at.keys()) - self.device.peers.keys():
            self._added_at.pop(gone, None)
            self._kicked_at.pop(gone, None)
        for key, peer in self.device.peers.items():
            if peer.last_handshake:
                self._added_at.pop(key, None)
                continue
            added = self._added_at.setdefault(key, now)
            if now - added < KICK_AFTER_S or now - self._kicked_at.get(key, 0.0) < KICK_INTERVAL_S:
                continue
            desired = self._desired().peers.get(key)
            if desired is None:
                continue
            self._kicked_at[key] = now
            self.handshake_kicks += 1
            try:
                await trio.to_thread.run_sync(self.backend.apply, [RemovePeer(key)])
                await trio.to_thread.run_sync(self.backend.apply, [AddPeer(desired)])
            except OverlayError as exc:
                log.warning(
                    "re-creating peer %s on %s failed: %s", short_key(key), self.ifname, exc
                )
                continue
            log.info(
                "%s: re-created peer %s to retry its first handshake", self.ifname, short_key(key)
            )

    async def check_health(self) -> None:
        if await trio.to_thread.run_sync(self.process.is_healthy):
            return
        log.warning("wireguard-go for %s is not healthy; restarting", self.ifname)
        self.restarts += 1
        try:
            await trio.to_thread.run_sync(self.process.stop)
            await trio.to_thread.run_sync(self.start)
        except OverlayError as exc:
            log.error("restarting wireguard-go for %s failed: %s", self.ifname, exc)

    # -- desired state inputs ----------------------------------------------------

    def set_member(self, record: PeerRecord) -> None:
        if record.node_id != self.identity.node_id:
            self.members[record.node_id] = record
            self._wake.set()

    def remove_member(self, node_id: NodeId) -> None:
        if self.members.pop(node_id, None) is not None:
            self.last_used.pop(node_id, None)
            self._wake.set()

    def set_routes(self, routes: Mapping[NodeId, frozenset[ipaddress.IPv6Network]]) -> None:
        self.routes = dict(routes)
        self._wake.set()

    def mark_used(self, node_id: NodeId, now: float) -> None:
        if node_id not in self.last_used:
            self._wake.set()
        self.last_used[node_id] = now

    def active(self, now: float) -> frozenset[NodeId]:
        for node_id, used in list(self.last_used.items()):
            if now - used > self.idle_expiry_s:
                del self.last_used[node_id]
        return frozenset(self.last_used)

    # -- reconciling -------------------------------------------------------------

    async def reconcile(self) -> None:
        """Make the device match the desired state; log and count what changed."""
        async with self._lock:
            try:
                desired = self._desired()
            except ValueError as exc:  # a bug here, never a peer's doing: desired_device filters
                log.error("computing the desired state of %s failed: %s", self.ifname, exc)
                return
            try:
                actual = await trio.to_thread.run_sync(self.backend.read)

                changes = diff(actual, desired)
                if changes:
                    await trio.to_thread.run_sync(self.backend.apply, changes)
                    self.changes_applied += len(changes)
                    for change in changes:
                        log.info("%s: %s", self.ifname, change.describe())
                    self._wake.set()  # read the device again soon, off this path
            except OverlayError as exc:
                log.warning("reconciling %s failed: %s", self.ifname, exc)
                return
            self.device = actual

    async def refresh(self) -> None:
        """Read the device now (handshakes, counters) for an up-to-date view."""
        try:
            self.device = await trio.to_thread.run_sync(self.backend.read)
        except OverlayError as exc:
            log.debug("reading %s failed: %s", self.ifname, exc)

    def _desired(self) -> DeviceConfig:
        return desired_device(
            private_key=bytes(self.identity.wireguard_key),
            listen_port=self.wg_port,
            swarm_id=self.swarm_id,
            members=self.members.values(),
            routes=self.routes,
            active=self.active(time.time()),
            eager_limit=self.eager_limit,
        )

    # -- queries -----------------------------------------------------------------

    def peer_status(self, node_id: NodeId) -> PeerStatus | None:
        record = self.members.get(node_id)
        if record is None or self.device is None:
            return None
        return self.device.peers.get(record.wireguard_key)

    def has_session(self, node_id: NodeId, now: float) -> bool:
        status = self.peer_status(node_id)
        return status is not None and now - status.last_handshake < SESSION_FRESH_S

    def peers(self) -> Iterable[tuple[PeerRecord, PeerStatus | None]]:
        for record in self.members.values():
            yield record, self.peer_status(record.node_id)
