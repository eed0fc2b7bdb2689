"""The market world's timers: each modelled delay that ends, as its own type.

Theory of operation
-------------------
Besides ``Frame`` (a message arriving, node/sim/market_parts.py), everything the
market world (node/sim/market_world.py) puts on the simulator's heap is one of
these: small frozen records, one per occurrence, so a handler ``match``\\ es on
the type and a misspelt or unhandled one is a type error, not a silent no-op.

A host's: it comes up (``HostCameUp``) or goes down (``HostWentDown``) as its
availability says; a replica's modelled run ends (``ReplicaRan``, stale when
the host's generation moved on); membership declares it dead and it leaves
the owners' view (``DeathDeclared``).

An owner's: a job is submitted (``JobSubmitted``); an event is fed after the
batch that asked for it (``FeedDue``, the core's ``FeedLater``); a host's
death reaches it (``MemberLost``); a completion's checkpoint arrives
(``CheckpointFetched``) and is checked (``CheckpointChecked``); a checkpoint
is replicated here (``ReplicationEnded``).

Both: a core's ``next_wakeup`` is due (``Wake``). ``Wakeups`` keeps one
pending wake per node, the earliest asked for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from node.base.identity import NodeId
from node.market.jobs import OwnerEvent
from node.sim.engine import Simulator
from node.sim.market_parts import NodeKey


@dataclass(frozen=True, slots=True)
class Wake:
    """A core's next wakeup is due."""


@dataclass(frozen=True, slots=True)
class HostCameUp:
    pass


@dataclass(frozen=True, slots=True)
class HostWentDown:
    pass


@dataclass(frozen=True, slots=True)
class ReplicaRan:
    """The replica of offer ``digest`` ran its modelled time (in the host's ``generation``)."""

    digest: bytes
    generation: int


@dataclass(frozen=True, slots=True)
class DeathDeclared:
    """Membership declares the host dead: it leaves the view if it is still down."""


@dataclass(frozen=True, slots=True)
class JobSubmitted:
    job_id: bytes


@dataclass(frozen=True, slots=True)
class FeedDue:
    """Feed ``event`` to the job's machine (after the batch that asked for it)."""

    job_id: bytes
    event: OwnerEvent


@dataclass(frozen=True, slots=True)
class MemberLost:
    """The owner hears host ``host`` is dead (``detection_s`` after it went down)."""

    host: int


@dataclass(frozen=True, slots=True)
class CheckpointFetched:
    """``node``'s checkpoint for the job arrived, if host ``host`` stayed in ``generation``."""

    job_id: bytes
    node: NodeId
    manifest: bytes
    host: int
    generation: int


@dataclass(frozen=True, slots=True)
class CheckpointChecked:
    """The fetched checkpoint restored and showed progress (``verify_s`` later)."""

    job_id: bytes
    node: NodeId
    manifest: bytes


@dataclass(frozen=True, slots=True)
class ReplicationEnded:
    """The owner holds ``manifest`` now, if source ``host`` (-1: none) kept ``generation``."""

    job_id: bytes
    manifest: bytes
    host: int
    generation: int


HostTimer = Wake | HostCameUp | HostWentDown | ReplicaRan | DeathDeclared
OwnerTimer = (
    Wake
    | JobSubmitted
    | FeedDue
    | MemberLost
    | CheckpointFetched
    | CheckpointChecked
    | ReplicationEnded
)
WAKE = Wake()


class Wakeups:
    """One pending ``Wake`` per node: the earliest any of its cores asked for."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim
        self._at: dict[NodeKey, float] = {}

    def arm(self, key: NodeKey, when: float) -> None:
        when = max(when, self.sim.now)  # a core already due is woken now
        if math.isfinite(when) and when < self._at.get(key, math.inf):
            self._at[key] = when
            self.sim.at(when, key, WAKE)

    def woke(self, key: NodeKey, now: float) -> None:
        """A ``Wake`` for ``key`` arrived: the pending one, if it was due, is spent."""
        if self._at.get(key, math.inf) <= now:
            del self._at[key]
