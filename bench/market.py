"""One job through the market on a testbed: where the time between segments goes.

A testbed of N hosts, each with its agent and a private libvirtd; the first host
owns the job, the others bid on it. One job of the demo guest (its hash-chain
workload, run until stopped) is submitted: `--segments` segments of
`--extent` seconds, each run by k replicas. When it has finished, the market
is audited from both sides (node/testbed/market.py); a failed audit is
reported and the exit status is 1.

Every figure comes from the owner's job history (node/runtime/market_owner.py), so
from the owner's wall clock; all hosts share one machine, hence one clock.

- `offer_to_award_ms`: per attempt, its "offered" row to its first "awarded"
  row (the auction: offers out, bids in, the award sent to the first winner).
- `segment_gap_ms`: per segment i > 0, the first "completion" row of segment
  i - 1's committed attempt (in the order the owner received them) to the
  first "awarded" row of segment i: the time the job stands still between
  segments. It is the sum of three parts, reported per boundary too:
  `completion_to_commit_ms` (segment i - 1: verification, which fetches and
  restores the checkpoint, then enough holders), `commit_to_next_offer_ms`
  (commit of i - 1 to the first offer of i) and `next_offer_to_award_ms` (the
  first offer of i to its first award, re-offers included).
- `verify_ms`: the "ms" of every "verified" row (fetch, restore, check).
- `segment_wall_s`: per segment, its first offer to its commit.
- `job_wall_s`: the "submitted" row to the "finished" row.

Prints one JSON object: medians and maxima, the samples, and the conditions.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from node.testbed import testbed
from node.testbed.checks import full_mesh, rpc, wait_for
from node.testbed.market import audit, keep_logs, market_conditions, spread, submit, wait_job
from segments.image.store import build

RECIPE = Path(__file__).resolve().parent.parent / "deploy" / "recipes" / "demo.toml"
SEED = "bench-market"
ARGS = f"gleaner.steps=0 gleaner.seed={SEED}"  # runs until stopped: the job ends by count
MESH_TIMEOUT_S = 90.0
JOB_TIMEOUT_BASE_S = 120.0
JOB_TIMEOUT_PER_SEGMENT_S = 150.0  # a bound for a loaded 2-core machine under TCG


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=5, help="the owner and the bidders")
    parser.add_argument("--segments", type=int, default=5)
    parser.add_argument("--k", type=int, default=2, help="replicas per segment")
    parser.add_argument("--extent", type=int, default=2, help="seconds per segment")
    parser.add_argument("--root", type=Path, help="testbed root (default: a new temporary dir)")
    parser.add_argument("--json", action="store_true", help="print JSON (the only output form)")
    args = parser.parse_args()
    if args.hosts < 2 or not 1 <= args.k <= args.hosts - 1:
        parser.error("needs --hosts >= 2 and 1 <= --k <= hosts - 1 (the owner does not bid)")
    if args.segments < 1 or args.extent < 1:
        parser.error("--segments and --extent must be at least 1")
    root = args.root or Path(tempfile.mkdtemp(prefix="gleaner-market-")) / "tb"
    if (root / "testbed.json").exists():  # not ours to bring down
        parser.error(f"a testbed is already up under {root}")
    logs = root / "logs"  # down() removes root/hosts; the logs outlive it
    load_before = os.getloadavg()[0]
    try:
        hosts = testbed.up(args.hosts, root=root)
        wait_for(lambda: full_mesh(hosts), MESH_TIMEOUT_S, "a full mesh")
        image = build(RECIPE, root / "images")
        owner = hosts[0]
        job_id = submit(
            owner,
            image.id,
            segments=args.segments,
            redundancy=args.k,
            extent_s=args.extent,
            args=ARGS,
        )
        timeout = JOB_TIMEOUT_BASE_S + JOB_TIMEOUT_PER_SEGMENT_S * args.segments
        detail = wait_job(owner, job_id, timeout)
        report = audit(owner, hosts, job_id, SEED)
        paid = rpc(owner, "ledger")["payer"]["payments"]
        result = summarise(detail["history"], detail, args)
        result.update(
            audit_ok=report.ok,
            audit_problems=report.problems,
            outcome=detail["outcome"],
            last_step=report.last_step,
            owner_ledger_units=sum(p["units"] for p in paid if p["job_id"] == job_id),
            logs=str(logs),
            conditions=conditions(args, load_before),
        )
        print(json.dumps(result))
        return 0 if report.ok and detail["outcome"] == "completed" else 1
    finally:
        keep_logs(root, logs)
        testbed.down(root)


def summarise(
    history: list[dict[str, Any]], detail: dict[str, Any], args: argparse.Namespace
) -> dict[str, Any]:
    """The figures, from the owner's history rows alone (pure: no I/O)."""
    by_what: dict[str, list[dict[str, Any]]] = {}
    for row in history:
        by_what.setdefault(row["what"], []).append(row)
    offered = by_what.get("offered", [])
    awarded = by_what.get("awarded", [])
    committed = {r["segment"]: r for r in by_what.get("committed", [])}
    first_award: dict[tuple[int, int], float] = {}
    for r in awarded:
        first_award.setdefault((r["segment"], r["attempt"]), r["t"])
    offer_to_award = [
        ms(first_award[(r["segment"], r["attempt"])] - r["t"])
        for r in offered
        if (r["segment"], r["attempt"]) in first_award
    ]
    first_offer = _first_t(offered)
    first_award_of_segment = _first_t(awarded)
    boundaries = []
    for segment in sorted(committed):
        previous = committed.get(segment - 1)
        if previous is None or segment not in first_award_of_segment:
            continue
        completed = next(
            (
                r["t"]
                for r in by_what.get("completion", [])
                if r["segment"] == segment - 1 and r["attempt"] == previous["attempt"]
            ),
            None,
        )
        if completed is None:  # a commit without a completion: the audit says so
            continue
        awarded_at = first_award_of_segment[segment]
        boundaries.append(
            {
                "segment": segment,
                "gap_ms": ms(awarded_at - completed),
                "completion_to_commit_ms": ms(previous["t"] - completed),
                "commit_to_next_offer_ms": ms(first_offer[segment] - previous["t"]),
                "next_offer_to_award_ms": ms(awarded_at - first_offer[segment]),
            }
        )
    verify = [r["ms"] for r in by_what.get("verified", [])]
    walls = [round(committed[s]["t"] - first_offer[s], 3) for s in sorted(committed)]
    submitted = by_what["submitted"][0]["t"]
    finished = by_what["finished"][0]["t"] if "finished" in by_what else None
    result: dict[str, Any] = {
        "bench": "market",
        "hosts": args.hosts,
        "segments": args.segments,
        "k": args.k,
        "extent_s": args.extent,
        "job_wall_s": round(finished - submitted, 3) if finished is not None else None,
        "segments_committed": len(committed),
        "attempts": len(offered),
        "offers_without_award": len(offered) - len(offer_to_award),
        "rejected": len(by_what.get("rejected", [])),
        "paid_units": detail["paid_units"],
    }
    result.update(spread("offer_to_award_ms", offer_to_award))
    result.update(spread("segment_gap_ms", [b["gap_ms"] for b in boundaries]))
    result.update(spread("verify_ms", verify))
    for part in ("completion_to_commit_ms", "commit_to_next_offer_ms", "next_offer_to_award_ms"):
        result.update(spread(part, [b[part] for b in boundaries]))
    result.update(spread("segment_wall_s", walls))
    result["offer_to_award_ms_samples"] = offer_to_award
    result["verify_ms_samples"] = verify
    result["segment_wall_s_samples"] = walls
    result["boundaries"] = boundaries
    return result


def _first_t(rows: list[dict[str, Any]]) -> dict[int, float]:
    """Each segment's first row's time (history rows are in the order they happened)."""
    first: dict[int, float] = {}
    for r in rows:
        first.setdefault(r["segment"], r["t"])
    return first


def ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


def conditions(args: argparse.Namespace, load_before: float) -> dict[str, Any]:
    return {
        **market_conditions(args.hosts, load_before),
        "clock": "the owner's wall clock (one machine)",
    }


if __name__ == "__main__":
    sys.exit(main())
