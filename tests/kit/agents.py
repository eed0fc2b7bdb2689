"""Real agent processes in the root namespace (loopback only), a PING to them, the root check."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from node.base.identity import Identity
from node.base.wire import MessageType, decode_frame, encode_frame
from node.runtime.control import ControlError, call

ROOT_AGENT_START_S = 20.0


def write_config(
    path: Path, state_dir: Path, *, image_store: Path | None = None, **network: str | bool
) -> Path:
    listen = network.pop("listen", "127.0.0.1:0")
    lines = [
        "[node]",
        f'state_dir = "{state_dir}"',
        "[network]",
        f'listen = "{listen}"',
        "block_port = 0",
        "mdns = false",  # agents in the root namespace never multicast
        "[overlay]",
        "enabled = false",  # and make no WireGuard device there
    ]
    if image_store is not None:  # where `job_submit` finds a job's image
        lines += ["[vm]", f'image_store = "{image_store}"']
    path.write_text("\n".join(lines) + "\n")
    return path


class AgentProcess:
    """A real `gleaner agent` process in the root namespace, on loopback only."""

    def __init__(self, config: Path, state_dir: Path, log: Path) -> None:
        self.config = config
        self.state_dir = state_dir
        self.socket = state_dir / "control.sock"
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> dict:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "node", "agent", "--config", str(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        deadline = time.monotonic() + ROOT_AGENT_START_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(
                    f"agent exited {self.process.returncode}: {self.log.read_text()}"
                )
            try:
                return call(self.socket, "status", timeout=2.0)
            except ControlError:
                time.sleep(0.05)
        self.stop()
        raise AssertionError(f"agent did not answer: {self.log.read_text()}")

    def status(self) -> dict:
        return call(self.socket, "status", timeout=5.0)

    def kill(self, sig: int = signal.SIGKILL) -> int:
        assert self.process is not None
        self.process.send_signal(sig)
        return self.process.wait(timeout=15)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def ping(sock: socket.socket, address: tuple[str, int], nonce: int) -> int:
    """PING the agent at `address` from `sock` and wait for its ACK: the agent handles
    frames in order, so the ACK also means every frame sent before it was handled."""
    identity = Identity.generate()
    sock.settimeout(5)
    sock.sendto(encode_frame(identity, MessageType.PING, 1, {"nonce": nonce}, sign=True), address)
    while True:
        reply = decode_frame(sock.recvfrom(65536)[0])
        if reply.type is MessageType.ACK and reply.body["nonce"] == nonce:
            return nonce


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")
