"""Beyond the LAN: two bridges joined by a router, no multicast, bootstrap list only."""

from __future__ import annotations

import pytest
from kit.agents import needs_root

from node.testbed import netns, testbed
from node.testbed.checks import full_mesh, overlay_address, ping, wait_for

pytestmark = [needs_root, pytest.mark.netns]


def test_agents_on_two_segments_mesh_through_the_bootstrap_list(tmp_path):
    root = tmp_path / "tb"
    try:
        hosts = testbed.up(4, root=root, segments=2, mdns=False, bootstrap=True, libvirt=False)
        assert {h["segment"] for h in hosts} == {0, 1}
        far = [h for h in hosts if h["segment"] == 1]
        assert all(h["underlay"].startswith("198.51.100.1") for h in far)
        wait_for(lambda: full_mesh(hosts), 30, "a full mesh across the router")
        near = hosts[0]
        for other in far:
            assert ping(near, overlay_address(other)), f"h1 -> {other['name']} over the overlay"
        # The far hosts are reached through the router, so link-local multicast
        # (mDNS) cannot cross to them: the bootstrap list did the work.
        path = netns.ip("route", "get", far[0]["underlay"], netns=near["netns"])
        assert f"via {testbed.ROUTER_ADDRESSES[0]}" in path
    finally:
        testbed.down(root)
