"""A local multi-host swarm: one network namespace per host, joined by a bridge.

Layout for a testbed with tag T and N hosts:

    namespace gl-T-br   bridge br0, one veth port hI per host
    namespace gl-T-hI   eth0 = 198.51.100.(10+I)/24, an agent listening on :7946

The bridge lives in a namespace of its own, so the root namespace gains no link
and no route. Every resource is written to the testbed's state file *before* it
is created, so ``down`` can remove whatever a failed ``up`` left behind; ``down``
stops each agent by the PID it recorded (after checking that the PID still runs
that agent), then deletes the namespaces, which takes their veths with them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from node import netns
from node.control import ControlError, call

DEFAULT_ROOT = Path(os.environ.get("GLEANER_TESTBED_ROOT", "/run/gleaner-testbed"))
UNDERLAY_PREFIX = "198.51.100."
UNDERLAY_BITS = 24
FIRST_HOST_OCTET = 10
AGENT_PORT = 7946
MAX_HOSTS = 200
START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0


class TestbedError(Exception):
    """The testbed could not be brought up, inspected or torn down."""

    __test__ = False  # not a pytest test class


def _tag(root: Path) -> str:
    return hashlib.blake2b(str(root.resolve()).encode(), digest_size=3).hexdigest()


def _state_file(root: Path) -> Path:
    return root / "testbed.json"


def _save(root: Path, state: dict[str, Any]) -> None:
    tmp = _state_file(root).with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, _state_file(root))


def _load(root: Path) -> dict[str, Any] | None:
    try:
        loaded: dict[str, Any] = json.loads(_state_file(root).read_text())
        return loaded
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise TestbedError(f"cannot read {_state_file(root)}: {exc}") from None


def host_config(name: str, state_dir: Path, underlay: str, swarm_id: str) -> str:
    return (
        "[node]\n"
        f'name = "{name}"\n'
        f'state_dir = "{state_dir}"\n'
        f'swarm_id = "{swarm_id}"\n\n'
        "[network]\n"
        f'listen = "{underlay}:{AGENT_PORT}"\n'
        "mdns = false\n"
    )


def up(hosts: int, root: Path = DEFAULT_ROOT) -> list[dict[str, Any]]:
    """Bring up `hosts` hosts with an agent each; return their descriptions."""
    if not 1 <= hosts <= MAX_HOSTS:
        raise TestbedError(f"--hosts must be between 1 and {MAX_HOSTS}, got {hosts}")
    if os.geteuid() != 0:
        raise TestbedError("needs root (network namespaces)")
    if _load(root) is not None:
        raise TestbedError(
            f"a testbed is already up under {root}; run `gleaner testbed down` first"
        )
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    tag = _tag(root)
    state: dict[str, Any] = {"tag": tag, "namespaces": [], "hosts": []}
    _save(root, state)
    try:
        bridge_ns = f"gl-{tag}-br"
        state["namespaces"].append(bridge_ns)
        _save(root, state)
        netns.add_namespace(bridge_ns)
        netns.add_bridge(bridge_ns, "br0")
        for index in range(1, hosts + 1):
            _add_host(root, state, bridge_ns, index)
        for host in state["hosts"]:
            host["node_id"] = _wait_for_agent(host)
        _save(root, state)
    except BaseException:
        down(root)
        raise
    return [describe(host) for host in state["hosts"]]


def _add_host(root: Path, state: dict[str, Any], bridge_ns: str, index: int) -> None:
    name = f"h{index}"
    ns = f"gl-{state['tag']}-{name}"
    underlay = f"{UNDERLAY_PREFIX}{FIRST_HOST_OCTET + index - 1}"
    host_dir = root / "hosts" / name
    host_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    config_path = host_dir / "agent.toml"
    config_path.write_text(
        host_config(name, host_dir / "state", underlay, f"testbed-{state['tag']}")
    )
    host: dict[str, Any] = {
        "name": name,
        "netns": ns,
        "underlay": underlay,
        "dir": str(host_dir),
        "config": str(config_path),
        "socket": str(host_dir / "state" / "control.sock"),
        "pid": None,
    }
    state["namespaces"].append(ns)
    state["hosts"].append(host)
    _save(root, state)
    netns.add_namespace(ns)
    netns.add_veth_to_bridge(bridge_ns, "br0", name, ns, "eth0", f"{underlay}/{UNDERLAY_BITS}")
    start_agent(host)
    _save(root, state)


def start_agent(host: dict[str, Any]) -> int:
    """Start the host's agent inside its namespace; record and return its PID."""
    argv = netns.exec_command(
        host["netns"], [sys.executable, "-m", "node", "agent", "--config", host["config"]]
    )
    with open(Path(host["dir"]) / "agent.log", "ab") as log:
        process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
        )
    # `ip netns exec` execs the command, so this PID is the agent's own.
    host["pid"] = process.pid
    return process.pid


def _wait_for_agent(host: dict[str, Any]) -> str:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if not _is_our_agent(host):
            raise TestbedError(f"agent on {host['name']} exited: {_log_tail(host)}")
        try:
            status = call(Path(host["socket"]), "status", timeout=2.0)
            return str(status["node_id"])
        except ControlError:
            time.sleep(0.05)
    raise TestbedError(f"agent on {host['name']} did not answer within {START_TIMEOUT_S:g} s")


def _log_tail(host: dict[str, Any], lines: int = 3) -> str:
    try:
        text = (Path(host["dir"]) / "agent.log").read_text(errors="replace")
    except OSError:
        return "(no log)"
    return " | ".join(text.strip().splitlines()[-lines:])


def _is_our_agent(host: dict[str, Any]) -> bool:
    """True if the recorded PID is alive and still runs this host's agent."""
    pid = host.get("pid")
    if not pid:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    if stat.rsplit(")", 1)[-1].split()[0] == "Z":
        return False
    return host["config"].encode() in cmdline


def stop_agent(host: dict[str, Any], sig: signal.Signals = signal.SIGTERM) -> bool:
    """Stop the host's agent by its PID; SIGKILL if it outlives the timeout."""
    if not _is_our_agent(host):
        return False
    os.kill(host["pid"], sig)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while time.monotonic() < deadline and _is_our_agent(host):
        time.sleep(0.02)
    if _is_our_agent(host):
        os.kill(host["pid"], signal.SIGKILL)
        while _is_our_agent(host):
            time.sleep(0.02)
    _reap(host["pid"])
    return True


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def down(root: Path = DEFAULT_ROOT) -> dict[str, list[str]]:
    """Stop every agent and delete every namespace the testbed made."""
    state = _load(root)
    removed: dict[str, list[str]] = {"stopped": [], "namespaces": []}
    if state is None:
        return removed
    for host in state["hosts"]:
        if stop_agent(host):
            removed["stopped"].append(host["name"])
    existing = set(netns.list_namespaces())
    for ns in reversed(state["namespaces"]):
        if ns in existing:
            netns.delete_namespace(ns)
            removed["namespaces"].append(ns)
    left = set(state["namespaces"]) & set(netns.list_namespaces())
    if left:
        raise TestbedError(f"namespaces still present after down: {sorted(left)}")
    shutil.rmtree(root / "hosts", ignore_errors=True)
    _state_file(root).unlink()
    return removed


def describe(host: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": host["name"],
        "netns": host["netns"],
        "node_id": host.get("node_id"),
        "underlay": host["underlay"],
        "socket": host["socket"],
        "config": host["config"],
        "pid": host["pid"],
    }


def status(root: Path = DEFAULT_ROOT) -> list[dict[str, Any]]:
    state = _load(root)
    if state is None:
        raise TestbedError(f"no testbed is up under {root}")
    result = []
    for host in state["hosts"]:
        entry = describe(host)
        entry["running"] = _is_our_agent(host)
        result.append(entry)
    return result
