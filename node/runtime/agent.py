"""The agent runtime: one trio process, one supervisor nursery, thin edges.

This module is the composition root and the lifecycle; what runs lives beside it:
our signed record in node/runtime/own_record.py, the membership core's driver in
node/runtime/membership_driver.py, the market side in node/runtime/agent_market.py,
the control methods in node/runtime/node_rpc.py and node/runtime/market_rpc.py.

Start-up order: keys → state → underlay socket → our signed record (its seq
persisted first) → wireguard-go and the overlay link → overlay socket → the
membership core → routes, segments and the market (its ledger restored) → the
control socket's dispatch table → services under one nursery (overlay
reconciler, routes, block server, market, receivers, control socket, record
refresher, the membership driver, seeded with persisted peers, the bootstrap
list and mDNS, and the signal watcher). SIGTERM or SIGINT cancels the nursery;
wireguard-go and mDNS are stopped, the state database is closed and the
control socket removed.

Frames come in through ``node.runtime.transport``: MARKET and LEDGER frames go
to the market side, the rest to the membership driver.
"""

from __future__ import annotations

import functools
import logging
import os
import random
import signal
import time
from collections.abc import Callable

import trio

from node.base.identity import Identity, NodeId
from node.base.records import parse_endpoint
from node.base.wire import Envelope, MessageType, RemoteProtocolError
from node.market.handoff import check_migration_uri
from node.runtime.agent_market import Edges, MarketSide
from node.runtime.config import Config
from node.runtime.control import ControlServer, RpcTable
from node.runtime.discovery import MdnsDiscovery
from node.runtime.keystore import load_or_create
from node.runtime.membership_driver import MembershipDriver
from node.runtime.node_rpc import NodeRpc
from node.runtime.own_record import OwnRecord
from node.runtime.routing import RouteService
from node.runtime.segment_service import SegmentService
from node.runtime.state import State
from node.runtime.transport import OVERLAY, UNDERLAY, Transport
from overlay.addressing import node_address
from overlay.routes import ROUTE_TOPIC
from overlay.wireguard.backend import UapiBackend
from overlay.wireguard.process import WireGuardGo, interface_name
from overlay.wireguard.service import DATA_PLANE_PRIORITY, OverlayService
from segments.image.library import ImageLibrary
from segments.image.store import load as load_image
from segments.vm.runtime import LibvirtRuntime

log = logging.getLogger("gleaner.agent")

BOOT_KEY = "boots"


class Agent:
    def __init__(self, config: Config, identity: Identity, state: State) -> None:
        self.config = config
        self.identity = identity
        self.state = state
        self.swarm_id: str = config["node.swarm_id"]
        self.image_store = config.image_store
        self.overlay_address = node_address(self.swarm_id, identity.node_id.key)
        self.started_monotonic = time.monotonic()
        self.started_wall = time.time()
        self.boot = 0
        self.transport = Transport(identity, self.swarm_id, config["network.listen"], 0)
        self.overlay: OverlayService | None = None
        self.membership: MembershipDriver | None = None
        self.segments: SegmentService | None = None
        self.market: MarketSide | None = None
        self.control: ControlServer | None = None

    # -- lifecycle -----------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.boot = await trio.to_thread.run_sync(self.state.next_counter, BOOT_KEY)
        self.transport = Transport(
            self.identity, self.swarm_id, self.config["network.listen"], self.boot
        )
        await self.transport.open_underlay()
        started = False

        def report_started() -> None:
            nonlocal started
            started = True
            task_status.started()

        try:
            await self._run_services(report_started)
        finally:
            if not started:  # a signal stopped us while starting: a clean stop all the same
                task_status.started()
            with trio.CancelScope(shield=True):
                await self._stop_edges()
            self.transport.close()
            log.info("agent %s stopped", self.identity.node_id.short)

    async def _run_services(self, report_started: Callable[[], None]) -> None:
        if self.config["overlay.enabled"]:
            await self._start_overlay()
        own = OwnRecord(
            self.identity, self.config, self.state, self.transport, self.overlay_address
        )
        await own.sign(0)
        rng = random.Random(int.from_bytes(os.urandom(8), "big"))
        membership = MembershipDriver(
            self.identity,
            self.config,
            self.state,
            self.transport,
            self.overlay,
            own,
            rng,
            MdnsDiscovery,
        )
        self.membership = membership
        routes = RouteService(
            self.identity,
            self.swarm_id,
            self.state,
            self.overlay,
            functools.partial(membership.spread, ROUTE_TOPIC),
            self.config["overlay.move_linger_s"],
        )
        membership.on_broadcast(ROUTE_TOPIC, routes.offer)
        segments = SegmentService(
            self.identity,
            self.config.state_dir,
            self.image_store,
            functools.partial(LibvirtRuntime, self.config["vm.libvirt_uri"]),
            load_image,
            ImageLibrary(self.config.library),
            self.config["vm.image_cache_mib"] << 20,
        )
        self.segments = segments
        market = self._build_market(membership, routes, segments)
        membership.on_member_lost(market.owner_market.member_lost)
        await market.restore()
        control = ControlServer(self.config.control_socket, self._rpc_table(own, routes, market))
        self.control = control
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_signals, nursery.cancel_scope)
            if self.overlay is not None:
                nursery.start_soon(self.overlay.run)
            await nursery.start(routes.run)
            block_host = (
                str(self.overlay_address)
                if self.transport.overlay is not None
                else self.transport.underlay_address[0]
            )
            await nursery.start(segments.serve, block_host, self.config["network.block_port"])
            await nursery.start(market.run)
            # Frames and requests only once every service that handles them runs.
            nursery.start_soon(self.transport.receive_loop, UNDERLAY, self._deliver)
            if self.transport.overlay is not None:
                nursery.start_soon(self.transport.receive_loop, OVERLAY, self._deliver)
            await nursery.start(control.serve)
            nursery.start_soon(own.run)
            await nursery.start(membership.run)
            log.info(
                "agent %s up: underlay %s:%d, overlay %s, control %s",
                self.identity.node_id,
                *self.transport.underlay_address,
                self.overlay_address,
                self.config.control_socket,
            )
            report_started()

    async def _start_overlay(self) -> None:
        ifname = interface_name(self.identity.node_id.key)
        process = WireGuardGo(
            ifname,
            log_path=self.config.state_dir / "wireguard-go.log",
            priority=DATA_PLANE_PRIORITY,
        )
        overlay = OverlayService(
            self.identity,
            self.swarm_id,
            self.config["network.wireguard_port"],
            self.config.state_dir,
            UapiBackend(ifname),
            process,
            self.config["overlay.eager_limit"],
            self.config["overlay.idle_expiry_s"],
        )
        self.overlay = overlay
        await trio.to_thread.run_sync(overlay.start)
        await overlay.reconcile()
        await self.transport.open_overlay(self.overlay_address)

    async def _stop_edges(self) -> None:
        if self.membership is not None:
            await self.membership.stop()
        if self.overlay is not None:
            await trio.to_thread.run_sync(self.overlay.stop)
        if self.segments is not None:
            self.segments.close()

    async def _watch_signals(self, scope: trio.CancelScope) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("received %s, stopping", signal.Signals(signum).name)
                scope.cancel()
                return

    async def _deliver(self, envelope: Envelope, via: str, origin: tuple[str, int]) -> None:
        if envelope.type in (MessageType.MARKET, MessageType.LEDGER):
            assert self.market is not None
            await self.market.deliver(envelope)
        else:
            assert self.membership is not None
            await self.membership.deliver(envelope, origin)

    # -- wiring ----------------------------------------------------------------------

    def _build_market(
        self, membership: MembershipDriver, routes: RouteService, segments: SegmentService
    ) -> MarketSide:
        edges = Edges(
            membership.sender(MessageType.MARKET),
            membership.sender(MessageType.LEDGER),
            membership.live_members,
            self.block_endpoint,
            self._helper_pids,
            routes if self.overlay is not None else None,  # network jobs need an overlay
            self._migration_target() if self.overlay is not None else None,
        )
        market = MarketSide.build(
            self.config, self.identity, self.swarm_id, self.state, segments, edges
        )
        self.market = market
        return market

    def _rpc_table(self, own: OwnRecord, routes: RouteService, market: MarketSide) -> RpcTable:
        """The control socket's methods: the node's own, then the market's."""
        assert self.membership is not None and self.segments is not None
        table = RpcTable()
        node = NodeRpc(
            self.config,
            self.identity,
            self.boot,
            self.started_monotonic,
            self.started_wall,
            self.transport,
            own,
            self.membership,
            self.overlay,
            routes,
            self.segments,
            self.image_store,
            market.policy.status,
        )
        node.register(table)
        market.register(table)
        return table

    def _migration_target(self) -> tuple[str, str] | None:
        """How another host live-migrates a guest here: our libvirt and our underlay;
        None (no live hand-off in or out) if peers would refuse that libvirt URI."""
        uri = self.config["vm.migration_uri"] or self.config["vm.libvirt_uri"]
        try:
            check_migration_uri(uri)
        except RemoteProtocolError as exc:
            log.info("no live hand-off of guests: %s (set vm.migration_uri)", exc)
            return None
        return uri, self.transport.underlay_address[0]

    def _helper_pids(self) -> list[int]:
        pid = self.overlay.process.pid if self.overlay is not None else None
        return [pid] if pid else []

    def block_endpoint(self, node: NodeId) -> tuple[str, int] | None:
        """Where ``node`` serves blocks: its overlay address (or, without an overlay, its
        underlay host), on the swarm's block port."""
        port = self.config["network.block_port"]
        if node == self.identity.node_id:
            return self.segments.listen if self.segments else None
        member = self.membership.core.member(node) if self.membership else None
        if member is None:
            return None
        if self.overlay is not None:
            return (member.record.overlay_address, port)
        if not member.record.endpoints:
            return None
        return (parse_endpoint(member.record.endpoints[0])[0], port)


async def run_agent(
    config: Config, *, task_status: trio.TaskStatus[Agent] = trio.TASK_STATUS_IGNORED
) -> None:
    """Open everything the agent needs, run it until cancelled or signalled, close it all."""
    identity = await trio.to_thread.run_sync(load_or_create, config.state_dir)
    state = await trio.to_thread.run_sync(State, config.state_dir / "state.db")
    try:
        agent = Agent(config, identity, state)
        async with trio.open_nursery() as nursery:
            await nursery.start(agent.run)
            task_status.started(agent)
    finally:
        state.close()
