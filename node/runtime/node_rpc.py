"""The node's own control requests: status, peers, peer_record, routes, segment_run,
vm_start, vm_migrate, vm_expect and vm_attach.

``gleaner status/peers/routes/segment/vm`` (node/cli/) call these on the local
agent's control socket. ``NodeRpc`` holds what answers them (our record, the
membership driver, the overlay, routes and segment services) and ``register``
puts them into the control socket's dispatch table
(``node.runtime.control.RpcTable``); the market registers its own methods
(node/runtime/market_rpc.py). A failing request is an ``RpcError``; the agent
keeps running.
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node import __version__
from node.base.identity import Identity
from node.runtime.config import Config
from node.runtime.control import RpcError, RpcTable, param
from node.runtime.membership_driver import MembershipDriver
from node.runtime.own_record import OwnRecord
from node.runtime.routing import RouteService, RoutingError
from node.runtime.segment_service import SegmentError, SegmentService
from node.runtime.transport import Transport
from node.runtime.vm_service import VmService, VmServiceError
from overlay.wireguard.service import OverlayService

VmRequest = Callable[[VmService, dict[str, Any]], Awaitable[dict[str, Any]]]


@dataclass
class NodeRpc:
    config: Config
    identity: Identity
    boot: int
    started_monotonic: float
    started_wall: float
    transport: Transport
    own: OwnRecord
    membership: MembershipDriver
    overlay: OverlayService | None
    routes: RouteService
    segments: SegmentService
    image_store: Path
    policy_status: Callable[[], dict[str, Any]]  # the host policy's, for `status`

    def register(self, table: RpcTable) -> None:
        table.register("status", self.status)
        table.register("peers", self.peers)
        table.register("peer_record", self.peer_record)
        table.register("routes", self.routes_view)
        table.register("segment_run", self.segment_run)
        table.register("vm_start", self.vm_start)
        table.register("vm_migrate", self.vm_migrate)
        table.register("vm_expect", self.vm_expect)
        table.register("vm_attach", self.vm_attach)

    async def status(self, params: dict[str, Any]) -> dict[str, Any]:
        record = self.own.record
        stats = self.transport.stats
        core = self.membership.core
        return {
            "node_id": str(self.identity.node_id),
            "short_id": self.identity.node_id.short,
            "name": self.config["node.name"],
            "version": __version__,
            "swarm_id": self.config["node.swarm_id"],
            "pid": os.getpid(),
            "uptime_s": round(time.monotonic() - self.started_monotonic, 3),
            "started_at": self.started_wall,
            "underlay": list(self.own.advertised_endpoints()),
            "listen": "{}:{}".format(*self.transport.underlay_address),
            "overlay_address": str(self.own.overlay_address),
            "overlay_interface": self.overlay.ifname if self.overlay else None,
            "wireguard_pid": self.overlay.process.pid if self.overlay else None,
            "wireguard_public_key": self.identity.wireguard_public.hex(),
            "peer_count": core.alive_count(),
            "record_seq": record.seq if record else 0,
            "boot": self.boot,
            "frames_in": sum(stats.frames_in.values()),
            "frames_out": sum(stats.frames_out.values()),
            "protocol_errors": stats.protocol_errors_total + self.membership.record_errors,
            "protocol_errors_by_peer": dict(stats.protocol_errors.most_common(20)),
            "handler_errors": dict(stats.handler_errors),
            "receive_errors": stats.receive_errors,
            "membership": core.statistics(),
            "policy": self.policy_status(),
            "state_dir": str(self.config.state_dir),
        }

    async def peers(self, params: dict[str, Any]) -> list[dict[str, Any]]:
        if self.overlay is not None:
            await self.overlay.refresh()
        rows = []
        for member in sorted(self.membership.core.members(), key=lambda m: str(m.node_id)):
            wg = self.overlay.peer_status(member.node_id) if self.overlay else None
            rows.append(
                {
                    "node_id": str(member.node_id),
                    "short_id": member.node_id.short,
                    "overlay_address": member.record.overlay_address,
                    "endpoint": member.record.endpoints[0] if member.record.endpoints else None,
                    "state": member.state.value,
                    "incarnation": member.incarnation,
                    "since": member.since,
                    "last_handshake": wg.last_handshake if wg else 0.0,
                    "rx_bytes": wg.rx_bytes if wg else 0,
                    "tx_bytes": wg.tx_bytes if wg else 0,
                    "wireguard_peer": wg is not None,
                }
            )
        return rows

    async def peer_record(self, params: dict[str, Any]) -> bytes:
        return self.own.record.blob if self.own.record else b""

    async def routes_view(self, params: dict[str, Any]) -> Any:
        return self.routes.view()

    async def segment_run(self, params: dict[str, Any]) -> Any:
        try:
            return await self.segments.run_segment(params)
        except SegmentError as exc:
            raise RpcError(str(exc)) from None

    async def vm_start(self, params: dict[str, Any]) -> Any:
        return await self._vm(VmService.start, params)

    async def vm_migrate(self, params: dict[str, Any]) -> Any:
        return await self._vm(VmService.migrate, params)

    async def vm_expect(self, params: dict[str, Any]) -> Any:
        return await self._vm(VmService.expect, params)

    async def _vm(self, request: VmRequest, params: dict[str, Any]) -> Any:
        service = VmService(
            self.config["vm.libvirt_uri"],
            self.image_store,
            self.config.state_dir / "vms",
            self.routes,
        )
        try:
            return await request(service, params)
        except (VmServiceError, RoutingError) as exc:
            raise RpcError(str(exc)) from None

    async def vm_attach(self, params: dict[str, Any]) -> Any:
        try:
            return await self.routes.attach(
                param(params, "grant", bytes),
                param(params, "device", str),
                param(params, "gateway", str),
            )
        except RoutingError as exc:
            raise RpcError(str(exc)) from None
