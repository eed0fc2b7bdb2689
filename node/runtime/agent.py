"""The agent runtime: one trio process, one supervisor nursery, thin edges.

Start-up order: keys → state → underlay socket → our signed record (its seq
persisted first) → wireguard-go and the overlay link → overlay socket → the
membership core, seeded with persisted peers, the bootstrap list and mDNS →
services under one nursery (control socket, receivers, membership driver,
reconciler, routes, record refresher, signal watcher). SIGTERM or SIGINT
cancels the nursery; wireguard-go and mDNS are stopped, the state database is
closed and the control socket removed.

The membership core is driven by ``_membership_loop``: it runs ``tick`` at the
core's ``next_wakeup`` (or when a message woke it) and carries out the effects.
Frames come in through ``node.runtime.transport``; membership messages go to the core,
anything refused there is counted per source and dropped.
"""

from __future__ import annotations

import logging
import os
import platform
import random
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from node import __version__
from node.base.identity import Identity, NodeId
from node.base.records import Capabilities, PeerRecord, decode_record, parse_endpoint, sign_record
from node.base.wire import Envelope, MessageType, RemoteProtocolError
from node.membership.dissemination import Broadcast, encode_update
from node.membership.swim import (
    BroadcastReceived,
    Effect,
    JoinRequested,
    MemberChanged,
    Membership,
    MembershipConfig,
    MemberState,
    MessageReceived,
    OwnRecordSigned,
    RecordDiscovered,
    RefreshOwnRecord,
    SendMessage,
    SendToEndpoint,
)
from node.runtime.agent_market import Edges, MarketSide
from node.runtime.config import Config
from node.runtime.control import ControlServer, RpcError
from node.runtime.discovery import Discovery, MdnsDiscovery
from node.runtime.ledger_service import LedgerService
from node.runtime.market_rpc import MARKET_METHODS, market_rpc
from node.runtime.routing import ROUTE_TOPIC, RouteService, RoutingError
from node.runtime.segment_service import SegmentError, SegmentService
from node.runtime.state import State
from node.runtime.transport import OVERLAY, UNDERLAY, Transport
from overlay.addressing import node_address

log = logging.getLogger("gleaner.agent")

RECORD_SEQ_KEY = "record_seq"
BOOT_KEY = "boots"
MEMBERSHIP_TYPES = frozenset(
    {
        MessageType.PING,
        MessageType.ACK,
        MessageType.PING_REQ,
        MessageType.NACK,
        MessageType.JOIN,
        MessageType.JOIN_REPLY,
        MessageType.GOSSIP,
    }
)


def local_capabilities() -> Capabilities:
    memory_mb = 0
    try:
        memory_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1024 * 1024)
    except (ValueError, OSError):
        pass
    return Capabilities(
        arch=platform.machine() or "unknown",
        vcpus=os.cpu_count() or 1,
        memory_mb=memory_mb,
        kvm=os.path.exists("/dev/kvm"),
        bench_score=0,
    )


class Agent:
    def __init__(self, config: Config, identity: Identity, state: State) -> None:
        self.config = config
        self.identity = identity
        self.state = state
        self.swarm_id: str = config["node.swarm_id"]
        self.image_store = Path(config["vm.image_store"] or config.state_dir / "images")
        self.overlay_address = node_address(self.swarm_id, identity.node_id.key)
        self.started_monotonic = time.monotonic()
        self.started_wall = time.time()
        self.boot = 0
        self.record: PeerRecord | None = None
        self.transport = Transport(identity, self.swarm_id, config["network.listen"], 0)
        self.membership: Membership | None = None
        self.overlay: Any = None  # overlay.wireguard.service.OverlayService when overlay.enabled
        self.routes: RouteService | None = None
        self.discovery: Discovery | None = None
        self.segments: SegmentService | None = None
        self.market: MarketSide | None = None
        self.ledger: LedgerService | None = None
        self.host_market: Any = None  # node.runtime.market_host.HostMarket
        self.policy: Any = None  # node.runtime.policy_service.PolicyService
        self.owner_market: Any = None  # node.runtime.market_owner.OwnerMarket
        self.record_errors = 0
        self._wake = trio.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._discovered: tuple[trio.MemorySendChannel[bytes], trio.MemoryReceiveChannel[bytes]]
        self._discovered = trio.open_memory_channel(256)

    # -- lifecycle -----------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._token = trio.lowlevel.current_trio_token()
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
        self.record = await self._sign_record(0)
        rng = random.Random(int.from_bytes(os.urandom(8), "big"))
        self.membership = Membership(self.record, self._membership_config(), rng)
        self.routes = RouteService(
            self.identity,
            self.swarm_id,
            self.state,
            self.overlay,
            self._spread,
            self.config["overlay.move_linger_s"],
        )
        self.segments = SegmentService(
            self.identity, self.config.state_dir, self.config["vm.libvirt_uri"], self.image_store
        )
        self._start_market()
        assert self.ledger is not None
        await self.ledger.restore()
        control = ControlServer(self.config.control_socket, self._rpc)
        self.control = control
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_signals, nursery.cancel_scope)
            if self.overlay is not None:
                nursery.start_soon(self.overlay.run)
            await nursery.start(self.routes.run)
            block_host = (
                str(self.overlay_address)
                if self.transport.overlay is not None
                else self.transport.underlay_address[0]
            )
            await nursery.start(self.segments.serve, block_host, self.config["network.block_port"])
            nursery.start_soon(self.ledger.run)
            await nursery.start(self.host_market.run)
            await nursery.start(self.policy.run)
            await nursery.start(self.owner_market.run)
            # Frames and requests only once every service that handles them runs.
            nursery.start_soon(self.transport.receive_loop, UNDERLAY, self._deliver)
            if self.transport.overlay is not None:
                nursery.start_soon(self.transport.receive_loop, OVERLAY, self._deliver)
            await nursery.start(control.serve)
            nursery.start_soon(self._membership_loop)
            nursery.start_soon(self._refresh_record_loop)
            nursery.start_soon(self._discovered_loop)
            await self._seed_membership()
            log.info(
                "agent %s up: underlay %s:%d, overlay %s, control %s",
                self.identity.node_id,
                *self.transport.underlay_address,
                self.overlay_address,
                self.config.control_socket,
            )
            report_started()

    def _migration_target(self) -> tuple[str, str] | None:
        """How another host live-migrates a guest here: our libvirt and our underlay;
        None (no live hand-off in or out) if peers would refuse that libvirt URI."""
        from node.market.handoff import check_migration_uri

        uri = self.config["vm.migration_uri"] or self.config["vm.libvirt_uri"]
        try:
            check_migration_uri(uri)
        except RemoteProtocolError as exc:
            log.info("no live hand-off of guests: %s (set vm.migration_uri)", exc)
            return None
        return uri, self.transport.underlay_address[0]

    def _start_market(self) -> None:
        assert self.segments is not None
        edges = Edges(
            self._send_market,
            self._send_ledger,
            self.live_members,
            self.block_endpoint,
            self._helper_pids,
            self.routes if self.overlay is not None else None,  # network jobs need an overlay
            self._migration_target() if self.overlay is not None else None,
        )
        market = MarketSide.build(
            self.config, self.identity, self.swarm_id, self.state, self.segments, edges
        )
        self.market = market
        self.ledger, self.host_market = market.ledger, market.host_market
        self.policy, self.owner_market = market.policy, market.owner_market

    def _helper_pids(self) -> list[int]:
        pid = self.overlay.process.pid if self.overlay is not None else None
        return [pid] if pid else []

    async def _send_market(self, target: NodeId, kind: int, blob: bytes) -> None:
        body = {"kind": int(kind), "blob": blob}
        await self._send_to_member(SendMessage(target, MessageType.MARKET, body))

    async def _send_ledger(self, target: NodeId, kind: int, blob: bytes) -> None:
        body = {"kind": int(kind), "blob": blob}
        await self._send_to_member(SendMessage(target, MessageType.LEDGER, body))

    def live_members(self) -> list[NodeId]:
        if self.membership is None:
            return []
        return [m.node_id for m in self.membership.members() if m.state is MemberState.ALIVE]

    def block_endpoint(self, node: NodeId) -> tuple[str, int] | None:
        """Where ``node`` serves blocks: its overlay address (or, without an overlay, its
        underlay host), on the swarm's block port."""
        port = self.config["network.block_port"]
        if node == self.identity.node_id:
            return self.segments.listen if self.segments else None
        member = self.membership.member(node) if self.membership else None
        if member is None:
            return None
        if self.overlay is not None:
            return (member.record.overlay_address, port)
        if not member.record.endpoints:
            return None
        return (parse_endpoint(member.record.endpoints[0])[0], port)

    def _membership_config(self) -> MembershipConfig:
        probe = self.config["membership.probe_interval_s"]
        return MembershipConfig(
            probe_interval_s=probe,
            probe_timeout_s=probe / 2,
            gossip_interval_s=self.config["membership.gossip_interval_s"],
        )

    async def _start_overlay(self) -> None:
        from overlay.wireguard.service import OverlayService

        self.overlay = OverlayService(
            self.identity,
            self.swarm_id,
            self.config["network.wireguard_port"],
            self.config.state_dir,
            self.config["overlay.eager_limit"],
            self.config["overlay.idle_expiry_s"],
        )
        await trio.to_thread.run_sync(self.overlay.start)
        await self.overlay.reconcile()
        await self.transport.open_overlay(self.overlay_address)

    async def _seed_membership(self) -> None:
        now = time.time()
        for blob in await trio.to_thread.run_sync(self.state.peer_records):
            try:
                record = decode_record(blob)
            except RemoteProtocolError:
                continue
            if not record.is_expired(now):
                await self._handle(RecordDiscovered(record))
        bootstrap = tuple(self.config["network.bootstrap"])
        if bootstrap:
            await self._handle(JoinRequested(bootstrap))
        if self.config["network.mdns"]:
            await self._start_mdns()

    async def _start_mdns(self) -> None:
        host = self.transport.underlay_address[0]
        if host in ("0.0.0.0", "", "::") or ":" in host:
            log.warning("mDNS needs a specific IPv4 listen address; discovery on the LAN is off")
            return
        assert self.record is not None
        discovery = MdnsDiscovery(host, self._record_from_thread)
        await trio.to_thread.run_sync(
            discovery.start, self.identity.node_id.short, self.record.blob, self.transport.port
        )
        self.discovery = discovery

    def _record_from_thread(self, blob: bytes) -> None:
        """Called from zeroconf's threads: hand the blob to trio without blocking them."""
        if self._token is None:
            return
        try:
            trio.from_thread.run_sync(self._discovered[0].send_nowait, blob, trio_token=self._token)
        except (trio.WouldBlock, trio.RunFinishedError, trio.ClosedResourceError):
            pass

    async def _discovered_loop(self) -> None:
        async for blob in self._discovered[1]:
            try:
                record = decode_record(blob)
            except RemoteProtocolError:
                self.record_errors += 1
                continue
            if record.node_id != self.identity.node_id and not record.is_expired(time.time()):
                await self._handle(RecordDiscovered(record))

    async def _stop_edges(self) -> None:
        if self.discovery is not None:
            await trio.to_thread.run_sync(self.discovery.stop)
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

    # -- our peer record -----------------------------------------------------------

    def advertised_endpoints(self) -> tuple[str, ...]:
        configured = tuple(self.config["network.advertise"])
        if configured:
            return configured
        host, port = self.transport.underlay_address
        if host in ("0.0.0.0", "::", ""):
            return ()
        return (f"[{host}]:{port}" if ":" in host else f"{host}:{port}",)

    async def _sign_record(self, min_seq: int) -> PeerRecord:
        # Persist the new sequence number before the record can leave the process.
        seq = await trio.to_thread.run_sync(self.state.raise_counter, RECORD_SEQ_KEY, min_seq)
        return sign_record(
            self.identity,
            endpoints=self.advertised_endpoints(),
            overlay_address=str(self.overlay_address),
            capabilities=local_capabilities(),
            version=__version__,
            seq=seq,
            expires=int(time.time()) + self.config["record.lifetime_s"],
            wg_port=self.config["network.wireguard_port"],
        )

    async def _resign(self, min_seq: int) -> None:
        self.record = await self._sign_record(min_seq)
        await self._handle(OwnRecordSigned(self.record))
        if self.discovery is not None:
            await trio.to_thread.run_sync(self.discovery.update, self.record.blob)

    async def _refresh_record_loop(self) -> None:
        while True:
            await trio.sleep(self.config["record.lifetime_s"] / 3)
            await self._resign(0)

    # -- membership ----------------------------------------------------------------

    async def _membership_loop(self) -> None:
        assert self.membership is not None
        while True:
            await self._execute(self.membership.tick(time.time()))
            delay = self.membership.next_wakeup() - time.time()
            if delay > 0:
                with trio.move_on_after(min(delay, 1.0)):
                    await self._wake.wait()
                self._wake = trio.Event()

    async def _handle(self, event: Any) -> None:
        assert self.membership is not None
        await self._execute(self.membership.handle(event, time.time()))
        self._wake.set()

    async def _deliver(self, envelope: Envelope, via: str, origin: tuple[str, int]) -> None:
        if envelope.type in MEMBERSHIP_TYPES:
            host, port = origin
            endpoint = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            if self.overlay is not None:
                self.overlay.mark_used(envelope.sender, time.time())
            await self._handle(
                MessageReceived(envelope.sender, envelope.type, envelope.body, endpoint)
            )
        elif envelope.type in (MessageType.MARKET, MessageType.LEDGER):
            assert self.market is not None
            await self.market.deliver(envelope)
        elif envelope.type is MessageType.RECORD:
            try:
                record = decode_record(envelope.body["record"])
            except RemoteProtocolError:
                self.record_errors += 1
                return
            await self._handle(RecordDiscovered(record))

    async def _execute(self, effects: list[Effect]) -> None:
        for effect in effects:
            if isinstance(effect, SendMessage):
                await self._send_to_member(effect)
            elif isinstance(effect, SendToEndpoint):
                await self._send_to_endpoint(effect)
            elif isinstance(effect, MemberChanged):
                await self._member_changed(effect)
            elif isinstance(effect, RefreshOwnRecord):
                await self._resign(effect.min_seq)
            elif isinstance(effect, BroadcastReceived) and effect.topic == ROUTE_TOPIC:
                assert self.routes is not None
                await self.routes.offer(effect.payload)

    async def _send_to_member(self, effect: SendMessage) -> None:
        now = time.time()
        if self.overlay is not None:
            self.overlay.mark_used(effect.target, now)
            if self.overlay.has_session(effect.target, now):
                await self.transport.send_overlay(effect.target, effect.msg_type, effect.body)
                return
        assert self.membership is not None
        member = self.membership.member(effect.target)
        if member is not None and member.record.endpoints:
            await self.transport.send_underlay(
                member.record.endpoints[0], effect.msg_type, effect.body
            )

    async def _send_to_endpoint(self, effect: SendToEndpoint) -> None:
        host = effect.endpoint.rpartition(":")[0].strip("[]")
        if ":" in host:  # an overlay source: answer over the overlay socket
            await self.transport.send_overlay_to(host, effect.msg_type, effect.body)
        else:
            await self.transport.send_underlay(effect.endpoint, effect.msg_type, effect.body)

    async def _member_changed(self, effect: MemberChanged) -> None:
        log.info(
            "member %s is %s (seq %d)", effect.node_id.short, effect.state.value, effect.record.seq
        )
        if effect.state in (MemberState.ALIVE, MemberState.SUSPECT):
            if self.overlay is not None:
                self.overlay.set_member(effect.record)
            record = effect.record
            await trio.to_thread.run_sync(
                self.state.save_peer, record.node_id.key, record.seq, record.expires, record.blob
            )
        else:
            if self.overlay is not None:
                self.overlay.remove_member(effect.node_id)
            gone = effect.state in (MemberState.DEAD, MemberState.LEFT)
            if gone and self.owner_market is not None:
                await self.owner_market.member_lost(effect.node_id)

    async def _spread(self, key: bytes, payload: bytes) -> None:
        """Spread a route update: push it to every live member now, and gossip it."""
        assert self.membership is not None
        self.membership.enqueue_broadcast(ROUTE_TOPIC, key, payload)
        update = encode_update(Broadcast(ROUTE_TOPIC, key, payload))
        limit = self.config["overlay.eager_limit"]
        live = [m for m in self.membership.members() if m.state is MemberState.ALIVE][:limit]
        for member in live:
            await self._send_to_member(
                SendMessage(member.node_id, MessageType.GOSSIP, {"updates": [update]})
            )
        self._wake.set()

    # -- control RPC -----------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        record = self.record
        stats = self.transport.stats
        membership = self.membership.statistics() if self.membership else {}
        return {
            "node_id": str(self.identity.node_id),
            "short_id": self.identity.node_id.short,
            "name": self.config["node.name"],
            "version": __version__,
            "swarm_id": self.swarm_id,
            "pid": os.getpid(),
            "uptime_s": round(time.monotonic() - self.started_monotonic, 3),
            "started_at": self.started_wall,
            "underlay": list(self.advertised_endpoints()),
            "listen": "{}:{}".format(*self.transport.underlay_address),
            "overlay_address": str(self.overlay_address),
            "overlay_interface": self.overlay.ifname if self.overlay else None,
            "wireguard_pid": self.overlay.process.pid if self.overlay else None,
            "wireguard_public_key": self.identity.wireguard_public.hex(),
            "peer_count": self.membership.alive_count() if self.membership else 0,
            "record_seq": record.seq if record else 0,
            "boot": self.boot,
            "frames_in": sum(stats.frames_in.values()),
            "frames_out": sum(stats.frames_out.values()),
            "protocol_errors": stats.protocol_errors_total + self.record_errors,
            "protocol_errors_by_peer": dict(stats.protocol_errors.most_common(20)),
            "membership": membership,
            "policy": self.policy.status() if self.policy else None,
            "state_dir": str(self.config.state_dir),
        }

    def peers(self) -> list[dict[str, Any]]:
        assert self.membership is not None
        rows = []
        for member in sorted(self.membership.members(), key=lambda m: str(m.node_id)):
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

    async def _vm_rpc(self, method: str, params: dict[str, Any]) -> Any:
        from node.runtime.vm_service import VmService, VmServiceError

        assert self.routes is not None
        service = VmService(
            self.config["vm.libvirt_uri"],
            self.image_store,
            self.config.state_dir / "vms",
            self.routes,
        )
        try:
            if method == "vm_start":
                return await service.start(params)
            if method == "vm_migrate":
                return await service.migrate(params)
            return await service.expect(params)
        except (VmServiceError, RoutingError) as exc:
            raise RpcError(str(exc)) from None

    async def _rpc(self, method: str, params: dict[str, Any]) -> Any:
        if method == "status":
            return self.status()
        if method == "peers":
            if self.overlay is not None:
                await self.overlay.refresh()
            return self.peers()
        if method == "peer_record":
            return self.record.blob if self.record else b""
        if method == "routes":
            assert self.routes is not None
            return self.routes.view()
        if method == "segment_run":
            assert self.segments is not None
            try:
                return await self.segments.run_segment(params)
            except SegmentError as exc:
                raise RpcError(str(exc)) from None
        if method in MARKET_METHODS:
            return await market_rpc(self, method, params)
        if method in ("vm_start", "vm_migrate", "vm_expect"):
            return await self._vm_rpc(method, params)
        if method == "vm_attach":
            assert self.routes is not None
            try:
                return await self.routes.attach(
                    _param(params, "grant", bytes),
                    _param(params, "device", str),
                    _param(params, "gateway", str),
                )
            except RoutingError as exc:
                raise RpcError(str(exc)) from None
        raise RpcError(f"unknown method {method!r}")


def _param(params: dict[str, Any], name: str, kind: type) -> Any:
    value = params.get(name)
    if not isinstance(value, kind):
        raise RpcError(f"parameter {name!r} must be {kind.__name__}")
    return value


async def run_agent(
    config: Config, *, task_status: trio.TaskStatus[Agent] = trio.TASK_STATUS_IGNORED
) -> None:
    """Open everything the agent needs, run it until cancelled or signalled, close it all."""
    from node.runtime.keystore import load_or_create

    identity = await trio.to_thread.run_sync(load_or_create, config.state_dir)
    state = await trio.to_thread.run_sync(State, config.state_dir / "state.db")
    try:
        agent = Agent(config, identity, state)
        async with trio.open_nursery() as nursery:
            await nursery.start(agent.run)
            task_status.started(agent)
    finally:
        state.close()
