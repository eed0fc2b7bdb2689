"""The simulator's event loop: a heap of (time, seq, node, event) and one seeded RNG.

Theory of operation
-------------------
A simulation is a set of nodes, each holding the same sans-IO cores the agent
runs, and a ``Simulator`` that orders everything that happens to them. Work is
scheduled as ``(time, seq, node, event)`` on one heap; ``seq`` is a counter, so
events at the same instant run in the order they were scheduled and a run never
depends on how Python compares events. ``run(until)`` pops the earliest entry,
sets ``now``, hands it to the scenario's ``deliver`` callback (which feeds the
cores and schedules what their effects cause), then calls every registered
invariant. A failing invariant raises ``InvariantViolated`` with the time, the
step number and the event, so a failing seed is replayed by running it again.

All randomness comes from ``rng`` (one ``random.Random(seed)``) or from streams
split off it with ``fork(label)``: a fork is seeded from the root seed and the
label, not from the root stream's position, so adding a new consumer of
randomness does not change what the others draw.

Nothing here reads the wall clock or does I/O; the same seed gives the same
sequence of ``deliver`` calls, byte for byte.
"""

from __future__ import annotations

import hashlib
import heapq
import random
from collections.abc import Callable, Hashable
from typing import Any

Deliver = Callable[[float, Hashable, Any], None]
Invariant = Callable[[float], str | None]


class InvariantViolated(AssertionError):
    def __init__(self, name: str, message: str, now: float, step: int, event: object) -> None:
        where = f"at t={now:.6f} step {step}"
        super().__init__(f"invariant {name} broken {where}: {message} ({event!r})")
        self.name = name
        self.now = now
        self.step = step


class Simulator:
    """One simulation's clock, event heap and random streams."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.now = 0.0
        self.steps = 0
        self._heap: list[tuple[float, int, Hashable, Any]] = []
        self._seq = 0
        self._invariants: list[tuple[str, Invariant]] = []

    def fork(self, label: str) -> random.Random:
        """An independent random stream named `label`, fixed by the seed alone."""
        digest = hashlib.blake2b(f"{self.seed}/{label}".encode(), digest_size=8).digest()
        return random.Random(int.from_bytes(digest, "big"))

    def at(self, time: float, node: Hashable, event: Any) -> None:
        """Schedule `event` for `node` at absolute simulated `time`; ValueError if in the past."""
        if not time >= self.now:  # also refuses NaN
            raise ValueError(
                f"cannot schedule {event!r} for {node!r} at {time!r}, before now {self.now!r}"
            )
        heapq.heappush(self._heap, (time, self._seq, node, event))
        self._seq += 1

    def after(self, delay: float, node: Hashable, event: Any) -> None:
        self.at(self.now + delay, node, event)

    def add_invariant(self, name: str, check: Invariant) -> None:
        """`check(now)` returns None when all is well, or what is wrong."""
        self._invariants.append((name, check))

    def pending(self) -> int:
        return len(self._heap)

    def run(self, until: float, deliver: Deliver) -> None:
        """Deliver every event scheduled before `until`, in order; `now` ends at `until`."""
        heap = self._heap
        invariants = self._invariants
        while heap and heap[0][0] < until:
            time, _, node, event = heapq.heappop(heap)
            self.now = time
            self.steps += 1
            deliver(time, node, event)
            for name, check in invariants:
                problem = check(time)
                if problem is not None:
                    raise InvariantViolated(name, problem, time, self.steps, event)
        self.now = max(self.now, until)
