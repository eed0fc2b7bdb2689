"""Live migration through the agents: the guest keeps running and its address follows it."""

from __future__ import annotations

from pathlib import Path

import pytest
from kit.agents import needs_root
from kit.paths import REPO_ROOT

from node.testbed import testbed
from node.testbed.checks import full_mesh, ping, rpc, wait_for
from node.testbed.vm import NetworkVm
from segments.image.store import build
from segments.image.workload import check_continuity, parse_progress

pytestmark = [needs_root, pytest.mark.netns, pytest.mark.vm]

RECIPE = REPO_ROOT / "deploy" / "recipes" / "demo.toml"


def test_live_migration_moves_guest_and_address(tmp_path):
    root = tmp_path / "tb"
    try:
        hosts = testbed.up(3, root=root)
        wait_for(lambda: full_mesh(hosts), 60, "a full mesh")
        image = build(RECIPE, root / "images")
        vm = NetworkVm(root, "m1", "gtm1")
        vm.start(hosts[0], image.id, "gleaner.steps=0 gleaner.seed=mig")
        wait_for(lambda: ping(hosts[2], vm.address), 120, "the guest answering at h1")
        result = vm.migrate(hosts[0], hosts[1])
        assert result["downtime_ms"] > 0
        assert result["claim"]["epoch"] == 2
        assert ping(hosts[2], vm.address, count=3)

        def routed_to_h2():
            routes = {r["address"]: r for r in rpc(hosts[2], "routes")["routes"]}
            return routes.get(vm.address, {}).get("node_id") == hosts[1]["node_id"]

        wait_for(routed_to_h2, 10, "h3 routing the guest's address to h2")
        serial = Path(hosts[0]["socket"]).parent / "vms" / "m1.serial.log"
        steps = parse_progress(serial.read_text(errors="replace"))
        check_continuity(steps, seed="mig")  # the guest never restarted across the move
    finally:
        testbed.down(root)
