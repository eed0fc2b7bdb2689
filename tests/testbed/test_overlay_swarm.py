"""Discovery, membership and the WireGuard overlay on a real five-host testbed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from kit.agents import needs_root

from node.base.identity import Identity
from node.base.records import Capabilities, sign_record
from node.base.wire import MessageType, encode_frame
from node.testbed import testbed
from node.testbed import vm as testbed_vm
from node.testbed.checks import alive_peers, full_mesh, overlay_address, ping, rpc, wait_for

pytestmark = [needs_root, pytest.mark.netns]

MESH_TIMEOUT_S = 30.0
HANDSHAKE_WAIT_S = 15.0  # WireGuard retries a lost handshake after 5 s; a loaded CI host

SEND_SCRIPT = (
    "import socket,sys,json; s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);"
    "[s.sendto(bytes.fromhex(f),(sys.argv[1],7946)) for f in json.loads(sys.argv[2])]"
)


def send_from(sender: dict, target: dict, frames: list[bytes]) -> None:
    """Send raw UDP frames to `target`'s agent from inside `sender`'s namespace."""
    argv = [
        sys.executable,
        "-c",
        SEND_SCRIPT,
        target["underlay"],
        json.dumps([f.hex() for f in frames]),
    ]
    subprocess.run(["ip", "netns", "exec", sender["netns"], *argv], check=True, timeout=30)


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    root = tmp_path_factory.mktemp("swarm") / "tb"
    try:
        hosts = testbed.up(5, root=root, libvirt=False)
        wait_for(lambda: full_mesh(hosts), MESH_TIMEOUT_S, "a full mesh of 5 hosts")
        yield root, hosts
    finally:
        testbed.down(root)


def test_five_hosts_mesh_and_ping_each_other_over_the_overlay(swarm):
    _, hosts = swarm
    addresses = {h["name"]: overlay_address(h) for h in hosts}
    for host in hosts:
        assert alive_peers(host) == {h["node_id"] for h in hosts if h is not host}
        for other in hosts:
            if other is not host:  # a first ping may wait out a lost handshake (5 s retry)
                address, pair = addresses[other["name"]], f"{host['name']} -> {other['name']}"
                wait_for(lambda h=host, a=address: ping(h, a), HANDSHAKE_WAIT_S, pair)


def test_peers_command_shows_the_mesh(swarm):
    _, hosts = swarm
    result = subprocess.run(
        [sys.executable, "-m", "node", "peers", "--socket", hosts[0]["socket"], "--json"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    peers = json.loads(result.stdout)
    assert len(peers) == 4
    assert all(p["state"] == "alive" and p["rx_bytes"] > 0 and p["tx_bytes"] > 0 for p in peers)
    table = subprocess.run(
        [sys.executable, "-m", "node", "peers", "--socket", hosts[0]["socket"]],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert "alive" in table.stdout and "ago" in table.stdout


def routes_to(host: dict, address: str, holder: dict, epoch: int) -> bool:
    """Whether `host` routes `address` to `holder` at `epoch`."""
    route = next((r for r in rpc(host, "routes")["routes"] if r["address"] == address), None)
    return route is not None and route["node_id"] == holder["node_id"] and route["epoch"] == epoch


def test_vm_stand_in_moves_through_route_claims(swarm):
    root, hosts = swarm
    vm = testbed_vm.vm_add(root, "mover")
    prober = hosts[2]
    testbed_vm.vm_move(root, "mover", "h1")
    wait_for(lambda: ping(prober, vm["address"]), 10, "the VM reachable at h1")
    moved = testbed_vm.vm_move(root, "mover", "h2")
    assert moved["epoch"] == 2
    wait_for(lambda: ping(prober, vm["address"]), HANDSHAKE_WAIT_S, "the VM reachable at h2")
    assert ping(prober, vm["address"], count=3)
    assert vm["address"] not in rpc(hosts[0], "routes")["local"]
    assert vm["address"] in rpc(hosts[1], "routes")["local"]

    def everyone_routes_to_h2():
        others = [host for host in hosts if host is not hosts[1]]
        return all(routes_to(host, vm["address"], hosts[1], 2) for host in others)

    wait_for(everyone_routes_to_h2, 10, "every agent routing the VM to h2")


def test_forged_records_and_claims_are_refused_and_the_agent_stays_up(swarm):
    root, hosts = swarm
    target = hosts[3]
    before = rpc(target, "status")
    victim = Identity.generate()
    good = sign_record(
        victim,
        endpoints=("198.51.100.99:7946",),
        overlay_address="",
        capabilities=Capabilities(),
        version="t",
        seq=5,
        expires=2**40,
    )
    import msgpack

    payload, _ = msgpack.unpackb(good.blob)
    forged = msgpack.packb([payload, bytes(64)])
    expired = sign_record(
        victim,
        endpoints=(),
        overlay_address="",
        capabilities=Capabilities(),
        version="t",
        seq=6,
        expires=1,
    )
    sender = Identity.generate()
    frames = [
        encode_frame(sender, MessageType.RECORD, 1, {"record": forged}, sign=True),
        encode_frame(sender, MessageType.RECORD, 2, {"record": expired.blob}, sign=True),
        encode_frame(
            sender, MessageType.GOSSIP, 3, {"updates": [b"\x93\x00\x01\x02", forged]}, sign=True
        ),
        encode_frame(sender, MessageType.PING, 4, {"nonce": 1}),  # unsigned on the underlay
    ]
    send_from(hosts[4], target, frames)

    def counted():
        status = rpc(target, "status")
        rejected = status["membership"].get("updates_rejected", 0)
        return status["protocol_errors"] > before["protocol_errors"] and rejected > before[
            "membership"
        ].get("updates_rejected", 0)

    wait_for(counted, 10, "the forged input to be counted")
    assert victim.node_id not in {p["node_id"] for p in rpc(target, "peers")}
    assert len(alive_peers(target)) == 4
    assert testbed.status(root)[3]["running"]


def test_kill_9_marks_dead_removes_peer_and_restart_rejoins(swarm):
    root, hosts = swarm
    victim, others = hosts[4], hosts[:4]
    state = json.loads((Path(root) / "testbed.json").read_text())
    record = next(h for h in state["hosts"] if h["name"] == victim["name"])
    testbed.kill_agent(record)

    def all_mark_dead():
        for host in others:
            peer = next((p for p in rpc(host, "peers") if p["node_id"] == victim["node_id"]), None)
            if peer is not None and (
                peer["state"] not in ("dead", "left") or peer["wireguard_peer"]
            ):
                return False
        return True

    wait_for(all_mark_dead, 20, "every agent to mark the killed one dead and drop its peer")
    testbed.restart_agent(root, victim["name"])
    wait_for(lambda: full_mesh(hosts), MESH_TIMEOUT_S, "the restarted agent back in the mesh")


def test_forged_and_replayed_route_claims_are_refused(swarm):
    """A VM of its own moved h1 -> h2; then its stale epoch-1 claim replayed, others forged."""
    from node.base.signed import sign_payload
    from node.membership.codec import Broadcast, encode_update
    from node.runtime.keystore import load_or_create
    from overlay import claims
    from overlay.claims import sign_claim, sign_grant

    root, hosts = swarm
    target = hosts[3]
    added = testbed_vm.vm_add(root, "claimed")
    testbed_vm.vm_move(root, "claimed", "h1")
    testbed_vm.vm_move(root, "claimed", "h2")
    wait_for(lambda: routes_to(target, added["address"], hosts[1], 2), 10, "h4 routing it to h2")
    state = json.loads((Path(root) / "testbed.json").read_text())
    vm = state["vms"]["claimed"]
    nonce = bytes.fromhex(vm["job_nonce"])
    # Epoch 1's claim, exactly as h1 made it (its key, the owner's grant): now stale.
    h1 = load_or_create(Path(hosts[0]["socket"]).parent)
    old_grant = sign_grant(
        testbed_vm.owner_identity(Path(root)),
        swarm_id=state["swarm_id"],
        job_nonce=nonce,
        node_id=h1.node_id,
        epoch=1,
        expires=2**40,
    )
    old = sign_claim(h1, old_grant, issued_at=1)
    stranger = Identity.generate()
    # The stranger got hold of a real owner's grant (for h1, epoch 99) and claims the
    # VM's address with it, signing the claim itself, as an attacker would.
    stolen_grant = sign_grant(
        testbed_vm.owner_identity(Path(root)),
        swarm_id=state["swarm_id"],
        job_nonce=nonce,
        node_id=h1.node_id,
        epoch=99,
        expires=2**40,
    )
    stolen = sign_payload(stranger, claims.ROUTE_CONTEXT, {
        "swarm": state["swarm_id"], "kind": 1, "node": stranger.node_id.key,
        "vm": stolen_grant.vm_address.packed, "epoch": 99, "issued_at": 1,
        "grant": stolen_grant.blob,
    })  # fmt: skip
    before = rpc(target, "routes")["stats"]
    updates = [
        encode_update(Broadcast("route", b"k1", old.blob)),  # replay of epoch 1
        encode_update(Broadcast("route", b"k2", stolen)),  # another owner's address
        encode_update(Broadcast("route", b"k3", b"\x92\x01garbage")),
    ]
    frame = encode_frame(stranger, MessageType.GOSSIP, 1, {"updates": updates}, sign=True)
    send_from(hosts[4], target, [frame])

    def refused() -> bool:
        stats = rpc(target, "routes")["stats"]
        return (
            stats["refused_stale"] > before["refused_stale"]
            and stats["refused_grant_mismatch"] > before["refused_grant_mismatch"]
            and stats["refused_malformed"] > before["refused_malformed"]
        )

    try:
        wait_for(refused, 10, "the forged and replayed claims to be refused")
    except AssertionError:
        raise AssertionError(
            f"before {before} after {rpc(target, 'routes')['stats']} "
            f"membership {rpc(target, 'status')['membership']}"
        ) from None
    route = next(r for r in rpc(target, "routes")["routes"] if r["address"] == vm["address"])
    assert route["node_id"] == hosts[1]["node_id"] and route["epoch"] == 2
    assert testbed.status(root)[3]["running"]
