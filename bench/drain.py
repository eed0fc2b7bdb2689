"""Volunteers first, measured on a testbed: how fast a guest gets out of the way.

A testbed of N hosts, each with its agent and a private libvirtd; the first host
owns the jobs, the others bid. Each host's policy watches its own namespace
(grace 20 s, quiet 2 s, one sample every 0.5 s; node/testbed/testbed.py), so a busy
loop started there (``Load``) is that host's volunteer coming back.

- `pause_latency_s`: a job of the demo guest with a long extent (k = 2) runs;
  on a host whose replica's libvirt domain is "running", a Load starts, and
  the clock runs until the domain is "paused" (polled every 20 ms over one
  libvirt connection). The Load is then stopped and `resume_latency_s` runs
  until the domain is "running" again. `--trials` trials; a trial whose pause
  was not the policy's (its state was not "busy": a checkpoint pauses a guest
  too) or whose guest left instead of resuming is void, listed and repeated.
- `time_to_empty_s`: two jobs (a k = 2 batch job and a k = 1 network job, two
  segments each) run; on the host running replicas of both (else the most, a
  k = 1 replica breaking a tie), ``drain`` is called with `--deadline`, and
  the clock runs until its policy state is "drained" and its libvirtd lists no
  domain. Both jobs must then complete and pass the market audit
  (node/testbed/market.py): `jobs_ok`.
- `lost_probes_max`, `gap_ms_max`: from just before the drain, the owner's
  namespace probes the network job's overlay address once a millisecond
  (node.testbed.prober) until the guest answers again after the drain (its segment
  continued on another host), or the job ends. The drained host hands its
  network replica on live (docs/decisions.md 26): the owner auctions the rest
  of the segment, the winner pulls the running guest by live migration and
  claims its address when it runs there, so the gap is the migration's
  switch-over plus the claim's spread, not a checkpoint and restore
  (`network_hand_off`: how the drained host let it go, from its statistics,
  with libvirt's own switch-over downtime to set `gap_ms_max` against).

Latencies are the bench process's monotonic clock; the owner's history gives
the drain's consequences (withdrawals, awards after the drain). Prints one JSON
object: figures, samples and conditions (which name any other testbed up on
the machine at the start or the end: its guests share our cores), also when a
bounded wait runs out (`error`). The exit status is 1 if any audit fails, a job
does not complete, the drained host never empties, or a wait runs out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from node.testbed import netns, testbed
from node.testbed.checks import full_mesh, ping, rpc, wait_for
from node.testbed.market import (
    Load,
    audit,
    guest_states,
    job,
    keep_logs,
    market_conditions,
    replica_domain,
    running_replica_hosts,
    spread,
    submit,
    wait_job,
)
from segments.image.store import build
from segments.vm.runtime import LibvirtRuntime, VmError

RECIPE = Path(__file__).resolve().parent.parent / "deploy" / "recipes" / "demo.toml"
SEED = "bench"
ARGS = f"gleaner.steps=0 gleaner.seed={SEED}"  # runs until stopped: jobs end by count
MESH_TIMEOUT_S = 90.0
POLL_S = 0.02  # the domain state, during a trial
PAUSE_TIMEOUT_S = 15.0  # 30 samples; the policy pauses within one
RESUME_TIMEOUT_S = 30.0  # the quiet period is 2 s
GUEST_TIMEOUT_S = 300.0  # a replica's guest running, from submission (TCG, loaded)
JOB_TIMEOUT_S = 900.0
BOTH_WAIT_S = 10.0  # how long to hope for one host running both drain jobs
EMPTY_MARGIN_S = 60.0  # past the drain deadline, before "never empties"
PAUSE_EXTENT_S, DRAIN_EXTENT_S = 30, 20
PROBE_INTERVAL_MS = 1.0
HAND_OFF_STATISTICS = (
    "hand_offs_requested",
    "replicas_handed_off",
    "hand_offs_failed",
    "hand_offs_fell_back",
    "replicas_finished_early",
)
ANSWER_AGAIN_S = 3.0  # replies seen for this long after the handoff end the probe window
LOST_PROBES_NOTE = (
    "the drained host hands the network job's running guest on by live migration to the "
    "host the owner's move auction picks; probes are lost from the switch-over until the "
    "destination's route claim reaches the owner"
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=5, help="the owner and the bidders")
    parser.add_argument("--deadline", type=float, default=120.0, help="drain deadline, seconds")
    parser.add_argument("--trials", type=int, default=3, help="pause/resume trials")
    parser.add_argument("--root", type=Path, help="testbed root (default: a new temporary dir)")
    parser.add_argument("--json", action="store_true", help="print JSON (the only output form)")
    args = parser.parse_args()
    if args.hosts < 4:
        parser.error("needs --hosts >= 4: the owner, the drained host and two bidders for k = 2")
    if not 0 < args.deadline <= 7 * 86400 or args.trials < 1:
        parser.error("needs 0 < --deadline <= a week and --trials >= 1")
    root = args.root or Path(tempfile.mkdtemp(prefix="gleaner-drain-")) / "tb"
    if (root / "testbed.json").exists():  # not ours to bring down
        parser.error(f"a testbed is already up under {root}")
    logs = root / "logs"  # down() removes root/hosts; the logs outlive it
    load_before = os.getloadavg()[0]
    others_before = other_testbeds(root)
    result: dict[str, Any] = {"bench": "drain", "hosts": args.hosts}
    ok = False
    try:
        hosts = testbed.up(args.hosts, root=root)
        wait_for(lambda: full_mesh(hosts), MESH_TIMEOUT_S, "a full mesh")
        image = build(RECIPE, root / "images")
        result.update(measure_pause(hosts, image.id, args.trials))
        result.update(measure_drain(hosts, image.id, args.deadline))
        ok = result["pause_jobs_ok"] and result["jobs_ok"] and result["emptied"]
    except AssertionError as exc:  # a bounded wait ran out (wait_for): report what we have
        result["error"] = str(exc)
    finally:
        keep_logs(root, logs)
        testbed.down(root)
    result.update(
        lost_probes_note=LOST_PROBES_NOTE,
        logs=str(logs),
        conditions=conditions(args, load_before, others_before, other_testbeds(root)),
    )
    print(json.dumps(result))
    return 0 if ok else 1


# -- pause and resume ------------------------------------------------------------------


def measure_pause(hosts: list[dict[str, Any]], image_id: str, trials: int) -> dict[str, Any]:
    """Pause and resume latencies over `trials` valid trials, each on a running guest."""
    owner = hosts[0]
    paused: list[float] = []
    resumed: list[float] = []
    void: list[dict[str, Any]] = []
    jobs: list[str] = []
    while len(paused) < trials and len(void) < 2 * trials:
        if not jobs or job(owner, jobs[-1])["outcome"] is not None:
            jobs.append(pause_job(owner, image_id))
        found = running_guest(owner, hosts, jobs[-1])
        if found is None:  # the job ended before a guest was seen running: a new one
            continue
        host, domain = found
        trial = pause_trial(host, domain)
        if trial["void"]:
            void.append(trial)
        else:
            paused.append(trial["pause_s"])
            resumed.append(trial["resume_s"])
    reports = [audit_job(owner, hosts, job_id)[0] for job_id in jobs]
    result: dict[str, Any] = {"pause_extent_s": PAUSE_EXTENT_S, "pause_trials": len(paused)}
    result.update(spread("pause_latency_s", paused))
    result.update(spread("resume_latency_s", resumed))
    result.update(
        pause_latency_s_samples=paused,
        resume_latency_s_samples=resumed,
        pause_void_trials=void,
        pause_jobs=reports,
        pause_jobs_ok=all(r["ok"] for r in reports),
    )
    return result


def pause_job(owner: dict[str, Any], image_id: str) -> str:
    return submit(owner, image_id, segments=1, redundancy=2, extent_s=PAUSE_EXTENT_S, args=ARGS)


def running_guest(
    owner: dict[str, Any], hosts: list[dict[str, Any]], job_id: str
) -> tuple[dict[str, Any], str] | None:
    """A host whose replica of the job runs its guest, and the domain; None if the job ended.

    Only a host whose policy is idle again: a trial's pause must be the policy's first.
    """
    domain = replica_domain(job_id)
    found: list[dict[str, Any]] = []

    def running_or_over() -> bool:
        if job(owner, job_id)["outcome"] is not None:
            return True
        found[:] = [
            h
            for h in running_replica_hosts(owner, hosts, job_id)
            if (states_of(h) or {}).get(domain) == "running"
            and rpc(h, "status")["policy"]["state"] == "idle"
        ]
        return bool(found)

    wait_for(running_or_over, GUEST_TIMEOUT_S, "a replica's guest running", step_s=0.2)
    return (found[0], domain) if found else None


def pause_trial(host: dict[str, Any], domain: str) -> dict[str, Any]:
    """Load the host until its guest pauses, then stop the load until it runs again."""
    with LibvirtRuntime(host["libvirt_uri"]) as runtime:
        started = time.monotonic()
        load = Load(host)
        try:
            state = poll_state(runtime, domain, "paused", PAUSE_TIMEOUT_S)
            pause_s = time.monotonic() - started
            policy = rpc(host, "status")["policy"]["state"]
        finally:
            load.stop()
        stopped = time.monotonic()
        after = poll_state(runtime, domain, "running", RESUME_TIMEOUT_S)
        resume_s = time.monotonic() - stopped
    trial = {
        "host": host["name"],
        "pause_s": round(pause_s, 3),
        "resume_s": round(resume_s, 3),
        "state": state,
        "policy": policy,
        "after": after,
    }
    trial["void"] = state != "paused" or policy != "busy" or after != "running"
    return trial


def poll_state(runtime: LibvirtRuntime, domain: str, target: str, timeout_s: float) -> str:
    """Poll the domain's state until it is `target`; the last state seen ("gone": no domain)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            state = runtime.state(domain).value
        except VmError:
            return "gone"
        if state == target or time.monotonic() > deadline:
            return state
        time.sleep(POLL_S)


# -- drain -----------------------------------------------------------------------------


def measure_drain(hosts: list[dict[str, Any]], image_id: str, deadline_s: float) -> dict[str, Any]:
    """Drain the host running the most replicas; time until it is drained and empty."""
    owner = hosts[0]
    jobs = {
        submit(
            owner,
            image_id,
            segments=2,
            redundancy=k,
            extent_s=DRAIN_EXTENT_S,
            network=k == 1,
            args=ARGS,
        ): k
        for k in (2, 1)
    }
    [network_job] = [j for j, k in jobs.items() if k == 1]
    address = job(owner, network_job)["address"]
    host, running = busiest_host(owner, hosts, jobs)
    prober = Prober(owner, address, deadline_s + EMPTY_MARGIN_S + JOB_TIMEOUT_S)
    try:
        # The guest must answer before the drain, or its boot would count as the drain's gap.
        wait_for(lambda: ping(owner, address), GUEST_TIMEOUT_S, "the network job answering")
        return drain_under_probe(owner, hosts, deadline_s, jobs, host, running, prober)
    finally:
        prober.close()


def drain_under_probe(
    owner: dict[str, Any],
    hosts: list[dict[str, Any]],
    deadline_s: float,
    jobs: dict[str, int],
    host: dict[str, Any],
    running: list[str],
    prober: Prober,
) -> dict[str, Any]:
    [network_job] = [j for j, k in jobs.items() if k == 1]
    policy_before = rpc(host, "status")["policy"]
    drained_at = time.time()
    started = time.monotonic()
    rpc(host, "drain", deadline_s=deadline_s)
    marks: dict[str, float] = {}

    def drained_and_empty() -> bool:
        now = time.monotonic() - started
        if "drained" not in marks and rpc(host, "status")["policy"]["state"] == "drained":
            marks["drained"] = now
        if "empty" not in marks and states_of(host) == {}:
            marks["empty"] = now
        return len(marks) == 2

    try:
        wait_for(drained_and_empty, deadline_s + EMPTY_MARGIN_S, "the host drained and empty")
        emptied = True
    except AssertionError:
        emptied = False
    policy_after = rpc(host, "status")["policy"]
    probed = prober.until_answered_elsewhere(owner, network_job, host["node_id"])
    market = rpc(host, "market")
    hand_off = {key: market["statistics"].get(key, 0) for key in HAND_OFF_STATISTICS}
    hand_off["downtime_ms"] = [h["downtime_ms"] for h in market["hand_offs"]]  # libvirt's
    audited = [audit_job(owner, hosts, job_id) for job_id in jobs]
    reports = [report for report, _detail in audited]
    details = [detail for _report, detail in audited]
    consequences = drain_consequences(details, host["node_id"], drained_at)
    return {
        "drain_deadline_s": deadline_s,
        "drain_extent_s": DRAIN_EXTENT_S,
        "drained_host": host["name"],
        "drained_replicas": [{"job": j[:12], "k": jobs[j]} for j in running],
        "emptied": emptied,
        "time_to_empty_s": round(max(marks.values()), 3) if emptied else None,
        "time_to_drained_state_s": round(marks["drained"], 3) if "drained" in marks else None,
        "time_to_no_guests_s": round(marks["empty"], 3) if "empty" in marks else None,
        "policy_before": policy_before["state"],
        "policy_after": policy_after["state"],
        "policy_after_reason": policy_after["reason"],
        **consequences,
        **probed,
        "network_hand_off": hand_off,
        "drain_jobs": reports,
        "jobs_ok": all(r["ok"] for r in reports),
    }


class Prober:
    """node.testbed.prober in the owner's namespace, one ICMPv6 echo a millisecond to `address`."""

    def __init__(self, owner: dict[str, Any], address: str, duration_s: float) -> None:
        self.stop_file = Path(tempfile.mkdtemp(prefix="gleaner-probe-")) / "stop"
        command = [
            sys.executable,
            "-m",
            "node.testbed.prober",
            address,
            "--interval-ms",
            str(PROBE_INTERVAL_MS),
            "--duration-s",
            str(duration_s),
            "--stop-file",
            str(self.stop_file),
        ]
        self.process = subprocess.Popen(
            netns.exec_command(owner["netns"], command), stdout=subprocess.PIPE, text=True
        )

    def until_answered_elsewhere(
        self, owner: dict[str, Any], job_id: str, drained: str
    ) -> dict[str, Any]:
        """Probe until the job's address is held by another host and answers there for
        `ANSWER_AGAIN_S` (or the job ended); then the probe figures."""
        address = job(owner, job_id)["address"]

        def moved_on() -> bool:
            if job(owner, job_id)["outcome"] is not None:
                return True
            routes = rpc(owner, "routes")["routes"]
            holder = next((r["node_id"] for r in routes if r["address"] == address), None)
            return holder not in (None, drained) and ping(owner, address)

        try:
            wait_for(moved_on, JOB_TIMEOUT_S, "the network job answering elsewhere", 0.2)
            time.sleep(ANSWER_AGAIN_S)
        finally:
            self.stop_file.touch()
            try:
                out, _ = self.process.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                out, _ = self.process.communicate()
        probe = json.loads(out) if out and out.strip() else {}
        runs = probe.get("lost_runs") or []
        before_first_reply = runs[0][1] if runs and runs[0][0] == 0 else 0
        return {
            # probes lost once the guest had answered: the drain's, not its boot's
            "lost_probes_max": probe["lost"] - before_first_reply if probe else None,
            "gap_ms_max": probe.get("gap_ms_max"),
            "probes_sent": probe.get("sent"),
            "probe_interval_ms": PROBE_INTERVAL_MS,
            "network_job_address": address,
        }

    def close(self) -> None:
        """Stop the prober if it still runs (a failed wait): by its PID, and reap it."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.communicate()


def busiest_host(
    owner: dict[str, Any], hosts: list[dict[str, Any]], jobs: dict[str, int]
) -> tuple[dict[str, Any], list[str]]:
    """The bidder running replicas (guests "running") of the most jobs, and those jobs.

    One running both is taken at once; else, once every job runs somewhere and
    `BOTH_WAIT_S` has passed since the first guest ran (or three times that
    whatever runs), the one running the most, a k = 1 replica breaking a tie
    (its drain checkpoints; a k = 2 one's withdraws).
    """
    first_seen: list[float] = []
    chosen: list[tuple[dict[str, Any], list[str]]] = []

    def settled() -> bool:
        running: dict[str, list[str]] = {}
        by_name = {h["name"]: h for h in hosts}
        for job_id in jobs:
            for h in running_replica_hosts(owner, hosts, job_id):
                if (states_of(h) or {}).get(replica_domain(job_id)) == "running":
                    running.setdefault(h["name"], []).append(job_id)
        if not running:
            return False
        if not first_seen:
            first_seen.append(time.monotonic())
        name = max(running, key=lambda n: (len(running[n]), -min(jobs[j] for j in running[n])))
        every_job = {j for js in running.values() for j in js} == set(jobs)
        waited = time.monotonic() - first_seen[0]
        if (
            len(running[name]) == len(jobs)
            or (every_job and waited >= BOTH_WAIT_S)
            or waited >= 3 * BOTH_WAIT_S  # a job slow to start: take what runs
        ):
            chosen[:] = [(by_name[name], running[name])]
            return True
        return False

    wait_for(settled, GUEST_TIMEOUT_S, "replicas' guests running", step_s=0.2)
    return chosen[0]


def drain_consequences(
    details: list[dict[str, Any]], node_id: str, drained_at: float
) -> dict[str, Any]:
    """What the owners saw of the drain: withdrawals, and awards to the host after it."""
    rows = [r for d in details for r in d["history"] if r["node"] == node_id]
    after = [r for r in rows if r["t"] >= drained_at]
    return {
        "withdrawn_after_drain": sum(1 for r in after if r["what"] == "withdrawn"),
        "completions_after_drain": sum(1 for r in after if r["what"] == "completion"),
        "awards_after_drain": sum(1 for r in after if r["what"] == "awarded"),
        "outcomes": [d["outcome"] for d in details],
    }


# -- shared ----------------------------------------------------------------------------


def audit_job(
    owner: dict[str, Any], hosts: list[dict[str, Any]], job_id: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Wait for the job and audit it: the report (ok only if it completed and the audit
    found nothing) and the job's detail. A job still running at the bound is reported."""
    try:
        detail = wait_job(owner, job_id, JOB_TIMEOUT_S)
    except AssertionError as exc:
        detail = job(owner, job_id)
        report = {"job": job_id[:12], "k": detail["k"], "outcome": None, "ok": False}
        return {**report, "problems": [str(exc)], "last_step": None}, detail
    audited = audit(owner, hosts, job_id, SEED)
    report = {
        "job": job_id[:12],
        "k": detail["k"],
        "outcome": detail["outcome"],
        "ok": audited.ok and detail["outcome"] == "completed",
        "problems": audited.problems,
        "last_step": audited.last_step,
    }
    return report, detail


def states_of(host: dict[str, Any]) -> dict[str, str] | None:
    """`guest_states`; None if the host's libvirtd could not be asked (a transient error)."""
    try:
        return guest_states(host)
    except VmError:
        return None


def other_testbeds(root: Path) -> list[str]:
    """Tags of testbeds up on this machine besides ours: their load is in our figures."""
    ours = testbed._tag(root)
    tags = {ns.split("-")[1] for ns in netns.list_namespaces() if ns.startswith("gl-")}
    return sorted(tags - {ours})


def conditions(
    args: argparse.Namespace, load_before: float, others_before: list[str], others_after: list[str]
) -> dict[str, Any]:
    return {
        **market_conditions(args.hosts, load_before),
        "policy": "scope netns, max_other_load 0.3, grace 20 s, quiet 2 s, sample 0.5 s",
        "load": "one busy Python loop in the host's namespace (one core)",
        "state_poll_s": POLL_S,
        "clock": "the bench's monotonic clock (one machine)",
        "other_testbeds_before": others_before,
        "other_testbeds_after": others_after,
    }


if __name__ == "__main__":
    sys.exit(main())
