"""The agent's market side: the ledger, both halves of the market and the host policy.

``MarketSide.build`` wires them to the agent's edges (sending, membership, block
endpoints, routes) from the config; ``deliver`` routes a MARKET or LEDGER
frame to the service that handles it: what hosts send to an owner (bids,
completions, withdrawals) to the owner side, the rest to the host side;
``register`` puts the market's control methods (node/runtime/market_rpc.py)
into the control socket's dispatch table; ``run`` starts its services.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio

from node.base.identity import Identity, NodeId
from node.base.wire import Envelope, MessageType
from node.ledger.payee import PayeeConfig
from node.market.bidder import HostPolicy
from node.market.message_fields import MarketKind
from node.market.segment_rounds import machine_config
from node.runtime.config import Config, policy_config
from node.runtime.control import RpcTable
from node.runtime.host_probe import HostProbe, host_facts
from node.runtime.ledger_service import LedgerService
from node.runtime.market_host import HostMarket
from node.runtime.market_owner import OwnerMarket
from node.runtime.market_rpc import MarketRpc
from node.runtime.policy_service import PolicyService
from node.runtime.routing import RouteService
from node.runtime.segment_service import SegmentService
from node.runtime.state import State

Send = Callable[[NodeId, int, bytes], Awaitable[None]]
OWNER_KINDS = frozenset({MarketKind.BID, MarketKind.COMPLETION, MarketKind.WITHDRAW})
HOST_RESERVED_MIB = 512  # guest memory the default cap leaves to the host


def host_policy(config: Config, draining: bool = False) -> HostPolicy:
    """The caps this host lends, from ``[host]`` (0 = all it has)."""
    facts = host_facts()
    return HostPolicy(
        vcpus=config["host.vcpus"] or facts.vcpus,
        memory_mib=config["host.memory_mib"] or max(facts.memory_mib - HOST_RESERVED_MIB, 0),
        disk_mib=config["host.disk_mib"],
        replicas=config["host.replicas"],
        draining=draining,
        price_floor=config["host.price_floor"],
        arch=facts.arch,
        kvm=facts.kvm,
    )


@dataclass
class Edges:
    """What the market side needs from the agent."""

    send_market: Send
    send_ledger: Send
    live_members: Callable[[], list[NodeId]]
    block_endpoint: Callable[[NodeId], tuple[str, int] | None]
    helper_pids: Callable[[], list[int]]
    routes: RouteService | None  # None: no overlay, so no network jobs here
    migration: tuple[str, str] | None  # (libvirt URI, stream address) guests migrate here by


@dataclass
class MarketSide:
    identity: Identity
    segments: SegmentService
    ledger: LedgerService
    host_market: HostMarket
    policy: PolicyService
    owner_market: OwnerMarket

    @classmethod
    def build(
        cls,
        config: Config,
        identity: Identity,
        swarm_id: str,
        state: State,
        segments: SegmentService,
        edges: Edges,
    ) -> MarketSide:
        ledger = LedgerService(
            identity,
            state,
            edges.send_ledger,
            chain_length=config["market.chain_length"],
            payee_config=PayeeConfig(
                trusted_issuers=frozenset(map(NodeId.parse, config["market.trusted_issuers"])),
                accept_self_issued=config["market.accept_self_issued"],
            ),
        )
        host_market = HostMarket(
            identity,
            host_policy(config),
            segments,
            edges.send_market,
            edges.block_endpoint,
            edges.routes,
            edges.migration,
        )
        policy = PolicyService(
            policy_config(config),
            state,
            host_market,
            HostProbe(namespace_only=config["policy.scope"] == "netns"),
            config["policy.sample_interval_s"],
            host_policy(config),
            edges.helper_pids,
        )
        owner_market = OwnerMarket(
            identity,
            state,
            segments,
            machine_config(swarm_id, config["market.bid_window_s"], config["market.run_grace_s"]),
            edges.send_market,
            ledger.pay,
            edges.live_members,
            edges.block_endpoint,
            config["market.verify_timeout_s"],
        )
        return cls(identity, segments, ledger, host_market, policy, owner_market)

    async def restore(self) -> None:
        """What the market persisted: the ledger's journal (before anything runs)."""
        await self.ledger.restore()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Every service of the market, started in order; ready once all of them are."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.ledger.run)
            await nursery.start(self.host_market.run)
            await nursery.start(self.policy.run)
            await nursery.start(self.owner_market.run)
            task_status.started()

    def register(self, table: RpcTable) -> None:
        """The market's control methods, answered by these services."""
        rpc = MarketRpc(
            self.identity,
            self.owner_market,
            self.host_market,
            self.ledger,
            self.policy,
            self.segments,
        )
        rpc.register(table)

    async def deliver(self, envelope: Envelope) -> None:
        body: Any = envelope.body
        if envelope.type is MessageType.LEDGER:
            await self.ledger.deliver(envelope.sender, body["kind"], body["blob"])
        elif body["kind"] in OWNER_KINDS:
            await self.owner_market.deliver(envelope.sender, body["kind"], body["blob"])
        else:
            await self.host_market.deliver(envelope.sender, body["kind"], body["blob"])
