"""The volunteer's host policy: when Gleaner may run guests and bid here, and when not.

Theory of operation
-------------------
``PolicyMachine`` is a sans-IO core: ``handle(event, now) -> list[PolicyEffect]``,
fed a ``HostSampled`` every ``policy.sample_interval_s`` by the host probe
(node/runtime/host_probe.py) and the operator's drain requests by the agent. It has no
timers: the samples are its clock, so it needs no ``tick``.

It speaks the words volunteers know from HTCondor's startd (START, SUSPEND,
CONTINUE, PREEMPT) and BOINC's computing preferences:

- *Busy* (SUSPEND): one sample breaking any rule pauses the guests at once,
  within one sample period. The rules (``assess``): other CPU load (everything
  but our guests and the agent, as a share of all cores) above
  ``max_other_load``; keyboard or mouse used less than ``input_idle_s`` ago (0:
  input is ignored, as on a server; an unknown input idle time, no input
  devices, is ignored too); on battery unless ``run_on_battery``; outside the
  ``allowed_hours`` windows (local time; a window may wrap past midnight, and a
  window whose start equals its end means the whole day, as in BOINC).
- *Quiet* (CONTINUE): paused guests resume, and bidding starts again, only
  after ``resume_quiet_s`` of idle samples in a row, counted from the first of
  them. One busy sample restarts the count. This hysteresis keeps a host whose
  load hovers at the limit from flapping.
- *Grace* (PREEMPT): a host that stays busy, that is paused without a quiet
  run long enough to resume, for ``grace_s`` since the pause vacates its guests
  (``VacateGuests`` with the current time as deadline: they leave now), at the
  next busy sample. A short dip does not restart the grace clock, as in
  HTCondor, where the suspension time counts; else an owner whose load
  fluctuates would keep paused guests (and their memory) here for ever. A host
  that is quiet when the grace runs out is not vacated: it is about to resume.
- *Drain* (the operator's ``gleaner drain``): no bids, and the guests leave
  by the deadline (None: they may finish the segment they run). Draining
  overrides the state shown and bidding until ``UndrainRequested``; it does not
  stop the host rules: the volunteer still comes first, so a busy host pauses
  and then vacates what is left even while draining. The agent reports
  ``GuestsEmpty`` once nothing runs here (while draining: after a restore too),
  and the state becomes DRAINED.

The state shown is the host's state (IDLE, BUSY, VACATING) unless draining.
``HOST_TRANSITIONS`` is the host's table; ``_move`` refuses any other step.
Drawn, with the drain on top::

    IDLE      --busy-->    BUSY       a busy sample: bidding off, PauseGuests
    BUSY      --quiet-->   IDLE       resume_quiet_s of idle samples: ResumeGuests (if it
                                      paused any), bidding on
    BUSY      --grace-->   VACATING   a busy sample, paused >= grace_s: VacateGuests(now)
    VACATING  --quiet-->   IDLE       resume_quiet_s of idle samples: bidding on

    any       --drain-->   DRAINING   DrainRequested: bidding off, VacateGuests(deadline)
    DRAINING  --empty-->   DRAINED    GuestsEmpty
    DRAINING, --undrain--> IDLE, BUSY or VACATING: where the samples left the host,
      DRAINED                         which they went on tracking while it drained

A fresh machine is BUSY ("no host sample yet") and does not bid: it needs
``resume_quiet_s`` of idle samples first, like any paused host. The agent starts
its bidder with bidding off and follows ``SetBidding``.

Every state carries a one-line reason for people ("other CPU load 73% > 50%");
``status()`` shows it for ``gleaner status``. ``ReportPolicyState`` and
``SetBidding`` are emitted only on a change of state or of bidding; the
reason within a state is updated on every sample but not announced.

*Persistence.* A drain outlives restarts: the agent persists ``draining`` and
``deadline`` after every drain or undrain it handles, and calls
``restore(draining, deadline)`` on the fresh machine at start.

*Effects in order.* Bidding off comes before the guest effects, bidding on
after them, ``ReportPolicyState`` last. ``VacateGuests`` may come more than
once (a drain, then a grace); the agent keeps the earliest deadline it has
been given (None is the latest). Pausing, resuming or vacating when nothing
runs is a no-op for the agent.

Invariants
----------
- Bidding is allowed only in IDLE (never while busy, vacating or draining).
- ``ResumeGuests`` and bidding on come only after ``resume_quiet_s`` of idle
  samples with no busy sample among them.
- VACATING is entered from the samples only at a busy sample at least
  ``grace_s`` after the guests were paused, with no resume in between.

This module is pure: no I/O, no clock.
"""

from __future__ import annotations

import enum
import math
import re
from dataclasses import dataclass
from typing import Any

from node.base.wire import LocalProtocolError

MINUTES_PER_DAY = 24 * 60
Window = tuple[int, int]  # (start, end) minutes of the local day; end may be 1440 (24:00)
_WINDOW = re.compile(r"(\d{1,2}):(\d{2})-(\d{1,2}):(\d{2})")


def parse_window(text: str) -> Window:
    """``"22:00-07:00"`` -> ``(1320, 420)``; ValueError if not ``HH:MM-HH:MM``."""
    match = _WINDOW.fullmatch(text.strip())
    if not match:
        raise ValueError(f"expected HH:MM-HH:MM, got {text!r}")
    sh, sm, eh, em = (int(part) for part in match.groups())
    start, end = sh * 60 + sm, eh * 60 + em
    if sh > 23 or sm > 59 or em > 59 or end > MINUTES_PER_DAY:
        raise ValueError(f"expected times 00:00 to 23:59 (24:00 as an end), got {text!r}")
    return start, end


def format_window(window: Window) -> str:
    start, end = window
    return f"{start // 60:02d}:{start % 60:02d}-{end // 60:02d}:{end % 60:02d}"


def in_windows(windows: tuple[Window, ...], minute_of_day: int) -> bool:
    """Whether a minute of the day is allowed: no windows, or inside one of them."""
    if not windows:
        return True
    for start, end in windows:
        if start == end:
            return True
        if start < end and start <= minute_of_day < end:
            return True
        if start > end and (minute_of_day >= start or minute_of_day < end):
            return True
    return False


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    """The volunteer's rules, and the caps passed through to the bidder (0: all there is)."""

    max_other_load: float = 0.5  # share of all cores used by everything but Gleaner
    input_idle_s: float = 0.0  # 0: ignore keyboard and mouse
    allowed_hours: tuple[Window, ...] = ()  # empty: always
    run_on_battery: bool = False
    grace_s: float = 60.0
    resume_quiet_s: float = 5.0
    cpu_share: float = 1.0
    vcpus: int = 0
    memory_mib: int = 0
    disk_mib: int = 10_240

    def __post_init__(self) -> None:
        if not 0 <= self.max_other_load <= 1 or not 0 < self.cpu_share <= 1:
            raise ValueError("need 0 <= max_other_load <= 1 and 0 < cpu_share <= 1")
        if not all(v >= 0 for v in (self.input_idle_s, self.grace_s, self.resume_quiet_s)):
            raise ValueError("need input_idle_s, grace_s and resume_quiet_s >= 0")
        if min(self.vcpus, self.memory_mib, self.disk_mib) < 0:
            raise ValueError("caps must be >= 0")
        for start, end in self.allowed_hours:
            if not (0 <= start < MINUTES_PER_DAY and 0 <= end <= MINUTES_PER_DAY):
                raise ValueError(f"bad allowed_hours window {(start, end)!r}")


# -- events ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HostSampled:
    """One look at the host (node/runtime/host_probe.py).

    ``other_load``: CPU used by everything but our guests and the agent, as a
    share of all cores; ``input_idle_s``: seconds since keyboard or mouse were
    last used (None: unknown, no input devices); ``on_battery`` (None: no power
    supply information); ``minute_of_day`` in local time.
    """

    other_load: float
    input_idle_s: float | None
    on_battery: bool | None
    minute_of_day: int

    def __post_init__(self) -> None:
        if not self.other_load >= 0 or not 0 <= self.minute_of_day < MINUTES_PER_DAY:
            raise ValueError("need other_load >= 0 and 0 <= minute_of_day < 1440")
        if self.input_idle_s is not None and not self.input_idle_s >= 0:
            raise ValueError("input_idle_s must be None or >= 0")


@dataclass(frozen=True, slots=True)
class DrainRequested:
    """The operator drains this host; guests leave by ``deadline`` (None: when done)."""

    deadline: float | None = None


@dataclass(frozen=True, slots=True)
class UndrainRequested:
    pass


@dataclass(frozen=True, slots=True)
class GuestsEmpty:
    """The agent reports that nothing runs here any more."""


PolicyEvent = HostSampled | DrainRequested | UndrainRequested | GuestsEmpty


# -- effects ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PauseGuests:
    reason: str


@dataclass(frozen=True, slots=True)
class ResumeGuests:
    pass


@dataclass(frozen=True, slots=True)
class VacateGuests:
    """Guests must leave (checkpoint and stop) by ``deadline``; None: when their segment ends."""

    reason: str
    deadline: float | None


@dataclass(frozen=True, slots=True)
class SetBidding:
    allowed: bool
    reason: str


class PolicyState(enum.Enum):
    IDLE = "idle"  # may run guests and bid
    BUSY = "busy"  # the owner is back: guests paused, no bids; within the grace period
    VACATING = "vacating"  # busy past the grace period: guests must leave; no bids
    DRAINING = "draining"  # the operator's drain: no bids, guests leave; until undrain
    DRAINED = "drained"  # draining, and nothing runs here


@dataclass(frozen=True, slots=True)
class ReportPolicyState:
    state: PolicyState
    reason: str
    since: float


PolicyEffect = PauseGuests | ResumeGuests | VacateGuests | SetBidding | ReportPolicyState


# -- the host's table ------------------------------------------------------------------


class PolicyStep(enum.Enum):
    BUSY = "busy"
    QUIET = "quiet"
    GRACE = "grace"


_P = PolicyState
HOST_TRANSITIONS: dict[tuple[PolicyState, PolicyStep], PolicyState] = {
    (_P.IDLE, PolicyStep.BUSY): _P.BUSY,
    (_P.BUSY, PolicyStep.QUIET): _P.IDLE,
    (_P.BUSY, PolicyStep.GRACE): _P.VACATING,
    (_P.VACATING, PolicyStep.QUIET): _P.IDLE,
}


def assess(config: PolicyConfig, sample: HostSampled) -> list[str]:
    """Why this sample makes the host busy: one reason per broken rule; empty = idle."""
    reasons = []
    if sample.other_load > config.max_other_load:
        reasons.append(f"other CPU load {sample.other_load:.0%} > {config.max_other_load:.0%}")
    idle = sample.input_idle_s
    if config.input_idle_s > 0 and idle is not None and idle < config.input_idle_s:
        reasons.append(f"keyboard/mouse used {_s(idle)} ago (< {config.input_idle_s:g} s)")
    if sample.on_battery and not config.run_on_battery:
        reasons.append("on battery")
    if not in_windows(config.allowed_hours, sample.minute_of_day):
        windows = ", ".join(format_window(w) for w in config.allowed_hours)
        reasons.append(f"outside allowed hours {windows}")
    return reasons


def _s(seconds: float) -> str:
    """Whole seconds, rounded down: "4 s" until the fifth has passed."""
    return f"{math.floor(seconds)} s" if math.isfinite(seconds) else f"{seconds} s"


def _when(deadline: float | None) -> str:
    if deadline is None:
        return "no deadline"
    if not math.isfinite(deadline):
        return f"deadline {deadline}"
    return f"deadline {utc_stamp(deadline)} UTC"


def utc_stamp(unix_s: float) -> str:
    """``YYYY-MM-DD HH:MM:SS`` of a Unix time, by arithmetic (a core reads no clock module).

    The civil-from-days algorithm of Howard Hinnant's date library: proleptic
    Gregorian, 400-year eras of 146,097 days, March-based years.
    """
    seconds = math.floor(unix_s)
    days, rest = divmod(seconds, 86_400)
    hour, rest = divmod(rest, 3_600)
    minute, second = divmod(rest, 60)
    era, day_of_era = divmod(days + 719_468, 146_097)
    year_of_era = (
        day_of_era - day_of_era // 1_460 + day_of_era // 36_524 - day_of_era // 146_096
    ) // 365
    day_of_year = day_of_era - (365 * year_of_era + year_of_era // 4 - year_of_era // 100)
    month_index = (5 * day_of_year + 2) // 153  # 0 is March
    day = day_of_year - (153 * month_index + 2) // 5 + 1
    month = month_index + 3 if month_index < 10 else month_index - 9
    year = year_of_era + era * 400 + (1 if month <= 2 else 0)
    return f"{year:04d}-{month:02d}-{day:02d} {hour:02d}:{minute:02d}:{second:02d}"


# -- the core --------------------------------------------------------------------------


class PolicyMachine:
    def __init__(self, config: PolicyConfig, now: float) -> None:
        self.config = config
        self._host = PolicyState.BUSY
        self._host_reason = "no host sample yet"
        self._paused_since: float | None = None  # the pause that the grace counts from
        self._paused = False  # PauseGuests sent, and no ResumeGuests or VacateGuests since
        self._quiet_since: float | None = None  # the first idle sample of the current run
        self._last_busy = "no host sample yet"
        self._draining = False
        self._empty = False
        self._deadline: float | None = None
        self._since = now
        self._fresh = True

    # -- views ---------------------------------------------------------------------------

    @property
    def state(self) -> PolicyState:
        if self._draining:
            return PolicyState.DRAINED if self._empty else PolicyState.DRAINING
        return self._host

    @property
    def reason(self) -> str:
        if not self._draining:
            return self._host_reason
        if self._empty:
            return f"drained: nothing runs here (drain requested, {_when(self._deadline)})"
        return f"drain requested, {_when(self._deadline)}"

    @property
    def since(self) -> float:
        return self._since

    @property
    def bidding(self) -> bool:
        return not self._draining and self._host is PolicyState.IDLE

    @property
    def draining(self) -> bool:
        """Persist this (and ``deadline``) after every drain or undrain."""
        return self._draining

    @property
    def deadline(self) -> float | None:
        return self._deadline

    def status(self) -> dict[str, Any]:
        return {
            "state": self.state.value,
            "reason": self.reason,
            "since": self._since,
            "bidding": self.bidding,
            "draining": self._draining,
            "deadline": self._deadline,
        }

    # -- input ---------------------------------------------------------------------------

    def restore(self, draining: bool, deadline: float | None) -> list[PolicyEffect]:
        """Take up a persisted drain; only on a fresh machine, before any event."""
        if not self._fresh:
            raise LocalProtocolError("restore() is only for a fresh PolicyMachine")
        self._fresh = False
        before = self.state, self.bidding
        if draining:
            self._draining = True
            self._deadline = deadline
        return self._announce(before, [], self._since)

    def handle(self, event: PolicyEvent, now: float) -> list[PolicyEffect]:
        self._fresh = False
        before = self.state, self.bidding
        guests: list[PolicyEffect] = []
        if isinstance(event, HostSampled):
            self._on_sample(event, now, guests)
        elif isinstance(event, DrainRequested):
            self._on_drain(event.deadline, guests)
        elif isinstance(event, UndrainRequested):
            self._draining = self._empty = False
            self._deadline = None
        elif isinstance(event, GuestsEmpty):
            self._empty = self._draining
        else:
            raise LocalProtocolError(f"not a policy event: {event!r}")
        return self._announce(before, guests, now)

    # -- transitions ---------------------------------------------------------------------

    def _announce(
        self, before: tuple[PolicyState, bool], guests: list[PolicyEffect], now: float
    ) -> list[PolicyEffect]:
        """The guest effects, framed by what changed, in the documented order."""
        state, bidding = before
        effects: list[PolicyEffect] = []
        if bidding and not self.bidding:
            effects.append(SetBidding(False, self.reason))
        effects += guests
        if self.bidding and not bidding:
            effects.append(SetBidding(True, self.reason))
        if self.state is not state:
            self._since = now
            effects.append(ReportPolicyState(self.state, self.reason, now))
        return effects

    def _move(self, step: PolicyStep) -> None:
        target = HOST_TRANSITIONS.get((self._host, step))
        if target is None:
            raise LocalProtocolError(f"no host transition {step.value} from {self._host.value}")
        self._host = target

    def _on_sample(self, sample: HostSampled, now: float, guests: list[PolicyEffect]) -> None:
        reasons = assess(self.config, sample)
        if reasons:
            self._on_busy("; ".join(reasons), now, guests)
        else:
            self._on_idle(sample, now, guests)

    def _on_busy(self, reason: str, now: float, guests: list[PolicyEffect]) -> None:
        self._quiet_since = None
        self._last_busy = reason
        if self._host is PolicyState.IDLE:
            self._move(PolicyStep.BUSY)
            self._paused_since = now
            self._paused = True
            guests.append(PauseGuests(reason))
        elif self._paused_since is None:  # a fresh machine: nothing was running
            self._paused_since = now
        if self._host is PolicyState.VACATING:
            self._host_reason = f"busy past the grace period: {reason}"
            return
        paused = now - self._paused_since
        if paused >= self.config.grace_s:
            self._move(PolicyStep.GRACE)
            self._host_reason = f"busy for {_s(paused)} (grace {self.config.grace_s:g} s): {reason}"
            self._paused = False
            guests.append(VacateGuests(self._host_reason, now))
        else:
            self._host_reason = reason

    def _on_idle(self, sample: HostSampled, now: float, guests: list[PolicyEffect]) -> None:
        if self._quiet_since is None:
            self._quiet_since = now
        idle_reason = (
            f"idle: other CPU load {sample.other_load:.0%} <= {self.config.max_other_load:.0%}"
        )
        if self._host is PolicyState.IDLE:
            self._host_reason = idle_reason
            return
        quiet = now - self._quiet_since
        if quiet < self.config.resume_quiet_s:
            self._host_reason = (
                f"quiet for {_s(quiet)} of {self.config.resume_quiet_s:g} s after: "
                f"{self._last_busy}"
            )
            return
        if self._paused:
            self._paused = False
            guests.append(ResumeGuests())
        self._move(PolicyStep.QUIET)
        self._paused_since = None
        self._host_reason = idle_reason

    def _on_drain(self, deadline: float | None, guests: list[PolicyEffect]) -> None:
        if self._draining and (deadline == self._deadline or self._empty):
            self._deadline = deadline
            return
        self._draining = True
        self._deadline = deadline
        if self._host is not PolicyState.VACATING:  # else they are leaving now already
            guests.append(VacateGuests(self.reason, deadline))
