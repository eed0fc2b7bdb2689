"""Shared fixtures: agents as real processes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from kit.agents import AgentProcess, write_config


@pytest.fixture
def root_agent(tmp_path: Path) -> Iterator[AgentProcess]:
    state_dir = tmp_path / "state"
    config = write_config(tmp_path / "agent.toml", state_dir)
    agent = AgentProcess(config, state_dir, tmp_path / "agent.log")
    try:
        yield agent
    finally:
        agent.stop()
