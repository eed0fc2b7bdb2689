"""The host probe in a network namespace: a testbed host counts its own namespace's load.

The probe's arithmetic and the real-host comparisons are tests/unit/runtime/test_host_probe.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from node.runtime.host_probe import HostProbe
from node.testbed import netns


@pytest.mark.netns
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for a network namespace")
def test_namespace_only_sees_its_own_namespace_not_a_neighbours():
    """A testbed host's probe counts a load in its own namespace, not in another's."""
    name = f"glprobe{os.getpid()}"
    netns.add_namespace(name)
    spinner = subprocess.Popen(netns.exec_command(name, [sys.executable, "-c", "while True: pass"]))
    try:
        scoped, whole = HostProbe(namespace_only=True), HostProbe()
        scoped_ticks = whole_ticks = 0.0
        for _ in range(600):
            time.sleep(0.1)
            now = time.time()
            scoped_ticks += (
                scoped.sample([], now).other_load * scoped.statistics()["interval_ticks"]
            )
            whole_ticks += whole.sample([], now).other_load * whole.statistics()["interval_ticks"]
            if whole_ticks >= 50:
                break
        else:
            pytest.fail("the busy loop in the other namespace never showed")
        assert scoped_ticks < whole_ticks / 2, (scoped_ticks, whole_ticks)
    finally:
        spinner.kill()
        spinner.wait()
        netns.delete_namespace(name)
