"""The route table core: grants, route claims, moves, refusals, persistence, fuzzing."""

from __future__ import annotations

from ipaddress import IPv6Address, IPv6Network

import msgpack
import pytest
from hypothesis import HealthCheck, given
from hypothesis import strategies as st
from kit.fuzzing import accepted_only_if_unchanged, edit_lists, fuzz_settings, mutate, signed

import overlay.claims as claims
import overlay.routes as routes
from node.base.identity import Identity
from node.base.wire import LocalProtocolError, RemoteProtocolError
from overlay.addressing import node_address, vm_address
from overlay.claims import (
    GRANT_CONTEXT,
    ROUTE_CONTEXT,
    ClaimKind,
    ClaimRefusal,
    RouteRefused,
    decode_claim,
    decode_grant,
    derive_job_id,
    sign_claim,
    sign_grant,
    sign_withdraw,
)
from overlay.routes import COUNTERS, ApplyRoute, RouteTable

SWARM = "alpha"
NOW = 1_800_000_000
NONCE = b"job-nonce-0001"


def _identity(n: int) -> Identity:
    return Identity.from_seeds(bytes([n]) * 32, bytes([n + 100]) * 32)


OWNER, A, B, C, STRANGER = (_identity(n) for n in range(1, 6))
ADDRESS = vm_address(SWARM, derive_job_id(OWNER.node_id.key, NONCE))


def grant(node=A, epoch=1, *, owner=OWNER, nonce=NONCE, expires=NOW + 3600, swarm=SWARM):
    return sign_grant(
        owner, swarm_id=swarm, job_nonce=nonce, node_id=node.node_id, epoch=epoch, expires=expires
    )


def claim(node=A, epoch=1, **grant_args) -> bytes:
    return sign_claim(node, grant(node, epoch, **grant_args), issued_at=NOW).blob


def withdraw(node=A, epoch=1, address=ADDRESS, issued_at=NOW) -> bytes:
    return sign_withdraw(
        node, swarm_id=SWARM, vm_address=address, epoch=epoch, issued_at=issued_at
    ).blob


def claim_fields(node=A, epoch=1, grant_blob=None, /, **overrides) -> dict:
    fields = {
        "swarm": SWARM,
        "kind": int(ClaimKind.CLAIM),
        "node": node.node_id.key,
        "vm": ADDRESS.packed,
        "epoch": epoch,
        "issued_at": NOW,
        "grant": grant(node, epoch).blob if grant_blob is None else grant_blob,
    }
    fields.update(overrides)
    return fields


def table(local=C) -> RouteTable:
    return RouteTable(SWARM, local.node_id)


def refused(t: RouteTable, blob: bytes, reason: ClaimRefusal, now=NOW) -> None:
    before = (t.snapshot(), t.allowed_ips(), t.local_addresses())
    count = t.statistics()[f"refused_{reason.value}"]
    with pytest.raises(RemoteProtocolError) as info:
        t.offer(blob, now)
    assert getattr(info.value, "reason", ClaimRefusal.MALFORMED) is reason, str(info.value)
    assert t.statistics()[f"refused_{reason.value}"] == count + 1
    assert (t.snapshot(), t.allowed_ips(), t.local_addresses()) == before


def net(address: IPv6Address) -> IPv6Network:
    return IPv6Network((address, 128))


# -- grants and the owner binding ---------------------------------------------------------


def test_grant_round_trip_and_owner_binding():
    g = grant(B, 7)
    again = decode_grant(g.blob)
    assert again == g
    assert again.vm_address == ADDRESS == vm_address(SWARM, g.job_id)
    assert again.node_id == B.node_id and again.epoch == 7
    assert again.is_expired(NOW + 3600) and not again.is_expired(NOW)


def test_job_id_is_bound_to_the_owner_key():
    theirs = derive_job_id(OWNER.node_id.key, NONCE)
    mine = derive_job_id(STRANGER.node_id.key, NONCE)
    assert theirs != mine
    assert vm_address(SWARM, mine) != ADDRESS
    assert grant(owner=STRANGER).vm_address != ADDRESS


def test_sign_grant_refuses_bad_inputs():
    with pytest.raises(LocalProtocolError):
        grant(nonce=b"short")
    with pytest.raises(LocalProtocolError):
        grant(epoch=-1)
    with pytest.raises(LocalProtocolError):
        grant(expires=2**64)


def test_claim_round_trip():
    blob = claim(B, 3)
    decoded = decode_claim(blob)
    assert decoded.kind is ClaimKind.CLAIM
    assert decoded.node_id == B.node_id and decoded.epoch == 3
    assert decoded.vm_address == ADDRESS and decoded.issued_at == NOW
    assert decoded.grant == grant(B, 3)
    w = decode_claim(withdraw(B, 3))
    assert w.kind is ClaimKind.WITHDRAW and w.grant is None


# -- accepting and moving ------------------------------------------------------------------


def test_valid_claim_is_accepted_and_routed():
    t = table()
    assert t.offer(claim(A, 1), NOW) == [ApplyRoute(ADDRESS, A.node_id, 1)]
    assert t.allowed_ips() == {A.node_id: frozenset({net(ADDRESS)})}
    assert t.local_addresses() == set()
    route = t.route(ADDRESS)
    assert route is not None and route.node_id == A.node_id and route.epoch == 1
    assert route.owner_key == OWNER.node_id.key
    assert t.statistics()["accepted"] == 1 and t.statistics()["routed"] == 1


def test_addresses_of_several_jobs_group_by_holder():
    t = table()
    other = vm_address(SWARM, derive_job_id(OWNER.node_id.key, b"job-nonce-0002"))
    t.offer(claim(A, 1), NOW)
    t.offer(claim(A, 1, nonce=b"job-nonce-0002"), NOW)
    t.offer(claim(B, 1, owner=STRANGER), NOW)
    mine = vm_address(SWARM, derive_job_id(STRANGER.node_id.key, NONCE))
    assert t.allowed_ips() == {
        A.node_id: frozenset({net(ADDRESS), net(other)}),
        B.node_id: frozenset({net(mine)}),
    }


def test_make_before_break_move_is_never_unrouted():
    t = table()
    effects = t.offer(claim(A, 1), NOW)
    effects += t.offer(claim(B, 2), NOW + 10)  # the destination claims first
    effects += t.offer(withdraw(A, 1), NOW + 11)  # then the old host lets go
    assert effects == [ApplyRoute(ADDRESS, A.node_id, 1), ApplyRoute(ADDRESS, B.node_id, 2)]
    assert all(effect.node_id is not None for effect in effects)
    assert t.allowed_ips() == {B.node_id: frozenset({net(ADDRESS)})}
    assert t.statistics()["ignored_withdraw_stale"] == 1
    assert t.statistics()["refused_stale"] == 0


def test_move_seen_from_the_old_and_new_hosts():
    old, new = table(A), table(B)
    blob_a, effects = old.claim_local(grant(A, 1), A, NOW)
    assert effects == [ApplyRoute(ADDRESS, A.node_id, 1)]
    assert old.local_addresses() == {ADDRESS} and old.allowed_ips() == {}
    new.offer(blob_a, NOW)
    assert new.allowed_ips() == {A.node_id: frozenset({net(ADDRESS)})}

    blob_b, effects = new.claim_local(grant(B, 2), B, NOW + 10)
    assert effects == [ApplyRoute(ADDRESS, B.node_id, 2)]
    assert new.local_addresses() == {ADDRESS} and new.allowed_ips() == {}
    assert old.offer(blob_b, NOW + 10) == [ApplyRoute(ADDRESS, B.node_id, 2)]
    assert old.local_addresses() == set()

    blob_w, effects = old.withdraw_local(ADDRESS, A, NOW + 11)
    assert effects == []  # stale here already: the new claim is in
    assert new.offer(blob_w, NOW + 11) == []
    assert new.local_addresses() == {ADDRESS}
    assert old.allowed_ips() == {B.node_id: frozenset({net(ADDRESS)})}


def test_withdrawal_seen_before_the_new_claim_unroutes_then_routes():
    t = table()
    t.offer(claim(A, 1), NOW)
    assert t.offer(withdraw(A, 1), NOW + 1) == [ApplyRoute(ADDRESS, None, 1)]
    assert t.allowed_ips() == {} and t.route(ADDRESS).node_id is None
    assert t.offer(claim(B, 2), NOW + 2) == [ApplyRoute(ADDRESS, B.node_id, 2)]


def test_withdrawal_leaves_a_tombstone_against_replays():
    t = table()
    blob = claim(A, 1)
    t.offer(blob, NOW)
    t.offer(withdraw(A, 1), NOW)
    assert t.offer(blob, NOW) == []  # the same bytes: a harmless duplicate...
    assert t.allowed_ips() == {}  # ...that does not bring the route back
    refused(t, sign_claim(A, grant(A, 1), issued_at=NOW + 5).blob, ClaimRefusal.STALE)
    assert t.offer(withdraw(A, 1, issued_at=NOW + 9), NOW) == []
    assert t.statistics()["withdrawn"] == 1 and t.statistics()["duplicate"] == 2


def test_withdrawals_that_prove_nothing_are_ignored():
    t = table()
    assert t.offer(withdraw(A, 1), NOW) == []  # unknown address
    t.offer(claim(A, 2), NOW)
    assert t.offer(withdraw(A, 3), NOW) == []  # an epoch we never saw claimed
    assert t.offer(withdraw(A, 1), NOW) == []  # an epoch already superseded
    assert t.allowed_ips() == {A.node_id: frozenset({net(ADDRESS)})}
    stats = t.statistics()
    assert stats["ignored_withdraw_unknown"] == 2 and stats["ignored_withdraw_stale"] == 1


def test_withdrawal_by_a_node_that_does_not_hold_the_epoch_is_refused():
    t = table()
    t.offer(claim(A, 1), NOW)
    refused(t, withdraw(B, 1), ClaimRefusal.NOT_HOLDER)
    assert t.allowed_ips() == {A.node_id: frozenset({net(ADDRESS)})}


def test_higher_epoch_by_the_same_node_is_accepted():
    t = table()
    t.offer(claim(A, 1), NOW)
    assert t.offer(claim(A, 2), NOW) == [ApplyRoute(ADDRESS, A.node_id, 2)]


# -- refusals ------------------------------------------------------------------------------


def test_forged_claim_signature_is_refused():
    payload, signature = msgpack.unpackb(claim(A, 1))
    forged = msgpack.packb([payload, bytes([signature[0] ^ 1]) + signature[1:]])
    refused(table(), forged, ClaimRefusal.BAD_SIGNATURE)


def test_claim_signed_by_someone_else_is_refused():
    # B has a valid grant for A and signs "A holds the address" with its own key.
    refused(table(), signed(B, ROUTE_CONTEXT, claim_fields(A, 1)), ClaimRefusal.BAD_SIGNATURE)


def test_grant_not_signed_by_the_owner_is_refused():
    fields = {
        "swarm": SWARM,
        "owner": OWNER.node_id.key,  # claims to be the owner...
        "nonce": NONCE,
        "vm": ADDRESS.packed,
        "node": STRANGER.node_id.key,
        "epoch": 9,
        "expires": NOW + 3600,
    }
    forged = signed(STRANGER, GRANT_CONTEXT, fields)  # ...but signed by the stranger
    blob = signed(STRANGER, ROUTE_CONTEXT, claim_fields(STRANGER, 9, forged))
    refused(table(), blob, ClaimRefusal.BAD_GRANT)


def test_stranger_cannot_grant_someone_elses_address():
    t = table()
    t.offer(claim(A, 1), NOW)
    for nonce in (NONCE, b"another-nonce"):
        fields = {
            "swarm": SWARM,
            "owner": STRANGER.node_id.key,  # the stranger's own key, honestly signed
            "nonce": nonce,
            "vm": ADDRESS.packed,  # but the victim's address
            "node": STRANGER.node_id.key,
            "epoch": 99,
            "expires": NOW + 3600,
        }
        forged = signed(STRANGER, GRANT_CONTEXT, fields)
        blob = signed(STRANGER, ROUTE_CONTEXT, claim_fields(STRANGER, 99, forged))
        refused(t, blob, ClaimRefusal.BAD_GRANT)
    assert t.allowed_ips() == {A.node_id: frozenset({net(ADDRESS)})}


def test_claim_with_a_grant_for_another_node_is_refused():
    blob = signed(B, ROUTE_CONTEXT, claim_fields(B, 1, grant(C, 1).blob))
    refused(table(), blob, ClaimRefusal.GRANT_MISMATCH)
    with pytest.raises(LocalProtocolError):
        sign_claim(B, grant(C, 1), issued_at=NOW)


@pytest.mark.parametrize(
    "override",
    [
        {"epoch": 2},
        {"vm": vm_address(SWARM, b"other").packed},
        {"swarm": "beta"},
    ],
)
def test_claim_that_disagrees_with_its_grant_is_refused(override):
    blob = signed(A, ROUTE_CONTEXT, claim_fields(A, 1, **override))
    refused(table(), blob, ClaimRefusal.GRANT_MISMATCH)


def test_expired_grant_is_refused():
    refused(table(), claim(A, 1, expires=NOW), ClaimRefusal.EXPIRED)
    refused(table(), claim(A, 1, expires=NOW + 10), ClaimRefusal.EXPIRED, now=NOW + 11)
    assert table().offer(claim(A, 1, expires=NOW + 1), NOW) != []


def test_replayed_older_claim_is_refused():
    t = table()
    old = claim(A, 1)
    t.offer(old, NOW)
    t.offer(claim(B, 2), NOW)
    refused(t, old, ClaimRefusal.STALE)
    refused(t, sign_claim(B, grant(B, 2), issued_at=NOW + 1).blob, ClaimRefusal.STALE)
    assert t.offer(claim(B, 2), NOW) == []  # byte-identical: harmless
    assert t.statistics()["duplicate"] == 1


def test_conflicting_claim_for_the_same_epoch_is_refused():
    t = table()
    t.offer(claim(A, 5), NOW)
    refused(t, claim(B, 5), ClaimRefusal.CONFLICT)
    assert t.allowed_ips() == {A.node_id: frozenset({net(ADDRESS)})}


def test_claim_for_another_swarm_is_refused():
    refused(table(), claim(A, 1, swarm="beta"), ClaimRefusal.WRONG_SWARM)
    elsewhere = vm_address("beta", derive_job_id(OWNER.node_id.key, NONCE))
    refused(table(), withdraw(A, 1, address=elsewhere), ClaimRefusal.WRONG_SWARM)
    node_addr = node_address(SWARM, A.node_id.key)  # in the swarm, but not a VM address
    refused(table(), withdraw(A, 1, address=node_addr), ClaimRefusal.WRONG_SWARM)


def test_withdraw_with_a_grant_and_claim_without_are_malformed():
    w = claim_fields(A, 1, kind=int(ClaimKind.WITHDRAW))
    refused(table(), signed(A, ROUTE_CONTEXT, w), ClaimRefusal.MALFORMED)
    c = claim_fields(A, 1)
    c["grant"] = None
    refused(table(), signed(A, ROUTE_CONTEXT, c), ClaimRefusal.MALFORMED)
    refused(table(), signed(A, ROUTE_CONTEXT, claim_fields(A, 1, kind=3)), ClaimRefusal.MALFORMED)
    refused(
        table(), signed(A, ROUTE_CONTEXT, claim_fields(A, 1, epoch=True)), ClaimRefusal.MALFORMED
    )


@pytest.mark.parametrize(
    "blob",
    [
        b"",
        b"\x90",
        b"\xc1" * 10,
        msgpack.packb([b"x", b"y"]),
        msgpack.packb([1, 2]),
        msgpack.packb([msgpack.packb([1]), bytes(64)]),
        msgpack.packb([msgpack.packb({}), bytes(64)]),
        bytes(5000),
    ],
)
def test_garbage_is_refused_as_malformed(blob):
    refused(table(), blob, ClaimRefusal.MALFORMED)


def test_owner_pin_refuses_a_colliding_owner(monkeypatch):
    # Simulate a 2**64 second preimage: every (owner, nonce) maps to one job id.
    def collide(owner_key: bytes, job_nonce: bytes) -> bytes:
        return b"collision"

    monkeypatch.setattr(claims, "derive_job_id", collide)  # grants
    monkeypatch.setattr(routes, "derive_job_id", collide)  # register_owner
    t = table()
    address = t.register_owner(OWNER.node_id.key, NONCE)
    assert address == vm_address(SWARM, b"collision")
    t2 = table()
    t2.register_owner(OWNER.node_id.key, NONCE)
    refused(t2, claim(B, 1, owner=STRANGER), ClaimRefusal.OWNER_MISMATCH)  # pinned by registration
    t.offer(claim(A, 1), NOW)
    refused(t, claim(B, 2, owner=STRANGER), ClaimRefusal.OWNER_MISMATCH)
    t3 = table()
    t3.offer(claim(A, 1), NOW)  # pinned by the held claim
    refused(t3, claim(B, 2, owner=STRANGER), ClaimRefusal.OWNER_MISMATCH)
    with pytest.raises(LocalProtocolError):
        t.register_owner(STRANGER.node_id.key, NONCE)


def test_register_owner_gives_the_jobs_address():
    assert table().register_owner(OWNER.node_id.key, NONCE) == ADDRESS
    with pytest.raises(LocalProtocolError):
        table().register_owner(b"short", NONCE)


# -- expiry ----------------------------------------------------------------------------------


def test_tick_unroutes_expired_grants_and_keeps_the_floor():
    t = table()
    t.offer(claim(A, 1, expires=NOW + 60), NOW)
    assert t.next_expiry() == NOW + 60
    assert t.tick(NOW + 59) == []
    assert t.tick(NOW + 60) == [ApplyRoute(ADDRESS, None, 1)]
    assert t.tick(NOW + 61) == []
    assert t.allowed_ips() == {} and t.next_expiry() is None
    assert t.statistics()["expired"] == 1
    refused(t, claim(B, 1, expires=NOW + 600), ClaimRefusal.CONFLICT, now=NOW + 61)
    assert t.offer(withdraw(A, 1), NOW + 62) == []  # recorded, nothing to unroute
    assert t.offer(claim(B, 2, expires=NOW + 600), NOW + 62) == [ApplyRoute(ADDRESS, B.node_id, 2)]


# -- local claims ----------------------------------------------------------------------------


def test_claim_local_and_withdraw_local():
    t = table(A)
    blob, effects = t.claim_local(grant(A, 1), A, NOW)
    assert decode_claim(blob).node_id == A.node_id
    assert effects == [ApplyRoute(ADDRESS, A.node_id, 1)]
    assert t.local_addresses() == {ADDRESS} and t.allowed_ips() == {}
    peer = table(B)
    peer.offer(blob, NOW)
    w_blob, effects = t.withdraw_local(ADDRESS, A, NOW + 5)
    assert effects == [ApplyRoute(ADDRESS, None, 1)]
    assert t.local_addresses() == set()
    assert peer.offer(w_blob, NOW + 5) == [ApplyRoute(ADDRESS, None, 1)]
    with pytest.raises(LocalProtocolError):
        t.withdraw_local(ADDRESS, A, NOW + 6)


def test_local_mistakes_are_local_protocol_errors():
    t = table(A)
    with pytest.raises(LocalProtocolError):
        t.claim_local(grant(A, 1), B, NOW)  # not our identity
    with pytest.raises(LocalProtocolError):
        t.claim_local(grant(B, 1), A, NOW)  # a grant for someone else
    with pytest.raises(LocalProtocolError):
        t.claim_local(grant(A, 1, expires=NOW), A, NOW)  # expired
    t.offer(claim(B, 3), NOW)
    with pytest.raises(LocalProtocolError):
        t.claim_local(grant(A, 2), A, NOW)  # stale
    with pytest.raises(LocalProtocolError):
        t.withdraw_local(ADDRESS, A, NOW)  # never held
    assert all(t.statistics()[f"refused_{r.value}"] == 0 for r in ClaimRefusal)


# -- persistence -----------------------------------------------------------------------------


def _populated() -> tuple[RouteTable, dict[str, IPv6Address]]:
    t = table(C)
    addresses = {}
    for name, node, nonce in (
        ("remote", A, b"nonce-remote"),
        ("local", C, b"nonce-local"),
        ("gone", B, b"nonce-gone"),
        ("short", B, b"nonce-short"),
    ):
        g = grant(node, 4, nonce=nonce, expires=NOW + (60 if name == "short" else 3600))
        addresses[name] = g.vm_address
        if node is C:
            t.claim_local(g, C, NOW)
        else:
            t.offer(sign_claim(node, g, issued_at=NOW).blob, NOW)
    t.offer(withdraw(B, 4, address=addresses["gone"]), NOW)
    return t, addresses


def test_snapshot_restore_round_trip():
    t, addresses = _populated()
    blobs = t.snapshot()
    again = table(C)
    effects = again.restore(blobs, NOW + 1)
    assert again.snapshot() == blobs
    assert again.allowed_ips() == t.allowed_ips()
    assert again.local_addresses() == t.local_addresses() == {addresses["local"]}
    assert sorted(effects, key=lambda e: e.vm_address) == sorted(
        [
            ApplyRoute(addresses["remote"], A.node_id, 4),
            ApplyRoute(addresses["local"], C.node_id, 4),
            ApplyRoute(addresses["short"], B.node_id, 4),
        ],
        key=lambda e: e.vm_address,
    )
    # the withdrawn address stays withdrawn: replaying its claim is refused
    gone = sign_claim(B, grant(B, 4, nonce=b"nonce-gone"), issued_at=NOW + 3).blob
    refused(again, gone, ClaimRefusal.STALE, now=NOW + 2)
    # our own claim survives the restart, so we can still withdraw it, once
    _, effects = again.withdraw_local(addresses["local"], C, NOW + 3)
    assert effects == [ApplyRoute(addresses["local"], None, 4)]
    with pytest.raises(LocalProtocolError):
        again.withdraw_local(addresses["local"], C, NOW + 4)


def test_restored_own_withdrawal_is_not_withdrawn_again():
    t = table(C)
    t.claim_local(grant(C, 1), C, NOW)
    t.withdraw_local(ADDRESS, C, NOW + 1)
    again = table(C)
    assert again.restore(t.snapshot(), NOW + 2) == []
    with pytest.raises(LocalProtocolError):
        again.withdraw_local(ADDRESS, C, NOW + 3)


def test_restore_after_expiry_keeps_the_epoch_floor():
    t, addresses = _populated()
    again = table(C)
    effects = again.restore(t.snapshot(), NOW + 120)
    assert addresses["short"] not in {e.vm_address for e in effects}
    assert again.route(addresses["short"]).node_id is None
    old = sign_claim(B, grant(B, 3, nonce=b"nonce-short"), issued_at=NOW).blob
    refused(again, old, ClaimRefusal.STALE, now=NOW + 120)


def test_restore_skips_and_counts_damaged_blobs():
    again = table(C)
    effects = again.restore([b"garbage", claim(A, 1)], NOW)
    assert effects == [ApplyRoute(ADDRESS, A.node_id, 1)]
    assert again.statistics()["refused_malformed"] == 1


def test_statistics_keys_are_stable():
    stats = table().statistics()
    assert set(COUNTERS) <= set(stats)
    assert stats["routed"] == stats["entries"] == 0


# -- properties and fuzzing --------------------------------------------------------------------


NODES = (A, B, C)


@fuzz_settings(200, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    st.lists(st.sampled_from(range(3)), min_size=1, max_size=6),
    st.randoms(use_true_random=False),
)
def test_moves_converge_on_the_newest_epoch_in_any_order(holders, rng):
    """The owner grants each epoch once; claims and old withdrawals arrive in any order."""
    messages = [claim(NODES[n], epoch) for epoch, n in enumerate(holders, start=1)]
    messages += [withdraw(NODES[n], epoch) for epoch, n in enumerate(holders[:-1], start=1)]
    rng.shuffle(messages)
    t = table(_identity(9))
    floor = 0
    for blob in messages:
        try:
            t.offer(blob, NOW)
        except RouteRefused as exc:
            assert exc.reason is ClaimRefusal.STALE
        route = t.route(ADDRESS)
        if route is not None:
            assert route.epoch >= floor
            floor = route.epoch
    final = t.route(ADDRESS)
    assert final.epoch == len(holders) and final.node_id == NODES[holders[-1]].node_id
    assert t.statistics()["refused_conflict"] == t.statistics()["refused_not_holder"] == 0


def _valid_blobs() -> list[bytes]:
    return [claim(A, 1), claim(B, 2, nonce=b"x" * 64), withdraw(A, 1), grant(A, 1).blob]


def _only_remote_errors(blob: bytes) -> None:
    t = table()
    t.offer(claim(A, 1), NOW)
    try:
        t.offer(blob, NOW)
    except RemoteProtocolError:
        pass
    try:
        decode_grant(blob)
    except RemoteProtocolError:
        pass


FUZZ = fuzz_settings(1500, deadline=None, suppress_health_check=list(HealthCheck))


@FUZZ
@given(st.binary(max_size=3000))
def test_fuzz_random_bytes(blob):
    _only_remote_errors(blob)


@FUZZ
@given(
    st.sampled_from(_valid_blobs()),
    edit_lists(max_position=5000, max_size=6),
)
def test_fuzz_mutated_valid_blobs(blob, edits):
    mutated = mutate(blob, edits)
    _only_remote_errors(mutated)
    for decode in (decode_claim, decode_grant):
        accepted_only_if_unchanged(decode, blob, mutated)


field_values = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=10)
    | st.binary(max_size=70)
    | st.lists(st.integers(-(2**63), 2**64 - 1), max_size=3)
)


@FUZZ
@given(
    st.sampled_from(["swarm", "kind", "node", "vm", "epoch", "issued_at", "grant"]),
    field_values,
    st.sampled_from(["swarm", "owner", "nonce", "vm", "node", "epoch", "expires", None]),
    field_values,
)
def test_fuzz_signed_payloads_with_wrong_fields(claim_key, claim_value, grant_key, grant_value):
    """Well-signed messages with wrong fields reach the field checks, not just the signature."""
    grant_fields = {
        "swarm": SWARM,
        "owner": OWNER.node_id.key,
        "nonce": NONCE,
        "vm": ADDRESS.packed,
        "node": A.node_id.key,
        "epoch": 1,
        "expires": NOW + 3600,
    }
    if grant_key is not None:
        grant_fields[grant_key] = grant_value
    fields = claim_fields(A, 1, signed(OWNER, GRANT_CONTEXT, grant_fields))
    fields[claim_key] = claim_value
    # the claim's node key may itself be the mutated field; sign with A regardless
    _only_remote_errors(signed(A, ROUTE_CONTEXT, fields))
