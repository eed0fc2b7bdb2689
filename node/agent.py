"""The agent runtime: one trio process, one supervisor nursery, thin edges.

Start-up order: load config → load (or create) keys → open state → bind the
underlay socket → sign and persist our peer record → start services under the
supervisor nursery (control socket, frame receiver, record refresher, signal
watcher). SIGTERM or SIGINT cancels the nursery; every service stops, the
state database is closed cleanly and the control socket is removed.

Frames from peers go through ``wire.decode_frame``; whatever it refuses is
dropped and counted per source address, and the agent carries on.
"""

from __future__ import annotations

import logging
import os
import platform
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import trio

from node import __version__
from node.config import Config
from node.control import ControlServer, RpcError
from node.identity import Identity, load_or_create
from node.records import Capabilities, PeerRecord, RecordBook, decode_record, sign_record
from node.state import State
from node.wire import MessageType, RemoteProtocolError, decode_frame, encode_frame
from overlay.addressing import node_address

log = logging.getLogger("gleaner.agent")

RECV_BUFFER = 65536
RECORD_SEQ_KEY = "record_seq"
BOOT_KEY = "boots"


@dataclass
class Statistics:
    frames_in: int = 0
    frames_out: int = 0
    protocol_errors: Counter[str] = field(default_factory=Counter)

    @property
    def protocol_errors_total(self) -> int:
        return sum(self.protocol_errors.values())


def local_capabilities() -> Capabilities:
    memory_mb = 0
    try:
        memory_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1024 * 1024)
    except (ValueError, OSError):
        pass
    return Capabilities(
        arch=platform.machine() or "unknown",
        vcpus=os.cpu_count() or 1,
        memory_mb=memory_mb,
        kvm=os.path.exists("/dev/kvm"),
        bench_score=0,
    )


class Agent:
    def __init__(self, config: Config, identity: Identity, state: State) -> None:
        self.config = config
        self.identity = identity
        self.state = state
        self.stats = Statistics()
        self.records = RecordBook()
        self.overlay_address = str(node_address(config["node.swarm_id"], identity.node_id.key))
        self.record: PeerRecord | None = None
        self.started_monotonic = time.monotonic()
        self.started_wall = time.time()
        self.listen_address: tuple[str, int] = ("", 0)
        self._boot = 0
        self._send_counter = 0
        self._sock: trio.socket.SocketType | None = None

    # -- lifecycle ---------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._boot = await trio.to_thread.run_sync(self.state.next_counter, BOOT_KEY)
        for blob in await trio.to_thread.run_sync(self.state.peer_records):
            try:
                self.records.offer(decode_record(blob), time.time())
            except RemoteProtocolError:
                continue
        self._sock = await self._bind_underlay()
        await self._refresh_record()
        control = ControlServer(self.config.control_socket, self._rpc)
        self.control = control
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_signals, nursery.cancel_scope)
            await nursery.start(control.serve)
            nursery.start_soon(self._receive_loop)
            nursery.start_soon(self._refresh_record_loop)
            log.info(
                "agent %s up: underlay %s:%d, overlay %s, control %s",
                self.identity.node_id,
                *self.listen_address,
                self.overlay_address,
                self.config.control_socket,
            )
            task_status.started()
        self._sock.close()
        log.info("agent %s stopped", self.identity.node_id.short)

    async def _watch_signals(self, scope: trio.CancelScope) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("received %s, stopping", signal.Signals(signum).name)
                scope.cancel()
                return

    async def _bind_underlay(self) -> trio.socket.SocketType:
        host, _, port = self.config["network.listen"].rpartition(":")
        host = host.strip("[]")
        family = trio.socket.AF_INET6 if ":" in host else trio.socket.AF_INET
        sock = trio.socket.socket(family, trio.socket.SOCK_DGRAM)
        try:
            await sock.bind((host, int(port)))
        except OSError as exc:
            sock.close()
            raise OSError(exc.errno, f"cannot bind underlay {host}:{port}: {exc.strerror}") from exc
        bound = sock.getsockname()
        self.listen_address = (bound[0], bound[1])
        return sock

    # -- our peer record ---------------------------------------------------------

    def advertised_endpoints(self) -> tuple[str, ...]:
        configured = tuple(self.config["network.advertise"])
        if configured:
            return configured
        host, port = self.listen_address
        if host in ("0.0.0.0", "::", ""):
            return ()
        return (f"[{host}]:{port}" if ":" in host else f"{host}:{port}",)

    async def _refresh_record(self) -> None:
        # Persist the new sequence number before the record can leave the process.
        seq = await trio.to_thread.run_sync(self.state.next_counter, RECORD_SEQ_KEY)
        lifetime = self.config["record.lifetime_s"]
        self.record = sign_record(
            self.identity,
            endpoints=self.advertised_endpoints(),
            overlay_address=self.overlay_address,
            capabilities=local_capabilities(),
            version=__version__,
            seq=seq,
            expires=int(time.time()) + lifetime,
        )

    async def _refresh_record_loop(self) -> None:
        while True:
            await trio.sleep(self.config["record.lifetime_s"] / 3)
            await self._refresh_record()

    # -- frames --------------------------------------------------------------------

    def next_seq(self) -> int:
        """Message seq: high 32 bits the durable boot counter, low 32 a counter in memory."""
        self._send_counter += 1
        return (self._boot << 32) | (self._send_counter & 0xFFFFFFFF)

    async def send(
        self, address: tuple[str, int], msg_type: MessageType, body: dict[str, Any]
    ) -> None:
        assert self._sock is not None
        frame = encode_frame(self.identity, msg_type, self.next_seq(), body)
        try:
            await self._sock.sendto(frame, address)
        except OSError as exc:
            log.debug("send %s to %s failed: %s", msg_type.name, address, exc)
            return
        self.stats.frames_out += 1

    async def _receive_loop(self) -> None:
        assert self._sock is not None
        while True:
            data, source = await self._sock.recvfrom(RECV_BUFFER)
            self.stats.frames_in += 1
            peer = f"{source[0]}:{source[1]}"
            try:
                envelope = decode_frame(data)
                await self._dispatch(envelope.type, envelope.body, (source[0], source[1]))
            except RemoteProtocolError as exc:
                self.stats.protocol_errors[peer] += 1
                log.debug("dropped frame from %s: %s", peer, exc)

    async def _dispatch(
        self, msg_type: MessageType, body: dict[str, Any], source: tuple[str, int]
    ) -> None:
        if msg_type is MessageType.PING:
            await self.send(source, MessageType.ACK, {"nonce": body["nonce"]})
        elif msg_type is MessageType.RECORD:
            record = decode_record(body["record"])
            if self.records.offer(record, time.time()):
                await trio.to_thread.run_sync(
                    self.state.save_peer,
                    record.node_id.key,
                    record.seq,
                    record.expires,
                    record.blob,
                )

    # -- control RPC ---------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        record = self.record
        return {
            "node_id": str(self.identity.node_id),
            "short_id": self.identity.node_id.short,
            "name": self.config["node.name"],
            "version": __version__,
            "swarm_id": self.config["node.swarm_id"],
            "pid": os.getpid(),
            "uptime_s": round(time.monotonic() - self.started_monotonic, 3),
            "started_at": self.started_wall,
            "underlay": list(self.advertised_endpoints()),
            "listen": f"{self.listen_address[0]}:{self.listen_address[1]}",
            "overlay_address": self.overlay_address,
            "wireguard_public_key": self.identity.wireguard_public.hex(),
            "peer_count": len(self.records),
            "record_seq": record.seq if record else 0,
            "boot": self._boot,
            "frames_in": self.stats.frames_in,
            "frames_out": self.stats.frames_out,
            "protocol_errors": self.stats.protocol_errors_total,
            "protocol_errors_by_peer": dict(self.stats.protocol_errors.most_common(20)),
            "state_dir": str(self.config.state_dir),
        }

    async def _rpc(self, method: str, params: dict[str, Any]) -> Any:
        if method == "status":
            return self.status()
        if method == "peer_record":
            return self.record.blob if self.record else b""
        raise RpcError(f"unknown method {method!r}")


async def run_agent(
    config: Config, *, task_status: trio.TaskStatus[Agent] = trio.TASK_STATUS_IGNORED
) -> None:
    """Open everything the agent needs, run it until cancelled or signalled, close it all."""
    identity = await trio.to_thread.run_sync(load_or_create, config.state_dir)
    state = await trio.to_thread.run_sync(State, config.state_dir / "state.db")
    try:
        agent = Agent(config, identity, state)
        async with trio.open_nursery() as nursery:
            await nursery.start(agent.run)
            task_status.started(agent)
    finally:
        state.close()
