"""The studies: how fast a join spreads, and how fast a moved VM address is routed anew.

Theory of operation
-------------------
Both studies start from a swarm that has already converged: every node is
seeded with one shared roster of all the others (``Swarm.seed_converged``), its
probe and gossip timers start at random phases, and the swarm runs for
``warmup_s`` before anything is measured. Building the same state with n JOINs
each would cost n squared messages and prove nothing the measured event does
not.

*Join convergence* (``run_join``). At ``t0`` a new node sends one bootstrap JOIN
to a random member. For every other node up at the end we record when its core
first reported the joiner ALIVE (``ApplyMemberChange``). ``p50``/``p99``/``p9999`` are
the times by which that fraction of them knew; ``None`` if it never got there
within ``seconds``. Load is what each node sent during [t0, t0 + seconds],
per second: its probes, acks, gossip and syncs, not only the join's news.

*Route move* (``run_route_move``). Address A of a job is held by host H1 at
epoch 1, and every route table holds that claim at the start. At ``t0`` the
owner grants epoch 2 to H2; H2 claims and spreads (as the agent does: queued
broadcast plus an eager push to ``eager_limit`` members); ``withdraw_after_s``
later H1 withdraws epoch 1 and spreads that too. For every node we record
when its route table first routed A to H2. ``unrouted`` counts nodes that saw
the withdrawal before the claim (A briefly unrouted there).

Invariants, checked after every step on the nodes the step touched:
``route-epoch-monotone`` (an address's epoch never decreases in any node's
route table; that a table routes A to one node at most is structural, one
entry per address, so not checked); and, where the run has neither loss nor partitions nor churn,
``no-false-death`` (no node that is up is ever declared DEAD).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import IPv6Address
from typing import Any

from node.base.identity import Identity
from node.membership.config import MembershipConfig
from node.membership.events import ApplyMemberChange
from node.membership.table import MemberState
from node.sim import churn
from node.sim.engine import Simulator
from node.sim.network import LatencyModel, Network, Partition
from node.sim.swarm import EPOCH, KeyRing, Swarm
from overlay.addressing import vm_address
from overlay.claims import derive_job_id, sign_grant
from overlay.routes import ApplyRoute

FRACTIONS = {"p50": 0.5, "p90": 0.9, "p99": 0.99, "p9999": 0.9999}
CURVE_POINTS = 100
GRANT_LIFETIME_S = 1_000_000


@dataclass(frozen=True, slots=True)
class RunSpec:
    """One simulated run's conditions."""

    nodes: int
    membership: MembershipConfig = field(default_factory=MembershipConfig)
    latency: LatencyModel = field(default_factory=LatencyModel)
    loss: float = 0.0
    partitions: tuple[Partition, ...] = ()  # times relative to t0
    churn: churn.ChurnModel = field(default_factory=churn.ChurnModel)
    warmup_s: float = 2.0
    seconds: float = 10.0
    eager_limit: int = 64
    withdraw_after_s: float = 0.5

    @property
    def lossless(self) -> bool:
        return self.loss == 0 and not self.partitions and not self.churn.active


class StudyRun:
    """A simulator, a network and a seeded swarm, with the invariants registered."""

    def __init__(self, spec: RunSpec, seed: int, label: str, keys: KeyRing) -> None:
        self.spec = spec
        self.sim = Simulator(seed)
        self.t0 = EPOCH + spec.warmup_s
        partitions = [
            Partition(self.t0 + p.start, self.t0 + p.end, p.members) for p in spec.partitions
        ]
        rng = self.sim.fork(f"{label}/network")
        self.network = Network(rng, spec.latency, spec.loss, partitions)
        self.swarm = Swarm(self.sim, self.network, keys, spec.membership, "sim", spec.eager_limit)
        for _ in range(spec.nodes):
            self.swarm.add_node()
        self.false_deaths: list[str] = []
        self.false_suspicions = 0
        self.watched: IPv6Address | None = None
        self.swarm.member_observers.append(self._watch_deaths)
        self.sim.add_invariant("route-epoch-monotone", self._check_routes)
        if spec.lossless:
            self.sim.add_invariant("no-false-death", self._check_deaths)
        self.traffic_at_t0: tuple[list[int], list[int]] = ([], [])
        self.sim.at(self.t0, -1, self._snapshot_traffic)

    def start(self, members: list[int]) -> None:
        self.swarm.seed_converged(members, EPOCH)
        rng = self.sim.fork("churn")
        churn.schedule(self.swarm, self.spec.churn, members, self.t0, self.end, rng)

    @property
    def end(self) -> float:
        return self.t0 + self.spec.seconds

    def run(self) -> None:
        swarm = self.swarm

        def deliver(now: float, index: Any, event: Any) -> None:
            if index == -1:
                event(now)
            else:
                swarm.deliver(now, index, event)

        self.sim.run(self.end, deliver)

    def _snapshot_traffic(self, now: float) -> None:
        traffic = self.network.traffic
        self.traffic_at_t0 = (list(traffic.messages_sent), list(traffic.bytes_sent))

    def _watch_deaths(self, now: float, index: int, change: ApplyMemberChange) -> None:
        subject = self.swarm.by_id.get(change.node_id)
        if subject is None or not self.network.up[subject]:
            return
        if change.state is MemberState.SUSPECT:
            self.false_suspicions += 1
        elif change.state is MemberState.DEAD:
            self.false_deaths.append(f"node {index} declared node {subject} dead while it is up")

    def _check_deaths(self, now: float) -> str | None:
        return self.false_deaths[0] if self.false_deaths else None

    def _check_routes(self, now: float) -> str | None:
        touched = self.swarm.touched
        address = self.watched
        if address is None:
            touched.clear()
            return None
        for index in touched:
            node = self.swarm.nodes[index]
            route = node.routes.route(address)
            if route is None:
                continue
            floor = node.epochs.get(address, 0)
            if route.epoch < floor:
                return f"node {index} holds {address} at epoch {route.epoch} after {floor}"
            node.epochs[address] = route.epoch
        touched.clear()
        return None

    def load(self) -> dict[str, float]:
        """Per-node messages and bytes sent per second during [t0, end], mean and max."""
        traffic, seconds = self.network.traffic, self.spec.seconds
        before_messages, before_bytes = self.traffic_at_t0
        count = len(before_messages)
        messages = [(traffic.messages_sent[i] - before_messages[i]) / seconds for i in range(count)]
        sent = [(traffic.bytes_sent[i] - before_bytes[i]) / seconds for i in range(count)]
        return {
            "messages_per_node_s_mean": sum(messages) / count,
            "messages_per_node_s_max": max(messages),
            "bytes_per_node_s_mean": sum(sent) / count,
            "bytes_per_node_s_max": max(sent),
        }

    def summary(self) -> dict[str, Any]:
        return {
            "events": self.sim.steps,
            "messages_sent": sum(self.network.traffic.messages_sent),
            "dropped_loss": self.network.dropped_loss,
            "dropped_partition": self.network.dropped_partition,
            "dropped_down": self.network.dropped_down,
            "false_suspicions": self.false_suspicions,
            "false_deaths": len(self.false_deaths),
            "signature_checks": self.swarm.keys.signature_checks,
            "late_wakeups": self.swarm.late_wakeups,
            **self.load(),
        }


def spread_figures(times: dict[int, float], population: int, seconds: float) -> dict[str, Any]:
    """Percentile times and the informed-fraction curve from first-informed delays."""
    delays = sorted(times.values())
    figures: dict[str, Any] = {"population": population, "informed": len(delays)}
    for name, fraction in FRACTIONS.items():
        needed = max(1, math.ceil(fraction * population))
        figures[f"{name}_s"] = delays[needed - 1] if len(delays) >= needed else None
    horizon = min(seconds, delays[-1] * 1.25) if delays and delays[-1] > 0 else seconds
    step = horizon / CURVE_POINTS
    curve, position = [], 0
    for point in range(CURVE_POINTS + 1):
        moment = point * step
        while position < len(delays) and delays[position] <= moment:
            position += 1
        curve.append([moment, position / population if population else 0.0])
    figures["curve"] = curve
    return figures


def run_join(spec: RunSpec, seed: int, label: str, keys: KeyRing) -> dict[str, Any]:
    """A node joins a converged swarm of spec.nodes - 1 at t0; how fast does everyone know?"""
    run = StudyRun(spec, seed, label, keys)
    joiner = spec.nodes - 1
    members = list(range(joiner))
    run.start(members)
    joiner_id = run.swarm.nodes[joiner].node_id
    informed: dict[int, float] = {}

    def watch(now: float, index: int, change: ApplyMemberChange) -> None:
        if change.node_id == joiner_id and change.state is MemberState.ALIVE:
            informed.setdefault(index, now - run.t0)

    run.swarm.member_observers.append(watch)
    via = run.sim.fork(f"{label}/via").randrange(len(members))
    run.network.up[joiner] = False  # not started yet
    run.sim.at(run.t0, -1, lambda now: run.swarm.join(joiner, via, now))
    run.run()
    live = [i for i in members if run.network.up[i]]
    times = {i: informed[i] for i in live if i in informed}
    return {"loss": spec.loss, **spread_figures(times, len(live), spec.seconds), **run.summary()}


def run_route_move(spec: RunSpec, seed: int, label: str, keys: KeyRing) -> dict[str, Any]:
    """H1 holds A at epoch 1; at t0 H2 claims epoch 2 and H1 withdraws; how fast is A moved?"""
    run = StudyRun(spec, seed, label, keys)
    members = list(range(spec.nodes))
    run.start(members)
    rng = run.sim.fork(f"{label}/route")
    owner = Identity.from_seeds(rng.randbytes(32), rng.randbytes(32))
    nonce = rng.randbytes(16)
    old_host, new_host = rng.sample(members, 2)
    swarm = run.swarm
    address = vm_address(swarm.swarm_id, derive_job_id(owner.node_id.key, nonce))
    run.watched = address
    expires = int(EPOCH) + GRANT_LIFETIME_S

    def grant(host: int, epoch: int) -> Any:
        node_id = swarm.nodes[host].node_id
        return sign_grant(
            owner,
            swarm_id=swarm.swarm_id,
            job_nonce=nonce,
            node_id=node_id,
            epoch=epoch,
            expires=expires,
        )

    old = swarm.nodes[old_host]
    first_claim, _ = old.routes.claim_local(grant(old_host, 1), old.identity, EPOCH)
    for node in swarm.nodes:  # the starting state: everyone routes A to H1 at epoch 1
        if node is not old:
            node.routes.offer(first_claim, EPOCH)
        node.epochs[address] = 1
    moved: dict[int, float] = {}
    unrouted: set[int] = set()
    new_id = swarm.nodes[new_host].node_id

    def watch(now: float, index: int, change: ApplyRoute) -> None:
        if change.vm_address != address:
            return
        if change.node_id == new_id:
            moved.setdefault(index, now - run.t0)
        elif change.node_id is None and index not in moved:
            unrouted.add(index)

    swarm.route_observers.append(watch)
    run.sim.at(run.t0, -1, _claimer(swarm, new_host, grant(new_host, 2)))
    run.sim.at(run.t0 + spec.withdraw_after_s, -1, _withdrawer(swarm, old_host, address))
    run.run()
    live = [i for i in members if run.network.up[i]]
    times = {i: moved[i] for i in live if i in moved}
    figures = spread_figures(times, len(live), spec.seconds)
    refusals = sum(node.route_refusals for node in swarm.nodes)
    return {
        "loss": spec.loss,
        **figures,
        "unrouted_nodes": len(unrouted),
        "route_refusals": refusals,
        **run.summary(),
    }


def _claimer(swarm: Swarm, host: int, grant: Any) -> Callable[[float], None]:
    def claim(now: float) -> None:
        node = swarm.nodes[host]
        blob, changes = node.routes.claim_local(grant, node.identity, now)
        swarm.apply_route_changes(node, changes, now)
        swarm.spread_route(host, grant.vm_address.packed, blob, now)

    return claim


def _withdrawer(swarm: Swarm, host: int, address: IPv6Address) -> Callable[[float], None]:
    def withdraw(now: float) -> None:
        node = swarm.nodes[host]
        if not swarm.network.up[host]:
            return
        blob, changes = node.routes.withdraw_local(address, node.identity, now)
        swarm.apply_route_changes(node, changes, now)
        swarm.spread_route(host, address.packed, blob, now)

    return withdraw
