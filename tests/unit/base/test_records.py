import msgpack
import pytest

from node.base.identity import Identity
from node.base.records import (
    MAX_HOST_VCPUS,
    MAX_STORED_INT,
    RECORD_CONTEXT,
    Capabilities,
    RecordBook,
    decode_record,
    sign_record,
)
from node.base.signed import sign_payload
from node.base.wire import RemoteProtocolError

NOW = 1_800_000_000


def make(identity, seq=1, expires=NOW + 3600, endpoints=("198.51.100.10:7946",)):
    return sign_record(
        identity,
        endpoints=endpoints,
        overlay_address="fd12:3456:789a::1",
        capabilities=Capabilities(vcpus=2, memory_mb=1024),
        version="0.1.0",
        seq=seq,
        expires=expires,
    )


def test_round_trip_keeps_every_field():
    identity = Identity.generate()
    record = make(identity)
    again = decode_record(record.blob)
    assert again == record
    assert again.node_id == identity.node_id
    assert again.wireguard_key == identity.wireguard_public
    assert again.capabilities.vcpus == 2


def test_forged_signature_is_refused():
    record = make(Identity.generate())
    payload, signature = msgpack.unpackb(record.blob)
    forged = bytes([signature[0] ^ 1]) + signature[1:]
    with pytest.raises(RemoteProtocolError, match="signature"):
        decode_record(msgpack.packb([payload, forged]))


def test_record_signed_by_another_key_is_refused():
    victim, attacker = Identity.generate(), Identity.generate()
    payload, _ = msgpack.unpackb(make(victim).blob)
    _, attacker_signature = msgpack.unpackb(make(attacker).blob)
    with pytest.raises(RemoteProtocolError):
        decode_record(msgpack.packb([payload, attacker_signature]))


def test_tampered_payload_is_refused():
    record = make(Identity.generate())
    payload, signature = msgpack.unpackb(record.blob)
    fields = msgpack.unpackb(payload)
    fields["endpoints"] = ["198.51.100.99:7946"]
    with pytest.raises(RemoteProtocolError):
        decode_record(msgpack.packb([msgpack.packb(fields), signature]))


def test_book_refuses_expired_older_and_equivocating_records():
    identity = Identity.generate()
    book = RecordBook()
    assert book.offer(make(identity, seq=5), NOW)
    assert not book.offer(make(identity, seq=5), NOW)  # duplicate: harmless
    with pytest.raises(RemoteProtocolError, match="older"):
        book.offer(make(identity, seq=4), NOW)
    with pytest.raises(RemoteProtocolError, match="different"):
        book.offer(make(identity, seq=5, endpoints=("198.51.100.20:7946",)), NOW)
    with pytest.raises(RemoteProtocolError, match="expired"):
        book.offer(make(identity, seq=6, expires=NOW - 1), NOW)
    assert book.rejected == 3
    assert book.get(identity.node_id).seq == 5
    assert book.offer(make(identity, seq=6), NOW)
    assert book.expire(NOW + 7200) == [identity.node_id]
    assert len(book) == 0


@pytest.mark.parametrize(
    "blob",
    [b"", b"\x90", msgpack.packb([b"x", b"y"]), msgpack.packb([1, 2]), b"\xc1" * 10],
)
def test_garbage_is_a_protocol_error(blob):
    with pytest.raises(RemoteProtocolError):
        decode_record(blob)


def resigned(identity, **changes):
    """A record of `identity` with some fields changed and signed again, as a stranger can."""
    payload, _ = msgpack.unpackb(make(identity).blob)
    fields = msgpack.unpackb(payload)
    for name, value in changes.items():
        if name in fields:
            fields[name] = value
        else:
            fields["caps"][name] = value
    return sign_payload(identity, RECORD_CONTEXT, fields)


@pytest.mark.parametrize(
    "changes",
    [
        {"seq": MAX_STORED_INT + 1},
        {"seq": 2**64 - 1},
        {"expires": MAX_STORED_INT + 1},
        {"seq": True},
        {"vcpus": MAX_HOST_VCPUS + 1},
        {"memory_mb": 2**40},
        {"bench_score": -1},
    ],
)
def test_a_signed_record_with_an_integer_out_of_range_is_refused(changes):
    # seq = 2**63 passed the signature check and then ended the agent in SQLite
    [name] = changes
    with pytest.raises(RemoteProtocolError, match=f"'{name}'"):
        decode_record(resigned(Identity.generate(), **changes))
