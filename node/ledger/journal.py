"""The ledger's shared parts: the journal, Persist and Persisted, refusals, views.

Theory of operation
-------------------
Paying the first completer of a segment takes two sans-IO cores, one per side
of a token chain (chains, tokens and the signed statements are node/ledger/tokens.py):

* ``PayerLedger`` (node/ledger/payer.py), the job owner, releases the next token of
  a chain to the recorded first completer of each segment, and resends it
  until the payee acknowledges it;
* ``PayeeLedger`` (node/ledger/payee.py), the host, accepts a token only if it hashes
  to its chain's head, and acknowledges it once it is journaled.

This module holds what both share: journal entries and their codec, the
``Persist`` effect and the ``Persisted`` event, the ``ReportRefusal`` effect and which
refusals each side counts, the views for ``gleaner ledger``, and
``LedgerCore``, the base that numbers entries, counts and collects output.

Persist before promise. Every decision that a message depends on is journaled
first: the core emits ``Persist(entry)`` and only on ``Persisted(entry_id)``
emits what depends on it. The agent must write the entries of one core in the
order they were emitted, to one journal per core: an entry is durable only if
every earlier one is. A failed write is fatal to the core; the agent rebuilds
it with ``restore`` from the journal. ``restore`` takes the journal's blobs in
order, on a fresh core; an entry written twice counts once; a corrupt journal
raises ``LocalProtocolError`` and leaves the core unusable.

Statistics count since start (or restore); the gauges (``chains``,
``unacknowledged``, ``journaling``) show the state.

Invariants (both sides)
-----------------------
- Nothing that depends on a journal entry leaves a core before its
  ``Persisted``.
- ``handle`` never raises on a peer's bytes: refusals are ``ReportRefusal`` effects,
  counted as ``refused_<reason>`` in ``statistics()``. ``LocalProtocolError``
  means the agent's own mistake (unknown entry id, bad chain, corrupt journal).
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import msgpack

from node.base.identity import Identity, NodeId
from node.base.signed import decode_own
from node.base.wire import LocalProtocolError, RemoteProtocolError, unpack_limited
from node.ledger.tokens import Commitment, LedgerRefused, Payment, TokenRefusal

_PAYER_ONLY = ("bad_ack", "duplicate_payment", "not_winner", "winner_conflict", "no_chain")
_PAYER_TOO = ("malformed", "bad_signature", "not_for_us", "unknown_chain")
PAYER_REFUSALS = tuple(TokenRefusal(name) for name in _PAYER_TOO + _PAYER_ONLY)
PAYEE_REFUSALS = tuple(r for r in TokenRefusal if r.value not in _PAYER_ONLY)

SegmentKey = tuple[bytes, int]  # (job id, segment index)
_T = TypeVar("_T")


# -- journal, and the events and effects both sides share -------------------------------


@dataclass(frozen=True, slots=True)
class JournalEntry:
    """One record for the core's journal; ``blob`` is self-describing (it holds the id)."""

    entry_id: int
    blob: bytes


@dataclass(frozen=True, slots=True)
class Persisted:
    """Event: the journal entry ``entry_id`` (and every earlier one) is durable."""

    entry_id: int


@dataclass(frozen=True, slots=True)
class Persist:
    """Effect: append ``entry`` to the core's journal, then report ``Persisted``."""

    entry: JournalEntry


@dataclass(frozen=True, slots=True)
class ReportRefusal:
    """Effect: something was refused; ``peer`` is the sender, or the payee asked for."""

    reason: TokenRefusal
    peer: NodeId | None
    detail: str
    job_id: bytes | None = None
    segment: int | None = None


# -- views for `gleaner ledger` ----------------------------------------------------------


class PaymentState(enum.Enum):
    JOURNALING = "journaling"  # waiting for the journal write
    SENT = "sent"  # payer: journaled and sent, not acknowledged yet
    ACKNOWLEDGED = "acknowledged"  # payer: the payee's signed ack arrived
    ACCEPTED = "accepted"  # payee: journaled and acknowledged


@dataclass(frozen=True, slots=True)
class ChainView:
    """One chain; ``released`` and ``accepted`` are indices (units) into it.

    Payer: released = tokens released, accepted = acknowledged by the payee.
    Payee: released = accepted = journaled acceptances (it sees no more).
    """

    chain_id: bytes
    counterparty: NodeId
    issuer: NodeId
    length: int
    unit_value: int
    expires: int
    released: int
    accepted: int

    @property
    def remaining(self) -> int:
        return self.length - self.released


@dataclass(frozen=True, slots=True)
class Balance:
    """Units and their value per counterparty, over all its chains."""

    counterparty: NodeId
    chains: int
    issued: int
    released: int
    accepted: int
    value_released: int
    value_accepted: int


@dataclass(frozen=True, slots=True)
class PaymentView:
    job_id: bytes
    segment: int
    counterparty: NodeId
    chain_id: bytes
    index: int
    units: int
    value: int
    state: PaymentState


def balances(chains: Iterable[ChainView]) -> list[Balance]:
    """Sum chain views per counterparty, sorted by counterparty."""
    sums: dict[NodeId, list[int]] = {}
    for c in chains:
        row = sums.setdefault(c.counterparty, [0] * 6)
        for i, v in enumerate((1, c.length, c.released, c.accepted)):
            row[i] += v
        row[4] += c.released * c.unit_value
        row[5] += c.accepted * c.unit_value
    return [Balance(node, *row) for node, row in sorted(sums.items())]


def chain_view(
    commitment: Commitment, counterparty: NodeId, released: int, accepted: int
) -> ChainView:
    """The view of one chain, from either side (see ``ChainView``)."""
    return ChainView(
        chain_id=commitment.chain_id,
        counterparty=counterparty,
        issuer=commitment.issuer,
        length=commitment.length,
        unit_value=commitment.unit_value,
        expires=commitment.expires,
        released=released,
        accepted=accepted,
    )


def payment_view(p: Payment, counterparty: NodeId, value: int, state: PaymentState) -> PaymentView:
    """The view of one payment, released or accepted."""
    return PaymentView(
        p.job_id, p.segment, counterparty, p.chain_id, p.index, p.units, value, state
    )


# -- the journal codec (our own data: a bad entry is LocalProtocolError) ---------------


def _entry(side: str, entry_id: int, kind: str, **fields: Any) -> JournalEntry:
    record = {"side": side, "id": entry_id, "kind": kind, **fields}
    return JournalEntry(entry_id, msgpack.packb(record, use_bin_type=True))


def _read_entry(side: str, blob: bytes) -> tuple[int, str, dict[str, Any]]:
    try:
        record = unpack_limited(blob)
    except RemoteProtocolError as exc:
        raise LocalProtocolError(f"corrupt ledger journal entry: {exc}") from None
    if not isinstance(record, dict) or record.get("side") != side:
        raise LocalProtocolError(f"ledger journal entry is not a {side} entry")
    entry_id, kind = record.get("id"), record.get("kind")
    if type(entry_id) is not int or entry_id < 1 or not isinstance(kind, str):
        raise LocalProtocolError("ledger journal entry lacks an id or kind")
    return entry_id, kind, record


def journal_field(record: dict[str, Any], name: str, kind: type) -> Any:
    value = record.get(name)
    if type(value) is not kind:
        raise LocalProtocolError(f"ledger journal entry field {name!r} is not {kind.__name__}")
    return value


def from_journal(decode: Callable[[bytes], _T], blob: Any) -> _T:
    """Decode a statement from our own journal; a failure is a corrupt journal."""
    return decode_own(decode, blob, "ledger journal holds a bad statement")


class LedgerCore:
    """What both sides share: the entry counter, pending entries, counters, output."""

    side = ""

    def __init__(
        self, identity: Identity, counters: tuple[str, ...], refusals: tuple[TokenRefusal, ...]
    ) -> None:
        self._identity = identity
        self._id = identity.node_id
        self._next_entry = 1
        self._stats: Counter[str] = Counter(dict.fromkeys(counters, 0))
        self._stats.update({f"refused_{r.value}": 0 for r in refusals})
        self._out: list[Any] = []
        self._pending: dict[int, tuple[bytes, int] | None] = {}  # entry id -> what waits

    @property
    def node_id(self) -> NodeId:
        return self._id

    def _persist(self, kind: str, waiting: tuple[bytes, int] | None = None, **fields: Any) -> None:
        """Journal an entry; ``_settle`` hands ``waiting`` back once it is ``Persisted``."""
        entry = _entry(self.side, self._next_entry, kind, **fields)
        self._next_entry += 1
        self._out.append(Persist(entry))
        self._pending[entry.entry_id] = waiting

    def _settle(self, entry_id: int) -> tuple[bytes, int] | None:
        """What waited for journal entry ``entry_id``, durable now (None: nothing did)."""
        if entry_id not in self._pending:
            raise LocalProtocolError(f"Persisted for unknown journal entry {entry_id}")
        return self._pending.pop(entry_id)

    def _refuse(self, reason: TokenRefusal, peer: NodeId | None, detail: str, **about: Any) -> None:
        self._stats[f"refused_{reason.value}"] += 1
        self._out.append(ReportRefusal(reason, peer, detail, **about))

    def _refuse_error(self, exc: RemoteProtocolError, peer: NodeId | None) -> None:
        reason = exc.reason if isinstance(exc, LedgerRefused) else TokenRefusal.MALFORMED
        self._refuse(reason, peer, str(exc))

    def _drain(self) -> list[Any]:
        out, self._out = self._out, []
        return out

    def _journal(self, blobs: Iterable[bytes]) -> Iterator[tuple[int, str, dict[str, Any]]]:
        """The entries of our journal, each once; the entry counter continues after them."""
        if self._next_entry != 1 or self._out:
            raise LocalProtocolError("restore needs a fresh ledger")
        seen: dict[int, bytes] = {}
        for blob in blobs:
            entry_id, kind, record = _read_entry(self.side, blob)
            if entry_id in seen:
                if seen[entry_id] != blob:
                    raise LocalProtocolError(f"two ledger journal entries numbered {entry_id}")
                continue  # the same entry written twice
            seen[entry_id] = blob
            yield entry_id, kind, record
        self._next_entry = max(seen, default=0) + 1
        self._stats = Counter(dict.fromkeys(self._stats, 0))  # counters count from now on
