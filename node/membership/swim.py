"""Swarm membership: SWIM failure detection with Lifeguard-style suspicion, sans-IO.

Theory of operation
-------------------
``Membership`` is one node's side of the protocol: ``handle(event, now)`` and
``tick(now)`` return effects, ``next_wakeup()`` says when ``tick`` next has work
(a deadline, so nothing needs fixed-rate ticking). Time and randomness come in
as arguments, so a seeded run replays exactly. ``now`` is in Unix seconds (record
expiry is checked against it) and must never go backwards.

The parts live beside this module in node/membership/. SWIM's dissemination half
is the member table with its precedence rules and suspicion deadlines (table.py),
the transmit queue (queue.py) and the update codec (codec.py); the failure
detector's probe rounds, PING_REQ relays and local health are detector.py; the
events and effects are events.py, the settings config.py. This module ties them
together: joining, refutation, gossip and the message handling around them.

*Incarnation is the record's seq.* A node re-signs its record with a higher,
persisted seq whenever it must prove it is alive, so an ALIVE update is the
signed record and certifies itself. SUSPECT and DEAD are unsigned claims by
others, accepted only at the seq we hold (a node can only be accused at an
incarnation we know). DEAD claimed by the node itself is LEFT.

*Probing.* Every probe interval, PING the next live member of a shuffled
round-robin list. No ACK within the probe timeout: PING_REQ to
``indirect_checks`` random ALIVE members, which ping with their own nonce and
forward the ACK with ours, and PING the target once more ourselves (memberlist's
fallback probe, over the same transport). A helper whose ping is not answered
within ``nack_timeout_s`` answers NACK (Lifeguard): "I am reachable, the target
is not". No ACK by the end of the interval: the round failed; after
``probe_rounds`` failed rounds in a row against the same target, SUSPECT. Only
an ACK proves life, and only from the target or a helper we asked.

*Local health (Lifeguard).* A score from 0 to ``local_health_max``: +1 for each
helper that neither ACKed nor NACKed a failed round (or +1 if there was no
helper to ask), +1 when we must refute a suspicion of ourselves, -1 for each
probe that was ACKed. The probe interval and the probe timeout are
(score + 1) times the configured ones: a node that is slow or badly connected
probes less often and waits longer, instead of accusing healthy peers of its
own trouble.

*Suspicion (Lifeguard).* A suspicion becomes DEAD after a timeout that starts at
``suspicion_max_mult`` times SWIM's ``max(suspicion_min_s, suspicion_mult *
log10(n + 1) * probe_interval_s)`` and shrinks to it, logarithmically, as other
accusers confirm: one node with a bad link needs longer to kill a peer than a
swarm that agrees. Whatever we send to a member we hold SUSPECT, DEAD or LEFT
carries that claim first (Lifeguard's buddy system), so it can refute at once.

*Refutation.* Accused at its own seq, the core emits ``RefreshOwnRecord``; the
agent persists a higher seq, re-signs and answers ``OwnRecordSigned``, which the
core spreads as ALIVE. Accused at an older seq, it spreads its record again: the
accuser's view is stale.

*Dissemination.* News is piggybacked on PING, ACK and PING_REQ and sent in
GOSSIP to ``gossip_fanout`` random members (the dead too, until forgotten, so a
falsely killed node hears it) every gossip interval while there is news.

*Joining.* JOIN carries the joiner's record and is answered with a sample of up
to ``join_sample`` records (our own first). Bootstrap JOINs are retried while
we know no live member. A PING from a node we do not know gets an ACK at its
endpoint and a JOIN of ours, and every ``sync_interval_s`` we JOIN a random
member (a bounded form of memberlist's push-pull), so one-sided or lost
knowledge heals without waiting for a record refresh.

Choices beyond the brief, and why
---------------------------------
- Tombstones, the buddy system, retelling a stale accuser, the stranger JOIN
  and the periodic sync: each closes a way a live node could stay unknown or
  dead in someone's view (found by the loss and refutation tests).
- A blob we already hold skips decoding (an Ed25519 check), and the decoder can
  be replaced, so a simulator can share one verified-record cache.
- ``seed(roster, now)`` starts the table from a shared ``Roster`` of verified
  records (a converged swarm); the table then stores only its differences, so a
  simulator holds 10,000 views of 10,000 members in one copy plus the deltas.
- Leaving is final for a core: a later ``OwnRecordSigned`` is kept, not spread.
- ``max_update_bytes`` is 8 KiB, not the 48 KiB ceiling: a big UDP datagram is
  many IP fragments, and losing any one loses all of it.
- Config beyond the brief: ``suspicion_max_mult`` (Lifeguard), ``join_retry_s``,
  ``sync_interval_s``, ``max_update_bytes``.
- At most ``MAX_UPDATES_READ`` updates are read per message: each ALIVE costs a
  signature check, so a flood of them is cut short.
- Lifeguard's local health multiplier and NACKs (message type NACK), as above.
  A NACK piggybacks news like ACK does. Every agent of this protocol version
  sends NACKs, so a prober expects one from every helper (memberlist asks only
  peers that advertise protocol 4 or later; we have one version).
- The fallback PING and ``probe_rounds``: on a lossy link a probe round fails
  with probability about q_d^2 * q_h^k (q_d: a direct round trip is lost, q_h:
  a four-message helper path is), 2.7 % at 20 % independent loss; every false
  suspicion and its refutation is news for the whole swarm, and at 1,000 nodes
  and more that news swamped the gossip (docs/simulator.md). Requiring
  ``probe_rounds`` failed rounds in a row before suspecting makes it the r-th
  power of that, at the cost of r - 1 probe intervals of detection time. The
  default, 2, costs the agent 0.5 s and keeps 1,000 nodes quiet up to ~10 %
  loss; the simulator's lossy studies at 10,000 nodes need 3.
- Claims are queued behind records and broadcasts (the transmit queue's
  tiers), so a join, a refutation or a route claim is never starved by a flood
  of suspicions.

Scale: nothing per tick or per message scans the membership (O(updates) per
message, O(log n) per suspicion); the probe list is reshuffled in O(n) once per
pass of n probes. Only the queries (``members()``) are O(n).

Invariants
----------
- ``SendMessage`` only names members in the table; strangers are answered at
  the endpoint their message came from.
- ``handle`` and ``tick`` never raise on what a peer sent: bad updates and
  messages are dropped and counted in ``statistics()``. They raise
  ``LocalProtocolError`` only for the agent's own mistakes (an ``OwnRecordSigned``
  that is not ours or not newer, a broadcast over the limits).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from typing import Any

from node.base.identity import NodeId
from node.base.records import PeerRecord, decode_record
from node.base.wire import SPECS, LocalProtocolError, MessageType, RemoteProtocolError
from node.membership.codec import (
    ALIVE_PREFIX,
    Alive,
    Broadcast,
    Claim,
    SeenSet,
    UpdateKind,
    check_broadcast,
    decode_update,
    encode_update,
)
from node.membership.config import MembershipConfig
from node.membership.detector import FailureDetector
from node.membership.events import (
    ApplyMemberChange,
    DeliverBroadcast,
    Effect,
    Event,
    JoinRequested,
    LeaveRequested,
    MessageReceived,
    OwnRecordSigned,
    RecordDiscovered,
    RefreshOwnRecord,
    SendMessage,
    SendToEndpoint,
)
from node.membership.random_set import RandomSource
from node.membership.table import Member, MemberState, MemberTable, Roster

JOIN_REPLY_MAX_BYTES = 40 * 1024
MAX_UPDATES_READ = 64
MAX_SEEN_BROADCASTS = 4096
MAX_GREETED = 1024
STAT_NAMES = (  # noqa: SIM905 - the counters statistics() reports
    "messages_in messages_out messages_rejected probes_sent probes_failed acks "
    "indirect_probes fallback_pings probe_retries relays nacks nacks_sent nacks_unexpected "
    "suspicions confirmations deaths leaves refutations updates_in "
    "updates_applied updates_duplicate updates_stale updates_ignored updates_rejected "
    "broadcasts_delivered joins_sent claims_from_strangers"
).split()


class Membership:
    """One node's membership protocol. See the module docstring."""

    def __init__(
        self,
        own_record: PeerRecord,
        config: MembershipConfig,
        rng: RandomSource,
        *,
        record_decoder: Callable[[bytes], PeerRecord] = decode_record,
    ) -> None:
        self.config = config
        self._own = own_record
        self._id = own_record.node_id
        self._rng = rng
        self._decode = record_decoder
        self._stats: Counter[str] = Counter()
        self._out: list[Effect] = []
        self._table = MemberTable(
            self._id,
            rng,
            self._stats,
            lambda node, state, record: self._out.append(ApplyMemberChange(node, state, record)),
            retransmit_mult=config.retransmit_mult,
            dead_reclaim_s=config.dead_reclaim_s,
            suspicion_timeout=config.suspicion_timeout,
            max_accusers=config.indirect_checks,
        )
        self._seen = SeenSet(MAX_SEEN_BROADCASTS)
        self._detector = FailureDetector(
            self._id, config, rng, self._table, self._stats, send=self._send, reply=self._reply
        )
        self._greeted: dict[NodeId, float] = {}
        self._join_endpoints: tuple[str, ...] = ()
        self._refresh_asked = 0
        self._refresh_retry_at = -math.inf
        self._left = False
        self._started = False
        self._next_gossip_at = math.inf
        self._next_join_at = self._next_sync_at = math.inf

    # -- public interface ------------------------------------------------------------

    @property
    def node_id(self) -> NodeId:
        return self._id

    @property
    def own_record(self) -> PeerRecord:
        return self._own

    def handle(self, event: Event, now: float) -> list[Effect]:
        self._start(now)
        if isinstance(event, MessageReceived):
            self._stats["messages_in"] += 1
            try:
                self._on_message(event, now)
            except RemoteProtocolError:
                self._stats["messages_rejected"] += 1
        elif isinstance(event, RecordDiscovered):
            known = event.record.node_id in self._table
            self._learn(event.record, now)
            if not known and event.record.node_id in self._table and not self._left:
                self._send_join(event.record.node_id)
        elif isinstance(event, JoinRequested):
            self._join_endpoints = event.endpoints
            self._join_bootstrap(now)
        elif isinstance(event, OwnRecordSigned):
            if event.record.node_id != self._id or event.record.seq <= self._own.seq:
                raise LocalProtocolError("OwnRecordSigned needs our own record with a higher seq")
            self._own = event.record
            if not self._left:
                self._table.spread(Alive(self._own.blob), self._id)
        elif isinstance(event, LeaveRequested):
            self._left = True
            self._detector.cancel()
            self._table.spread(Claim(UpdateKind.DEAD, self._id, self._own.seq, self._id), self._id)
            self._gossip(now)
        return self._drain()

    def tick(self, now: float) -> list[Effect]:
        self._start(now)
        self._table.expire(now)
        self._probe_tick(now)
        if self._table.queue and now >= self._next_gossip_at:
            self._gossip(now)
        self._detector.expire_relays(now)
        return self._drain()

    def next_wakeup(self) -> float:
        """The earliest time `tick` has work; minus infinity before the first call."""
        if not self._started:
            return -math.inf
        wakeup = min(self._detector.next_wakeup(), self._table.next_deadline())
        if self._table.queue:
            wakeup = min(wakeup, self._next_gossip_at)
        return wakeup

    def seed(self, roster: Roster, now: float) -> None:
        """Know every member of `roster` as ALIVE since `now`, as in a swarm already converged.

        For simulators and tests that start from an agreed membership instead of
        n squared JOIN exchanges: the records are trusted as verified, no news is
        queued, no ``ApplyMemberChange`` reported. Only before the table holds anyone.
        """
        self._table.seed(roster, now)

    def enqueue_broadcast(self, topic: str, key: bytes, payload: bytes) -> None:
        """Spread a broadcast from this node; it replaces a queued one with the same key."""
        check_broadcast(topic, key, payload, LocalProtocolError)
        update = Broadcast(topic, key, payload)
        self._seen.add(update)
        self._table.spread(update)

    def members(self) -> list[Member]:
        """Snapshots of every member this node knows, itself excluded."""
        return self._table.members()

    def member(self, node_id: NodeId) -> Member | None:
        """One member's snapshot (this node's own too); None if unknown."""
        if node_id == self._id:
            state = MemberState.LEFT if self._left else MemberState.ALIVE
            return Member(self._id, self._own, state, self._own.seq, 0.0)
        return self._table.get(node_id)

    def alive_count(self) -> int:
        """Members in state ALIVE, this node excluded."""
        return len(self._table.alive)

    def local_health(self) -> int:
        """Lifeguard's local health score: probe interval and timeout are (score + 1) times."""
        return self._detector.health

    def statistics(self) -> dict[str, int]:
        """Counters (STAT_NAMES) and gauges: members, alive, live, queued_updates, health."""
        table = self._table
        stats = dict.fromkeys(STAT_NAMES, 0) | dict(self._stats)
        stats.update(
            members=len(table.known),
            alive=len(table.alive),
            live=len(table.live),
            queued_updates=len(table.queue),
            local_health=self._detector.health,
        )
        return stats

    # -- messages --------------------------------------------------------------------

    def _on_message(self, message: MessageReceived, now: float) -> None:
        sender, body, kind, via = message.sender, message.body, message.msg_type, message.via
        if sender == self._id:
            raise RemoteProtocolError("message claims to come from this node")
        # Every field is read before anything is applied: a message refused for one bad
        # field changes nothing.
        nonce = _field(body, "nonce", int) if kind in _NONCED else 0
        target = _field(body, "target", bytes) if kind is MessageType.PING_REQ else b""
        if kind is MessageType.PING_REQ and len(target) != 32:
            raise RemoteProtocolError("PING_REQ target is not a 32-byte id")
        if kind in _GOSSIP_CARRIERS:
            self._apply_updates(_field(body, "updates", list, []), sender, now)
        if kind is MessageType.PING:
            self._reply(sender, via, MessageType.ACK, {"nonce": nonce})
            self._greet_stranger(sender, via, now)
        elif kind is MessageType.ACK:
            self._detector.on_ack(sender, nonce)
        elif kind is MessageType.NACK:
            self._detector.on_nack(sender, nonce)
        elif kind is MessageType.PING_REQ:
            self._detector.on_ping_req(sender, via, nonce, NodeId(target), now)
            self._greet_stranger(sender, via, now)
        elif kind is MessageType.JOIN:
            self._on_join(message, now)
        elif kind is MessageType.JOIN_REPLY:
            for blob in _field(body, "records", list)[: 2 * self.config.join_sample]:
                self._apply_alive(blob, now)
        elif kind is MessageType.RECORD:
            self._apply_alive(_field(body, "record", bytes), now)

    def _reply(self, sender: NodeId, via: str, msg_type: MessageType, body: dict[str, Any]) -> None:
        if sender in self._table:
            self._send(sender, msg_type, body)
            return
        first = []
        seq = self._table.tombstone(sender)
        if seq is not None:  # forgotten as dead: tell it, so it re-signs
            first.append(encode_update(Claim(UpdateKind.DEAD, sender, seq, self._id)))
        self._emit(SendToEndpoint(via, msg_type, self._piggyback(body, first)))

    def _greet_stranger(self, sender: NodeId, via: str, now: float) -> None:
        """A node knows us but we do not know it: JOIN it; its reply brings its record."""
        if sender in self._table or self._table.tombstone(sender) is not None or self._left:
            return
        if now < self._greeted.get(sender, -math.inf):
            return
        self._greeted.pop(sender, None)
        self._greeted[sender] = now + self.config.join_retry_s
        if len(self._greeted) > MAX_GREETED:
            del self._greeted[next(iter(self._greeted))]
        self._stats["joins_sent"] += 1
        self._emit(SendToEndpoint(via, MessageType.JOIN, {"record": self._own.blob}))

    def _on_join(self, message: MessageReceived, now: float) -> None:
        record = self._decode_record(_field(message.body, "record", bytes))
        if record is None:
            return
        if record.node_id != message.sender:
            self._stats["updates_rejected"] += 1
            raise RemoteProtocolError("JOIN carries another node's record")
        self._learn(record, now)
        if message.sender not in self._table:  # refused: expired, or a tombstoned seq
            if self._table.tombstone(message.sender) is not None:
                self._reply(message.sender, message.via, MessageType.GOSSIP, {})
            return
        blobs, size = [self._own.blob], len(self._own.blob)
        table = self._table
        for node in table.alive.sample(self._rng, self.config.join_sample - 1, (message.sender,)):
            held = table.record_of(node)
            if not held.is_expired(now) and size + len(held.blob) <= JOIN_REPLY_MAX_BYTES:
                blobs.append(held.blob)
                size += len(held.blob)
        self._send(message.sender, MessageType.JOIN_REPLY, {"records": blobs})

    def _send_join(self, target: NodeId) -> None:
        self._stats["joins_sent"] += 1
        self._send(target, MessageType.JOIN, {"record": self._own.blob})

    def _join_bootstrap(self, now: float) -> None:
        self._next_join_at = now + self.config.join_retry_s
        for endpoint in self._join_endpoints:
            self._stats["joins_sent"] += 1
            self._emit(SendToEndpoint(endpoint, MessageType.JOIN, {"record": self._own.blob}))

    # -- updates ---------------------------------------------------------------------

    def _apply_updates(self, updates: list[Any], sender: NodeId, now: float) -> None:
        self._stats["updates_in"] += len(updates)
        self._stats["updates_rejected"] += max(0, len(updates) - MAX_UPDATES_READ)
        for data in updates[:MAX_UPDATES_READ]:
            if isinstance(data, bytes) and data[:2] == ALIVE_PREFIX and self._holds(data):
                self._stats["updates_duplicate"] += 1  # the common case, without decoding
                continue
            try:
                update = decode_update(data)
            except RemoteProtocolError:
                self._stats["updates_rejected"] += 1
                continue
            if isinstance(update, Alive):
                self._apply_alive(update.blob, now)
            elif isinstance(update, Claim) and update.node == self._id:
                self._answer_claim(update.incarnation, now)
            elif isinstance(update, Claim) and sender not in self._table.live:
                self._stats["claims_from_strangers"] += 1  # only members may accuse others
            elif isinstance(update, Claim):
                self._table.accuse(update, now)
            elif self._seen.add(update):
                self._stats["broadcasts_delivered"] += 1
                self._emit(DeliverBroadcast(update.topic, update.key, update.payload, sender))
                self._table.spread(update)
            else:
                self._stats["updates_duplicate"] += 1

    def _apply_alive(self, blob: object, now: float) -> None:
        if isinstance(blob, bytes) and self._holds(blob):
            self._stats["updates_duplicate"] += 1
            return
        record = self._decode_record(blob)
        if record is not None:
            self._learn(record, now)

    def _holds(self, data: bytes) -> bool:
        """`data` is, or is an ALIVE update of, a record we hold: skip the signature check."""
        return data.endswith(self._own.blob) or self._table.holds(data)

    def _decode_record(self, blob: object) -> PeerRecord | None:
        try:
            if not isinstance(blob, bytes):
                raise RemoteProtocolError("record is not bytes")
            return self._decode(blob)
        except RemoteProtocolError:
            self._stats["updates_rejected"] += 1
            return None

    def _learn(self, record: PeerRecord, now: float) -> None:
        if record.node_id != self._id:
            self._table.learn(record, now)
        elif record.seq > self._own.seq:  # a newer record of ours than we hold: a lost
            self._stats["updates_rejected"] += 1  # state directory, or a stolen key
        else:
            self._stats["updates_stale"] += 1

    def _answer_claim(self, incarnation: int, now: float) -> None:
        """Someone says this node is SUSPECT or DEAD at `incarnation`."""
        if self._left:
            self._stats["updates_ignored"] += 1
        elif incarnation < self._own.seq:  # the accuser's view is old: retell our record
            self._stats["updates_stale"] += 1
            self._table.spread(Alive(self._own.blob), self._id)
        elif incarnation > self._own.seq:  # nobody knows our seq better than we do
            self._stats["updates_rejected"] += 1
        elif incarnation + 1 > self._refresh_asked or now >= self._refresh_retry_at:
            self._refresh_asked = incarnation + 1
            self._refresh_retry_at = now + 2 * self.config.probe_interval_s
            self._stats["refutations"] += 1
            # Lifeguard: being suspected hints that we are the slow one
            self._detector.add_health(1)
            self._emit(RefreshOwnRecord(incarnation + 1))
        else:
            self._stats["updates_duplicate"] += 1  # a refresh is already on its way

    # -- timers ----------------------------------------------------------------------

    def _start(self, now: float) -> None:
        if not self._started:
            self._started = True
            self._detector.start(now)
            self._next_gossip_at = now
            self._next_sync_at = now + self._rng.random() * self.config.sync_interval_s

    def _probe_tick(self, now: float) -> None:
        detector = self._detector
        detector.check_ack_deadline(now)
        if now < detector.next_probe_at:
            return
        retry = detector.end_round(now)
        if self._left:
            return
        if self._join_endpoints and not self._table.live and now >= self._next_join_at:
            self._join_bootstrap(now)
        if now >= self._next_sync_at:
            self._next_sync_at = now + self.config.sync_interval_s
            for peer in self._table.alive.sample(self._rng, 1):
                self._send_join(peer)
        detector.start_round(now, retry)

    def _gossip(self, now: float) -> None:
        self._next_gossip_at = now + self.config.gossip_interval_s
        for target in self._table.known.sample(self._rng, self.config.gossip_fanout):
            body = self._piggyback({}, self._table.claim_about(target))
            if not body:
                break
            self._emit(SendMessage(target, MessageType.GOSSIP, body))

    # -- sending ---------------------------------------------------------------------

    def _send(self, target: NodeId, msg_type: MessageType, body: dict[str, Any]) -> None:
        first = self._table.claim_about(target)
        self._emit(SendMessage(target, msg_type, self._piggyback(body, first)))

    def _piggyback(self, body: dict[str, Any], first: list[bytes]) -> dict[str, Any]:
        config = self.config
        room = config.max_update_bytes - sum(len(u) + 5 for u in first)
        count = config.max_updates_per_message - len(first)
        updates = first + self._table.queue.take(len(self._table.live) + 1, count, room)
        if updates:
            body["updates"] = updates
        return body

    def _emit(self, effect: Effect) -> None:
        if isinstance(effect, SendMessage | SendToEndpoint):
            self._stats["messages_out"] += 1
        self._out.append(effect)

    def _drain(self) -> list[Effect]:
        out, self._out = self._out, []
        return out


# What the wire lets carry piggybacked updates, and a nonce (node/base/wire.py says, once).
_GOSSIP_CARRIERS = frozenset(t for t, spec in SPECS.items() if "updates" in spec.fields)
_NONCED = frozenset(t for t, spec in SPECS.items() if "nonce" in spec.fields)


def _field(body: dict[str, Any], name: str, kind: type, default: Any = None) -> Any:
    value = body.get(name, default)
    ok = type(value) is int if kind is int else isinstance(value, kind)
    if not ok:
        raise RemoteProtocolError(f"body field {name!r} missing or not {kind.__name__}")
    return value
