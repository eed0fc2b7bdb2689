"""The market world's invariants, checked after every step on what the step touched.

Theory of operation
-------------------
``MarketInvariants`` registers four checks with the ``Simulator``; the world
marks what each step touched (a segment paid, a payee that accepted, a job
whose replicas or commits changed) and each check looks only at those, so
checking after every step stays cheap:

* ``one_winner_paid_per_segment``: a segment is paid once, to the winner the
  owner committed (PayWinner), as the payees' ledgers report it;
* ``no_double_spend``: no payee accepts a second payment for a segment, nor
  more units on a chain than its payer released (from the cores' own state);
* ``no_committed_segment_lost``: a job past segment n has the commits of
  0..n-1 on record, and its last committed checkpoint has holders;
* ``at_most_k_replicas_per_attempt``: no attempt of a segment runs more than
  k replicas at once. (Per attempt, not per job: when a CANCEL of an
  abandoned attempt is lost, its replica runs on beside the new attempt's k,
  until its completion draws the CANCEL again. That is waste, not a breach.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from node.sim.market_world import MarketWorld


class MarketInvariants:
    def __init__(self, world: MarketWorld) -> None:
        self.world = world
        self.segments: set[tuple[bytes, int]] = set()
        self.payees: set[int] = set()
        self.jobs: set[bytes] = set()
        self.attempts: set[tuple[bytes, int]] = set()
        for name, check in (
            ("one_winner_paid_per_segment", self.check_one_winner_paid),
            ("no_double_spend", self.check_no_double_spend),
            ("no_committed_segment_lost", self.check_commits),
            ("at_most_k_replicas_per_attempt", self.check_replicas),
        ):
            world.sim.add_invariant(name, check)

    def check_one_winner_paid(self, now: float) -> str | None:
        dirty, self.segments = self.segments, set()
        for key in dirty:
            payees = self.world.payments.get(key, [])
            commit = self.world.commits.get(key)
            if len(payees) > 1:
                return f"segment {key[1]} of job {key[0].hex()[:8]} paid {len(payees)} times"
            if payees and (commit is None or commit[0] != payees[0]):
                return f"segment {key[1]} of job {key[0].hex()[:8]} paid to a non-winner"
        return None

    def check_no_double_spend(self, now: float) -> str | None:
        dirty, self.payees = self.payees, set()
        for index in dirty:
            payee = self.world.hosts[index].payee
            if payee.statistics().get("segments_paid_again", 0):
                return f"host {index} accepted a second payment for a segment"
            released: dict[bytes, int] = {}
            for view in payee.chains():
                if view.chain_id not in released:
                    owner = self.world.owners[self.world.by_node[view.counterparty][1]]
                    released.update((c.chain_id, c.released) for c in owner.payer.chains())
                if view.accepted > released.get(view.chain_id, 0):
                    return f"host {index} accepted more units than were released"
        return None

    def check_commits(self, now: float) -> str | None:
        dirty, self.jobs = self.jobs, set()
        for job_id in dirty:
            machine = self.world.job_owner[job_id].machines[job_id]
            snap = machine.snapshot()
            for segment in range(snap.segment):
                if (job_id, segment) not in self.world.commits:
                    return f"job {job_id.hex()[:8]} past segment {segment} without its commit"
            if snap.segment and not snap.holders:
                return f"job {job_id.hex()[:8]}'s committed checkpoint has no holder"
        return None

    def check_replicas(self, now: float) -> str | None:
        dirty, self.attempts = self.attempts, set()
        for key in dirty:
            running = self.world.running_per_attempt[key]
            if running > self.world.config.k:
                return f"attempt {key[1]} of job {key[0].hex()[:8]} runs {running} replicas"
        return None
