"""The desired WireGuard state, computed from membership and routes. Pure.

Theory of operation
-------------------
The device is always handed the *full* desired state; ``wgstate.diff`` decides
what to touch. This module only answers "what should the device look like":

- one peer per member we should be peered with, keyed by its WireGuard key,
  with its first underlay endpoint's host and its record's WireGuard port;
- AllowedIPs of a peer = its node address /128 plus the VM addresses /128 that
  the route table says it holds;
- a record that names our own WireGuard key, or a key another member already
  has, is skipped, and a prefix goes to one holder only: whatever members
  claim, the result is a valid ``DeviceConfig``;
- which members: **all** alive members while the swarm is small (at most
  ``eager_limit``), else only the *active* ones — those we exchanged traffic
  with recently or that hold a route we use. So a node in a 10,000-node swarm
  carries a few dozen peers, not 10,000. The caller tracks activity and passes
  the active set; peers age out of it when idle.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping

from node.base.identity import NodeId
from node.base.records import PeerRecord, parse_endpoint
from overlay.addressing import node_address
from overlay.wgstate import DeviceConfig, PeerConfig, public_key_of

DEFAULT_EAGER_LIMIT = 64
DEFAULT_KEEPALIVE_S = 25


def wireguard_endpoint(record: PeerRecord) -> str | None:
    """The WireGuard endpoint of a member: its first underlay host, its WireGuard port."""
    for endpoint in record.endpoints:
        try:
            host, _ = parse_endpoint(endpoint)
        except ValueError:
            continue
        return f"[{host}]:{record.wg_port}" if ":" in host else f"{host}:{record.wg_port}"
    return None


def desired_device(
    *,
    private_key: bytes,
    listen_port: int,
    swarm_id: str,
    members: Iterable[PeerRecord],
    routes: Mapping[NodeId, frozenset[ipaddress.IPv6Network]],
    active: frozenset[NodeId] = frozenset(),
    eager_limit: int = DEFAULT_EAGER_LIMIT,
    keepalive_s: int = DEFAULT_KEEPALIVE_S,
) -> DeviceConfig:
    own_key = public_key_of(private_key)
    candidates = sorted(
        (r for r in members if wireguard_endpoint(r) is not None and r.wireguard_key != own_key),
        key=lambda record: record.node_id,
    )
    eager = len(candidates) <= eager_limit
    peers: dict[bytes, PeerConfig] = {}
    taken: set[ipaddress.IPv6Network] = set()
    for record in candidates:
        if not eager and record.node_id not in active and record.node_id not in routes:
            continue
        if record.wireguard_key in peers:
            continue  # a second node claiming a WireGuard key already in use: first one keeps it
        own = ipaddress.IPv6Network((node_address(swarm_id, record.node_id.key), 128))
        prefixes = {own, *routes.get(record.node_id, frozenset())} - taken
        taken |= prefixes
        allowed: frozenset[ipaddress.IPv6Network | ipaddress.IPv4Network] = frozenset(prefixes)
        peers[record.wireguard_key] = PeerConfig(
            public_key=record.wireguard_key,
            endpoint=wireguard_endpoint(record),
            allowed_ips=allowed,
            keepalive_s=keepalive_s,
        )
    return DeviceConfig(private_key=private_key, listen_port=listen_port, peers=peers)
