"""The testbed's VM requests check every name before anything is booted or written."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from node.runtime.vm_service import VmService, VmServiceError


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({"name": "../../x", "tap": "t0"}, "'name'"),
        ({"name": "a/b", "tap": "t0"}, "'name'"),
        ({"name": "x" * 65, "tap": "t0"}, "'name'"),
        ({"name": "web1", "tap": "../t"}, "'tap'"),
        ({"name": "web1", "tap": "t" * 16}, "'tap'"),
    ],
)
def test_a_name_that_would_leave_the_work_dir_or_is_no_interface_is_refused_first(
    tmp_path: Path, params: dict, named: str
) -> None:
    # the name becomes <work_dir>/<name>.serial.log: "../../x" used to get as far as the image
    routes = None  # refused before any route is touched
    service = VmService("test:///default", tmp_path / "images", tmp_path / "vms", routes)  # type: ignore[arg-type]
    request = {**params, "grant": b"not checked yet", "image_id": "0" * 64, "args": ""}
    for method in (service.start, service.expect):
        with pytest.raises(VmServiceError, match=named):
            trio.run(method, request)
    assert not (tmp_path / "vms").exists()
