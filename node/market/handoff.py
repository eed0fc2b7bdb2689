"""Live hand-off of a running guest between hosts: the two messages around the migration.

Theory of operation
-------------------
A draining host H runs the sole replica of a network job. It sends the owner a
live WITHDRAW (node/market/messages.py); the owner offers the rest of the segment with
``source`` = H, and awards it to a host D as usual (with D's route grant). Then
the two hosts talk directly::

    D --HANDOFF--> H      "the owner gave me your guest: migrate it to my libvirt
                           at this URI and address, with my kernel, initrd,
                           serial log and tap"
    H --HANDED_OFF--> D   "done (or: failed, why); here is what it printed here"

HANDOFF carries the owner's own signed offer and award, so H needs no other
authority: the offer names H as source, the award names D as a winner of that
very offer, and both are signed by the job's owner. D prepares its tap and
waits for the guest; it claims the guest's address the moment the guest runs
there (make-before-break, as node/runtime/vm_service.py does for operator moves).
HANDED_OFF gives D the console the guest printed on H in this segment, which
D puts in front of its own, so the segment's console is whole when the owner
verifies it.

Wire forms (signed statements, node/base/signed.py)::

    handoff:    by D, "gleaner/handoff/v1\\0", {host: bin32, offer: bin (the live
                offer), award: bin (its award), uri: str (D's libvirt, for the
                migration), address: str (where H's QEMU streams to), spec: {str: str|nil}
                (D's kernel, initrd, serial log and tap; at most 8 entries)}
    handed-off: by H, "gleaner/handed-off/v1\\0", {host: bin32, ref (the live offer's),
                console: bin (at most MAX_CONSOLE_BYTES), error: str ("" if migrated)}

Decoding checks everything a message can prove by itself (signatures, that
award and offer are the same owner's and the same offer, that the sender is
awarded, that the offer is live); whether it fits (is that guest running here?
is this the source we wait for?) is the host market's judgement. Only
``RemoteProtocolError`` (``MarketRefused`` for forgeries) escapes decoding.
Pure: no I/O, no clock.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

from node.base.identity import Identity, NodeId
from node.base.signed import bin_field, decode_own, sign_payload
from node.base.wire import RemoteProtocolError
from node.market.message_fields import (
    MarketRefusal,
    MarketRefused,
    OfferRef,
    open_authored,
    read_ref,
    ref_fields,
)
from node.market.offer_messages import (
    MAX_AWARD_BYTES,
    MAX_OFFER_BYTES,
    Award,
    Offer,
    decode_award,
    decode_offer,
)

HANDOFF_CONTEXT = b"gleaner/handoff/v1\x00"
HANDED_OFF_CONTEXT = b"gleaner/handed-off/v1\x00"
MAX_CONSOLE_BYTES = 48 * 1024  # what one frame carries; a longer console sends its tail
MAX_TEXT_CHARS = 1024
MAX_SPEC_ENTRIES = 8
MIGRATION_SCHEMES = frozenset({"qemu+unix", "qemu+tcp", "qemu+tls"})
MAX_HANDOFF_BYTES = MAX_OFFER_BYTES + MAX_AWARD_BYTES + 6 * 1024
MAX_HANDED_OFF_BYTES = MAX_CONSOLE_BYTES + 2048


@dataclass(frozen=True, slots=True)
class Handoff:
    host: NodeId  # the destination, awarded the live offer
    offer: Offer
    award: Award
    uri: str
    address: str
    spec: dict[str, str | None]
    blob: bytes = field(default=b"", compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class HandedOff:
    host: NodeId  # the source
    ref: OfferRef
    console: bytes
    error: str
    blob: bytes = field(default=b"", compare=False, repr=False)


def sign_handoff(
    host: Identity, offer: Offer, award: Award, uri: str, address: str, spec: dict[str, Any]
) -> Handoff:
    payload = {
        "host": host.node_id.key,
        "offer": offer.blob,
        "award": award.blob,
        "uri": uri,
        "address": address,
        "spec": spec,
    }
    return decode_own(decode_handoff, sign_payload(host, HANDOFF_CONTEXT, payload))


def sign_handed_off(host: Identity, ref: OfferRef, console: bytes, error: str = "") -> HandedOff:
    payload = {
        "host": host.node_id.key,
        **ref_fields(ref),
        "console": console[-MAX_CONSOLE_BYTES:],
        "error": error[:MAX_TEXT_CHARS],
    }
    return decode_own(decode_handed_off, sign_payload(host, HANDED_OFF_CONTEXT, payload))


def decode_handoff(blob: bytes) -> Handoff:
    what = "handoff"
    host, _, fields = open_authored(blob, what, MAX_HANDOFF_BYTES, HANDOFF_CONTEXT, "host")
    offer = decode_offer(bin_field(fields, "offer", what, 1, MAX_OFFER_BYTES))
    award = decode_award(bin_field(fields, "award", what, 1, MAX_AWARD_BYTES))
    if offer.source is None:
        raise MarketRefused(MarketRefusal.MISMATCH, "handoff names an offer that is not live")
    if award.owner != offer.owner or award.ref != offer.ref:
        raise MarketRefused(MarketRefusal.WRONG_AUTHOR, "handoff's award is not for its offer")
    if award.winner(host) is None:
        raise MarketRefused(
            MarketRefusal.NOT_AWARDED, f"{host.short} was not awarded the live offer"
        )
    return Handoff(
        host=host,
        offer=offer,
        award=award,
        uri=check_migration_uri(_text(fields, "uri", what)),
        address=_stream_address(_text(fields, "address", what)),
        spec=_spec(fields.get("spec"), what),
        blob=blob,
    )


def decode_handed_off(blob: bytes) -> HandedOff:
    what = "handed-off"
    host, _, fields = open_authored(blob, what, MAX_HANDED_OFF_BYTES, HANDED_OFF_CONTEXT, "host")
    console = fields.get("console")
    if not isinstance(console, bytes) or len(console) > MAX_CONSOLE_BYTES:
        raise RemoteProtocolError(f"{what} console is not bytes of at most {MAX_CONSOLE_BYTES}")
    error = fields.get("error")
    if not isinstance(error, str) or len(error) > MAX_TEXT_CHARS:
        raise RemoteProtocolError(f"{what} error is not a string of at most {MAX_TEXT_CHARS}")
    return HandedOff(host, read_ref(fields, what), console, error, blob)


def _text(fields: dict[str, Any], name: str, what: str) -> str:
    value = fields.get(name)
    if not isinstance(value, str) or not 0 < len(value) <= MAX_TEXT_CHARS:
        raise RemoteProtocolError(f"{what} {name!r} is not a string of 1..{MAX_TEXT_CHARS}")
    return value


def check_migration_uri(uri: str) -> str:
    """A libvirt URI the source may open for a peer: qemu over unix, tcp or tls to its
    system daemon, and no parameters but a unix socket's path. Others (ssh with its
    ``command``, ``netcat`` or ``keyfile``, or another driver) would run or reach what
    the peer chose, so they are refused."""
    parts = urlsplit(uri)
    if parts.scheme not in MIGRATION_SCHEMES or parts.path != "/system" or parts.fragment:
        raise RemoteProtocolError(f"handoff uri {uri!r} is not qemu+unix/tcp/tls:///system")
    query = parse_qs(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    allowed = {"socket"} if parts.scheme == "qemu+unix" else set()
    if set(query) - allowed or any(len(v) != 1 for v in query.values()):
        raise RemoteProtocolError(f"handoff uri {uri!r} has parameters a source does not take")
    if "socket" in query and not query["socket"][0].startswith("/"):
        raise RemoteProtocolError("handoff uri's socket is not an absolute path")
    if (parts.scheme == "qemu+unix") == bool(parts.netloc):
        raise RemoteProtocolError(f"handoff uri {uri!r} names a host where it must not, or none")
    return uri


def _stream_address(address: str) -> str:
    try:
        ipaddress.ip_address(address)
    except ValueError:
        raise RemoteProtocolError(f"handoff address {address!r} is not an IP address") from None
    return address


def _spec(value: Any, what: str) -> dict[str, str | None]:
    if not isinstance(value, dict) or len(value) > MAX_SPEC_ENTRIES:
        raise RemoteProtocolError(f"{what} spec is not a map of at most {MAX_SPEC_ENTRIES}")
    spec: dict[str, str | None] = {}
    for key, item in value.items():
        if not isinstance(key, str) or len(key) > 32:
            raise RemoteProtocolError(f"{what} spec has a bad key")
        if item is not None and (not isinstance(item, str) or len(item) > MAX_TEXT_CHARS):
            raise RemoteProtocolError(f"{what} spec {key!r} is not a string or nil")
        spec[key] = item
    return spec
