"""WireGuard backends: one small interface, a real adapter per data plane, a fake twin.

Theory of operation
-------------------
The reconciler needs two things from a device: what it holds
(``read() -> DeviceStatus``) and a way to change it (``apply(changes)``), where
`changes` is the whole output of one ``wgstate.diff`` and is applied in one
call (see wgstate on make-before-break). Every backend lowers the changes with
``wgstate.transaction``, so all three write the same peer writes in the same
order:

- ``UapiBackend`` talks to a wireguard-go daemon over its UAPI socket: the
  transaction is one ``set=1`` request.
- ``NetlinkBackend`` talks to kernel WireGuard through pyroute2's generic
  netlink client, which takes one peer per message: a transaction is one
  message for the device settings and one per peer write, in transaction
  order. It is not exercised against a kernel in this lab (no wireguard
  module); its message parsing is tested with encoded messages.
- ``FakeBackend`` keeps a device in memory and executes the writes with
  WireGuard's rules (adding a prefix takes it from its previous holder, a
  replace drops the peer's prefixes first, update_only skips unknown peers, the
  device's own key is ignored as a peer, a new private key removes the peer
  that had its public key). It records every applied change list, and every
  routed prefix that lost its holder between two writes (`orphaned`).

Failures raise ``OverlayError`` (``UapiError`` for UAPI) naming the change and
the interface.
"""

from __future__ import annotations

import base64
import ipaddress
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from overlay.errors import OverlayError
from overlay.wgstate import (
    Change,
    DeviceStatus,
    Network,
    PeerStatus,
    PeerWrite,
    describe_changes,
    public_key_of,
    transaction,
)
from overlay.wireguard.uapi import DEFAULT_TIMEOUT_S, SOCKET_DIR, UapiClient


class WireGuardBackend(Protocol):
    """A WireGuard device the reconciler can read and change."""

    @property
    def name(self) -> str: ...

    def read(self) -> DeviceStatus: ...

    def apply(self, changes: Sequence[Change]) -> None: ...


# --- wireguard-go --------------------------------------------------------------


class UapiBackend:
    """A wireguard-go device, through its UAPI socket."""

    def __init__(
        self, ifname: str, run_dir: Path = SOCKET_DIR, timeout_s: float = DEFAULT_TIMEOUT_S
    ) -> None:
        self.name = ifname
        self.client = UapiClient(ifname, run_dir, timeout_s)

    def read(self) -> DeviceStatus:
        return self.client.get()

    def apply(self, changes: Sequence[Change]) -> None:
        self.client.apply(changes)


# --- kernel WireGuard ------------------------------------------------------------


class NetlinkBackend:
    """A kernel WireGuard device, through pyroute2's generic netlink client.

    Construction reads the device once, so a missing kernel module or interface
    is an ``OverlayError`` at once rather than at the first reconcile.
    """

    def __init__(self, ifname: str) -> None:
        self.name = ifname
        self.read()

    def read(self) -> DeviceStatus:
        with self._netlink(f"reading {self.name}") as wg:
            return status_from_netlink(wg.info(self.name))

    def apply(self, changes: Sequence[Change]) -> None:
        if not changes:
            return
        tx = transaction(changes)
        with self._netlink(describe_changes(changes, self.name)) as wg:
            if tx.private_key is not None or tx.listen_port is not None:
                key = None if tx.private_key is None else base64.b64encode(tx.private_key)
                wg.set(self.name, private_key=key, listen_port=tx.listen_port)
            for write in tx.peers:
                wg.set(self.name, peer=_netlink_peer(write))

    @contextmanager
    def _netlink(self, context: str) -> Iterator[Any]:
        # Imported here: pyroute2 is slow to import and the UAPI path never needs it.
        from pyroute2 import WireGuard
        from pyroute2.netlink.exceptions import NetlinkError
        from pyroute2.netlink.generic import GenericNetlinkSocket

        try:
            # Probe the family first: WireGuard() leaks its socket when its own bind fails.
            with GenericNetlinkSocket() as probe:
                probe.discovery("wireguard")
            wg = WireGuard()
        except NetlinkError as exc:
            raise OverlayError(
                f"{context}: kernel WireGuard is not available (no 'wireguard' generic "
                f"netlink family; is the wireguard module loaded?): {exc}"
            ) from exc
        try:
            yield wg
        except NetlinkError as exc:
            raise OverlayError(f"{context}: netlink error {exc.code}: {exc}") from exc
        except (OSError, ValueError) as exc:
            raise OverlayError(f"{context}: {exc}") from exc
        finally:
            wg.close()


def _netlink_peer(write: PeerWrite) -> dict[str, Any]:
    peer: dict[str, Any] = {"public_key": base64.b64encode(write.public_key)}
    if write.remove:
        return {**peer, "remove": True}
    if write.endpoint is not None:
        host, _, port = write.endpoint.rpartition(":")
        peer["endpoint_addr"] = host.removeprefix("[").removesuffix("]")
        peer["endpoint_port"] = int(port)
    if write.keepalive_s is not None:
        peer["persistent_keepalive"] = write.keepalive_s
    peer["update_only"] = write.update_only
    peer["replace_allowed_ips"] = write.replace_allowed_ips
    if write.allowed_ips or write.replace_allowed_ips:
        peer["allowed_ips"] = [str(network) for network in write.allowed_ips]
    return peer


def status_from_netlink(messages: Iterable[Any]) -> DeviceStatus:
    """A DeviceStatus from pyroute2's decoded WG_CMD_GET_DEVICE dump.

    The kernel splits a large device over several messages; a peer continued in
    the next message repeats its public key, so peers are merged by key.
    """
    public_key: bytes | None = None
    listen_port = 0
    peers: dict[bytes, PeerStatus] = {}
    for message in messages:
        private = message.get_attr("WGDEVICE_A_PRIVATE_KEY")
        if private is not None and base64.b64decode(private) != bytes(32):
            public_key = public_key_of(base64.b64decode(private))
        listen_port = message.get_attr("WGDEVICE_A_LISTEN_PORT") or listen_port
        for attrs in message.get_attr("WGDEVICE_A_PEERS") or ():
            peer = _peer_from_netlink(attrs)
            if peer.public_key in peers:
                earlier = peers[peer.public_key]
                allowed = earlier.allowed_ips | peer.allowed_ips
                peer = PeerStatus(**{**_fields(earlier), "allowed_ips": allowed})
            peers[peer.public_key] = peer
    return DeviceStatus(public_key, listen_port, peers)


def _fields(peer: PeerStatus) -> dict[str, Any]:
    return {name: getattr(peer, name) for name in PeerStatus.__slots__}


def _peer_from_netlink(attrs: Any) -> PeerStatus:
    endpoint = attrs.get_attr("WGPEER_A_ENDPOINT")
    if endpoint is not None and endpoint.get("addr"):
        address = ipaddress.ip_address(endpoint["addr"])
        host = f"[{address}]" if address.version == 6 else str(address)
        endpoint_text: str | None = f"{host}:{endpoint['port']}"
    else:
        endpoint_text = None
    handshake = attrs.get_attr("WGPEER_A_LAST_HANDSHAKE_TIME") or {}
    allowed: set[Network] = {
        ipaddress.ip_network(entry.get("addr"), strict=False)
        for entry in attrs.get_attr("WGPEER_A_ALLOWEDIPS") or ()
        if entry.get("addr")
    }
    return PeerStatus(
        public_key=base64.b64decode(attrs.get_attr("WGPEER_A_PUBLIC_KEY")),
        endpoint=endpoint_text,
        allowed_ips=frozenset(allowed),
        keepalive_s=attrs.get_attr("WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL") or 0,
        last_handshake=handshake.get("tv_sec", 0) + handshake.get("tv_nsec", 0) / 1e9,
        rx_bytes=attrs.get_attr("WGPEER_A_RX_BYTES") or 0,
        tx_bytes=attrs.get_attr("WGPEER_A_TX_BYTES") or 0,
    )


# --- fake twin -----------------------------------------------------------------


@dataclass(slots=True)
class _FakePeer:
    endpoint: str | None = None
    keepalive_s: int = 0
    allowed_ips: set[Network] = field(default_factory=set)
    last_handshake: float = 0.0
    rx_bytes: int = 0
    tx_bytes: int = 0


class FakeBackend:
    """An in-memory device that applies changes with WireGuard's rules."""

    def __init__(self, name: str = "fake0", initial: DeviceStatus | None = None) -> None:
        self.name = name
        self.transactions: list[tuple[Change, ...]] = []
        self.orphaned: set[Network] = set()
        self._public_key: bytes | None = None
        self._listen_port = 0
        self._peers: dict[bytes, _FakePeer] = {}
        if initial is not None:
            self._public_key, self._listen_port = initial.public_key, initial.listen_port
            for key, p in initial.peers.items():
                self._peers[key] = _FakePeer(
                    p.endpoint,
                    p.keepalive_s,
                    set(p.allowed_ips),
                    p.last_handshake,
                    p.rx_bytes,
                    p.tx_bytes,
                )

    def read(self) -> DeviceStatus:
        peers = {
            key: PeerStatus(
                key,
                p.endpoint,
                frozenset(p.allowed_ips),
                p.keepalive_s,
                p.last_handshake,
                p.rx_bytes,
                p.tx_bytes,
            )
            for key, p in self._peers.items()
        }
        return DeviceStatus(self._public_key, self._listen_port, peers)

    def apply(self, changes: Sequence[Change]) -> None:
        if not changes:
            return
        self.transactions.append(tuple(changes))
        tx = transaction(changes)
        if tx.private_key is not None:
            self._public_key = public_key_of(tx.private_key)
            self._peers.pop(self._public_key, None)
        if tx.listen_port is not None:
            self._listen_port = tx.listen_port
        routed_before = self._routed()
        held_between: list[set[Network]] = []
        for write in tx.peers:
            self._write(write)
            held_between.append(self._routed())
        routed_throughout = routed_before & self._routed()
        for held in held_between:
            self.orphaned |= routed_throughout - held

    def record_traffic(
        self, public_key: bytes, last_handshake: float, rx_bytes: int, tx_bytes: int
    ) -> None:
        """Pretend the peer shook hands and moved bytes (for reconciler tests)."""
        peer = self._peers[public_key]
        peer.last_handshake, peer.rx_bytes, peer.tx_bytes = last_handshake, rx_bytes, tx_bytes

    def _routed(self) -> set[Network]:
        return {network for peer in self._peers.values() for network in peer.allowed_ips}

    def _write(self, write: PeerWrite) -> None:
        if write.public_key == self._public_key:
            return
        if write.remove:
            self._peers.pop(write.public_key, None)
            return
        peer = self._peers.get(write.public_key)
        if peer is None:
            if write.update_only:
                return
            peer = self._peers[write.public_key] = _FakePeer()
        if write.endpoint is not None:
            peer.endpoint = write.endpoint
        if write.keepalive_s is not None:
            peer.keepalive_s = write.keepalive_s
        if write.replace_allowed_ips:
            peer.allowed_ips.clear()
        for network in write.allowed_ips:
            for other in self._peers.values():
                other.allowed_ips.discard(network)
            peer.allowed_ips.add(network)
