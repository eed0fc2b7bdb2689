"""Signed peer records: who a node is and how to reach it, self-certifying.

Theory of operation
-------------------
A peer record binds a node id (Ed25519 key) to its WireGuard key, underlay
endpoints, overlay address and capabilities. The node signs it; anyone can check
it without asking anyone else, so records travel over any channel (mDNS TXT,
gossip, bootstrap replies).

A record carries a sequence number and an expiry. A node raises its sequence
number every time it re-signs (and persists the new number before the record
leaves the process), so "newest" is well defined. ``RecordBook`` is the sans-IO
keeper of the newest record per node: it accepts a record only if the signature
is good, the record has not expired at ``now``, and its sequence number is
higher than the one it holds. A same-sequence copy of the held record is a
harmless duplicate; a *different* record with the same sequence number is
equivocation and is refused.

Wire form: the signed-statement envelope of ``node.base.signed``,
``msgpack([payload, signature])`` where ``payload`` is the msgpack map of the
fields and the signature covers ``RECORD_CONTEXT + payload``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from node.base.identity import Identity, NodeId
from node.base.signed import bin_field, key_field, open_statement, sign_payload, uint_field
from node.base.wire import RemoteProtocolError, verify_signature

RECORD_CONTEXT = b"gleaner/record/v1\x00"
MAX_ENDPOINTS = 8
MAX_RECORD_BYTES = 2048
WG_KEY_BYTES = 32
# seq and expires are stored in SQLite, whose integers are signed 64-bit: a larger
# one would pass the signature check and then fail the write (OverflowError).
MAX_STORED_INT = 2**63 - 1
MAX_HOST_VCPUS = 4096  # a host, not a guest (offers allow a guest far fewer)
MAX_HOST_MEMORY_MB = 2**32  # 4 PiB
MAX_BENCH_SCORE = 2**32


@dataclass(frozen=True, slots=True)
class Capabilities:
    arch: str = "x86_64"
    vcpus: int = 1
    memory_mb: int = 0
    kvm: bool = False
    bench_score: int = 0

    def to_wire(self) -> dict[str, Any]:
        return {
            "arch": self.arch,
            "vcpus": self.vcpus,
            "memory_mb": self.memory_mb,
            "kvm": self.kvm,
            "bench_score": self.bench_score,
        }


@dataclass(frozen=True, slots=True)
class PeerRecord:
    node_id: NodeId
    wireguard_key: bytes
    endpoints: tuple[str, ...]
    overlay_address: str
    capabilities: Capabilities
    version: str
    seq: int
    expires: int
    wg_port: int = 51820
    signature: bytes = field(default=b"", compare=False)
    blob: bytes = field(default=b"", compare=False, repr=False)

    def is_expired(self, now: float) -> bool:
        return now >= self.expires


def sign_record(
    identity: Identity,
    *,
    endpoints: tuple[str, ...],
    overlay_address: str,
    capabilities: Capabilities,
    version: str,
    seq: int,
    expires: int,
    wg_port: int = 51820,
) -> PeerRecord:
    """Make and sign this node's record. The caller persists `seq` first."""
    payload_map = {
        "node_id": identity.node_id.key,
        "wg_key": identity.wireguard_public,
        "endpoints": list(endpoints),
        "overlay": overlay_address,
        "caps": capabilities.to_wire(),
        "version": version,
        "seq": seq,
        "expires": expires,
        "wg_port": wg_port,
    }
    return decode_record(sign_payload(identity, RECORD_CONTEXT, payload_map))


def decode_record(blob: bytes) -> PeerRecord:
    """Parse a record and check its signature. Raises RemoteProtocolError only."""
    what = "peer record"
    payload, signature, fields = open_statement(blob, what, MAX_RECORD_BYTES)
    node_id = key_field(fields, "node_id", what)
    verify_signature(node_id.key, RECORD_CONTEXT + payload, signature)
    wg_key = bin_field(fields, "wg_key", what, WG_KEY_BYTES)
    endpoints = _get(fields, "endpoints", list)
    if len(endpoints) > MAX_ENDPOINTS or not all(_is_endpoint(e) for e in endpoints):
        raise RemoteProtocolError("peer record endpoints are not host:port strings")
    overlay = _get(fields, "overlay", str)
    if overlay:
        try:
            ipaddress.IPv6Address(overlay)
        except ValueError:
            raise RemoteProtocolError("peer record overlay is not an IPv6 address") from None
    caps = _get(fields, "caps", dict)
    capabilities = Capabilities(
        arch=_get(caps, "arch", str),
        vcpus=uint_field(caps, "vcpus", what, high=MAX_HOST_VCPUS),
        memory_mb=uint_field(caps, "memory_mb", what, high=MAX_HOST_MEMORY_MB),
        kvm=_get(caps, "kvm", bool),
        bench_score=uint_field(caps, "bench_score", what, high=MAX_BENCH_SCORE),
    )
    return PeerRecord(
        node_id=node_id,
        wireguard_key=wg_key,
        endpoints=tuple(endpoints),
        overlay_address=overlay,
        capabilities=capabilities,
        version=_get(fields, "version", str),
        seq=uint_field(fields, "seq", what, high=MAX_STORED_INT),
        expires=uint_field(fields, "expires", what, high=MAX_STORED_INT),
        wg_port=_wg_port(fields),
        signature=signature,
        blob=blob,
    )


def parse_endpoint(text: str) -> tuple[str, int]:
    """Split "198.51.100.1:7946" or "[fd00::1]:7946" into (host, port); ValueError if bad."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit():
        raise ValueError(f"not host:port: {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        ipaddress.IPv6Address(host)
    else:
        ipaddress.IPv4Address(host)
    port = int(port_text)
    if not 0 < port < 65536:
        raise ValueError(f"port out of range: {text!r}")
    return host, port


def _wg_port(fields: dict[str, Any]) -> int:
    return uint_field(fields, "wg_port", "peer record", 1, 65535)


def _is_endpoint(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        parse_endpoint(value)
    except ValueError:
        return False
    return True


def _get(fields: dict[str, Any], name: str, kind: type) -> Any:
    value = fields.get(name)
    ok = type(value) is int if kind is int else isinstance(value, kind)
    if not ok or (type(value) is int and value < 0):
        raise RemoteProtocolError(f"peer record field {name!r} missing or not {kind.__name__}")
    return value


class RecordBook:
    """The newest valid record of every node we know. Sans-IO; time is passed in."""

    def __init__(self) -> None:
        self._records: dict[NodeId, PeerRecord] = {}
        self.rejected = 0

    def offer(self, record: PeerRecord, now: float) -> bool:
        """Keep `record` if it is newer; True if it replaced what we had.

        Raises RemoteProtocolError (and counts it) for an expired, older or
        equivocating record. Signatures were checked by `decode_record`.
        """
        try:
            return self._offer(record, now)
        except RemoteProtocolError:
            self.rejected += 1
            raise

    def _offer(self, record: PeerRecord, now: float) -> bool:
        if record.is_expired(now):
            raise RemoteProtocolError(f"record of {record.node_id.short} expired")
        held = self._records.get(record.node_id)
        if held is not None:
            if record.seq < held.seq:
                raise RemoteProtocolError(
                    f"record of {record.node_id.short} is older (seq {record.seq} < {held.seq})"
                )
            if record.seq == held.seq:
                if record != held:
                    raise RemoteProtocolError(
                        f"two different records of {record.node_id.short} with seq {record.seq}"
                    )
                return False
        self._records[record.node_id] = record
        return True

    def get(self, node_id: NodeId) -> PeerRecord | None:
        return self._records.get(node_id)

    def expire(self, now: float) -> list[NodeId]:
        """Forget expired records; return whose."""
        gone = [node for node, record in self._records.items() if record.is_expired(now)]
        for node in gone:
            del self._records[node]
        return gone

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self) -> Iterator[PeerRecord]:
        return iter(list(self._records.values()))
