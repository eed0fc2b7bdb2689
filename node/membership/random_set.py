"""Randomness for the cores: the ``RandomSource`` they are handed, and ``RandomSet``.

Theory of operation
-------------------
``RandomSet`` is a set with O(1) add, discard and uniform choice (a list plus an
index map; removal swaps the last item into the hole), so gossip targets, probe
helpers and join samples never scan the membership. It may share an immutable
base (a seeded table's roster) and keep only its own differences from it.

Nothing here reads a clock or a global random source: the randomness is a
``RandomSource`` handed in (a seeded ``random.Random``), so a seeded run replays.
"""

from __future__ import annotations

from collections.abc import Container, Hashable, Iterator, Mapping, MutableSequence, Sequence
from typing import Any, Generic, Protocol, TypeVar

T = TypeVar("T", bound=Hashable)


class RandomSource(Protocol):
    """The part of ``random.Random`` the cores use; pass a seeded ``random.Random``."""

    def random(self) -> float: ...

    def randrange(self, start: int, stop: int | None = None, step: int = 1) -> int: ...

    def shuffle(self, x: MutableSequence[Any]) -> None: ...

    def getrandbits(self, k: int, /) -> int: ...


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
