"""Token chains and the signed statements of the ledger: commitment, payment, ack.

Theory of operation
-------------------
Payment follows the laundromat tokens of the MCG paper, which are PayWord
chains. For each (payer, payee) pair the payer (or a token vendor for it) picks
a secret seed ``w_n`` and hashes it down::

    w_i = H(w_{i+1})  for i = n-1 .. 0,   H(x) = BLAKE2b-256(x, salt=chain_id,
                                                             person="gleaner/token/v1")

``w_0``, the **top**, goes into a **commitment** signed by an **issuer**: the
payer itself in a volunteer credit swarm, a token vendor in a paid swarm. Paying
``k`` units releases the next pre-image ``w_{i+k}``; the payee hashes it ``k``
times and must land on the last value it accepted (``w_i``). H is one-way, so
only the holder of the seed can produce the next token (no counterfeit), and a
token once accepted lies below the head and never matches again (no double
spend). The chain id (16 bytes, derived from the seed) salts H, so a token of
one chain is worthless on every other chain, even one with the same top.

``HashChain`` keeps every 64th value from the seed down, so any token costs at
most 63 hashes and a chain of n tokens costs n/2 bytes of memory.

Wire forms (the signed-statement envelope of ``node.base.signed``: msgpack
``[payload, signature]``; payload is a msgpack map carried as bytes and signed as
``CONTEXT + payload`` with Ed25519)::

    commitment: by issuer, "gleaner/commit/v1\\0", {chain: bin16, payer: bin32,
                payee: bin32, top: bin32, length: 1..MAX_CHAIN_LENGTH,
                unit: uint (value of one token), issuer: bin32, expires: uint}
    payment:    by payer, "gleaner/payment/v1\\0", {chain: bin16, payer: bin32,
                payee: bin32, job: bin32, segment: uint, index: 1..length,
                units: 1..min(index, MAX_UNITS), token: bin32 (w_index),
                commitment: bin | nil (the chain's commitment blob, until acked)}
    ack:        by payee, "gleaner/payack/v1\\0", {chain: bin16, payer: bin32,
                payee: bin32, job: bin32, segment: uint, index: uint, units: uint}

A payment says "``token`` is ``w_index`` and pays ``units`` units, moving the
chain from ``index - units`` to ``index``, for segment ``segment`` of job
``job``". The payer's signature binds the token to that segment, so the payee
can show what it was paid for; the payee's signed ack is the payer's receipt.

Errors: decoding is where outside bytes come in; only ``RemoteProtocolError``
escapes it (``LedgerRefused`` with a ``TokenRefusal`` for a bad signature). Signing
decodes what it just signed, so inputs peers would refuse raise
``LocalProtocolError``. Judging a well-formed statement (trust, expiry, chain
state) is the ledgers' job (node/ledger/payer.py, node/ledger/payee.py), not this module's.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass, field

from node.base.identity import Identity, NodeId
from node.base.signed import (
    bin_field,
    decode_own,
    key_field,
    open_statement,
    sign_payload,
    signed_by,
    uint_field,
)
from node.base.wire import LocalProtocolError, RemoteProtocolError

COMMITMENT_CONTEXT = b"gleaner/commit/v1\x00"
PAYMENT_CONTEXT = b"gleaner/payment/v1\x00"
ACK_CONTEXT = b"gleaner/payack/v1\x00"
TOKEN_PERSON = b"gleaner/token/v1"
CHAIN_ID_PERSON = b"gleaner/chain/v1"
SEED_BYTES = 32
TOKEN_BYTES = 32
CHAIN_ID_BYTES = 16
JOB_ID_BYTES = 32
MAX_CHAIN_LENGTH = 1 << 20
MAX_UNITS = 4096  # per payment: bounds the hashing a payee does for one message
# What one unit is worth. A payee adds up units * unit value over its chains, and
# the control socket reports the sums as msgpack integers: with at most 2**20 units
# a chain, a 2**32 unit keeps every chain's worth below 2**52.
MAX_UNIT_VALUE = 2**32
MAX_UNIX_S = 2**63 - 1
CHECKPOINT_EVERY = 64
MAX_COMMITMENT_BYTES = 1024
MAX_PAYMENT_BYTES = 2048
MAX_ACK_BYTES = 1024


class TokenRefusal(enum.Enum):
    """Why the ledger refused something, counted as ``refused_<value>``."""

    # a peer's message (payee side, and acks on the payer side)
    MALFORMED = "malformed"
    BAD_SIGNATURE = "bad_signature"
    UNTRUSTED_ISSUER = "untrusted_issuer"
    EXPIRED = "expired"
    NOT_FOR_US = "not_for_us"  # addressed to another payee (or, for an ack, payer)
    CHAIN_CONFLICT = "chain_conflict"  # known chain id, different commitment
    UNKNOWN_CHAIN = "unknown_chain"
    WRONG_PAYER = "wrong_payer"  # payment signed by someone other than the chain's payer
    BAD_TOKEN = "bad_token"  # does not hash to the chain's head
    REPLAYED_TOKEN = "replayed_token"  # at or below the head, and not a resend of ours
    BEYOND_CHAIN = "beyond_chain"
    STEP_TOO_LARGE = "step_too_large"  # more units at once than this payee hashes
    OUT_OF_ORDER = "out_of_order"  # does not start at the head (an earlier one is missing)
    BAD_ACK = "bad_ack"  # an ack for a payment we did not send
    # a local request (payer side)
    DUPLICATE_PAYMENT = "duplicate_payment"  # this segment is paid (or being paid) already
    NOT_WINNER = "not_winner"  # payee is not the recorded first completer
    WINNER_CONFLICT = "winner_conflict"  # a second, different first completer
    NO_CHAIN = "no_chain"  # no unexpired chain to the payee has enough units left


class LedgerRefused(RemoteProtocolError):
    """A peer's well-formed ledger message is refused, for ``reason``."""

    def __init__(self, reason: TokenRefusal, message: str) -> None:
        super().__init__(message)
        self.reason = reason


# -- the hash chain ------------------------------------------------------------------


def derive_chain_id(seed: bytes) -> bytes:
    """The chain id of the chain grown from ``seed``: public, and reveals nothing of it."""
    return hashlib.blake2b(seed, digest_size=CHAIN_ID_BYTES, person=CHAIN_ID_PERSON).digest()


def hash_token(chain_id: bytes, value: bytes, steps: int = 1) -> bytes:
    """H applied ``steps`` times to ``value``, in chain ``chain_id``."""
    for _ in range(steps):
        value = hashlib.blake2b(
            value, digest_size=TOKEN_BYTES, salt=chain_id, person=TOKEN_PERSON
        ).digest()
    return value


class HashChain:
    """The payer's secret chain: the seed ``w_n`` and every token ``w_i`` below it."""

    def __init__(self, seed: bytes, length: int) -> None:
        if len(seed) != SEED_BYTES:
            raise LocalProtocolError(f"a chain seed is {SEED_BYTES} bytes, got {len(seed)}")
        if not 1 <= length <= MAX_CHAIN_LENGTH:
            raise LocalProtocolError(f"chain length {length} is not 1..{MAX_CHAIN_LENGTH}")
        self.seed = seed
        self.length = length
        self.chain_id = derive_chain_id(seed)
        # _checkpoints[j] = H^(64 j)(seed) = w_(n - 64 j)
        self._checkpoints = [seed]
        value = seed
        for step in range(1, length + 1):
            value = hash_token(self.chain_id, value)
            if step % CHECKPOINT_EVERY == 0:
                self._checkpoints.append(value)
        self.top = value

    def token(self, index: int) -> bytes:
        """``w_index``: ``token(0)`` is the top, ``token(length)`` the seed."""
        if not 0 <= index <= self.length:
            raise LocalProtocolError(f"token {index} is outside chain of {self.length}")
        steps = self.length - index
        base = self._checkpoints[steps // CHECKPOINT_EVERY]
        return hash_token(self.chain_id, base, steps % CHECKPOINT_EVERY)


# -- statements ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Commitment:
    """The issuer's "tokens of chain ``chain_id`` from ``payer`` are worth ``unit_value``
    each to ``payee``, ``length`` of them below ``top``, until ``expires``"."""

    chain_id: bytes
    payer: NodeId
    payee: NodeId
    top: bytes
    length: int
    unit_value: int
    issuer: NodeId
    expires: int
    signature: bytes = field(default=b"", compare=False)
    blob: bytes = field(default=b"", compare=False, repr=False)

    def is_expired(self, now: float) -> bool:
        return now >= self.expires


@dataclass(frozen=True, slots=True)
class Payment:
    """The payer's "``token`` is ``w_index`` of ``chain_id`` and pays ``units`` units
    for segment ``segment`` of job ``job``"."""

    chain_id: bytes
    payer: NodeId
    payee: NodeId
    job_id: bytes
    segment: int
    index: int
    units: int
    token: bytes
    commitment: bytes | None = field(default=None, compare=False, repr=False)
    signature: bytes = field(default=b"", compare=False)
    blob: bytes = field(default=b"", compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class Ack:
    """The payee's receipt: chain ``chain_id`` accepted up to ``index`` with this payment."""

    chain_id: bytes
    payer: NodeId
    payee: NodeId
    job_id: bytes
    segment: int
    index: int
    units: int
    signature: bytes = field(default=b"", compare=False)
    blob: bytes = field(default=b"", compare=False, repr=False)


def sign_commitment(
    issuer: Identity,
    chain: HashChain,
    *,
    payer: NodeId,
    payee: NodeId,
    unit_value: int,
    expires: int,
) -> Commitment:
    """As issuer, vouch for ``chain`` from ``payer`` to ``payee``."""
    payload = {
        "chain": chain.chain_id,
        "payer": payer.key,
        "payee": payee.key,
        "top": chain.top,
        "length": chain.length,
        "unit": unit_value,
        "issuer": issuer.node_id.key,
        "expires": expires,
    }
    return decode_own(decode_commitment, sign_payload(issuer, COMMITMENT_CONTEXT, payload))


def sign_payment(
    payer: Identity,
    chain: HashChain,
    *,
    payee: NodeId,
    job_id: bytes,
    segment: int,
    index: int,
    units: int,
    commitment: bytes | None = None,
) -> Payment:
    """As payer, release ``w_index`` of ``chain`` as ``units`` units for a segment."""
    payload = {
        "chain": chain.chain_id,
        "payer": payer.node_id.key,
        "payee": payee.key,
        "job": job_id,
        "segment": segment,
        "index": index,
        "units": units,
        "token": chain.token(index),
        "commitment": commitment,
    }
    return decode_own(decode_payment, sign_payload(payer, PAYMENT_CONTEXT, payload))


def sign_ack(payee: Identity, payment: Payment) -> Ack:
    """As payee, acknowledge an accepted (and journaled) payment."""
    if payment.payee != payee.node_id:
        raise LocalProtocolError("acknowledging a payment addressed to another node")
    payload = {
        "chain": payment.chain_id,
        "payer": payment.payer.key,
        "payee": payee.node_id.key,
        "job": payment.job_id,
        "segment": payment.segment,
        "index": payment.index,
        "units": payment.units,
    }
    return decode_own(decode_ack, sign_payload(payee, ACK_CONTEXT, payload))


# -- decoding (outside bytes; only RemoteProtocolError escapes) -----------------------


def decode_commitment(blob: bytes) -> Commitment:
    """Parse a commitment and check the issuer's signature (not whether we trust it)."""
    what = "commitment"
    payload, signature, fields = open_statement(blob, what, MAX_COMMITMENT_BYTES)
    issuer = key_field(fields, "issuer", what)
    _verify(issuer, COMMITMENT_CONTEXT, payload, signature, what)
    return Commitment(
        chain_id=bin_field(fields, "chain", what, CHAIN_ID_BYTES),
        payer=key_field(fields, "payer", what),
        payee=key_field(fields, "payee", what),
        top=bin_field(fields, "top", what, TOKEN_BYTES),
        length=uint_field(fields, "length", what, 1, MAX_CHAIN_LENGTH),
        unit_value=uint_field(fields, "unit", what, 1, MAX_UNIT_VALUE),
        issuer=issuer,
        expires=uint_field(fields, "expires", what, 0, MAX_UNIX_S),
        signature=signature,
        blob=blob,
    )


def decode_payment(blob: bytes) -> Payment:
    """Parse a payment and check the payer's signature (not the token: that needs the chain)."""
    what = "payment"
    payload, signature, fields = open_statement(blob, what, MAX_PAYMENT_BYTES)
    payer = key_field(fields, "payer", what)
    _verify(payer, PAYMENT_CONTEXT, payload, signature, what)
    index = uint_field(fields, "index", what, 1, MAX_CHAIN_LENGTH)
    commitment = fields.get("commitment")
    if commitment is not None and not isinstance(commitment, bytes):
        raise RemoteProtocolError("payment 'commitment' is not bytes or nil")
    return Payment(
        chain_id=bin_field(fields, "chain", what, CHAIN_ID_BYTES),
        payer=payer,
        payee=key_field(fields, "payee", what),
        job_id=bin_field(fields, "job", what, JOB_ID_BYTES),
        segment=uint_field(fields, "segment", what),
        index=index,
        units=uint_field(fields, "units", what, 1, min(index, MAX_UNITS)),
        token=bin_field(fields, "token", what, TOKEN_BYTES),
        commitment=commitment,
        signature=signature,
        blob=blob,
    )


def decode_ack(blob: bytes) -> Ack:
    """Parse a payee's ack and check its signature."""
    what = "ack"
    payload, signature, fields = open_statement(blob, what, MAX_ACK_BYTES)
    payee = key_field(fields, "payee", what)
    _verify(payee, ACK_CONTEXT, payload, signature, what)
    index = uint_field(fields, "index", what, 1, MAX_CHAIN_LENGTH)
    return Ack(
        chain_id=bin_field(fields, "chain", what, CHAIN_ID_BYTES),
        payer=key_field(fields, "payer", what),
        payee=payee,
        job_id=bin_field(fields, "job", what, JOB_ID_BYTES),
        segment=uint_field(fields, "segment", what),
        index=index,
        units=uint_field(fields, "units", what, 1, min(index, MAX_UNITS)),
        signature=signature,
        blob=blob,
    )


def _verify(signer: NodeId, context: bytes, payload: bytes, signature: bytes, what: str) -> None:
    if not signed_by(signer.key, context, payload, signature):
        raise LedgerRefused(TokenRefusal.BAD_SIGNATURE, f"{what} has a bad signature")
