"""The route table: which node holds each VM overlay address, from signed route claims.

Theory of operation
-------------------
A VM keeps its overlay address wherever it runs. A route claim signed by the
hosting node N says where it runs now, and is worth something only with the job
owner's grant for it (wire forms, signing and the owner binding of addresses are
in ``overlay.claims``). Peers put A/128 into N's WireGuard AllowedIPs
(``allowed_ips``); N routes A to the VM's tap (``local_addresses``).

Owner pin: defence in depth on top of the owner binding, an address is pinned
to its owner key once known (``register_owner``, or the owner of the claim
held); claims under grants from other keys are refused.

A CLAIM must carry a grant for exactly (swarm, N, A, e), unexpired; a WITHDRAW
carries none. One entry per address holds the newest accepted claim and, once
withdrawn, the withdrawal::

    incoming                     held (epoch h, claimer H)  result
    CLAIM e                      none, or e > h              A -> N at e
    CLAIM, byte-identical        that claim                  duplicate, no-op
    CLAIM e == h, N != H         any                         refuse: conflict
    CLAIM e <= h                 otherwise                   refuse: stale
    WITHDRAW e == h, N == H      routed                      A unrouted
    WITHDRAW e == h, N != H      any                         refuse: not holder
    WITHDRAW e < h               any                         no-op (moved on)
    WITHDRAW, unknown A or e > h -                           no-op (unverifiable)

Make-before-break: to move a VM the owner grants e+1 to the destination, which
claims first; the old host then withdraws e, stale wherever the new claim has
arrived, so there A is never unrouted. A peer that sees the withdrawal first
unroutes A until the claim comes; a claim that arrives after its own withdrawal
routes A to the old host until the next claim or the grant's expiry. A conflict
means the owner signed two grants for one epoch: the first seen wins here, and
only a higher epoch settles it everywhere, so an owner never grants an epoch twice.

A route ends when withdrawn or when its grant expires (``tick``, timed by
``next_expiry``). The entry stays as a tombstone keeping the epoch floor, so
replays stay refused; entries are never dropped (one per address ever seen).

Persistence: ``snapshot`` lists the accepted blobs; ``restore`` re-verifies and
re-offers them (an expired claim still restores its floor). Owner pins come from
the job store, not the snapshot. Persist before promise: a node journals its own
claim (the blob ``claim_local`` returns) before sending it.

Invariants: at most one holder per address; an address's epoch never decreases;
every routed address has a grant signed by its owner key, unexpired as of the
last ``tick``; bad input raises only ``RemoteProtocolError`` (``RouteRefused``
with a reason if well-formed), counted in ``statistics()``; it never changes the table.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, replace
from ipaddress import IPv6Address, IPv6Network

from node.base.identity import KEY_BYTES, Identity, NodeId
from node.base.wire import LocalProtocolError, RemoteProtocolError
from overlay.addressing import VM_SUBNET, is_in_swarm, vm_address
from overlay.claims import (
    ClaimKind,
    ClaimRefusal,
    Grant,
    RouteClaim,
    RouteRefused,
    decode_claim,
    derive_job_id,
    sign_claim,
    sign_withdraw,
)


@dataclass(frozen=True, slots=True)
class ApplyRoute:
    """Effect: ``vm_address`` is now held by ``node_id`` at ``epoch`` (None: unrouted)."""

    vm_address: IPv6Address
    node_id: NodeId | None
    epoch: int


Effect = ApplyRoute

# The membership broadcast topic whose payloads are route claims (the agent and the
# simulator spread claims under it and hand what arrives under it to the table).
ROUTE_TOPIC = "route"


@dataclass(frozen=True, slots=True)
class Route:
    """What the table holds for one address (``node_id`` None: withdrawn or expired)."""

    vm_address: IPv6Address
    node_id: NodeId | None
    epoch: int
    expires: int
    owner_key: bytes


@dataclass(frozen=True, slots=True)
class _Entry:
    claim: RouteClaim
    grant: Grant
    withdrawal: RouteClaim | None = None
    expired: bool = False

    @property
    def holder(self) -> NodeId | None:
        return None if self.withdrawal is not None or self.expired else self.claim.node_id


COUNTERS = (
    "accepted",
    "duplicate",
    "withdrawn",
    "expired",
    "ignored_withdraw_stale",
    "ignored_withdraw_unknown",
    *(f"refused_{reason.value}" for reason in ClaimRefusal),
)


class RouteTable:
    """Routes of one swarm's VM addresses, as seen by `local_node`. Sans-IO; time is passed in."""

    def __init__(self, swarm_id: str, local_node: NodeId) -> None:
        self.swarm_id = swarm_id
        self.local_node = local_node
        self._entries: dict[IPv6Address, _Entry] = {}
        self._owners: dict[IPv6Address, bytes] = {}
        self._local_epochs: dict[IPv6Address, int] = {}
        self._counts: Counter[str] = Counter(dict.fromkeys(COUNTERS, 0))

    # -- input ----------------------------------------------------------------------

    def register_owner(self, owner_key: bytes, job_nonce: bytes) -> IPv6Address:
        """Pin the job's address to its owner key (known from the market); return the address."""
        if len(owner_key) != KEY_BYTES:
            raise LocalProtocolError(f"an owner key is {KEY_BYTES} bytes, got {len(owner_key)}")
        address = vm_address(self.swarm_id, derive_job_id(owner_key, job_nonce))
        if self._owners.setdefault(address, owner_key) != owner_key:
            raise LocalProtocolError(f"{address} is already registered to another owner key")
        return address

    def offer(self, blob: bytes, now: float) -> list[Effect]:
        """Take a peer's claim or withdrawal. Raises (and counts) RemoteProtocolError if refused."""
        try:
            return self._apply(decode_claim(blob), now, check_expiry=True)
        except RemoteProtocolError as exc:
            self._count_refusal(exc)
            raise

    def tick(self, now: float) -> list[Effect]:
        """Unroute every address whose grant has expired at `now`."""
        effects = []
        for address, entry in sorted(self._entries.items()):
            if entry.holder is not None and entry.grant.is_expired(now):
                self._entries[address] = replace(entry, expired=True)
                self._counts["expired"] += 1
                effects.append(ApplyRoute(address, None, entry.claim.epoch))
        return effects

    def claim_local(
        self, grant: Grant, identity: Identity, now: float
    ) -> tuple[bytes, list[Effect]]:
        """Sign and take our own claim. Persist the blob before sending it to anyone."""
        claim = sign_claim(identity, grant, issued_at=int(now))
        return claim.blob, self._apply_local(claim, identity, now)

    def withdraw_local(
        self, address: IPv6Address, identity: Identity, now: float
    ) -> tuple[bytes, list[Effect]]:
        """Sign and take our withdrawal of the last epoch we claimed for `address`.

        If a newer claim has already moved the address, the withdrawal is a no-op
        here (and everywhere that has seen the move) but still worth sending.
        """
        epoch = self._local_epochs.get(address)
        if epoch is None:
            raise LocalProtocolError(f"this node has no claim on {address} to withdraw")
        claim = sign_withdraw(
            identity, swarm_id=self.swarm_id, vm_address=address, epoch=epoch, issued_at=int(now)
        )
        effects = self._apply_local(claim, identity, now)
        self._local_epochs.pop(address, None)
        return claim.blob, effects

    def _apply_local(self, claim: RouteClaim, identity: Identity, now: float) -> list[Effect]:
        if identity.node_id != self.local_node:
            raise LocalProtocolError("identity is not this table's local node")
        try:
            return self._apply(claim, now, check_expiry=True)
        except RemoteProtocolError as exc:
            raise LocalProtocolError(f"our own {claim.kind.name} is refused: {exc}") from exc

    # -- persistence ----------------------------------------------------------------

    def snapshot(self) -> list[bytes]:
        """The blobs to persist: per address its claim, then its withdrawal if any."""
        blobs = []
        for address in sorted(self._entries):
            entry = self._entries[address]
            blobs.append(entry.claim.blob)
            if entry.withdrawal is not None:
                blobs.append(entry.withdrawal.blob)
        return blobs

    def restore(self, blobs: Iterable[bytes], now: float) -> list[Effect]:
        """Re-verify and re-offer persisted blobs; damaged ones are counted and skipped.

        Expired claims still restore their epoch floor (unrouted), so replays of
        older claims stay refused after a restart.
        """
        before = self._view()
        for blob in blobs:
            try:
                self._apply(decode_claim(blob), now, check_expiry=False)
            except RemoteProtocolError as exc:
                self._count_refusal(exc)
        self.tick(now)
        after = self._view()
        return [
            ApplyRoute(address, holder, epoch)
            for address, (holder, epoch) in sorted(after.items())
            if before.get(address, (None, epoch)) != (holder, epoch)
        ]

    # -- output ---------------------------------------------------------------------

    def route(self, address: IPv6Address) -> Route | None:
        entry = self._entries.get(address)
        if entry is None:
            return None
        return Route(
            address, entry.holder, entry.claim.epoch, entry.grant.expires, entry.grant.owner_key
        )

    def allowed_ips(self) -> dict[NodeId, frozenset[IPv6Network]]:
        """VM addresses (/128) per remote holder: the VM part of the WireGuard desired state."""
        peers: dict[NodeId, set[IPv6Network]] = {}
        for address, entry in self._entries.items():
            holder = entry.holder
            if holder is not None and holder != self.local_node:
                peers.setdefault(holder, set()).add(IPv6Network((address, 128)))
        return {node: frozenset(networks) for node, networks in sorted(peers.items())}

    def local_addresses(self) -> set[IPv6Address]:
        """VM addresses this node holds now: route them to the local taps."""
        return {a for a, entry in self._entries.items() if entry.holder == self.local_node}

    def next_expiry(self) -> int | None:
        """When the next routed grant expires: the time for the next ``tick``."""
        times = [e.grant.expires for e in self._entries.values() if e.holder is not None]
        return min(times, default=None)

    def statistics(self) -> dict[str, int]:
        stats = dict(self._counts)
        stats["routed"] = sum(1 for entry in self._entries.values() if entry.holder is not None)
        stats["entries"] = len(self._entries)
        return stats

    # -- transitions ----------------------------------------------------------------

    def _apply(self, claim: RouteClaim, now: float, *, check_expiry: bool) -> list[Effect]:
        address = claim.vm_address
        if claim.swarm_id != self.swarm_id:
            raise RouteRefused(ClaimRefusal.WRONG_SWARM, f"claim for swarm {claim.swarm_id!r}")
        if not is_in_swarm(self.swarm_id, address) or _subnet(address) != VM_SUBNET:
            raise RouteRefused(
                ClaimRefusal.WRONG_SWARM, f"{address} is not a VM address of this swarm"
            )
        if claim.kind is ClaimKind.WITHDRAW:
            return self._withdraw(claim)
        return self._claim(claim, now, check_expiry)

    def _claim(self, claim: RouteClaim, now: float, check_expiry: bool) -> list[Effect]:
        assert claim.grant is not None  # decode_claim guarantees it for a CLAIM
        address, grant = claim.vm_address, claim.grant
        held = self._entries.get(address)
        if held is not None and claim.blob == held.claim.blob:
            self._counts["duplicate"] += 1
            return []
        pinned = self._owners.get(address, held.grant.owner_key if held else grant.owner_key)
        if grant.owner_key != pinned:
            raise RouteRefused(
                ClaimRefusal.OWNER_MISMATCH, f"{address} belongs to another owner key"
            )
        if check_expiry and grant.is_expired(now):
            raise RouteRefused(
                ClaimRefusal.EXPIRED, f"grant for {address} expired at {grant.expires}"
            )
        if held is not None:
            held_epoch, held_node = held.claim.epoch, held.claim.node_id
            if claim.epoch == held_epoch and claim.node_id != held_node:
                raise RouteRefused(
                    ClaimRefusal.CONFLICT,
                    f"{address} epoch {claim.epoch} is already claimed by {held_node.short}",
                )
            if claim.epoch <= held_epoch:
                raise RouteRefused(
                    ClaimRefusal.STALE,
                    f"{address} claim at epoch {claim.epoch} <= held {held_epoch}",
                )
        self._entries[address] = _Entry(claim, grant)
        if claim.node_id == self.local_node:
            self._local_epochs[address] = claim.epoch
        self._counts["accepted"] += 1
        return [ApplyRoute(address, claim.node_id, claim.epoch)]

    def _withdraw(self, claim: RouteClaim) -> list[Effect]:
        address = claim.vm_address
        held = self._entries.get(address)
        if held is None or claim.epoch > held.claim.epoch:
            self._counts["ignored_withdraw_unknown"] += 1
            return []
        if claim.epoch < held.claim.epoch:
            self._counts["ignored_withdraw_stale"] += 1
            return []
        if claim.node_id != held.claim.node_id:
            raise RouteRefused(
                ClaimRefusal.NOT_HOLDER,
                f"{claim.node_id.short} withdraws {address} epoch {claim.epoch} it does not hold",
            )
        if held.withdrawal is not None:
            self._counts["duplicate"] += 1
            return []
        self._entries[address] = replace(held, withdrawal=claim)
        self._counts["withdrawn"] += 1
        if claim.node_id == self.local_node:
            self._local_epochs.pop(address, None)
        if held.holder is None:  # already expired: keep the withdrawal, nothing to unroute
            return []
        return [ApplyRoute(address, None, claim.epoch)]

    def _view(self) -> dict[IPv6Address, tuple[NodeId | None, int]]:
        return {a: (entry.holder, entry.claim.epoch) for a, entry in self._entries.items()}

    def _count_refusal(self, exc: RemoteProtocolError) -> None:
        reason = exc.reason if isinstance(exc, RouteRefused) else ClaimRefusal.MALFORMED
        self._counts[f"refused_{reason.value}"] += 1


def _subnet(address: IPv6Address) -> int:
    return int.from_bytes(address.packed[6:8], "big")
