import msgpack
import pytest
from hypothesis import HealthCheck, given
from hypothesis import strategies as st
from kit.fuzzing import edit_lists, fuzz_settings, mutate, valid_frames

from node.base.identity import Identity
from node.base.wire import (
    MAX_DEPTH,
    MAX_FRAME_BYTES,
    PROTOCOL_VERSION,
    LocalProtocolError,
    MessageType,
    RemoteProtocolError,
    decode_frame,
    encode_frame,
)

IDENTITY = Identity.from_seeds(bytes(range(32)), bytes(range(1, 33)))


def test_nack_round_trip():
    envelope = decode_frame(encode_frame(IDENTITY, MessageType.NACK, 8, {"nonce": 2**62}))
    assert envelope.type is MessageType.NACK and envelope.body == {"nonce": 2**62}
    with pytest.raises(LocalProtocolError):
        encode_frame(IDENTITY, MessageType.NACK, 9, {"nonce": "x"})


def test_round_trip():
    frame = encode_frame(IDENTITY, MessageType.PING, 42, {"nonce": 9, "extra": "kept"})
    envelope = decode_frame(frame)
    assert envelope.type is MessageType.PING
    assert envelope.sender == IDENTITY.node_id
    assert envelope.seq == 42
    assert envelope.body == {"nonce": 9, "extra": "kept"}
    assert envelope.signature is None


def test_signed_round_trip_and_forgery():
    frame = encode_frame(IDENTITY, MessageType.PING, 1, {"nonce": 1}, sign=True)
    assert decode_frame(frame).signature is not None
    items = msgpack.unpackb(frame)
    items[4] = msgpack.packb({"nonce": 2})  # change the body under the signature
    with pytest.raises(RemoteProtocolError, match="bad signature"):
        decode_frame(msgpack.packb(items))
    items = msgpack.unpackb(frame)
    items[2] = Identity.generate().node_id.key  # claim another sender
    with pytest.raises(RemoteProtocolError, match="bad signature"):
        decode_frame(msgpack.packb(items))


def _frame(version=PROTOCOL_VERSION, msg_type=1, sender=None, seq=1, body=None, sig=None):
    sender = IDENTITY.node_id.key if sender is None else sender
    body = msgpack.packb({"nonce": 1} if body is None else body)
    return msgpack.packb([version, msg_type, sender, seq, body, sig])


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (b"", "malformed"),
        (_frame()[:-3], "malformed"),
        (_frame() + b"\x00", "malformed"),
        (b"\x00" * (MAX_FRAME_BYTES + 1), "over"),
        (_frame(version=2), "version"),
        (_frame(msg_type=99), "unknown message type"),
        (_frame(msg_type=True), "not an integer"),
        (_frame(sender=b"short"), "32-byte"),
        (_frame(seq=-1), "uint64"),
        (_frame(body={"nonce": "7"}), "expected int"),
        (_frame(body={"nonce": True}), "expected int"),
        (_frame(body={}), "lacks field"),
        (_frame(body=[1]), "not a map"),
        (_frame(sig=b"x" * 10), "64 bytes"),
        (_frame(sig=b"x" * 64), "bad signature"),
        (msgpack.packb([1, 2, 3]), "6 items"),
        (msgpack.packb(msgpack.ExtType(5, b"abc")), "ext"),
        (_frame(body={"nonce": 1, "deep": [[[[[[[1]]]]]]]}), "nesting"),
        (_frame(msg_type=4, body={"record": 5}), "expected bytes"),
        (_frame(msg_type=5, body={"records": [b"ok", 3]}), "holds a int"),
        (_frame(msg_type=10, body={}), "NACK lacks field 'nonce'"),
        (_frame(msg_type=10, body={"nonce": -1.5}), "NACK.nonce is float"),
        (_frame(msg_type=10, body={"nonce": 1, "updates": [1]}), "NACK.updates holds a int"),
        (_frame(msg_type=11), "unknown message type"),
    ],
)
def test_bad_frames_raise_remote_protocol_error(frame, reason):
    with pytest.raises(RemoteProtocolError, match=reason):
        decode_frame(frame)


def test_deep_nesting_limit_is_the_documented_one():
    nested: object = 1
    for _ in range(MAX_DEPTH - 1):
        nested = [nested]
    decode_frame(_frame(body={"nonce": 1, "deep": nested}))  # at the limit: fine
    with pytest.raises(RemoteProtocolError):
        decode_frame(_frame(body={"nonce": 1, "deep": [nested]}))


def test_encoding_a_bad_body_is_our_bug():
    with pytest.raises(LocalProtocolError):
        encode_frame(IDENTITY, MessageType.PING, 1, {"nonce": "x"})
    with pytest.raises(LocalProtocolError):
        encode_frame(IDENTITY, MessageType.PING, -1, {"nonce": 1})


def _decode_only_raises_protocol_error(data: bytes) -> None:
    try:
        decode_frame(data)
    except RemoteProtocolError:
        pass


FUZZ = fuzz_settings(5000, deadline=None, suppress_health_check=list(HealthCheck))


@FUZZ
@given(st.binary(max_size=2048))
def test_fuzz_random_bytes(data):
    _decode_only_raises_protocol_error(data)


@FUZZ
@given(
    st.sampled_from(valid_frames(IDENTITY)),
    edit_lists(max_position=10_000, max_size=8),
)
def test_fuzz_mutated_valid_frames(frame, edits):
    _decode_only_raises_protocol_error(mutate(frame, edits))


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=40),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@fuzz_settings(2000, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    st.integers(-2, 3),
    st.integers(-1, 10),
    st.binary(min_size=30, max_size=34),
    st.integers(-1, 2**64),
    msgpack_values,
    st.none() | st.binary(min_size=63, max_size=65),
)
def test_fuzz_well_formed_msgpack_with_wrong_fields(version, msg_type, sender, seq, body, sig):
    try:
        body_bytes = msgpack.packb(body)
        frame = msgpack.packb([version, msg_type, sender, seq, body_bytes, sig])
    except (OverflowError, ValueError):
        return
    _decode_only_raises_protocol_error(frame)
