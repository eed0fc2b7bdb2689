"""The agent's market side: the ledger, both halves of the market and the host policy.

``MarketSide.build`` wires them to the agent's edges (sending, membership, block
endpoints, routes) from the config; ``deliver`` routes a MARKET or LEDGER
frame to the service that handles it: what hosts send to an owner (bids,
completions, withdrawals) to the owner side, the rest to the host side.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from node.base.identity import Identity, NodeId
from node.base.wire import Envelope, MessageType
from node.ledger.payee import PayeeConfig
from node.market.messages import MarketKind
from node.runtime.config import Config, policy_config
from node.runtime.ledger_service import LedgerService
from node.runtime.routing import RouteService
from node.runtime.segment_service import SegmentService
from node.runtime.state import State

if TYPE_CHECKING:
    from node.runtime.market_host import HostMarket
    from node.runtime.market_owner import OwnerMarket
    from node.runtime.policy_service import PolicyService

Send = Callable[[NodeId, int, bytes], Awaitable[None]]
OWNER_KINDS = frozenset({MarketKind.BID, MarketKind.COMPLETION, MarketKind.WITHDRAW})


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
        from node.runtime.host_probe import HostProbe
        from node.runtime.market_host import HostMarket, host_policy
        from node.runtime.market_owner import OwnerMarket, machine_config
        from node.runtime.policy_service import PolicyService

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
        return cls(ledger, host_market, policy, owner_market)

    async def deliver(self, envelope: Envelope) -> None:
        body: Any = envelope.body
        if envelope.type is MessageType.LEDGER:
            await self.ledger.deliver(envelope.sender, body["kind"], body["blob"])
        elif body["kind"] in OWNER_KINDS:
            await self.owner_market.deliver(envelope.sender, body["kind"], body["blob"])
        else:
            await self.host_market.deliver(envelope.sender, body["kind"], body["blob"])
