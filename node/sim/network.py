"""The simulated network: latency, loss, partitions, and who sent how much.

Theory of operation
-------------------
Nodes are numbered 0..n-1. Every message one node sends to another goes
through ``transit(source, target, now)``, which either drops it (``None``) or
says how long it travels. The model, and its limits:

- *Latency.* Each node gets a seeded position in a unit square; the one-way
  delay between two nodes is ``base_s + distance * spread_s`` plus a jitter drawn
  uniformly from ``[0, jitter_s)`` per message (so messages between a pair can
  overtake one another, as UDP datagrams may). This is the usual "network
  coordinates" idea (Vivaldi, Serf's simulator): a metric space, so no
  triangle-inequality violations, no asymmetric routes, no queueing.
- *Loss.* Each message is dropped independently with probability ``loss``
  (Serf's convergence model does the same). No burst loss, no correlation
  between a request and its reply.
- *Partitions.* During ``[start, end)`` a partition is a set of nodes that can
  reach each other but nobody outside (both directions). Overlapping
  partitions each cut their own boundary.
- *Bandwidth and CPU* are not modelled: a message of any size takes the same
  time, and handling one takes no simulated time. A node that is down
  (``up[node]`` false) neither sends nor receives.

Counters: per node, messages and bytes sent and received. Bytes are the size of
the frame ``node.base.wire.encode_frame`` would put in one UDP datagram (the body's
real msgpack encoding plus ``FRAME_OVERHEAD_BYTES`` of envelope, checked against
the real encoder by a test); IP, UDP and WireGuard headers are not included.

All randomness comes from the ``random.Random`` handed in, so a seed replays.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import msgpack

# the frame envelope around a body of 256 B..64 KiB: fixarray(6), version, type,
# sender (bin8 header + 32), seq as uint32 (5), body bin16 header (3), nil signature
FRAME_OVERHEAD_BYTES = 1 + 1 + 1 + 34 + 5 + 3 + 1


@dataclass(frozen=True, slots=True)
class LatencyModel:
    base_s: float = 0.001
    spread_s: float = 0.040  # a unit of distance in the square (the diagonal is 1.41 units)
    jitter_s: float = 0.002


@dataclass(frozen=True, slots=True)
class Partition:
    """Nodes `members` are cut off from everyone else during [start, end)."""

    start: float
    end: float
    members: frozenset[int]


@dataclass(slots=True)
class Traffic:
    """Per-node counters, one list entry per node."""

    messages_sent: list[int]
    bytes_sent: list[int]
    messages_received: list[int]
    bytes_received: list[int]

    @classmethod
    def zero(cls, nodes: int) -> Traffic:
        return cls([0] * nodes, [0] * nodes, [0] * nodes, [0] * nodes)

    def grow(self, nodes: int) -> None:
        for counts in (
            self.messages_sent,
            self.bytes_sent,
            self.messages_received,
            self.bytes_received,
        ):
            counts.extend([0] * (nodes - len(counts)))


class Network:
    """Decides each message's fate and counts traffic. Sans-IO, seeded."""

    def __init__(
        self,
        rng: random.Random,
        latency: LatencyModel,
        loss: float = 0.0,
        partitions: Iterable[Partition] = (),
    ) -> None:
        if not 0.0 <= loss < 1.0:
            raise ValueError("loss must be in [0, 1)")
        self.rng = rng
        self.latency = latency
        self.loss = loss
        self.partitions = list(partitions)
        self.positions: list[tuple[float, float]] = []
        self.up: list[bool] = []
        self.traffic = Traffic.zero(0)
        self.dropped_loss = 0
        self.dropped_partition = 0
        self.dropped_down = 0

    def add_node(self) -> int:
        """A new node at a seeded position; returns its number."""
        self.positions.append((self.rng.random(), self.rng.random()))
        self.up.append(True)
        self.traffic.grow(len(self.positions))
        return len(self.positions) - 1

    def delay(self, source: int, target: int) -> float:
        """The one-way delay without jitter."""
        (x1, y1), (x2, y2) = self.positions[source], self.positions[target]
        return self.latency.base_s + math.hypot(x1 - x2, y1 - y2) * self.latency.spread_s

    def cut(self, source: int, target: int, now: float) -> bool:
        """A partition separates `source` and `target` at `now`."""
        for partition in self.partitions:
            if partition.start <= now < partition.end and (
                (source in partition.members) != (target in partition.members)
            ):
                return True
        return False

    def transit(self, source: int, target: int, size: int, now: float) -> float | None:
        """Count a message of `size` bytes; its travel time, or None if it is lost."""
        if not self.up[source]:
            return None
        traffic = self.traffic
        traffic.messages_sent[source] += 1
        traffic.bytes_sent[source] += size
        if self.loss and self.rng.random() < self.loss:
            self.dropped_loss += 1
            return None
        if self.partitions and self.cut(source, target, now):
            self.dropped_partition += 1
            return None
        jitter = self.rng.random() * self.latency.jitter_s
        return self.delay(source, target) + jitter

    def arrived(self, target: int, size: int) -> bool:
        """Count a delivery at `target`; False (dropped) if it is down."""
        if not self.up[target]:
            self.dropped_down += 1
            return False
        self.traffic.messages_received[target] += 1
        self.traffic.bytes_received[target] += size
        return True


def frame_size(body: dict[str, Any]) -> int:
    """Bytes of the frame that would carry `body` (see FRAME_OVERHEAD_BYTES)."""
    return len(msgpack.packb(body, use_bin_type=True)) + FRAME_OVERHEAD_BYTES
