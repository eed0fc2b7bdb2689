"""The lanes, from the directory; and shared fixtures: agents as real processes.

Every item under tests/unit is marked ``unit``, under tests/system ``system``, under
tests/testbed ``testbed`` (``pytest -m unit``, or just ``pytest tests/unit``: the
fast lane, ``make check``). The unit lane needs no root, namespaces, VMs or daemons:
an item there that carries ``netns`` or ``vm`` stops the run.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from kit.agents import AgentProcess, write_config

TESTS = Path(__file__).resolve().parent
LANES = ("unit", "system", "testbed")
HEAVY = ("netns", "vm")  # what the unit lane never needs


def lane_of(item: pytest.Item) -> str | None:
    try:
        first = item.path.resolve().relative_to(TESTS).parts[0]
    except ValueError:
        return None
    return first if first in LANES else None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    misplaced = []
    for item in items:
        lane = lane_of(item)
        if lane is None:
            continue
        item.add_marker(lane)
        if lane == "unit" and any(item.get_closest_marker(name) for name in HEAVY):
            misplaced.append(item.nodeid)
    if misplaced:
        raise pytest.UsageError(
            "tests/unit is for tests without root, namespaces or VMs; move these to "
            "tests/testbed: " + ", ".join(misplaced)
        )


@pytest.fixture
def root_agent(tmp_path: Path) -> Iterator[AgentProcess]:
    state_dir = tmp_path / "state"
    config = write_config(tmp_path / "agent.toml", state_dir)
    agent = AgentProcess(config, state_dir, tmp_path / "agent.log")
    try:
        yield agent
    finally:
        agent.stop()
