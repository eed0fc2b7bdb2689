"""Checks on a running testbed swarm, shared by tests, benchmarks and the demo."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from node.runtime.control import ControlError, call
from node.testbed import netns


def rpc(host: dict[str, Any], method: str, **params: Any) -> Any:
    return call(Path(host["socket"]), method, params or None, timeout=5.0)


def wait_for(
    predicate: Callable[[], bool], timeout_s: float, what: str, step_s: float = 0.02
) -> float:
    """Poll until `predicate` holds; return how long it took. A bound, not a timing assertion."""
    start = time.monotonic()
    while True:
        try:
            if predicate():
                return time.monotonic() - start
        except ControlError:
            pass
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(step_s)


def alive_peers(host: dict[str, Any]) -> set[str]:
    return {p["node_id"] for p in rpc(host, "peers") if p["state"] == "alive"}


def full_mesh(hosts: list[dict[str, Any]]) -> bool:
    """Every agent lists every other as alive and has a WireGuard session with it."""
    for host in hosts:
        others = {h["node_id"] for h in hosts if h is not host}
        peers = {p["node_id"]: p for p in rpc(host, "peers")}
        for node_id in others:
            peer = peers.get(node_id)
            if peer is None or peer["state"] != "alive" or not peer["last_handshake"]:
                return False
    return True


def overlay_address(host: dict[str, Any]) -> str:
    return str(rpc(host, "status")["overlay_address"])


def ping(host: dict[str, Any], address: str, count: int = 1) -> bool:
    result = subprocess.run(
        netns.exec_command(host["netns"], ["ping", "-6", "-c", str(count), "-W", "2", address]),
        capture_output=True,
        text=True,
        timeout=30,
    )
    return result.returncode == 0
