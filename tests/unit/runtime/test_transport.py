import pytest
import trio

from node.base.identity import Identity
from node.base.wire import MessageType, RemoteProtocolError, encode_frame
from node.runtime.transport import OVERLAY, UNDERLAY, ReplayWindow, Transport
from overlay.addressing import node_address

SWARM = "t"


def test_replay_window_accepts_each_seq_once_and_refuses_old_ones():
    window = ReplayWindow()
    sender = Identity.generate().node_id
    assert window.accept(sender, 100)
    assert not window.accept(sender, 100)
    assert window.accept(sender, 98)  # reordered, inside the window
    assert not window.accept(sender, 98)
    assert window.accept(sender, 200)
    assert not window.accept(sender, 100)  # fell out of the window
    assert window.accept(sender, 199)


def test_a_restarted_sender_jumps_the_window_without_building_a_huge_bitmap():
    # A restart puts the boot counter in the seq's high 32 bits. Shifting the
    # bitmap by the jump once cost seconds of CPU and half a gigabyte per frame
    # (every agent stalled when a peer restarted); a jump of 2^62 could not fit.
    window = ReplayWindow()
    sender = Identity.generate().node_id
    assert window.accept(sender, (1 << 32) | 5)
    assert window.accept(sender, 1 << 62)
    assert not window.accept(sender, 1 << 62)
    assert not window.accept(sender, (1 << 32) | 6)  # the old boot's frames are history
    assert window.accept(sender, (1 << 62) - 3)  # inside the new window


def test_underlay_requires_signature_and_refuses_replays():
    me, peer = Identity.generate(), Identity.generate()
    transport = Transport(me, SWARM, "127.0.0.1:0", boot=1)
    unsigned = encode_frame(peer, MessageType.PING, 1, {"nonce": 1})
    with pytest.raises(RemoteProtocolError, match="unsigned"):
        transport.check(unsigned, UNDERLAY, "198.51.100.1")
    signed = encode_frame(peer, MessageType.PING, 2, {"nonce": 1}, sign=True)
    assert transport.check(signed, UNDERLAY, "198.51.100.1").sender == peer.node_id
    with pytest.raises(RemoteProtocolError, match="replayed"):
        transport.check(signed, UNDERLAY, "198.51.100.1")


def test_overlay_source_must_be_the_senders_overlay_address():
    me, peer, other = Identity.generate(), Identity.generate(), Identity.generate()
    transport = Transport(me, SWARM, "127.0.0.1:0", boot=1)
    frame = encode_frame(peer, MessageType.PING, 1, {"nonce": 1})
    good = str(node_address(SWARM, peer.node_id.key))
    assert transport.check(frame, OVERLAY, good).sender == peer.node_id
    with pytest.raises(RemoteProtocolError, match="does not match"):
        transport.check(frame, OVERLAY, str(node_address(SWARM, other.node_id.key)))


def test_frames_claiming_to_be_from_us_are_refused():
    me = Identity.generate()
    transport = Transport(me, SWARM, "127.0.0.1:0", boot=1)
    frame = encode_frame(me, MessageType.PING, 1, {"nonce": 1}, sign=True)
    with pytest.raises(RemoteProtocolError, match="ourselves"):
        transport.check(frame, UNDERLAY, "198.51.100.1")


def test_no_frame_ends_the_receive_loop_a_failing_handler_is_counted():
    me, peer = Identity.generate(), Identity.generate()
    transport = Transport(me, SWARM, "127.0.0.1:0", boot=1)
    handled: list[int] = []

    async def deliver(envelope, via, origin) -> None:
        if envelope.seq == 1:
            raise OverflowError("Python int too large to convert to SQLite INTEGER")
        handled.append(envelope.seq)

    async def main() -> None:
        await transport.open_underlay()
        sender = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(transport.receive_loop, UNDERLAY, deliver)
            for seq in (1, 2, 3):
                frame = encode_frame(peer, MessageType.PING, seq, {"nonce": seq}, sign=True)
                await sender.sendto(frame, transport.underlay_address)
            with trio.fail_after(10):
                while len(handled) < 2:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
        sender.close()
        assert transport.underlay is not None
        transport.underlay.close()

    trio.run(main)
    assert handled == [2, 3]
    assert transport.stats.handler_errors == {"PING": 1}
