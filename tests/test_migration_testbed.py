"""Live migration through the agents: the guest keeps running and its address follows it."""

from __future__ import annotations

import json
import secrets
import threading
import time
from pathlib import Path

import pytest
from conftest import needs_root

from node import testbed, testbed_vm
from node.control import call
from node.identity import NodeId
from node.testbed_checks import full_mesh, ping, rpc, wait_for
from overlay.addressing import vm_address
from overlay.claims import derive_job_id, sign_grant
from segments.image import build
from segments.workload import check_continuity, parse_progress

pytestmark = [needs_root, pytest.mark.netns, pytest.mark.vm]

RECIPE = Path(__file__).resolve().parent.parent / "deploy" / "recipes" / "demo.toml"


def test_live_migration_moves_guest_and_address(tmp_path):
    root = tmp_path / "tb"
    try:
        hosts = testbed.up(3, root=root)
        wait_for(lambda: full_mesh(hosts), 60, "a full mesh")
        state = json.loads((root / "testbed.json").read_text())
        image = build(RECIPE, root / "images")
        owner = testbed_vm.owner_identity(root)
        nonce = secrets.token_bytes(16)
        address = str(vm_address(state["swarm_id"], derive_job_id(owner.node_id.key, nonce)))

        def grant(host, epoch):
            return sign_grant(
                owner,
                swarm_id=state["swarm_id"],
                job_nonce=nonce,
                node_id=NodeId.parse(host["node_id"]),
                epoch=epoch,
                expires=int(time.time()) + 3600,
            ).blob

        call(Path(hosts[0]["socket"]), "vm_start", {
            "name": "m1", "tap": "gtm1", "image_id": image.id, "address": address,
            "args": "gleaner.steps=0 gleaner.seed=mig", "grant": grant(hosts[0], 1),
        }, timeout=120)  # fmt: skip
        wait_for(lambda: ping(hosts[2], address), 120, "the guest answering at h1")
        arrival = {}
        waiter = threading.Thread(
            target=lambda: arrival.update(
                call(
                    Path(hosts[1]["socket"]),
                    "vm_expect",
                    {"name": "m1", "tap": "gtm1", "grant": grant(hosts[1], 2)},
                    timeout=180,
                )
            )
        )
        waiter.start()
        dest = state["hosts"][1]
        result = call(Path(hosts[0]["socket"]), "vm_migrate", {
            "name": "m1", "dest_uri": dest["libvirt_uri"], "dest_address": dest["underlay"],
        }, timeout=180)  # fmt: skip
        waiter.join(timeout=180)
        assert result["downtime_ms"] > 0
        assert arrival["epoch"] == 2
        assert ping(hosts[2], address, count=3)

        def routed_to_h2():
            routes = {r["address"]: r for r in rpc(hosts[2], "routes")["routes"]}
            return routes.get(address, {}).get("node_id") == hosts[1]["node_id"]

        wait_for(routed_to_h2, 10, "h3 routing the guest's address to h2")
        serial = Path(hosts[0]["socket"]).parent / "vms" / "m1.serial.log"
        steps = parse_progress(serial.read_text(errors="replace"))
        check_continuity(steps, seed="mig")  # the guest never restarted across the move
    finally:
        testbed.down(root)
