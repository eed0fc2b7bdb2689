"""The membership driver: feeds frames, timers and discovered records to the
``Membership`` core (node/membership/swim.py) and carries out its effects.

``run`` is the core's clock: it runs ``tick`` at the core's ``next_wakeup`` (at
least once a second, or sooner when an event woke it) and carries out what the
core returns. Membership frames come in through ``deliver`` (from
node/runtime/transport.py); RECORD frames, records persisted by an earlier run,
the bootstrap list and mDNS (node/runtime/discovery.py, whose threads hand
records over a memory channel) become ``RecordDiscovered`` or ``JoinRequested``.
A record that does not decode is counted (``record_errors``) and dropped.

Effects, each carried out in order (``_execute`` matches them exhaustively):

- ``SendMessage``: over the overlay when WireGuard has a fresh session with the
  member, else over the underlay to its first advertised endpoint;
- ``SendToEndpoint``: an answer to where a frame came from (an IPv6 source is
  an overlay address: answer over the overlay socket);
- ``ApplyMemberChange``: a live member's record goes to the overlay and is
  persisted; one that is gone leaves the overlay, and whoever subscribed with
  ``on_member_lost`` (the owner's market) hears of a DEAD or LEFT one;
- ``RefreshOwnRecord``: our record is re-signed (node/runtime/own_record.py),
  which comes back as ``OwnRecordSigned``;
- ``DeliverBroadcast``: the payload goes to the handler of its topic
  (``on_broadcast``: the route service's ``route`` topic); other topics are ignored.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any, assert_never

import trio

from node.base.identity import Identity, NodeId
from node.base.records import PeerRecord, decode_record
from node.base.wire import Envelope, MessageType, RemoteProtocolError
from node.membership.codec import Broadcast, encode_update
from node.membership.config import MembershipConfig
from node.membership.events import (
    ApplyMemberChange,
    DeliverBroadcast,
    Effect,
    Event,
    JoinRequested,
    MessageReceived,
    OwnRecordSigned,
    RecordDiscovered,
    RefreshOwnRecord,
    SendMessage,
    SendToEndpoint,
)
from node.membership.swim import Membership
from node.membership.table import MemberState
from node.runtime.config import Config
from node.runtime.discovery import Discovery, DiscoveryFactory
from node.runtime.own_record import OwnRecord
from node.runtime.state import State
from node.runtime.transport import Transport
from overlay.wireguard.service import OverlayService

log = logging.getLogger("gleaner.agent")

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

SendFrame = Callable[[NodeId, int, bytes], Awaitable[None]]
BroadcastHandler = Callable[[bytes], Awaitable[None]]
LostHandler = Callable[[NodeId], Awaitable[None]]


def membership_config(config: Config) -> MembershipConfig:
    probe = config["membership.probe_interval_s"]
    return MembershipConfig(
        probe_interval_s=probe,
        probe_timeout_s=probe / 2,
        gossip_interval_s=config["membership.gossip_interval_s"],
    )


class MembershipDriver:
    def __init__(
        self,
        identity: Identity,
        config: Config,
        state: State,
        transport: Transport,
        overlay: OverlayService | None,
        own: OwnRecord,
        rng: random.Random,
        make_discovery: DiscoveryFactory,
    ) -> None:
        """`make_discovery(host, on_record)` builds the LAN discovery (mDNS, or its twin)."""
        assert own.record is not None, "sign our record before starting membership"
        self.identity = identity
        self.config = config
        self.state = state
        self.transport = transport
        self.overlay = overlay
        self.own = own
        self.make_discovery = make_discovery
        self.core = Membership(own.record, membership_config(config), rng)
        self.discovery: Discovery | None = None
        self.record_errors = 0
        self._on_broadcast: dict[str, BroadcastHandler] = {}
        self._on_lost: list[LostHandler] = []
        self._wake = trio.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._discovered: tuple[trio.MemorySendChannel[bytes], trio.MemoryReceiveChannel[bytes]]
        self._discovered = trio.open_memory_channel(256)
        own.subscribe(self._own_record_signed)

    def on_broadcast(self, topic: str, handler: BroadcastHandler) -> None:
        """Broadcasts of ``topic`` that reach us are handed to ``handler``."""
        self._on_broadcast[topic] = handler

    def on_member_lost(self, handler: LostHandler) -> None:
        """``handler`` hears of every member found DEAD or LEFT."""
        self._on_lost.append(handler)

    # -- running ---------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The core's clock and the records mDNS hears; ready once the core is seeded."""
        self._token = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._tick_loop)
            nursery.start_soon(self._discovered_loop)
            await self._seed()
            task_status.started()

    async def stop(self) -> None:
        if self.discovery is not None:
            await trio.to_thread.run_sync(self.discovery.stop)

    async def _tick_loop(self) -> None:
        while True:
            await self._execute(self.core.tick(time.time()))
            delay = self.core.next_wakeup() - time.time()
            if delay > 0:
                with trio.move_on_after(min(delay, 1.0)):
                    await self._wake.wait()
                self._wake = trio.Event()

    async def handle(self, event: Event) -> None:
        await self._execute(self.core.handle(event, time.time()))
        self._wake.set()

    async def _own_record_signed(self, record: PeerRecord) -> None:
        await self.handle(OwnRecordSigned(record))

    # -- records from outside ----------------------------------------------------------

    async def _seed(self) -> None:
        now = time.time()
        for blob in await trio.to_thread.run_sync(self.state.peer_records):
            try:
                record = decode_record(blob)
            except RemoteProtocolError:
                continue
            if not record.is_expired(now):
                await self.handle(RecordDiscovered(record))
        bootstrap = tuple(self.config["network.bootstrap"])
        if bootstrap:
            await self.handle(JoinRequested(bootstrap))
        if self.config["network.mdns"]:
            await self._start_mdns()

    async def _start_mdns(self) -> None:
        host = self.transport.underlay_address[0]
        if host in ("0.0.0.0", "", "::") or ":" in host:
            log.warning("mDNS needs a specific IPv4 listen address; discovery on the LAN is off")
            return
        assert self.own.record is not None
        discovery = self.make_discovery(host, self._record_from_thread)
        await trio.to_thread.run_sync(
            discovery.start, self.identity.node_id.short, self.own.record.blob, self.transport.port
        )
        self.discovery = discovery

        async def announce(record: PeerRecord) -> None:
            await trio.to_thread.run_sync(discovery.update, record.blob)

        self.own.subscribe(announce)

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
                await self.handle(RecordDiscovered(record))

    async def deliver(self, envelope: Envelope, origin: tuple[str, int]) -> None:
        """A membership or RECORD frame; frames of other types are not ours."""
        if envelope.type in MEMBERSHIP_TYPES:
            host, port = origin
            endpoint = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            if self.overlay is not None:
                self.overlay.mark_used(envelope.sender, time.time())
            await self.handle(
                MessageReceived(envelope.sender, envelope.type, envelope.body, endpoint)
            )
        elif envelope.type is MessageType.RECORD:
            try:
                record = decode_record(envelope.body["record"])
            except RemoteProtocolError:
                self.record_errors += 1
                return
            await self.handle(RecordDiscovered(record))

    # -- effects -----------------------------------------------------------------------

    async def _execute(self, effects: list[Effect]) -> None:
        for effect in effects:
            match effect:
                case SendMessage():
                    await self.send_to_member(effect)
                case SendToEndpoint():
                    await self._send_to_endpoint(effect)
                case ApplyMemberChange():
                    await self._member_changed(effect)
                case RefreshOwnRecord():
                    await self.own.resign(effect.min_seq)
                case DeliverBroadcast():
                    handler = self._on_broadcast.get(effect.topic)
                    if handler is not None:
                        await handler(effect.payload)
                case _:
                    assert_never(effect)

    async def send_to_member(self, effect: SendMessage) -> None:
        now = time.time()
        if self.overlay is not None:
            self.overlay.mark_used(effect.target, now)
            if self.overlay.has_session(effect.target, now):
                await self.transport.send_overlay(effect.target, effect.msg_type, effect.body)
                return
        member = self.core.member(effect.target)
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

    async def _member_changed(self, effect: ApplyMemberChange) -> None:
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
            if effect.state in (MemberState.DEAD, MemberState.LEFT):
                for handler in self._on_lost:
                    await handler(effect.node_id)

    # -- what the rest of the agent asks of membership -------------------------------

    def sender(self, msg_type: MessageType) -> SendFrame:
        """Send ``{"kind", "blob"}`` frames of ``msg_type`` (MARKET, LEDGER) to a member."""

        async def send(target: NodeId, kind: int, blob: bytes) -> None:
            body: dict[str, Any] = {"kind": int(kind), "blob": blob}
            await self.send_to_member(SendMessage(target, msg_type, body))

        return send

    async def spread(self, topic: str, key: bytes, payload: bytes) -> None:
        """Spread an update: push it to the first live members now, and gossip it."""
        self.core.enqueue_broadcast(topic, key, payload)
        update = encode_update(Broadcast(topic, key, payload))
        limit = self.config["overlay.eager_limit"]
        live = [m for m in self.core.members() if m.state is MemberState.ALIVE][:limit]
        for member in live:
            await self.send_to_member(
                SendMessage(member.node_id, MessageType.GOSSIP, {"updates": [update]})
            )
        self._wake.set()

    def live_members(self) -> list[NodeId]:
        return [m.node_id for m in self.core.members() if m.state is MemberState.ALIVE]
