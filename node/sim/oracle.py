"""An oracle schedule: place every segment knowing each host's availability in advance.

Theory of operation
-------------------
The redundancy study (node/sim/redundancy.py) compares the market against a
schedule that cannot be surprised by churn. ``oracle_schedule`` is a greedy
list schedule, k = 1, over the same hosts, availability, speeds and
bandwidths the market sees:

* jobs are chains: segment i of a job is ready when segment i-1 is committed;
* the ready segment with the earliest ready time goes first (ties: the lower
  job number);
* it is placed on the host that *finishes* it earliest among hosts that are
  up for the whole run, starting no earlier than the segment is ready and the
  host is free (one replica per host, as the market's hosts allow);
* a run takes what a market replica takes: checkpoint transfer (none when the
  host made the previous checkpoint) + setup + extent / speed, with no noise;
* each segment also pays the market's fixed pipeline, so the comparison
  measures what churn and the protocol's reactions cost, not the pipeline:
  before the run, the bid window and two message latencies (offer, award);
  after it, one latency, the owner's fetch of the checkpoint and ``verify_s``.

Greedy earliest-finish list scheduling is a reference, not an optimum; it is
not a lower bound either. ``critical_path_s`` is one: no schedule finishes
before the longest job's segments run back to back on the fastest host, with
the same pipeline, even without churn.

Pure: no I/O, no clock, no randomness.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from node.sim.availability import HostAvailability, IntervalIndex


@dataclass(frozen=True, slots=True)
class OracleHost:
    speed: float  # guest vCPU-seconds per second
    bandwidth: int  # bytes per second


@dataclass(frozen=True, slots=True)
class Pipeline:
    """The market's fixed per-segment costs, which the oracle pays too."""

    bid_window_s: float
    latency_s: float
    verify_s: float
    setup_s: float
    owner_bandwidth: int


@dataclass(frozen=True, slots=True)
class OracleResult:
    makespan_s: float
    host_seconds: float
    segments: int
    unplaced: int  # segments no host could run before the horizon
    critical_path_s: float


def oracle_schedule(
    availability: list[HostAvailability],
    hosts: list[OracleHost],
    *,
    jobs: int,
    segments: int,
    extent_s: float,
    checkpoint_bytes: int,
    pipeline: Pipeline,
    horizon_s: float,
) -> OracleResult:
    """Schedule ``jobs`` chains of ``segments`` segments; see the module docstring."""
    index = [IntervalIndex(a) for a in availability]
    free_at = [0.0] * len(hosts)
    before = pipeline.bid_window_s + 2 * pipeline.latency_s
    ready: list[tuple[float, int, int, int]] = [(0.0, job, 0, -1) for job in range(jobs)]
    heapq.heapify(ready)  # (ready time, job, segment, host that holds its checkpoint)
    makespan = host_seconds = 0.0
    placed = 0
    while ready:
        at, job, segment, holder = heapq.heappop(ready)
        best = _place(
            index,
            hosts,
            free_at,
            at + before,
            segment,
            holder,
            extent_s,
            checkpoint_bytes,
            pipeline,
            horizon_s,
        )
        if best is None:
            continue  # the chain stops: nothing fits before the horizon
        host, start, run = best
        free_at[host] = start + run
        host_seconds += run
        placed += 1
        done = start + run + pipeline.latency_s + _verify_s(hosts[host], checkpoint_bytes, pipeline)
        makespan = max(makespan, done)
        if segment + 1 < segments:
            heapq.heappush(ready, (done, job, segment + 1, host))
    fastest = max(h.speed for h in hosts)
    best_host = next(h for h in hosts if h.speed == fastest)
    per_segment = before + pipeline.setup_s + extent_s / fastest + pipeline.latency_s
    per_segment += _verify_s(best_host, checkpoint_bytes, pipeline)
    return OracleResult(
        makespan_s=makespan,
        host_seconds=host_seconds,
        segments=placed,
        unplaced=jobs * segments - placed,
        critical_path_s=segments * per_segment,
    )


def _verify_s(host: OracleHost, checkpoint_bytes: int, pipeline: Pipeline) -> float:
    return checkpoint_bytes / min(host.bandwidth, pipeline.owner_bandwidth) + pipeline.verify_s


def _place(
    index: list[IntervalIndex],
    hosts: list[OracleHost],
    free_at: list[float],
    earliest: float,
    segment: int,
    holder: int,
    extent_s: float,
    checkpoint_bytes: int,
    pipeline: Pipeline,
    horizon_s: float,
) -> tuple[int, float, float] | None:
    """The (host, start, run) that finishes earliest, or None."""
    best: tuple[int, float, float] | None = None
    best_finish = horizon_s
    for h, host in enumerate(hosts):
        fetch = 0.0 if segment == 0 or h == holder else checkpoint_bytes / host.bandwidth
        run = fetch + pipeline.setup_s + extent_s / host.speed
        begin = max(earliest, free_at[h])
        if begin + run >= best_finish:
            continue
        start = index[h].first_fit(begin, run)
        if start is not None and start + run < best_finish:
            best, best_finish = (h, start, run), start + run
    return best
