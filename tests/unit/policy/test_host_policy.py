"""The host policy core: every transition, the reasons, the config, and its invariants.

Time is a number the tests hand in; nothing reads a clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node.base.wire import LocalProtocolError
from node.policy.machine import (
    DrainRequested,
    GuestsEmpty,
    HostSampled,
    PauseGuests,
    PolicyConfig,
    PolicyEffect,
    PolicyEvent,
    PolicyMachine,
    PolicyState,
    ReportPolicyState,
    ResumeGuests,
    SetBidding,
    UndrainRequested,
    VacateGuests,
    assess,
    format_window,
    in_windows,
    parse_window,
)
from node.runtime import config as config_module

NOON = 12 * 60


def sample(load: float = 0.1, idle: float | None = None, battery: bool | None = None, minute=NOON):
    return HostSampled(load, idle, battery, minute)


QUIET = sample(0.1)
LOADED = sample(0.9)


def kinds(effects):
    return [type(e) for e in effects]


def idle_machine(config: PolicyConfig | None = None, now: float = 0.0) -> PolicyMachine:
    """A machine that has seen enough quiet samples to be IDLE at ``now``."""
    config = config or PolicyConfig()
    machine = PolicyMachine(config, now - config.resume_quiet_s)
    machine.handle(QUIET, now - config.resume_quiet_s)
    machine.handle(QUIET, now)
    assert machine.state is PolicyState.IDLE
    return machine


# -- start ------------------------------------------------------------------------------


def test_a_fresh_machine_does_not_bid_until_quiet_for_the_quiet_time():
    machine = PolicyMachine(PolicyConfig(resume_quiet_s=5), 100.0)
    assert machine.status() == {
        "state": "busy",
        "reason": "no host sample yet",
        "since": 100.0,
        "bidding": False,
        "draining": False,
        "deadline": None,
    }
    for t in (100.0, 101.0, 102.5, 104.9):
        assert machine.handle(QUIET, t) == []
    assert "quiet for 4 s of 5 s" in machine.reason
    effects = machine.handle(QUIET, 105.0)
    assert effects == [  # nothing was paused: nothing to resume
        SetBidding(True, "idle: other CPU load 10% <= 50%"),
        ReportPolicyState(PolicyState.IDLE, "idle: other CPU load 10% <= 50%", 105.0),
    ]
    assert machine.bidding and machine.since == 105.0


def test_quiet_time_zero_resumes_on_the_first_idle_sample():
    machine = PolicyMachine(PolicyConfig(resume_quiet_s=0), 0.0)
    assert SetBidding(True, "idle: other CPU load 10% <= 50%") in machine.handle(QUIET, 0.0)


# -- busy, quiet, grace -------------------------------------------------------------------


def test_one_busy_sample_pauses_at_once_and_stops_bidding():
    machine = idle_machine(now=10.0)
    effects = machine.handle(LOADED, 10.5)
    reason = "other CPU load 90% > 50%"
    assert effects == [
        SetBidding(False, reason),
        PauseGuests(reason),
        ReportPolicyState(PolicyState.BUSY, reason, 10.5),
    ]
    assert machine.status()["state"] == "busy" and not machine.bidding
    assert machine.handle(LOADED, 11.0) == []  # announced once


def test_resume_needs_the_quiet_time_and_a_busy_sample_restarts_it():
    machine = idle_machine(PolicyConfig(resume_quiet_s=5), now=0.0)
    machine.handle(LOADED, 1.0)
    for t in (1.5, 2.0, 4.0, 6.0):  # 4.5 s of quiet
        assert machine.handle(QUIET, t) == []
    assert machine.handle(LOADED, 6.5) == []  # the count starts again
    for t in (7.0, 9.0, 11.5):
        assert machine.handle(QUIET, t) == []
    assert machine.state is PolicyState.BUSY
    effects = machine.handle(QUIET, 12.0)
    assert kinds(effects) == [ResumeGuests, SetBidding, ReportPolicyState]
    assert machine.state is PolicyState.IDLE


def test_vacate_after_grace_of_busy_then_come_back_without_resuming():
    machine = idle_machine(PolicyConfig(grace_s=60, resume_quiet_s=5), now=0.0)
    machine.handle(LOADED, 1.0)
    for t in range(2, 61):
        assert machine.handle(LOADED, float(t)) == []
    effects = machine.handle(LOADED, 61.0)
    reason = "busy for 60 s (grace 60 s): other CPU load 90% > 50%"
    assert effects == [
        VacateGuests(reason, 61.0),
        ReportPolicyState(PolicyState.VACATING, reason, 61.0),
    ]
    assert not machine.bidding
    assert machine.handle(LOADED, 62.0) == []  # vacated once
    assert machine.handle(QUIET, 63.0) == []
    effects = machine.handle(QUIET, 68.0)
    assert kinds(effects) == [SetBidding, ReportPolicyState]  # nothing paused to resume
    assert machine.state is PolicyState.IDLE


def test_grace_counts_from_the_pause_through_short_quiet_dips():
    machine = idle_machine(PolicyConfig(grace_s=10, resume_quiet_s=5), now=0.0)
    machine.handle(LOADED, 1.0)
    for t in range(2, 12):  # alternate: never 5 s quiet
        machine.handle(QUIET if t % 3 else LOADED, float(t))
    assert machine.state is PolicyState.BUSY  # 11 was quiet: no vacating on a quiet sample
    effects = machine.handle(LOADED, 12.0)
    assert kinds(effects) == [VacateGuests, ReportPolicyState]
    assert effects[0].deadline == 12.0


def test_grace_restarts_after_a_resume():
    machine = idle_machine(PolicyConfig(grace_s=10, resume_quiet_s=2), now=0.0)
    machine.handle(LOADED, 1.0)
    machine.handle(QUIET, 2.0)
    assert ResumeGuests() in machine.handle(QUIET, 4.0)
    machine.handle(LOADED, 5.0)
    assert machine.handle(LOADED, 14.0) == []  # 9 s since this pause
    assert kinds(machine.handle(LOADED, 15.0)) == [VacateGuests, ReportPolicyState]


def test_grace_zero_pauses_and_vacates_on_one_sample():
    machine = idle_machine(PolicyConfig(grace_s=0), now=0.0)
    effects = machine.handle(LOADED, 1.0)
    assert kinds(effects) == [SetBidding, PauseGuests, VacateGuests, ReportPolicyState]
    assert machine.state is PolicyState.VACATING


def test_a_fresh_machine_busy_from_the_start_vacates_after_grace():
    machine = PolicyMachine(PolicyConfig(grace_s=10), 0.0)
    assert machine.handle(LOADED, 0.0) == []  # nothing was paused: nothing to announce
    assert machine.handle(LOADED, 9.0) == []
    assert kinds(machine.handle(LOADED, 10.0)) == [VacateGuests, ReportPolicyState]


# -- the rules ----------------------------------------------------------------------------


def test_battery_is_busy_unless_allowed():
    assert assess(PolicyConfig(), sample(battery=True)) == ["on battery"]
    assert assess(PolicyConfig(), sample(battery=False)) == []
    assert assess(PolicyConfig(), sample(battery=None)) == []
    assert assess(PolicyConfig(run_on_battery=True), sample(battery=True)) == []
    machine = idle_machine()
    assert PauseGuests("on battery") in machine.handle(sample(battery=True), 1.0)


def test_input_idle_time():
    desk = PolicyConfig(input_idle_s=300)
    assert assess(desk, sample(idle=12.4)) == ["keyboard/mouse used 12 s ago (< 300 s)"]
    assert assess(desk, sample(idle=300.0)) == []
    assert assess(desk, sample(idle=None)) == []  # no input devices: unknown, ignored
    assert assess(PolicyConfig(), sample(idle=0.0)) == []  # 0: input ignored (servers)


def test_load_limit_is_exclusive_and_reasons_are_joined():
    assert assess(PolicyConfig(max_other_load=0.5), sample(0.5)) == []
    config = PolicyConfig(max_other_load=0.5, input_idle_s=60, allowed_hours=((0, 60),))
    reasons = assess(config, sample(0.73, idle=1.0, battery=True, minute=NOON))
    assert reasons == [
        "other CPU load 73% > 50%",
        "keyboard/mouse used 1 s ago (< 60 s)",
        "on battery",
        "outside allowed hours 00:00-01:00",
    ]


def test_busy_reason_is_all_broken_rules():
    config = PolicyConfig(input_idle_s=60)
    machine = idle_machine(config)
    effects = machine.handle(sample(0.9, idle=3.0), 1.0)
    assert effects[1] == PauseGuests(
        "other CPU load 90% > 50%; keyboard/mouse used 3 s ago (< 60 s)"
    )


def test_allowed_hours_wrap_past_midnight():
    night = PolicyConfig(allowed_hours=(parse_window("22:00-07:00"),))
    for minute, allowed in [
        (22 * 60, True),
        (23 * 60 + 59, True),
        (0, True),
        (6 * 60 + 59, True),
        (7 * 60, False),
        (NOON, False),
        (21 * 60 + 59, False),
    ]:
        reasons = assess(night, sample(minute=minute))
        assert reasons == ([] if allowed else ["outside allowed hours 22:00-07:00"]), minute
    machine = PolicyMachine(night, 0.0)
    machine.handle(sample(minute=23 * 60), 0.0)
    machine.handle(sample(minute=23 * 60), 5.0)
    assert machine.bidding
    effects = machine.handle(sample(minute=7 * 60), 6.0)
    assert effects[1] == PauseGuests("outside allowed hours 22:00-07:00")


def test_windows():
    assert parse_window("22:00-07:00") == (1320, 420)
    assert parse_window("7:30-9:05") == (450, 545)
    assert parse_window("12:00-24:00") == (720, 1440)
    for bad in ("7-9", "24:00-01:00", "10:60-11:00", "22:00-24:01", "aa", "", "10:00"):
        with pytest.raises(ValueError):
            parse_window(bad)
    assert format_window((1320, 420)) == "22:00-07:00"
    assert in_windows((), 5)
    assert in_windows(((600, 600),), 5)  # start = end: the whole day, as in BOINC
    two = ((9 * 60, 12 * 60), (13 * 60, 17 * 60))
    assert [in_windows(two, m) for m in (540, 719, 720, 780, 1019, 1020)] == [
        True,
        True,
        False,
        True,
        True,
        False,
    ]
    assert in_windows(((720, 1440),), 1439) and not in_windows(((720, 1440),), 0)


def test_bad_config_and_samples_are_refused():
    for bad in (
        {"max_other_load": 1.5},
        {"cpu_share": 0.0},
        {"grace_s": -1.0},
        {"resume_quiet_s": float("nan")},
        {"vcpus": -1},
        {"allowed_hours": ((0, 1441),)},
    ):
        with pytest.raises(ValueError):
            PolicyConfig(**bad)  # type: ignore[arg-type]
    for args in ((-0.1, None, None, 0), (float("nan"), None, None, 0), (0.1, -1.0, None, 0)):
        with pytest.raises(ValueError):
            HostSampled(*args)
    with pytest.raises(ValueError):
        HostSampled(0.1, None, None, 1440)


# -- drain --------------------------------------------------------------------------------


def test_drain_overrides_everything_until_undrain():
    machine = idle_machine(now=0.0)
    effects = machine.handle(DrainRequested(1_700_000_000.0), 1.0)
    reason = "drain requested, deadline 2023-11-14 22:13:20 UTC"
    assert effects == [
        SetBidding(False, reason),
        VacateGuests(reason, 1_700_000_000.0),
        ReportPolicyState(PolicyState.DRAINING, reason, 1.0),
    ]
    for t in range(2, 30):
        assert machine.handle(QUIET, float(t)) == []
    assert not machine.bidding
    effects = machine.handle(GuestsEmpty(), 30.0)
    assert kinds(effects) == [ReportPolicyState]
    assert machine.state is PolicyState.DRAINED and machine.since == 30.0
    assert machine.status()["reason"].startswith("drained: nothing runs here")
    effects = machine.handle(UndrainRequested(), 31.0)
    assert kinds(effects) == [SetBidding, ReportPolicyState]
    assert machine.bidding and machine.state is PolicyState.IDLE
    assert (machine.draining, machine.deadline) == (False, None)


def test_undrain_returns_to_where_the_samples_left_the_host():
    machine = idle_machine(PolicyConfig(grace_s=100), now=0.0)
    machine.handle(DrainRequested(None), 1.0)
    effects = machine.handle(LOADED, 2.0)  # the volunteer still comes first
    assert effects == [PauseGuests("other CPU load 90% > 50%")]
    assert machine.state is PolicyState.DRAINING
    effects = machine.handle(UndrainRequested(), 3.0)
    assert effects == [ReportPolicyState(PolicyState.BUSY, "other CPU load 90% > 50%", 3.0)]
    assert not machine.bidding
    machine.handle(QUIET, 4.0)
    assert kinds(machine.handle(QUIET, 9.0)) == [ResumeGuests, SetBidding, ReportPolicyState]


def test_a_busy_host_vacates_at_once_even_under_a_drain_with_no_deadline():
    machine = idle_machine(PolicyConfig(grace_s=10), now=0.0)
    assert VacateGuests("drain requested, no deadline", None) in machine.handle(
        DrainRequested(None), 0.5
    )
    machine.handle(LOADED, 1.0)
    assert machine.handle(LOADED, 11.0) == [
        VacateGuests("busy for 10 s (grace 10 s): other CPU load 90% > 50%", 11.0)
    ]


def test_a_new_deadline_is_passed_on_once():
    machine = idle_machine(now=0.0)
    machine.handle(DrainRequested(None), 1.0)
    assert machine.handle(DrainRequested(None), 2.0) == []
    effects = machine.handle(DrainRequested(500.0), 3.0)
    assert effects == [VacateGuests("drain requested, deadline 1970-01-01 00:08:20 UTC", 500.0)]
    assert machine.deadline == 500.0
    machine.handle(GuestsEmpty(), 4.0)
    assert machine.handle(DrainRequested(600.0), 5.0) == []  # nothing left to vacate
    assert machine.deadline == 600.0 and machine.state is PolicyState.DRAINED


def test_guests_empty_counts_only_while_draining():
    machine = idle_machine(now=0.0)
    assert machine.handle(GuestsEmpty(), 1.0) == []
    machine.handle(DrainRequested(None), 2.0)
    assert machine.state is PolicyState.DRAINING  # an earlier report does not count


def test_drain_survives_restore():
    machine = idle_machine(now=0.0)
    machine.handle(DrainRequested(900.0), 1.0)
    persisted = (machine.draining, machine.deadline)
    assert persisted == (True, 900.0)
    fresh = PolicyMachine(PolicyConfig(), 50.0)
    effects = fresh.restore(*persisted)
    reason = "drain requested, deadline 1970-01-01 00:15:00 UTC"
    assert effects == [ReportPolicyState(PolicyState.DRAINING, reason, 50.0)]
    for t in range(50, 80):
        assert fresh.handle(QUIET, float(t)) == []
    assert fresh.status() == {
        "state": "draining",
        "reason": reason,
        "since": 50.0,
        "bidding": False,
        "draining": True,
        "deadline": 900.0,
    }
    assert kinds(fresh.handle(GuestsEmpty(), 80.0)) == [ReportPolicyState]
    assert kinds(fresh.handle(UndrainRequested(), 81.0)) == [SetBidding, ReportPolicyState]
    with pytest.raises(LocalProtocolError):
        fresh.restore(True, None)


def test_restore_without_a_drain_changes_nothing():
    fresh = PolicyMachine(PolicyConfig(), 0.0)
    assert fresh.restore(False, None) == []
    assert fresh.state is PolicyState.BUSY and not fresh.draining


def test_an_unknown_event_is_our_bug():
    with pytest.raises(LocalProtocolError):
        PolicyMachine(PolicyConfig(), 0.0).handle("nonsense", 0.0)  # type: ignore[arg-type]


# -- config -------------------------------------------------------------------------------


def test_policy_config_from_the_agent_config():
    loaded = config_module.from_document(
        {
            "policy": {
                "max_other_load": 0.25,
                "input_idle_s": 300,
                "allowed_hours": ["22:00-07:00", "12:00-13:30"],
                "run_on_battery": True,
                "grace_s": 120,
                "resume_quiet_s": 10,
                "cpu_share": 0.5,
                "sample_interval_s": 1,
            },
            "host": {"vcpus": 2, "memory_mib": 1024, "disk_mib": 2048},
        },
        "test",
    )
    assert config_module.policy_config(loaded) == PolicyConfig(
        max_other_load=0.25,
        input_idle_s=300.0,
        allowed_hours=((1320, 420), (720, 810)),
        run_on_battery=True,
        grace_s=120.0,
        resume_quiet_s=10.0,
        cpu_share=0.5,
        vcpus=2,
        memory_mib=1024,
        disk_mib=2048,
    )
    assert loaded["policy.sample_interval_s"] == 1.0
    defaults = config_module.load(None)
    assert config_module.policy_config(defaults) == PolicyConfig()
    assert defaults["policy.sample_interval_s"] == 0.5


@pytest.mark.parametrize(
    ("policy", "field"),
    [
        ({"allowed_hours": ["22-07"]}, "policy.allowed_hours"),
        ({"allowed_hours": [2200]}, "policy.allowed_hours"),
        ({"allowed_hours": "22:00-07:00"}, "policy.allowed_hours"),
        ({"max_other_load": 2}, "policy.max_other_load"),
        ({"cpu_share": 0}, "policy.cpu_share"),
        ({"run_on_battery": 1}, "policy.run_on_battery"),
        ({"sample_interval_s": 0}, "policy.sample_interval_s"),
        ({"grace": 5}, "policy.grace"),
    ],
)
def test_bad_policy_settings_name_the_field(policy, field):
    with pytest.raises(config_module.ConfigError) as info:
        config_module.from_document({"policy": policy}, "test")
    assert str(info.value).startswith(field + ":")


# -- properties over random sample sequences ---------------------------------------------


@dataclass
class History:
    """What the test fed in, to check the machine's effects against."""

    config: PolicyConfig
    samples: list[tuple[float, bool]] = field(default_factory=list)  # (time, busy)

    def quiet_run(self) -> tuple[float, float] | None:
        """(first, last) time of the idle samples since the last busy one; None if none."""
        run = []
        for when, busy in reversed(self.samples):
            if busy:
                break
            run.append(when)
        return (run[-1], run[0]) if run else None

    def busy_for_grace(self, now: float) -> bool:
        """A busy sample at least grace_s ago, and no quiet run long enough to resume since."""
        quiet = self.config.resume_quiet_s
        for start, (when, busy) in enumerate(self.samples):
            if not busy or now - when < self.config.grace_s:
                continue
            later = self.samples[start:]
            run_start = None
            resumed = False
            for t, b in later:
                if b:
                    run_start = None
                    continue
                run_start = t if run_start is None else run_start
                if t - run_start >= quiet:
                    resumed = True
                    break
            if not resumed:
                return True
        return False


loads = st.sampled_from([0.0, 0.3, 0.5, 0.51, 0.9, 1.0])
samples = st.builds(
    HostSampled,
    other_load=loads,
    input_idle_s=st.one_of(st.none(), st.sampled_from([0.0, 30.0, 299.0, 300.0, 1000.0])),
    on_battery=st.one_of(st.none(), st.booleans()),
    minute_of_day=st.integers(0, 1439),
)
events = st.one_of(
    samples,
    samples,
    samples,
    samples,
    samples,
    samples,
    st.builds(DrainRequested, st.one_of(st.none(), st.floats(0, 1e6))),
    st.just(UndrainRequested()),
    st.just(GuestsEmpty()),
)
configs = st.builds(
    PolicyConfig,
    input_idle_s=st.sampled_from([0.0, 300.0]),
    allowed_hours=st.lists(st.tuples(st.integers(0, 1439), st.integers(0, 1440)), max_size=2).map(
        tuple
    ),
    run_on_battery=st.booleans(),
    grace_s=st.sampled_from([0.0, 3.0, 10.0, 60.0]),
    resume_quiet_s=st.sampled_from([0.0, 2.0, 5.0]),
)


@settings(max_examples=400, deadline=None)
@given(
    configs,
    st.lists(st.tuples(st.sampled_from([0.0, 0.5, 1.0, 2.5, 7.0]), events), max_size=120),
)
def test_invariants_over_random_sequences(config: PolicyConfig, script):
    machine = PolicyMachine(config, 0.0)
    history = History(config)
    now = 0.0
    paused = False
    for step, event in script:
        now += step
        busy = isinstance(event, HostSampled) and bool(assess(config, event))
        if isinstance(event, HostSampled):
            history.samples.append((now, busy))
        effects: list[PolicyEffect] = machine.handle(event, now)
        check_effects(machine, history, event, effects, now, busy)
        for effect in effects:
            if isinstance(effect, PauseGuests):
                assert not paused  # paused once, until resumed or vacated
                paused = True
            elif isinstance(effect, ResumeGuests):
                assert paused
                paused = False
            elif isinstance(effect, VacateGuests) and isinstance(event, HostSampled):
                paused = False


def check_effects(machine, history, event: PolicyEvent, effects, now: float, busy: bool):
    quiet = history.config.resume_quiet_s
    run = history.quiet_run()
    # Never bids unless IDLE, and IDLE only after the quiet time with no busy sample since.
    if machine.bidding:
        assert machine.state is PolicyState.IDLE and not machine.draining
        assert run is not None and run[1] - run[0] >= quiet
    if busy:  # a busy sample pauses at once, and vacates once paused for the grace
        assert not machine.bidding and machine.state is not PolicyState.IDLE
        if history.busy_for_grace(now) and not machine.draining:
            assert machine.state is PolicyState.VACATING
    elif run is not None and run[1] - run[0] >= quiet and not machine.draining:
        assert machine.state is PolicyState.IDLE  # quiet long enough: back
    for effect in effects:
        if isinstance(effect, SetBidding):
            assert effect.allowed == machine.bidding
        if isinstance(effect, ResumeGuests):
            assert isinstance(event, HostSampled) and not busy
            assert run is not None and now - run[0] >= quiet
        if isinstance(effect, VacateGuests) and isinstance(event, HostSampled):
            assert busy and effect.deadline == now
            assert history.busy_for_grace(now)
        if isinstance(effect, ReportPolicyState):
            assert effect.state is machine.state and effect.since == now
    changes = [e for e in effects if isinstance(e, ReportPolicyState | SetBidding)]
    assert len(changes) == len({type(e) for e in changes})  # at most one of each per event
    assert machine.status()["state"] == machine.state.value
