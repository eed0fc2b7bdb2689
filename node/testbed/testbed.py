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

from node.base.host.procs import pid_alive, stop_recorded
from node.runtime.control import ControlError, call
from node.testbed import netns

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


def save_state(root: Path, state: dict[str, Any]) -> None:
    tmp = _state_file(root).with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, _state_file(root))


def load_state(root: Path) -> dict[str, Any] | None:
    try:
        loaded: dict[str, Any] = json.loads(_state_file(root).read_text())
        return loaded
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise TestbedError(f"cannot read {_state_file(root)}: {exc}") from None


def host_config(
    name: str,
    state_dir: Path,
    underlay: str,
    swarm_id: str,
    mdns: bool = True,
    bootstrap: tuple[str, ...] = (),
    libvirt_uri: str = "",
    image_store: str = "",
) -> str:
    """A testbed host's config. Each host keeps its own image library (imported images and
    those taken from other hosts' jobs) in its state folder: only recipe images, the
    swarm's boot images, come from the testbed's shared `image_store`."""
    peers = ", ".join(f'"{endpoint}"' for endpoint in bootstrap)
    vm = "\n[vm]\n"
    vm += f'libvirt_uri = "{libvirt_uri}"\n' if libvirt_uri else ""
    vm += f'image_store = "{image_store}"\n' if image_store else ""
    vm += f'library = "{state_dir / "library"}"\n'
    return (
        "[node]\n"
        f'name = "{name}"\n'
        f'state_dir = "{state_dir}"\n'
        f'swarm_id = "{swarm_id}"\n\n'
        "[network]\n"
        f'listen = "{underlay}:{AGENT_PORT}"\n'
        f"mdns = {'true' if mdns else 'false'}\n"
        f"bootstrap = [{peers}]\n"
        f"{vm}"
        # A testbed host's volunteer is what runs in its own namespace; one busy core
        # of this 2-core machine makes it busy; grace and quiet short enough to watch.
        "\n[policy]\n"
        'scope = "netns"\n'
        "max_other_load = 0.3\n"
        "grace_s = 20.0\n"
        "resume_quiet_s = 2.0\n"
    )


def up(
    hosts: int,
    root: Path = DEFAULT_ROOT,
    *,
    segments: int = 1,
    mdns: bool = True,
    bootstrap: bool = False,
    libvirt: bool = True,
) -> list[dict[str, Any]]:
    """Bring up `hosts` hosts with an agent each; return their descriptions.

    `segments` 2 puts the hosts on two bridges (198.51.100.0/25 and .128/25)
    joined by a router namespace, which multicast does not cross. `bootstrap`
    gives every host the first host's endpoint as its bootstrap list.
    `libvirt` starts a private libvirtd in each host (see testbed_libvirt).
    """
    if not 1 <= hosts <= MAX_HOSTS:
        raise TestbedError(f"--hosts must be between 1 and {MAX_HOSTS}, got {hosts}")
    if segments not in (1, 2):
        raise TestbedError(f"--segments must be 1 or 2, got {segments}")
    if os.geteuid() != 0:
        raise TestbedError("needs root (network namespaces)")
    if load_state(root) is not None:
        raise TestbedError(
            f"a testbed is already up under {root}; run `gleaner testbed down` first"
        )
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    tag = _tag(root)
    state: dict[str, Any] = {
        "tag": tag,
        "swarm_id": f"testbed-{tag}",
        "namespaces": [],
        "hosts": [],
        "vms": {},
        "segments": segments,
        "libvirt": libvirt,
        # One store of recipe images (the swarm's boot images) for the whole testbed,
        # like an image server; each host's image library is its own (host_config).
        "image_store": str(root / "images"),
    }
    save_state(root, state)
    try:
        bridge_ns = _add_namespace(root, state, f"gl-{tag}-br")
        for segment in range(segments):
            netns.add_bridge(bridge_ns, f"br{segment}")
        if segments == 2:
            _add_router(root, state, bridge_ns)
        first = f"{_underlay(1, hosts, segments)[0]}:{AGENT_PORT}"
        for index in range(1, hosts + 1):
            seeds = (first,) if bootstrap and index > 1 else ()
            _add_host(root, state, bridge_ns, index, hosts, mdns, seeds)
        for host in state["hosts"]:
            host["node_id"] = _wait_for_agent(host)
        save_state(root, state)
    except BaseException:
        down(root)
        raise
    return [describe(host) for host in state["hosts"]]


ROUTER_ADDRESSES = ("198.51.100.1", "198.51.100.129")


def _underlay(index: int, hosts: int, segments: int) -> tuple[str, int, int]:
    """(address, prefix length, segment) of host `index` (1-based)."""
    if segments == 1:
        return f"{UNDERLAY_PREFIX}{FIRST_HOST_OCTET + index - 1}", UNDERLAY_BITS, 0
    half = (hosts + 1) // 2
    segment = 0 if index <= half else 1
    position = index if segment == 0 else index - half
    return f"{UNDERLAY_PREFIX}{128 * segment + FIRST_HOST_OCTET + position - 1}", 25, segment


def _add_namespace(root: Path, state: dict[str, Any], name: str) -> str:
    state["namespaces"].append(name)
    save_state(root, state)
    netns.add_namespace(name)
    return name


def _add_router(root: Path, state: dict[str, Any], bridge_ns: str) -> None:
    router = _add_namespace(root, state, f"gl-{state['tag']}-rt")
    netns.sysctl(router, "net.ipv4.ip_forward", "1")
    for segment, address in enumerate(ROUTER_ADDRESSES):
        netns.add_veth_to_bridge(
            bridge_ns, f"br{segment}", f"rt{segment}", router, f"eth{segment}", f"{address}/25"
        )


def _add_host(
    root: Path,
    state: dict[str, Any],
    bridge_ns: str,
    index: int,
    hosts: int,
    mdns: bool,
    bootstrap: tuple[str, ...],
) -> None:
    name = f"h{index}"
    ns = f"gl-{state['tag']}-{name}"
    underlay, bits, segment = _underlay(index, hosts, state["segments"])
    host_dir = root / "hosts" / name
    host_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    config_path = host_dir / "agent.toml"
    host: dict[str, Any] = {
        "name": name,
        "netns": ns,
        "underlay": underlay,
        "segment": segment,
        "dir": str(host_dir),
        "config": str(config_path),
        "socket": str(host_dir / "state" / "control.sock"),
        "pid": None,
    }
    state["hosts"].append(host)
    _add_namespace(root, state, ns)
    netns.prepare_ipv6(ns, forwarding=True)
    netns.add_veth_to_bridge(bridge_ns, f"br{segment}", name, ns, "eth0", f"{underlay}/{bits}")
    if state["segments"] == 2:
        netns.ip("route", "add", "default", "via", ROUTER_ADDRESSES[segment], netns=ns)
    if state.get("libvirt"):
        from node.testbed import libvirt_daemon as testbed_libvirt

        testbed_libvirt.start(state, host, lambda: save_state(root, state))
    config_path.write_text(
        host_config(
            name,
            host_dir / "state",
            underlay,
            state["swarm_id"],
            mdns,
            bootstrap,
            host.get("libvirt_uri", ""),
            state.get("image_store", ""),
        )
    )
    start_agent(host)
    save_state(root, state)


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
    host["started_at"] = time.time()
    return process.pid


def _wait_for_agent(host: dict[str, Any]) -> str:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        # Not _is_our_agent: between fork and exec the child still shows our cmdline.
        if not pid_alive(host["pid"]):
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
    """Stop the host's agent by its PID; SIGKILL if it outlives the timeout.

    An agent stops its own wireguard-go; one killed with SIGKILL cannot, so a
    daemon it left behind (its PID file names it) is stopped here too.
    """
    try:
        return _stop_agent(host, sig)
    finally:
        _stop_left_wireguard(host)


def _stop_left_wireguard(host: dict[str, Any]) -> None:
    pid_file = Path(host["dir"]) / "state" / "wireguard-go.pid"
    stop_recorded(pid_file, (b"wireguard-go",), STOP_TIMEOUT_S)


def kill_agent(host: dict[str, Any]) -> None:
    """SIGKILL the host's agent and nothing else (a crash, for tests and benchmarks)."""
    if _is_our_agent(host):
        _signal(host["pid"], signal.SIGKILL)
        while _is_our_agent(host):
            time.sleep(0.01)
        _reap(host["pid"])


def crash_host(root: Path, name: str) -> None:
    """The host loses power: SIGKILL its agent, and its libvirtd with every guest it runs."""
    state, host = _host(root, name)
    kill_agent(host)
    if state.get("libvirt"):
        from node.testbed import libvirt_daemon as testbed_libvirt

        testbed_libvirt.stop(host)
        host["libvirt_root"] = None
        save_state(root, state)


def is_up(root: Path, name: str) -> bool:
    """Whether the named host's agent is running."""
    return _is_our_agent(_host(root, name)[1])


def _host(root: Path, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    state = load_state(root)
    if state is None:
        raise TestbedError(f"no testbed is up under {root}")
    for host in state["hosts"]:
        if host["name"] == name:
            return state, host
    raise TestbedError(f"no host {name!r}")


def restart_agent(root: Path, name: str) -> dict[str, Any]:
    """Start the named host's agent again (after a crash); return its description."""
    state = load_state(root)
    if state is None:
        raise TestbedError(f"no testbed is up under {root}")
    for host in state["hosts"]:
        if host["name"] == name:
            if _is_our_agent(host):
                raise TestbedError(f"the agent on {name} is still running")
            start_agent(host)
            save_state(root, state)
            host["node_id"] = _wait_for_agent(host)
            return describe(host)
    raise TestbedError(f"no host {name!r}")


def _stop_agent(host: dict[str, Any], sig: signal.Signals) -> bool:
    if not _is_our_agent(host):
        return False
    _signal(host["pid"], sig)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while time.monotonic() < deadline and _is_our_agent(host):
        time.sleep(0.02)
    if _is_our_agent(host):
        _signal(host["pid"], signal.SIGKILL)
        while _is_our_agent(host):
            time.sleep(0.02)
    _reap(host["pid"])
    return True


def _signal(pid: int, sig: signal.Signals) -> None:
    """Signal a process that may have exited since we looked."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def down(root: Path = DEFAULT_ROOT) -> dict[str, list[str]]:
    """Stop every agent and delete every namespace the testbed made."""
    state = load_state(root)
    removed: dict[str, list[str]] = {"stopped": [], "namespaces": []}
    if state is None:
        return removed
    for host in state["hosts"]:
        if stop_agent(host):
            removed["stopped"].append(host["name"])
    if any(host.get("libvirt_root") for host in state["hosts"]):
        from node.testbed import libvirt_daemon as testbed_libvirt

        for host in state["hosts"]:
            testbed_libvirt.stop(host)
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
        "segment": host.get("segment", 0),
        "socket": host["socket"],
        "config": host["config"],
        "pid": host["pid"],
        "started_at": host.get("started_at"),
        "libvirt_uri": host.get("libvirt_uri"),
    }


def status(root: Path = DEFAULT_ROOT) -> list[dict[str, Any]]:
    state = load_state(root)
    if state is None:
        raise TestbedError(f"no testbed is up under {root}")
    result = []
    for host in state["hosts"]:
        entry = describe(host)
        entry["running"] = _is_our_agent(host)
        result.append(entry)
    return result
