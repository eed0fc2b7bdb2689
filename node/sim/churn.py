"""Churn: nodes crashing, leaving and coming back at seeded random times.

Theory of operation
-------------------
Each churning node alternates between up and down. Up periods are exponential
with mean ``3600 / departures_per_hour`` (memoryless departures, the usual first
model of volunteer churn; measured availability traces are burstier and
diurnal, which this does not model). A departure is a graceful leave with
probability ``leave_fraction`` and a crash otherwise. Down periods are
exponential with mean ``mean_downtime_s``; the node then restarts with a fresh
core and a higher record seq and joins through a node chosen at random among
those up at that moment. ``schedule`` puts these events on the simulator
before the run; nothing here changes once the run starts.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass

from node.sim.swarm import Swarm


@dataclass(frozen=True, slots=True)
class ChurnModel:
    departures_per_hour: float = 0.0  # per node
    mean_downtime_s: float = 60.0
    leave_fraction: float = 0.5

    @property
    def active(self) -> bool:
        return self.departures_per_hour > 0


def schedule(
    swarm: Swarm,
    model: ChurnModel,
    nodes: Iterable[int],
    start: float,
    end: float,
    rng: random.Random,
) -> int:
    """Schedule departures and returns of `nodes` in [start, end); returns how many departures."""
    if not model.active:
        return 0
    departures = 0
    rate = model.departures_per_hour / 3600.0
    for index in nodes:
        when = start + rng.expovariate(rate)
        while when < end:
            graceful = rng.random() < model.leave_fraction
            back = when + rng.expovariate(1.0 / model.mean_downtime_s)
            swarm.sim.at(when, index, _departure(swarm, index, graceful))
            if back < end:
                swarm.sim.at(back, index, _return(swarm, index, rng.random()))
            departures += 1
            when = back + rng.expovariate(rate)
    return departures


def _departure(swarm: Swarm, index: int, graceful: bool) -> object:
    def depart(now: float) -> None:
        if not swarm.network.up[index]:
            return
        if graceful:
            swarm.leave(index, now)
        else:
            swarm.crash(index)

    return depart


def _return(swarm: Swarm, index: int, draw: float) -> object:
    def come_back(now: float) -> None:
        up = [i for i, alive in enumerate(swarm.network.up) if alive and i != index]
        if up and not swarm.network.up[index]:
            swarm.restart(index, up[int(draw * len(up))], now)

    return come_back
