"""The market's world in the simulator: owners and volunteer hosts running the real cores.

Theory of operation
-------------------
``MarketWorld`` drives, on one ``Simulator``, the same sans-IO cores the agent
runs, through the same events and effects its adapters use
(node/runtime/market_owner.py, node/runtime/market_host.py, node/runtime/ledger_service.py):

* each **owner** runs one ``SegmentMachine`` per job, one ``Reputation`` and
  one ``PayerLedger``; owners are always up (an assumption: job owners are
  servers here);
* each **host** runs a ``Bidder`` and a ``PayeeLedger``; it is up or down as
  its availability intervals say (node/sim/availability.py).

The world composes its parts and hands each its collaborators: the
owners (node/sim/market_owners.py, around the shared owner core
node/market/owner_effects.py), the hosts (node/sim/market_hosts.py), the
network model (node/sim/market_network.py), the owners' view of live hosts,
the pending wakes and the typed timers (node/sim/market_timers.py), and the
books both sides write and the invariants read, ``MarketAccounts``
(node/sim/market_parts.py). What is modelled instead of real things:

* **network**: a message takes ``latency_s + Exp(jitter_s)`` and is lost with
  probability ``loss``; a message to a host that is down on arrival is lost;
* **membership**: a host that goes down stays in the owners' view of live
  members for ``detection_s``; then, if it is still down, every job is fed
  ``ReplicaLost`` (as ``OwnerMarket.member_lost`` does after its grace); a host
  back within ``detection_s`` refutes its death, as in the agent;
* **offers** go to ``offer_fanout`` members drawn from that view (0: all, as
  the agent does); ``OfferDelivered`` follows after the batch;
* **a replica** runs ``(missing checkpoint bytes / bandwidth + setup_s +
  extent / speed) * LogNormal(0, run_noise)`` seconds; it then saves a
  checkpoint whose digest names the host and the offer, and the real bidder
  signs the real COMPLETION;
* **a host going down** loses its running replicas and its bidder (a crash:
  it sends nothing; with ``departure = "withdraw"`` it first withdraws them,
  as the agent's vacate does when k > 1); its disk (checkpoints, payee
  journal) survives;
* **verification**: the owner fetches the checkpoint (size / the slower
  bandwidth; it fails if the completer goes down meanwhile, as a FetchError
  does in the agent), then spends ``verify_s``; then ``CompletionVerified``
  and, when it verified, ``CheckpointReplicated`` for the owner (which then
  holds it, so the replication the machine asks for is a no-op, as in the
  agent);
* **journals** are written at once: ``Persist`` is answered by ``Persisted``.

Every replica is recorded (``ReplicaRun``) in the books for the study's
accounting; a core's timers are kept by one pending ``Wake`` per node (its
``next_wakeup``). The invariants checked after every step are
node/sim/market_invariants.py.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Hashable
from typing import Any

from node.base.identity import Identity, NodeId
from node.ledger.payee import PayeeConfig, PayeeLedger
from node.ledger.payer import PayerLedger
from node.market.bidder import HostPolicy
from node.market.jobs import JobSpec
from node.market.owner_effects import JobOwner
from node.market.reputation import Reputation
from node.market.segment_machine import SegmentMachine
from node.market.segment_rounds import machine_config
from node.sim.availability import HostAvailability, IntervalIndex
from node.sim.engine import Simulator
from node.sim.market_hosts import HostSide
from node.sim.market_invariants import MarketInvariants
from node.sim.market_network import MarketNetwork
from node.sim.market_owners import OwnerSide
from node.sim.market_parts import (
    EPOCH,
    LEDGER_PAYMENT,
    Frame,
    HostModel,
    LiveView,
    MarketAccounts,
    NodeKey,
    ReplicaRun,
    SimHost,
    SimOwner,
    WorldConfig,
    make_identity,
)
from node.sim.market_timers import Wakeups

__all__ = [
    "EPOCH",
    "LEDGER_PAYMENT",
    "Frame",
    "HostModel",
    "MarketWorld",
    "ReplicaRun",
    "WorldConfig",
]


class MarketWorld:
    """Owners, hosts and their cores on one simulator. See the module docstring."""

    def __init__(
        self,
        sim: Simulator,
        config: WorldConfig,
        availability: list[HostAvailability],
        models: list[HostModel],
    ) -> None:
        self.sim, self.config = sim, config
        rng = sim.fork(f"market/k={config.k}")
        net = sim.fork(f"network/k={config.k}")
        keys = sim.fork("identities")
        self.hosts = [
            _make_host(config, i, make_identity(keys), a, m)
            for i, (a, m) in enumerate(zip(availability, models, strict=True))
        ]
        self.view = LiveView()  # hosts in the owners' membership view
        owner_ids = [make_identity(keys) for _ in config.jobs_per_owner]
        self.owners = [
            SimOwner(i, ident, PayerLedger(ident), self._owner_core(ident, rng))
            for i, ident in enumerate(owner_ids)
        ]
        self.by_node: dict[NodeId, NodeKey] = {
            h.identity.node_id: ("h", h.index) for h in self.hosts
        }
        self.by_node.update({o.identity.node_id: ("o", o.index) for o in self.owners})
        self.accounts = MarketAccounts(
            payees=[h.payee for h in self.hosts],
            payers={o.identity.node_id: o.payer for o in self.owners},
            machines={},
        )
        _create_jobs(config, self.owners, keys, rng, self.accounts)
        network = MarketNetwork(sim, config, net, self.by_node, self.accounts.stats)
        wakeups = Wakeups(sim)
        self.owner_side = OwnerSide(
            sim, config, rng, self.hosts, self.owners, network, wakeups, self.accounts
        )
        self.host_side = HostSide(
            sim,
            config,
            rng,
            self.hosts,
            len(self.owners),
            network,
            self.view,
            wakeups,
            self.accounts,
        )
        self.invariants = MarketInvariants(self.accounts, config.k)
        self.invariants.register(sim)

    def _owner_core(self, identity: Identity, rng: random.Random) -> JobOwner:
        hosts = self.hosts

        def live() -> list[NodeId]:
            return [hosts[i].identity.node_id for i in self.view.members]

        return JobOwner(
            identity.node_id, live, rng, offer_fanout=self.config.offer_fanout, keep_history=False
        )

    def start(self) -> None:
        self.host_side.start()
        self.owner_side.start()

    def statistics(self) -> dict[str, int]:
        """The world's counters, with every bidder's (``bidder_*``, summed over hosts)."""
        stats = Counter(self.accounts.stats)
        for host in self.hosts:
            if host.bidder is not None:
                stats.update({f"bidder_{k}": v for k, v in host.bidder.statistics().items()})
        stats.pop("bidder_commitments", None)
        return dict(stats)

    def done(self) -> bool:
        jobs = len(self.accounts.machines)
        unacked = sum(o.payer.statistics()["unacknowledged"] for o in self.owners)
        return len(self.accounts.finished) == jobs and unacked == 0

    def deliver(self, now: float, node: Hashable, event: Any) -> None:
        """The simulator's deliver callback: the one entry point."""
        match node:
            case ("o", int(index)):
                self.owner_side.deliver(self.owners[index], event, now)
            case ("h", int(index)):
                self.host_side.deliver(self.hosts[index], event, now)
            case _:
                raise ValueError(f"no node {node!r} in the market world")


def _make_host(
    config: WorldConfig, i: int, ident: Identity, a: HostAvailability, m: HostModel
) -> SimHost:
    policy = HostPolicy(
        vcpus=1,
        memory_mib=4096,
        disk_mib=200_000,
        replicas=1,
        price_floor=m.price_floor,
        bench_score=max(1, round(m.speed * 1000)),
        bandwidth_bytes_s=m.bandwidth,
        setup_s=config.setup_s,
    )
    payee = PayeeLedger(ident, PayeeConfig(accept_self_issued=True))
    return SimHost(i, ident, IntervalIndex(a), m, policy, payee)


def _create_jobs(
    c: WorldConfig,
    owners: list[SimOwner],
    keys: random.Random,
    rng: random.Random,
    accounts: MarketAccounts,
) -> None:
    config = machine_config("sim", c.bid_window_s, c.run_grace_s)
    for owner, count in zip(owners, c.jobs_per_owner, strict=True):
        reputation = Reputation()
        for _ in range(count):
            spec = JobSpec(
                owner=owner.identity.node_id,
                nonce=keys.randbytes(16),
                image="sim",
                memory_mib=c.memory_mib,
                vcpus=1,
                extent_s=c.extent_s,
                segments=c.segments,
                k=c.k,
                ceiling=c.ceiling,
                deadline=int(EPOCH + c.horizon_s),
            )
            machine = SegmentMachine(owner.identity, spec, config, reputation, rng)
            owner.core.add(machine)
            accounts.machines[spec.job_id] = machine
