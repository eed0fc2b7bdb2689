"""SWIM's failure detector: the probe in flight, PING_REQ relays for others, local health.

Theory of operation
-------------------
``FailureDetector`` is the probing half of one node's ``Membership``
(node/membership/swim.py tells the whole protocol: *Probing* and *Local health*
are the parts kept here). It owns

- the probe in flight: one target per round, a direct PING, after the probe
  timeout PING_REQs to helpers and a fallback PING, and at the end of the round
  the verdict (ACKed; or failed, and then retried, or the target suspected);
- the relays this node runs for other probers: the target is PINGed with a nonce
  of ours, its ACK is forwarded with theirs, and a NACK goes back when the target
  is silent for ``nack_timeout_s``;
- Lifeguard's local health score, which stretches the probe interval and timeout.

It sends through the ``send`` and ``reply`` it is handed (the core's, which
piggyback news and answer strangers at their endpoint), marks suspects in the
``MemberTable`` and counts into the core's statistics. It reads no clock: every
call takes ``now``. ``Membership`` decides when a round ends and starts, as
joining and the periodic sync run between the two.

Invariants
----------
- At most one probe is in flight; an ACK counts only with its nonce (or that of
  an earlier round against the same target) and only from the target or a helper
  we asked.
- At most ``MAX_RELAYS`` relays are open; each is dropped a probe interval after
  it opened, and NACKed at most once, only if its target has not ACKed.
- ``0 <= health <= config.local_health_max``.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from node.base.identity import NodeId
from node.base.wire import MessageType
from node.membership.config import MembershipConfig
from node.membership.random_set import RandomSource
from node.membership.table import LIVE, MemberTable

MAX_RELAYS = 1024

Send = Callable[[NodeId, MessageType, dict[str, Any]], None]
Reply = Callable[[NodeId, str, MessageType, dict[str, Any]], None]


@dataclass(slots=True)
class _Probe:
    target: NodeId
    nonce: int
    ack_deadline: float
    helpers: tuple[NodeId, ...] = ()
    nacks: tuple[NodeId, ...] = ()  # helpers that answered NACK
    indirect_sent: bool = False
    acked: bool = False
    round_number: int = 1  # of config.probe_rounds against this target
    # earlier rounds against this target: a late ACK to one (a helper's relay stays open
    # for a probe interval) proves the target alive as well as one to this round
    earlier_nonces: tuple[int, ...] = ()
    earlier_helpers: tuple[NodeId, ...] = ()


@dataclass(frozen=True, slots=True)
class _Relay:
    requester: NodeId
    via: str
    nonce: int
    target: NodeId


class FailureDetector:
    """Probe rounds, relays and local health of one node. See the module docstring."""

    def __init__(
        self,
        own_id: NodeId,
        config: MembershipConfig,
        rng: RandomSource,
        table: MemberTable,
        stats: Counter[str],
        *,
        send: Send,
        reply: Reply,
    ) -> None:
        self.config = config
        self._id = own_id
        self._rng = rng
        self._table = table
        self._stats = stats
        self._send = send
        self._reply = reply
        self._probe: _Probe | None = None
        self._relays: dict[int, _Relay] = {}
        self._relay_expiry: deque[tuple[float, int]] = deque()
        self._nacks_due: deque[tuple[float, int]] = deque()  # (when, relay nonce)
        self.health = 0  # Lifeguard's local health score, 0 (healthy) to local_health_max
        self.next_probe_at = math.inf

    def start(self, now: float) -> None:
        """The first round begins at a random point of the first probe interval."""
        self.next_probe_at = now + self._rng.random() * self.config.probe_interval_s

    def next_wakeup(self) -> float:
        """The earliest time ``check_ack_deadline``, ``end_round`` or ``expire_relays`` has work."""
        wakeup = self.next_probe_at
        probe = self._probe
        if probe is not None and not probe.acked and not probe.indirect_sent:
            wakeup = min(wakeup, probe.ack_deadline)
        if self._nacks_due:
            wakeup = min(wakeup, self._nacks_due[0][0])
        return wakeup

    def cancel(self) -> None:
        """Drop the probe in flight (this node left): no verdict, no retry."""
        self._probe = None

    # -- our probes ------------------------------------------------------------------

    def check_ack_deadline(self, now: float) -> None:
        """No ACK by the probe timeout: go indirect, once per round."""
        probe = self._probe
        if probe and not probe.acked and not probe.indirect_sent and now >= probe.ack_deadline:
            self._probe_indirectly(probe)

    def end_round(self, now: float) -> _Probe | None:
        """Close the round (due at ``next_probe_at``): score it, schedule the next.

        Returns the probe to repeat against the same target, if any.
        """
        probe = self._probe
        retry = self._end_probe(probe, now) if probe is not None else None
        self._probe = None
        scale = self.health + 1  # Lifeguard: an unhealthy node probes slower and waits longer
        self.next_probe_at = now + self.config.probe_interval_s * scale
        return retry

    def start_round(self, now: float, retry: _Probe | None) -> None:
        """PING the next target of the round-robin, or `retry`'s target once more."""
        scale = self.health + 1
        target = retry.target if retry is not None else self._table.next_probe_target()
        if target is not None:
            deadline = now + self.config.probe_timeout_s * scale
            self._probe = _Probe(target, self._rng.getrandbits(62), deadline)
            if retry is not None:
                self._probe.round_number = retry.round_number + 1
                self._probe.earlier_nonces = (*retry.earlier_nonces, retry.nonce)
                self._probe.earlier_helpers = (*retry.earlier_helpers, *retry.helpers)
                self._stats["probe_retries"] += 1
            self._stats["probes_sent"] += 1
            self._send(target, MessageType.PING, {"nonce": self._probe.nonce})

    def on_ack(self, sender: NodeId, nonce: int) -> None:
        probe = self._probe
        if probe is not None and (nonce == probe.nonce or nonce in probe.earlier_nonces):
            vouchers = (probe.target, *probe.helpers, *probe.earlier_helpers)
            if sender in vouchers:
                self._stats["acks"] += not probe.acked
                probe.acked = True
            return
        relay = self._relays.get(nonce)
        if relay is not None and sender == relay.target:
            del self._relays[nonce]
            self._stats["relays"] += 1
            self._reply(relay.requester, relay.via, MessageType.ACK, {"nonce": relay.nonce})

    def on_nack(self, sender: NodeId, nonce: int) -> None:
        """A helper we asked could not reach the target: it, at least, is reachable."""
        probe = self._probe
        if probe is None or nonce != probe.nonce or sender not in probe.helpers:
            self._stats["nacks_unexpected"] += 1  # late, or not asked: ignored
        elif sender in probe.nacks:
            self._stats["nacks_unexpected"] += 1
        else:
            self._stats["nacks"] += 1
            probe.nacks += (sender,)

    def add_health(self, delta: int) -> None:
        self.health = min(self.config.local_health_max, max(0, self.health + delta))

    def _probe_indirectly(self, probe: _Probe) -> None:
        """No ACK in time: ask helpers to probe the target, and PING it once more ourselves."""
        probe.indirect_sent = True
        probe.helpers = tuple(
            self._table.alive.sample(self._rng, self.config.indirect_checks, (probe.target,))
        )
        body = {"nonce": probe.nonce, "target": probe.target.key}
        for helper in probe.helpers:
            self._stats["indirect_probes"] += 1
            self._send(helper, MessageType.PING_REQ, dict(body))
        # a second direct attempt (memberlist sends one over TCP): on a lossy link it is the
        # cheapest of the extra chances, two messages against four per helper
        self._stats["fallback_pings"] += 1
        self._send(probe.target, MessageType.PING, {"nonce": probe.nonce})

    def _end_probe(self, probe: _Probe, now: float) -> _Probe | None:
        """Score the finished probe; the probe to repeat against the same target, if any."""
        if probe.acked:
            self.add_health(-1)
            return None
        if self._table.state_of(probe.target) not in LIVE:
            return None  # declared dead meanwhile: nothing learned about ourselves
        self._stats["probes_failed"] += 1
        # Lifeguard: each helper that did not NACK suggests that our own link is the bad one
        self.add_health(len(probe.helpers) - len(probe.nacks) if probe.helpers else 1)
        if probe.round_number < self.config.probe_rounds:
            return probe  # a suspect too: our confirmation would shorten its suspicion
        self._table.suspect(probe.target, now)
        return None

    # -- relays for other probers ----------------------------------------------------

    def on_ping_req(
        self, requester: NodeId, via: str, nonce: int, target_id: NodeId, now: float
    ) -> None:
        if target_id == self._id:
            self._reply(requester, via, MessageType.ACK, {"nonce": nonce})
            return
        if self._table.state_of(target_id) not in LIVE:  # we cannot vouch for it: say so now
            self._nack(requester, via, nonce)
            return
        if len(self._relays) >= MAX_RELAYS:
            return
        own_nonce = self._rng.getrandbits(62)
        self._relays[own_nonce] = _Relay(requester, via, nonce, target_id)
        self._relay_expiry.append((now + self.config.probe_interval_s, own_nonce))
        self._nacks_due.append((now + self.config.nack_timeout_s, own_nonce))
        self._send(target_id, MessageType.PING, {"nonce": own_nonce})

    def expire_relays(self, now: float) -> None:
        """NACK the relays whose target stayed silent; drop the relays past their interval."""
        while self._nacks_due and self._nacks_due[0][0] <= now:
            relay = self._relays.get(self._nacks_due.popleft()[1])
            if relay is not None:  # no ACK from the target yet: tell the requester so
                self._nack(relay.requester, relay.via, relay.nonce)
        while self._relay_expiry and self._relay_expiry[0][0] <= now:
            self._relays.pop(self._relay_expiry.popleft()[1], None)

    def _nack(self, requester: NodeId, via: str, nonce: int) -> None:
        self._stats["nacks_sent"] += 1
        self._reply(requester, via, MessageType.NACK, {"nonce": nonce})
