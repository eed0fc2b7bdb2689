"""How a job's spec and snapshot are written to the owner's state database.

Both are msgpack maps of plain fields, keyed by name so a later version can add
fields; node ids are their 32-byte keys. They are our own records, read back
only by the node that wrote them, but a corrupt or foreign row still gets a
clear error (``JobRecordError``) rather than a crash half-way through start-up.

Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import msgpack

from node.base.identity import NodeId
from node.market.jobs import JobSnapshot, JobSpec, JobSpecError
from node.market.offer_messages import Work


class JobRecordError(ValueError):
    """A stored job row cannot be read back; the message says which and why."""


def encode_spec(spec: JobSpec) -> bytes:
    fields = asdict(spec)
    fields["owner"] = spec.owner.key
    return bytes(msgpack.packb(fields, use_bin_type=True))


def decode_spec(blob: bytes) -> JobSpec:
    fields = _unpack(blob, "job spec")
    try:
        fields["owner"] = NodeId(fields["owner"])
        if fields.get("work") is not None:
            fields["work"] = Work(**fields["work"])
        return JobSpec(**fields)
    except (KeyError, TypeError, ValueError, JobSpecError) as exc:
        raise JobRecordError(f"stored job spec: {exc}") from None


def encode_snapshot(snapshot: JobSnapshot) -> bytes:
    fields = asdict(snapshot)
    fields["holders"] = [node.key for node in snapshot.holders]
    fields["last_winner"] = snapshot.last_winner.key if snapshot.last_winner else None
    return bytes(msgpack.packb(fields, use_bin_type=True))


def decode_snapshot(blob: bytes) -> JobSnapshot:
    fields = _unpack(blob, "job snapshot")
    try:
        fields["holders"] = tuple(NodeId(key) for key in fields["holders"])
        winner = fields.get("last_winner")
        fields["last_winner"] = NodeId(winner) if winner is not None else None
        return JobSnapshot(**fields)
    except (KeyError, TypeError, ValueError) as exc:
        raise JobRecordError(f"stored job snapshot: {exc}") from None


def encode_history(row: dict[str, Any]) -> bytes:
    """One step of a job's history (see node/runtime/market_owner.py ``_record``)."""
    return bytes(msgpack.packb(row, use_bin_type=True))


def decode_history(blob: bytes) -> dict[str, Any]:
    row = _unpack(blob, "job history row")
    if not isinstance(row.get("what"), str) or not isinstance(row.get("t"), (int, float)):
        raise JobRecordError("stored job history row lacks its 'what' or 't'")
    return row


def _unpack(blob: bytes, what: str) -> dict[str, Any]:
    try:
        fields = msgpack.unpackb(blob, raw=False, strict_map_key=True)
    except (ValueError, msgpack.UnpackException) as exc:
        raise JobRecordError(f"stored {what} is not msgpack: {exc}") from None
    if not isinstance(fields, dict):
        raise JobRecordError(f"stored {what} is not a map")
    return fields
