"""The transmit queue: the news a node still has to pass on, each item a bounded number
of times.

Theory of operation
-------------------
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

Invariants
----------
- A queue key is in at most one bucket; an item has been handed out as many
  times as its bucket's index. ``take`` returns at most ``max_count`` items whose
  sizes, each with msgpack's item header, add up to at most ``max_bytes``.
"""

from __future__ import annotations

import math
from collections.abc import Hashable

ITEM_OVERHEAD_BYTES = 5  # the largest msgpack bin header (bin 32)
DEFAULT_MAX_ITEMS = 4096
TIERS = 2  # queue tiers: 0 for records and broadcasts, 1 for SUSPECT and DEAD claims


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
