"""A client of wireguard-go's UAPI: key=value text over /var/run/wireguard/IFNAME.sock.

Theory of operation
-------------------
One request per connection. A request is an operation line (``get=1`` or
``set=1``), for ``set`` followed by key=value lines, and a blank line. The
daemon answers ``errno=N`` and a blank line, after the device's key=value lines
for ``get``. Keys are lowercase hex; a ``public_key=`` line opens a peer
section, and the device keys (``private_key``, ``listen_port``) must come
before the first one.

``encode_set`` and ``parse_get`` are pure; ``UapiClient`` only moves text over
the socket, with a timeout on every socket operation and a deadline on the
whole exchange. ``apply(changes)`` sends the whole ``wgstate.transaction`` as
one ``set=1`` request; updates carry ``update_only=true`` so a peer that is
only changed keeps its session.

What wireguard-go 0.0.20220316 does, measured:

- ``get=1`` prints ``private_key`` but not the device's public key; we derive it.
- A ``set=1`` is applied line by line and stops at the first bad line: lines
  before it **stay applied**. After a ``UapiError`` the caller must read the
  device again before deciding anything.
- A bad line answers ``errno=-22`` (EINVAL); the reason is only in the daemon's
  log. An unknown operation gets no answer at all: the daemon closes the socket.
- A peer whose key is the device's own public key is ignored without an error.
- Turning persistent keepalive on (0 -> N) sends a keepalive at once, so adding
  a peer with a keepalive completes a handshake within a few ms without any
  traffic; changing N -> M sends nothing. ``update_only`` keeps the session.
"""

from __future__ import annotations

import errno as errno_names
import ipaddress
import os
import socket
import time
from collections.abc import Sequence
from pathlib import Path

from overlay.errors import OverlayError
from overlay.wgstate import (
    Change,
    DeviceStatus,
    Network,
    PeerStatus,
    Transaction,
    describe_changes,
    public_key_of,
    transaction,
)

SOCKET_DIR = Path("/var/run/wireguard")
DEFAULT_TIMEOUT_S = 5.0
MAX_REPLY_BYTES = 16 * 1024 * 1024
NO_KEY = bytes(32)


class UapiError(OverlayError):
    """A UAPI request failed: the daemon answered errno != 0, or the socket failed."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


def socket_path(ifname: str, run_dir: Path = SOCKET_DIR) -> Path:
    return run_dir / f"{ifname}.sock"


# --- pure codec ----------------------------------------------------------------


def encode_set(tx: Transaction) -> str:
    """The ``set=1`` request for a transaction, ending in the blank line."""
    lines = ["set=1"]
    if tx.private_key is not None:
        lines.append(f"private_key={tx.private_key.hex()}")
    if tx.listen_port is not None:
        lines.append(f"listen_port={tx.listen_port}")
    for write in tx.peers:
        lines.append(f"public_key={write.public_key.hex()}")
        if write.remove:
            lines.append("remove=true")
            continue
        if write.update_only:
            lines.append("update_only=true")
        if write.endpoint is not None:
            lines.append(f"endpoint={write.endpoint}")
        if write.keepalive_s is not None:
            lines.append(f"persistent_keepalive_interval={write.keepalive_s}")
        if write.replace_allowed_ips:
            lines.append("replace_allowed_ips=true")
        lines.extend(f"allowed_ip={network}" for network in write.allowed_ips)
    return "\n".join(lines) + "\n\n"


class _PeerFields:
    """A peer section being parsed."""

    def __init__(self, public_key: bytes) -> None:
        self.public_key = public_key
        self.endpoint: str | None = None
        self.allowed_ips: set[Network] = set()
        self.keepalive_s = 0
        self.handshake_sec = 0
        self.handshake_nsec = 0
        self.rx_bytes = 0
        self.tx_bytes = 0

    def status(self) -> PeerStatus:
        return PeerStatus(
            self.public_key,
            self.endpoint,
            frozenset(self.allowed_ips),
            self.keepalive_s,
            self.handshake_sec + self.handshake_nsec / 1e9,
            self.rx_bytes,
            self.tx_bytes,
        )


def parse_get(text: str) -> DeviceStatus:
    """The device status in a ``get=1`` answer (its lines before ``errno=``)."""
    public_key: bytes | None = None
    listen_port = 0
    peers: list[_PeerFields] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line or line.startswith("errno="):
            continue
        key, sep, value = line.partition("=")
        try:
            if not sep:
                raise ValueError("no '='")
            if key == "public_key":
                peers.append(_PeerFields(_key(value)))
            elif not peers:
                if key == "private_key":
                    private_key = _key(value)
                    public_key = None if private_key == NO_KEY else public_key_of(private_key)
                elif key == "listen_port":
                    listen_port = int(value)
            else:
                _parse_peer_line(peers[-1], key, value)
        except ValueError as exc:
            raise UapiError(f"unreadable UAPI line {number} {line[:60]!r}: {exc}") from exc
    return DeviceStatus(public_key, listen_port, {p.public_key: p.status() for p in peers})


def _key(value: str) -> bytes:
    key = bytes.fromhex(value)
    if len(key) != len(NO_KEY):
        raise ValueError(f"a key is {len(NO_KEY)} bytes, got {len(key)}")
    return key


def _parse_peer_line(peer: _PeerFields, key: str, value: str) -> None:
    if key == "endpoint":
        peer.endpoint = value
    elif key == "allowed_ip":
        peer.allowed_ips.add(ipaddress.ip_network(value, strict=False))
    elif key == "persistent_keepalive_interval":
        peer.keepalive_s = int(value)
    elif key == "last_handshake_time_sec":
        peer.handshake_sec = int(value)
    elif key == "last_handshake_time_nsec":
        peer.handshake_nsec = int(value)
    elif key == "rx_bytes":
        peer.rx_bytes = int(value)
    elif key == "tx_bytes":
        peer.tx_bytes = int(value)
    # preshared_key, protocol_version and unknown keys: not part of our state


def reply_errno(reply: str) -> int:
    """The N of the reply's ``errno=N`` line."""
    for line in reversed(reply.splitlines()):
        if line.startswith("errno="):
            return int(line.removeprefix("errno="))
    raise ValueError("no errno line")


def _errno_text(code: int) -> str:
    name = errno_names.errorcode.get(abs(code), "?")
    return f"errno={code} ({name}: {os.strerror(abs(code))})"


# --- client ------------------------------------------------------------------


class UapiClient:
    """Talks to one wireguard-go daemon through its UAPI socket."""

    def __init__(
        self, ifname: str, run_dir: Path = SOCKET_DIR, timeout_s: float = DEFAULT_TIMEOUT_S
    ) -> None:
        self.ifname = ifname
        self.path = socket_path(ifname, run_dir)
        self.timeout_s = timeout_s

    def get(self) -> DeviceStatus:
        reply = self.request("get=1\n\n", f"reading device {self.ifname}")
        return parse_get(reply)

    def apply(self, changes: Sequence[Change]) -> None:
        """Apply `changes` as ONE set transaction (see wgstate for the write order)."""
        if not changes:
            return
        self.request(encode_set(transaction(changes)), describe_changes(changes, self.ifname))

    def request(self, body: str, context: str) -> str:
        """Send one request, return the answer; UapiError unless it ends in errno=0."""
        try:
            reply = self._exchange(body.encode("utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            raise UapiError(f"{context}: UAPI socket {self.path}: {exc}") from exc
        try:
            code = reply_errno(reply)
        except ValueError:
            raise UapiError(
                f"{context}: no errno in the answer from {self.path} "
                f"(the daemon closed the socket; see its log)"
            ) from None
        if code != 0:
            raise UapiError(
                f"{context}: daemon answered {_errno_text(code)}; earlier lines of the "
                "request may have taken effect (the reason is in the daemon's log)",
                errno=code,
            )
        return reply

    def _exchange(self, request: bytes) -> str:
        deadline = time.monotonic() + self.timeout_s
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(self.timeout_s)
            sock.connect(str(self.path))
            sock.sendall(request)
            chunks: list[bytes] = []
            received = 0
            while not b"".join(chunks[-2:]).endswith(b"\n\n"):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no complete answer within {self.timeout_s} s")
                sock.settimeout(remaining)
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
                received += len(chunk)
                if received > MAX_REPLY_BYTES:
                    raise OSError(f"answer longer than {MAX_REPLY_BYTES} bytes")
        return b"".join(chunks).decode("utf-8")
