"""The testbed's VM stand-in: a namespace answering at a VM overlay address, movable.

Before real VMs exist, a VM is stood in for by a network namespace whose
loopback holds the VM's stable overlay address (derived from a job id, derived
from the testbed owner's key and a nonce, as for real jobs). It is joined to
its host by a veth standing in for the VM's tap device:

    host side  gvI.E  fe80::1/64     VM side  eth0  fe80::2/64, default via fe80::1

A move is make-before-break, as a segment moves: the destination brings the
address up first, then claims it, and the routing is done by the agents:

1. start a new instance of the stand-in (namespace ``gl-T-vm-NAME-E`` for epoch
   E) attached to the destination host, answering at the same address — the
   restored copy;
2. ask the destination agent (control RPC ``vm_attach``) to route the address
   to that veth and claim it with a grant signed by the owner for epoch E; the
   agent persists the claim, then spreads it;
3. wait until the old host's agent has seen the newer claim and withdrawn (it
   keeps forwarding to the old instance for a short linger, so peers that have
   not heard of the move yet lose nothing);
4. remove the old instance.

Each instance replies through its own host, so replies always come from the
peer that the asker routes the address to: WireGuard's source check drops none.
"""

from __future__ import annotations

import secrets
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from node.base.identity import Identity, NodeId
from node.runtime.control import call
from node.runtime.keystore import load_or_create
from node.testbed import netns
from node.testbed.testbed import TestbedError, load_state, save_state
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
    """Make a VM stand-in (not attached to any host yet)."""
    state = _require(root)
    vms = state.setdefault("vms", {})
    if name in vms:
        raise TestbedError(f"VM {name!r} already exists")
    owner = owner_identity(root)
    nonce = secrets.token_bytes(16)
    job_id = derive_job_id(owner.node_id.key, nonce)
    address = str(vm_address(state["swarm_id"], job_id))
    vm = {
        "name": name,
        "address": address,
        "job_nonce": nonce.hex(),
        "index": len(vms) + 1,
        "epoch": 0,
        "host": None,
        "netns": None,
    }
    vms[name] = vm
    save_state(root, state)
    return dict(vm)


def vm_move(root: Path, name: str, host_name: str) -> dict[str, Any]:
    """Start the VM at `host_name` and move its address there through the agents."""
    state = _require(root)
    vm = state.get("vms", {}).get(name)
    if vm is None:
        raise TestbedError(f"no VM {name!r}")
    host = _host(state, host_name)
    old_host = _host(state, vm["host"]) if vm["host"] else None
    if old_host is host:
        raise TestbedError(f"VM {name!r} is already on {host_name}")
    epoch = vm["epoch"] + 1
    instance = f"gl-{state['tag']}-vm{vm['index']}-{epoch}"
    state["namespaces"].append(instance)
    save_state(root, state)
    host_side = f"gv{vm['index']}.{epoch}"
    try:
        reply = _start_instance(root, state, vm, host, instance, host_side, epoch)
    except BaseException:
        netns.delete_namespace(instance)  # its veth goes with it
        state["namespaces"].remove(instance)
        save_state(root, state)
        raise
    started = time.monotonic()
    old_instance = vm["netns"]
    vm.update(epoch=epoch, host=host_name, netns=instance)
    save_state(root, state)
    withdrawn_s = None
    if old_host is not None:
        withdrawn_s = _wait_withdrawn(old_host, vm["address"], started)
    if old_instance:
        netns.delete_namespace(old_instance)
        state["namespaces"].remove(old_instance)
        save_state(root, state)
    return {
        "vm": name,
        "host": host_name,
        "epoch": epoch,
        "claim": reply,
        "old_host_withdrawn_s": withdrawn_s,
    }


def _start_instance(
    root: Path,
    state: dict[str, Any],
    vm: dict[str, Any],
    host: dict[str, Any],
    instance: str,
    host_side: str,
    epoch: int,
) -> Any:
    """The new instance at `host`, answering at the VM's address, claimed by its agent."""
    netns.add_namespace(instance)
    netns.prepare_ipv6(instance)
    netns.add_veth_between(host["netns"], host_side, instance, "eth0")
    netns.ip(
        "-6", "addr", "add", f"{HOST_GATEWAY}/64", "dev", host_side, "nodad", netns=host["netns"]
    )
    netns.ip("-6", "addr", "add", f"{VM_GATEWAY}/64", "dev", "eth0", "nodad", netns=instance)
    netns.ip("-6", "addr", "add", f"{vm['address']}/128", "dev", "lo", netns=instance)
    netns.ip("-6", "route", "add", "default", "via", HOST_GATEWAY, "dev", "eth0", netns=instance)
    _warm_neighbours(host["netns"], host_side)
    grant = sign_grant(
        owner_identity(root),
        swarm_id=state["swarm_id"],
        job_nonce=bytes.fromhex(vm["job_nonce"]),
        node_id=_node_id(host),
        epoch=epoch,
        expires=int(time.time()) + GRANT_LIFETIME_S,
    )
    reply = call(
        Path(host["socket"]),
        "vm_attach",
        {"grant": grant.blob, "device": host_side, "gateway": VM_GATEWAY},
    )
    return reply


def _warm_neighbours(host_ns: str, host_side: str) -> None:
    """One ping across the new link, so neither end resolves its neighbour mid-move."""
    subprocess.run(
        netns.exec_command(
            host_ns, ["ping", "-6", "-c", "1", "-W", "1", f"{VM_GATEWAY}%{host_side}"]
        ),
        capture_output=True,
        timeout=10,
        check=False,
    )


def _wait_withdrawn(host: dict[str, Any], address: str, started: float) -> float:
    deadline = time.monotonic() + WITHDRAW_TIMEOUT_S
    while time.monotonic() < deadline:
        routes = call(Path(host["socket"]), "routes")
        if address not in routes["local"]:
            return round(time.monotonic() - started, 3)
        time.sleep(0.02)
    raise TestbedError(f"{host['name']} did not withdraw {address} within {WITHDRAW_TIMEOUT_S:g} s")


def _require(root: Path) -> dict[str, Any]:
    state = load_state(root)
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


class NetworkVm:
    """A real guest with network on the testbed, driven through the agents' RPCs.

    The testbed owner signs a grant per epoch; `start` boots it on a host (which
    routes and claims its address), `migrate` live-migrates it (the destination is
    told first, and claims the address the moment the guest runs there).
    """

    def __init__(self, root: Path, name: str, tap: str) -> None:
        self.root = root
        self.name = name
        self.tap = tap
        self.state = _require(root)
        self.owner = owner_identity(root)
        self.nonce = secrets.token_bytes(16)
        job_id = derive_job_id(self.owner.node_id.key, self.nonce)
        self.address = str(vm_address(self.state["swarm_id"], job_id))
        self.epoch = 0

    def grant(self, host: dict[str, Any]) -> bytes:
        self.epoch += 1
        return sign_grant(
            self.owner,
            swarm_id=self.state["swarm_id"],
            job_nonce=self.nonce,
            node_id=NodeId.parse(host["node_id"]),
            epoch=self.epoch,
            expires=int(time.time()) + GRANT_LIFETIME_S,
        ).blob

    def start(self, host: dict[str, Any], image_id: str, args: str) -> dict[str, Any]:
        params = {
            "name": self.name,
            "tap": self.tap,
            "image_id": image_id,
            "address": self.address,
            "args": args,
            "grant": self.grant(host),
        }
        reply: dict[str, Any] = call(Path(host["socket"]), "vm_start", params, timeout=180)
        return reply

    def migrate(self, source: dict[str, Any], destination: dict[str, Any]) -> dict[str, Any]:
        """Live-migrate; returns libvirt's figures plus the destination's claim."""
        dest = _host(self.state, destination["name"])
        arrival: dict[str, Any] = {}
        grant = self.grant(destination)

        def expect() -> None:
            params = {"name": self.name, "tap": self.tap, "grant": grant}
            arrival.update(call(Path(destination["socket"]), "vm_expect", params, timeout=180))

        waiter = threading.Thread(target=expect)
        waiter.start()
        try:
            result: dict[str, Any] = call(Path(source["socket"]), "vm_migrate", {
                "name": self.name, "dest_uri": dest["libvirt_uri"],
                "dest_address": dest["underlay"],
            }, timeout=180)  # fmt: skip
        finally:
            waiter.join(timeout=180)
        return {**result, "claim": arrival or None}
