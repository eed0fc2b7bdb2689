"""Route grants and claims: the signed statements that say where a VM address runs.

Theory of operation
-------------------
A VM keeps its overlay address (``overlay.addressing.vm_address``) wherever it
runs. Two signed statements say where it runs now:

* a **grant**, signed by the job owner: "node N may hold address A at epoch e
  until ``expires``";
* a **route claim**, signed by node N: a CLAIM ("N holds A at epoch e") carries
  a grant for exactly (swarm, N, A, e); a WITHDRAW ("N no longer holds A at e")
  carries none.

This module encodes, signs, decodes and verifies one statement at a time. It
does not look at the clock or at other statements: expiry, epochs, conflicts and
withdrawals are judged by ``overlay.routes.RouteTable``.

Owner binding: ``job_id = BLAKE2b-256(owner_key || job_nonce, person="gleaner-job")``
and ``A = vm_address(swarm_id, job_id)``. A grant carries owner key and nonce;
the receiver recomputes A and checks the owner's signature, so a node that never
saw the job verifies a grant alone, and nothing is trusted on first use. To take
another owner's address a stranger needs a key and nonce hashing to the same
64-bit interface id, a second preimage of about 2**64 work (a CGA's strength,
RFC 3972, Sec=0). Defence in depth, in the route table: an address is also
pinned to its owner key once known; other keys are refused.

Wire forms (the signed-statement envelope of ``node.base.signed``: msgpack
``[payload, signature]``, Ed25519 over context + payload)::

    grant: by owner, "gleaner/grant/v1\\0", {swarm: str, owner: bin32,
           nonce: bin 8..64, vm: bin16, node: bin32, epoch: uint, expires: uint}
    claim: by node, "gleaner/route/v1\\0", {swarm: str, kind: 1 CLAIM | 2 WITHDRAW,
           node: bin32, vm: bin16, epoch: uint, issued_at: uint, grant: bin | nil}

The payload is a msgpack map carried as bytes, so the signature covers exactly
the bytes sent; a grant is at most ``MAX_GRANT_BYTES``, a claim (with its grant)
at most ``MAX_CLAIM_BYTES``. A claim embeds its grant's blob unchanged.

Errors: decoding is where outside bytes come in, and only ``RemoteProtocolError``
escapes it (``RouteRefused`` with a ``ClaimRefusal`` if the input is well-formed but
refused). Signing decodes what it just signed, so inputs that would make a
statement peers refuse raise ``LocalProtocolError`` instead.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass, field, replace
from ipaddress import IPv6Address

from node.base.identity import KEY_BYTES, Identity, NodeId
from node.base.signed import (
    bin_field,
    decode_own,
    key_field,
    open_statement,
    sign_payload,
    signed_by,
    text_field,
    uint_field,
)
from node.base.wire import RemoteProtocolError
from overlay.addressing import vm_address

GRANT_CONTEXT = b"gleaner/grant/v1\x00"
ROUTE_CONTEXT = b"gleaner/route/v1\x00"
JOB_ID_PERSON = b"gleaner-job"
ADDRESS_BYTES = 16
MIN_NONCE_BYTES = 8
MAX_NONCE_BYTES = 64
MAX_GRANT_BYTES = 1024
MAX_CLAIM_BYTES = 2048


class ClaimRefusal(enum.Enum):
    """Why a claim was refused, counted as ``refused_<value>``.

    Malformed input raises plain RemoteProtocolError (counted as MALFORMED);
    well-formed input refused for a reason raises ``RouteRefused``.
    """

    MALFORMED = "malformed"
    BAD_SIGNATURE = "bad_signature"  # the claim is not signed by its node
    BAD_GRANT = "bad_grant"  # grant not signed by its owner, or address not the owner's
    GRANT_MISMATCH = "grant_mismatch"  # grant is for another node, address, epoch or swarm
    WRONG_SWARM = "wrong_swarm"
    OWNER_MISMATCH = "owner_mismatch"  # address pinned to another owner key
    EXPIRED = "expired"
    STALE = "stale"  # epoch not above the held one (replay)
    CONFLICT = "conflict"  # same epoch, another node
    NOT_HOLDER = "not_holder"  # withdrawal by a node that does not hold the epoch


class RouteRefused(RemoteProtocolError):
    """A peer's route claim or grant is refused, for ``reason``."""

    def __init__(self, reason: ClaimRefusal, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class ClaimKind(enum.IntEnum):
    CLAIM = 1
    WITHDRAW = 2


def derive_job_id(owner_key: bytes, job_nonce: bytes) -> bytes:
    """A job's id, bound to its owner key (see the owner binding above)."""
    if len(owner_key) != KEY_BYTES:
        raise ValueError(f"an owner key is {KEY_BYTES} bytes, got {len(owner_key)}")
    return hashlib.blake2b(owner_key + job_nonce, digest_size=32, person=JOB_ID_PERSON).digest()


@dataclass(frozen=True, slots=True)
class Grant:
    """The owner's "node may hold vm_address at epoch until expires"."""

    swarm_id: str
    owner_key: bytes
    job_nonce: bytes
    vm_address: IPv6Address
    node_id: NodeId
    epoch: int
    expires: int
    signature: bytes = field(default=b"", compare=False)
    blob: bytes = field(default=b"", compare=False, repr=False)

    @property
    def job_id(self) -> bytes:
        return derive_job_id(self.owner_key, self.job_nonce)

    def is_expired(self, now: float) -> bool:
        return now >= self.expires


@dataclass(frozen=True, slots=True)
class RouteClaim:
    """A node's signed CLAIM or WITHDRAW of a VM address at an epoch."""

    kind: ClaimKind
    swarm_id: str
    node_id: NodeId
    vm_address: IPv6Address
    epoch: int
    issued_at: int
    grant: Grant | None
    signature: bytes = field(default=b"", compare=False)
    blob: bytes = field(default=b"", compare=False, repr=False)


# -- signing (our own statements; a failure here is LocalProtocolError) --------------


def sign_grant(
    owner: Identity, *, swarm_id: str, job_nonce: bytes, node_id: NodeId, epoch: int, expires: int
) -> Grant:
    """As job owner, allow `node_id` to hold the job's address at `epoch` until `expires`."""
    owner_key = owner.node_id.key
    address = vm_address(swarm_id, derive_job_id(owner_key, job_nonce))
    payload = {
        "swarm": swarm_id,
        "owner": owner_key,
        "nonce": job_nonce,
        "vm": address.packed,
        "node": node_id.key,
        "epoch": epoch,
        "expires": expires,
    }
    return decode_own(decode_grant, sign_payload(owner, GRANT_CONTEXT, payload))


def sign_claim(identity: Identity, grant: Grant, issued_at: int) -> RouteClaim:
    """CLAIM the grant's address at its epoch, as the granted node."""
    return _sign_route(
        identity, ClaimKind.CLAIM, grant.swarm_id, grant.vm_address, grant.epoch, issued_at, grant
    )


def sign_withdraw(
    identity: Identity, *, swarm_id: str, vm_address: IPv6Address, epoch: int, issued_at: int
) -> RouteClaim:
    """WITHDRAW our hold of `vm_address` at `epoch`."""
    return _sign_route(identity, ClaimKind.WITHDRAW, swarm_id, vm_address, epoch, issued_at, None)


def _sign_route(
    identity: Identity,
    kind: ClaimKind,
    swarm_id: str,
    address: IPv6Address,
    epoch: int,
    issued_at: int,
    grant: Grant | None,
) -> RouteClaim:
    payload = {
        "swarm": swarm_id,
        "kind": int(kind),
        "node": identity.node_id.key,
        "vm": address.packed,
        "epoch": epoch,
        "issued_at": issued_at,
        "grant": None if grant is None else grant.blob,
    }
    return decode_own(decode_claim, sign_payload(identity, ROUTE_CONTEXT, payload))


# -- decoding (where outside bytes come in; only RemoteProtocolError escapes) -------


def decode_grant(blob: bytes) -> Grant:
    """Parse a grant, check the owner's signature and the owner binding."""
    what = "grant"
    payload, signature, fields = open_statement(blob, what, MAX_GRANT_BYTES)
    owner_key = bin_field(fields, "owner", what, KEY_BYTES)
    if not signed_by(owner_key, GRANT_CONTEXT, payload, signature):
        raise RouteRefused(ClaimRefusal.BAD_GRANT, "grant is not signed by its owner key")
    swarm_id = text_field(fields, "swarm", what)
    job_nonce = bin_field(fields, "nonce", what, MIN_NONCE_BYTES, MAX_NONCE_BYTES)
    address = IPv6Address(bin_field(fields, "vm", what, ADDRESS_BYTES))
    if address != vm_address(swarm_id, derive_job_id(owner_key, job_nonce)):
        raise RouteRefused(
            ClaimRefusal.BAD_GRANT, f"grant for {address}: not the address of the owner's job"
        )
    return Grant(
        swarm_id=swarm_id,
        owner_key=owner_key,
        job_nonce=job_nonce,
        vm_address=address,
        node_id=key_field(fields, "node", what),
        epoch=uint_field(fields, "epoch", what),
        expires=uint_field(fields, "expires", what),
        signature=signature,
        blob=blob,
    )


def decode_claim(blob: bytes) -> RouteClaim:
    """Parse a route claim, check its signature and (for a CLAIM) its grant."""
    what = "route claim"
    payload, signature, fields = open_statement(blob, what, MAX_CLAIM_BYTES)
    node_id = key_field(fields, "node", what)
    if not signed_by(node_id.key, ROUTE_CONTEXT, payload, signature):
        raise RouteRefused(ClaimRefusal.BAD_SIGNATURE, "route claim is not signed by its node")
    raw_kind = uint_field(fields, "kind", what)
    if raw_kind not in tuple(ClaimKind):
        raise RemoteProtocolError(f"route claim kind {raw_kind} is unknown")
    claim = RouteClaim(
        kind=ClaimKind(raw_kind),
        swarm_id=text_field(fields, "swarm", what),
        node_id=node_id,
        vm_address=IPv6Address(bin_field(fields, "vm", what, ADDRESS_BYTES)),
        epoch=uint_field(fields, "epoch", what),
        issued_at=uint_field(fields, "issued_at", what),
        grant=None,
        signature=signature,
        blob=blob,
    )
    raw_grant = fields.get("grant")
    if claim.kind is ClaimKind.WITHDRAW:
        if raw_grant is not None:
            raise RemoteProtocolError("a WITHDRAW carries no grant")
        return claim
    if not isinstance(raw_grant, bytes):
        raise RemoteProtocolError("a CLAIM must carry a grant")
    grant = decode_grant(raw_grant)
    for name, granted, claimed in (
        ("swarm", grant.swarm_id, claim.swarm_id),
        ("node", grant.node_id, claim.node_id),
        ("address", grant.vm_address, claim.vm_address),
        ("epoch", grant.epoch, claim.epoch),
    ):
        if granted != claimed:
            raise RouteRefused(
                ClaimRefusal.GRANT_MISMATCH, f"claim {name} {claimed} but grant {name} {granted}"
            )
    return replace(claim, grant=grant)
