"""WireGuard device state: the desired config, the reported status, the diff between them.

Theory of operation
-------------------
The agent always hands the data plane the *full* desired state of its WireGuard
device, a ``DeviceConfig``: private key, listen port and every peer. A backend
reports what the device actually holds, a ``DeviceStatus``. ``diff(actual,
desired)`` computes the changes that turn one into the other. It does no I/O,
its output depends only on its inputs (device settings first, then added,
updated and removed peers, each group sorted by key), and it is empty when
nothing differs, so the reconciler can run it on every tick and log each
change's ``describe()``.

Comparison rules:

- The device never reports its private key, only its public key; a
  ``SetPrivateKey`` is due when the desired key's public key differs.
- A desired listen port of 0 means "any port"; the device's choice is kept.
- A desired endpoint of ``None`` means "none configured: learn it from the
  peer's packets", so an endpoint the device learned is not a difference.
  A configured endpoint that differs (the peer roamed) is set again.
- Endpoints are kept in WireGuard's canonical form (``198.51.100.7:51820``,
  ``[fd00::7]:51820``), so equal endpoints compare equal however they were typed.
- Handshake times and byte counters are observations, never differences.

Applying changes: make-before-break
-----------------------------------
On a device, a prefix (allowed IP) belongs to at most one peer. Adding a prefix
to a peer silently takes it from whichever peer held it: no error and no gap.
Replacing a peer's allowed IPs first drops all of them, then adds the new list.
wireguard-go applies a ``set`` transaction line by line, not atomically, so
"replace X's list, then replace Y's list" would leave a prefix moving from X to
Y with no holder in between, and for a swap (X and Y trade prefixes) no order of
replacements is safe.

So **all changes from one diff must go to the device in one apply call**, and
``transaction(changes)`` lowers them to peer writes in three phases:

1. *grow*: every added peer, and every updated peer, is written with its
   complete new allowed-IP list *added* to what it holds: each prefix moves to
   its new holder at once, taken from the old one;
2. *trim*: every peer whose allowed IPs changed is written again with
   ``replace_allowed_ips`` and the same list, which drops what it no longer
   holds (prefixes that moved away already belong to their new holder);
3. *remove*: removed peers go last, after their prefixes have moved.

Between writes, every prefix that is routed both before and after the
transaction has a holder. (Within one trim write, wireguard-go removes the
peer's prefixes and re-inserts the kept ones; that window is inside the daemon,
a few microseconds, and cannot be avoided: this UAPI has no way to remove a
single prefix.) ``FakeBackend`` executes the same writes with the same rules and
checks that no routed prefix ever loses its holder.

Nothing here does I/O; PyNaCl is used only to compute X25519 public keys.
"""

from __future__ import annotations

import base64
import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from nacl.public import PrivateKey

KEY_BYTES = 32
MAX_PORT = 65535
MAX_KEEPALIVE_S = 65535
SHORT_KEY_CHARS = 10

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def short_key(key: bytes) -> str:
    """The first characters of a key's base64 form, as shown in logs."""
    return base64.b64encode(key).decode("ascii")[:SHORT_KEY_CHARS]


def public_key_of(private_key: bytes) -> bytes:
    """The X25519 public key WireGuard derives from `private_key`."""
    return bytes(PrivateKey(private_key).public_key)


def canonical_endpoint(text: str) -> str:
    """``host:port`` as WireGuard prints it; text that is not IP:port is returned as is."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        return text
    try:
        address = ipaddress.ip_address(host.removeprefix("[").removesuffix("]"))
    except ValueError:
        return text
    if address.version == 6:
        return f"[{address}]:{int(port)}"
    return f"{address}:{int(port)}"


def sorted_networks(networks: Iterable[Network]) -> list[Network]:
    """Prefixes in a stable order: IPv4 first, then by address and length."""
    return sorted(networks, key=lambda n: (n.version, int(n.network_address), n.prefixlen))


def _describe_networks(networks: Iterable[Network]) -> str:
    return ", ".join(str(n) for n in sorted_networks(networks)) or "none"


def _check_key(key: bytes, what: str) -> None:
    if len(key) != KEY_BYTES:
        raise ValueError(f"{what} is {KEY_BYTES} bytes, got {len(key)}")


def _check_keepalive(seconds: int) -> None:
    if not 0 <= seconds <= MAX_KEEPALIVE_S:
        raise ValueError(f"keepalive must be 0..{MAX_KEEPALIVE_S} s, got {seconds}")


# --- state -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PeerConfig:
    """One peer as the agent wants it. `keepalive_s` 0 = no persistent keepalive."""

    public_key: bytes
    endpoint: str | None
    allowed_ips: frozenset[Network]
    keepalive_s: int = 0

    def __post_init__(self) -> None:
        _check_key(self.public_key, "a peer's public key")
        _check_keepalive(self.keepalive_s)
        object.__setattr__(self, "allowed_ips", frozenset(self.allowed_ips))
        if self.endpoint is not None:
            object.__setattr__(self, "endpoint", canonical_endpoint(self.endpoint))


@dataclass(frozen=True, slots=True)
class DeviceConfig:
    """The full desired state of one device. `listen_port` 0 = any port."""

    private_key: bytes = field(repr=False)
    listen_port: int
    peers: Mapping[bytes, PeerConfig]

    def __post_init__(self) -> None:
        _check_key(self.private_key, "a private key")
        if not 0 <= self.listen_port <= MAX_PORT:
            raise ValueError(f"listen port must be 0..{MAX_PORT}, got {self.listen_port}")
        own_key = public_key_of(self.private_key)
        holders: dict[Network, bytes] = {}
        for key, peer in self.peers.items():
            if key != peer.public_key:
                raise ValueError(f"peer {short_key(peer.public_key)} filed under {short_key(key)}")
            if key == own_key:
                raise ValueError("a device cannot be its own peer (WireGuard ignores it)")
            for network in peer.allowed_ips:
                if network in holders:
                    raise ValueError(
                        f"{network} is allowed for both {short_key(holders[network])} "
                        f"and {short_key(key)}; a prefix has one holder"
                    )
                holders[network] = key

    @classmethod
    def of(cls, private_key: bytes, listen_port: int, peers: Iterable[PeerConfig]) -> DeviceConfig:
        """A config from a list of peers, filed by public key."""
        return cls(private_key, listen_port, {peer.public_key: peer for peer in peers})


@dataclass(frozen=True, slots=True)
class PeerStatus:
    """One peer as a device reports it. `last_handshake` is Unix seconds, 0 = never."""

    public_key: bytes
    endpoint: str | None
    allowed_ips: frozenset[Network]
    keepalive_s: int
    last_handshake: float
    rx_bytes: int
    tx_bytes: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "allowed_ips", frozenset(self.allowed_ips))
        if self.endpoint is not None:
            object.__setattr__(self, "endpoint", canonical_endpoint(self.endpoint))


@dataclass(frozen=True, slots=True)
class DeviceStatus:
    """What a device holds. `public_key` is None while it has no private key."""

    public_key: bytes | None
    listen_port: int
    peers: Mapping[bytes, PeerStatus]


# --- changes -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SetPrivateKey:
    private_key: bytes = field(repr=False)

    def describe(self) -> str:
        return f"set private key (public key {short_key(public_key_of(self.private_key))})"


@dataclass(frozen=True, slots=True)
class SetListenPort:
    port: int

    def describe(self) -> str:
        return f"set listen port {self.port}"


@dataclass(frozen=True, slots=True)
class AddPeer:
    peer: PeerConfig

    def describe(self) -> str:
        peer = self.peer
        return (
            f"add peer {short_key(peer.public_key)} endpoint {peer.endpoint or 'learned'} "
            f"allowed {_describe_networks(peer.allowed_ips)} keepalive {peer.keepalive_s}s"
        )


@dataclass(frozen=True, slots=True)
class RemovePeer:
    public_key: bytes

    def describe(self) -> str:
        return f"remove peer {short_key(self.public_key)}"


@dataclass(frozen=True, slots=True)
class UpdatePeer:
    """Change an existing peer; a field left None is unchanged.

    `allowed_ips` is the peer's complete new list, not a delta. `drops_prefixes`
    says whether the peer loses any prefix it held; when it only gains, the new
    prefixes are added and nothing is replaced, so its routes never blink.
    """

    public_key: bytes
    endpoint: str | None = None
    allowed_ips: frozenset[Network] | None = None
    keepalive_s: int | None = None
    drops_prefixes: bool = field(default=True, compare=False)

    def __post_init__(self) -> None:
        if self.endpoint is None and self.allowed_ips is None and self.keepalive_s is None:
            raise ValueError("an UpdatePeer must change something")
        if self.keepalive_s is not None:
            _check_keepalive(self.keepalive_s)
        if self.allowed_ips is not None:
            object.__setattr__(self, "allowed_ips", frozenset(self.allowed_ips))
        if self.endpoint is not None:
            object.__setattr__(self, "endpoint", canonical_endpoint(self.endpoint))

    def describe(self) -> str:
        parts = []
        if self.endpoint is not None:
            parts.append(f"endpoint -> {self.endpoint}")
        if self.allowed_ips is not None:
            parts.append(f"allowed -> {_describe_networks(self.allowed_ips)}")
        if self.keepalive_s is not None:
            parts.append(f"keepalive -> {self.keepalive_s}s")
        return f"update peer {short_key(self.public_key)}: {'; '.join(parts)}"


Change = SetPrivateKey | SetListenPort | AddPeer | RemovePeer | UpdatePeer


def describe_changes(changes: Sequence[Change], ifname: str) -> str:
    """A change list as one line for an error message: the first change and a count."""
    if not changes:
        return f"no change on {ifname}"
    more = f" and {len(changes) - 1} more change(s)" if len(changes) > 1 else ""
    return f"{changes[0].describe()}{more} on {ifname}"


# --- diff --------------------------------------------------------------------


def diff(actual: DeviceStatus, desired: DeviceConfig) -> list[Change]:
    """The changes that turn `actual` into `desired`; [] when nothing differs."""
    changes: list[Change] = []
    if actual.public_key != public_key_of(desired.private_key):
        changes.append(SetPrivateKey(desired.private_key))
    if desired.listen_port and actual.listen_port != desired.listen_port:
        changes.append(SetListenPort(desired.listen_port))
    wanted, present = desired.peers.keys(), actual.peers.keys()
    changes.extend(AddPeer(desired.peers[key]) for key in sorted(wanted - present))
    for key in sorted(wanted & present):
        update = _peer_update(actual.peers[key], desired.peers[key])
        if update is not None:
            changes.append(update)
    changes.extend(RemovePeer(key) for key in sorted(present - wanted))
    return changes


def _peer_update(actual: PeerStatus, desired: PeerConfig) -> UpdatePeer | None:
    endpoint = desired.endpoint if desired.endpoint not in (None, actual.endpoint) else None
    allowed_ips = desired.allowed_ips if desired.allowed_ips != actual.allowed_ips else None
    keepalive_s = desired.keepalive_s if desired.keepalive_s != actual.keepalive_s else None
    if endpoint is None and allowed_ips is None and keepalive_s is None:
        return None
    drops = bool(actual.allowed_ips - desired.allowed_ips)
    return UpdatePeer(desired.public_key, endpoint, allowed_ips, keepalive_s, drops)


# --- lowering to device writes -------------------------------------------------


@dataclass(frozen=True, slots=True)
class PeerWrite:
    """One peer section of a device write, as both UAPI and netlink express it.

    Fields left None are not written. `replace_allowed_ips` drops the peer's
    prefixes before `allowed_ips` are added; without it they are added to what
    the peer holds (and taken from any other peer that held them).
    """

    public_key: bytes
    remove: bool = False
    update_only: bool = False
    endpoint: str | None = None
    keepalive_s: int | None = None
    replace_allowed_ips: bool = False
    allowed_ips: tuple[Network, ...] = ()


@dataclass(frozen=True, slots=True)
class Transaction:
    """Everything one apply call writes: device settings first, then peer writes in order."""

    private_key: bytes | None = field(default=None, repr=False)
    listen_port: int | None = None
    peers: tuple[PeerWrite, ...] = ()


def transaction(changes: Sequence[Change]) -> Transaction:
    """Lower `changes` to one transaction: grow, trim, remove (see the module docstring)."""
    private_key: bytes | None = None
    listen_port: int | None = None
    grow: list[PeerWrite] = []
    trim: list[PeerWrite] = []
    remove: list[PeerWrite] = []
    for change in changes:
        if isinstance(change, SetPrivateKey):
            private_key = change.private_key
        elif isinstance(change, SetListenPort):
            listen_port = change.port
        elif isinstance(change, AddPeer):
            peer = change.peer
            grow.append(
                PeerWrite(
                    peer.public_key,
                    endpoint=peer.endpoint,
                    keepalive_s=peer.keepalive_s,
                    replace_allowed_ips=True,  # a new peer holds nothing yet: no gap
                    allowed_ips=tuple(sorted_networks(peer.allowed_ips)),
                )
            )
        elif isinstance(change, UpdatePeer):
            networks = tuple(sorted_networks(change.allowed_ips or ()))
            grow.append(
                PeerWrite(
                    change.public_key,
                    update_only=True,
                    endpoint=change.endpoint,
                    keepalive_s=change.keepalive_s,
                    allowed_ips=networks,
                )
            )
            if change.allowed_ips is not None and change.drops_prefixes:
                trim.append(
                    PeerWrite(
                        change.public_key,
                        update_only=True,
                        replace_allowed_ips=True,
                        allowed_ips=networks,
                    )
                )
        else:
            remove.append(PeerWrite(change.public_key, remove=True))
    return Transaction(private_key, listen_port, (*grow, *trim, *remove))
