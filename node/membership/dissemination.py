"""SWIM's dissemination component: updates, the member table, and spreading news.

SWIM has two halves: a failure detector (probing; node/membership/swim.py) and a
dissemination component that spreads what it finds and keeps every node's member
list by the same rules. This module is the second half, with no I/O.

Theory of operation
-------------------
News travels as *updates*, each a msgpack-encoded ``bytes`` item of the
``updates`` list that PING, ACK, PING_REQ and GOSSIP carry:

    [0, record_blob]                  ALIVE: a signed peer record, self-certifying
    [1, node, incarnation, accuser]   SUSPECT: a claim by `accuser` (32-byte ids)
    [2, node, incarnation, accuser]   DEAD: likewise; accuser == node means LEFT
    [3, topic, key, payload]          BROADCAST: opaque news for a layer above

``decode_update`` checks shapes and limits and raises only RemoteProtocolError.

``MemberTable`` holds the newest verified record of every other node, its state
and the time of the last change. The incarnation is the record's seq. ALIVE{i}
beats anything below i; SUSPECT{i} beats ALIVE{i}; DEAD{i} beats both; a claim
above the held seq is refused, one below it is stale. A suspicion dies into DEAD
at a deadline (``suspicion_timeout(n, confirmations)``, Lifeguard-style: more
independent accusers, sooner), kept in a heap whose stale items are skipped. The
dead are forgotten after ``dead_reclaim_s`` but leave a tombstone (their seq), so
a late copy of the dead record cannot bring them back; only a higher seq can.
Every change is reported through ``on_change`` and queued as news.

``TransmitLimitedQueue`` (memberlist's idea) holds the news still to pass on.
Each item is handed out at most ``retransmit_mult * ceil(log10(n + 1))`` times:
enough for an epidemic to reach all ``n`` nodes with high probability. Records
(ALIVE) and broadcasts go in the first of two tiers, SUSPECT and DEAD claims in
the second, and the second is drawn from only when the first has nothing left
that fits: a flood of suspicions on a lossy network cannot starve a join, a
refutation or a route claim (it starved them before, docs/simulator.md).
Within a tier the least-sent go first, the newest first among equals. An item queued under the key
of a queued one replaces it (a newer state of the member, a newer broadcast for
the same topic and key). Items live in buckets by transmit count (about twenty
even for 10,000 nodes), so taking ``k`` items costs O(k + limit).

``RandomSet`` is a set with O(1) add, discard and uniform choice (a list plus an
index map; removal swaps the last item into the hole), so gossip targets, probe
helpers and join samples never scan the membership. ``SeenSet`` remembers the
digests of the newest broadcasts, bounded.

Invariants
----------
- A member's incarnation is its held record's seq; the table never holds this
  node itself. ``live`` is exactly the ALIVE and SUSPECT members, ``alive`` the
  ALIVE ones, ``known`` every member not yet forgotten.
- A queue key is in at most one bucket; an item has been handed out as many
  times as its bucket's index. ``take`` returns at most ``max_count`` items whose
  sizes, each with msgpack's item header, add up to at most ``max_bytes``.
- Nothing here reads a clock or a global random source.
"""

from __future__ import annotations

import enum
import hashlib
import heapq
import math
from collections import Counter, deque
from collections.abc import (
    Callable,
    Container,
    Hashable,
    Iterable,
    Iterator,
    Mapping,
    MutableSequence,
    Sequence,
)
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import msgpack

from node.base.identity import NodeId
from node.base.records import PeerRecord
from node.base.wire import MAX_SEQ, RemoteProtocolError, unpack_limited

ITEM_OVERHEAD_BYTES = 5  # the largest msgpack bin header (bin 32)
DEFAULT_MAX_ITEMS = 4096
MAX_TOPIC_BYTES = 64
MAX_KEY_BYTES = 256
MAX_BROADCAST_PAYLOAD_BYTES = 4096
MAX_TOMBSTONES = 65536
TIERS = 2  # queue tiers: 0 for records and broadcasts, 1 for SUSPECT and DEAD claims

T = TypeVar("T", bound=Hashable)


class RandomSource(Protocol):
    """The part of ``random.Random`` the cores use; pass a seeded ``random.Random``."""

    def random(self) -> float: ...

    def randrange(self, start: int, stop: int | None = None, step: int = 1) -> int: ...

    def shuffle(self, x: MutableSequence[Any]) -> None: ...

    def getrandbits(self, k: int, /) -> int: ...


class UpdateKind(enum.IntEnum):
    ALIVE = 0
    SUSPECT = 1
    DEAD = 2
    BROADCAST = 3


ALIVE_PREFIX = b"\x92\x00"  # how every encoded ALIVE update starts: msgpack [0, ...]


@dataclass(frozen=True, slots=True)
class Alive:
    blob: bytes


@dataclass(frozen=True, slots=True)
class Claim:
    kind: UpdateKind  # SUSPECT or DEAD
    node: NodeId
    incarnation: int
    accuser: NodeId


@dataclass(frozen=True, slots=True)
class Broadcast:
    topic: str
    key: bytes
    payload: bytes


Update = Alive | Claim | Broadcast


def encode_update(update: Update) -> bytes:
    if isinstance(update, Alive):
        items: list[Any] = [UpdateKind.ALIVE, update.blob]
    elif isinstance(update, Claim):
        items = [update.kind, update.node.key, update.incarnation, update.accuser.key]
    else:
        items = [UpdateKind.BROADCAST, update.topic, update.key, update.payload]
    packed: bytes = msgpack.packb(items, use_bin_type=True)
    return packed


def decode_update(data: object) -> Update:
    """Parse one update. Raises RemoteProtocolError only."""
    if not isinstance(data, bytes):
        raise RemoteProtocolError("update is not bytes")
    items = unpack_limited(data)
    if not isinstance(items, list) or not items or type(items[0]) is not int:
        raise RemoteProtocolError("update is not [kind, ...]")
    kind = items[0]
    if kind == UpdateKind.ALIVE and len(items) == 2 and isinstance(items[1], bytes):
        return Alive(items[1])
    if kind in (UpdateKind.SUSPECT, UpdateKind.DEAD) and len(items) == 4:
        _, node, incarnation, accuser = items
        if not (_is_key(node) and _is_key(accuser)):
            raise RemoteProtocolError("claim node or accuser is not a 32-byte id")
        if type(incarnation) is not int or not 0 <= incarnation <= MAX_SEQ:
            raise RemoteProtocolError("claim incarnation is not a uint64")
        return Claim(UpdateKind(kind), NodeId(node), incarnation, NodeId(accuser))
    if kind == UpdateKind.BROADCAST and len(items) == 4:
        _, topic, key, payload = items
        check_broadcast(topic, key, payload, RemoteProtocolError)
        return Broadcast(topic, key, payload)
    raise RemoteProtocolError(f"malformed update of kind {kind}")


def check_broadcast(topic: object, key: object, payload: object, error: type[Exception]) -> None:
    """Raise `error` unless topic, key and payload are within the broadcast limits."""
    if not isinstance(topic, str) or not 0 < len(topic.encode()) <= MAX_TOPIC_BYTES:
        raise error("broadcast topic is not a short string")
    if not isinstance(key, bytes) or len(key) > MAX_KEY_BYTES:
        raise error("broadcast key is not short bytes")
    if not isinstance(payload, bytes) or len(payload) > MAX_BROADCAST_PAYLOAD_BYTES:
        raise error("broadcast payload is not bytes within the limit")


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


def _is_key(value: object) -> bool:
    return isinstance(value, bytes) and len(value) == 32


def retransmit_limit(retransmit_mult: int, members: int) -> int:
    """How many times one item is sent in a swarm of `members` nodes (at least `mult`)."""
    return retransmit_mult * max(1, math.ceil(math.log10(members + 1)))


class TransmitLimitedQueue:
    """Updates waiting to be piggybacked, least-sent first, each sent a bounded number of times.

    Items are queued in one of ``TIERS`` tiers; ``take`` empties the buckets of
    tier 0 before it looks at tier 1, so news queued in tier 0 (records and
    broadcasts) cannot starve behind a flood of tier-1 items (claims).
    """

    def __init__(self, retransmit_mult: int, max_items: int = DEFAULT_MAX_ITEMS) -> None:
        if retransmit_mult < 1 or max_items < 1:
            raise ValueError("retransmit_mult and max_items must be at least 1")
        self._mult = retransmit_mult
        self._max_items = max_items
        self._tiers: list[list[dict[Hashable, bytes]]] = [[{}] for _ in range(TIERS)]
        self._where: dict[Hashable, tuple[int, int]] = {}  # key: (tier, transmits)

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, key: object) -> bool:
        return key in self._where

    def transmits(self, key: Hashable) -> int | None:
        """How often the item under `key` has been handed out; None if not queued."""
        where = self._where.get(key)
        return None if where is None else where[1]

    def enqueue(self, key: Hashable, payload: bytes, tier: int = 0) -> None:
        """Queue `payload` under `key` in `tier`, replacing any queued item with that key."""
        self.discard(key)
        self._tiers[tier][0][key] = payload
        self._where[key] = (tier, 0)
        if len(self._where) > self._max_items:
            self._drop_most_sent()

    def discard(self, key: Hashable) -> None:
        where = self._where.pop(key, None)
        if where is not None:
            del self._tiers[where[0]][where[1]][key]

    def take(self, members: int, max_count: int, max_bytes: int) -> list[bytes]:
        """Hand out up to `max_count` items within `max_bytes`: by tier, then least-sent and
        newest first."""
        if not self._where:
            return []
        limit = retransmit_limit(self._mult, members)
        picked: list[tuple[int, int, Hashable, bytes]] = []
        used = 0
        scanned = 0
        in_order = (
            (tier, count, bucket)
            for tier, buckets in enumerate(self._tiers)
            for count, bucket in enumerate(buckets)
        )
        for tier, count, bucket in in_order:
            if len(picked) >= max_count or scanned > 4 * max_count:
                break
            if count >= limit:  # the swarm shrank: these were sent often enough
                for key in bucket:
                    del self._where[key]
                bucket.clear()
                continue
            for key in reversed(bucket):
                scanned += 1
                payload = bucket[key]
                size = len(payload) + ITEM_OVERHEAD_BYTES
                if used + size <= max_bytes:
                    picked.append((tier, count, key, payload))
                    used += size
                    if len(picked) >= max_count:
                        break
                if scanned > 4 * max_count:  # items too big for what is left: stop looking
                    break
        for tier, count, key, payload in picked:
            buckets = self._tiers[tier]
            del buckets[count][key]
            if count + 1 >= limit:
                del self._where[key]
                continue
            if count + 1 == len(buckets):
                buckets.append({})
            buckets[count + 1][key] = payload
            self._where[key] = (tier, count + 1)
        return [payload for _, _, _, payload in picked]

    def _drop_most_sent(self) -> None:
        """Drop the most-sent item; of equally sent ones, the later tier's oldest (claims
        go before records)."""
        for count in range(max(len(buckets) for buckets in self._tiers) - 1, -1, -1):
            for buckets in reversed(self._tiers):
                if count < len(buckets) and buckets[count]:
                    oldest = next(iter(buckets[count]))
                    del buckets[count][oldest]
                    del self._where[oldest]
                    return


class RandomSet(Generic[T]):
    """A set with O(1) add, discard and uniform random sampling.

    It may start from a shared, immutable ``base`` (a tuple and its position
    index, never mutated here): then it keeps only its own differences from it,
    the base items it discarded and the items it added, so many sets that are
    nearly equal (every node's view of a converged swarm) share one copy.
    """

    def __init__(self, base: tuple[T, ...] = (), base_index: Mapping[T, int] | None = None) -> None:
        self._items: list[T] = []
        self._index: dict[T, int] = {}
        self._base = base
        self._base_index: Mapping[T, int] = base_index if base_index is not None else {}
        self._removed: set[T] = set()  # base items discarded

    def __len__(self) -> int:
        return len(self._base) - len(self._removed) + len(self._items)

    def __contains__(self, item: object) -> bool:
        if item in self._index:
            return True
        return item in self._base_index and item not in self._removed

    def __iter__(self) -> Iterator[T]:
        if not self._base:
            return iter(list(self._items))
        removed = self._removed
        return iter([item for item in self._base if item not in removed] + self._items)

    def snapshot(self) -> tuple[Sequence[T], list[T]]:
        """The items as (shared base, own copy); base items discarded since are still listed."""
        return self._base, list(self._items)

    def add(self, item: T) -> None:
        if item in self._base_index and item in self._removed:
            self._removed.discard(item)
        elif item not in self._index and item not in self._base_index:
            self._index[item] = len(self._items)
            self._items.append(item)

    def discard(self, item: T) -> None:
        position = self._index.pop(item, None)
        if position is None:
            if item in self._base_index and item not in self._removed:
                self._removed.add(item)
                if len(self._removed) > len(self._base) // 2:
                    self._own_everything()
            return
        last = self._items.pop()
        if position < len(self._items):
            self._items[position] = last
            self._index[last] = position

    def sample(self, rng: RandomSource, k: int, exclude: Container[T] = ()) -> list[T]:
        """Up to `k` distinct random items not in `exclude` (a small container)."""
        size = len(self)
        if k <= 0 or size == 0:
            return []
        if size <= 4 * k + 4:  # small set: a partial shuffle of the eligible items
            eligible = [item for item in self if item not in exclude]
            chosen: list[T] = []
            while eligible and len(chosen) < k:
                j = rng.randrange(len(eligible))
                eligible[j], eligible[-1] = eligible[-1], eligible[j]
                chosen.append(eligible.pop())
            return chosen
        chosen = []
        base, removed, items = self._base, self._removed, self._items
        slots = len(base) + len(items)
        for _ in range(8 * k):  # rejection sampling; misses are rare when size >> k
            slot = rng.randrange(slots)
            if slot < len(base):
                item = base[slot]
                if item in removed:
                    continue
            else:
                item = items[slot - len(base)]
            if item not in exclude and item not in chosen:
                chosen.append(item)
                if len(chosen) == k:
                    break
        return chosen

    def _own_everything(self) -> None:
        """Most of the base is gone: copy what is left, so sampling rarely misses."""
        self._items = list(self)
        self._index = {item: i for i, item in enumerate(self._items)}
        self._base, self._base_index, self._removed = (), {}, set()


class SeenSet:
    """The digests of the newest `capacity` distinct broadcasts seen."""

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._digests: dict[bytes, None] = {}

    def add(self, update: Broadcast) -> bool:
        """Remember `update`; False if it was already remembered."""
        digest = _digest(encode_update(update))
        if digest in self._digests:
            return False
        self._digests[digest] = None
        if len(self._digests) > self._capacity:
            del self._digests[next(iter(self._digests))]
        return True


# -- the member table ----------------------------------------------------------------


class MemberState(enum.Enum):
    ALIVE = "alive"
    SUSPECT = "suspect"
    DEAD = "dead"
    LEFT = "left"


LIVE = (MemberState.ALIVE, MemberState.SUSPECT)


@dataclass(frozen=True, slots=True)
class Member:
    """A read-only snapshot of one member."""

    node_id: NodeId
    record: PeerRecord
    state: MemberState
    incarnation: int
    since: float


@dataclass(slots=True)
class _Entry:
    record: PeerRecord
    state: MemberState
    since: float
    accusers: tuple[NodeId, ...] = ()
    suspect_deadline: float = math.inf


OnChange = Callable[[NodeId, MemberState, PeerRecord], None]


class Roster:
    """Verified, unexpired peer records of a swarm that agrees on them: shared, never mutated.

    ``MemberTable.seed`` starts a table from a roster instead of one JOIN per
    member; the table then stores only its differences from it. One roster can
    seed every node of a simulated swarm (n tables, one copy of n records).
    The records must have been verified (``decode_record``) by the caller.
    """

    def __init__(self, records: Iterable[PeerRecord], now: float) -> None:
        newest: dict[NodeId, PeerRecord] = {}
        for record in records:
            held = newest.get(record.node_id)
            if not record.is_expired(now) and (held is None or record.seq > held.seq):
                newest[record.node_id] = record
        self.records: Mapping[NodeId, PeerRecord] = newest
        self.ids: tuple[NodeId, ...] = tuple(newest)
        self.positions: Mapping[NodeId, int] = {node: i for i, node in enumerate(self.ids)}
        self.by_signature: Mapping[bytes, NodeId] = {
            r.signature: r.node_id for r in newest.values()
        }

    def __len__(self) -> int:
        return len(self.ids)


class MemberTable:
    """The other members, SWIM's precedence rules, suspicion timers and the news queue."""

    def __init__(
        self,
        own_id: NodeId,
        rng: RandomSource,
        stats: Counter[str],
        on_change: OnChange,
        *,
        retransmit_mult: int,
        dead_reclaim_s: float,
        suspicion_timeout: Callable[[int, int], float],
        max_accusers: int,
    ) -> None:
        self.own_id = own_id
        self.live: RandomSet[NodeId] = RandomSet()  # ALIVE and SUSPECT
        self.alive: RandomSet[NodeId] = RandomSet()
        self.known: RandomSet[NodeId] = RandomSet()  # every member not yet forgotten
        self.queue = TransmitLimitedQueue(retransmit_mult)
        self._rng = rng
        self._stats = stats
        self._on_change = on_change
        self._dead_reclaim_s = dead_reclaim_s
        self._timeout = suspicion_timeout
        self._max_accusers = max_accusers
        self._entries: dict[NodeId, _Entry] = {}
        self._held: dict[bytes, NodeId] = {}  # signature of each held record: its node
        self._tombstones: dict[NodeId, int] = {}  # forgotten dead: seq
        self._suspicions: list[tuple[float, int, NodeId]] = []  # heap, stale items skipped
        self._pushes = 0
        self._reclaims: deque[tuple[float, NodeId, float]] = deque()
        # the probe round-robin: a lazy Fisher-Yates shuffle of (base + extra), swaps kept sparse
        self._order_base: Sequence[NodeId] = ()
        self._order_extra: list[NodeId] = []
        self._order_swaps: dict[int, NodeId] = {}
        self._order_pos = 0
        # a seeded table: members of the roster not shadowed are ALIVE since `_roster_since`
        self._roster: Roster | None = None
        self._roster_since = 0.0
        self._shadowed: set[NodeId] = set()  # roster members with an entry of their own, or gone

    def seed(self, roster: Roster, now: float) -> None:
        """Start an empty table from `roster`: its members (not this node) are ALIVE since `now`.

        No news is queued and no change reported: the swarm already agrees on the
        roster. The table keeps only its differences from it afterwards.
        """
        if self._entries or self.known or self._roster is not None:
            raise ValueError("only an empty member table can be seeded")
        self._roster, self._roster_since = roster, now
        self._shadowed = {self.own_id}
        for name in ("live", "alive", "known"):
            members: RandomSet[NodeId] = RandomSet(roster.ids, roster.positions)
            members.discard(self.own_id)
            setattr(self, name, members)
        self._order_base, self._order_extra = self.live.snapshot()

    def __contains__(self, node: object) -> bool:
        return node in self._entries or self._in_roster(node)

    def get(self, node: NodeId) -> Member | None:
        entry = self._entries.get(node)
        if entry is None:
            if not self._in_roster(node):
                return None
            record = self._roster_record(node)
            return Member(node, record, MemberState.ALIVE, record.seq, self._roster_since)
        return Member(node, entry.record, entry.state, entry.record.seq, entry.since)

    def members(self) -> list[Member]:
        nodes = list(self._entries)
        if self._roster is not None:
            nodes += [node for node in self._roster.ids if node not in self._shadowed]
        return [m for m in map(self.get, nodes) if m is not None]

    def state_of(self, node: NodeId) -> MemberState | None:
        entry = self._entries.get(node)
        if entry is None:
            return MemberState.ALIVE if self._in_roster(node) else None
        return entry.state

    def record_of(self, node: NodeId) -> PeerRecord:
        entry = self._entries.get(node)
        return self._roster_record(node) if entry is None else entry.record

    def holds(self, data: bytes) -> bool:
        """True if `data` ends with the blob of a record we hold (a blob ends in its signature)."""
        signature = data[-64:]
        node = self._held.get(signature)
        if node is not None:
            return data.endswith(self._entries[node].record.blob)
        if self._roster is None:
            return False
        node = self._roster.by_signature.get(signature)
        return (
            node is not None
            and self._in_roster(node)
            and data.endswith(self._roster_record(node).blob)
        )

    def _in_roster(self, node: object) -> bool:
        roster = self._roster
        return roster is not None and node in roster.positions and node not in self._shadowed

    def _roster_record(self, node: NodeId) -> PeerRecord:
        assert self._roster is not None
        return self._roster.records[node]

    def _entry(self, node: NodeId) -> _Entry | None:
        """The entry of `node`, a roster member's made our own (copied on first change)."""
        entry = self._entries.get(node)
        if entry is None and self._in_roster(node):
            record = self._roster_record(node)
            entry = _Entry(record, MemberState.ALIVE, self._roster_since)
            self._entries[node] = entry
            self._held[record.signature] = node
            self._shadowed.add(node)
        return entry

    def tombstone(self, node: NodeId) -> int | None:
        return self._tombstones.get(node)

    def spread(self, update: Update, about: NodeId | None = None) -> None:
        """Queue news; it replaces queued news about the same member or broadcast key.

        Claims go in the queue's second tier: a record (a join, a refutation) or a
        broadcast is never held back by a flood of suspicions.
        """
        key = ("b", update.topic, update.key) if isinstance(update, Broadcast) else ("m", about)
        self.queue.enqueue(key, encode_update(update), 1 if isinstance(update, Claim) else 0)

    def learn(self, record: PeerRecord, now: float) -> None:
        """Offer a verified record of another node: ALIVE at its seq if newer than ours."""
        node = record.node_id
        if record.is_expired(now):
            self._stats["updates_rejected"] += 1
            return
        entry = self._entry(node)
        if entry is None:
            if record.seq <= self._tombstones.get(node, -1):
                self._stats["updates_stale"] += 1  # a late copy of a forgotten dead record
                return
            self._tombstones.pop(node, None)
            self._entries[node] = _Entry(record, MemberState.ALIVE, now)
            self._held[record.signature] = node
            self.known.add(node)
            self.alive.add(node)
            self._became_live(node)
        elif record.seq < entry.record.seq:
            self._stats["updates_stale"] += 1
            return
        elif record.seq == entry.record.seq:  # a re-encoded duplicate, or equivocation
            self._stats["updates_duplicate" if record == entry.record else "updates_rejected"] += 1
            return
        else:
            del self._held[entry.record.signature]
            self._held[record.signature] = node
            entry.record = record
            if entry.state is not MemberState.ALIVE:
                self._set_state(node, entry, MemberState.ALIVE, now)
                return
        self._stats["updates_applied"] += 1
        self._on_change(node, MemberState.ALIVE, record)
        self.spread(Alive(record.blob), node)

    def accuse(self, claim: Claim, now: float) -> None:
        """Apply a SUSPECT or DEAD claim about another node, by SWIM's precedence."""
        entry = self._entry(claim.node)
        if entry is None:
            self._stats["updates_ignored"] += 1  # about a node we do not know
        elif claim.incarnation < entry.record.seq:
            self._stats["updates_stale"] += 1  # already refuted
        elif claim.incarnation > entry.record.seq:
            self._stats["updates_rejected"] += 1  # an incarnation we never saw
        elif claim.kind is UpdateKind.SUSPECT:
            self._suspect(claim.node, entry, claim.accuser, now)
        else:
            self._kill(claim.node, entry, claim.accuser, now)

    def suspect(self, node: NodeId, now: float) -> None:
        """Our own probe of `node` failed."""
        entry = self._entry(node)
        if entry is not None and entry.state in LIVE:
            self._suspect(node, entry, self.own_id, now)

    def claim_about(self, node: NodeId) -> list[bytes]:
        """The claim we hold against `node` (none if ALIVE or unknown), for the buddy system."""
        entry = self._entries.get(node)
        if entry is None or entry.state is MemberState.ALIVE:
            return []
        kind = UpdateKind.SUSPECT if entry.state is MemberState.SUSPECT else UpdateKind.DEAD
        accuser = node if entry.state is MemberState.LEFT else (entry.accusers or (self.own_id,))[0]
        return [encode_update(Claim(kind, node, entry.record.seq, accuser))]

    def next_probe_target(self) -> NodeId | None:
        """The next live member of a shuffled round-robin, reshuffled every pass.

        The shuffle is Fisher-Yates done one step per probe over a snapshot of
        ``live`` taken at the start of the pass (for a seeded table, the shared
        roster plus a copy of the table's own additions): no O(n) copy or
        shuffle of the roster, and O(probes) memory for the swaps.
        """
        for _ in range(self._order_length() + 1 if self.live else 0):
            if self._order_pos >= self._order_length():
                self._order_base, self._order_extra = self.live.snapshot()
                self._order_swaps = {}
                self._order_pos = 0
            position = self._order_pos
            chosen = self._rng.randrange(position, self._order_length())
            node = self._order_at(chosen)
            if chosen != position:
                self._order_swaps[chosen] = self._order_at(position)
            self._order_swaps.pop(position, None)
            self._order_pos += 1
            if self.state_of(node) in LIVE:
                return node
        return None

    def _order_length(self) -> int:
        return len(self._order_base) + len(self._order_extra)

    def _order_at(self, position: int) -> NodeId:
        node = self._order_swaps.get(position)
        if node is not None:
            return node
        base = self._order_base
        return base[position] if position < len(base) else self._order_extra[position - len(base)]

    def next_deadline(self) -> float:
        return self._suspicions[0][0] if self._suspicions else math.inf

    def expire(self, now: float) -> None:
        """Suspicions past their deadline die; the dead are forgotten after `dead_reclaim_s`."""
        while self._suspicions and self._suspicions[0][0] <= now:
            deadline, _, node = heapq.heappop(self._suspicions)
            entry = self._entries.get(node)
            if entry and entry.state is MemberState.SUSPECT and entry.suspect_deadline == deadline:
                self._kill(node, entry, self.own_id, now)
        while self._reclaims and self._reclaims[0][0] <= now:
            _, node, since = self._reclaims.popleft()
            entry = self._entries.get(node)
            if entry is not None and entry.state not in LIVE and entry.since == since:
                del self._entries[node]
                del self._held[entry.record.signature]
                self.known.discard(node)
                self._tombstones[node] = entry.record.seq
                if len(self._tombstones) > MAX_TOMBSTONES:
                    del self._tombstones[next(iter(self._tombstones))]

    def _suspect(self, node: NodeId, entry: _Entry, accuser: NodeId, now: float) -> None:
        members = len(self.live) + 1
        if entry.state is MemberState.ALIVE:
            self._stats["suspicions"] += 1
            entry.accusers = (accuser,)
            self._set_state(node, entry, MemberState.SUSPECT, now)
            deadline = now + self._timeout(members, 0)
        elif entry.state is MemberState.SUSPECT and accuser not in entry.accusers:
            if len(entry.accusers) > self._max_accusers:
                self._stats["updates_duplicate"] += 1
                return
            self._stats["confirmations"] += 1
            entry.accusers += (accuser,)
            timeout = self._timeout(members, len(entry.accusers) - 1)
            deadline = min(entry.suspect_deadline, entry.since + timeout)
        else:
            self._stats["updates_duplicate"] += 1
            return
        entry.suspect_deadline = deadline
        self._pushes += 1
        heapq.heappush(self._suspicions, (deadline, self._pushes, node))
        self.spread(Claim(UpdateKind.SUSPECT, node, entry.record.seq, accuser), node)

    def _kill(self, node: NodeId, entry: _Entry, accuser: NodeId, now: float) -> None:
        if entry.state not in LIVE:
            self._stats["updates_duplicate"] += 1
            return
        left = accuser == node
        self._stats["leaves" if left else "deaths"] += 1
        self._set_state(node, entry, MemberState.LEFT if left else MemberState.DEAD, now)
        self._reclaims.append((now + self._dead_reclaim_s, node, now))
        self.spread(Claim(UpdateKind.DEAD, node, entry.record.seq, accuser), node)

    def _set_state(self, node: NodeId, entry: _Entry, state: MemberState, now: float) -> None:
        was_live = entry.state in LIVE
        entry.state, entry.since = state, now
        self._stats["updates_applied"] += 1
        if state is MemberState.ALIVE:
            self.alive.add(node)
            entry.accusers, entry.suspect_deadline = (), math.inf
        else:
            self.alive.discard(node)
        if state in LIVE and not was_live:
            self._became_live(node)
        elif state not in LIVE:
            self.live.discard(node)
        self._on_change(node, state, entry.record)
        if state is MemberState.ALIVE:
            self.spread(Alive(entry.record.blob), node)

    def _became_live(self, node: NodeId) -> None:
        self.live.add(node)
        self._order_extra.append(node)  # into the rest of the current pass, at a random place
