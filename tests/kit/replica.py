"""Replica hand-off helpers: a fake guest that prints the demo chain, a service on fakes.

Shared by the hand-off tests on fakes (tests/unit/runtime/test_replica_handoff.py),
on real libvirtd hosts (tests/testbed/test_replica_handoff_vm.py) and the market
host's (tests/unit/runtime/test_market_host.py).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from node.base.identity import Identity
from node.runtime.segment_service import SegmentService
from segments.image import workload
from segments.vm.fake import FakeVmRuntime
from segments.vm.replica import Replica, ReplicaMigrated
from segments.vm.runtime import VmState

IDENTITY = Identity.from_seeds(b"\x09" * 32, b"\x0a" * 32)
SEED = "glv"
VM = "gl-handoff"
WAIT_S = 10.0


class ChainFake(FakeVmRuntime):
    """A fake whose running guest prints the next chain step at every vCPU-time reading.

    `chain` (shared by the fakes of one test) is the guests' RAM: step counters
    by domain name, so a migrated or restored guest goes on where it was. Each
    line goes to the serial log the domain has *now*.
    """

    def __init__(self, uri: str, registry: dict, chain: dict[str, int], tick: float = 0.1):
        super().__init__(uri, registry)
        self.chain, self.tick = chain, tick
        self.lock = threading.Lock()

    def start(self, name: str) -> None:
        with self.lock:  # (the service test reads the clock from another thread)
            super().start(name)
            self.chain[name] = 0
            append_text(self.domains[name].spec.serial_log, f"gleaner-start 0 {SEED}\r\n")

    def cpu_time_s(self, name: str) -> float:
        with self.lock:
            domain = self.domains.get(name)
            if domain is not None and domain.state is VmState.RUNNING:
                self.advance(self.tick, name)
                step = self.chain[name] = self.chain[name] + 1
                line = f"gleaner-progress {step} {workload.reference_result(SEED, step)}\r\n"
                append_text(domain.spec.serial_log, line)
            return super().cpu_time_s(name)


def append_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as log:
        log.write(text)


def log_steps(path: Path) -> list[int]:
    try:
        return [step for step, _ in workload.parse_progress(path.read_text(errors="replace"))]
    except FileNotFoundError:
        return []


def wait_until(condition: Callable[[], bool], timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


@contextlib.contextmanager
def threads(*replicas: Replica) -> Iterator[ThreadPoolExecutor]:
    """Worker threads for the replicas; each is cancelled on the way out, so none hangs."""
    with ThreadPoolExecutor(max_workers=len(replicas)) as pool:
        try:
            yield pool
        finally:
            for replica in replicas:
                replica.cancel()


def moved_of(future: Future) -> ReplicaMigrated:
    error = future.exception(timeout=WAIT_S)
    assert isinstance(error, ReplicaMigrated), f"expected ReplicaMigrated, got {error!r}"
    return error


def fake_host_service(
    tmp_path: Path, label: str, runtime: FakeVmRuntime, image: Any
) -> SegmentService:
    """A real SegmentService whose replicas run on the fake libvirt twin and whose store
    holds one image (`image`, whatever the id asked)."""
    return SegmentService(
        IDENTITY,
        tmp_path / label,
        tmp_path / "images",
        lambda: contextlib.nullcontext(runtime),
        lambda _store, _image_id: image,
    )
