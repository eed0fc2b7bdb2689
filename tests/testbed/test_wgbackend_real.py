"""The WireGuard control layer against real wireguard-go, in namespaces the test makes.

Each test gets two network namespaces ``glt-<tag>-a`` and ``glt-<tag>-b`` joined
by a veth pair (198.51.100.201/24 and .202/24), one wireguard-go in each with an
overlay address from overlay.addressing (fd00::/8), and configures them through
``UapiBackend`` and ``diff``. The fixture stops the daemons by PID and deletes
the namespaces on every path. No test asserts wall-clock timings.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from node.testbed import netns
from overlay.addressing import node_address, vm_address
from overlay.errors import OverlayError
from overlay.wgstate import (
    AddPeer,
    DeviceConfig,
    PeerConfig,
    RemovePeer,
    UpdatePeer,
    diff,
    public_key_of,
    short_key,
)
from overlay.wireguard.backend import NetlinkBackend, UapiBackend
from overlay.wireguard.process import WireGuardGo, interface_name
from overlay.wireguard.uapi import UapiClient, UapiError

SWARM = "gleaner-wg-test"
PORT = 51820
UNDERLAY = ("198.51.100.201", "198.51.100.202")

needs_wireguard_go = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("wireguard-go") is None,
    reason="needs root and wireguard-go",
)


@dataclass
class Host:
    netns: str
    underlay: str
    node_key: bytes
    private_key: bytes
    daemon: WireGuardGo
    backend: UapiBackend

    @property
    def public_key(self) -> bytes:
        return public_key_of(self.private_key)

    @property
    def overlay(self) -> ipaddress.IPv6Address:
        return node_address(SWARM, self.node_key)

    def as_peer(self, *extra: ipaddress.IPv6Network, keepalive_s: int = 0) -> PeerConfig:
        allowed = frozenset({ipaddress.IPv6Network(f"{self.overlay}/128"), *extra})
        return PeerConfig(self.public_key, f"{self.underlay}:{PORT}", allowed, keepalive_s)

    def config(self, *peers: PeerConfig) -> DeviceConfig:
        return DeviceConfig.of(self.private_key, PORT, peers)

    def converge(self, desired: DeviceConfig) -> list:
        changes = diff(self.backend.read(), desired)
        self.backend.apply(changes)
        return changes

    def ping(self, address: ipaddress.IPv6Address, count: int = 3) -> bool:
        command = ["ping", "-6", "-n", "-c", str(count), "-i", "0.2", "-W", "2", str(address)]
        result = subprocess.run(
            netns.exec_command(self.netns, command), capture_output=True, timeout=30
        )
        return result.returncode == 0


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[Host, Host]]:
    tag = secrets.token_hex(3)
    names = [f"glt-{tag}-a", f"glt-{tag}-b"]
    daemons: list[WireGuardGo] = []
    try:
        for name in names:
            netns.add_namespace(name)
        netns.ip(
            "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", names[1],
            netns=names[0],
        )  # fmt: skip
        hosts = []
        for name, underlay in zip(names, UNDERLAY, strict=True):
            netns.ip("addr", "add", f"{underlay}/24", "dev", "eth0", netns=name)
            netns.ip("link", "set", "eth0", "up", netns=name)
            node_key = os.urandom(32)
            daemon = WireGuardGo(interface_name(node_key), tmp_path / f"{name}.log", netns=name)
            daemons.append(daemon)
            daemon.start()
            host = Host(
                name, underlay, node_key, os.urandom(32), daemon, UapiBackend(daemon.ifname)
            )
            daemon.configure_link(ipaddress.IPv6Interface(f"{host.overlay}/48"))
            hosts.append(host)
        yield hosts[0], hosts[1]
    finally:
        problems = []
        for daemon in daemons:
            try:
                daemon.stop()
            except OverlayError as exc:
                problems.append(str(exc))
        for name in names:
            try:
                netns.delete_namespace(name)
            except netns.NetnsError as exc:
                problems.append(str(exc))
        assert not problems, problems


def peered(pair: tuple[Host, Host], keepalive_s: int = 0) -> tuple[DeviceConfig, DeviceConfig]:
    a, b = pair
    desired_a = a.config(b.as_peer(keepalive_s=keepalive_s))
    desired_b = b.config(a.as_peer(keepalive_s=keepalive_s))
    a.converge(desired_a)
    b.converge(desired_b)
    return desired_a, desired_b


@pytest.mark.netns
@needs_wireguard_go
def test_overlay_ping_handshake_and_counters(pair):
    a, b = pair
    desired_a = a.config(b.as_peer())
    first = diff(a.backend.read(), desired_a)
    assert [type(c).__name__ for c in first] == ["SetPrivateKey", "SetListenPort", "AddPeer"]
    a.backend.apply(first)
    b.converge(b.config(a.as_peer()))

    assert a.ping(b.overlay)

    status = a.backend.read()
    assert status.public_key == a.public_key and status.listen_port == PORT
    peer = status.peers[b.public_key]
    assert peer.last_handshake > 0
    assert peer.rx_bytes > 0 and peer.tx_bytes > 0
    assert peer.endpoint == f"{b.underlay}:{PORT}"
    assert diff(a.backend.read(), desired_a) == []
    assert diff(b.backend.read(), b.config(a.as_peer())) == []


@pytest.mark.netns
@needs_wireguard_go
def test_moving_a_vm_address_to_another_peer(pair):
    a, b = pair
    vm = ipaddress.IPv6Network(f"{vm_address(SWARM, b'job-1')}/128")
    netns.ip("addr", "add", str(vm), "dev", b.daemon.ifname, "nodad", netns=b.netns)
    b.converge(b.config(a.as_peer()))
    elsewhere = PeerConfig(os.urandom(32), None, frozenset({vm}))  # a host with no endpoint
    a.converge(a.config(b.as_peer(), elsewhere))
    assert a.ping(b.overlay)
    assert not a.ping(vm.network_address, count=1)  # routed to a peer that cannot be reached
    rx_before = a.backend.read().peers[b.public_key].rx_bytes

    moved = a.config(b.as_peer(vm), PeerConfig(elsewhere.public_key, None, frozenset()))
    changes = diff(a.backend.read(), moved)
    assert sorted(changes, key=lambda c: c.public_key) == sorted(
        [
            UpdatePeer(b.public_key, allowed_ips=moved.peers[b.public_key].allowed_ips),
            UpdatePeer(elsewhere.public_key, allowed_ips=frozenset()),
        ],
        key=lambda c: c.public_key,
    )
    a.backend.apply(changes)  # one UAPI transaction

    status = a.backend.read()
    assert vm in status.peers[b.public_key].allowed_ips
    assert status.peers[elsewhere.public_key].allowed_ips == frozenset()
    assert status.peers[b.public_key].rx_bytes >= rx_before  # update_only kept the session
    assert diff(status, moved) == []
    assert a.ping(vm.network_address)


@pytest.mark.netns
@needs_wireguard_go
def test_removing_a_peer(pair):
    a, b = pair
    other = PeerConfig(os.urandom(32), "198.51.100.203:51820", frozenset())
    b.converge(b.config(a.as_peer()))
    a.converge(a.config(b.as_peer(), other))
    assert other.public_key in a.backend.read().peers

    desired = a.config(b.as_peer())
    assert a.converge(desired) == [RemovePeer(other.public_key)]
    assert set(a.backend.read().peers) == {b.public_key}
    assert diff(a.backend.read(), desired) == []
    assert a.ping(b.overlay)


@pytest.mark.netns
@needs_wireguard_go
def test_keepalive_update_keeps_the_session(pair):
    a, b = pair
    peered(pair)
    assert a.ping(b.overlay)
    before = a.backend.read().peers[b.public_key]

    desired = a.config(b.as_peer(keepalive_s=25))
    assert a.converge(desired) == [UpdatePeer(b.public_key, keepalive_s=25)]
    after = a.backend.read().peers[b.public_key]
    assert after.keepalive_s == 25
    assert after.last_handshake == before.last_handshake  # no new handshake: session kept
    assert diff(a.backend.read(), desired) == []
    assert a.ping(b.overlay, count=1)


@pytest.mark.netns
@needs_wireguard_go
def test_uapi_errors_carry_context_and_the_daemon_survives(pair):
    a, _ = pair
    with pytest.raises(UapiError, match="adding a malformed key: daemon answered errno=-22") as bad:
        a.backend.client.request("set=1\npublic_key=zz\n\n", "adding a malformed key")
    assert bad.value.errno == -22

    stranger = PeerConfig(os.urandom(32), "nowhere.invalid:51820", frozenset())
    with pytest.raises(UapiError) as failed:
        a.backend.apply([AddPeer(stranger)])
    assert f"add peer {short_key(stranger.public_key)}" in str(failed.value)
    assert a.daemon.ifname in str(failed.value)

    assert a.daemon.is_healthy()
    assert a.backend.read().listen_port > 0
    with pytest.raises(UapiError, match="UAPI socket"):
        UapiClient("glnosuchdev0", timeout_s=1.0).get()


@pytest.mark.netns
@needs_wireguard_go
def test_restart_then_stop(pair):
    a, b = pair
    desired_a, _ = peered(pair)
    assert a.ping(b.overlay)
    first_pid = a.daemon.pid

    a.daemon.restart()
    assert a.daemon.is_healthy()
    assert a.daemon.pid != first_pid
    assert not Path(f"/proc/{first_pid}").exists()
    fresh = a.backend.read()
    assert fresh.public_key is None and fresh.peers == {}  # a new, empty device
    a.daemon.configure_link(ipaddress.IPv6Interface(f"{a.overlay}/48"))
    assert len(a.converge(desired_a)) == 3
    assert a.ping(b.overlay)

    last_pid = a.daemon.pid
    a.daemon.stop()
    assert not a.daemon.is_running() and a.daemon.pid is None
    assert not Path(f"/proc/{last_pid}").exists()
    assert not a.daemon.socket_path.exists()
    a.daemon.stop()  # stopping twice is harmless


@pytest.mark.netns
@needs_wireguard_go
def test_start_refuses_an_interface_name_in_use(pair, tmp_path):
    a, b = pair
    twin = WireGuardGo(a.daemon.ifname, tmp_path / "twin.log", netns=b.netns)
    try:
        with pytest.raises(OverlayError, match="already answers"):
            twin.start()
    finally:
        twin.stop()  # had it wrongly started, it would keep b's namespace alive
    assert a.daemon.is_healthy()


@pytest.mark.netns
@needs_wireguard_go
def test_start_failure_shows_the_log(tmp_path):
    missing = f"glt-{secrets.token_hex(3)}-none"
    daemon = WireGuardGo("glnostart0", tmp_path / "wg.log", netns=missing)
    with pytest.raises(OverlayError, match="exited with") as failed:
        daemon.start()
    assert missing in str(failed.value)  # ip's complaint about the namespace, from the log
    assert not daemon.is_running()
    assert missing not in netns.list_namespaces()


def test_netlink_backend_without_kernel_wireguard_is_a_clear_error():
    if Path("/sys/module/wireguard").exists():
        pytest.skip("this kernel has WireGuard; the absent-module path cannot be shown")
    with pytest.raises(OverlayError, match="kernel WireGuard is not available"):
        NetlinkBackend("glnone0")
