"""The testbed's VM stand-in: a namespace holding a VM overlay address, movable between hosts.

Before real VMs exist, a VM is a network namespace ``gl-T-vm-NAME`` whose
loopback holds the VM's stable overlay address (derived from a job id, which is
derived from the testbed owner's key and a nonce, as for real jobs). Each time
the VM is attached to a host, a fresh veth joins the VM namespace to that host
namespace, standing in for the VM's tap device:

    host side  gvI.E  fe80::1/64     VM side  eE  fe80::2/64, default via fe80::1

A move is make-before-break, and the routing is done by the agents, not here:

1. attach a new veth at the destination host;
2. ask the destination agent (control RPC ``vm_attach``) to route the address to
   that veth and claim it with a grant signed by the owner for the next epoch;
   the agent persists the claim, then spreads it;
3. point the VM's default route at the new veth;
4. wait until the old host's agent has seen the newer claim and withdrawn
   (it keeps forwarding for a short linger so in-flight traffic is not lost);
5. remove the old veth.
"""

from __future__ import annotations

import secrets
import time
from pathlib import Path
from typing import Any

from node import netns
from node.control import call
from node.identity import Identity, NodeId, load_or_create
from node.testbed import TestbedError, _load, _save
from overlay.addressing import vm_address
from overlay.claims import derive_job_id, sign_grant

GRANT_LIFETIME_S = 24 * 3600
WITHDRAW_TIMEOUT_S = 15.0
HOST_GATEWAY = "fe80::1"
VM_GATEWAY = "fe80::2"


def owner_identity(root: Path) -> Identity:
    """The testbed's job owner (its key signs the stand-in VMs' grants)."""
    return load_or_create(root / "owner")


def vm_add(root: Path, name: str) -> dict[str, Any]:
    state = _require(root)
    vms = state.setdefault("vms", {})
    if name in vms:
        raise TestbedError(f"VM {name!r} already exists")
    owner = owner_identity(root)
    nonce = secrets.token_bytes(16)
    job_id = derive_job_id(owner.node_id.key, nonce)
    address = str(vm_address(state["swarm_id"], job_id))
    ns = f"gl-{state['tag']}-vm-{name}"[:60]
    vm = {
        "name": name,
        "netns": ns,
        "address": address,
        "job_nonce": nonce.hex(),
        "index": len(vms) + 1,
        "epoch": 0,
        "host": None,
        "device": None,
    }
    vms[name] = vm
    state["namespaces"].append(ns)
    _save(root, state)
    netns.add_namespace(ns)
    netns.prepare_ipv6(ns)
    netns.ip("-6", "addr", "add", f"{address}/128", "dev", "lo", netns=ns)
    return dict(vm)


def vm_move(root: Path, name: str, host_name: str) -> dict[str, Any]:
    """Attach the VM at `host_name` and move its address there through the agents."""
    state = _require(root)
    vm = state.get("vms", {}).get(name)
    if vm is None:
        raise TestbedError(f"no VM {name!r}")
    host = _host(state, host_name)
    old_host = _host(state, vm["host"]) if vm["host"] else None
    if old_host is host:
        raise TestbedError(f"VM {name!r} is already on {host_name}")
    epoch = vm["epoch"] + 1
    host_side, vm_side = f"gv{vm['index']}.{epoch}", f"e{epoch}"
    netns.add_veth_between(host["netns"], host_side, vm["netns"], vm_side)
    netns.ip(
        "-6", "addr", "add", f"{HOST_GATEWAY}/64", "dev", host_side, "nodad", netns=host["netns"]
    )
    netns.ip("-6", "addr", "add", f"{VM_GATEWAY}/64", "dev", vm_side, "nodad", netns=vm["netns"])
    owner = owner_identity(root)
    grant = sign_grant(
        owner,
        swarm_id=state["swarm_id"],
        job_nonce=bytes.fromhex(vm["job_nonce"]),
        node_id=_node_id(host),
        epoch=epoch,
        expires=int(time.time()) + GRANT_LIFETIME_S,
    )
    started = time.monotonic()
    reply = call(
        Path(host["socket"]),
        "vm_attach",
        {"grant": grant.blob, "device": host_side, "gateway": VM_GATEWAY},
    )
    netns.ip(
        "-6", "route", "replace", "default", "via", HOST_GATEWAY, "dev", vm_side, netns=vm["netns"]
    )
    old_device = vm["device"]
    vm.update(epoch=epoch, host=host_name, device=vm_side)
    _save(root, state)
    withdrawn_s = None
    if old_host is not None:
        withdrawn_s = _wait_withdrawn(old_host, vm["address"], started)
        netns.ip("link", "del", old_device, netns=vm["netns"])
    return {
        "vm": name,
        "host": host_name,
        "epoch": epoch,
        "claim": reply,
        "old_host_withdrawn_s": withdrawn_s,
    }


def _wait_withdrawn(host: dict[str, Any], address: str, started: float) -> float:
    deadline = time.monotonic() + WITHDRAW_TIMEOUT_S
    while time.monotonic() < deadline:
        routes = call(Path(host["socket"]), "routes")
        if address not in routes["local"]:
            return round(time.monotonic() - started, 3)
        time.sleep(0.02)
    raise TestbedError(f"{host['name']} did not withdraw {address} within {WITHDRAW_TIMEOUT_S:g} s")


def _require(root: Path) -> dict[str, Any]:
    state = _load(root)
    if state is None:
        raise TestbedError(f"no testbed is up under {root}")
    return state


def _host(state: dict[str, Any], name: str) -> dict[str, Any]:
    for host in state["hosts"]:
        if host["name"] == name:
            found: dict[str, Any] = host
            return found
    raise TestbedError(f"no host {name!r} (hosts: {', '.join(h['name'] for h in state['hosts'])})")


def _node_id(host: dict[str, Any]) -> NodeId:
    return NodeId.parse(host["node_id"])


def vm_exec(root: Path, name: str) -> list[str]:
    """The argv prefix to run a command inside the VM stand-in."""
    vm = _require(root).get("vms", {}).get(name)
    if vm is None:
        raise TestbedError(f"no VM {name!r}")
    return ["ip", "netns", "exec", vm["netns"]]
