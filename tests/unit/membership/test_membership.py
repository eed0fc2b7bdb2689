"""The membership core: unit transitions, bad input, and small simulated swarms.

The swarm tests run several cores over an in-test network: a heap of timed
deliveries and wakeups, a fixed latency, an optional drop function, and real
frames (every message goes through node.base.wire's encoder and decoder, so the
size and schema limits hold). Time is simulated; nothing reads a clock.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node.base.identity import Identity, NodeId
from node.base.records import Capabilities, PeerRecord, decode_record, sign_record
from node.base.wire import (
    LocalProtocolError,
    MessageType,
    RemoteProtocolError,
    decode_frame,
    encode_frame,
)
from node.membership.codec import (
    ALIVE_PREFIX,
    Alive,
    Broadcast,
    Claim,
    UpdateKind,
    decode_update,
    encode_update,
)
from node.membership.config import MembershipConfig
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
from node.membership.queue import TransmitLimitedQueue, retransmit_limit
from node.membership.random_set import RandomSet
from node.membership.swim import Membership
from node.membership.table import MemberState

T0 = 1_800_000_000.0
LIFETIME = 3600
CONFIG = MembershipConfig()
LATENCY = 0.002


def identity_for(n: int, salt: int = 0) -> Identity:
    seed = random.Random(n * 7919 + salt).randbytes(32)
    return Identity.from_seeds(seed, bytes(reversed(seed)))


def endpoint_for(n: int) -> str:
    return f"198.51.{100 + n // 250}.{n % 250 + 1}:7946"


def make_record(
    identity: Identity, seq: int = 1, expires: float = T0 + LIFETIME, endpoint: str = ""
) -> PeerRecord:
    return sign_record(
        identity,
        endpoints=(endpoint or "198.51.100.250:7946",),
        overlay_address="",
        capabilities=Capabilities(),
        version="0.1.0",
        seq=seq,
        expires=int(expires),
    )


# -- the in-test network -----------------------------------------------------------


@dataclass
class SimNode:
    index: int
    identity: Identity
    endpoint: str
    core: Membership
    seq: int = 1
    up: bool = True
    log: list[tuple[float, Effect]] = field(default_factory=list)

    @property
    def node_id(self) -> NodeId:
        return self.identity.node_id


Drop = Callable[[int, int, MessageType, float], bool]


class Net:
    def __init__(self, seed: int = 1, config: MembershipConfig = CONFIG) -> None:
        self.rng = random.Random(seed)
        self.config = config
        self.now = T0
        self.nodes: list[SimNode] = []
        self.by_id: dict[NodeId, SimNode] = {}
        self.by_endpoint: dict[str, SimNode] = {}
        self.drop: Drop | None = None
        self.heap: list[tuple[float, int, int, Event | None]] = []
        self.counter = 0
        self.frames = 0
        self.largest_frame = 0

    def add(self, join_via: int | None = None, *, seq: int = 1) -> SimNode:
        index = len(self.nodes)
        identity = identity_for(index)
        endpoint = endpoint_for(index)
        core = Membership(
            make_record(identity, seq, endpoint=endpoint),
            self.config,
            random.Random(self.rng.getrandbits(64)),
        )
        node = SimNode(index, identity, endpoint, core, seq)
        self.nodes.append(node)
        self.by_id[node.node_id] = node
        self.by_endpoint[endpoint] = node
        self.schedule(node, 0.0, None)
        if join_via is not None:
            self.schedule(node, 0.0, JoinRequested((self.nodes[join_via].endpoint,)))
        return node

    def restart(self, node: SimNode, join_via: int) -> None:
        """A crashed node comes back: new core, record re-signed with a higher seq."""
        node.seq += 1
        record = make_record(node.identity, node.seq, self.now + LIFETIME, node.endpoint)
        node.core = Membership(record, self.config, random.Random(self.rng.getrandbits(64)))
        node.up = True
        self.schedule(node, 0.0, JoinRequested((self.nodes[join_via].endpoint,)))

    def schedule(self, node: SimNode, delay: float, event: Event | None) -> None:
        self.counter += 1
        heapq.heappush(self.heap, (self.now + delay, self.counter, node.index, event))

    def run(self, until: float) -> None:
        """Run to `until` (seconds after T0)."""
        end = T0 + until
        while self.heap and self.heap[0][0] <= end:
            at, _, index, event = heapq.heappop(self.heap)
            self.now = max(self.now, at)
            node = self.nodes[index]
            if not node.up:
                continue
            if event is None:
                if node.core.next_wakeup() > self.now:
                    continue  # a stale wakeup
                effects = node.core.tick(self.now)
            else:
                effects = node.core.handle(event, self.now)
            self.carry_out(node, effects)
            self.schedule(node, max(0.0, node.core.next_wakeup() - self.now), None)
        self.now = max(self.now, end)

    def run_until(self, condition: Callable[[], bool], limit: float, step: float = 0.05) -> float:
        """Run until `condition` holds; return the simulated time it first held."""
        while self.now - T0 < limit:
            self.run(self.now - T0 + step)
            if condition():
                return self.now - T0
        raise AssertionError(f"condition not reached within {limit} s")

    def carry_out(self, node: SimNode, effects: list[Effect]) -> None:
        for effect in effects:
            node.log.append((self.now, effect))
            if isinstance(effect, SendMessage):
                self.send(node, self.by_id.get(effect.target), effect.msg_type, effect.body)
            elif isinstance(effect, SendToEndpoint):
                target = self.by_endpoint.get(effect.endpoint)
                self.send(node, target, effect.msg_type, effect.body)
            elif isinstance(effect, RefreshOwnRecord):
                node.seq = max(effect.min_seq, node.seq + 1)
                record = make_record(node.identity, node.seq, self.now + LIFETIME, node.endpoint)
                self.schedule(node, 0.0, OwnRecordSigned(record))

    def send(
        self, src: SimNode, dst: SimNode | None, msg_type: MessageType, body: dict[str, Any]
    ) -> None:
        frame = encode_frame(src.identity, msg_type, self.counter, body)
        self.frames += 1
        self.largest_frame = max(self.largest_frame, len(frame))
        if dst is None or (self.drop and self.drop(src.index, dst.index, msg_type, self.now)):
            return
        envelope = decode_frame(frame)
        event = MessageReceived(envelope.sender, envelope.type, envelope.body, src.endpoint)
        self.schedule(dst, LATENCY, event)

    # -- views -----------------------------------------------------------------------

    def state(self, viewer: SimNode, subject: SimNode) -> MemberState | None:
        member = viewer.core.member(subject.node_id)
        return None if member is None else member.state

    def everyone_sees_everyone_alive(self) -> bool:
        live = [node for node in self.nodes if node.up]
        return all(
            self.state(viewer, subject) is MemberState.ALIVE
            for viewer in live
            for subject in live
            if subject is not viewer
        )

    def all_see(self, subject: SimNode, state: MemberState) -> bool:
        return all(
            self.state(viewer, subject) is state
            for viewer in self.nodes
            if viewer.up and viewer is not subject
        )

    def changes(self, viewer: SimNode, subject: SimNode) -> list[tuple[float, MemberState]]:
        return [
            (at, effect.state)
            for at, effect in viewer.log
            if isinstance(effect, ApplyMemberChange) and effect.node_id == subject.node_id
        ]


def swarm(n: int, seed: int = 1, config: MembershipConfig = CONFIG) -> Net:
    net = Net(seed, config)
    net.add()
    for _ in range(n - 1):
        net.add(join_via=0)
    return net


# -- single-core helpers -----------------------------------------------------------


class Peer:
    """A hand-driven peer: an identity and its signed record."""

    def __init__(self, n: int, seq: int = 1) -> None:
        self.identity = identity_for(n, salt=1)
        self.record = make_record(self.identity, seq)

    @property
    def node_id(self) -> NodeId:
        return self.identity.node_id

    def resign(self, seq: int, **kwargs: Any) -> PeerRecord:
        self.record = make_record(self.identity, seq, **kwargs)
        return self.record


def lone_core(seed: int = 7) -> tuple[Membership, Peer]:
    me = Peer(0)
    return Membership(me.record, CONFIG, random.Random(seed)), me


def gossip(sender: Peer, *updates: Any) -> MessageReceived:
    return MessageReceived(sender.node_id, MessageType.GOSSIP, {"updates": list(updates)}, "x")


def alive(record: PeerRecord) -> bytes:
    return encode_update(Alive(record.blob))


def claim(kind: UpdateKind, subject: Peer | NodeId, inc: int, accuser: Peer) -> bytes:
    node = subject if isinstance(subject, NodeId) else subject.node_id
    return encode_update(Claim(kind, node, inc, accuser.node_id))


def sends(effects: list[Effect], msg_type: MessageType) -> list[SendMessage]:
    return [e for e in effects if isinstance(e, SendMessage) and e.msg_type is msg_type]


def state_of(core: Membership, peer: Peer) -> tuple[MemberState, int] | None:
    member = core.member(peer.node_id)
    return None if member is None else (member.state, member.incarnation)


# -- the update codec and the queue ------------------------------------------------


def test_updates_round_trip():
    a, b = identity_for(1).node_id, identity_for(2).node_id
    for update in (
        Alive(b"blob"),
        Claim(UpdateKind.SUSPECT, a, 3, b),
        Claim(UpdateKind.DEAD, a, 0, a),
        Broadcast("routes", b"k", b"payload"),
    ):
        assert decode_update(encode_update(update)) == update


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",
        msgpack.packb([]),
        msgpack.packb({"a": 1}),
        msgpack.packb([9, b"x"]),
        msgpack.packb([0, "not bytes"]),
        msgpack.packb([1, b"short", 1, b"\x00" * 32]),
        msgpack.packb([1, b"\x00" * 32, -1, b"\x00" * 32]),
        msgpack.packb([1, b"\x00" * 32, True, b"\x00" * 32]),
        msgpack.packb([2, b"\x00" * 32, 1.5, b"\x00" * 32]),
        msgpack.packb([3, "", b"k", b"p"]),
        msgpack.packb([3, "t", b"k" * 300, b"p"]),
        msgpack.packb([3, "t", b"k", b"p" * 5000]),
    ],
)
def test_malformed_updates_raise_only_remote_protocol_error(data):
    with pytest.raises(RemoteProtocolError):
        decode_update(data)


def test_queue_sends_each_item_a_bounded_number_of_times_fewest_first():
    queue = TransmitLimitedQueue(retransmit_mult=2)
    limit = retransmit_limit(2, 5)
    assert limit == 2
    queue.enqueue("a", b"A")
    assert queue.take(5, 1, 1000) == [b"A"]
    queue.enqueue("b", b"B")
    assert queue.take(5, 1, 1000) == [b"B"]  # fewest transmits first
    assert queue.take(5, 5, 1000) == [b"B", b"A"]  # newest first among equals
    assert queue.take(5, 5, 1000) == []
    assert len(queue) == 0


def test_queue_hands_out_the_first_tier_before_the_second():
    queue = TransmitLimitedQueue(retransmit_mult=4)
    for i in range(20):
        queue.enqueue(("m", i), b"claim%d" % i, 1)
    queue.take(5, 10, 1000)  # ten claims sent once; ten never sent
    queue.enqueue(("m", "joiner"), b"record")
    queue.take(5, 1, 1000)  # the record, sent once: still ahead of claims never sent
    assert queue.take(5, 2, 1000) == [b"record", b"claim9"]
    assert queue.transmits(("m", "joiner")) == 2
    queue.enqueue(("m", 3), b"alive3")  # a refutation replaces the claim, in the first tier
    assert queue.take(5, 1, 1000) == [b"alive3"]


def test_queue_over_capacity_drops_claims_before_records_at_equal_count():
    queue = TransmitLimitedQueue(retransmit_mult=4, max_items=2)
    queue.enqueue("record", b"R")
    queue.enqueue("claim", b"C", 1)
    queue.enqueue("record2", b"R2")
    assert "claim" not in queue and len(queue) == 2


def test_queue_replaces_an_item_with_the_same_key_and_resets_its_count():
    queue = TransmitLimitedQueue(retransmit_mult=4)
    queue.enqueue(("b", "t", b"k"), b"old")
    queue.take(5, 1, 1000)
    queue.enqueue(("b", "t", b"k"), b"new")
    assert len(queue) == 1
    assert queue.transmits(("b", "t", b"k")) == 0
    assert queue.take(5, 5, 1000) == [b"new"]


def test_queue_drops_most_sent_items_beyond_its_capacity():
    queue = TransmitLimitedQueue(retransmit_mult=4, max_items=3)
    for key in "abc":
        queue.enqueue(key, key.encode())
    queue.take(5, 1, 1000)  # c sent once
    queue.enqueue("d", b"d")
    assert len(queue) == 3
    assert "c" not in queue


@settings(deadline=None)  # no wall-clock limits in pure tests
@given(
    sizes=st.lists(st.integers(1, 3000), max_size=60),
    members=st.integers(1, 20_000),
    count=st.integers(1, 20),
    budget=st.integers(1, 40_000),
)
def test_queue_never_exceeds_its_budget_or_its_limit(sizes, members, count, budget):
    queue = TransmitLimitedQueue(retransmit_mult=3)
    for i, size in enumerate(sizes):
        queue.enqueue(i, bytes([i % 256]) * size)
    sent: dict[bytes, int] = {}
    for _ in range(200):
        batch = queue.take(members, count, budget)
        if not batch:
            break
        assert len(batch) <= count
        assert sum(len(item) + 5 for item in batch) <= budget
        for item in batch:
            sent[item] = sent.get(item, 0) + 1
    assert all(times <= retransmit_limit(3, members) for times in sent.values())


def test_random_set_samples_distinct_items_and_honours_exclusions():
    items: RandomSet[int] = RandomSet()
    for i in range(100):
        items.add(i)
    for i in range(0, 100, 2):
        items.discard(i)
    rng = random.Random(1)
    for k in (1, 3, 10):
        chosen = items.sample(rng, k, exclude={1, 3})
        assert len(chosen) == k == len(set(chosen))
        assert all(c % 2 == 1 and c not in (1, 3) for c in chosen)
    small: RandomSet[int] = RandomSet()
    small.add(5)
    assert small.sample(rng, 3) == [5]
    assert small.sample(rng, 3, exclude={5}) == []


# -- config ------------------------------------------------------------------------


def test_suspicion_timeout_follows_swim_and_shrinks_with_confirmations():
    config = MembershipConfig()
    assert config.suspicion_timeout(2, 0) == config.suspicion_min_s
    base = 3 * math.log10(10_001) * 0.5
    assert config.suspicion_timeout(10_000, 3) == pytest.approx(base)
    assert config.suspicion_timeout(10_000, 0) == pytest.approx(2 * base)
    shrinking = [config.suspicion_timeout(10_000, c) for c in range(4)]
    assert shrinking == sorted(shrinking, reverse=True)


def test_config_refuses_nonsense():
    with pytest.raises(ValueError):
        MembershipConfig(probe_timeout_s=1.0, probe_interval_s=0.5)
    with pytest.raises(ValueError):
        MembershipConfig(max_update_bytes=48 * 1024)
    with pytest.raises(ValueError):
        MembershipConfig(gossip_fanout=0)


# -- single core: records, precedence, bad input -----------------------------------


def test_alive_update_adds_a_member_and_announces_it_once():
    core, _ = lone_core()
    peer = Peer(1)
    effects = core.handle(gossip(peer, alive(peer.record)), T0)
    assert [e for e in effects if isinstance(e, ApplyMemberChange)] == [
        ApplyMemberChange(peer.node_id, MemberState.ALIVE, peer.record)
    ]
    assert core.handle(gossip(peer, alive(peer.record)), T0) == []
    assert core.statistics()["updates_duplicate"] == 1
    assert core.alive_count() == 1


def test_swim_precedence_by_incarnation():
    core, _ = lone_core()
    peer, accuser = Peer(1), Peer(2)
    core.handle(gossip(accuser, alive(accuser.record)), T0)  # only members accuse
    core.handle(gossip(accuser, alive(peer.record)), T0)
    core.handle(gossip(accuser, claim(UpdateKind.SUSPECT, peer, 1, accuser)), T0)
    assert state_of(core, peer) == (MemberState.SUSPECT, 1)
    core.handle(gossip(accuser, alive(peer.record)), T0)  # ALIVE{1} does not beat SUSPECT{1}
    assert state_of(core, peer) == (MemberState.SUSPECT, 1)
    core.handle(gossip(accuser, alive(peer.resign(2))), T0)  # ALIVE{2} does
    assert state_of(core, peer) == (MemberState.ALIVE, 2)
    core.handle(gossip(accuser, claim(UpdateKind.DEAD, peer, 1, accuser)), T0)  # stale
    assert state_of(core, peer) == (MemberState.ALIVE, 2)
    core.handle(gossip(accuser, claim(UpdateKind.DEAD, peer, 2, accuser)), T0)
    assert state_of(core, peer) == (MemberState.DEAD, 2)
    core.handle(gossip(accuser, claim(UpdateKind.SUSPECT, peer, 2, accuser)), T0)
    assert state_of(core, peer) == (MemberState.DEAD, 2)
    core.handle(gossip(accuser, alive(peer.record)), T0)  # ALIVE{2} does not revive DEAD{2}
    assert state_of(core, peer) == (MemberState.DEAD, 2)
    core.handle(gossip(accuser, alive(peer.resign(3))), T0)
    assert state_of(core, peer) == (MemberState.ALIVE, 3)
    core.handle(gossip(accuser, claim(UpdateKind.DEAD, peer, 3, peer)), T0)  # by itself
    assert state_of(core, peer) == (MemberState.LEFT, 3)
    assert core.statistics()["leaves"] == 1


def test_a_stranger_s_claims_about_members_are_ignored_and_counted():
    # One GOSSIP from a fresh key used to turn a member LEFT (its accuser field is free text)
    core, _ = lone_core()
    peer, stranger = Peer(1), Peer(2)
    core.handle(gossip(peer, alive(peer.record)), T0)
    for kind, accuser in ((UpdateKind.SUSPECT, stranger), (UpdateKind.DEAD, peer)):
        core.handle(gossip(stranger, claim(kind, peer, 1, accuser)), T0)
    assert state_of(core, peer) == (MemberState.ALIVE, 1)
    assert core.statistics()["claims_from_strangers"] == 2
    core.handle(gossip(peer, claim(UpdateKind.DEAD, peer, 1, peer)), T0)  # its own leave
    assert state_of(core, peer) == (MemberState.LEFT, 1)


def test_bad_updates_are_rejected_and_counted_without_raising():
    core, _ = lone_core()
    peer, other = Peer(1, seq=5), Peer(2)
    core.handle(gossip(peer, alive(peer.record)), T0)
    payload, signature = msgpack.unpackb(other.record.blob)
    forged = msgpack.packb([payload, bytes([signature[0] ^ 1]) + signature[1:]])
    expired = make_record(other.identity, 1, expires=T0 - 1)
    older = make_record(peer.identity, 4)
    equivocating = make_record(peer.identity, 5, endpoint="198.51.100.99:7946")
    bad = [
        encode_update(Alive(forged)),
        alive(expired),
        alive(older),
        alive(equivocating),
        claim(UpdateKind.SUSPECT, peer, 6, other),  # an incarnation we never saw
        claim(UpdateKind.DEAD, peer, 7, other),
        b"\xc1",
        msgpack.packb([0]),
        "not bytes",
    ]
    effects = core.handle(gossip(peer, *bad), T0)
    assert effects == []
    stats = core.statistics()
    assert stats["updates_rejected"] == len(bad) - 1
    assert stats["updates_stale"] == 1  # the replayed older record
    assert state_of(core, peer) == (MemberState.ALIVE, 5)
    assert core.member(other.node_id) is None


def test_claims_about_unknown_nodes_are_ignored():
    core, _ = lone_core()
    stranger, accuser = Peer(1), Peer(2)
    core.handle(gossip(accuser, alive(accuser.record)), T0)  # a member accuses
    core.handle(gossip(accuser, claim(UpdateKind.DEAD, stranger, 1, accuser)), T0)
    assert core.member(stranger.node_id) is None
    assert core.statistics()["updates_ignored"] == 1


def test_too_many_updates_in_one_message_are_not_all_read():
    core, _ = lone_core()
    peer = Peer(1)
    core.handle(gossip(peer, *([b"\xc1"] * 500)), T0)
    stats = core.statistics()
    assert stats["updates_in"] == 500
    assert stats["updates_rejected"] == 500


@pytest.mark.parametrize(
    ("msg_type", "body"),
    [
        (MessageType.PING, {}),
        (MessageType.ACK, {"nonce": "x"}),
        (MessageType.PING_REQ, {"nonce": 1, "target": b"short"}),
        (MessageType.JOIN, {"record": 5}),
        (MessageType.JOIN_REPLY, {"records": b"x"}),
        (MessageType.GOSSIP, {"updates": b"x"}),
        (MessageType.NACK, {}),
        (MessageType.NACK, {"nonce": True}),
        (MessageType.NACK, {"nonce": 1, "updates": b"x"}),
    ],
)
def test_malformed_bodies_are_counted_not_raised(msg_type, body):
    core, _ = lone_core()
    core.handle(MessageReceived(Peer(1).node_id, msg_type, body, "x"), T0)
    assert core.statistics()["messages_rejected"] == 1


@pytest.mark.parametrize(
    ("msg_type", "bad"),
    [
        (MessageType.PING, {"nonce": "x"}),
        (MessageType.ACK, {}),
        (MessageType.NACK, {"nonce": "bad"}),
        (MessageType.PING_REQ, {"nonce": 1, "target": b"short"}),
    ],
)
def test_a_refused_message_applies_none_of_its_updates(msg_type, bad):
    core, _ = lone_core()
    peer = Peer(1)
    body = {"updates": [alive(peer.record)], **bad}
    core.handle(MessageReceived(Peer(2).node_id, msg_type, body, "x"), T0)
    assert core.statistics()["messages_rejected"] == 1
    assert core.member(peer.node_id) is None, "a refused message changed the table"


# hypothesis: anything a peer can put in an update list
wire_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.binary(max_size=64)
    | st.text(max_size=16),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=4), children)
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    raw=st.lists(st.binary(max_size=200), max_size=8),
    structured=st.lists(wire_values.map(lambda v: msgpack.packb(v)), max_size=4),
    claims=st.lists(
        st.tuples(st.integers(0, 4), st.integers(0, 2**64 - 1), st.booleans()), max_size=4
    ),
    msg_type=st.sampled_from(
        [MessageType.PING, MessageType.ACK, MessageType.NACK, MessageType.GOSSIP]
    ),
    nonce=st.integers(0, 2**64 - 1),
)
def test_arbitrary_updates_never_raise(raw, structured, claims, msg_type, nonce):
    core, me = lone_core()
    peer = Peer(1)
    core.handle(gossip(peer, alive(peer.record)), T0)
    forged = [
        encode_update(
            Claim(
                UpdateKind.SUSPECT if kind % 2 else UpdateKind.DEAD,
                me.node_id if about_me else peer.node_id,
                inc,
                peer.node_id,
            )
        )
        for kind, inc, about_me in claims
    ]
    body = {"nonce": nonce, "updates": raw + structured + forged}
    effects = core.handle(MessageReceived(peer.node_id, msg_type, body, "x"), T0 + 1)
    effects += core.tick(T0 + 2)
    for effect in effects:
        if isinstance(effect, SendMessage):
            encode_frame(me.identity, effect.msg_type, 1, effect.body)  # still a valid frame
    stats = core.statistics()
    assert stats["messages_rejected"] == 0
    assert stats["updates_in"] == len(body["updates"]) + 1


# -- single core: refutation, joining, probing -------------------------------------


def test_accused_core_asks_for_a_new_record_and_spreads_it():
    core, me = lone_core()
    peer = Peer(1)
    core.handle(gossip(peer, alive(peer.record)), T0)
    effects = core.handle(gossip(peer, claim(UpdateKind.SUSPECT, me.node_id, 1, peer)), T0)
    assert RefreshOwnRecord(min_seq=2) in effects
    again = core.handle(gossip(peer, claim(UpdateKind.DEAD, me.node_id, 1, peer)), T0)
    assert not any(isinstance(e, RefreshOwnRecord) for e in again)  # already asked
    higher = core.handle(gossip(peer, claim(UpdateKind.DEAD, me.node_id, 9, peer)), T0)
    assert higher == []  # nobody knows a seq of ours above our own
    new = me.resign(2)
    core.handle(OwnRecordSigned(new), T0)
    effects = core.tick(T0 + 1)
    updates = [u for e in effects if isinstance(e, SendMessage) for u in e.body.get("updates", [])]
    assert alive(new) in updates
    assert core.statistics()["refutations"] == 1
    with pytest.raises(LocalProtocolError):
        core.handle(OwnRecordSigned(new), T0)  # not newer: a bug in the agent


def test_join_adds_the_joiner_and_answers_with_a_sample():
    core, me = lone_core()
    members = [Peer(i) for i in range(1, 5)]
    for peer in members:
        core.handle(gossip(peer, alive(peer.record)), T0)
    joiner = Peer(9)
    effects = core.handle(
        MessageReceived(joiner.node_id, MessageType.JOIN, {"record": joiner.record.blob}, "x"),
        T0,
    )
    assert ApplyMemberChange(joiner.node_id, MemberState.ALIVE, joiner.record) in effects
    (reply,) = sends(effects, MessageType.JOIN_REPLY)
    assert reply.target == joiner.node_id
    records = reply.body["records"]
    assert records[0] == me.record.blob
    assert set(records[1:]) == {p.record.blob for p in members}


def test_join_with_someone_elses_record_is_refused():
    core, _ = lone_core()
    victim, liar = Peer(1), Peer(2)
    effects = core.handle(
        MessageReceived(liar.node_id, MessageType.JOIN, {"record": victim.record.blob}, "x"), T0
    )
    assert effects == []
    assert core.member(victim.node_id) is None
    assert core.statistics()["messages_rejected"] == 1


def test_join_requested_and_discovered_records_send_joins():
    core, me = lone_core()
    effects = core.handle(JoinRequested(("198.51.100.7:7946", "198.51.100.8:7946")), T0)
    assert [(e.endpoint, e.msg_type) for e in effects if isinstance(e, SendToEndpoint)] == [
        ("198.51.100.7:7946", MessageType.JOIN),
        ("198.51.100.8:7946", MessageType.JOIN),
    ]
    # nobody answered: the core retries at the next probe round after join_retry_s
    retried = core.tick(T0 + CONFIG.join_retry_s + CONFIG.probe_interval_s)
    assert sum(isinstance(e, SendToEndpoint) for e in retried) == 2
    peer = Peer(1)
    effects = core.handle(RecordDiscovered(peer.record), T0 + 5)
    (join,) = sends(effects, MessageType.JOIN)
    assert join.target == peer.node_id and join.body["record"] == me.record.blob
    assert sends(core.handle(RecordDiscovered(peer.record), T0 + 5), MessageType.JOIN) == []


def test_ping_from_a_stranger_is_answered_at_its_endpoint_and_greeted():
    core, _ = lone_core()
    stranger = Peer(1)
    via = "198.51.100.77:7946"
    effects = core.handle(
        MessageReceived(stranger.node_id, MessageType.PING, {"nonce": 5}, via), T0
    )
    kinds = [(e.endpoint, e.msg_type) for e in effects if isinstance(e, SendToEndpoint)]
    assert kinds == [(via, MessageType.ACK), (via, MessageType.JOIN)]
    again = core.handle(MessageReceived(stranger.node_id, MessageType.PING, {"nonce": 6}, via), T0)
    assert [e.msg_type for e in again if isinstance(e, SendToEndpoint)] == [MessageType.ACK]


def first_probe(core: Membership, now: float) -> tuple[SendMessage, float]:
    """Tick until the core sends a PING; return it and the time."""
    for step in range(40):
        at = now + step * 0.05
        pings = sends(core.tick(at), MessageType.PING)
        if pings:
            return pings[0], at
    raise AssertionError("no probe")


def test_probe_acked_directly_keeps_the_target_alive():
    core, _ = lone_core()
    peer = Peer(1)
    core.handle(gossip(peer, alive(peer.record)), T0)
    ping, at = first_probe(core, T0)
    assert ping.target == peer.node_id
    core.handle(
        MessageReceived(peer.node_id, MessageType.ACK, {"nonce": ping.body["nonce"]}, ""), at
    )
    core.tick(at + CONFIG.probe_interval_s)
    assert state_of(core, peer) == (MemberState.ALIVE, 1)
    assert core.statistics()["acks"] == 1


def test_unanswered_probe_goes_indirect_then_suspects():
    config = MembershipConfig(probe_rounds=1)  # suspect after the first failed round
    core = Membership(Peer(0).record, config, random.Random(7))
    peers = [Peer(i) for i in range(1, 6)]
    for peer in peers:
        core.handle(gossip(peer, alive(peer.record)), T0)
    ping, at = first_probe(core, T0)
    target = next(p for p in peers if p.node_id == ping.target)
    assert core.next_wakeup() == pytest.approx(at + config.probe_timeout_s)
    assert core.tick(at + config.probe_timeout_s / 2) == []  # nothing due yet
    reqs = sends(core.tick(at + config.probe_timeout_s), MessageType.PING_REQ)
    assert len(reqs) == config.indirect_checks
    assert {r.body["target"] for r in reqs} == {target.node_id.key}
    assert target.node_id not in {r.target for r in reqs}
    forger = next(p for p in peers if p.node_id not in {r.target for r in reqs} | {target.node_id})
    ack = {"nonce": ping.body["nonce"]}
    core.handle(MessageReceived(forger.node_id, MessageType.ACK, ack, ""), at + 0.3)  # not asked
    effects = core.tick(at + config.probe_interval_s)
    assert ApplyMemberChange(target.node_id, MemberState.SUSPECT, target.record) in effects
    assert core.statistics()["suspicions"] == 1


def test_ack_forwarded_by_a_helper_counts():
    core, _ = lone_core()
    peers = [Peer(i) for i in range(1, 6)]
    for peer in peers:
        core.handle(gossip(peer, alive(peer.record)), T0)
    ping, at = first_probe(core, T0)
    reqs = sends(core.tick(at + CONFIG.probe_timeout_s), MessageType.PING_REQ)
    helper = reqs[0].target
    core.handle(
        MessageReceived(helper, MessageType.ACK, {"nonce": ping.body["nonce"]}, ""), at + 0.3
    )
    effects = core.tick(at + CONFIG.probe_interval_s)
    assert not any(isinstance(e, ApplyMemberChange) for e in effects)


def test_helper_probes_the_target_and_forwards_the_original_nonce():
    core, _ = lone_core()
    requester, target = Peer(1), Peer(2)
    core.handle(gossip(requester, alive(requester.record), alive(target.record)), T0)
    body = {"nonce": 4242, "target": target.node_id.key}
    effects = core.handle(MessageReceived(requester.node_id, MessageType.PING_REQ, body, ""), T0)
    (ping,) = sends(effects, MessageType.PING)
    assert ping.target == target.node_id and ping.body["nonce"] != 4242
    ack = {"nonce": ping.body["nonce"]}
    assert core.handle(MessageReceived(requester.node_id, MessageType.ACK, ack, ""), T0) == []
    effects = core.handle(MessageReceived(target.node_id, MessageType.ACK, ack, ""), T0)
    (forwarded,) = sends(effects, MessageType.ACK)
    assert forwarded.target == requester.node_id and forwarded.body["nonce"] == 4242


def probed_core(config: MembershipConfig, peers: int = 5) -> tuple[Membership, list[Peer]]:
    core = Membership(Peer(0).record, config, random.Random(7))
    others = [Peer(i) for i in range(1, peers + 1)]
    for peer in others:
        core.handle(gossip(peer, alive(peer.record)), T0)
    return core, others


def nack(sender: NodeId, nonce: object) -> MessageReceived:
    return MessageReceived(sender, MessageType.NACK, {"nonce": nonce}, "x")


def test_unanswered_probe_is_retried_directly_beside_the_indirect_probes():
    core, _ = probed_core(CONFIG)
    ping, at = first_probe(core, T0)
    effects = core.tick(at + CONFIG.probe_timeout_s)
    (again,) = sends(effects, MessageType.PING)
    assert again.target == ping.target and again.body["nonce"] == ping.body["nonce"]
    assert core.statistics()["fallback_pings"] == 1


def test_helper_nacks_when_the_target_stays_silent_and_not_when_it_answers():
    core, _ = lone_core()
    requester, target = Peer(1), Peer(2)
    core.handle(gossip(requester, alive(requester.record), alive(target.record)), T0)
    body = {"nonce": 77, "target": target.node_id.key}
    effects = core.handle(MessageReceived(requester.node_id, MessageType.PING_REQ, body, ""), T0)
    (ping,) = sends(effects, MessageType.PING)
    assert core.next_wakeup() == pytest.approx(T0 + CONFIG.nack_timeout_s)
    assert sends(core.tick(T0 + CONFIG.nack_timeout_s * 0.9), MessageType.NACK) == []
    (nacked,) = sends(core.tick(T0 + CONFIG.nack_timeout_s), MessageType.NACK)
    assert nacked.target == requester.node_id and nacked.body["nonce"] == 77
    # a late ACK is still forwarded: the requester may still be waiting
    ack = {"nonce": ping.body["nonce"]}
    late = core.handle(MessageReceived(target.node_id, MessageType.ACK, ack, ""), T0 + 0.2)
    assert [a.body["nonce"] for a in sends(late, MessageType.ACK)] == [77]
    # answered in time: no NACK
    body = {"nonce": 78, "target": target.node_id.key}
    effects = core.handle(
        MessageReceived(requester.node_id, MessageType.PING_REQ, body, ""), T0 + 1
    )
    (ping,) = sends(effects, MessageType.PING)
    ack = {"nonce": ping.body["nonce"]}
    core.handle(MessageReceived(target.node_id, MessageType.ACK, ack, ""), T0 + 1.01)
    assert sends(core.tick(T0 + 1 + CONFIG.nack_timeout_s), MessageType.NACK) == []
    assert core.statistics()["nacks_sent"] == 1


def test_helper_nacks_at_once_for_a_target_it_holds_dead():
    core, _ = lone_core()
    requester, target = Peer(1), Peer(2)
    core.handle(gossip(requester, alive(requester.record), alive(target.record)), T0)
    core.handle(gossip(requester, claim(UpdateKind.DEAD, target, 1, requester)), T0)
    body = {"nonce": 5, "target": target.node_id.key}
    effects = core.handle(MessageReceived(requester.node_id, MessageType.PING_REQ, body, ""), T0)
    assert sends(effects, MessageType.PING) == []
    assert [n.body["nonce"] for n in sends(effects, MessageType.NACK)] == [5]


def test_missed_nacks_raise_local_health_which_stretches_probing():
    config = MembershipConfig(local_health_max=4)
    core, _ = probed_core(config)
    ping, at = first_probe(core, T0)
    reqs = sends(core.tick(at + config.probe_timeout_s), MessageType.PING_REQ)
    core.handle(nack(reqs[0].target, ping.body["nonce"]), at + 0.3)  # one of three helpers
    core.tick(at + config.probe_interval_s)  # the probe failed; the next one starts
    assert core.local_health() == 2  # two helpers stayed silent: our link is suspect
    start = at + config.probe_interval_s
    assert core.next_wakeup() == pytest.approx(start + 3 * config.probe_timeout_s)
    core.tick(start + 3 * config.probe_timeout_s)  # indirect now, 3x later
    assert core.next_wakeup() == pytest.approx(start + 3 * config.probe_interval_s)
    core.tick(start + 3 * config.probe_interval_s)  # silent again, no NACKs: +3, capped
    assert core.local_health() == 4 == core.statistics()["local_health"]


def test_nacks_from_every_helper_leave_local_health_alone_and_acks_lower_it():
    core, _ = probed_core(CONFIG)
    ping, at = first_probe(core, T0)
    reqs = sends(core.tick(at + CONFIG.probe_timeout_s), MessageType.PING_REQ)
    for req in reqs:
        core.handle(nack(req.target, ping.body["nonce"]), at + 0.3)
    effects = core.tick(at + CONFIG.probe_interval_s)  # failed, but every helper vouched for us
    assert core.local_health() == 0 and core.statistics()["nacks"] == 3
    (ping,) = sends(effects, MessageType.PING)  # the next probe
    accuser = Peer(1)
    core.handle(gossip(accuser, claim(UpdateKind.SUSPECT, Peer(0).node_id, 1, accuser)), at + 0.6)
    assert core.local_health() == 1  # a refutation
    ack = {"nonce": ping.body["nonce"]}
    core.handle(MessageReceived(ping.target, MessageType.ACK, ack, ""), at + 0.7)
    core.tick(at + 2 * CONFIG.probe_interval_s)  # the acked probe ends
    assert core.local_health() == 0


def test_refuting_a_suspicion_raises_local_health():
    core, me = lone_core()
    accuser = Peer(1)
    core.handle(gossip(accuser, alive(accuser.record)), T0)
    core.handle(gossip(accuser, claim(UpdateKind.SUSPECT, me.identity.node_id, 1, accuser)), T0)
    assert core.local_health() == 1


def test_local_health_off_keeps_the_probe_rhythm():
    config = MembershipConfig(local_health_max=0)
    core, _ = probed_core(config)
    _, at = first_probe(core, T0)
    core.tick(at + config.probe_timeout_s)
    core.tick(at + config.probe_interval_s)
    assert core.local_health() == 0
    next_timeout = at + config.probe_interval_s + config.probe_timeout_s
    assert core.next_wakeup() == pytest.approx(next_timeout)


def test_unexpected_nacks_are_counted_and_ignored():
    config = MembershipConfig(local_health_max=8)
    core, peers = probed_core(config)
    ping, at = first_probe(core, T0)
    reqs = sends(core.tick(at + config.probe_timeout_s), MessageType.PING_REQ)
    helpers = {r.target for r in reqs}
    stranger = next(p.node_id for p in peers if p.node_id not in helpers | {ping.target})
    nonce = ping.body["nonce"]
    for bad in (
        nack(stranger, nonce),  # not asked
        nack(reqs[0].target, nonce + 1),  # another probe
        nack(ping.target, nonce),  # the target itself
        nack(reqs[1].target, nonce),
        nack(reqs[1].target, nonce),  # twice
    ):
        assert sends(core.handle(bad, at + 0.6), MessageType.PING) == []
    stats = core.statistics()
    assert stats["nacks"] == 1 and stats["nacks_unexpected"] == 4
    assert stats["messages_rejected"] == 0
    core.tick(at + config.probe_interval_s)
    assert core.local_health() == 2  # only the one real NACK counted


def test_more_probe_rounds_retry_the_same_target_before_suspecting():
    config = MembershipConfig(probe_rounds=2, local_health_max=0)
    core, peers = probed_core(config)
    ping, at = first_probe(core, T0)
    core.tick(at + config.probe_timeout_s)
    effects = core.tick(at + config.probe_interval_s)
    (retry,) = sends(effects, MessageType.PING)
    assert retry.target == ping.target and retry.body["nonce"] != ping.body["nonce"]
    assert not any(isinstance(e, ApplyMemberChange) for e in effects)
    assert core.statistics()["probe_retries"] == 1
    at += config.probe_interval_s
    core.tick(at + config.probe_timeout_s)
    effects = core.tick(at + config.probe_interval_s)
    target = next(p for p in peers if p.node_id == ping.target)
    assert ApplyMemberChange(target.node_id, MemberState.SUSPECT, target.record) in effects
    (fresh,) = sends(effects, MessageType.PING)
    assert fresh.target != ping.target  # the round-robin goes on


def test_a_target_others_suspect_gets_every_round_before_we_confirm():
    config = MembershipConfig(probe_rounds=2, local_health_max=0)
    core, peers = probed_core(config)
    ping, at = first_probe(core, T0)
    target = next(p for p in peers if p.node_id == ping.target)
    accuser = next(p for p in peers if p is not target)
    core.handle(gossip(accuser, claim(UpdateKind.SUSPECT, target, 1, accuser)), at)
    assert state_of(core, target)[0] is MemberState.SUSPECT
    core.tick(at + config.probe_timeout_s)
    (retry,) = sends(core.tick(at + config.probe_interval_s), MessageType.PING)
    assert retry.target == target.node_id, "one lossy round is not our confirmation"
    assert core.statistics()["probe_retries"] == 1


def test_a_late_ack_to_an_earlier_round_proves_the_target_alive():
    # A helper's relay stays open for a probe interval: the target's ACK to round 1 can
    # come in during round 2. It counts, and the target is not suspected.
    config = MembershipConfig(probe_rounds=2, local_health_max=0)
    core, _ = probed_core(config)
    ping, at = first_probe(core, T0)
    core.tick(at + config.probe_timeout_s)
    effects = core.tick(at + config.probe_interval_s)
    (retry,) = sends(effects, MessageType.PING)
    late = MessageReceived(ping.target, MessageType.ACK, {"nonce": ping.body["nonce"]}, "")
    core.handle(late, at + config.probe_interval_s + 0.01)
    at += config.probe_interval_s
    core.tick(at + config.probe_timeout_s)
    effects = core.tick(at + config.probe_interval_s)
    assert not any(
        isinstance(e, ApplyMemberChange) and e.state is MemberState.SUSPECT for e in effects
    )
    assert core.statistics()["acks"] == 1 and retry.target == ping.target


def test_next_wakeup_before_start_and_after():
    core, _ = lone_core()
    assert core.next_wakeup() == -math.inf
    core.tick(T0)
    assert T0 <= core.next_wakeup() <= T0 + CONFIG.probe_interval_s


def test_dead_members_are_forgotten_and_stale_copies_cannot_revive_them():
    core, _ = lone_core()
    peer, accuser = Peer(1), Peer(2)
    core.handle(gossip(accuser, alive(peer.record), alive(accuser.record)), T0)
    core.handle(gossip(accuser, claim(UpdateKind.DEAD, peer, 1, accuser)), T0)
    core.tick(T0 + CONFIG.dead_reclaim_s + 1)
    assert core.member(peer.node_id) is None
    core.handle(gossip(accuser, alive(peer.record)), T0 + 40)  # late gossip of the old record
    assert core.member(peer.node_id) is None
    core.handle(gossip(accuser, alive(peer.resign(2))), T0 + 41)
    assert state_of(core, peer) == (MemberState.ALIVE, 2)


def test_messages_carry_a_claim_to_the_accused_first():
    core, _ = lone_core()
    peer, accuser = Peer(1), Peer(2)
    core.handle(gossip(accuser, alive(peer.record), alive(accuser.record)), T0)
    core.handle(gossip(accuser, claim(UpdateKind.SUSPECT, peer, 1, accuser)), T0)
    effects = core.handle(MessageReceived(peer.node_id, MessageType.PING, {"nonce": 1}, ""), T0)
    (ack,) = sends(effects, MessageType.ACK)
    assert ack.body["updates"][0] == claim(UpdateKind.SUSPECT, peer, 1, accuser)


def test_piggybacked_updates_stay_within_the_byte_budget():
    core, me = lone_core()
    peer = Peer(1)
    core.handle(gossip(peer, alive(peer.record)), T0)
    for i in range(200):
        core.enqueue_broadcast("routes", i.to_bytes(4, "big"), bytes(4000))
    effects = core.handle(MessageReceived(peer.node_id, MessageType.PING, {"nonce": 1}, ""), T0)
    (ack,) = sends(effects, MessageType.ACK)
    assert sum(len(u) for u in ack.body["updates"]) <= CONFIG.max_update_bytes
    assert len(encode_frame(me.identity, MessageType.ACK, 1, ack.body)) < 48 * 1024
    with pytest.raises(LocalProtocolError):
        core.enqueue_broadcast("routes", b"k", bytes(5000))


# -- simulated swarms --------------------------------------------------------------


def test_five_nodes_joined_through_one_bootstrap_see_each_other():
    net = swarm(5)
    converged = net.run_until(net.everyone_sees_everyone_alive, limit=5)
    assert converged < 2.0
    assert net.largest_frame < 48 * 1024


def test_crashed_node_is_suspected_then_declared_dead_by_all_within_five_seconds():
    net = swarm(5)
    net.run_until(net.everyone_sees_everyone_alive, limit=5)
    net.run(5)
    victim = net.nodes[3]
    victim.up = False
    crashed_at = net.now
    detected = net.run_until(lambda: net.all_see(victim, MemberState.DEAD), limit=15)
    assert detected - (crashed_at - T0) < 5.0
    for viewer in net.nodes:
        if viewer is not victim:
            states = [state for _, state in net.changes(viewer, victim)]
            assert states[-2:] == [MemberState.SUSPECT, MemberState.DEAD]


@pytest.mark.parametrize("seed", range(6))
def test_crash_detection_stays_under_five_seconds_across_seeds(seed):
    net = swarm(5, seed=seed)
    net.run_until(net.everyone_sees_everyone_alive, limit=5)
    net.run(4 + seed * 0.13)
    victim = net.nodes[1 + seed % 4]
    victim.up = False
    crashed_at = net.now - T0
    detected = net.run_until(lambda: net.all_see(victim, MemberState.DEAD), limit=15)
    assert detected - crashed_at < 5.0


def test_suspected_but_alive_node_refutes_with_a_higher_incarnation():
    net = swarm(5, seed=3)
    net.run_until(net.everyone_sees_everyone_alive, limit=5)
    net.run(3)
    target = net.nodes[2]
    start = net.now
    net.drop = lambda src, dst, kind, now: dst == target.index and now < start + 1.5
    net.run(net.now - T0 + 6)
    net.drop = None
    net.run_until(net.everyone_sees_everyone_alive, limit=20)
    suspected = any(
        state is MemberState.SUSPECT
        for viewer in net.nodes
        for _, state in net.changes(viewer, target)
    )
    assert suspected
    assert target.core.statistics()["refutations"] >= 1
    for viewer in net.nodes:
        if viewer is not target:
            member = viewer.core.member(target.node_id)
            assert member is not None and member.incarnation == target.seq > 1


def test_restarted_node_with_a_higher_seq_rejoins_alive():
    net = swarm(5, seed=4)
    net.run_until(net.everyone_sees_everyone_alive, limit=5)
    victim = net.nodes[4]
    victim.up = False
    net.run_until(lambda: net.all_see(victim, MemberState.DEAD), limit=20)
    net.restart(victim, join_via=0)
    net.run_until(net.everyone_sees_everyone_alive, limit=net.now - T0 + 5)
    for viewer in net.nodes[:4]:
        member = viewer.core.member(victim.node_id)
        assert member is not None and member.incarnation == victim.seq == 2


def test_quick_restart_before_detection_rejoins_alive():
    net = swarm(5, seed=5)
    net.run_until(net.everyone_sees_everyone_alive, limit=5)
    victim = net.nodes[2]
    victim.up = False
    net.run(net.now - T0 + 0.4)
    net.restart(victim, join_via=0)
    net.run(net.now - T0 + 10)
    assert net.everyone_sees_everyone_alive()
    assert all(v.core.member(victim.node_id).incarnation >= 2 for v in net.nodes if v is not victim)


def test_leaving_node_is_seen_as_left_by_everyone():
    net = swarm(5, seed=6)
    net.run_until(net.everyone_sees_everyone_alive, limit=5)
    leaver = net.nodes[1]
    net.schedule(leaver, 0.0, LeaveRequested())
    net.run(net.now - T0 + 1)
    leaver.up = False
    net.run_until(lambda: net.all_see(leaver, MemberState.LEFT), limit=net.now - T0 + 3)
    assert leaver.core.member(leaver.node_id).state is MemberState.LEFT


def test_broadcast_reaches_every_node_exactly_once():
    net = swarm(6, seed=8)
    net.run_until(net.everyone_sees_everyone_alive, limit=5)
    origin = net.nodes[0]
    origin.core.enqueue_broadcast("routes", b"fd00::1", b"claim-1")
    net.schedule(origin, 0.0, None)
    net.run(net.now - T0 + 5)
    origin.core.enqueue_broadcast("routes", b"fd00::1", b"claim-2")
    net.schedule(origin, 0.0, None)
    net.run(net.now - T0 + 5)
    for node in net.nodes:
        got = [e.payload for _, e in node.log if isinstance(e, DeliverBroadcast)]
        assert got == ([] if node is origin else [b"claim-1", b"claim-2"])


def effect_trace(seed: int) -> list[tuple[float, int, Effect]]:
    net = swarm(5, seed=seed)
    net.run(3)
    net.nodes[2].up = False
    net.run(8)
    return sorted(
        ((at, node.index, effect) for node in net.nodes for at, effect in node.log),
        key=lambda item: (item[0], item[1]),
    )


def test_same_seed_same_effects():
    first, second = effect_trace(11), effect_trace(11)
    assert len(first) > 100
    assert first == second
    assert effect_trace(12) != first


def lossy_swarm(config: MembershipConfig) -> Net:
    """Twenty nodes over a network that loses 20 % of messages, run 30 s past convergence."""
    net = swarm(20, seed=21, config=config)
    loss = random.Random(99)
    net.drop = lambda src, dst, kind, now: loss.random() < 0.2
    converged = net.run_until(net.everyone_sees_everyone_alive, limit=30)
    net.run(converged + 30)
    return net


def test_a_second_probe_round_makes_false_suspicions_rare_under_loss():
    one = lossy_swarm(MembershipConfig(probe_rounds=1))
    two = lossy_swarm(CONFIG)
    assert CONFIG.probe_rounds == 2
    failed = [sum(n.core.statistics()["probes_failed"] for n in net.nodes) for net in (one, two)]
    suspected = [sum(n.core.statistics()["refutations"] for n in net.nodes) for net in (one, two)]
    assert failed[1] > 10  # single rounds fail as often as before ...
    assert suspected[0] > 3 * suspected[1]  # ... but a second round clears most of them
    assert sum(n.core.statistics()["probe_retries"] for n in two.nodes) > 0


def test_twenty_nodes_converge_under_twenty_percent_loss():
    # one probe round (memberlist's rule): loss causes false suspicions, all refuted
    net = swarm(20, seed=21, config=MembershipConfig(probe_rounds=1))
    loss = random.Random(99)
    net.drop = lambda src, dst, kind, now: loss.random() < 0.2
    converged = net.run_until(net.everyone_sees_everyone_alive, limit=30)
    assert converged < 15
    net.run(converged + 30)
    # Loss causes false suspicions; each is refuted, none ends in a permanent death.
    for viewer in net.nodes:
        for subject in net.nodes:
            if subject is not viewer:
                member = viewer.core.member(subject.node_id)
                assert member is not None and member.state in (
                    MemberState.ALIVE,
                    MemberState.SUSPECT,
                )
                states = [state for _, state in net.changes(viewer, subject)]
                if MemberState.DEAD in states:
                    assert states[-1] is not MemberState.DEAD
    assert sum(n.core.statistics()["refutations"] for n in net.nodes) > 0
    net.drop = None
    net.run_until(net.everyone_sees_everyone_alive, limit=net.now - T0 + 5)


def test_accused_at_an_old_seq_retells_its_current_record():
    me = Peer(0, seq=3)
    core = Membership(me.record, CONFIG, random.Random(1))
    peer = Peer(1)
    core.handle(gossip(peer, alive(peer.record)), T0)
    core.tick(T0)
    effects = core.handle(gossip(peer, claim(UpdateKind.SUSPECT, me.node_id, 2, peer)), T0)
    assert not any(isinstance(e, RefreshOwnRecord) for e in effects)
    assert core.statistics()["updates_stale"] == 1
    effects = core.handle(MessageReceived(peer.node_id, MessageType.PING, {"nonce": 1}, ""), T0)
    (ack,) = sends(effects, MessageType.ACK)
    assert alive(me.record) in ack.body["updates"]


def test_a_forgotten_dead_node_is_told_it_is_dead_when_it_pings():
    core, _ = lone_core()
    ghost, accuser = Peer(1), Peer(2)
    core.handle(gossip(accuser, alive(ghost.record), alive(accuser.record)), T0)
    core.handle(gossip(accuser, claim(UpdateKind.DEAD, ghost, 1, accuser)), T0)
    core.tick(T0 + CONFIG.dead_reclaim_s + 1)
    assert core.member(ghost.node_id) is None
    via = "198.51.100.66:7946"
    ping = MessageReceived(ghost.node_id, MessageType.PING, {"nonce": 3}, via)
    effects = core.handle(ping, T0 + 40)
    (ack,) = [e for e in effects if isinstance(e, SendToEndpoint)]  # no JOIN for a ghost
    assert ack.endpoint == via and ack.msg_type is MessageType.ACK
    assert ack.body["updates"][0] == encode_update(
        Claim(UpdateKind.DEAD, ghost.node_id, 1, core.node_id)
    )


def test_join_reply_records_are_merged_and_record_messages_too():
    core, _ = lone_core()
    sender, a, b = Peer(1), Peer(2), Peer(3)
    body = {"records": [sender.record.blob, a.record.blob, b"junk"]}
    core.handle(MessageReceived(sender.node_id, MessageType.JOIN_REPLY, body, ""), T0)
    assert {m.node_id for m in core.members()} == {sender.node_id, a.node_id}
    assert core.statistics()["updates_rejected"] == 1
    core.handle(
        MessageReceived(sender.node_id, MessageType.RECORD, {"record": b.record.blob}, ""), T0
    )
    assert core.alive_count() == 3


def test_periodic_sync_joins_a_random_member():
    core, me = lone_core()
    peer = Peer(1)
    core.handle(gossip(peer, alive(peer.record)), T0)
    joins = []
    for step in range(int(CONFIG.sync_interval_s / 0.1) + 10):
        effects = core.tick(T0 + step * 0.1)
        joins += sends(effects, MessageType.JOIN)
        for ping in sends(effects, MessageType.PING):  # the peer stays alive
            ack = {"nonce": ping.body["nonce"]}
            core.handle(MessageReceived(peer.node_id, MessageType.ACK, ack, ""), T0 + step * 0.1)
    assert [j.target for j in joins] == [peer.node_id]
    assert joins[0].body["record"] == me.record.blob


def test_a_leaving_core_stops_probing_and_does_not_refute():
    core, me = lone_core()
    peer = Peer(1)
    core.handle(gossip(peer, alive(peer.record)), T0)
    effects = core.handle(LeaveRequested(), T0)
    (notice,) = sends(effects, MessageType.GOSSIP)
    left = encode_update(Claim(UpdateKind.DEAD, me.node_id, 1, me.node_id))
    assert left in notice.body["updates"]
    later = core.tick(T0 + 5) + core.handle(
        gossip(peer, claim(UpdateKind.DEAD, me.node_id, 1, peer)), T0 + 5
    )
    assert not any(isinstance(e, RefreshOwnRecord) for e in later)
    assert sends(later, MessageType.PING) == []
    assert core.member(me.node_id).state is MemberState.LEFT


def test_probe_list_is_rebuilt_once_per_pass_not_per_probe(monkeypatch):
    """The O(n) reshuffle runs once per n probes: per-probe work does not grow with n."""
    core, _ = lone_core()
    members = 300
    for i in range(members):
        peer = Peer(100 + i)
        core.handle(gossip(peer, alive(peer.record)), T0)
    rebuilds = []
    original = RandomSet.__iter__
    monkeypatch.setattr(RandomSet, "__iter__", lambda self: rebuilds.append(1) or original(self))
    probed = []
    now = T0
    for _ in range(2 * members):
        now += CONFIG.probe_interval_s
        for effect in sends(core.tick(now), MessageType.PING):
            probed.append(effect.target)
            ack = {"nonce": effect.body["nonce"]}
            core.handle(MessageReceived(effect.target, MessageType.ACK, ack, ""), now)
    assert len(rebuilds) <= 3
    assert len(set(probed[:members])) == members  # every member once per pass


@pytest.mark.parametrize("size", [10, 200, 300, 2000])
def test_alive_updates_start_with_the_prefix_the_fast_path_checks(size):
    assert encode_update(Alive(bytes(size))).startswith(ALIVE_PREFIX)


def test_duplicate_records_skip_the_signature_check():
    calls = []

    def counting_decoder(blob: bytes) -> PeerRecord:
        calls.append(blob)
        return decode_record(blob)

    me = Peer(0)
    core = Membership(me.record, CONFIG, random.Random(1), record_decoder=counting_decoder)
    peer = Peer(1)
    for _ in range(5):
        core.handle(gossip(peer, alive(peer.record), alive(me.record)), T0)
        body = {"records": [peer.record.blob, me.record.blob]}
        core.handle(MessageReceived(peer.node_id, MessageType.JOIN_REPLY, body, ""), T0)
    assert calls == [peer.record.blob]
    assert core.statistics()["updates_duplicate"] == 19
