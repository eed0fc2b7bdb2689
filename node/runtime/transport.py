"""Agent-to-agent datagrams over the underlay and, once peered, over the overlay.

Two UDP sockets, one policy:

- The **underlay** socket (``network.listen``) reaches nodes we are not yet
  WireGuard peers with: bootstrap joins and the first exchanges with a newly
  discovered node. Nothing authenticates these packets, so every underlay frame
  must carry a valid signature by its sender; unsigned ones are dropped and
  counted.
- The **overlay** socket is bound to this node's overlay address. WireGuard
  authenticates and encrypts what arrives there, and its cryptokey routing
  guarantees that a packet whose source is node N's overlay address came from N.
  So overlay frames are unsigned, and the transport checks that the claimed
  sender's overlay address *is* the packet's source.

``send`` uses the overlay when the peer has a live WireGuard session (the
reconciler reports handshakes), else the underlay.

Frames that fail any check raise nothing upward: they are counted per source
address and dropped.
"""

from __future__ import annotations

import ipaddress
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from node.base.identity import Identity, NodeId
from node.base.records import parse_endpoint
from node.base.wire import (
    Envelope,
    MessageType,
    RemoteProtocolError,
    decode_frame,
    encode_frame,
)
from overlay.addressing import node_address

log = logging.getLogger("gleaner.transport")

RECV_BUFFER = 65536
REPLAY_WINDOW = 64
MAX_TRACKED_SENDERS = 65536
UNDERLAY = "underlay"
OVERLAY = "overlay"

Deliver = Callable[[Envelope, str, tuple[str, int]], Awaitable[None]]


@dataclass
class TransportStatistics:
    frames_in: Counter[str] = field(default_factory=Counter)
    frames_out: Counter[str] = field(default_factory=Counter)
    protocol_errors: Counter[str] = field(default_factory=Counter)
    send_errors: int = 0
    receive_errors: int = 0  # the socket said no (an ICMP error, a full buffer): we go on
    handler_errors: Counter[str] = field(default_factory=Counter)  # by message type: a bug

    @property
    def protocol_errors_total(self) -> int:
        return sum(self.protocol_errors.values())


class ReplayWindow:
    """Anti-replay for signed underlay frames: a 64-frame sliding window per sender.

    As in IPsec and WireGuard: a seq above the highest seen moves the window; a
    seq inside it is accepted once; anything older than the window is refused.
    """

    def __init__(self) -> None:
        self._windows: dict[NodeId, tuple[int, int]] = {}

    def accept(self, sender: NodeId, seq: int) -> bool:
        highest, bitmap = self._windows.get(sender, (-1, 0))
        if seq > highest:
            # A jump beyond the window (a restarted sender's seq carries its boot
            # counter in the high 32 bits) clears it; shifting by the jump itself
            # would build an integer of up to 2^64 bits.
            shift = seq - highest
            if highest < 0 or shift >= REPLAY_WINDOW:
                bitmap = 1
            else:
                bitmap = ((bitmap << shift) | 1) & ((1 << REPLAY_WINDOW) - 1)
            self._store(sender, seq, bitmap)
            return True
        offset = highest - seq
        if offset >= REPLAY_WINDOW or bitmap & (1 << offset):
            return False
        self._store(sender, highest, bitmap | (1 << offset))
        return True

    def _store(self, sender: NodeId, highest: int, bitmap: int) -> None:
        self._windows.pop(sender, None)
        if len(self._windows) >= MAX_TRACKED_SENDERS:
            del self._windows[next(iter(self._windows))]  # least recently active
        self._windows[sender] = (highest, bitmap)


class Transport:
    def __init__(self, identity: Identity, swarm_id: str, listen: str, boot: int) -> None:
        self.identity = identity
        self.swarm_id = swarm_id
        self.listen = listen
        self.stats = TransportStatistics()
        self.underlay: trio.socket.SocketType | None = None
        self.overlay: trio.socket.SocketType | None = None
        self.underlay_address: tuple[str, int] = ("", 0)
        self.port = 0
        self._boot = boot
        self._counter = 0
        self.replay = ReplayWindow()

    async def open_underlay(self) -> None:
        host, _, port = self.listen.rpartition(":")
        host = host.strip("[]")
        family = trio.socket.AF_INET6 if ":" in host else trio.socket.AF_INET
        sock = trio.socket.socket(family, trio.socket.SOCK_DGRAM)
        try:
            await sock.bind((host, int(port)))
        except OSError as exc:
            sock.close()
            raise OSError(exc.errno, f"cannot bind underlay {host}:{port}: {exc.strerror}") from exc
        bound = sock.getsockname()
        self.underlay_address = (bound[0], bound[1])
        self.port = bound[1]
        self.underlay = sock

    async def open_overlay(self, address: ipaddress.IPv6Address) -> None:
        """Bind the overlay socket once our overlay address is on the WireGuard link."""
        sock = trio.socket.socket(trio.socket.AF_INET6, trio.socket.SOCK_DGRAM)
        try:
            # The address may still be tentative (DAD) for a moment after it was added.
            sock.setsockopt(trio.socket.IPPROTO_IP, 15, 1)  # IP_FREEBIND
            await sock.bind((str(address), self.port))
        except OSError as exc:
            sock.close()
            raise OSError(exc.errno, f"cannot bind overlay [{address}]:{self.port}") from exc
        self.overlay = sock

    def close(self) -> None:
        for sock in (self.underlay, self.overlay):
            if sock is not None:
                sock.close()

    def next_seq(self) -> int:
        """Message seq: high 32 bits the durable boot counter, low 32 a counter in memory."""
        self._counter += 1
        return (self._boot << 32) | (self._counter & 0xFFFFFFFF)

    async def send_underlay(
        self, endpoint: str, msg_type: MessageType, body: dict[str, Any]
    ) -> bool:
        if self.underlay is None:
            return False
        try:
            host, port = parse_endpoint(endpoint)
        except ValueError:
            return False
        frame = encode_frame(self.identity, msg_type, self.next_seq(), body, sign=True)
        return await self._sendto(self.underlay, frame, (host, port), UNDERLAY)

    async def send_overlay(self, node: NodeId, msg_type: MessageType, body: dict[str, Any]) -> bool:
        address = str(node_address(self.swarm_id, node.key))
        return await self.send_overlay_to(address, msg_type, body)

    async def send_overlay_to(
        self, address: str, msg_type: MessageType, body: dict[str, Any]
    ) -> bool:
        if self.overlay is None:
            return False
        frame = encode_frame(self.identity, msg_type, self.next_seq(), body, sign=False)
        return await self._sendto(self.overlay, frame, (address, self.port), OVERLAY)

    async def _sendto(
        self, sock: trio.socket.SocketType, frame: bytes, address: tuple[str, int], via: str
    ) -> bool:
        try:
            await sock.sendto(frame, address)
        except OSError as exc:
            self.stats.send_errors += 1
            log.debug("sending to %s over the %s failed: %s", address, via, exc)
            return False
        self.stats.frames_out[via] += 1
        return True

    async def receive_loop(self, via: str, deliver: Deliver) -> None:
        sock = self.underlay if via == UNDERLAY else self.overlay
        assert sock is not None
        while True:
            try:
                data, source = await sock.recvfrom(RECV_BUFFER)
            except OSError as exc:  # e.g. ECONNREFUSED from an earlier send's ICMP error
                self.stats.receive_errors += 1
                log.debug("%s receive: %s", via, exc)
                continue
            self.stats.frames_in[via] += 1
            origin = (source[0], source[1])
            try:
                envelope = self.check(data, via, origin[0])
            except RemoteProtocolError as exc:
                self.stats.protocol_errors[f"{origin[0]}:{origin[1]}"] += 1
                log.debug("dropped %s frame from %s: %s", via, origin, exc)
                continue
            await self._supervised(deliver, envelope, via, origin)

    async def _supervised(
        self, deliver: Deliver, envelope: Envelope, via: str, origin: tuple[str, int]
    ) -> None:
        """Hand one checked frame on. No frame ends the loop: a handler's failure (a bug
        its input found) is counted by message type and logged, the first of each type
        with its traceback, and the next frame is read."""
        try:
            await deliver(envelope, via, origin)
        except Exception:
            kind = envelope.type.name
            self.stats.handler_errors[kind] += 1
            first = self.stats.handler_errors[kind] == 1
            log.log(
                logging.ERROR if first else logging.DEBUG,
                "handling a %s frame from %s failed (%d so far); the agent goes on",
                kind,
                envelope.sender.short,
                self.stats.handler_errors[kind],
                exc_info=first,
            )

    def check(self, data: bytes, via: str, source_ip: str) -> Envelope:
        envelope = decode_frame(data)
        if envelope.sender == self.identity.node_id:
            raise RemoteProtocolError("frame claims to come from ourselves")
        if via == UNDERLAY:
            if envelope.signature is None:
                raise RemoteProtocolError("unsigned frame on the underlay")
            if not self.replay.accept(envelope.sender, envelope.seq):
                raise RemoteProtocolError(f"replayed frame (seq {envelope.seq})")
        if via == OVERLAY:
            expected = node_address(self.swarm_id, envelope.sender.key)
            if ipaddress.ip_address(source_ip.split("%")[0]) != expected:
                raise RemoteProtocolError("overlay source address does not match the sender")
        return envelope
