"""The agent's ledger edge: both ledger cores, their journals, and LEDGER frames.

Every node is a payee (it is paid for segments it won) and, when it owns jobs,
a payer. ``LedgerService`` restores both cores from the state database's
journal at start, and carries out their effects in order:

- ``Persist``: the entry is committed to ``ledger_journal`` (SQLite, FULL
  sync) in a worker thread, then ``Persisted`` is handed back; only then does
  the core release what waited for it (a payment to send, an ack). Persist
  before promise, on both sides.
- ``SendPayment`` / ``SendAck``: a LEDGER frame to the other node.
- ``CreateChain``: draw a seed, open a chain of ``market.chain_length`` tokens
  to that payee, sign its commitment as issuer (a volunteer credit swarm: the
  payer vouches for itself; a paid swarm would fetch the commitment from a
  token vendor instead), and add it.
- ``ReportRefusal``: logged and counted by the cores; the sender is not trusted more.

A LEDGER frame of a kind neither core takes is dropped and counted here
(``frames_unexpected`` in the view's ``statistics``), as the market adapters do.

A payer timer resends unacknowledged payments (``PayerLedger.tick``).
"""

from __future__ import annotations

import enum
import logging
import math
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, assert_never

import trio

from node.base.identity import Identity, NodeId
from node.ledger.effects import EffectQueue, open_chain
from node.ledger.journal import Balance, ChainView, Persist, Persisted, ReportRefusal
from node.ledger.payee import (
    CommitmentReceived,
    CreditPayment,
    PayeeConfig,
    PayeeEffect,
    PayeeLedger,
    PaymentReceived,
    SendAck,
)
from node.ledger.payer import (
    AckReceived,
    CreateChain,
    PayerEffect,
    PayerLedger,
    PaymentRequested,
    SendPayment,
)
from node.ledger.tokens import TokenRefusal
from node.runtime.state import State

log = logging.getLogger("gleaner.ledger")


class LedgerKind(enum.IntEnum):
    COMMITMENT = 1
    PAYMENT = 2
    ACK = 3


SendLedger = Callable[[NodeId, LedgerKind, bytes], Awaitable[None]]
LedgerEffect = PayerEffect | PayeeEffect


class LedgerService:
    def __init__(
        self,
        identity: Identity,
        state: State,
        send: SendLedger,
        *,
        chain_length: int,
        payee_config: PayeeConfig,
    ) -> None:
        self.identity = identity
        self.state = state
        self.send = send
        self.chain_length = chain_length
        self.payer = PayerLedger(identity)
        self.payee = PayeeLedger(identity, payee_config)
        self.stats: Counter[str] = Counter()  # frames no core takes (an unknown kind)
        self._wake = trio.Event()
        self._lock = trio.Lock()  # effects of one event are carried out in order

    async def restore(self) -> None:
        self.payer.restore(await trio.to_thread.run_sync(self.state.journal, "payer"))
        self.payee.restore(await trio.to_thread.run_sync(self.state.journal, "payee"))

    async def run(self) -> None:
        """Resend unacknowledged payments when the payer's timer says."""
        while True:
            await self._execute(self.payer, self.payer.tick(time.time()))
            self._wake = trio.Event()  # after our own effects, which set the old one
            delay = self.payer.next_wakeup() - time.time()
            if delay > 0:
                with trio.move_on_after(min(delay, 5.0) if math.isfinite(delay) else 5.0):
                    await self._wake.wait()

    async def pay(self, job_id: bytes, segment: int, winner: NodeId, units: int) -> None:
        """Pay the segment's first completer (the ledger refuses a second payee)."""
        effects = self.payer.pay_winner(job_id, segment, winner, units, time.time())
        await self._execute(self.payer, effects)
        if any(isinstance(e, CreateChain) for e in effects):  # a chain was opened: pay from it
            request = PaymentRequested(job_id, segment, winner, units)
            await self._execute(self.payer, self.payer.handle(request, time.time()))

    async def deliver(self, sender: NodeId, kind: int, blob: bytes) -> None:
        now = time.time()
        if kind == LedgerKind.PAYMENT:
            await self._execute(self.payee, self.payee.handle(PaymentReceived(blob), now))
        elif kind == LedgerKind.COMMITMENT:
            await self._execute(self.payee, self.payee.handle(CommitmentReceived(blob), now))
        elif kind == LedgerKind.ACK:
            await self._execute(self.payer, self.payer.handle(AckReceived(blob), now))
        else:
            self.stats["frames_unexpected"] += 1
            log.info("ledger frame of unknown kind %r from %s dropped", kind, sender.short)

    async def _execute(
        self, core: PayerLedger | PayeeLedger, effects: list[PayerEffect] | list[PayeeEffect]
    ) -> None:
        async with self._lock:
            queue: EffectQueue[LedgerEffect] = EffectQueue(effects)
            for effect in queue:
                queue.feed(await self._carry_out(core, effect))
        self._wake.set()

    async def _carry_out(
        self, core: PayerLedger | PayeeLedger, effect: LedgerEffect
    ) -> list[LedgerEffect]:
        """One effect; returns the effects of what it fed back into the core."""
        now = time.time()
        match effect:
            case Persist():
                side = "payer" if core is self.payer else "payee"
                entry = effect.entry
                await trio.to_thread.run_sync(
                    self.state.append_journal, side, entry.entry_id, entry.blob
                )
                return list(core.handle(Persisted(entry.entry_id), now))
            case SendPayment():
                await self.send(effect.target, LedgerKind.PAYMENT, effect.blob)
            case SendAck():
                await self.send(effect.target, LedgerKind.ACK, effect.blob)
            case CreateChain():
                added = open_chain(self.identity, effect, os.urandom(32), self.chain_length, now)
                return list(self.payer.handle(added, now))
            case CreditPayment():
                log.info(
                    "paid %d unit(s) by %s for segment %d of job %s",
                    effect.units,
                    effect.payer.short,
                    effect.segment,
                    effect.job_id.hex()[:12],
                )
            case ReportRefusal():
                peer = effect.peer.short if effect.peer else "-"
                # NO_CHAIN is the payer asking itself for a chain (CreateChain follows), not
                # a fault.
                level = logging.DEBUG if effect.reason is TokenRefusal.NO_CHAIN else logging.INFO
                log.log(
                    level, "ledger refused (%s) %s: %s", effect.reason.value, peer, effect.detail
                )
            case _:
                assert_never(effect)
        return []

    # -- views -------------------------------------------------------------------------

    def view(self) -> dict[str, Any]:
        return {
            "node_id": str(self.identity.node_id),
            "statistics": dict(self.stats),
            "payer": _side_view(self.payer),
            "payee": _side_view(self.payee),
        }


def _side_view(core: PayerLedger | PayeeLedger) -> dict[str, Any]:
    return {
        "statistics": core.statistics(),
        "balances": [_balance(b) for b in core.balances()],
        "chains": [_chain(c) for c in core.chains()],
        "payments": [
            {
                "job_id": p.job_id.hex(),
                "segment": p.segment,
                "counterparty": str(p.counterparty),
                "chain_id": p.chain_id.hex(),
                "index": p.index,
                "units": p.units,
                "value": p.value,
                "state": p.state.value,
            }
            for p in core.payments()
        ],
    }


def _balance(b: Balance) -> dict[str, Any]:
    return {
        "counterparty": str(b.counterparty),
        "chains": b.chains,
        "issued": b.issued,
        "released": b.released,
        "accepted": b.accepted,
        "value_released": b.value_released,
        "value_accepted": b.value_accepted,
    }


def _chain(c: ChainView) -> dict[str, Any]:
    return {
        "chain_id": c.chain_id.hex(),
        "counterparty": str(c.counterparty),
        "issuer": str(c.issuer),
        "length": c.length,
        "unit_value": c.unit_value,
        "expires": c.expires,
        "released": c.released,
        "accepted": c.accepted,
        "remaining": c.remaining,
    }
