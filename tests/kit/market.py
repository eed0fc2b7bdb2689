"""What the market's core tests share: a fixed clock, a swarm, a job nonce, seeded keys."""

from __future__ import annotations

from node.base.identity import Identity

NOW = 1_800_000_000
SWARM = "alpha"
NONCE = b"job-nonce-0001"
MIB = 1 << 20


def identity(n: int) -> Identity:
    """A node key pair from seed ``n`` (the same node in every run)."""
    return Identity.from_seeds(bytes([n]) * 32, bytes([n + 100]) * 32)
