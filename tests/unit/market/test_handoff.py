"""The live hand-off's two messages: what they prove by themselves, and what they refuse."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from kit.market import NONCE, NOW
from kit.market import identity as _identity

from node.base.signed import sign_payload
from node.base.wire import RemoteProtocolError
from node.market.handoff import (
    HANDOFF_CONTEXT,
    MAX_CONSOLE_BYTES,
    decode_handed_off,
    decode_handoff,
    sign_handed_off,
    sign_handoff,
)
from node.market.message_fields import MarketRefusal, MarketRefused
from node.market.messages import decode_statement
from node.market.offer_messages import Requirements, Winner, sign_award, sign_offer

OWNER, SOURCE, DEST, STRANGER = (_identity(n) for n in (1, 2, 3, 99))
URI, ADDRESS = "qemu+tcp://198.51.100.4/system", "198.51.100.4"
SPEC = {"kernel": "/k", "initrd": "/i", "serial_log": "/s", "tap": "gt0123"}


def live_offer(source: Any = SOURCE, owner: Any = OWNER, **over: Any):
    fields: dict[str, Any] = dict(
        job_nonce=NONCE, segment=3, attempt=7, image="demo",
        requirements=Requirements(96, 1, network=True), extent_s=20, checkpoint=b"c" * 32,
        checkpoint_size=1, holders=(), k=1, ceiling=10, bid_deadline=NOW + 5,
        source=None if source is None else source.node_id,
    )  # fmt: skip
    fields.update(over)
    return sign_offer(owner, **fields)


def award_for(offer: Any, node: Any = DEST, owner: Any = OWNER):
    return sign_award(owner, offer.ref, (Winner(node.node_id, 5),))


def test_a_handoff_proves_the_owner_sent_this_host_for_this_guest():
    offer = live_offer()
    handoff = decode_handoff(sign_handoff(DEST, offer, award_for(offer), URI, ADDRESS, SPEC).blob)
    assert handoff.host == DEST.node_id and handoff.offer.source == SOURCE.node_id
    assert handoff.award.winner(DEST.node_id) is not None and handoff.spec == SPEC


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (
            lambda o: (live_offer(source=None), award_for(live_offer(source=None))),
            MarketRefusal.MISMATCH,
        ),
        (lambda o: (o, award_for(o, node=DEST)), MarketRefusal.NOT_AWARDED),
        (lambda o: (o, award_for(live_offer(attempt=8))), MarketRefusal.WRONG_AUTHOR),
        (lambda o: (o, award_for(o, owner=STRANGER)), MarketRefusal.WRONG_AUTHOR),
    ],
)
def test_handoffs_the_owner_did_not_authorise_are_refused(make, reason):
    offer, award = make(live_offer())
    fields = {"host": STRANGER.node_id.key, "offer": offer.blob, "award": award.blob}
    fields.update(uri=URI, address=ADDRESS, spec=SPEC)
    blob = sign_payload(STRANGER, HANDOFF_CONTEXT, fields)  # signed, but by a third host
    with pytest.raises(MarketRefused) as refused:
        decode_handoff(blob)
    assert refused.value.reason is reason


def test_malformed_handoffs_and_forged_signatures_are_refused():
    offer = live_offer()
    good = sign_handoff(DEST, offer, award_for(offer), URI, ADDRESS, SPEC).blob
    payload, signature = msgpack.unpackb(good)
    with pytest.raises(MarketRefused) as forged:
        decode_handoff(msgpack.packb([payload, bytes(64)]))
    assert forged.value.reason is MarketRefusal.BAD_SIGNATURE
    for bad_spec in ({"k" * 40: "x"}, {"kernel": 5}, {str(n): "x" for n in range(9)}, []):
        fields = msgpack.unpackb(payload)
        fields["spec"] = bad_spec
        with pytest.raises(RemoteProtocolError):
            decode_handoff(msgpack.packb([msgpack.packb(fields), signature]))
    with pytest.raises(RemoteProtocolError):
        decode_statement(8, good)  # not an owner-side market statement


def test_handed_off_carries_the_console_tail_and_refuses_oversize():
    ref = live_offer().ref
    console = b"x" * (MAX_CONSOLE_BYTES + 10) + b"end"
    handed = decode_handed_off(sign_handed_off(SOURCE, ref, console).blob)
    assert handed.console.endswith(b"end") and len(handed.console) == MAX_CONSOLE_BYTES
    assert handed.error == "" and handed.ref == ref
    failed = decode_handed_off(sign_handed_off(SOURCE, ref, b"", "no route to host").blob)
    assert failed.error == "no route to host"
    payload, signature = msgpack.unpackb(sign_handed_off(SOURCE, ref, b"").blob)
    fields = msgpack.unpackb(payload)
    fields["console"] = "not bytes"
    with pytest.raises(RemoteProtocolError):
        decode_handed_off(msgpack.packb([msgpack.packb(fields), signature]))


@pytest.mark.parametrize(
    ("uri", "address"),
    [
        ("qemu+ssh://h/system?command=/bin/sh", "198.51.100.3"),  # runs what the peer says
        ("qemu+unix:///system?socket=/s&netcat=/bin/sh", "198.51.100.3"),
        ("qemu+unix:///system?socket=relative", "198.51.100.3"),
        ("test:///default", "198.51.100.3"),
        ("qemu+tcp:///system", "198.51.100.3"),  # no host to reach
        ("qemu+tls://h/session", "198.51.100.3"),
        ("qemu+tls://h/system", "not-an-address"),
    ],
)
def test_a_handoff_naming_a_libvirt_a_source_must_not_open_is_refused(uri, address):
    offer = live_offer()
    fields = {"host": DEST.node_id.key, "offer": offer.blob, "award": award_for(offer).blob}
    fields.update(uri=uri, address=address, spec=SPEC)
    with pytest.raises(RemoteProtocolError):
        decode_handoff(sign_payload(DEST, HANDOFF_CONTEXT, fields))
    for good in ("qemu+unix:///system?socket=/run/l/libvirt-sock", "qemu+tls://[fd00::1]/system"):
        fields.update(uri=good, address="198.51.100.3")
        assert decode_handoff(sign_payload(DEST, HANDOFF_CONTEXT, fields)).uri == good
