"""The market world's network model: latency, jitter and loss on one random stream.

Theory of operation
-------------------
A message from one node to another (by node id, through ``by_node`` to the
node's heap key) is counted as ``messages_<channel>``, lost with probability
``loss`` (``messages_lost``), and otherwise arrives as a ``Frame`` after
``latency_s + Exp(jitter_s)``. A message to a host that is down on arrival is
dropped by the receiving side (node/sim/market_hosts.py). The loss and delay
draws come from their own stream, so the cores' draws do not move them.
"""

from __future__ import annotations

import random
from collections import Counter

from node.base.identity import NodeId
from node.market.offer_messages import Offer
from node.sim.engine import Simulator
from node.sim.market_parts import Frame, NodeKey, WorldConfig


class MarketNetwork:
    def __init__(
        self,
        sim: Simulator,
        config: WorldConfig,
        rng: random.Random,
        by_node: dict[NodeId, NodeKey],
        stats: Counter[str],
    ) -> None:
        self.sim, self.config, self.rng = sim, config, rng
        self.by_node = by_node
        self.stats = stats

    def send(
        self,
        sender: NodeId,
        target: NodeId,
        channel: str,
        kind: int,
        blob: bytes,
        offer: Offer | None = None,
    ) -> None:
        """One market or ledger frame; ``offer`` rides along as the simulator's metadata."""
        self.stats[f"messages_{channel}"] += 1
        if self.config.loss and self.rng.random() < self.config.loss:
            self.stats["messages_lost"] += 1
            return
        delay = self.config.latency_s + self.rng.expovariate(1 / self.config.jitter_s)
        self.sim.after(delay, self.by_node[target], Frame(sender, channel, kind, blob, offer))
