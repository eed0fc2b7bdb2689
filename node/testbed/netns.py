"""Thin helpers over iproute2 for network namespaces, veth pairs and bridges.

Used by the local testbed and by tests. Every call names the namespace it acts
in (``ip -n NS …``), so nothing here touches the root namespace's links or
routes. Failures raise ``NetnsError`` carrying the command and its stderr.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Sequence


class NetnsError(Exception):
    """An iproute2 command failed."""


def ip(*args: str, netns: str | None = None, check: bool = True) -> str:
    command = ["ip", *(("-n", netns) if netns else ()), *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise NetnsError(f"{' '.join(command)}: {result.stderr.strip() or result.returncode}")
    return result.stdout


def list_namespaces() -> list[str]:
    out = ip("-j", "netns", "list")
    return [entry["name"] for entry in json.loads(out or "[]")]


def add_namespace(name: str) -> None:
    ip("netns", "add", name)
    ip("link", "set", "lo", "up", netns=name)


def delete_namespace(name: str) -> None:
    if name in list_namespaces():
        ip("netns", "del", name)


def add_bridge(netns: str, name: str) -> None:
    ip("link", "add", name, "type", "bridge", netns=netns)
    ip("link", "set", name, "up", netns=netns)


def add_veth_to_bridge(
    bridge_netns: str, bridge: str, port: str, host_netns: str, host_ifname: str, cidr: str
) -> None:
    """A veth pair: `port` on the bridge in `bridge_netns`, `host_ifname` in `host_netns`."""
    ip(
        "link",
        "add",
        port,
        "type",
        "veth",
        "peer",
        "name",
        host_ifname,
        "netns",
        host_netns,
        netns=bridge_netns,
    )
    ip("link", "set", port, "master", bridge, "up", netns=bridge_netns)
    ip("addr", "add", cidr, "dev", host_ifname, netns=host_netns)
    ip("link", "set", host_ifname, "up", netns=host_netns)


def exec_command(netns: str, argv: Sequence[str]) -> list[str]:
    """The argv that runs `argv` inside `netns`."""
    return ["ip", "netns", "exec", netns, *argv]


def root_snapshot() -> dict[str, list[str]]:
    """The root namespace's links and routes, for before/after comparisons."""
    links = sorted(
        f"{link['ifname']}:{link.get('operstate', '')}" for link in json.loads(ip("-j", "link"))
    )
    routes = sorted(
        json.dumps(route, sort_keys=True) for route in json.loads(ip("-j", "route") or "[]")
    )
    routes6 = sorted(
        json.dumps(route, sort_keys=True) for route in json.loads(ip("-j", "-6", "route") or "[]")
    )
    return {"links": links, "routes": routes + routes6}


def sysctl(netns: str, key: str, value: str) -> None:
    """Set a per-namespace sysctl (net.* keys are per network namespace)."""
    result = subprocess.run(
        exec_command(netns, ["sysctl", "-q", "-w", f"{key}={value}"]),
        capture_output=True,
        text=True,
        timeout=30,
    )
    if result.returncode != 0:
        raise NetnsError(f"sysctl {key}={value} in {netns}: {result.stderr.strip()}")


def prepare_ipv6(netns: str, forwarding: bool = False) -> None:
    """No duplicate-address detection delay (test links are ours), optional forwarding."""
    for scope in ("all", "default"):
        sysctl(netns, f"net.ipv6.conf.{scope}.accept_dad", "0")
        sysctl(netns, f"net.ipv6.conf.{scope}.dad_transmits", "0")
    if forwarding:
        sysctl(netns, "net.ipv6.conf.all.forwarding", "1")


def add_veth_between(ns_a: str, name_a: str, ns_b: str, name_b: str) -> None:
    """A veth pair with one end in each namespace, both up, no addresses yet."""
    ip("link", "add", name_a, "type", "veth", "peer", "name", name_b, "netns", ns_b, netns=ns_a)
    ip("link", "set", name_a, "up", netns=ns_a)
    ip("link", "set", name_b, "up", netns=ns_b)
