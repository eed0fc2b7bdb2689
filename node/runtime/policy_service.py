"""The agent's host-policy edge: sample the host, feed the policy core, obey it.

Every ``policy.sample_interval_s`` a worker thread samples the host
(node/runtime/host_probe.py: the volunteer's CPU load, input, battery, the time of
day) and ``PolicyMachine`` (node/policy/machine.py) judges it. Its effects are
carried out on the host side of the market (node/runtime/market_host.py):

- ``PauseGuests`` / ``ResumeGuests``: every replica's guest is held (paused at
  its next poll, 0.1 s) or released;
- ``VacateGuests``: replicas with siblings elsewhere are given up (WITHDRAW to
  the owner, who lets the siblings finish), a sole replica checkpoints where it
  is and completes early, so its segment goes on from there elsewhere;
- ``SetBidding``: the bidder stops (or starts again) bidding;
- once a draining host runs no replica, ``GuestsEmpty`` makes it DRAINED.

*Ours* (not the volunteer's load): the agent, its wireguard-go and the QEMU
processes of market domains in our namespace (replicas, and the owner's
restores that verify completions), found by their libvirt names in /proc.

Drain is the operator's: ``drain`` / ``undrain`` are persisted (state meta
``drain`` and ``drain_deadline``) before they take effect, and restored at start,
so a drain interrupted by a crash resumes.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any, assert_never

import trio

from node.market.bidder import HostPolicy
from node.policy.machine import (
    DrainRequested,
    GuestsEmpty,
    PauseGuests,
    PolicyConfig,
    PolicyEffect,
    PolicyMachine,
    PolicyState,
    ReportPolicyState,
    ResumeGuests,
    SetBidding,
    UndrainRequested,
    VacateGuests,
)
from node.runtime.host_probe import Probe, ProbeError
from node.runtime.market_host import HostMarket
from node.runtime.segment_service import MARKET_VM
from node.runtime.state import State

log = logging.getLogger("gleaner.policy")

DRAIN_KEY, DEADLINE_KEY = "drain", "drain_deadline"
MARKET_QEMU = re.compile(rb"guest=" + MARKET_VM.pattern.encode() + rb",")


class PolicyService:
    def __init__(
        self,
        config: PolicyConfig,
        state: State,
        host_market: HostMarket,
        probe: Probe,
        interval_s: float,
        base_policy: HostPolicy,
        helper_pids: Callable[[], Iterable[int]] = lambda: (),  # wireguard-go: ours too
    ) -> None:
        self.core = PolicyMachine(config, time.time())
        self.state = state
        self.market = host_market
        self.probe = probe
        self.interval_s = interval_s
        self.base_policy = base_policy
        self.helper_pids = helper_pids
        self.probe_errors = 0
        self._wake = trio.Event()
        self._lock = trio.Lock()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        draining = await trio.to_thread.run_sync(self.state.counter, DRAIN_KEY)
        deadline = await trio.to_thread.run_sync(self.state.counter, DEADLINE_KEY)
        self._apply_bidding(self.core.bidding)
        if draining:
            log.info("resuming the drain this agent was doing when it stopped")
            await self._execute(self.core.restore(True, float(deadline) if deadline else None))
        task_status.started()
        while True:
            await self._sample()
            with trio.move_on_after(self.interval_s):
                await self._wake.wait()
            self._wake = trio.Event()

    async def _sample(self) -> None:
        pids = [*await trio.to_thread.run_sync(self._guest_pids), *self.helper_pids()]
        try:
            sample = await trio.to_thread.run_sync(self.probe.sample, pids, time.time())
        except ProbeError as exc:
            self.probe_errors += 1
            log.warning("sampling the host: %s", exc)
            return
        await self._execute(self.core.handle(sample, time.time()))
        if self.core.state is PolicyState.DRAINING and not self.market.running:
            await self._execute(self.core.handle(GuestsEmpty(), time.time()))

    async def drain(self, deadline: float | None) -> dict[str, Any]:
        await trio.to_thread.run_sync(self.state.set_counter, DEADLINE_KEY, int(deadline or 0))
        await trio.to_thread.run_sync(self.state.set_counter, DRAIN_KEY, 1)
        await self._execute(self.core.handle(DrainRequested(deadline), time.time()))
        self._wake.set()
        return self.status()

    async def undrain(self) -> dict[str, Any]:
        await trio.to_thread.run_sync(self.state.set_counter, DRAIN_KEY, 0)
        await self._execute(self.core.handle(UndrainRequested(), time.time()))
        self._wake.set()
        return self.status()

    def status(self) -> dict[str, Any]:
        return {
            **self.core.status(),
            "replicas_running": len(self.market.running),
            "guests": self.market.guest_names(),
            "probe_errors": self.probe_errors,
        }

    async def _execute(self, effects: list[PolicyEffect]) -> None:
        async with self._lock:
            for effect in effects:
                await self._carry_out(effect)

    async def _carry_out(self, effect: PolicyEffect) -> None:
        match effect:
            case PauseGuests():
                count = self.market.hold_guests(True)
                log.info("volunteer first: pausing %d guest(s): %s", count, effect.reason)
            case ResumeGuests():
                count = self.market.hold_guests(False)
                log.info("host idle again: resuming %d guest(s)", count)
            case VacateGuests():
                count = await self.market.vacate(effect.reason)
                log.info("vacating %d replica(s): %s", count, effect.reason)
            case SetBidding():
                self._apply_bidding(effect.allowed)
                log.info("bidding %s: %s", "on" if effect.allowed else "off", effect.reason)
            case ReportPolicyState():
                log.info("host policy: %s (%s)", effect.state.value, effect.reason)
            case _:
                assert_never(effect)

    def _apply_bidding(self, allowed: bool) -> None:
        self.market.set_policy(replace(self.base_policy, draining=not allowed))

    def _guest_pids(self) -> list[int]:
        """Our QEMU processes in our namespace: every market domain (``MARKET_VM``), the
        replicas' and the owner's verifications of its jobs' checkpoints alike."""
        try:
            mine = os.readlink("/proc/self/ns/net")
        except OSError:
            return []
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes()
                ours = MARKET_QEMU.search(cmdline) is not None
                if ours and os.readlink(entry / "ns" / "net") == mine:
                    pids.append(int(entry.name))
            except OSError:
                continue
        return pids
