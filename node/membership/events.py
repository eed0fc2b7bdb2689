"""What goes into the membership core and what comes out of it.

``Membership.handle(event, now)`` takes one ``Event`` (the past tense: something
happened) and ``handle`` and ``tick`` return ``Effect`` s (commands for the agent
or the simulator to carry out, in order). Both are frozen, slotted dataclasses;
the ``Event`` and ``Effect`` unions list every one, so an interpreter can
``match`` them exhaustively.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from node.base.identity import NodeId
from node.base.records import PeerRecord
from node.base.wire import MessageType
from node.membership.table import MemberState

# -- events (inputs) ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MessageReceived:
    """A frame from `sender`, decoded and schema-checked by node.base.wire, arrived via `via`."""

    sender: NodeId
    msg_type: MessageType
    body: dict[str, Any]
    via: str


@dataclass(frozen=True, slots=True)
class RecordDiscovered:
    """A peer record found out of band (mDNS, persisted state)."""

    record: PeerRecord


@dataclass(frozen=True, slots=True)
class JoinRequested:
    endpoints: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class OwnRecordSigned:
    """This node's record, re-signed with a higher seq (persisted before)."""

    record: PeerRecord


@dataclass(frozen=True, slots=True)
class LeaveRequested:
    pass


Event = MessageReceived | RecordDiscovered | JoinRequested | OwnRecordSigned | LeaveRequested


# -- effects (outputs) -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SendMessage:
    """Send to a member; the agent picks overlay or underlay from its record."""

    target: NodeId
    msg_type: MessageType
    body: dict[str, Any]


@dataclass(frozen=True, slots=True)
class SendToEndpoint:
    endpoint: str
    msg_type: MessageType
    body: dict[str, Any]


@dataclass(frozen=True, slots=True)
class ApplyMemberChange:
    """A member changed state, or its record was replaced by a newer one."""

    node_id: NodeId
    state: MemberState
    record: PeerRecord


@dataclass(frozen=True, slots=True)
class RefreshOwnRecord:
    """Persist a seq of at least `min_seq`, re-sign, and answer with OwnRecordSigned."""

    min_seq: int


@dataclass(frozen=True, slots=True)
class DeliverBroadcast:
    topic: str
    key: bytes
    payload: bytes
    sender: NodeId  # the node that passed it on, not necessarily its author


Effect = SendMessage | SendToEndpoint | ApplyMemberChange | RefreshOwnRecord | DeliverBroadcast
