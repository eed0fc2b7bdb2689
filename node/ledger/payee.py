"""The payee's ledger: accept tokens that hash to the head, journal, then acknowledge.

Theory of operation
-------------------
``PayeeLedger`` is the host's sans-IO core; the payer's side is node/ledger/payer.py,
and what both share (the journal, ``Persist``/``Persisted``, ``ReportRefusal``, the
views) is node/ledger/journal.py. It accepts a commitment only if it is addressed to
this node, signed by a trusted issuer (one of ``trusted_issuers``, or the payer
itself when ``accept_self_issued``) and not expired; a known chain id with
different content is refused. It accepts a payment only if it is signed by the
chain's payer, starts exactly at the chain's head (``index - units == head``),
stays within the chain, pays at most ``max_step`` units, and its token hashes
``units`` times to the head. The head then moves to ``index``.

Persist before promise: a commitment and an acceptance are journaled before the
``SendAck``; the core holds the ack back until then.

Crash and retransmission. The payee answers a resend of a payment it accepted
and journaled with the same ack (it is not accepted again) and ignores one
still being journaled. A payee crash before the journal write loses the
acceptance: the head is back where it was, so the payer's resend (the same
token at the same index) is accepted then, once. A crash after the write keeps
the acceptance, and the resend is only acknowledged again.

Ordering: the payee accepts only the payment that starts at its head, so a
payment overtaken by a later one is refused as out of order and the payer's
retransmission puts them right. This keeps what each token paid for exact.

Choices beyond the brief, and why
---------------------------------
- Acks are signed by the payee: they are the owner's receipts.
- A second valid payment for a segment already paid is accepted, not refused
  (the tokens are good value and refusing would stall the chain); it is
  counted as ``segments_paid_again`` and ``paid_for`` lists both.

Invariants
----------
- The payee accepts each chain index at most once, and only tokens on the
  committed chain: its head only moves forward, one verified step at a time.
- Accepted units never exceed released units: the head is a released token.
- The payee sends no ack before the acceptance is journaled; after
  ``restore`` every journaled acceptance is held exactly once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

from node.base.identity import Identity, NodeId
from node.base.wire import LocalProtocolError, RemoteProtocolError
from node.ledger.journal import (
    PAYEE_REFUSALS,
    Balance,
    ChainView,
    LedgerCore,
    PaymentState,
    PaymentView,
    Persist,
    Persisted,
    ReportRefusal,
    SegmentKey,
    balances,
    chain_view,
    from_journal,
    payment_view,
)
from node.ledger.tokens import (
    MAX_UNITS,
    Commitment,
    LedgerRefused,
    Payment,
    TokenRefusal,
    decode_commitment,
    decode_payment,
    hash_token,
    sign_ack,
)

PAYEE_COUNTERS = (
    *("commitments_accepted", "payments_accepted", "units_accepted"),
    *("duplicates_reacked", "duplicates_pending", "segments_paid_again"),
)

_Statement = TypeVar("_Statement", Commitment, Payment)


# -- events and effects ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CommitmentReceived:
    blob: bytes


@dataclass(frozen=True, slots=True)
class PaymentReceived:
    blob: bytes


PayeeEvent = CommitmentReceived | PaymentReceived | Persisted


@dataclass(frozen=True, slots=True)
class SendAck:
    target: NodeId
    blob: bytes


@dataclass(frozen=True, slots=True)
class CreditPayment:
    """Effect (payee): a journaled payment of ``units`` units worth ``value``."""

    payer: NodeId
    job_id: bytes
    segment: int
    units: int
    value: int
    chain_id: bytes
    index: int


PayeeEffect = Persist | SendAck | CreditPayment | ReportRefusal


# -- the core ---------------------------------------------------------------------------


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


class PayeeLedger(LedgerCore):
    """The host's side: accept tokens, journal, then acknowledge. See the module docstring."""

    side = "payee"

    def __init__(self, identity: Identity, config: PayeeConfig | None = None) -> None:
        super().__init__(identity, PAYEE_COUNTERS, PAYEE_REFUSALS)
        self.config = config or PayeeConfig()
        self._chains: dict[bytes, _InChain] = {}
        self._accepted: dict[tuple[bytes, int], _Accepted] = {}
        self._paid_for: dict[SegmentKey, list[tuple[bytes, int]]] = {}

    def handle(self, event: PayeeEvent, now: float) -> list[PayeeEffect]:
        if isinstance(event, CommitmentReceived):
            self._receive(event.blob, decode_commitment, self._offer_commitment, now)
        elif isinstance(event, PaymentReceived):
            self._receive(event.blob, decode_payment, self._on_payment, now)
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
                    commitment = from_journal(decode_commitment, record.get("commitment"))
                    self._add_chain(commitment)
                elif kind == "accept":
                    payment = from_journal(decode_payment, record.get("payment"))
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
            chain_view(c.commitment, c.commitment.payer, c.durable, c.durable)
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
            views.append(payment_view(p, p.payer, value, state))
        return views

    def paid_for(self, job_id: bytes, segment: int) -> list[PaymentView]:
        """The payments accepted for one segment (more than one: the payer paid twice)."""
        keys = self._paid_for.get((job_id, segment), [])
        return [v for v in self.payments() if (v.chain_id, v.index) in keys]

    # -- transitions ---------------------------------------------------------------------

    def _receive(
        self,
        blob: bytes,
        decode: Callable[[bytes], _Statement],
        take: Callable[[_Statement, float], None],
        now: float,
    ) -> None:
        """Decode a payer's statement and take it; refuse it, counted, on any fault."""
        statement: _Statement | None = None
        try:
            statement = decode(blob)
            take(statement, now)
        except RemoteProtocolError as exc:
            self._refuse_error(exc, statement.payer if statement else None)

    def _offer_commitment(self, commitment: Commitment, now: float) -> None:
        if commitment.payee != self._id:
            raise LedgerRefused(TokenRefusal.NOT_FOR_US, "commitment for another payee")
        if not self.config.trusts(commitment):
            raise LedgerRefused(
                TokenRefusal.UNTRUSTED_ISSUER, f"issuer {commitment.issuer.short} is not trusted"
            )
        if commitment.is_expired(now):
            raise LedgerRefused(TokenRefusal.EXPIRED, "commitment expired")
        held = self._chains.get(commitment.chain_id)
        if held is not None:
            if held.commitment != commitment:
                raise LedgerRefused(
                    TokenRefusal.CHAIN_CONFLICT, "another commitment for this chain"
                )
            return
        self._add_chain(commitment)
        self._persist("commitment", commitment=commitment.blob)
        self._stats["commitments_accepted"] += 1

    def _add_chain(self, commitment: Commitment) -> None:
        if commitment.chain_id in self._chains:
            raise LocalProtocolError("ledger journal commits a chain twice")
        self._chains[commitment.chain_id] = _InChain(commitment, 0, commitment.top)

    def _on_payment(self, payment: Payment, now: float) -> None:
        if payment.payee != self._id:
            raise LedgerRefused(TokenRefusal.NOT_FOR_US, "payment for another payee")
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
        self._persist("accept", (payment.chain_id, payment.index), payment=payment.blob)

    def _is_resend(self, payment: Payment) -> bool:
        held = self._accepted.get((payment.chain_id, payment.index))
        return held is not None and held.payment == payment

    def _check_payment(self, payment: Payment, now: float | None) -> None:
        """Raise LedgerRefused unless ``payment`` moves its chain's head one valid step.

        ``now`` None (restoring): the chain's expiry is not checked.
        """
        chain = self._chains.get(payment.chain_id)
        if chain is None:
            raise LedgerRefused(TokenRefusal.UNKNOWN_CHAIN, "payment on an unknown chain")
        commitment = chain.commitment
        if payment.payer != commitment.payer:
            raise LedgerRefused(TokenRefusal.WRONG_PAYER, "payment not signed by the chain's payer")
        if payment.index <= chain.head:
            raise LedgerRefused(
                TokenRefusal.REPLAYED_TOKEN,
                f"token {payment.index} is at or below head {chain.head}",
            )
        if payment.index > commitment.length:
            raise LedgerRefused(
                TokenRefusal.BEYOND_CHAIN,
                f"token {payment.index} beyond chain of {commitment.length}",
            )
        if now is not None and commitment.is_expired(now):
            raise LedgerRefused(TokenRefusal.EXPIRED, "chain expired")
        if payment.units > self.config.max_step:
            raise LedgerRefused(TokenRefusal.STEP_TOO_LARGE, f"{payment.units} units at once")
        if payment.index - payment.units != chain.head:
            raise LedgerRefused(
                TokenRefusal.OUT_OF_ORDER,
                f"payment starts at {payment.index - payment.units}, head is {chain.head}",
            )
        if hash_token(payment.chain_id, payment.token, payment.units) != chain.head_value:
            raise LedgerRefused(TokenRefusal.BAD_TOKEN, "token does not hash to the chain's head")

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
        key = self._settle(entry_id)
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
        self._out.append(CreditPayment(p.payer, p.job_id, p.segment, p.units, value, *key))
