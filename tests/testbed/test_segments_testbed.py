"""A segment on one host, the next on another: checkpoint, ship the missing blocks, restore."""

from __future__ import annotations

from pathlib import Path

import pytest
from kit.agents import needs_root
from kit.paths import REPO_ROOT

from node.runtime.control import call
from node.testbed import testbed
from node.testbed.checks import full_mesh, wait_for
from segments.image.store import build
from segments.image.workload import check_continuity, parse_progress, parse_result, reference_result

pytestmark = [needs_root, pytest.mark.netns, pytest.mark.vm]

RECIPE = REPO_ROOT / "deploy" / "recipes" / "demo.toml"
STEPS = 3000  # about 14 s of guest CPU: more than the first segment's extent
# The first segment must outlast the boot (2.5-4 s of TCG vCPU before /init, more on a
# loaded or slower host), so the checkpoint falls inside the counting loop.
FIRST_EXTENT_S = 8.0
SEED = "gleaner"
SEGMENT_TIMEOUT_S = 300.0


def segment(host: dict, **params) -> dict:
    return call(Path(host["socket"]), "segment_run", params, timeout=SEGMENT_TIMEOUT_S)


def test_next_segment_continues_on_another_host_from_shipped_blocks(tmp_path):
    root = tmp_path / "tb"
    try:
        hosts = testbed.up(2, root=root)
        wait_for(lambda: full_mesh(hosts), 60, "a full mesh")
        image = build(RECIPE, root / "images")
        args = f"gleaner.steps={STEPS} gleaner.seed={SEED}"
        first = segment(
            hosts[0], job="t1", segment=0, image_id=image.id, args=args, extent_cpu_s=FIRST_EXTENT_S
        )
        assert not first["powered_off"] and first["checkpoint"]
        assert first["cpu_s"] >= FIRST_EXTENT_S
        second = segment(
            hosts[1],
            job="t1",
            segment=1,
            image_id=image.id,
            args=args,
            extent_cpu_s=600.0,
            checkpoint=first["checkpoint"],
            holders=[first["holder"]],
        )
        assert second["powered_off"], "the second segment runs the job to its end"
        assert second["fetched"]["blocks"] > 0
        assert second["fetched"]["bytes"] <= first["checkpoint_bytes"]
        before = Path(first["serial_log"]).read_text(errors="replace")
        after = Path(second["serial_log"]).read_text(errors="replace")
        assert first["serial_log"] != second["serial_log"]
        steps_before = parse_progress(before)
        steps_after = parse_progress(after)
        assert steps_before and steps_after
        # The restored guest continues the count: no reset, no gap.
        assert steps_after[0][0] == steps_before[-1][0] + 1
        check_continuity(steps_before + steps_after, seed=SEED)
        assert parse_result(after) == reference_result(SEED, STEPS)
    finally:
        testbed.down(root)
