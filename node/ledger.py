"""The ledger: pay the first completer with token chains, journal before promising.

Theory of operation
-------------------
Two sans-IO cores, one per side of a token chain (chains, tokens and the signed
statements are node/tokens.py):

* ``PayerLedger`` (the job owner) holds the secret chains it pays from, one or
  more per payee. The market tells it who completed a segment first
  (``WinnerRecorded``), then asks it to pay (``PaymentRequested``; ``pay_winner``
  does both). It releases the next token of an unexpired chain to that payee
  with enough units left, as a payment signed by the payer and tied to (job,
  segment); the first payments of a chain carry its commitment, until the payee
  acknowledges one.
* ``PayeeLedger`` (the host) accepts a commitment only if it is addressed to
  this node, signed by a trusted issuer (one of ``trusted_issuers``, or the
  payer itself when ``accept_self_issued``) and not expired; a known chain id
  with different content is refused. It accepts a payment only if it is signed
  by the chain's payer, starts exactly at the chain's head (``index - units ==
  head``), stays within the chain, pays at most ``max_step`` units, and its token
  hashes ``units`` times to the head. The head then moves to ``index``.

Persist before promise. Every decision that a message depends on is journaled
first: the core emits ``Persist(entry)`` and only on ``Persisted(entry_id)``
emits what depends on it. Payer: chain (with its seed) and release are
journaled before the payment is sent; acks are journaled too, though nothing
waits for them. Payee: commitment and acceptance are journaled before the
``SendAck``; the core holds the ack back until then. The agent must write the
entries of one core in the order they were emitted, to one journal per core:
an entry is durable only if every earlier one is. A failed write is fatal to
the core; the agent rebuilds it with ``restore`` from the journal.

Crash and retransmission. The payer retransmits the unacknowledged payments
of a chain, in index order, with exponential backoff from ``retry_s`` to
``max_retry_s``, until acked or the chain expires; after ``restore`` at once.
The payee answers a resend of a payment it accepted and journaled with the
same ack (it is not accepted again) and ignores one still being journaled. A
payee crash before the journal write loses the acceptance: the head is back
where it was, so the payer's resend (the same token at the same index) is
accepted then, once. A crash after the write keeps the acceptance, and the
resend is only acknowledged again. A payer crash before its journal write
loses a release that was never sent; after it, the release is resent. A
release is deterministic (the next index's token), so a lost one is re-made
identically. ``restore`` takes the journal's blobs in order, on a fresh core;
an entry written twice counts once; a corrupt journal raises
``LocalProtocolError`` and leaves the core unusable. The payer's journal holds
chain seeds: keep it as private as the identity key.

Ordering: the payee accepts only the payment that starts at its head, so a
payment overtaken by a later one is refused as out of order and the payer's
retransmission puts them right. This keeps what each token paid for exact.

Choices beyond the brief, and why
---------------------------------
- Payments carry the chain's commitment until one is acked, so a lost
  commitment message cannot strand a chain, and no extra round trip is needed.
- Acks are signed by the payee: they are the owner's receipts.
- A second valid payment for a segment already paid is accepted, not refused
  (the tokens are good value and refusing would stall the chain); it is
  counted as ``segments_paid_again`` and ``paid_for`` lists both.
- A payment never spans two chains: when no chain has enough units left the
  payer asks for a new one (``ChainNeeded``) and the remainder goes unused.
- Statistics count since start (or restore); the gauges (``chains``,
  ``unacknowledged``, ``journaling``) show the state.

Invariants
----------
- The payee accepts each chain index at most once, and only tokens on the
  committed chain: its head only moves forward, one verified step at a time.
- Accepted units never exceed released units: the head is a released token.
- The payer releases each token at most once, pays each (job, segment) at most
  once and only to its recorded first completer, and sends nothing before the
  release is journaled; restore refuses a second payee for a segment.
- The payee sends no ack before the acceptance is journaled; after
  ``restore`` every journaled acceptance is held exactly once.
- ``handle`` never raises on a peer's bytes: refusals are ``Refused`` effects,
  counted as ``refused_<reason>`` in ``statistics()``. ``LocalProtocolError``
  means the agent's own mistake (unknown entry id, bad chain, corrupt journal).
"""

from __future__ import annotations

import enum
import math
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgpack

from node.identity import Identity, NodeId
from node.tokens import (
    MAX_UNITS,
    Commitment,
    HashChain,
    LedgerRefused,
    Payment,
    Refusal,
    decode_ack,
    decode_commitment,
    decode_payment,
    hash_token,
    sign_ack,
    sign_payment,
)
from node.wire import LocalProtocolError, RemoteProtocolError, unpack_limited

_PAYER_ONLY = ("bad_ack", "duplicate_payment", "not_winner", "winner_conflict", "no_chain")
_PAYER_TOO = ("malformed", "bad_signature", "not_for_us", "unknown_chain")
PAYER_REFUSALS = tuple(Refusal(name) for name in _PAYER_TOO + _PAYER_ONLY)
PAYEE_REFUSALS = tuple(r for r in Refusal if r.value not in _PAYER_ONLY)
PAYER_COUNTERS = (
    *("chains_added", "payments_released", "units_released", "payments_sent"),
    *("payments_resent", "acks", "acks_duplicate"),
)
PAYEE_COUNTERS = (
    *("commitments_accepted", "payments_accepted", "units_accepted"),
    *("duplicates_reacked", "duplicates_pending", "segments_paid_again"),
)

SegmentKey = tuple[bytes, int]  # (job id, segment index)
_T = TypeVar("_T")


# -- journal, events and effects -------------------------------------------------------


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
class ChainAdded:
    """Event (payer): pay ``commitment.payee`` from ``chain``; the caller drew the seed."""

    chain: HashChain
    commitment: Commitment


@dataclass(frozen=True, slots=True)
class WinnerRecorded:
    """Event (payer): the market accepted ``winner``'s completion of the segment first."""

    job_id: bytes
    segment: int
    winner: NodeId


@dataclass(frozen=True, slots=True)
class PaymentRequested:
    job_id: bytes
    segment: int
    payee: NodeId
    units: int


@dataclass(frozen=True, slots=True)
class AckReceived:
    blob: bytes


@dataclass(frozen=True, slots=True)
class CommitmentReceived:
    blob: bytes


@dataclass(frozen=True, slots=True)
class PaymentReceived:
    blob: bytes


PayerEvent = ChainAdded | WinnerRecorded | PaymentRequested | AckReceived | Persisted
PayeeEvent = CommitmentReceived | PaymentReceived | Persisted


@dataclass(frozen=True, slots=True)
class Persist:
    """Effect: append ``entry`` to the core's journal, then report ``Persisted``."""

    entry: JournalEntry


@dataclass(frozen=True, slots=True)
class SendPayment:
    target: NodeId
    blob: bytes


@dataclass(frozen=True, slots=True)
class SendAck:
    target: NodeId
    blob: bytes


@dataclass(frozen=True, slots=True)
class ChainNeeded:
    """Effect (payer): make a chain to ``payee`` of at least ``units`` and add it."""

    payee: NodeId
    units: int


@dataclass(frozen=True, slots=True)
class PaymentAccepted:
    """Effect (payee): a journaled payment of ``units`` units worth ``value``."""

    payer: NodeId
    job_id: bytes
    segment: int
    units: int
    value: int
    chain_id: bytes
    index: int


@dataclass(frozen=True, slots=True)
class Refused:
    """Effect: something was refused; ``peer`` is the sender, or the payee asked for."""

    reason: Refusal
    peer: NodeId | None
    detail: str
    job_id: bytes | None = None
    segment: int | None = None


PayerEffect = Persist | SendPayment | ChainNeeded | Refused
PayeeEffect = Persist | SendAck | PaymentAccepted | Refused


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


def _journal_field(record: dict[str, Any], name: str, kind: type) -> Any:
    value = record.get(name)
    if type(value) is not kind:
        raise LocalProtocolError(f"ledger journal entry field {name!r} is not {kind.__name__}")
    return value


def _ours(decode: Callable[[bytes], _T], blob: Any) -> _T:
    """Decode a statement from our own journal; a failure is a corrupt journal."""
    try:
        return decode(blob)
    except RemoteProtocolError as exc:
        raise LocalProtocolError(f"ledger journal holds a bad statement: {exc}") from None


class _Core:
    """What both sides share: the entry counter, pending entries, counters, output."""

    side = ""

    def __init__(
        self, identity: Identity, counters: tuple[str, ...], refusals: tuple[Refusal, ...]
    ) -> None:
        self._identity = identity
        self._id = identity.node_id
        self._next_entry = 1
        self._stats: Counter[str] = Counter(dict.fromkeys(counters, 0))
        self._stats.update({f"refused_{r.value}": 0 for r in refusals})
        self._out: list[Any] = []

    @property
    def node_id(self) -> NodeId:
        return self._id

    def _persist(self, kind: str, **fields: Any) -> int:
        entry = _entry(self.side, self._next_entry, kind, **fields)
        self._next_entry += 1
        self._out.append(Persist(entry))
        return entry.entry_id

    def _refuse(self, reason: Refusal, peer: NodeId | None, detail: str, **about: Any) -> None:
        self._stats[f"refused_{reason.value}"] += 1
        self._out.append(Refused(reason, peer, detail, **about))

    def _refuse_error(self, exc: RemoteProtocolError, peer: NodeId | None) -> None:
        reason = exc.reason if isinstance(exc, LedgerRefused) else Refusal.MALFORMED
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


# -- payer ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PayerConfig:
    retry_s: float = 2.0
    max_retry_s: float = 60.0
    expiry_margin_s: float = 300.0  # release no token this close to the chain's expiry
    max_units: int = 1024  # per payment; keep at or below the payees' max_step

    def __post_init__(self) -> None:
        if not 0 < self.retry_s <= self.max_retry_s or self.expiry_margin_s < 0:
            raise ValueError("need 0 < retry_s <= max_retry_s and expiry_margin_s >= 0")
        if not 1 <= self.max_units <= MAX_UNITS:
            raise ValueError(f"max_units must be 1..{MAX_UNITS}")


@dataclass(slots=True)
class _Release:
    payment: Payment
    persisted: bool = False
    acked: bool = False


@dataclass(slots=True)
class _OutChain:
    chain: HashChain
    commitment: Commitment
    released: int = 0
    acked: int = 0
    releases: list[SegmentKey] = field(default_factory=list)
    resend_at: float = math.inf
    backoff: float = 0.0


class PayerLedger(_Core):
    """The job owner's side: release tokens to first completers. See the module docstring."""

    side = "payer"

    def __init__(self, identity: Identity, config: PayerConfig | None = None) -> None:
        super().__init__(identity, PAYER_COUNTERS, PAYER_REFUSALS)
        self.config = config or PayerConfig()
        self._chains: dict[bytes, _OutChain] = {}
        self._by_payee: dict[NodeId, list[bytes]] = {}
        self._winners: dict[SegmentKey, NodeId] = {}
        self._releases: dict[SegmentKey, _Release] = {}
        self._pending: dict[int, SegmentKey | None] = {}

    def handle(self, event: PayerEvent, now: float) -> list[PayerEffect]:
        if isinstance(event, ChainAdded):
            self._add_chain(event.chain, event.commitment)
            self._pending[self._persist("chain", **_chain_fields(event))] = None
        elif isinstance(event, WinnerRecorded):
            self._record_winner((event.job_id, event.segment), event.winner)
        elif isinstance(event, PaymentRequested):
            self._pay((event.job_id, event.segment), event.payee, event.units, now)
        elif isinstance(event, AckReceived):
            try:
                self._on_ack(event.blob)
            except RemoteProtocolError as exc:
                self._refuse_error(exc, None)
        elif isinstance(event, Persisted):
            self._on_persisted(event.entry_id, now)
        return self._drain()

    def pay_winner(
        self, job_id: bytes, segment: int, winner: NodeId, units: int, now: float
    ) -> list[PayerEffect]:
        """Record ``winner`` as the segment's first completer and pay it ``units``."""
        effects = self.handle(WinnerRecorded(job_id, segment, winner), now)
        if effects:  # refused: another winner is on record
            return effects
        return self.handle(PaymentRequested(job_id, segment, winner, units), now)

    def tick(self, now: float) -> list[PayerEffect]:
        """Resend the unacknowledged payments of every chain whose timer is due."""
        for state in self._chains.values():
            if state.resend_at > now:
                continue
            if state.commitment.is_expired(now):
                state.resend_at = math.inf
                continue
            unacked = [self._releases[key] for key in state.releases]
            unacked = [r for r in unacked if r.persisted and not r.acked]
            if not unacked:
                state.resend_at = math.inf
                continue
            for release in unacked:
                self._out.append(SendPayment(release.payment.payee, release.payment.blob))
                self._stats["payments_resent"] += 1
            state.backoff = min(
                max(state.backoff * 2, self.config.retry_s), self.config.max_retry_s
            )
            state.resend_at = now + state.backoff
        return self._drain()

    def next_wakeup(self) -> float:
        """When ``tick`` next has work (infinity: nothing to resend)."""
        return min((c.resend_at for c in self._chains.values()), default=math.inf)

    def restore(self, blobs: Iterable[bytes]) -> None:
        """Rebuild from the journal, on a fresh ledger before any event."""
        for _, kind, record in self._journal(blobs):
            if kind == "chain":
                seed = _journal_field(record, "seed", bytes)
                chain = HashChain(seed, _journal_field(record, "length", int))
                self._add_chain(chain, _ours(decode_commitment, record.get("commitment")))
            elif kind == "release":
                self._restore_release(_ours(decode_payment, record.get("payment")))
            elif kind == "acked":
                chain_id = _journal_field(record, "chain", bytes)
                if chain_id not in self._chains:
                    raise LocalProtocolError("ledger journal acks an unknown chain")
                self._mark_acked(self._chains[chain_id], _journal_field(record, "index", int))
            else:
                raise LocalProtocolError(f"unknown payer journal entry kind {kind!r}")
        for state in self._chains.values():
            if any(not self._releases[key].acked for key in state.releases):
                state.resend_at = -math.inf

    def statistics(self) -> dict[str, int]:
        stats = dict(self._stats)
        stats["chains"] = len(self._chains)
        stats["unacknowledged"] = sum(1 for r in self._releases.values() if not r.acked)
        return stats

    def chains(self) -> list[ChainView]:
        return [
            _view(s.commitment, s.commitment.payee, s.released, s.acked)
            for s in self._chains.values()
        ]

    def balances(self) -> list[Balance]:
        return balances(self.chains())

    def payments(self) -> list[PaymentView]:
        views = []
        for release in self._releases.values():
            state = (
                PaymentState.ACKNOWLEDGED
                if release.acked
                else PaymentState.SENT
                if release.persisted
                else PaymentState.JOURNALING
            )
            p = release.payment
            value = p.units * self._chains[p.chain_id].commitment.unit_value
            views.append(_payment_view(p, p.payee, value, state))
        return views

    # -- transitions ---------------------------------------------------------------------

    def _add_chain(self, chain: HashChain, commitment: Commitment) -> None:
        if (commitment.chain_id, commitment.top, commitment.length) != (
            chain.chain_id,
            chain.top,
            chain.length,
        ):
            raise LocalProtocolError("the commitment is not for this chain")
        if commitment.payer != self._id:
            raise LocalProtocolError("the commitment names another payer")
        if chain.chain_id in self._chains:
            raise LocalProtocolError("this chain was added before")
        self._chains[chain.chain_id] = _OutChain(chain, commitment)
        self._by_payee.setdefault(commitment.payee, []).append(chain.chain_id)
        self._stats["chains_added"] += 1

    def _record_winner(self, key: SegmentKey, winner: NodeId) -> None:
        held = self._winners.setdefault(key, winner)
        if held != winner:
            self._refuse(
                Refusal.WINNER_CONFLICT,
                winner,
                f"segment {key[1]} was first completed by {held.short}",
                job_id=key[0],
                segment=key[1],
            )

    def _pay(self, key: SegmentKey, payee: NodeId, units: int, now: float) -> None:
        if not 1 <= units <= self.config.max_units:
            raise LocalProtocolError(f"a payment is 1..{self.config.max_units} units, not {units}")
        about: dict[str, Any] = {"job_id": key[0], "segment": key[1]}
        if key in self._releases:
            self._refuse(Refusal.DUPLICATE_PAYMENT, payee, f"segment {key[1]} is paid", **about)
            return
        if self._winners.get(key) != payee:
            detail = f"{payee.short} is not the first completer of segment {key[1]}"
            self._refuse(Refusal.NOT_WINNER, payee, detail, **about)
            return
        state = self._chain_for(payee, units, now)
        if state is None:
            self._refuse(Refusal.NO_CHAIN, payee, f"no chain with {units} units left", **about)
            self._out.append(ChainNeeded(payee, units))
            return
        payment = sign_payment(
            self._identity,
            state.chain,
            payee=payee,
            job_id=key[0],
            segment=key[1],
            index=state.released + units,
            units=units,
            commitment=None if state.acked else state.commitment.blob,
        )
        self._append_release(state, key, payment)
        self._pending[self._persist("release", payment=payment.blob)] = key
        self._stats["payments_released"] += 1
        self._stats["units_released"] += units

    def _chain_for(self, payee: NodeId, units: int, now: float) -> _OutChain | None:
        for chain_id in self._by_payee.get(payee, []):
            state = self._chains[chain_id]
            fresh = now + self.config.expiry_margin_s < state.commitment.expires
            if fresh and state.chain.length - state.released >= units:
                return state
        return None

    def _append_release(self, state: _OutChain, key: SegmentKey, payment: Payment) -> None:
        state.released = payment.index
        state.releases.append(key)
        self._releases[key] = _Release(payment)
        self._winners[key] = payment.payee

    def _restore_release(self, payment: Payment) -> None:
        key = (payment.job_id, payment.segment)
        state = self._chains.get(payment.chain_id)
        if state is None or payment.payer != self._id:
            raise LocalProtocolError("ledger journal releases a token of an unknown chain")
        held = self._releases.get(key)
        if held is not None:
            if held.payment != payment:
                raise LocalProtocolError(f"ledger journal pays segment {key[1]} twice")
            return  # the same entry written twice
        if payment.index - payment.units != state.released or payment.payee != (
            state.commitment.payee
        ):
            raise LocalProtocolError("ledger journal releases tokens out of order")
        self._append_release(state, key, payment)
        self._releases[key].persisted = True

    def _on_persisted(self, entry_id: int, now: float) -> None:
        if entry_id not in self._pending:
            raise LocalProtocolError(f"Persisted for unknown journal entry {entry_id}")
        key = self._pending.pop(entry_id)
        if key is None:
            return
        release = self._releases[key]
        release.persisted = True
        if release.acked:
            return
        self._out.append(SendPayment(release.payment.payee, release.payment.blob))
        self._stats["payments_sent"] += 1
        state = self._chains[release.payment.chain_id]
        if state.resend_at == math.inf:
            state.backoff = self.config.retry_s
            state.resend_at = now + state.backoff

    def _on_ack(self, blob: bytes) -> None:
        ack = decode_ack(blob)
        if ack.payer != self._id:
            raise LedgerRefused(Refusal.NOT_FOR_US, "ack for another payer")
        state = self._chains.get(ack.chain_id)
        if state is None:
            raise LedgerRefused(Refusal.UNKNOWN_CHAIN, "ack for a chain we never paid from")
        release = self._releases.get((ack.job_id, ack.segment))
        p = release.payment if release is not None else None
        if (
            release is None
            or p is None
            or not release.persisted
            or (p.chain_id, p.payee, p.index, p.units)
            != (ack.chain_id, ack.payee, ack.index, ack.units)
        ):
            raise LedgerRefused(Refusal.BAD_ACK, "ack for a payment we did not send")
        if ack.index <= state.acked:
            self._stats["acks_duplicate"] += 1
            return
        self._stats["acks"] += 1
        self._mark_acked(state, ack.index)
        self._pending[self._persist("acked", chain=ack.chain_id, index=ack.index)] = None
        state.backoff = self.config.retry_s
        unacked = any(not self._releases[key].acked for key in state.releases)
        state.resend_at = state.resend_at if unacked else math.inf

    def _mark_acked(self, state: _OutChain, index: int) -> None:
        """The payee accepts in order: an ack of ``index`` acknowledges all below it."""
        if index > state.released:
            raise LocalProtocolError("acknowledged beyond the released tokens")
        state.acked = max(state.acked, index)
        for key in state.releases:
            release = self._releases[key]
            if release.payment.index <= index:
                release.acked = True


def _chain_fields(event: ChainAdded) -> dict[str, Any]:
    chain = event.chain
    return {"seed": chain.seed, "length": chain.length, "commitment": event.commitment.blob}


# -- payee ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PayeeConfig:
    trusted_issuers: frozenset[NodeId] = frozenset()
    accept_self_issued: bool = False  # a volunteer credit swarm: payers issue their own chains
    max_step: int = 1024  # most units (hashes) one payment may cover

    def __post_init__(self) -> None:
        if not 1 <= self.max_step <= MAX_UNITS:
            raise ValueError(f"max_step must be 1..{MAX_UNITS}")

    def trusts(self, commitment: Commitment) -> bool:
        if commitment.issuer in self.trusted_issuers:
            return True
        return self.accept_self_issued and commitment.issuer == commitment.payer


@dataclass(slots=True)
class _InChain:
    commitment: Commitment
    head: int
    head_value: bytes
    durable: int = 0  # the head as of the last journaled acceptance


@dataclass(slots=True)
class _Accepted:
    payment: Payment
    persisted: bool = False
    ack: bytes | None = None


class PayeeLedger(_Core):
    """The host's side: accept tokens, journal, then acknowledge. See the module docstring."""

    side = "payee"

    def __init__(self, identity: Identity, config: PayeeConfig | None = None) -> None:
        super().__init__(identity, PAYEE_COUNTERS, PAYEE_REFUSALS)
        self.config = config or PayeeConfig()
        self._chains: dict[bytes, _InChain] = {}
        self._accepted: dict[tuple[bytes, int], _Accepted] = {}
        self._paid_for: dict[SegmentKey, list[tuple[bytes, int]]] = {}
        self._pending: dict[int, tuple[bytes, int] | None] = {}

    def handle(self, event: PayeeEvent, now: float) -> list[PayeeEffect]:
        if isinstance(event, CommitmentReceived):
            commitment = None
            try:
                commitment = decode_commitment(event.blob)
                self._offer_commitment(commitment, now)
            except RemoteProtocolError as exc:
                self._refuse_error(exc, commitment.payer if commitment else None)
        elif isinstance(event, PaymentReceived):
            payment = None
            try:
                payment = decode_payment(event.blob)
                self._on_payment(payment, now)
            except RemoteProtocolError as exc:
                self._refuse_error(exc, payment.payer if payment else None)
        elif isinstance(event, Persisted):
            self._on_persisted(event.entry_id)
        return self._drain()

    def restore(self, blobs: Iterable[bytes]) -> None:
        """Rebuild from the journal, on a fresh ledger before any event.

        Trust and expiry are not checked again: they held when the entry was written.
        """
        for entry_id, kind, record in self._journal(blobs):
            try:
                if kind == "commitment":
                    commitment = _ours(decode_commitment, record.get("commitment"))
                    self._add_chain(commitment)
                elif kind == "accept":
                    payment = _ours(decode_payment, record.get("payment"))
                    self._check_payment(payment, None)
                    self._accept(payment).persisted = True
                    chain = self._chains[payment.chain_id]
                    chain.durable = chain.head
                else:
                    raise LocalProtocolError(f"unknown payee journal entry kind {kind!r}")
            except RemoteProtocolError as exc:
                raise LocalProtocolError(f"ledger journal entry {entry_id}: {exc}") from None

    def statistics(self) -> dict[str, int]:
        stats = dict(self._stats)
        stats["chains"] = len(self._chains)
        stats["journaling"] = sum(1 for key in self._pending.values() if key is not None)
        return stats

    def chains(self) -> list[ChainView]:
        return [
            _view(c.commitment, c.commitment.payer, c.durable, c.durable)
            for c in self._chains.values()
        ]

    def balances(self) -> list[Balance]:
        return balances(self.chains())

    def payments(self) -> list[PaymentView]:
        views = []
        for accepted in self._accepted.values():
            p = accepted.payment
            state = PaymentState.ACCEPTED if accepted.persisted else PaymentState.JOURNALING
            value = p.units * self._chains[p.chain_id].commitment.unit_value
            views.append(_payment_view(p, p.payer, value, state))
        return views

    def paid_for(self, job_id: bytes, segment: int) -> list[PaymentView]:
        """The payments accepted for one segment (more than one: the payer paid twice)."""
        keys = self._paid_for.get((job_id, segment), [])
        return [v for v in self.payments() if (v.chain_id, v.index) in keys]

    # -- transitions ---------------------------------------------------------------------

    def _offer_commitment(self, commitment: Commitment, now: float) -> None:
        if commitment.payee != self._id:
            raise LedgerRefused(Refusal.NOT_FOR_US, "commitment for another payee")
        if not self.config.trusts(commitment):
            raise LedgerRefused(
                Refusal.UNTRUSTED_ISSUER, f"issuer {commitment.issuer.short} is not trusted"
            )
        if commitment.is_expired(now):
            raise LedgerRefused(Refusal.EXPIRED, "commitment expired")
        held = self._chains.get(commitment.chain_id)
        if held is not None:
            if held.commitment != commitment:
                raise LedgerRefused(Refusal.CHAIN_CONFLICT, "another commitment for this chain")
            return
        self._add_chain(commitment)
        self._pending[self._persist("commitment", commitment=commitment.blob)] = None
        self._stats["commitments_accepted"] += 1

    def _add_chain(self, commitment: Commitment) -> None:
        if commitment.chain_id in self._chains:
            raise LocalProtocolError("ledger journal commits a chain twice")
        self._chains[commitment.chain_id] = _InChain(commitment, 0, commitment.top)

    def _on_payment(self, payment: Payment, now: float) -> None:
        if payment.payee != self._id:
            raise LedgerRefused(Refusal.NOT_FOR_US, "payment for another payee")
        if payment.chain_id not in self._chains and payment.commitment is not None:
            commitment = decode_commitment(payment.commitment)
            if commitment.chain_id != payment.chain_id:
                raise RemoteProtocolError("payment carries the commitment of another chain")
            self._offer_commitment(commitment, now)
        if self._is_resend(payment):
            accepted = self._accepted[(payment.chain_id, payment.index)]
            if not accepted.persisted:
                self._stats["duplicates_pending"] += 1
                return
            if accepted.ack is None:
                accepted.ack = sign_ack(self._identity, payment).blob
            self._out.append(SendAck(payment.payer, accepted.ack))
            self._stats["duplicates_reacked"] += 1
            return
        self._check_payment(payment, now)
        self._accept(payment)
        self._pending[self._persist("accept", payment=payment.blob)] = (
            payment.chain_id,
            payment.index,
        )

    def _is_resend(self, payment: Payment) -> bool:
        held = self._accepted.get((payment.chain_id, payment.index))
        return held is not None and held.payment == payment

    def _check_payment(self, payment: Payment, now: float | None) -> None:
        """Raise LedgerRefused unless ``payment`` moves its chain's head one valid step.

        ``now`` None (restoring): the chain's expiry is not checked.
        """
        chain = self._chains.get(payment.chain_id)
        if chain is None:
            raise LedgerRefused(Refusal.UNKNOWN_CHAIN, "payment on an unknown chain")
        commitment = chain.commitment
        if payment.payer != commitment.payer:
            raise LedgerRefused(Refusal.WRONG_PAYER, "payment not signed by the chain's payer")
        if payment.index <= chain.head:
            raise LedgerRefused(
                Refusal.REPLAYED_TOKEN, f"token {payment.index} is at or below head {chain.head}"
            )
        if payment.index > commitment.length:
            raise LedgerRefused(
                Refusal.BEYOND_CHAIN, f"token {payment.index} beyond chain of {commitment.length}"
            )
        if now is not None and commitment.is_expired(now):
            raise LedgerRefused(Refusal.EXPIRED, "chain expired")
        if payment.units > self.config.max_step:
            raise LedgerRefused(Refusal.STEP_TOO_LARGE, f"{payment.units} units at once")
        if payment.index - payment.units != chain.head:
            raise LedgerRefused(
                Refusal.OUT_OF_ORDER,
                f"payment starts at {payment.index - payment.units}, head is {chain.head}",
            )
        if hash_token(payment.chain_id, payment.token, payment.units) != chain.head_value:
            raise LedgerRefused(Refusal.BAD_TOKEN, "token does not hash to the chain's head")

    def _accept(self, payment: Payment) -> _Accepted:
        chain = self._chains[payment.chain_id]
        chain.head, chain.head_value = payment.index, payment.token
        accepted = self._accepted[(payment.chain_id, payment.index)] = _Accepted(payment)
        paid = self._paid_for.setdefault((payment.job_id, payment.segment), [])
        if paid:
            self._stats["segments_paid_again"] += 1
        paid.append((payment.chain_id, payment.index))
        self._stats["payments_accepted"] += 1
        self._stats["units_accepted"] += payment.units
        return accepted

    def _on_persisted(self, entry_id: int) -> None:
        if entry_id not in self._pending:
            raise LocalProtocolError(f"Persisted for unknown journal entry {entry_id}")
        key = self._pending.pop(entry_id)
        if key is None:
            return
        accepted = self._accepted[key]
        accepted.persisted = True
        p = accepted.payment
        chain = self._chains[p.chain_id]
        chain.durable = max(chain.durable, p.index)
        accepted.ack = sign_ack(self._identity, p).blob
        value = p.units * chain.commitment.unit_value
        self._out.append(SendAck(p.payer, accepted.ack))
        self._out.append(PaymentAccepted(p.payer, p.job_id, p.segment, p.units, value, *key))


def _view(commitment: Commitment, counterparty: NodeId, released: int, accepted: int) -> ChainView:
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


def _payment_view(p: Payment, counterparty: NodeId, value: int, state: PaymentState) -> PaymentView:
    return PaymentView(
        p.job_id, p.segment, counterparty, p.chain_id, p.index, p.units, value, state
    )
