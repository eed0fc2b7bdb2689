"""The ledger: token chains, commitments, payments, journal-before-ack, crashes, fuzzing."""

from __future__ import annotations

import hashlib
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)
from kit.fuzzing import accepted_only_if_unchanged, fuzz_settings, signed

import node.ledger.tokens as tokens
from node.base.identity import Identity
from node.base.wire import LocalProtocolError, RemoteProtocolError
from node.ledger.journal import JournalEntry, PaymentState, Persist, Persisted, ReportRefusal
from node.ledger.payee import (
    CommitmentReceived,
    CreditPayment,
    PayeeConfig,
    PayeeLedger,
    PaymentReceived,
    SendAck,
)
from node.ledger.payer import (
    AckReceived,
    ChainAdded,
    CreateChain,
    PayerConfig,
    PayerLedger,
    PaymentRequested,
    SendPayment,
    WinnerRecorded,
)
from node.ledger.tokens import (
    ACK_CONTEXT,
    COMMITMENT_CONTEXT,
    PAYMENT_CONTEXT,
    HashChain,
    LedgerRefused,
    TokenRefusal,
    decode_ack,
    decode_commitment,
    decode_payment,
    hash_token,
    sign_ack,
    sign_commitment,
    sign_payment,
)

NOW = 1_800_000_000
EXPIRES = NOW + 86_400
JOB = hashlib.sha256(b"job").digest()


def _identity(n: int) -> Identity:
    return Identity.from_seeds(bytes([n]) * 32, bytes([n + 100]) * 32)


OWNER, HOST, OTHER_HOST, VENDOR, STRANGER = (_identity(n) for n in range(1, 6))


def seed(n: int) -> bytes:
    return hashlib.sha256(b"chain seed %d" % n).digest()


def chain_and_commitment(
    n: int = 0,
    length: int = 10,
    *,
    payee: Identity = HOST,
    issuer: Identity = OWNER,
    unit_value: int = 5,
    expires: int = EXPIRES,
) -> tuple[HashChain, tokens.Commitment]:
    chain = HashChain(seed(n), length)
    commitment = sign_commitment(
        issuer,
        chain,
        payer=OWNER.node_id,
        payee=payee.node_id,
        unit_value=unit_value,
        expires=expires,
    )
    return chain, commitment


def payment_fields(chain: HashChain, index: int, units: int = 1, segment: int = 0, **over: Any):
    fields = {
        "chain": chain.chain_id,
        "payer": OWNER.node_id.key,
        "payee": HOST.node_id.key,
        "job": JOB,
        "segment": segment,
        "index": index,
        "units": units,
        "token": chain.token(index) if index <= chain.length else bytes(32),
        "commitment": None,
    }
    fields.update(over)
    return fields


def payee_ledger(**config: Any) -> PayeeLedger:
    config.setdefault("accept_self_issued", True)
    return PayeeLedger(HOST, PayeeConfig(**config))


def persist_all(core: Any, effects: list[Any], now: float = NOW) -> list[Any]:
    """Write every Persist at once and report it; return the other effects, in order."""
    out: list[Any] = []
    for effect in effects:
        if isinstance(effect, Persist):
            out += persist_all(core, core.handle(Persisted(effect.entry.entry_id), now), now)
        else:
            out.append(effect)
    return out


def of(kind: type, effects: list[Any]) -> list[Any]:
    return [e for e in effects if isinstance(e, kind)]


def reasons(effects: list[Any]) -> list[TokenRefusal]:
    return [e.reason for e in of(ReportRefusal, effects)]


def journal(effects: list[Any]) -> list[JournalEntry]:
    return [e.entry for e in of(Persist, effects)]


def funded_payer(*chains: tuple[HashChain, tokens.Commitment], **config: Any) -> PayerLedger:
    payer = PayerLedger(OWNER, PayerConfig(**config))
    for chain, commitment in chains or (chain_and_commitment(),):
        persist_all(payer, payer.handle(ChainAdded(chain, commitment), NOW))
    return payer


def pay(payer: PayerLedger, segment: int, units: int = 1, winner: Identity = HOST) -> bytes:
    """Pay a segment, journal it, and return the payment blob sent."""
    sent = of(
        SendPayment, persist_all(payer, payer.pay_winner(JOB, segment, winner.node_id, units, NOW))
    )
    assert len(sent) == 1
    return sent[0].blob


def receive(payee: PayeeLedger, blob: bytes, now: float = NOW) -> list[Any]:
    return persist_all(payee, payee.handle(PaymentReceived(blob), now), now)


# -- the chain --------------------------------------------------------------------------


def test_every_token_hashes_to_the_one_before_across_checkpoints():
    chain = HashChain(seed(1), 200)
    assert chain.token(200) == seed(1)
    assert chain.token(0) == chain.top
    for i in range(1, 201):
        assert hash_token(chain.chain_id, chain.token(i)) == chain.token(i - 1)
    assert hash_token(chain.chain_id, chain.token(130), 130) == chain.top
    with pytest.raises(LocalProtocolError):
        chain.token(201)


def test_chain_id_salts_the_hash():
    a, b = HashChain(seed(1), 4), HashChain(seed(2), 4)
    assert a.chain_id != b.chain_id
    assert hash_token(a.chain_id, b"x" * 32) != hash_token(b.chain_id, b"x" * 32)


@pytest.mark.parametrize(
    "bad", [(b"short", 4), (seed(1), 0), (seed(1), tokens.MAX_CHAIN_LENGTH + 1)]
)
def test_bad_chain_parameters_are_our_error(bad):
    with pytest.raises(LocalProtocolError):
        HashChain(*bad)


def test_statements_round_trip():
    chain, commitment = chain_and_commitment(issuer=VENDOR)
    assert decode_commitment(commitment.blob) == commitment
    assert commitment.issuer == VENDOR.node_id and commitment.payer == OWNER.node_id
    payment = sign_payment(
        OWNER, chain, payee=HOST.node_id, job_id=JOB, segment=3, index=4, units=2
    )
    assert decode_payment(payment.blob) == payment
    assert payment.token == chain.token(4)
    ack = sign_ack(HOST, payment)
    assert decode_ack(ack.blob) == ack
    with pytest.raises(LocalProtocolError):
        sign_ack(OTHER_HOST, payment)
    with pytest.raises(LocalProtocolError):  # units beyond index
        sign_payment(OWNER, chain, payee=HOST.node_id, job_id=JOB, segment=0, index=1, units=2)


# -- happy path -------------------------------------------------------------------------


def test_happy_path_pays_the_winner_once_and_acknowledges():
    payer, payee = funded_payer(), payee_ledger()
    blob = pay(payer, segment=0)
    effects = receive(payee, blob)
    [ack] = of(SendAck, effects)
    [accepted] = of(CreditPayment, effects)
    assert ack.target == OWNER.node_id
    assert (accepted.payer, accepted.segment, accepted.units, accepted.value) == (
        OWNER.node_id,
        0,
        1,
        5,
    )
    assert persist_all(payer, payer.handle(AckReceived(ack.blob), NOW)) == []
    assert [p.state for p in payer.payments()] == [PaymentState.ACKNOWLEDGED]
    assert [p.state for p in payee.payments()] == [PaymentState.ACCEPTED]
    assert [(v.job_id, v.segment, v.units) for v in payee.paid_for(JOB, 0)] == [(JOB, 0, 1)]

    [out] = payer.chains()
    assert (out.counterparty, out.length, out.released, out.accepted, out.remaining) == (
        HOST.node_id,
        10,
        1,
        1,
        9,
    )
    [into] = payee.chains()
    assert (into.counterparty, into.accepted, into.remaining) == (OWNER.node_id, 1, 9)
    [balance] = payee.balances()
    assert (balance.counterparty, balance.issued, balance.accepted, balance.value_accepted) == (
        OWNER.node_id,
        10,
        1,
        5,
    )
    assert payer.balances()[0].value_released == 5
    assert payer.statistics()["acks"] == 1 and payer.statistics()["unacknowledged"] == 0
    stats = payee.statistics()
    assert stats["payments_accepted"] == 1 and stats["commitments_accepted"] == 1
    assert all(v == 0 for k, v in stats.items() if k.startswith("refused_"))


def test_later_payments_omit_the_commitment_once_acknowledged():
    payer, payee = funded_payer(), payee_ledger()
    first = pay(payer, 0)
    assert decode_payment(first).commitment is not None
    [ack] = of(SendAck, receive(payee, first))
    persist_all(payer, payer.handle(AckReceived(ack.blob), NOW))
    second = pay(payer, 1)
    assert decode_payment(second).commitment is None
    assert of(CreditPayment, receive(payee, second))


def test_standalone_commitment_then_payment():
    chain, commitment = chain_and_commitment()
    payee = payee_ledger()
    assert [type(e) for e in payee.handle(CommitmentReceived(commitment.blob), NOW)] == [Persist]
    assert payee.handle(CommitmentReceived(commitment.blob), NOW) == []  # duplicate: no-op
    blob = signed(OWNER, PAYMENT_CONTEXT, payment_fields(chain, 1))
    assert of(CreditPayment, receive(payee, blob))


def test_vendor_issued_chain_is_accepted_when_the_vendor_is_trusted():
    _, commitment = chain_and_commitment(issuer=VENDOR)
    trusting = PayeeLedger(HOST, PayeeConfig(trusted_issuers=frozenset({VENDOR.node_id})))
    assert of(Persist, trusting.handle(CommitmentReceived(commitment.blob), NOW))
    # self-issued chains are not trusted unless the swarm is a volunteer credit swarm
    _, own = chain_and_commitment(1)
    assert reasons(trusting.handle(CommitmentReceived(own.blob), NOW)) == [
        TokenRefusal.UNTRUSTED_ISSUER
    ]


# -- forged commitments ---------------------------------------------------------------------


def _commitment_fields(chain: HashChain, **over: Any) -> dict[str, Any]:
    fields = {
        "chain": chain.chain_id,
        "payer": OWNER.node_id.key,
        "payee": HOST.node_id.key,
        "top": chain.top,
        "length": chain.length,
        "unit": 5,
        "issuer": OWNER.node_id.key,
        "expires": EXPIRES,
    }
    fields.update(over)
    return fields


def _tampered_commitment() -> bytes:
    chain, commitment = chain_and_commitment()
    _, signature = msgpack.unpackb(commitment.blob)
    payload = msgpack.packb(_commitment_fields(chain, unit=500))
    return msgpack.packb([payload, signature])


@pytest.mark.parametrize(
    ("blob", "reason"),
    [
        (_tampered_commitment(), TokenRefusal.BAD_SIGNATURE),
        (chain_and_commitment(issuer=STRANGER)[1].blob, TokenRefusal.UNTRUSTED_ISSUER),
        (chain_and_commitment(payee=OTHER_HOST)[1].blob, TokenRefusal.NOT_FOR_US),
        (chain_and_commitment(expires=NOW)[1].blob, TokenRefusal.EXPIRED),
        (b"\x93\x01\x02\x03", TokenRefusal.MALFORMED),
    ],
    ids=["bad_signature", "untrusted_issuer", "not_for_us", "expired", "malformed"],
)
def test_forged_commitments_are_refused(blob, reason):
    payee = payee_ledger()
    effects = payee.handle(CommitmentReceived(blob), NOW)
    assert reasons(effects) == [reason] and not of(Persist, effects)
    assert payee.statistics()[f"refused_{reason.value}"] == 1
    assert payee.chains() == []


@pytest.mark.parametrize("over", [{"unit": 2**32 + 1}, {"unit": 2**64 - 1}, {"expires": 2**63}])
def test_a_validly_signed_commitment_with_a_value_past_its_bound_is_malformed(over):
    # a self-issued unit of 2**64 - 1 made the payee's balance too large for the control
    # socket's reply, and the unencodable reply stopped the control server
    chain, _ = chain_and_commitment()
    blob = signed(OWNER, COMMITMENT_CONTEXT, _commitment_fields(chain, **over))
    payee = payee_ledger()
    assert reasons(payee.handle(CommitmentReceived(blob), NOW)) == [TokenRefusal.MALFORMED]
    assert payee.chains() == []


def test_a_second_commitment_for_a_known_chain_id_is_refused():
    chain, commitment = chain_and_commitment()
    payee = payee_ledger()
    payee.handle(CommitmentReceived(commitment.blob), NOW)
    rival = sign_commitment(
        OWNER, chain, payer=OWNER.node_id, payee=HOST.node_id, unit_value=500, expires=EXPIRES
    )
    assert reasons(payee.handle(CommitmentReceived(rival.blob), NOW)) == [
        TokenRefusal.CHAIN_CONFLICT
    ]
    assert payee.chains()[0].unit_value == 5


def test_payment_carrying_a_forged_commitment_is_refused():
    chain, _ = chain_and_commitment()
    forged = signed(STRANGER, COMMITMENT_CONTEXT, _commitment_fields(chain))  # issuer field: OWNER
    blob = signed(OWNER, PAYMENT_CONTEXT, payment_fields(chain, 1, commitment=forged))
    assert reasons(receive(payee_ledger(), blob)) == [TokenRefusal.BAD_SIGNATURE]


def test_payment_carrying_another_chains_commitment_is_malformed():
    chain, _ = chain_and_commitment()
    _, other = chain_and_commitment(7)
    blob = signed(OWNER, PAYMENT_CONTEXT, payment_fields(chain, 1, commitment=other.blob))
    assert reasons(receive(payee_ledger(), blob)) == [TokenRefusal.MALFORMED]


# -- forged, replayed and out-of-range tokens ---------------------------------------------


@pytest.fixture
def committed() -> tuple[HashChain, PayeeLedger]:
    chain, commitment = chain_and_commitment(length=5)
    payee = payee_ledger(max_step=3)
    persist_all(payee, payee.handle(CommitmentReceived(commitment.blob), NOW))
    return chain, payee


def test_a_random_token_is_refused(committed):
    chain, payee = committed
    blob = signed(OWNER, PAYMENT_CONTEXT, payment_fields(chain, 1, token=b"\x01" * 32))
    assert reasons(receive(payee, blob)) == [TokenRefusal.BAD_TOKEN]
    assert payee.chains()[0].accepted == 0


def test_a_token_of_another_chain_is_refused(committed):
    chain, payee = committed
    other = HashChain(seed(9), 5)
    blob = signed(OWNER, PAYMENT_CONTEXT, payment_fields(chain, 1, token=other.token(1)))
    assert reasons(receive(payee, blob)) == [TokenRefusal.BAD_TOKEN]


def test_a_deeper_token_claimed_as_one_unit_is_refused(committed):
    chain, payee = committed
    blob = signed(OWNER, PAYMENT_CONTEXT, payment_fields(chain, 1, token=chain.token(2)))
    assert reasons(receive(payee, blob)) == [TokenRefusal.BAD_TOKEN]


def test_payment_signed_by_someone_else_is_refused(committed):
    chain, payee = committed
    fields = payment_fields(chain, 1, payer=STRANGER.node_id.key)
    assert reasons(receive(payee, signed(STRANGER, PAYMENT_CONTEXT, fields))) == [
        TokenRefusal.WRONG_PAYER
    ]
    forged = signed(STRANGER, PAYMENT_CONTEXT, payment_fields(chain, 1))  # payer field: OWNER
    assert reasons(receive(payee, forged)) == [TokenRefusal.BAD_SIGNATURE]


def test_payment_for_another_payee_or_unknown_chain_is_refused(committed):
    chain, payee = committed
    other_payee = signed(
        OWNER, PAYMENT_CONTEXT, payment_fields(chain, 1, payee=STRANGER.node_id.key)
    )
    assert reasons(receive(payee, other_payee)) == [TokenRefusal.NOT_FOR_US]
    unknown = HashChain(seed(8), 5)
    assert reasons(receive(payee, signed(OWNER, PAYMENT_CONTEXT, payment_fields(unknown, 1)))) == [
        TokenRefusal.UNKNOWN_CHAIN
    ]


def test_replayed_token_is_refused_and_a_resend_is_only_reacknowledged(committed):
    chain, payee = committed
    first = signed(OWNER, PAYMENT_CONTEXT, payment_fields(chain, 1, segment=0))
    [ack] = of(SendAck, receive(payee, first))
    # the same payment again (the ack was lost): the same ack, nothing accepted twice
    again = receive(payee, first)
    assert of(SendAck, again) == [ack] and not of(Persist, again) and not of(CreditPayment, again)
    # the same token offered for another segment: a replay
    replay = signed(OWNER, PAYMENT_CONTEXT, payment_fields(chain, 1, segment=1))
    assert reasons(receive(payee, replay)) == [TokenRefusal.REPLAYED_TOKEN]
    # a token below the head
    receive(payee, signed(OWNER, PAYMENT_CONTEXT, payment_fields(chain, 2, segment=1)))
    below = signed(OWNER, PAYMENT_CONTEXT, payment_fields(chain, 1, segment=2))
    assert reasons(receive(payee, below)) == [TokenRefusal.REPLAYED_TOKEN]
    assert payee.chains()[0].accepted == 2
    assert payee.statistics()["payments_accepted"] == 2
    assert payee.statistics()["duplicates_reacked"] == 1


def test_token_beyond_the_chain_is_refused(committed):
    chain, payee = committed
    receive(payee, signed(OWNER, PAYMENT_CONTEXT, payment_fields(chain, 3, units=3)))
    receive(payee, signed(OWNER, PAYMENT_CONTEXT, payment_fields(chain, 5, units=2, segment=1)))
    beyond = signed(
        OWNER, PAYMENT_CONTEXT, payment_fields(chain, 6, segment=2, token=hashlib.sha256().digest())
    )
    assert reasons(receive(payee, beyond)) == [TokenRefusal.BEYOND_CHAIN]
    assert payee.chains()[0].remaining == 0


def test_multi_unit_step_and_the_step_limit(committed):
    chain, payee = committed
    three = signed(OWNER, PAYMENT_CONTEXT, payment_fields(chain, 3, units=3))
    [accepted] = of(CreditPayment, receive(payee, three))
    assert (accepted.units, accepted.value, accepted.index) == (3, 15, 3)
    four = signed(OWNER, PAYMENT_CONTEXT, payment_fields(chain, 5, units=2, segment=1))
    assert of(CreditPayment, receive(payee, four))
    assert payee.balances()[0].accepted == 5

    fresh_chain, commitment = chain_and_commitment(3, length=8)
    payee2 = payee_ledger(max_step=3)
    persist_all(payee2, payee2.handle(CommitmentReceived(commitment.blob), NOW))
    too_far = signed(OWNER, PAYMENT_CONTEXT, payment_fields(fresh_chain, 4, units=4))
    assert reasons(receive(payee2, too_far)) == [TokenRefusal.STEP_TOO_LARGE]


def test_payments_out_of_order_wait_for_the_resend(committed):
    chain, payee = committed
    first = signed(OWNER, PAYMENT_CONTEXT, payment_fields(chain, 1, segment=0))
    second = signed(OWNER, PAYMENT_CONTEXT, payment_fields(chain, 2, segment=1))
    assert reasons(receive(payee, second)) == [TokenRefusal.OUT_OF_ORDER]
    assert of(CreditPayment, receive(payee, first))
    assert of(CreditPayment, receive(payee, second))


def test_expired_chain_takes_no_more_tokens(committed):
    chain, payee = committed
    blob = signed(OWNER, PAYMENT_CONTEXT, payment_fields(chain, 1))
    assert reasons(receive(payee, blob, now=EXPIRES)) == [TokenRefusal.EXPIRED]


# -- the payer's rules -----------------------------------------------------------------------


def test_a_segment_is_paid_once():
    payer = funded_payer()
    journaling = payer.pay_winner(JOB, 0, HOST.node_id, 1, NOW)
    assert [type(e) for e in journaling] == [Persist]
    # while the first release is still being journaled
    assert reasons(payer.pay_winner(JOB, 0, HOST.node_id, 1, NOW)) == [
        TokenRefusal.DUPLICATE_PAYMENT
    ]
    persist_all(payer, journaling)
    assert reasons(payer.pay_winner(JOB, 0, HOST.node_id, 2, NOW)) == [
        TokenRefusal.DUPLICATE_PAYMENT
    ]
    assert payer.statistics()["refused_duplicate_payment"] == 2
    assert [p.index for p in payer.payments()] == [1]


def test_only_the_recorded_first_completer_is_paid():
    payer = funded_payer(chain_and_commitment(), chain_and_commitment(1, payee=OTHER_HOST))
    request = PaymentRequested(JOB, 0, HOST.node_id, 1)
    assert reasons(payer.handle(request, NOW)) == [TokenRefusal.NOT_WINNER]  # no winner yet
    assert payer.handle(WinnerRecorded(JOB, 0, OTHER_HOST.node_id), NOW) == []
    assert reasons(payer.handle(request, NOW)) == [TokenRefusal.NOT_WINNER]
    assert reasons(payer.pay_winner(JOB, 0, HOST.node_id, 1, NOW)) == [TokenRefusal.WINNER_CONFLICT]
    refused = of(ReportRefusal, payer.handle(request, NOW))[0]
    assert (refused.job_id, refused.segment, refused.peer) == (JOB, 0, HOST.node_id)
    assert of(Persist, payer.pay_winner(JOB, 0, OTHER_HOST.node_id, 1, NOW))
    assert payer.statistics()["refused_not_winner"] == 3


def test_no_chain_left_asks_for_one():
    payer = funded_payer(chain_and_commitment(length=2))
    pay(payer, 0, units=2)
    effects = payer.pay_winner(JOB, 1, HOST.node_id, 1, NOW)
    assert reasons(effects) == [TokenRefusal.NO_CHAIN]
    assert of(CreateChain, effects) == [CreateChain(HOST.node_id, 1)]
    chain, commitment = chain_and_commitment(1, length=4)
    persist_all(payer, payer.handle(ChainAdded(chain, commitment), NOW))
    assert decode_payment(pay(payer, 1)).chain_id == chain.chain_id


def test_a_chain_near_expiry_is_not_used():
    payer = funded_payer(chain_and_commitment(expires=NOW + 100), expiry_margin_s=300)
    assert reasons(payer.pay_winner(JOB, 0, HOST.node_id, 1, NOW)) == [TokenRefusal.NO_CHAIN]


def test_payer_refuses_its_own_mistakes():
    payer = funded_payer()
    chain, commitment = chain_and_commitment(1)
    with pytest.raises(LocalProtocolError):  # a commitment for another chain
        payer.handle(ChainAdded(HashChain(seed(2), 10), commitment), NOW)
    with pytest.raises(LocalProtocolError):  # the same chain twice
        payer.handle(ChainAdded(*chain_and_commitment()), NOW)
    with pytest.raises(LocalProtocolError):
        payer.handle(Persisted(999), NOW)
    with pytest.raises(LocalProtocolError):
        payer.pay_winner(JOB, 0, HOST.node_id, 0, NOW)
    other_payer = sign_commitment(
        OWNER, chain, payer=STRANGER.node_id, payee=HOST.node_id, unit_value=1, expires=EXPIRES
    )
    with pytest.raises(LocalProtocolError):
        payer.handle(ChainAdded(chain, other_payer), NOW)
    with pytest.raises(LocalProtocolError):
        payee_ledger().handle(Persisted(1), NOW)


def test_acks_that_do_not_match_a_payment_are_refused():
    payer, payee = funded_payer(), payee_ledger()
    blob = pay(payer, 0)
    [ack] = of(SendAck, receive(payee, blob))
    payment = decode_payment(blob)
    # the stranger acknowledges a payment addressed to the host
    fields = msgpack.unpackb(msgpack.unpackb(ack.blob)[0])
    fields["payee"] = STRANGER.node_id.key
    assert reasons(payer.handle(AckReceived(signed(STRANGER, ACK_CONTEXT, fields)), NOW)) == [
        TokenRefusal.BAD_ACK
    ]
    fields = msgpack.unpackb(msgpack.unpackb(ack.blob)[0]) | {"segment": 7}
    assert reasons(payer.handle(AckReceived(signed(HOST, ACK_CONTEXT, fields)), NOW)) == [
        TokenRefusal.BAD_ACK
    ]
    fields = msgpack.unpackb(msgpack.unpackb(ack.blob)[0]) | {"payer": STRANGER.node_id.key}
    assert reasons(payer.handle(AckReceived(signed(HOST, ACK_CONTEXT, fields)), NOW)) == [
        TokenRefusal.NOT_FOR_US
    ]
    fields = msgpack.unpackb(msgpack.unpackb(ack.blob)[0]) | {"chain": b"\x00" * 16}
    assert reasons(payer.handle(AckReceived(signed(HOST, ACK_CONTEXT, fields)), NOW)) == [
        TokenRefusal.UNKNOWN_CHAIN
    ]
    assert reasons(payer.handle(AckReceived(b"\xc1"), NOW)) == [TokenRefusal.MALFORMED]
    assert of(Persist, payer.handle(AckReceived(ack.blob), NOW))
    assert payer.handle(AckReceived(ack.blob), NOW) == []
    assert payer.statistics()["acks_duplicate"] == 1
    assert payment.index == 1


def test_unacknowledged_payments_are_resent_in_order_with_backoff():
    payer = funded_payer(retry_s=2, max_retry_s=5)
    first, second = pay(payer, 0), pay(payer, 1)
    assert payer.next_wakeup() == NOW + 2
    assert payer.tick(NOW + 1) == []
    assert [e.blob for e in payer.tick(NOW + 2)] == [first, second]
    assert payer.next_wakeup() == NOW + 2 + 4
    payer.tick(NOW + 6)
    assert payer.next_wakeup() == NOW + 6 + 5  # capped
    [ack] = of(SendAck, receive(payee := payee_ledger(), first))
    persist_all(payer, payer.handle(AckReceived(ack.blob), NOW + 7))
    assert [e.blob for e in payer.tick(NOW + 11)] == [second]
    [ack] = of(SendAck, receive(payee, second))
    persist_all(payer, payer.handle(AckReceived(ack.blob), NOW + 12))
    assert payer.next_wakeup() == float("inf")
    assert payer.tick(NOW + 100) == []
    assert payer.statistics()["payments_resent"] == 5


# -- persist before promise --------------------------------------------------------------------


def test_payee_sends_no_ack_before_the_journal_write():
    payer, payee = funded_payer(), payee_ledger()
    effects = payee.handle(PaymentReceived(pay(payer, 0)), NOW)
    commitment_entry, accept_entry = journal(effects)
    assert [type(e) for e in effects] == [Persist, Persist]
    assert payee.handle(Persisted(commitment_entry.entry_id), NOW) == []
    assert [p.state for p in payee.payments()] == [PaymentState.JOURNALING]
    assert payee.chains()[0].accepted == 0  # not durable yet
    done = payee.handle(Persisted(accept_entry.entry_id), NOW)
    assert [type(e) for e in done] == [SendAck, CreditPayment]
    assert payee.chains()[0].accepted == 1


def test_a_resend_while_journaling_is_ignored_not_accepted_twice():
    payer, payee = funded_payer(), payee_ledger()
    blob = pay(payer, 0)
    pending = payee.handle(PaymentReceived(blob), NOW)
    assert payee.handle(PaymentReceived(blob), NOW) == []
    assert payee.statistics()["duplicates_pending"] == 1
    assert len(of(SendAck, persist_all(payee, pending))) == 1


def test_payer_sends_nothing_before_the_release_is_journaled():
    payer = PayerLedger(OWNER)
    chain, commitment = chain_and_commitment()
    [chain_entry] = journal(payer.handle(ChainAdded(chain, commitment), NOW))
    effects = payer.pay_winner(JOB, 0, HOST.node_id, 1, NOW)
    [release_entry] = journal(effects)
    assert [type(e) for e in effects] == [Persist]
    assert payer.tick(NOW + 1000) == []
    assert payer.handle(Persisted(chain_entry.entry_id), NOW) == []
    [send] = payer.handle(Persisted(release_entry.entry_id), NOW)
    assert isinstance(send, SendPayment) and send.target == HOST.node_id


# -- crash and restore ---------------------------------------------------------------------------


def test_payee_crash_before_the_journal_write_accepts_the_resend_once():
    payer = funded_payer()
    blob = pay(payer, 0)
    payee = payee_ledger()
    effects = payee.handle(PaymentReceived(blob), NOW)
    durable = [journal(effects)[0].blob]  # the commitment made it, the acceptance did not
    restarted = payee_ledger()
    restarted.restore(durable)
    assert restarted.chains()[0].accepted == 0
    assert of(CreditPayment, receive(restarted, blob))
    assert of(SendAck, receive(restarted, blob))  # and again: only re-acknowledged
    assert restarted.statistics()["payments_accepted"] == 1


def test_payee_crash_after_the_journal_write_keeps_the_acceptance():
    payer = funded_payer()
    blob = pay(payer, 0)
    payee = payee_ledger()
    durable = [e.blob for e in journal(payee.handle(PaymentReceived(blob), NOW))]
    restarted = payee_ledger()
    restarted.restore(durable + durable[-1:])  # an entry written twice counts once
    assert [p.state for p in restarted.payments()] == [PaymentState.ACCEPTED]
    again = receive(restarted, blob)
    assert [type(e) for e in again] == [SendAck]
    assert restarted.statistics()["payments_accepted"] == 0  # counters restart at zero
    assert restarted.chains()[0].accepted == 1
    # the entry counter continues after the journal
    nxt = receive(restarted, pay(payer, 1))
    assert of(CreditPayment, nxt)


def test_payer_restore_resends_unacknowledged_payments_and_keeps_segments_paid():
    payer = PayerLedger(OWNER)
    durable: list[bytes] = []

    def run(effects):
        for e in effects:
            if isinstance(e, Persist):
                durable.append(e.entry.blob)
                run(payer.handle(Persisted(e.entry.entry_id), NOW))

    run(payer.handle(ChainAdded(*chain_and_commitment()), NOW))
    run(payer.pay_winner(JOB, 0, HOST.node_id, 1, NOW))
    run(payer.pay_winner(JOB, 1, HOST.node_id, 2, NOW))
    lost = payer.pay_winner(JOB, 2, HOST.node_id, 1, NOW)  # crash before this write
    assert of(Persist, lost)
    restarted = PayerLedger(OWNER)
    restarted.restore(durable)
    assert restarted.next_wakeup() == float("-inf")
    resent = restarted.tick(NOW + 1)
    assert [decode_payment(e.blob).index for e in resent] == [1, 3]
    assert reasons(restarted.pay_winner(JOB, 1, HOST.node_id, 2, NOW)) == [
        TokenRefusal.DUPLICATE_PAYMENT
    ]
    assert reasons(restarted.pay_winner(JOB, 1, OTHER_HOST.node_id, 2, NOW)) == [
        TokenRefusal.WINNER_CONFLICT
    ]
    # the lost release is made again, identically
    again = of(Persist, restarted.pay_winner(JOB, 2, HOST.node_id, 1, NOW))
    assert (
        msgpack.unpackb(again[0].entry.blob)["payment"]
        == msgpack.unpackb(lost[0].entry.blob)["payment"]
    )
    assert again[0].entry.entry_id == lost[0].entry.entry_id


def test_restore_refuses_a_used_ledger_and_a_corrupt_journal():
    payer = funded_payer()
    with pytest.raises(LocalProtocolError):
        payer.restore([])
    for blob in (b"\xc1", msgpack.packb({"side": "payee", "id": 1, "kind": "commitment"})):
        with pytest.raises(LocalProtocolError):
            PayerLedger(OWNER).restore([blob])
    with pytest.raises(LocalProtocolError):
        payee_ledger().restore([msgpack.packb({"side": "payee", "id": 1, "kind": "nonsense"})])
    # an acceptance whose token does not fit the journaled chain
    chain, commitment = chain_and_commitment()
    entries = [
        msgpack.packb(
            {"side": "payee", "id": 1, "kind": "commitment", "commitment": commitment.blob}
        ),
        msgpack.packb(
            {
                "side": "payee",
                "id": 2,
                "kind": "accept",
                "payment": signed(OWNER, PAYMENT_CONTEXT, payment_fields(chain, 2)),
            }
        ),
    ]
    with pytest.raises(LocalProtocolError, match="entry 2"):
        payee_ledger().restore(entries)
    with pytest.raises(LocalProtocolError, match="numbered 1"):
        payee_ledger().restore([entries[0], entries[1].replace(b"\x02", b"\x01", 1)])


# -- fuzzing -------------------------------------------------------------------------------------

DECODERS = [decode_commitment, decode_payment, decode_ack]


@fuzz_settings(300, deadline=None)
@given(st.binary(max_size=3000))
def test_decoders_raise_only_remote_protocol_error_on_bytes(blob):
    for decode in DECODERS:
        try:
            decode(blob)
        except RemoteProtocolError:
            pass


_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.binary(max_size=40),
    st.text(max_size=10),
    st.lists(st.integers(0, 2**32), max_size=3),
)
_FIELDS = st.dictionaries(
    st.sampled_from(
        [
            *("chain", "payer", "payee", "top", "length", "unit", "issuer", "expires", "job"),
            *("segment", "index", "units", "token", "commitment"),
        ]
    ),
    _VALUES,
)


@fuzz_settings(300, deadline=None, suppress_health_check=list(HealthCheck))
@given(fields=_FIELDS, signer=st.sampled_from([OWNER, HOST, STRANGER]), data=st.data())
def test_decoders_and_cores_survive_structured_garbage(fields, signer, data):
    chain, _ = chain_and_commitment()
    base = data.draw(
        st.sampled_from([_commitment_fields(chain), payment_fields(chain, 1), {}]), label="base"
    )
    context = data.draw(st.sampled_from([COMMITMENT_CONTEXT, PAYMENT_CONTEXT, ACK_CONTEXT]))
    blob = signed(signer, context, base | fields)
    for decode in DECODERS:
        try:
            decode(blob)
        except RemoteProtocolError:
            pass
    payee, payer = payee_ledger(), funded_payer()
    for event in (CommitmentReceived(blob), PaymentReceived(blob)):
        for effect in payee.handle(event, NOW):
            assert isinstance(effect, Persist | ReportRefusal)
    for effect in payer.handle(AckReceived(blob), NOW):
        assert isinstance(effect, ReportRefusal)


@fuzz_settings(200, deadline=None)
@given(st.data())
def test_mutated_statements_raise_only_remote_protocol_error(data):
    chain, commitment = chain_and_commitment()
    payment = sign_payment(
        OWNER, chain, payee=HOST.node_id, job_id=JOB, segment=1, index=2, units=2
    )
    ack = sign_ack(HOST, payment)
    for decode, blob in zip(DECODERS, (commitment.blob, payment.blob, ack.blob), strict=True):
        position = data.draw(st.integers(0, len(blob) - 1))
        flipped = bytearray(blob)
        flipped[position] ^= data.draw(st.integers(1, 255))
        cut = data.draw(st.integers(0, len(blob)))
        for mutated in (bytes(flipped), blob[:cut]):
            accepted_only_if_unchanged(decode, blob, mutated)


def test_refusals_are_ledger_refused_with_a_reason():
    with pytest.raises(LedgerRefused) as caught:
        decode_commitment(_tampered_commitment())
    assert caught.value.reason is TokenRefusal.BAD_SIGNATURE


# -- crash and restart, at random ----------------------------------------------------------------

HOSTS = (HOST, OTHER_HOST)
SEGMENTS = 6


class LedgerMachine(RuleBasedStateMachine):
    """One payer, two payees, a lossy network and journals that crash at any point."""

    @initialize()
    def start(self) -> None:
        self.now = float(NOW)
        self.chains: dict[bytes, HashChain] = {}
        self.seeds = 0
        self.journals: dict[str, list[bytes]] = {"payer": [], "host0": [], "host1": []}
        self.unwritten: dict[str, list[JournalEntry]] = {name: [] for name in self.journals}
        self.network: list[tuple[str, Any, bytes]] = []
        self.payer = self._new_payer()
        self.payees = [self._new_payee(i) for i in range(2)]
        for i in range(2):
            self._add_chain(HOSTS[i])

    # -- plumbing ------------------------------------------------------------------------

    def _new_payer(self) -> PayerLedger:
        return PayerLedger(OWNER, PayerConfig(retry_s=1, max_retry_s=4, expiry_margin_s=0))

    def _new_payee(self, i: int) -> PayeeLedger:
        return PayeeLedger(HOSTS[i], PayeeConfig(accept_self_issued=True, max_step=3))

    def _add_chain(self, host: Identity) -> None:
        self.seeds += 1
        chain, commitment = chain_and_commitment(100 + self.seeds, length=5, payee=host)
        self.chains[chain.chain_id] = chain
        self._route("payer", self.payer.handle(ChainAdded(chain, commitment), self.now))

    def _route(self, source: str, effects: list[Any]) -> None:
        for effect in effects:
            if isinstance(effect, Persist):
                self.unwritten[source].append(effect.entry)
            elif isinstance(effect, SendPayment):
                payment = decode_payment(effect.blob)
                assert (payment.chain_id, payment.index) in self._released(), "sent unjournaled"
                self.network.append(("payment", effect.target, effect.blob))
            elif isinstance(effect, SendAck):
                ack = decode_ack(effect.blob)
                assert (ack.chain_id, ack.index) in self._durable_accepts(source), "early ack"
                self.network.append(("ack", effect.target, effect.blob))
            elif isinstance(effect, CreateChain):
                self._add_chain(HOSTS[[h.node_id for h in HOSTS].index(effect.payee)])

    def _entries(self, name: str, kind: str, field: str) -> list[Any]:
        records = [msgpack.unpackb(blob) for blob in self.journals[name]]
        return [decode_payment(r[field]) for r in records if r["kind"] == kind]

    def _released(self) -> set[tuple[bytes, int]]:
        return {(p.chain_id, p.index) for p in self._entries("payer", "release", "payment")}

    def _durable_accepts(self, name: str) -> list[tuple[bytes, int]]:
        return [(p.chain_id, p.index) for p in self._entries(name, "accept", "payment")]

    def _write(self, name: str, report: bool) -> None:
        entry = self.unwritten[name].pop(0)
        self.journals[name].append(entry.blob)
        if report:
            core = self.payer if name == "payer" else self.payees[int(name[-1])]
            self._route(name, core.handle(Persisted(entry.entry_id), self.now))

    # -- rules ---------------------------------------------------------------------------

    @rule(segment=st.integers(0, SEGMENTS - 1), host=st.integers(0, 1), units=st.integers(1, 3))
    def pay(self, segment: int, host: int, units: int) -> None:
        self._route(
            "payer", self.payer.pay_winner(JOB, segment, HOSTS[host].node_id, units, self.now)
        )

    @rule(name=st.sampled_from(["payer", "host0", "host1"]))
    def write(self, name: str) -> None:
        if self.unwritten[name]:
            self._write(name, report=True)

    @precondition(lambda self: self.network)
    @rule(pick=st.integers(0, 1000), duplicate=st.booleans())
    def deliver(self, pick: int, duplicate: bool) -> None:
        i = pick % len(self.network)
        kind, target, blob = self.network[i] if duplicate else self.network.pop(i)
        if kind == "ack":
            self._route("payer", self.payer.handle(AckReceived(blob), self.now))
        else:
            host = [h.node_id for h in HOSTS].index(target)
            effects = self.payees[host].handle(PaymentReceived(blob), self.now)
            self._route(f"host{host}", effects)

    @precondition(lambda self: self.network)
    @rule(pick=st.integers(0, 1000))
    def drop(self, pick: int) -> None:
        self.network.pop(pick % len(self.network))

    @rule(seconds=st.floats(0, 5))
    def tick(self, seconds: float) -> None:
        self.now += seconds
        self._route("payer", self.payer.tick(self.now))

    @rule(name=st.sampled_from(["payer", "host0", "host1"]), written=st.integers(0, 3))
    def crash(self, name: str, written: int) -> None:
        """Crash with ``written`` of the pending entries durable but never reported."""
        for _ in range(min(written, len(self.unwritten[name]))):
            self._write(name, report=False)
        self.unwritten[name] = []
        if name == "payer":
            self.payer = self._new_payer()
            self.payer.restore(self.journals[name])
        else:
            i = int(name[-1])
            self.payees[i] = self._new_payee(i)
            self.payees[i].restore(self.journals[name])
            held = sorted((p.chain_id, p.index) for p in self.payees[i].payments())
            assert held == sorted(self._durable_accepts(name)), "restore lost or doubled"
            assert all(p.state is PaymentState.ACCEPTED for p in self.payees[i].payments())

    @rule(host=st.integers(0, 1), random_token=st.binary(min_size=32, max_size=32))
    def forge(self, host: int, random_token: bytes) -> None:
        """A payment on a real chain, with a token that is not the chain's."""
        chains = [c for c in self.payees[host].chains()]
        if not chains:
            return
        view = chains[0]
        chain = self.chains[view.chain_id]
        index = view.accepted + 1
        if index <= chain.length and random_token == chain.token(index):
            return
        fields = payment_fields(chain, min(index, chain.length), token=random_token)
        fields["payee"] = HOSTS[host].node_id.key
        effects = self.payees[host].handle(
            PaymentReceived(signed(OWNER, PAYMENT_CONTEXT, fields)), self.now
        )
        assert not of(Persist, effects)

    # -- invariants -----------------------------------------------------------------------

    @invariant()
    def accepted_tokens_are_released_tokens_once(self) -> None:
        released = self._released()
        for i, payee in enumerate(self.payees):
            payments = payee.payments()
            keys = [(p.chain_id, p.index) for p in payments]
            assert len(keys) == len(set(keys)), "an index accepted twice"
            durable = self._durable_accepts(f"host{i}")
            assert len(durable) == len(set(durable)), "an acceptance journaled twice"
            assert set(durable) <= set(keys), "a journaled acceptance was lost"
            for p in payments:
                chain = self.chains[p.chain_id]
                assert decode_payment(
                    signed(OWNER, PAYMENT_CONTEXT, payment_fields(chain, p.index))
                ).token == chain.token(p.index)
                assert (p.chain_id, p.index) in released, "accepted a token never released"
            for view in payee.chains():
                units = sum(p.units for p in payments if p.chain_id == view.chain_id)
                assert units <= view.length
        accepted_units = sum(p.units for payee in self.payees for p in payee.payments())
        released_units = sum(p.units for p in self._entries("payer", "release", "payment"))
        assert accepted_units <= released_units

    @invariant()
    def tokens_accepted_are_on_their_chain(self) -> None:
        for payee in self.payees:
            for (chain_id, index), accepted in payee._accepted.items():
                chain = self.chains[chain_id]
                assert accepted.payment.token == chain.token(index)
                assert hash_token(chain_id, accepted.payment.token, accepted.payment.units) == (
                    chain.token(index - accepted.payment.units)
                )

    @invariant()
    def no_segment_pays_two_nodes(self) -> None:
        paid: dict[int, set[Any]] = {}
        for p in self._entries("payer", "release", "payment"):
            paid.setdefault(p.segment, set()).add(p.payee)
        for i, payee in enumerate(self.payees):
            for p in payee.payments():
                paid.setdefault(p.segment, set()).add(HOSTS[i].node_id)
            for segment in range(SEGMENTS):
                assert len(payee.paid_for(JOB, segment)) <= 1
        assert all(len(nodes) <= 1 for nodes in paid.values())

    def teardown(self) -> None:
        """Heal everything: every journaled release ends accepted and acknowledged."""
        if not hasattr(self, "payer"):
            return
        for _ in range(12):
            for name in self.unwritten:
                while self.unwritten[name]:
                    self._write(name, report=True)
            while self.network:
                self.deliver(0, duplicate=False)
            if not any(self.unwritten.values()):
                self.tick(5)
        released = self._released()
        accepted = {(p.chain_id, p.index) for payee in self.payees for p in payee.payments()}
        assert released == accepted
        assert self.payer.statistics()["unacknowledged"] == 0


TestLedgerMachine = LedgerMachine.TestCase
TestLedgerMachine.settings = fuzz_settings(
    150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
