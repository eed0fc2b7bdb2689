"""The local control socket: msgpack RPC between the CLI and its agent.

A unix stream socket, mode 0600 inside a 0700 directory, so only the agent's
user can reach it. Each message is a 4-byte big-endian length and a msgpack
map. A request is ``{"id": n, "method": str, "params": map}``; the reply is
``{"id": n, "result": …}`` or ``{"id": n, "error": str}``. One connection may
carry many requests. A malformed request closes that connection and is
counted; a request whose handler fails unexpectedly is answered with an
"internal error", logged with its traceback and counted. Either way the agent
carries on: this is the supervisor of local requests.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import struct
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgpack
import trio

from node.base.wire import RemoteProtocolError

log = logging.getLogger("gleaner.control")

MAX_CONTROL_FRAME = 4 * 1024 * 1024
_LENGTH = struct.Struct(">I")

Handler = Callable[[str, dict[str, Any]], Awaitable[Any]]
RpcMethod = Callable[[dict[str, Any]], Awaitable[Any]]


class ControlError(Exception):
    """The control request failed: no agent, a broken reply, or an error from the agent."""


class RpcError(Exception):
    """Raised by a handler to send a clean error message to the client."""


class RpcTable:
    """The control socket's dispatch table: method name -> handler of its params.

    Each side of the agent registers the methods it serves (node/runtime/node_rpc.py,
    node/runtime/market_rpc.py); the table is the ``ControlServer``'s handler.
    """

    def __init__(self) -> None:
        self.methods: dict[str, RpcMethod] = {}

    def register(self, name: str, method: RpcMethod) -> None:
        if name in self.methods:
            raise ValueError(f"control method {name!r} is registered twice")
        self.methods[name] = method

    async def __call__(self, method: str, params: dict[str, Any]) -> Any:
        handler = self.methods.get(method)
        if handler is None:
            raise RpcError(f"unknown method {method!r}")
        return await handler(params)


def param(params: dict[str, Any], name: str, kind: type) -> Any:
    """``params[name]``, which must be a ``kind``; an ``RpcError`` naming it if not."""
    value = params.get(name)
    if not isinstance(value, kind):
        raise RpcError(f"parameter {name!r} must be {kind.__name__}")
    return value


def _encode(message: dict[str, Any]) -> bytes:
    payload: bytes = msgpack.packb(message, use_bin_type=True)
    return _LENGTH.pack(len(payload)) + payload


def _decode(payload: bytes) -> dict[str, Any]:
    try:
        message = msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise RemoteProtocolError(f"malformed control message: {exc}") from None
    if not isinstance(message, dict):
        raise RemoteProtocolError("control message is not a map")
    return message


class ControlServer:
    def __init__(self, path: Path, handler: Handler) -> None:
        self.path = path
        self.handler = handler
        self.bad_requests = 0
        self.requests = 0
        self.internal_errors = 0

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if self.path.is_socket() or self.path.exists():
            self.path.unlink()
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # Bound in a private folder, made owner-only, then moved into place: no moment
        # when others may connect, and no process-wide umask change (other threads
        # create files meanwhile).
        private = Path(tempfile.mkdtemp(prefix=".ctl-", dir=self.path.parent))
        try:
            await sock.bind(str(private / "s"))
            os.chmod(private / "s", 0o600)
            os.rename(private / "s", self.path)
        finally:
            shutil.rmtree(private, ignore_errors=True)
        sock.listen(16)
        listener = trio.SocketListener(sock)
        try:
            async with trio.open_nursery() as nursery:
                task_status.started()
                await trio.serve_listeners(
                    self._serve_connection, [listener], handler_nursery=nursery
                )
        finally:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass

    async def _serve_connection(self, stream: trio.SocketStream) -> None:
        async with stream:
            try:
                while True:
                    payload = await _receive(stream)
                    if payload is None:
                        return
                    await stream.send_all(self._encode_reply(await self._answer(_decode(payload))))
            except RemoteProtocolError:
                self.bad_requests += 1
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    def _encode_reply(self, reply: dict[str, Any]) -> bytes:
        """The reply's frame; one that msgpack cannot carry (an integer past 64 bits, an
        object) becomes an internal error for that request, not the end of the server."""
        try:
            return _encode(reply)
        except (OverflowError, TypeError, ValueError) as exc:
            self.internal_errors += 1
            log.error("control reply %r cannot be encoded: %r", reply.get("id"), exc)
            return _encode({"id": reply.get("id"), "error": f"internal error: reply: {exc!r}"})

    async def _answer(self, request: dict[str, Any]) -> dict[str, Any]:
        request_id = request.get("id")
        method = request.get("method")
        params = request.get("params", {})
        if not isinstance(method, str) or not isinstance(params, dict):
            raise RemoteProtocolError("request lacks a method name or params map")
        self.requests += 1
        try:
            return {"id": request_id, "result": await self.handler(method, params)}
        except RpcError as exc:
            return {"id": request_id, "error": str(exc)}
        except Exception as exc:  # the request supervisor: one bad request never stops the agent
            self.internal_errors += 1
            log.exception("control request %r failed", method)
            return {"id": request_id, "error": f"internal error in {method}: {exc!r}"}


async def _receive(stream: trio.SocketStream) -> bytes | None:
    header = await _receive_exactly(stream, _LENGTH.size)
    if header is None:
        return None
    (length,) = _LENGTH.unpack(header)
    if length > MAX_CONTROL_FRAME:
        raise RemoteProtocolError(f"control frame of {length} bytes is too large")
    payload = await _receive_exactly(stream, length)
    if payload is None:
        raise RemoteProtocolError("connection closed inside a control frame")
    return payload


async def _receive_exactly(stream: trio.SocketStream, size: int) -> bytes | None:
    buffer = bytearray()
    while len(buffer) < size:
        chunk = await stream.receive_some(size - len(buffer))
        if not chunk:
            return None
        buffer += chunk
    return bytes(buffer)


def call(
    path: Path, method: str, params: dict[str, Any] | None = None, timeout: float = 10.0
) -> Any:
    """Blocking RPC for the CLI: one request, one reply."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except FileNotFoundError:
            raise ControlError(
                f"no agent control socket at {path} (is the agent running?)"
            ) from None
        except ConnectionRefusedError:
            raise ControlError(f"agent at {path} refused the connection (stale socket?)") from None
        except PermissionError:
            raise ControlError(f"no permission to use {path} (run as the agent's user)") from None
        try:
            sock.sendall(_encode({"id": 1, "method": method, "params": params or {}}))
            header = _recv_exactly(sock, _LENGTH.size)
            (length,) = _LENGTH.unpack(header)
            if length > MAX_CONTROL_FRAME:
                raise ControlError("agent sent an oversized reply")
            reply = _decode(_recv_exactly(sock, length))
        except TimeoutError:
            raise ControlError(f"agent at {path} did not answer within {timeout:g} s") from None
        except (OSError, RemoteProtocolError) as exc:
            raise ControlError(f"talking to agent at {path}: {exc}") from None
    if "error" in reply:
        raise ControlError(str(reply["error"]))
    return reply.get("result")


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    buffer = bytearray()
    while len(buffer) < size:
        chunk = sock.recv(size - len(buffer))
        if not chunk:
            raise ControlError("agent closed the connection")
        buffer += chunk
    return bytes(buffer)
