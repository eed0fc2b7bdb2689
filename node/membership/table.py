"""The member table: every other node's newest record and state, by SWIM's rules.

SWIM has two halves: a failure detector (probing; node/membership/swim.py and
node/membership/detector.py) and a dissemination component that spreads what it
finds and keeps every node's member list by the same rules. This module is the
heart of the second half, with no I/O; the news it queues is encoded by
node/membership/codec.py and handed out by node/membership/queue.py.

Theory of operation
-------------------
``MemberTable`` holds the newest verified record of every other node, its state
and the time of the last change. The incarnation is the record's seq. ALIVE{i}
beats anything below i; SUSPECT{i} beats ALIVE{i}; DEAD{i} beats both; a claim
above the held seq is refused, one below it is stale. A suspicion dies into DEAD
at a deadline (``suspicion_timeout(n, confirmations)``, Lifeguard-style: more
independent accusers, sooner), kept in a heap whose stale items are skipped. The
dead are forgotten after ``dead_reclaim_s`` but leave a tombstone (their seq), so
a late copy of the dead record cannot bring them back; only a higher seq can.
Every change is reported through ``on_change`` and queued as news.

Invariants
----------
- A member's incarnation is its held record's seq; the table never holds this
  node itself. ``live`` is exactly the ALIVE and SUSPECT members, ``alive`` the
  ALIVE ones, ``known`` every member not yet forgotten.
- Nothing here reads a clock or a global random source.
"""

from __future__ import annotations

import enum
import heapq
import math
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from node.base.identity import NodeId
from node.base.records import PeerRecord
from node.membership.codec import Alive, Broadcast, Claim, Update, UpdateKind, encode_update
from node.membership.queue import TransmitLimitedQueue
from node.membership.random_set import RandomSet, RandomSource

MAX_TOMBSTONES = 65536


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
