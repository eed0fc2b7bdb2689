"""WireGuard state, diff, lowering, UAPI codec and the fake backend: all without a device."""

from __future__ import annotations

import base64
import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kit.import_graph import imported_roots
from kit.paths import REPO_ROOT

from overlay.wgstate import (
    AddPeer,
    DeviceConfig,
    DeviceStatus,
    PeerConfig,
    PeerStatus,
    PeerWrite,
    RemovePeer,
    SetListenPort,
    SetPrivateKey,
    Transaction,
    UpdatePeer,
    canonical_endpoint,
    diff,
    public_key_of,
    short_key,
    transaction,
)
from overlay.wireguard import backend as wgbackend
from overlay.wireguard.backend import FakeBackend, status_from_netlink
from overlay.wireguard.process import interface_name
from overlay.wireguard.uapi import UapiError, encode_set, parse_get, reply_errno

PRIVATE = bytes(range(1, 33))
OWN = public_key_of(PRIVATE)
X, Y, Z = (bytes([n]) * 32 for n in (0x11, 0x22, 0x33))
NODE_X = ipaddress.ip_network("fd12:3456:789a::11/128")
NODE_Y = ipaddress.ip_network("fd12:3456:789a::22/128")
VM = ipaddress.ip_network("fd12:3456:789a:1::5/128")
VM2 = ipaddress.ip_network("fd12:3456:789a:1::6/128")


def nets(*networks: ipaddress.IPv6Network | ipaddress.IPv4Network) -> frozenset:
    return frozenset(networks)


def status_of(
    config: DeviceConfig, handshake: float = 0.0, endpoints: dict | None = None
) -> DeviceStatus:
    """What a device that holds exactly `config` reports."""
    endpoints = endpoints or {}
    peers = {
        key: PeerStatus(
            key,
            endpoints.get(key, p.endpoint),
            p.allowed_ips,
            p.keepalive_s,
            handshake,
            123,
            456,
        )
        for key, p in config.peers.items()
    }
    return DeviceStatus(public_key_of(config.private_key), config.listen_port, peers)


def two_peers() -> DeviceConfig:
    x = PeerConfig(X, "198.51.100.11:51820", nets(NODE_X, VM), 25)
    y = PeerConfig(Y, "198.51.100.22:51820", nets(NODE_Y), 25)
    return DeviceConfig.of(PRIVATE, 51820, [x, y])


EMPTY = DeviceStatus(None, 0, {})


# --- diff ----------------------------------------------------------------------


def test_no_change_is_empty():
    config = two_peers()
    assert diff(status_of(config, handshake=1.7e9), config) == []


def test_fresh_device_gets_key_port_and_peers_in_key_order():
    config = two_peers()
    changes = diff(EMPTY, config)
    assert changes == [
        SetPrivateKey(PRIVATE),
        SetListenPort(51820),
        AddPeer(config.peers[X]),
        AddPeer(config.peers[Y]),
    ]


def test_listen_port_zero_means_any():
    config = DeviceConfig.of(PRIVATE, 0, [])
    assert diff(DeviceStatus(OWN, 40123, {}), config) == []


def test_other_private_key_is_replaced():
    config = DeviceConfig.of(PRIVATE, 51820, [])
    other = public_key_of(bytes(range(2, 34)))
    assert diff(DeviceStatus(other, 51820, {}), config) == [SetPrivateKey(PRIVATE)]


def test_peer_not_desired_is_removed():
    config = two_peers()
    actual = status_of(DeviceConfig.of(PRIVATE, 51820, [*config.peers.values(), _peer(Z)]))
    assert diff(actual, config) == [RemovePeer(Z)]


def test_update_carries_only_the_keepalive():
    config = two_peers()
    actual = status_of(config)
    slower = DeviceConfig.of(
        PRIVATE, 51820, [_replace(config.peers[X], keepalive_s=0), config.peers[Y]]
    )
    assert diff(actual, slower) == [UpdatePeer(X, keepalive_s=0)]


def test_update_carries_only_the_endpoint():
    config = two_peers()
    actual = status_of(config, endpoints={Y: "198.51.100.99:4000"})  # Y roamed
    assert diff(actual, config) == [UpdatePeer(Y, endpoint="198.51.100.22:51820")]


def test_learned_endpoint_is_not_a_difference():
    learned = DeviceConfig.of(PRIVATE, 51820, [PeerConfig(X, None, nets(NODE_X))])
    actual = status_of(learned, endpoints={X: "[fd00::9]:51820"})
    assert diff(actual, learned) == []


def test_endpoints_compare_in_canonical_form():
    assert canonical_endpoint("[FD00:0:0::9]:051820") == "[fd00::9]:51820"
    assert canonical_endpoint("198.51.100.7:1") == "198.51.100.7:1"
    assert canonical_endpoint("host.example:1") == "host.example:1"
    typed = DeviceConfig.of(PRIVATE, 51820, [PeerConfig(X, "[FD00:0::9]:51820", nets())])
    actual = status_of(typed, endpoints={X: "[fd00::9]:51820"})
    assert diff(actual, typed) == []


def test_move_updates_both_holders_with_full_lists():
    before = two_peers()
    after = _move(before, VM, X, Y)
    assert diff(status_of(before), after) == [
        UpdatePeer(X, allowed_ips=nets(NODE_X)),
        UpdatePeer(Y, allowed_ips=nets(NODE_Y, VM)),
    ]


def test_diff_is_deterministic_whatever_the_mapping_order():
    config = two_peers()
    extra = [_peer(bytes([n]) * 32) for n in range(0x40, 0x48)]
    forward = DeviceConfig.of(PRIVATE, 51820, [*config.peers.values(), *extra])
    backward = DeviceConfig.of(PRIVATE, 51820, reversed([*config.peers.values(), *extra]))
    actual = status_of(DeviceConfig.of(PRIVATE, 51820, [_peer(bytes([n]) * 32) for n in (9, 3)]))
    assert diff(actual, forward) == diff(actual, backward)
    keys = [c.peer.public_key for c in diff(actual, forward) if isinstance(c, AddPeer)]
    assert keys == sorted(keys)


# --- config validation and descriptions -------------------------------------------


def test_a_prefix_has_one_holder():
    with pytest.raises(ValueError, match="one holder"):
        DeviceConfig.of(PRIVATE, 1, [PeerConfig(X, None, nets(VM)), PeerConfig(Y, None, nets(VM))])


def test_a_device_is_not_its_own_peer():
    with pytest.raises(ValueError, match="own peer"):
        DeviceConfig.of(PRIVATE, 1, [PeerConfig(OWN, None, nets())])


def test_bad_keys_and_numbers_are_rejected():
    with pytest.raises(ValueError):
        PeerConfig(b"short", None, nets())
    with pytest.raises(ValueError):
        PeerConfig(X, None, nets(), keepalive_s=70000)
    with pytest.raises(ValueError):
        DeviceConfig(PRIVATE, 70000, {})
    with pytest.raises(ValueError):
        DeviceConfig(PRIVATE, 1, {Y: PeerConfig(X, None, nets())})
    with pytest.raises(ValueError):
        UpdatePeer(X)


def test_descriptions_show_short_public_keys_never_the_private_key():
    config = two_peers()
    lines = [change.describe() for change in diff(EMPTY, config)]
    assert lines[0] == f"set private key (public key {short_key(OWN)})"
    assert lines[1] == "set listen port 51820"
    assert lines[2].startswith(f"add peer {short_key(X)} endpoint 198.51.100.11:51820 allowed ")
    assert UpdatePeer(X, keepalive_s=5).describe() == f"update peer {short_key(X)}: keepalive -> 5s"
    assert RemovePeer(Y).describe() == f"remove peer {short_key(Y)}"
    secret = base64.b64encode(PRIVATE).decode()
    assert not any(secret[:8] in line for line in lines)
    assert PRIVATE.hex() not in repr(SetPrivateKey(PRIVATE)) + repr(config)


# --- lowering: grow, trim, remove ------------------------------------------------


def test_transaction_grows_before_it_trims_and_removes_last():
    before = two_peers()
    after = _move(before, VM, X, Y)
    after = DeviceConfig.of(PRIVATE, 51820, [*after.peers.values(), _peer(Z)])
    changes = [*diff(status_of(before), after), RemovePeer(bytes([0x44]) * 32)]
    tx = transaction(changes)
    assert [(w.public_key, w.replace_allowed_ips, w.remove) for w in tx.peers] == [
        (Z, True, False),  # new peer: full config
        (X, False, False),  # grow X (nothing new)
        (Y, False, False),  # grow Y: takes VM from X, additively
        (X, True, False),  # trim X: it lost VM
        # no trim for Y: it only gained, so its routes are never replaced (no blink)
        (bytes([0x44]) * 32, False, True),
    ]
    assert tx.peers[2].allowed_ips == (NODE_Y, VM)
    assert tx.peers[2].update_only


def test_encode_set_is_one_uapi_request():
    tx = Transaction(
        private_key=PRIVATE,
        listen_port=51820,
        peers=(
            PeerWrite(X, endpoint="[fd00::1]:51820", keepalive_s=25, replace_allowed_ips=True,
                      allowed_ips=(NODE_X,)),
            PeerWrite(Y, update_only=True, allowed_ips=(VM,)),
            PeerWrite(Z, remove=True),
        ),
    )  # fmt: skip
    assert encode_set(tx) == (
        "set=1\n"
        f"private_key={PRIVATE.hex()}\n"
        "listen_port=51820\n"
        f"public_key={X.hex()}\n"
        "endpoint=[fd00::1]:51820\n"
        "persistent_keepalive_interval=25\n"
        "replace_allowed_ips=true\n"
        f"allowed_ip={NODE_X}\n"
        f"public_key={Y.hex()}\n"
        "update_only=true\n"
        f"allowed_ip={VM}\n"
        f"public_key={Z.hex()}\n"
        "remove=true\n"
        "\n"
    )


GET_REPLY = (
    f"private_key={PRIVATE.hex()}\nlisten_port=51820\n"
    f"public_key={X.hex()}\npreshared_key={'0' * 64}\nprotocol_version=1\n"
    "endpoint=198.51.100.202:51820\nlast_handshake_time_sec=1700000000\n"
    "last_handshake_time_nsec=500000000\ntx_bytes=1240\nrx_bytes=1116\n"
    "persistent_keepalive_interval=25\nallowed_ip=fd00::2/128\nallowed_ip=198.51.100.0/24\n"
    f"public_key={Y.hex()}\nlast_handshake_time_sec=0\nlast_handshake_time_nsec=0\n"
    "tx_bytes=0\nrx_bytes=0\npersistent_keepalive_interval=0\nerrno=0\n\n"
)


def test_parse_get_reads_a_real_answer():
    status = parse_get(GET_REPLY)
    assert status.public_key == OWN
    assert status.listen_port == 51820
    x, y = status.peers[X], status.peers[Y]
    assert x == PeerStatus(
        X,
        "198.51.100.202:51820",
        nets(ipaddress.ip_network("fd00::2/128"), ipaddress.ip_network("198.51.100.0/24")),
        25,
        1700000000.5,
        1116,
        1240,
    )
    assert (y.endpoint, y.allowed_ips, y.last_handshake) == (None, frozenset(), 0.0)
    assert reply_errno(GET_REPLY) == 0


def test_parse_get_without_private_key_has_no_public_key():
    assert parse_get("listen_port=4000\nerrno=0\n\n") == DeviceStatus(None, 4000, {})
    assert parse_get(f"private_key={'0' * 64}\nerrno=0\n\n").public_key is None


@pytest.mark.parametrize(
    "garbage", ["public_key=zz\n", "listen_port=many\n", f"public_key={X.hex()}\nallowed_ip=x\n"]
)
def test_parse_get_garbage_is_uapi_error(garbage):
    with pytest.raises(UapiError, match="unreadable UAPI line"):
        parse_get(garbage)


# --- fake backend ------------------------------------------------------------------


def test_fake_moves_a_prefix_without_orphaning_it():
    before = two_peers()
    fake = FakeBackend(initial=status_of(before))
    after = _move(before, VM, X, Y)
    fake.apply(diff(fake.read(), after))
    assert fake.read().peers[Y].allowed_ips == nets(NODE_Y, VM)
    assert fake.read().peers[X].allowed_ips == nets(NODE_X)
    assert fake.read().peers[X].rx_bytes == 123  # an update keeps the session's counters
    assert fake.orphaned == set()
    assert len(fake.transactions) == 1
    assert diff(fake.read(), after) == []


def test_fake_swap_orphans_nothing():
    before = DeviceConfig.of(
        PRIVATE, 1, [PeerConfig(X, None, nets(VM)), PeerConfig(Y, None, nets(VM2))]
    )
    after = DeviceConfig.of(
        PRIVATE, 1, [PeerConfig(X, None, nets(VM2)), PeerConfig(Y, None, nets(VM))]
    )
    fake = FakeBackend(initial=status_of(before))
    fake.apply(diff(fake.read(), after))
    assert diff(fake.read(), after) == []
    assert fake.orphaned == set()


def test_fake_detects_a_naive_replace_order(monkeypatch):
    """The orphan check is not vacuous: replacing lists one peer at a time loses the prefix."""

    def naive(changes):
        return Transaction(
            peers=tuple(
                PeerWrite(c.public_key, update_only=True, replace_allowed_ips=True,
                          allowed_ips=tuple(c.allowed_ips))
                for c in changes
            )
        )  # fmt: skip

    monkeypatch.setattr(wgbackend, "transaction", naive)
    before = DeviceConfig.of(
        PRIVATE, 1, [PeerConfig(X, None, nets(VM)), PeerConfig(Y, None, nets(VM2))]
    )
    fake = FakeBackend(initial=status_of(before))
    fake.apply([UpdatePeer(X, allowed_ips=nets(VM2)), UpdatePeer(Y, allowed_ips=nets(VM))])
    assert fake.orphaned == {VM}


def test_fake_follows_wireguard_quirks():
    fake = FakeBackend(initial=DeviceStatus(OWN, 1, {}))
    fake.apply([UpdatePeer(X, keepalive_s=5)])  # update_only: unknown peer is skipped
    fake.apply([AddPeer(PeerConfig(OWN, None, nets(VM)))])  # own key: ignored
    assert fake.read().peers == {}
    fake.apply([AddPeer(_peer(X))])
    new_private = bytes(range(3, 35))
    fake.apply([AddPeer(_peer(public_key_of(new_private))), SetPrivateKey(new_private)])
    assert set(fake.read().peers) == {X}  # the new key's peer is gone, like wireguard-go
    fake.record_traffic(X, 1.7e9, 10, 20)
    assert fake.read().peers[X].last_handshake == 1.7e9
    assert [len(t) for t in fake.transactions] == [1, 1, 1, 2]


# --- property: applying the diff reaches the desired state --------------------------

PEER_KEYS = [bytes([n]) * 32 for n in range(0x50, 0x55)]
PREFIXES = [
    *(ipaddress.ip_network(f"fd12:3456:789a:1::{n}/128") for n in range(1, 6)),
    ipaddress.ip_network("fd12:3456:789a:2::/64"),
    ipaddress.ip_network("198.51.100.0/24"),
    ipaddress.ip_network("198.51.100.7/32"),
]
ENDPOINTS = [None, "198.51.100.201:51820", "198.51.100.202:51821", "[fd00::1]:51820"]
PRIVATE_KEYS = [bytes([n]) * 32 for n in (0x70, 0x71)]


@st.composite
def peers(draw: st.DrawFn) -> list[PeerConfig]:
    keys = draw(st.lists(st.sampled_from(PEER_KEYS), unique=True, max_size=len(PEER_KEYS)))
    owners = draw(st.lists(st.integers(-1, len(keys) - 1), min_size=len(PREFIXES),
                           max_size=len(PREFIXES)))  # fmt: skip
    return [
        PeerConfig(
            key,
            draw(st.sampled_from(ENDPOINTS)),
            frozenset(p for p, owner in zip(PREFIXES, owners, strict=True) if owner == index),
            draw(st.sampled_from([0, 25, 60])),
        )
        for index, key in enumerate(keys)
    ]


@st.composite
def configs(draw: st.DrawFn) -> DeviceConfig:
    return DeviceConfig.of(
        draw(st.sampled_from(PRIVATE_KEYS)), draw(st.sampled_from([0, 51820])), draw(peers())
    )


@st.composite
def statuses(draw: st.DrawFn) -> DeviceStatus:
    if draw(st.booleans()):
        return EMPTY
    return status_of(draw(configs()), handshake=draw(st.sampled_from([0.0, 1.7e9])))


@settings(max_examples=300, deadline=None)
@given(actual=statuses(), desired=configs())
def test_applying_the_diff_reaches_the_desired_state(actual, desired):
    fake = FakeBackend(initial=actual)
    changes = diff(actual, desired)
    fake.apply(changes)
    reached = fake.read()
    assert diff(reached, desired) == []
    assert reached.public_key == public_key_of(desired.private_key)
    assert set(reached.peers) == set(desired.peers)
    for key, want in desired.peers.items():
        got = reached.peers[key]
        assert (got.allowed_ips, got.keepalive_s) == (want.allowed_ips, want.keepalive_s)
        if want.endpoint is not None:
            assert got.endpoint == want.endpoint
    assert fake.orphaned == set()
    assert len(fake.transactions) == (1 if changes else 0)
    assert diff(actual, desired) == changes  # pure: same inputs, same answer


# --- netlink parsing, interface names, purity --------------------------------------


def _netlink_message(peers_attrs: list) -> object:
    from pyroute2.netlink.generic.wireguard import wgmsg

    message = wgmsg()
    message["cmd"], message["version"], message["header"]["type"] = 0, 1, 30
    message["attrs"] = [
        ["WGDEVICE_A_IFNAME", "glx"],
        ["WGDEVICE_A_PRIVATE_KEY", base64.b64encode(PRIVATE)],
        ["WGDEVICE_A_LISTEN_PORT", 51820],
        ["WGDEVICE_A_PEERS", [{"attrs": attrs} for attrs in peers_attrs]],
    ]
    message.encode()
    decoded = wgmsg(message.data)
    decoded.decode()
    return decoded


def _allowed(network: ipaddress.IPv6Network) -> dict:
    return {
        "attrs": [
            ["WGALLOWEDIP_A_FAMILY", 10],
            ["WGALLOWEDIP_A_IPADDR", network.network_address.packed],
            ["WGALLOWEDIP_A_CIDR_MASK", network.prefixlen],
        ]
    }


def test_status_from_netlink_merges_a_peer_split_over_messages():
    first = [
        ["WGPEER_A_PUBLIC_KEY", base64.b64encode(X)],
        ["WGPEER_A_ENDPOINT", {"addr": "fd00::2", "port": 51820}],
        ["WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL", 25],
        ["WGPEER_A_LAST_HANDSHAKE_TIME", {"tv_sec": 1700000000, "tv_nsec": 250000000}],
        ["WGPEER_A_RX_BYTES", 10],
        ["WGPEER_A_TX_BYTES", 20],
        ["WGPEER_A_ALLOWEDIPS", [_allowed(NODE_X)]],
    ]
    continued = [
        ["WGPEER_A_PUBLIC_KEY", base64.b64encode(X)],
        ["WGPEER_A_ALLOWEDIPS", [_allowed(VM)]],
    ]
    status = status_from_netlink([_netlink_message([first]), _netlink_message([continued])])
    assert status == DeviceStatus(
        OWN, 51820, {X: PeerStatus(X, "[fd00::2]:51820", nets(NODE_X, VM), 25, 1.70000000025e9,
                                   10, 20)}
    )  # fmt: skip


def test_interface_names_are_short_valid_and_distinct():
    names = {interface_name(bytes([n]) * 32) for n in range(200)}
    assert len(names) == 200
    for name in names:
        assert len(name) <= 15 and name.startswith("gl") and name.isalnum() and name.islower()
    assert interface_name(X) == interface_name(X)


def test_wgstate_imports_no_io():
    imported = imported_roots(REPO_ROOT / "overlay" / "wgstate.py")
    assert not imported & {"socket", "time", "random", "subprocess", "os", "trio", "asyncio"}


# --- helpers -------------------------------------------------------------------------


def _peer(key: bytes) -> PeerConfig:
    return PeerConfig(key, None, frozenset(), 0)


def _replace(peer: PeerConfig, **fields: object) -> PeerConfig:
    values = {name: getattr(peer, name) for name in PeerConfig.__slots__} | fields
    return PeerConfig(**values)


def _move(config: DeviceConfig, prefix, source: bytes, target: bytes) -> DeviceConfig:
    peers = dict(config.peers)
    peers[source] = _replace(peers[source], allowed_ips=peers[source].allowed_ips - {prefix})
    peers[target] = _replace(peers[target], allowed_ips=peers[target].allowed_ips | {prefix})
    return DeviceConfig(config.private_key, config.listen_port, peers)


def test_a_peer_that_only_gains_prefixes_is_never_trimmed():
    before = two_peers()
    after = _move(before, VM, X, Y)
    changes = diff(status_of(before), after)
    gaining = next(c for c in changes if isinstance(c, UpdatePeer) and c.public_key == Y)
    losing = next(c for c in changes if isinstance(c, UpdatePeer) and c.public_key == X)
    assert not gaining.drops_prefixes and losing.drops_prefixes
    trims = [w.public_key for w in transaction(changes).peers if w.replace_allowed_ips]
    assert trims == [X]
