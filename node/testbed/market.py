"""The market on a running testbed: submit a job, wait for it, and audit what happened.

Shared by the market tests, ``bench/market.py`` and the demo. ``audit`` reads
the owner's job history (offers, awards, completions in arrival order,
commits, payments) and every host's payee ledger, and checks the rules of the
market from both sides:

- every segment is committed once and paid once, to exactly one host;
- that host is the first completer of the committed attempt (in the order the
  owner received completions; a rejected completion does not count);
- the host's own ledger holds that payment, and no other host's does;
- the guest's console, joined across segments, is one unbroken run of the
  demo workload's hash chain from the seed, equal to the reference.
"""

from __future__ import annotations

import datetime
import os
import platform
import shutil
import statistics
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from node.runtime.control import call
from node.runtime.segment_service import market_vm_name
from node.testbed.checks import full_mesh, wait_for
from segments.image.workload import ContinuityError, check_continuity, parse_progress, parse_result


def submit(owner: dict[str, Any], image_id: str, **settings: Any) -> str:
    job = {
        "image": image_id,
        "memory_mib": 128,
        "vcpus": 1,
        "extent_s": 2,
        "segments": 5,
        "redundancy": 2,
        "price_ceiling": 20,
        **settings,
    }
    return str(call(Path(owner["socket"]), "job_submit", {"job": job}, timeout=30)["job_id"])


def job(owner: dict[str, Any], job_id: str) -> dict[str, Any]:
    return dict(call(Path(owner["socket"]), "job", {"job": job_id}, timeout=10))


def wait_job(owner: dict[str, Any], job_id: str, timeout_s: float) -> dict[str, Any]:
    wait_for(lambda: job(owner, job_id)["outcome"] is not None, timeout_s, f"job {job_id[:12]}")
    return job(owner, job_id)


@dataclass
class Audit:
    rows: list[dict[str, Any]]
    problems: list[str] = field(default_factory=list)
    result: str | None = None
    last_step: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def audit(owner: dict[str, Any], hosts: list[dict[str, Any]], job_id: str, seed: str) -> Audit:
    detail = job(owner, job_id)
    report = Audit(detail["rows"])
    problems = report.problems
    names = {h["node_id"]: h["name"] for h in hosts}
    rejected = {(r["segment"], r["node"]) for r in detail["history"] if r["what"] == "rejected"}
    received: dict[int, list[str]] = {}  # segment -> hosts whose ledgers hold its payment
    for host in hosts:
        if host is owner:
            continue
        for payment in call(Path(host["socket"]), "ledger", None, timeout=10)["payee"]["payments"]:
            if payment["job_id"] == job_id:
                received.setdefault(payment["segment"], []).append(host["node_id"])
    for row in detail["rows"]:
        segment = row["segment"]
        if row["winner"] is None:
            problems.append(f"segment {segment} never committed")
            continue
        committed = [
            r for r in detail["history"] if r["what"] == "committed" and r["segment"] == segment
        ]
        attempt = committed[0]["attempt"]
        arrivals = [
            c["node"]
            for c in row["completions"]
            if c["attempt"] == attempt and (segment, c["node"]) not in rejected
        ]
        paid = received.get(segment, [])
        if len(committed) != 1:
            problems.append(f"segment {segment} committed {len(committed)} times")
        if row["paid_to"] != row["winner"]:
            problems.append(f"segment {segment}: paid {row['paid_to']}, won by {row['winner']}")
        if not arrivals or arrivals[0] != row["winner"]:
            first = names.get(arrivals[0], arrivals[0]) if arrivals else None
            problems.append(f"segment {segment}: first valid completion by {first}, not the winner")
        if paid != [row["winner"]]:
            problems.append(f"segment {segment}: hosts' ledgers show payments to {paid}")
    console = str(call(Path(owner["socket"]), "job_output", {"job": job_id}, timeout=30)["console"])
    lines = parse_progress(console)
    try:
        every = lines[1][0] - lines[0][0] if len(lines) > 1 else 1
        check_continuity(lines, seed=seed, every=every)
        report.last_step = lines[-1][0]
    except (ContinuityError, IndexError) as exc:
        problems.append(f"the guest's output is not the reference chain: {exc}")
    report.result = parse_result(console) or (lines[-1][1] if lines else None)
    return report


def guest_states(host: dict[str, Any]) -> dict[str, str]:
    """The libvirt state of every domain on the host's private libvirtd."""
    from segments.vm.runtime import LibvirtRuntime

    with LibvirtRuntime(host["libvirt_uri"]) as runtime:
        return {name: state.value for name, state in runtime.list_vms().items()}


def running_replica_hosts(
    owner: dict[str, Any], hosts: list[dict[str, Any]], job_id: str
) -> list[dict[str, Any]]:
    """The hosts running a replica of the job's current segment (awarded, not completed)."""
    rows = job(owner, job_id)["rows"]
    if not rows or rows[-1]["winner"] is not None:
        return []
    by_id = {h["node_id"]: h for h in hosts}
    done = {c["node"] for c in rows[-1]["completions"]}
    return [by_id[n] for n in rows[-1]["replicas"] if n in by_id and n not in done]


class Load:
    """A volunteer's CPU load: a busy loop in a testbed host's namespace, stopped by PID."""

    def __init__(self, host: dict[str, Any]) -> None:
        import subprocess
        import sys

        from node.testbed import netns

        argv = [sys.executable, "-c", "while True: pass"]
        self.process = subprocess.Popen(netns.exec_command(host["netns"], argv))

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


RECIPE = Path(__file__).resolve().parents[2] / "deploy" / "recipes" / "demo.toml"


@contextmanager
def market_swarm(root: Path, hosts: int) -> Iterator[tuple[list[dict[str, Any]], str]]:
    """A testbed of `hosts` in a full mesh and the demo image: (hosts, image id).

    The agents' logs are copied to ``root``'s sibling ``logs`` before teardown,
    for a failure's post-mortem; teardown happens on every path.
    """
    from node.testbed import testbed
    from segments.image.store import build

    try:
        described = testbed.up(hosts, root=root)
        wait_for(lambda: full_mesh(described), 90, "a full mesh")
        yield described, build(RECIPE, root / "images").id
    finally:
        keep_logs(root, root.parent / "logs")
        testbed.down(root)


def keep_logs(root: Path, logs: Path) -> None:
    """Copy every agent's log out of the testbed before `down` removes it."""
    logs.mkdir(parents=True, exist_ok=True)
    for log in (root / "hosts").glob("*/agent.log"):
        shutil.copy2(log, logs / f"{log.parent.name}.log")


def replica_domain(job_id: str) -> str:
    """The libvirt domain a host runs the job's replica as (hex job id)."""
    return f"gl-{market_vm_name(bytes.fromhex(job_id))}"


def spread(name: str, values: list[float]) -> dict[str, float | None]:
    """`name`_median and `name`_max, for a benchmark's JSON; None without a sample."""
    if not values:
        return {f"{name}_median": None, f"{name}_max": None}
    return {f"{name}_median": round(statistics.median(values), 3), f"{name}_max": max(values)}


def market_conditions(hosts: int, load_before: float) -> dict[str, Any]:
    """What a market benchmark ran on: the machine, the swarm and the guest."""
    from segments.vm.runtime import kvm_usable

    return {
        "cores": os.cpu_count(),
        "accelerator": "KVM" if kvm_usable() else "TCG",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "load_1m_before": round(load_before, 2),
        "load_1m_after": round(os.getloadavg()[0], 2),
        "owner": "h1 (does not bid)",
        "bidders": hosts - 1,
        "guest": "demo image, hash-chain workload run until stopped",
        "guest_memory_mib": 128,
        "guest_vcpus": 1,
    }


def finish(
    owner: dict[str, Any], hosts: list[dict[str, Any]], job_id: str, seed: str, timeout_s: float
) -> tuple[dict[str, Any], Audit]:
    """Wait for the job to end and audit it: (its detail, the audit)."""
    detail = wait_job(owner, job_id, timeout_s)
    return detail, audit(owner, hosts, job_id, seed)
