"""Host availability: the generator's statistics match its parameters; a seed fixes it."""

from __future__ import annotations

import itertools
import random
import statistics

import pytest

from node.sim.availability import (
    DAY,
    DEFAULT_REGIONS,
    HOUR,
    AvailabilityModel,
    Distribution,
    HostAvailability,
    IntervalIndex,
    generate_hosts,
)

OFFSETS = {r.name: r.utc_offset_h for r in DEFAULT_REGIONS}


@pytest.mark.parametrize(
    "distribution",
    [
        Distribution("weibull", 0.6, 2.0),
        Distribution("lognormal", 2.0, 1.2),
        Distribution("gamma", 0.5, 16.0),
        Distribution("hyperexp", 0.7, 6.0, 60.0),
        Distribution("exponential", 3.0),
    ],
)
def test_each_family_samples_its_mean(distribution):
    rng = random.Random(7)
    samples = [distribution.sample(rng) for _ in range(40_000)]
    assert statistics.fmean(samples) == pytest.approx(distribution.mean_s, rel=0.06)


@pytest.mark.parametrize(
    ("family", "a", "b", "c"),
    [("weibull", 0, 1, 0), ("lognormal", 1, -1, 0), ("hyperexp", 1.5, 1, 1), ("pareto", 1, 1, 0)],
)
def test_bad_distributions_are_refused(family, a, b, c):
    with pytest.raises(ValueError):
        Distribution(family, a, b, c)


def test_about_a_fifth_of_hosts_are_random():
    hosts = generate_hosts(AvailabilityModel(), 3000, DAY, random.Random(1))
    share = sum(h.kind == "random" for h in hosts) / len(hosts)
    assert share == pytest.approx(0.21, abs=0.035)
    assert generate_hosts(AvailabilityModel(random_share=0.0), 50, DAY, random.Random(1))[
        0
    ].kind == ("periodic")


def test_random_hosts_intervals_have_their_clusters_means():
    model = AvailabilityModel(random_share=1.0)
    horizon = 60 * DAY
    hosts = generate_hosts(model, 600, horizon, random.Random(2))
    for cluster in model.clusters:
        mine = [h for h in hosts if h.group == cluster.name]
        assert len(mine) > 60
        ups, downs = [], []
        for h in mine:
            inner = [(s, e) for s, e in h.intervals if s > 0 and e < horizon]
            ups += [e - s for s, e in inner]
            downs += [b[0] - a[1] for a, b in itertools.pairwise(inner)]
        assert statistics.fmean(ups) == pytest.approx(cluster.up.mean_s, rel=0.15)
        assert statistics.fmean(downs) == pytest.approx(cluster.down.mean_s, rel=0.15)


def local_hour_available(hosts: list[HostAvailability], hour: float, weekend: bool) -> float:
    """Share of (host, day) pairs up at local ``hour``, weekdays or weekend days."""
    hits = total = 0
    for h in hosts:
        for day in range(1, 27):
            if (day % 7 in (5, 6)) != weekend:
                continue
            t = day * DAY + (hour - OFFSETS[h.region]) * HOUR
            hits += h.available_at(t)
            total += 1
    return hits / total


def test_periodic_hosts_follow_their_daily_and_weekly_pattern():
    hosts = generate_hosts(AvailabilityModel(random_share=0.0), 400, 28 * DAY, random.Random(3))
    office = [h for h in hosts if h.group == "office-hours"]
    nights = [h for h in hosts if h.group == "nights-and-weekends"]
    assert len(office) > 60 and len(nights) > 60
    assert local_hour_available(office, 12.5, weekend=False) > 0.75
    assert local_hour_available(office, 3.0, weekend=False) < 0.1
    assert local_hour_available(office, 12.5, weekend=True) < 0.05
    assert local_hour_available(nights, 2.0, weekend=False) > 0.75
    assert local_hour_available(nights, 12.5, weekend=False) < 0.15
    assert local_hour_available(nights, 12.5, weekend=True) > 0.9


def agreement_a_day_apart(hosts: list[HostAvailability]) -> float:
    same = total = 0
    for h in hosts:
        for hour in range(0, 20 * 24, 5):
            t = hour * HOUR
            if (t // DAY) % 7 in (4, 5, 6):  # a day apart stays within the week
                continue
            same += h.available_at(t) == h.available_at(t + DAY)
            total += 1
    return same / total


def test_periodic_hosts_repeat_daily_and_random_ones_less():
    model = AvailabilityModel(random_share=0.5)
    hosts = generate_hosts(model, 300, 21 * DAY, random.Random(4))
    periodic = [h for h in hosts if h.kind == "periodic"]
    random_hosts = [h for h in hosts if h.kind == "random"]
    assert agreement_a_day_apart(periodic) > 0.8
    assert agreement_a_day_apart(random_hosts) < agreement_a_day_apart(periodic) - 0.1


def test_intervals_are_sorted_disjoint_and_inside_the_horizon():
    horizon = 10 * DAY
    for h in generate_hosts(AvailabilityModel(random_share=0.5), 200, horizon, random.Random(5)):
        ends = [0.0]
        for start, end in h.intervals:
            assert ends[-1] <= start < end <= horizon
            ends.append(end)


def test_the_same_seed_gives_the_same_hosts_and_another_seed_others():
    model = AvailabilityModel()
    first = generate_hosts(model, 100, 7 * DAY, random.Random(9))
    assert generate_hosts(model, 100, 7 * DAY, random.Random(9)) == first
    assert generate_hosts(model, 100, 7 * DAY, random.Random(10)) != first


def test_interval_lookups():
    host = HostAvailability("random", "x", ((10.0, 20.0), (30.0, 100.0)))
    index = IntervalIndex(host)
    assert index.interval_at(15.0) == (10.0, 20.0) and index.interval_at(25.0) is None
    assert index.first_fit(12.0, 5.0) == 12.0
    assert index.first_fit(12.0, 9.0) == 30.0
    assert index.first_fit(0.0, 80.0) is None
    assert host.uptime(0.0, 40.0) == 20.0 and host.up_until(50.0) == 100.0


def test_bad_models_are_refused():
    with pytest.raises(ValueError, match="random_share"):
        AvailabilityModel(random_share=1.5)
    with pytest.raises(ValueError, match="clusters"):
        AvailabilityModel(clusters=())
