"""Volunteer host availability: seeded on/off interval sequences shaped like SETI@home's.

Theory of operation
-------------------
A host is *available* while Gleaner may run on it (the machine is on and idle
by the volunteer's rules) and *unavailable* otherwise. ``generate_hosts``
draws, for each of ``count`` hosts, the sorted disjoint intervals
``[start, end)`` (seconds from the start of the run) in which it is available
over ``[0, horizon_s)``. Everything comes from the ``random.Random`` handed in,
so a seed fixes every interval.

The shape follows Javadi, Kondo, Vincent and Anderson, "Discovering Statistical
Models of Availability in Large Distributed Systems: An Empirical Study of
SETI@home" (MASCOTS 2009; IEEE TPDS 22(11), 2011), who studied about 230,000
SETI@home hosts over 1.5 years:

* **From the paper.** Only a minority of hosts have availability that passes
  their randomness tests (independent, identically distributed interval
  lengths): about 21 % in the TPDS version (34 % in the MASCOTS version).
  These *random* hosts fall into a few clusters, each fitted well by a
  distribution from a different family: Weibull, log-normal, gamma and
  hyper-exponential, with shape parameters below 1 for availability (a
  decreasing hazard: the longer a host has been up, the longer it stays up).
  The other hosts are not iid: their intervals are correlated, for many of
  them by daily and weekly rhythms of use.
* **Our assumptions.** The per-cluster parameters below are ours, chosen to
  give those families with means of hours (we could not check the paper's
  fitted values here; see docs/simulator-redundancy.md). The *structured*
  (non-random) hosts are modelled as periodic: a daily window in local time,
  with per-host and per-day jitter, weekend rules, a chance of skipping a
  day, and short random interruptions inside windows; hosts sit in three
  regions (UTC-6, UTC+1, UTC+8); the run starts on a Monday at 00:00 UTC.

Random hosts start in a state drawn from a ``burn_in_s`` warm-up, so the run
does not begin with every host freshly up. Each ``Distribution`` takes its
parameters in hours and samples seconds.

Pure: no I/O, no clock, no global random state.
"""

from __future__ import annotations

import bisect
import math
import random
from dataclasses import dataclass
from typing import Any

HOUR = 3600.0
DAY = 24 * HOUR
WEEK = 7 * DAY
FAMILIES = ("weibull", "lognormal", "gamma", "hyperexp", "exponential")


@dataclass(frozen=True, slots=True)
class Distribution:
    """An interval length distribution; parameters in hours, samples in seconds.

    weibull(shape, scale_h), lognormal(median_h, sigma), gamma(shape, scale_h),
    hyperexp(p, mean1_h, mean2_h): mean1 with probability p, else mean2;
    exponential(mean_h).
    """

    family: str
    a: float
    b: float = 0.0
    c: float = 0.0

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"family: {self.family!r} is not one of {', '.join(FAMILIES)}")
        if self.family == "hyperexp":
            ok = 0 < self.a < 1 and self.b > 0 and self.c > 0
        elif self.family == "exponential":
            ok = self.a > 0
        else:
            ok = self.a > 0 and self.b > 0
        if not ok:
            raise ValueError(
                f"{self.family}: parameters out of range ({self.a}, {self.b}, {self.c})"
            )

    def sample(self, rng: random.Random) -> float:
        family = self.family
        if family == "weibull":
            hours = rng.weibullvariate(self.b, self.a)
        elif family == "lognormal":
            hours = rng.lognormvariate(math.log(self.a), self.b)
        elif family == "gamma":
            hours = rng.gammavariate(self.a, self.b)
        elif family == "hyperexp":
            mean = self.b if rng.random() < self.a else self.c
            hours = rng.expovariate(1 / mean)
        else:
            hours = rng.expovariate(1 / self.a)
        return max(hours * HOUR, 1.0)

    @property
    def mean_s(self) -> float:
        family = self.family
        if family == "weibull":
            hours = self.b * math.gamma(1 + 1 / self.a)
        elif family == "lognormal":
            hours = self.a * math.exp(self.b**2 / 2)
        elif family == "gamma":
            hours = self.a * self.b
        elif family == "hyperexp":
            hours = self.a * self.b + (1 - self.a) * self.c
        else:
            hours = self.a
        return hours * HOUR

    def describe(self) -> str:
        if self.family == "hyperexp":
            return f"hyperexp(p={self.a}, means {self.b} h / {self.c} h)"
        if self.family == "exponential":
            return f"exponential(mean {self.a} h)"
        names = {
            "weibull": "shape, scale_h",
            "lognormal": "median_h, sigma",
            "gamma": "shape, scale_h",
        }
        return f"{self.family}({names[self.family]} = {self.a}, {self.b})"


@dataclass(frozen=True, slots=True)
class RandomCluster:
    """Hosts whose up and down intervals are iid draws (the paper's random hosts)."""

    name: str
    weight: float
    up: Distribution
    down: Distribution


@dataclass(frozen=True, slots=True)
class PeriodicProfile:
    """Hosts up in one daily window of local time (the structured hosts; our model)."""

    name: str
    weight: float
    start_h: float  # local hour the window opens
    length_h: float
    weekends: str  # "all": up all weekend, "none": down all weekend, "same": as weekdays
    host_jitter_h: float = 1.0  # per host, on start and length
    day_jitter_h: float = 0.5  # per day, on start and end
    skip_day: float = 0.08  # chance the window does not open on a given day
    interruptions_per_h: float = 0.03  # short outages inside a window (reboots, user back)
    interruption_mean_h: float = 0.4


@dataclass(frozen=True, slots=True)
class Region:
    name: str
    weight: float
    utc_offset_h: float


DEFAULT_CLUSTERS = (
    RandomCluster(
        "short-sessions",
        0.40,
        Distribution("weibull", 0.6, 2.0),
        Distribution("lognormal", 2.0, 1.2),
    ),
    RandomCluster(
        "daylong", 0.35, Distribution("gamma", 0.5, 16.0), Distribution("lognormal", 4.0, 1.4)
    ),
    RandomCluster(
        "mostly-on",
        0.25,
        Distribution("hyperexp", 0.7, 6.0, 60.0),
        Distribution("lognormal", 1.0, 1.5),
    ),
)
DEFAULT_PROFILES = (
    PeriodicProfile("nights-and-weekends", 0.45, start_h=18.0, length_h=13.0, weekends="all"),
    PeriodicProfile("office-hours", 0.35, start_h=8.5, length_h=9.0, weekends="none"),
    PeriodicProfile("evenings-busy", 0.20, start_h=23.0, length_h=19.0, weekends="same"),
)
DEFAULT_REGIONS = (
    Region("americas", 0.45, -6.0),
    Region("europe", 0.40, 1.0),
    Region("asia-pacific", 0.15, 8.0),
)


@dataclass(frozen=True, slots=True)
class AvailabilityModel:
    random_share: float = 0.21  # Javadi et al., TPDS 2011
    clusters: tuple[RandomCluster, ...] = DEFAULT_CLUSTERS
    profiles: tuple[PeriodicProfile, ...] = DEFAULT_PROFILES
    regions: tuple[Region, ...] = DEFAULT_REGIONS
    burn_in_s: float = WEEK

    def __post_init__(self) -> None:
        if not 0 <= self.random_share <= 1:
            raise ValueError(f"random_share: must be in 0..1, got {self.random_share!r}")
        for name, parts in (("clusters", self.clusters), ("profiles", self.profiles)):
            if not parts or min(p.weight for p in parts) < 0 or sum(p.weight for p in parts) <= 0:
                raise ValueError(f"{name}: need at least one, with weights >= 0 and not all 0")

    def describe(self) -> dict[str, Any]:
        """The model's parameters, for a run's JSON (so a figure says what made it)."""
        return {
            "random_share": self.random_share,
            "clusters": [
                {
                    "name": c.name,
                    "weight": c.weight,
                    "up": c.up.describe(),
                    "down": c.down.describe(),
                }
                for c in self.clusters
            ],
            "profiles": [
                {
                    "name": p.name,
                    "weight": p.weight,
                    "window": f"{p.start_h:g}h local for {p.length_h:g} h",
                    "weekends": p.weekends,
                    "skip_day": p.skip_day,
                    "interruptions_per_h": p.interruptions_per_h,
                }
                for p in self.profiles
            ],
            "regions": [f"{r.name} (UTC{r.utc_offset_h:+g}, {r.weight})" for r in self.regions],
        }


@dataclass(frozen=True, slots=True)
class HostAvailability:
    """One host's available intervals over the run: sorted, disjoint, [start, end)."""

    kind: str  # "random" or "periodic"
    group: str  # the cluster or profile name
    intervals: tuple[tuple[float, float], ...]
    region: str = ""

    def _index(self, t: float) -> int:
        """Index of the interval holding ``t``, or -1."""
        i = bisect.bisect_right(self._starts, t) - 1
        return i if i >= 0 and t < self.intervals[i][1] else -1

    @property
    def _starts(self) -> list[float]:
        return [s for s, _ in self.intervals]

    def available_at(self, t: float) -> bool:
        return self._index(t) >= 0

    def up_until(self, t: float) -> float:
        """The end of the interval holding ``t`` (``t`` itself if the host is down)."""
        i = self._index(t)
        return self.intervals[i][1] if i >= 0 else t

    def uptime(self, t0: float, t1: float) -> float:
        return sum(max(0.0, min(e, t1) - max(s, t0)) for s, e in self.intervals)


class IntervalIndex:
    """Fast lookups on one host's intervals (the frozen view keeps no cache)."""

    def __init__(self, host: HostAvailability) -> None:
        self.intervals = host.intervals
        self.starts = [s for s, _ in host.intervals]

    def interval_at(self, t: float) -> tuple[float, float] | None:
        i = bisect.bisect_right(self.starts, t) - 1
        if i >= 0 and t < self.intervals[i][1]:
            return self.intervals[i]
        return None

    def first_fit(self, t: float, length: float) -> float | None:
        """The earliest start >= ``t`` with the host up for ``length`` seconds after it."""
        i = max(bisect.bisect_right(self.starts, t) - 1, 0)
        for start, end in self.intervals[i:]:
            begin = max(start, t)
            if end - begin >= length:
                return begin
        return None


def generate_hosts(
    model: AvailabilityModel, count: int, horizon_s: float, rng: random.Random
) -> list[HostAvailability]:
    """``count`` hosts' availability over ``[0, horizon_s)``, every draw from ``rng``."""
    hosts = []
    for _ in range(count):
        if rng.random() < model.random_share:
            cluster = _pick(rng, model.clusters)
            intervals = _random_intervals(cluster, horizon_s, model.burn_in_s, rng)
            hosts.append(HostAvailability("random", cluster.name, intervals))
        else:
            profile = _pick(rng, model.profiles)
            region = _pick(rng, model.regions)
            intervals = _periodic_intervals(profile, region.utc_offset_h, horizon_s, rng)
            hosts.append(HostAvailability("periodic", profile.name, intervals, region.name))
    return hosts


def _pick(rng: random.Random, parts: Any) -> Any:
    return rng.choices(parts, weights=[p.weight for p in parts])[0]


def _random_intervals(
    cluster: RandomCluster, horizon_s: float, burn_in_s: float, rng: random.Random
) -> tuple[tuple[float, float], ...]:
    up_mean, down_mean = cluster.up.mean_s, cluster.down.mean_s
    t, up = -burn_in_s, rng.random() < up_mean / (up_mean + down_mean)
    out = []
    while t < horizon_s:
        length = (cluster.up if up else cluster.down).sample(rng)
        if up:
            start, end = max(t, 0.0), min(t + length, horizon_s)
            if end > start:
                out.append((start, end))
        t += length
        up = not up
    return tuple(out)


def _periodic_intervals(
    profile: PeriodicProfile, offset_h: float, horizon_s: float, rng: random.Random
) -> tuple[tuple[float, float], ...]:
    start_h = profile.start_h + rng.gauss(0, profile.host_jitter_h)
    length_h = min(max(profile.length_h + rng.gauss(0, profile.host_jitter_h), 1.0), 23.0)
    windows = []
    for day in range(-1, math.ceil(horizon_s / DAY) + 1):
        midnight = day * DAY - offset_h * HOUR  # local midnight, in run seconds (UTC)
        weekend = day % 7 in (5, 6)  # the run starts on a Monday
        if weekend and profile.weekends == "all":
            windows.append((midnight, midnight + DAY))
            continue
        if (weekend and profile.weekends == "none") or rng.random() < profile.skip_day:
            continue
        begin = midnight + (start_h + rng.gauss(0, profile.day_jitter_h)) * HOUR
        end = begin + (length_h + rng.gauss(0, profile.day_jitter_h)) * HOUR
        windows.extend(_interrupted(begin, end, profile, rng))
    return _clip(_merge(windows), horizon_s)


def _interrupted(
    begin: float, end: float, profile: PeriodicProfile, rng: random.Random
) -> list[tuple[float, float]]:
    """Split a window by short random outages (a Poisson process inside it)."""
    out, t = [], begin
    rate = profile.interruptions_per_h / HOUR
    while rate > 0:
        gap = rng.expovariate(rate)
        if t + gap >= end:
            break
        out.append((t, t + gap))
        t += gap + rng.expovariate(1 / (profile.interruption_mean_h * HOUR))
    if end > t:
        out.append((t, end))
    return out


def _merge(windows: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[tuple[float, float]] = []
    for start, end in sorted(windows):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        elif end > start:
            merged.append((start, end))
    return merged


def _clip(windows: list[tuple[float, float]], horizon_s: float) -> tuple[tuple[float, float], ...]:
    clipped = ((max(s, 0.0), min(e, horizon_s)) for s, e in windows)
    return tuple((s, e) for s, e in clipped if e > s)
