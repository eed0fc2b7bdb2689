"""The market world's invariants, checked after every step on what the step touched.

Theory of operation
-------------------
``MarketInvariants`` registers four checks with the ``Simulator``. They read
the world's books, ``MarketAccounts`` (node/sim/market_parts.py), and nothing
else of it: the world marks there what each step touched (a segment paid, a
payee that accepted, a job whose commits changed, an attempt whose replicas
changed) and each check drains those marks and looks only at them, so checking
after every step stays cheap:

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

from node.sim.engine import Simulator
from node.sim.market_parts import MarketAccounts


class MarketInvariants:
    def __init__(self, accounts: MarketAccounts, k: int) -> None:
        self.accounts = accounts
        self.k = k

    def register(self, sim: Simulator) -> None:
        for name, check in (
            ("one_winner_paid_per_segment", self.check_one_winner_paid),
            ("no_double_spend", self.check_no_double_spend),
            ("no_committed_segment_lost", self.check_commits),
            ("at_most_k_replicas_per_attempt", self.check_replicas),
        ):
            sim.add_invariant(name, check)

    def check_one_winner_paid(self, now: float) -> str | None:
        books = self.accounts
        dirty, books.touched_segments = books.touched_segments, set()
        for key in dirty:
            payees = books.payments.get(key, [])
            commit = books.commits.get(key)
            if len(payees) > 1:
                return f"segment {key[1]} of job {key[0].hex()[:8]} paid {len(payees)} times"
            if payees and (commit is None or commit[0] != payees[0]):
                return f"segment {key[1]} of job {key[0].hex()[:8]} paid to a non-winner"
        return None

    def check_no_double_spend(self, now: float) -> str | None:
        books = self.accounts
        dirty, books.touched_payees = books.touched_payees, set()
        for index in dirty:
            payee = books.payees[index]
            if payee.statistics().get("segments_paid_again", 0):
                return f"host {index} accepted a second payment for a segment"
            released: dict[bytes, int] = {}
            for view in payee.chains():
                if view.chain_id not in released:
                    payer = books.payers[view.counterparty]
                    released.update((c.chain_id, c.released) for c in payer.chains())
                if view.accepted > released.get(view.chain_id, 0):
                    return f"host {index} accepted more units than were released"
        return None

    def check_commits(self, now: float) -> str | None:
        books = self.accounts
        dirty, books.touched_jobs = books.touched_jobs, set()
        for job_id in dirty:
            snap = books.machines[job_id].snapshot()
            for segment in range(snap.segment):
                if (job_id, segment) not in books.commits:
                    return f"job {job_id.hex()[:8]} past segment {segment} without its commit"
            if snap.segment and not snap.holders:
                return f"job {job_id.hex()[:8]}'s committed checkpoint has no holder"
        return None

    def check_replicas(self, now: float) -> str | None:
        books = self.accounts
        dirty, books.touched_attempts = books.touched_attempts, set()
        for key in dirty:
            running = books.running_per_attempt[key]
            if running > self.k:
                return f"attempt {key[1]} of job {key[0].hex()[:8]} runs {running} replicas"
        return None
