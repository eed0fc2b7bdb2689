import ipaddress

from node.base.identity import Identity
from node.base.records import Capabilities, sign_record
from overlay.addressing import node_address
from overlay.desired import desired_device, wireguard_endpoint

SWARM = "s"


def record(identity, host="198.51.100.10", wg_port=51820):
    return sign_record(
        identity,
        endpoints=(f"{host}:7946",),
        overlay_address="",
        capabilities=Capabilities(),
        version="t",
        seq=1,
        expires=2**40,
        wg_port=wg_port,
    )


def net(address):
    return ipaddress.IPv6Network((address, 128))


def test_every_member_gets_a_peer_with_its_node_address_and_routes():
    me, a, b = Identity.generate(), Identity.generate(), Identity.generate()
    vm = net("fd00:1:2:1::5")
    device = desired_device(
        private_key=bytes(me.wireguard_key),
        listen_port=51820,
        swarm_id=SWARM,
        members=[record(a), record(b, "198.51.100.11", 51999)],
        routes={b.node_id: frozenset({vm})},
    )
    assert set(device.peers) == {a.wireguard_public, b.wireguard_public}
    peer_b = device.peers[b.wireguard_public]
    assert peer_b.endpoint == "198.51.100.11:51999"
    assert peer_b.allowed_ips == {net(node_address(SWARM, b.node_id.key)), vm}
    assert wireguard_endpoint(record(a)) == "198.51.100.10:51820"


def test_our_own_key_and_duplicate_keys_and_prefixes_never_break_the_config():
    me, a, b = Identity.generate(), Identity.generate(), Identity.generate()
    impostor = Identity.from_seeds(bytes(b.signing_key), bytes(me.wireguard_key))
    thief = Identity.from_seeds(Identity.generate().signing_key.encode(), bytes(a.wireguard_key))
    vm = net("fd00:1:2:1::5")
    device = desired_device(
        private_key=bytes(me.wireguard_key),
        listen_port=1,
        swarm_id=SWARM,
        members=[record(a), record(impostor), record(thief)],
        routes={a.node_id: frozenset({vm}), thief.node_id: frozenset({vm})},
    )
    assert me.wireguard_public not in device.peers
    assert list(device.peers) == [a.wireguard_public]
    assert sum(vm in peer.allowed_ips for peer in device.peers.values()) == 1


def test_large_swarms_peer_only_with_active_members():
    me = Identity.generate()
    others = [Identity.generate() for _ in range(10)]
    active = frozenset({others[3].node_id})
    device = desired_device(
        private_key=bytes(me.wireguard_key),
        listen_port=1,
        swarm_id=SWARM,
        members=[record(o) for o in others],
        routes={},
        active=active,
        eager_limit=5,
    )
    assert list(device.peers) == [others[3].wireguard_public]
