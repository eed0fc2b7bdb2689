"""The ledger cores' effect loop, shared by the agent and the simulator. Sans-IO.

Theory of operation
-------------------
A ledger core's effects are carried out in the order it emitted them, and an
effect that feeds something back into the core (``Persist`` answered with
``Persisted``, ``CreateChain`` answered with ``ChainAdded``) has the core's
answer carried out *next*, before the rest of the batch: depth first, as if
the core had emitted them in its place. ``EffectQueue`` is that rule, once;
the agent (node/runtime/ledger_service.py, which awaits between effects) and the
market simulator (node/sim/market_owners.py, which does not) both iterate one
and ``feed`` it what each effect brought back.

``open_chain`` is the answer to ``CreateChain`` both give: a chain of at least
``chain_length`` tokens from ``seed`` (drawn by the caller: ``os.urandom`` in
the agent, the seeded stream in the simulator), its commitment signed by the
payer as issuer (a volunteer credit swarm: the payer vouches for itself), as
``ChainAdded`` to hand the payer.

Nothing here does I/O, reads a clock or draws randomness.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from typing import Generic, TypeVar

from node.base.identity import Identity
from node.ledger.payer import ChainAdded, CreateChain
from node.ledger.tokens import HashChain, sign_commitment

CHAIN_LIFETIME_S = 30 * 86400

E = TypeVar("E")


class EffectQueue(Generic[E]):
    """A batch of effects, handed out in order; what is fed back goes before the rest."""

    def __init__(self, effects: Iterable[E]) -> None:
        self._pending: deque[E] = deque(effects)

    def __iter__(self) -> Iterator[E]:
        while self._pending:
            yield self._pending.popleft()

    def feed(self, effects: Iterable[E]) -> None:
        """The effects the last one caused: carried out next, in their order."""
        self._pending.extendleft(reversed(list(effects)))


def open_chain(
    identity: Identity, effect: CreateChain, seed: bytes, chain_length: int, now: float
) -> ChainAdded:
    """A new chain to ``effect.payee`` and its self-issued commitment, for the payer."""
    chain = HashChain(seed, max(chain_length, effect.units))
    commitment = sign_commitment(
        identity,
        chain,
        payer=identity.node_id,
        payee=effect.payee,
        unit_value=1,
        expires=int(now) + CHAIN_LIFETIME_S,
    )
    return ChainAdded(chain, commitment)
