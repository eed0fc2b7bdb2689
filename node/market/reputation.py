"""Reputation: how well each host kept the promises of its bids, as one owner saw them.

Theory of operation
-------------------
A bid promises a price, a finish time and, implicitly, that the host can run
the segment at all. Price is binding (the award fixes it); the other two are
only worth the host's record of keeping them. An owner keeps, per node:

- ``completions``: replicas that finished, counted when the segment's winner
  is verified (the winner, and losers that reported a completion by then);
- ``failures``: replicas lost (host gone, run deadline passed) or whose
  completion failed verification (``bad_completion_weight`` failures each);
- ``lateness``: an exponentially weighted mean of actual / estimated finish
  time over its completions (1.0 = on time; starts at 1.0).

Its score is the product of two numbers in (0, 1]::

    reliability = (completions + prior_completions)
                  / (completions + failures + prior_completions + prior_failures)
    punctuality = min(1, tolerance / lateness)
    score       = reliability * punctuality

The prior (2 completions, 1 failure by default) gives a newcomer 0.67: below a
proven host, above one that has failed as often as it finished. Punctuality
makes an optimistic estimate cost what it gained in the finish term of the
auction's score (node/market/auction.py): a host that always takes twice its estimate
scores half. The auction multiplies a bid's value by this score and ignores
bids below ``AuctionConfig.min_reliability``, so a *black hole* (a node that
advertises more than it can do and keeps winning work it then fails, the seed
slides' word) sinks below honest hosts after a few failures and then stops
being awarded at all. Cancelled losers are neither: they kept their word.

This book is one owner's own view (nothing here is gossiped, so no one can
smear a host in another owner's eyes). Pure: no I/O, no clock.

Invariants: every score is in (0, 1]; a completion never lowers a node's
reliability, a failure never raises it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from node.base.identity import NodeId


@dataclass(frozen=True, slots=True)
class ReputationConfig:
    prior_completions: float = 2.0
    prior_failures: float = 1.0
    tolerance: float = 1.25  # lateness up to this is not held against a node
    lateness_alpha: float = 0.3  # weight of the newest completion in the lateness mean
    bad_completion_weight: float = 2.0  # failures charged for a completion that fails checks

    def __post_init__(self) -> None:
        if self.prior_completions <= 0 or self.prior_failures < 0:
            raise ValueError("need prior_completions > 0 and prior_failures >= 0")
        if self.tolerance < 1 or not 0 < self.lateness_alpha <= 1:
            raise ValueError("need tolerance >= 1 and 0 < lateness_alpha <= 1")


@dataclass(frozen=True, slots=True)
class Standing:
    """One node's record and score."""

    node: NodeId
    awards: int
    completions: int
    failures: float
    lateness: float
    score: float


@dataclass(slots=True)
class _Record:
    awards: int = 0
    completions: int = 0
    failures: float = 0.0
    lateness: float = 1.0


class Reputation:
    """An owner's book of the hosts it awarded work to. See the module docstring."""

    def __init__(self, config: ReputationConfig | None = None) -> None:
        self.config = config or ReputationConfig()
        self._records: dict[NodeId, _Record] = {}
        self._stats: Counter[str] = Counter()

    def awarded(self, node: NodeId) -> None:
        self._record(node).awards += 1
        self._stats["awards"] += 1

    def completed(self, node: NodeId, estimate_s: float, actual_s: float) -> None:
        """``node`` finished a replica in ``actual_s`` seconds, having promised ``estimate_s``."""
        record = self._record(node)
        record.completions += 1
        ratio = max(actual_s, 0.0) / max(estimate_s, 1.0)
        alpha = self.config.lateness_alpha
        record.lateness = (1 - alpha) * record.lateness + alpha * ratio
        self._stats["completions"] += 1

    def failed(self, node: NodeId, *, bad_completion: bool = False) -> None:
        """``node`` lost a replica, or (``bad_completion``) completed one that failed checks."""
        weight = self.config.bad_completion_weight if bad_completion else 1.0
        self._record(node).failures += weight
        self._stats["bad_completions" if bad_completion else "failures"] += 1

    def score(self, node: NodeId) -> float:
        record = self._records.get(node)
        return self._score(record if record is not None else _Record())

    def standing(self, node: NodeId) -> Standing:
        record = self._records.get(node) or _Record()
        return Standing(
            node,
            record.awards,
            record.completions,
            record.failures,
            record.lateness,
            self._score(record),
        )

    def standings(self) -> list[Standing]:
        """Every node on record, best score first."""
        views = [self.standing(node) for node in self._records]
        return sorted(views, key=lambda s: (-s.score, s.node))

    def statistics(self) -> dict[str, int]:
        return {"nodes": len(self._records), **self._stats}

    def _record(self, node: NodeId) -> _Record:
        return self._records.setdefault(node, _Record())

    def _score(self, record: _Record) -> float:
        config = self.config
        good = record.completions + config.prior_completions
        reliability = good / (good + record.failures + config.prior_failures)
        punctuality = min(1.0, config.tolerance / max(record.lateness, 1e-9))
        return reliability * punctuality
