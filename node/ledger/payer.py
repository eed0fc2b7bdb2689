"""The payer's ledger: release tokens to first completers, journal before sending.

Theory of operation
-------------------
``PayerLedger`` is the job owner's sans-IO core; the payee's side is
node/ledger/payee.py, and what both share (the journal, ``Persist``/``Persisted``,
``ReportRefusal``, the views) is node/ledger/journal.py. It holds the secret chains it pays
from, one or more per payee. The market tells it who completed a segment first
(``WinnerRecorded``), then asks it to pay (``PaymentRequested``; ``pay_winner``
does both). It releases the next token of an unexpired chain to that payee with
enough units left, as a payment signed by the payer and tied to (job, segment);
the first payments of a chain carry its commitment, until the payee
acknowledges one.

Persist before promise: a chain (with its seed) and a release are journaled
before the payment is sent; acks are journaled too, though nothing waits for
them. The journal holds chain seeds: keep it as private as the identity key.

Crash and retransmission. The payer retransmits the unacknowledged payments of
a chain, in index order, with exponential backoff from ``retry_s`` to
``max_retry_s``, until acked or the chain expires; after ``restore`` at once.
The payee accepts only the payment that starts at its head, so a payment
overtaken by a later one is refused as out of order and the retransmission puts
them right. A payer crash before its journal write loses a release that was
never sent; after it, the release is resent. A release is deterministic (the
next index's token), so a lost one is re-made identically.

Choices beyond the brief, and why
---------------------------------
- Payments carry the chain's commitment until one is acked, so a lost
  commitment message cannot strand a chain, and no extra round trip is needed.
- A payment never spans two chains: when no chain has enough units left the
  payer asks for a new one (``CreateChain``) and the remainder goes unused.

Invariants
----------
- The payer releases each token at most once, pays each (job, segment) at most
  once and only to its recorded first completer, and sends nothing before the
  release is journaled; restore refuses a second payee for a segment.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from node.base.identity import Identity, NodeId
from node.base.wire import LocalProtocolError, RemoteProtocolError
from node.ledger.journal import (
    PAYER_REFUSALS,
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
    journal_field,
    payment_view,
)
from node.ledger.tokens import (
    MAX_UNITS,
    Commitment,
    HashChain,
    LedgerRefused,
    Payment,
    TokenRefusal,
    decode_ack,
    decode_commitment,
    decode_payment,
    sign_payment,
)

PAYER_COUNTERS = (
    *("chains_added", "payments_released", "units_released", "payments_sent"),
    *("payments_resent", "acks", "acks_duplicate"),
)


# -- events and effects ------------------------------------------------------------------


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


PayerEvent = ChainAdded | WinnerRecorded | PaymentRequested | AckReceived | Persisted


@dataclass(frozen=True, slots=True)
class SendPayment:
    target: NodeId
    blob: bytes


@dataclass(frozen=True, slots=True)
class CreateChain:
    """Effect (payer): make a chain to ``payee`` of at least ``units`` and add it."""

    payee: NodeId
    units: int


PayerEffect = Persist | SendPayment | CreateChain | ReportRefusal


# -- the core ---------------------------------------------------------------------------


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


class PayerLedger(LedgerCore):
    """The job owner's side: release tokens to first completers. See the module docstring."""

    side = "payer"

    def __init__(self, identity: Identity, config: PayerConfig | None = None) -> None:
        super().__init__(identity, PAYER_COUNTERS, PAYER_REFUSALS)
        self.config = config or PayerConfig()
        self._chains: dict[bytes, _OutChain] = {}
        self._by_payee: dict[NodeId, list[bytes]] = {}
        self._winners: dict[SegmentKey, NodeId] = {}
        self._releases: dict[SegmentKey, _Release] = {}

    def handle(self, event: PayerEvent, now: float) -> list[PayerEffect]:
        if isinstance(event, ChainAdded):
            self._add_chain(event.chain, event.commitment)
            self._persist("chain", **_chain_fields(event))
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
                seed = journal_field(record, "seed", bytes)
                chain = HashChain(seed, journal_field(record, "length", int))
                self._add_chain(chain, from_journal(decode_commitment, record.get("commitment")))
            elif kind == "release":
                self._restore_release(from_journal(decode_payment, record.get("payment")))
            elif kind == "acked":
                chain_id = journal_field(record, "chain", bytes)
                if chain_id not in self._chains:
                    raise LocalProtocolError("ledger journal acks an unknown chain")
                self._mark_acked(self._chains[chain_id], journal_field(record, "index", int))
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
            chain_view(s.commitment, s.commitment.payee, s.released, s.acked)
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
            views.append(payment_view(p, p.payee, value, state))
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
                TokenRefusal.WINNER_CONFLICT,
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
            self._refuse(
                TokenRefusal.DUPLICATE_PAYMENT, payee, f"segment {key[1]} is paid", **about
            )
            return
        if self._winners.get(key) != payee:
            detail = f"{payee.short} is not the first completer of segment {key[1]}"
            self._refuse(TokenRefusal.NOT_WINNER, payee, detail, **about)
            return
        state = self._chain_for(payee, units, now)
        if state is None:
            self._refuse(TokenRefusal.NO_CHAIN, payee, f"no chain with {units} units left", **about)
            self._out.append(CreateChain(payee, units))
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
        self._persist("release", key, payment=payment.blob)
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
        key = self._settle(entry_id)
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
            raise LedgerRefused(TokenRefusal.NOT_FOR_US, "ack for another payer")
        state = self._chains.get(ack.chain_id)
        if state is None:
            raise LedgerRefused(TokenRefusal.UNKNOWN_CHAIN, "ack for a chain we never paid from")
        release = self._releases.get((ack.job_id, ack.segment))
        p = release.payment if release is not None else None
        if (
            release is None
            or p is None
            or not release.persisted
            or (p.chain_id, p.payee, p.index, p.units)
            != (ack.chain_id, ack.payee, ack.index, ack.units)
        ):
            raise LedgerRefused(TokenRefusal.BAD_ACK, "ack for a payment we did not send")
        if ack.index <= state.acked:
            self._stats["acks_duplicate"] += 1
            return
        self._stats["acks"] += 1
        self._mark_acked(state, ack.index)
        self._persist("acked", chain=ack.chain_id, index=ack.index)
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
