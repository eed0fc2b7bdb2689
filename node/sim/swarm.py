"""A simulated swarm: n real membership cores and route tables over the network model.

Theory of operation
-------------------
Each ``SimNode`` holds what an agent holds for these protocols: an identity,
its signed ``PeerRecord``, a ``node.membership.swim.Membership`` core and an
``overlay.routes.RouteTable``. The ``Swarm`` plays the agent's effect
interpreter (node/runtime/membership_driver.py), against models instead of sockets:

- ``SendMessage`` / ``SendToEndpoint`` go through ``Network.transit``; a message
  that survives is scheduled as a ``MessageReceived`` at the target after its
  delay. The body is handed over as the dict the wire decoder would produce
  (the codec itself is not run; its size is, see node/sim/network.py).
- ``RefreshOwnRecord``: the node re-signs its record with the asked seq at
  once (persisting takes no simulated time) and feeds ``OwnRecordSigned`` back.
- ``DeliverBroadcast`` on the route topic is offered to the node's route
  table, as the agent does; ``spread_route`` is the agent's ``_spread``:
  enqueue the broadcast and push it at once to the first ``eager_limit`` ALIVE
  members.
- ``ApplyMemberChange`` and route changes are passed to observers (the studies).

Timers: after every event a node handles, its ``next_wakeup()`` is compared
with the one wakeup it has pending; if they differ, the new one is scheduled
and replaces it (the old entry stays in the heap but is ignored when it comes
up, because it no longer matches ``wake_at``). So a probe's ACK deadline that
the ACK made moot costs a heap pop, not a tick. Simulated time is Unix time from ``EPOCH``,
so the cores see the ``now`` they expect and records expire as they would.

Sharing: every core decodes records through one cache of verified records
(``KeyRing.decode``), so a signature is checked once per distinct blob in the
whole simulation, not once per node; a converged swarm is seeded from one
shared ``Roster``. Verification costs no simulated time in any case.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from node.base.identity import Identity, NodeId
from node.base.records import Capabilities, PeerRecord, decode_record, sign_record
from node.base.wire import MessageType, RemoteProtocolError
from node.membership.codec import Broadcast, encode_update
from node.membership.config import MembershipConfig
from node.membership.events import (
    ApplyMemberChange,
    DeliverBroadcast,
    Effect,
    JoinRequested,
    LeaveRequested,
    MessageReceived,
    OwnRecordSigned,
    RefreshOwnRecord,
    SendMessage,
    SendToEndpoint,
)
from node.membership.swim import Membership
from node.membership.table import MemberState, Roster
from node.sim.engine import Simulator
from node.sim.network import Network, frame_size
from overlay.routes import ROUTE_TOPIC, ApplyRoute, RouteTable

EPOCH = 1_800_000_000.0
RECORD_LIFETIME_S = 10_000_000
WAKE = "wake"
DEFAULT_EAGER_LIMIT = 64

MemberObserver = Callable[[float, int, ApplyMemberChange], None]
RouteObserver = Callable[[float, int, ApplyRoute], None]


class KeyRing:
    """Identities and signed records for node numbers, made once and shared.

    Keys come from a seeded stream, so node i has the same key in every run of
    a seed; ``decode`` is the record decoder every core shares (one signature
    check per distinct blob).
    """

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self.identities: list[Identity] = []
        self.records: list[PeerRecord] = []
        self._verified: dict[bytes, PeerRecord] = {}
        self.signature_checks = 0

    def ensure(self, count: int) -> None:
        while len(self.identities) < count:
            index = len(self.identities)
            identity = Identity.from_seeds(self._rng.randbytes(32), self._rng.randbytes(32))
            self.identities.append(identity)
            self.records.append(self.sign(identity, index, seq=1))

    def sign(self, identity: Identity, index: int, seq: int) -> PeerRecord:
        record = sign_record(
            identity,
            endpoints=(endpoint_of(index),),
            overlay_address="",
            capabilities=Capabilities(),
            version="sim",
            seq=seq,
            expires=int(EPOCH) + RECORD_LIFETIME_S,
        )
        self._verified[record.blob] = record
        return record

    def decode(self, blob: bytes) -> PeerRecord:
        record = self._verified.get(blob)
        if record is None:
            self.signature_checks += 1
            record = decode_record(blob)
            self._verified[blob] = record
        return record


def endpoint_of(index: int) -> str:
    return f"10.{index >> 16 & 255}.{index >> 8 & 255}.{index & 255}:7946"


@dataclass(slots=True)
class SimNode:
    index: int
    identity: Identity
    record: PeerRecord
    core: Membership
    routes: RouteTable
    node_id: NodeId
    endpoint: str
    wake_at: float = math.inf
    route_refusals: int = 0
    epochs: dict[Any, int] = field(default_factory=dict)  # per address: the highest epoch seen


class Swarm:
    """The nodes of one simulation and the interpreter of their effects."""

    def __init__(
        self,
        sim: Simulator,
        network: Network,
        keys: KeyRing,
        config: MembershipConfig,
        swarm_id: str = "sim",
        eager_limit: int = DEFAULT_EAGER_LIMIT,
    ) -> None:
        self.sim = sim
        self.network = network
        self.keys = keys
        self.config = config
        self.swarm_id = swarm_id
        self.eager_limit = eager_limit
        self.nodes: list[SimNode] = []
        self.by_id: dict[NodeId, int] = {}
        self.by_endpoint: dict[str, int] = {}
        self.member_observers: list[MemberObserver] = []
        self.route_observers: list[RouteObserver] = []
        self.touched: list[int] = []
        self.late_wakeups = 0
        self._rngs = sim.fork("cores")

    # -- building --------------------------------------------------------------------

    def add_node(self) -> SimNode:
        """A new node (number = position in ``nodes``), not yet started."""
        index = self.network.add_node()
        self.keys.ensure(index + 1)
        identity, record = self.keys.identities[index], self.keys.records[index]
        core, routes = self._new_core(record), self._new_routes(identity)
        node = SimNode(index, identity, record, core, routes, identity.node_id, endpoint_of(index))
        self.nodes.append(node)
        self.by_id[identity.node_id] = index
        self.by_endpoint[endpoint_of(index)] = index
        return node

    def _new_core(self, record: PeerRecord) -> Membership:
        rng = random.Random(self._rngs.getrandbits(64))
        return Membership(record, self.config, rng, record_decoder=self.keys.decode)

    def _new_routes(self, identity: Identity) -> RouteTable:
        return RouteTable(self.swarm_id, identity.node_id)

    def seed_converged(self, members: list[int], now: float) -> None:
        """Every node in `members` knows every other as ALIVE (one shared roster) and starts."""
        roster = Roster([self.nodes[i].record for i in members], now)
        for index in members:
            self.nodes[index].core.seed(roster, now)
            self.wake(index, now)

    def start(self, index: int, now: float) -> None:
        self.wake(index, now)

    # -- control (churn, studies) ------------------------------------------------------

    def join(self, index: int, via: int, now: float) -> None:
        """`index` joins through the endpoint of `via` (a bootstrap JOIN)."""
        self.network.up[index] = True
        node = self.nodes[index]
        self.carry_out(node, node.core.handle(JoinRequested((endpoint_of(via),)), now), now)
        self._schedule_wake(node, now)

    def crash(self, index: int) -> None:
        """The node stops: no sends, no receipts, no timers."""
        self.network.up[index] = False
        self.nodes[index].wake_at = math.inf

    def leave(self, index: int, now: float) -> None:
        """The node leaves gracefully (LEFT is gossiped), then stops after one second."""
        node = self.nodes[index]
        self.carry_out(node, node.core.handle(LeaveRequested(), now), now)
        self._schedule_wake(node, now)
        seq = node.record.seq  # a restart within the second must not be stopped
        self.sim.at(now + 1.0, index, lambda when: self._stop_if(index, seq))

    def _stop_if(self, index: int, seq: int) -> None:
        if self.nodes[index].record.seq == seq:
            self.crash(index)

    def restart(self, index: int, via: int, now: float) -> None:
        """A crashed node comes back with a fresh core and a higher seq, and joins via `via`."""
        node = self.nodes[index]
        record = self.keys.sign(node.identity, index, node.record.seq + 1)
        node.record, node.core, node.wake_at = record, self._new_core(record), math.inf
        self.join(index, via, now)

    def spread_route(self, index: int, key: bytes, blob: bytes, now: float) -> None:
        """The agent's ``_spread``: queue the broadcast, push it to the first ALIVE members."""
        node = self.nodes[index]
        node.core.enqueue_broadcast(ROUTE_TOPIC, key, blob)
        update = encode_update(Broadcast(ROUTE_TOPIC, key, blob))
        alive = [m for m in node.core.members() if m.state is MemberState.ALIVE]
        pushes: list[Effect] = [
            SendMessage(member.node_id, MessageType.GOSSIP, {"updates": [update]})
            for member in alive[: self.eager_limit]
        ]
        self.carry_out(node, pushes, now)
        self._schedule_wake(node, now)

    def apply_route_changes(self, node: SimNode, changes: list[ApplyRoute], now: float) -> None:
        for change in changes:
            for observer in self.route_observers:
                observer(now, node.index, change)
        self.touched.append(node.index)

    # -- the interpreter ---------------------------------------------------------------

    def deliver(self, now: float, index: Any, event: Any) -> None:
        """The simulator's callback: one event for node `index`."""
        node = self.nodes[index]
        if event is WAKE:
            if now != node.wake_at:
                return  # replaced by an earlier wakeup, or the node crashed
            node.wake_at = math.inf
            if not self.network.up[index]:
                return
            effects = node.core.tick(now)
            self.carry_out(node, effects, now)
            self._schedule_wake(node, now, ticked=True)
            self.touched.append(index)
            return
        elif type(event) is tuple:
            message, size = event
            if not self.network.arrived(index, size):
                return
            effects = node.core.handle(message, now)
        else:
            event(now)
            return
        self.carry_out(node, effects, now)
        self._schedule_wake(node, now)
        self.touched.append(index)

    def carry_out(self, node: SimNode, effects: list[Effect], now: float) -> None:
        for effect in effects:
            if isinstance(effect, SendMessage):
                self._send(node, self.by_id.get(effect.target), effect.msg_type, effect.body, now)
            elif isinstance(effect, SendToEndpoint):
                target = self.by_endpoint.get(effect.endpoint)
                self._send(node, target, effect.msg_type, effect.body, now)
            elif isinstance(effect, ApplyMemberChange):
                for observer in self.member_observers:
                    observer(now, node.index, effect)
            elif isinstance(effect, RefreshOwnRecord):
                seq = max(effect.min_seq, node.record.seq + 1)
                node.record = self.keys.sign(node.identity, node.index, seq)
                self.carry_out(node, node.core.handle(OwnRecordSigned(node.record), now), now)
            elif isinstance(effect, DeliverBroadcast) and effect.topic == ROUTE_TOPIC:
                try:
                    changes = node.routes.offer(effect.payload, now)
                except RemoteProtocolError:
                    node.route_refusals += 1
                    continue
                self.apply_route_changes(node, changes, now)

    def _send(
        self,
        node: SimNode,
        target: int | None,
        msg_type: MessageType,
        body: dict[str, Any],
        now: float,
    ) -> None:
        if target is None:
            return  # an endpoint nobody has: lost
        size = frame_size(body)
        delay = self.network.transit(node.index, target, size, now)
        if delay is not None:
            message = MessageReceived(node.node_id, msg_type, body, node.endpoint)
            self.sim.at(now + delay, target, (message, size))

    def wake(self, index: int, now: float) -> None:
        self._schedule_wake(self.nodes[index], now)

    def _schedule_wake(self, node: SimNode, now: float, ticked: bool = False) -> None:
        wakeup = node.core.next_wakeup()
        if wakeup == node.wake_at:
            return
        if ticked and wakeup <= now:  # a tick left work due now: never loop at one instant
            self.late_wakeups += 1
            wakeup = now + 1e-6
        node.wake_at = max(wakeup, now)
        self.sim.at(node.wake_at, node.index, WAKE)
