"""The local testbed and the demo: real namespaces, real agents, nothing left behind."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from kit.agents import needs_root

from node.runtime.control import call
from node.testbed import netns, testbed

pytestmark = [needs_root, pytest.mark.netns]


def gleaner(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "node", *args], capture_output=True, text=True, timeout=timeout
    )


def test_up_json_then_down_leaves_root_namespace_as_it_was(tmp_path):
    before = netns.root_snapshot()
    namespaces_before = set(netns.list_namespaces())
    root = tmp_path / "tb"
    try:
        result = gleaner("testbed", "--root", str(root), "up", "--hosts", "3", "--json")
        assert result.returncode == 0, result.stderr
        hosts = json.loads(result.stdout)
        assert [h["name"] for h in hosts] == ["h1", "h2", "h3"]
        assert len({h["node_id"] for h in hosts}) == 3
        assert len({h["netns"] for h in hosts}) == 3
        assert all(h["underlay"].startswith("198.51.100.") for h in hosts)
        for host in hosts:
            assert host["netns"] in netns.list_namespaces()
            status = call(host["socket"], "status")
            assert status["node_id"] == host["node_id"]
            assert status["underlay"] == [f"{host['underlay']}:7946"]
        # h1 reaches h2 over the bridge, inside the namespaces only.
        ping = subprocess.run(
            netns.exec_command(
                hosts[0]["netns"], ["ping", "-c", "1", "-W", "2", hosts[1]["underlay"]]
            ),
            capture_output=True,
            text=True,
            timeout=10,
        )
        assert ping.returncode == 0, ping.stdout + ping.stderr
        assert netns.root_snapshot() == before
    finally:
        down = gleaner("testbed", "--root", str(root), "down", "--json")
    assert down.returncode == 0, down.stderr
    assert len(json.loads(down.stdout)["stopped"]) == 3
    assert set(netns.list_namespaces()) == namespaces_before
    assert netns.root_snapshot() == before
    assert not (root / "testbed.json").exists()


def test_second_up_is_refused_and_down_is_idempotent(tmp_path):
    root = tmp_path / "tb"
    try:
        testbed.up(1, root=root)
        with pytest.raises(testbed.TestbedError, match="already up"):
            testbed.up(1, root=root)
    finally:
        testbed.down(root=root)
    assert testbed.down(root=root) == {"stopped": [], "namespaces": []}


def test_failed_up_cleans_up_after_itself(tmp_path, monkeypatch):
    root = tmp_path / "tb"
    namespaces_before = set(netns.list_namespaces())

    def broken_host_config(*args, **kwargs):
        return "[network]\nlisten = 'broken'\n"

    monkeypatch.setattr(testbed, "host_config", broken_host_config)
    try:
        with pytest.raises(testbed.TestbedError, match="exited"):
            testbed.up(2, root=root)
    finally:
        testbed.down(root)  # had up() wrongly succeeded, nothing may stay behind
    assert set(netns.list_namespaces()) == namespaces_before
    assert not (root / "testbed.json").exists()


def test_demo_prints_three_distinct_node_ids_and_cleans_up(tmp_path):
    before = netns.root_snapshot()
    namespaces_before = set(netns.list_namespaces())
    try:
        result = gleaner("demo", "--hosts", "3", "--root", str(tmp_path / "demo"), timeout=600)
    finally:
        testbed.down(tmp_path / "demo")  # a demo killed by the timeout cleans up nothing
    assert result.returncode == 0, result.stderr
    ids = {word for word in result.stdout.split() if len(word) == 52 and word.isalnum()}
    assert len(ids) == 3, result.stdout
    assert "3 distinct node ids" in result.stdout
    assert set(netns.list_namespaces()) == namespaces_before
    assert netns.root_snapshot() == before
