"""The membership core's settings: SWIM's and Lifeguard's knobs, checked once.

``MembershipConfig`` holds the probe rhythm, suspicion timeouts, gossip fan-out
and message budgets of one node's ``Membership`` (node/membership/swim.py says
what each does and why the defaults are what they are), and derives the two
timeouts that depend on several of them: the PING_REQ helper's NACK timeout and
the suspicion timeout for a swarm of ``n`` members with ``c`` confirmations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MAX_UPDATE_BYTES_LIMIT = 48 * 1024


@dataclass(frozen=True, slots=True)
class MembershipConfig:
    probe_interval_s: float = 0.5
    probe_timeout_s: float = 0.25
    indirect_checks: int = 3
    suspicion_mult: float = 3.0
    suspicion_min_s: float = 1.0
    suspicion_max_mult: float = 2.0  # Lifeguard: the unconfirmed timeout, in SWIM timeouts
    gossip_interval_s: float = 0.2
    gossip_fanout: int = 3
    retransmit_mult: int = 4
    max_updates_per_message: int = 16
    max_update_bytes: int = 8 * 1024  # per message: few IP fragments per UDP datagram
    dead_reclaim_s: float = 30.0
    join_sample: int = 32
    join_retry_s: float = 1.0
    sync_interval_s: float = 10.0
    local_health_max: int = 8  # Lifeguard: probe interval and timeout stretch up to 9x; 0: off
    probe_rounds: int = 2  # failed probe rounds in a row (each direct + indirect) to suspect

    def __post_init__(self) -> None:
        if not 0 < self.probe_timeout_s < self.probe_interval_s:
            raise ValueError("need 0 < probe_timeout_s < probe_interval_s")
        if not 0 < self.max_update_bytes < MAX_UPDATE_BYTES_LIMIT:
            raise ValueError(f"max_update_bytes must be below {MAX_UPDATE_BYTES_LIMIT}")
        if self.suspicion_max_mult < 1 or self.gossip_interval_s <= 0:
            raise ValueError("need suspicion_max_mult >= 1 and gossip_interval_s > 0")
        counts = (self.indirect_checks, self.gossip_fanout, self.retransmit_mult)
        if min(*counts, self.max_updates_per_message, self.join_sample, self.probe_rounds) < 1:
            raise ValueError("counts must be at least 1")
        if self.local_health_max < 0:
            raise ValueError("local_health_max must be at least 0")

    @property
    def nack_timeout_s(self) -> float:
        """How long a PING_REQ helper waits for the target's ACK before it answers NACK.

        Half the indirect window (probe timeout to interval end), so the NACK is back
        in time even without local-health stretching and with ~100 ms of round trips.
        """
        return (self.probe_interval_s - self.probe_timeout_s) / 2

    def suspicion_timeout(self, members: int, confirmations: int) -> float:
        """Seconds from suspicion to death in a swarm of `members` (this node included)."""
        low = max(
            self.suspicion_min_s,
            self.suspicion_mult * math.log10(members + 1) * self.probe_interval_s,
        )
        expected = min(self.indirect_checks, members - 2)
        if expected < 1 or confirmations >= expected:
            return low
        high = self.suspicion_max_mult * low
        shrink = math.log(confirmations + 1) / math.log(expected + 1)
        return max(low, high - (high - low) * shrink)
