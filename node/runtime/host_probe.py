"""The host probe: what the volunteer is doing with this machine, as a ``HostSampled``.

``Probe`` is the one small interface; ``HostProbe`` reads Linux's /proc and
/sys, ``FakeProbe`` is its twin for core and simulator tests. The agent calls
``sample(guest_pids, now)`` every ``policy.sample_interval_s`` (in a thread: it
reads files) and hands the result to the host policy core (node/policy/machine.py).

*Other CPU load.* /proc/stat's ``cpu`` line, the sum over all cores, read at
each sample: the share of core time spent busy since the previous sample,
less what was ours. Busy is user, nice, system, irq and softirq; the total adds
idle and iowait. Steal (time the hypervisor gave to someone else) is in
neither: it is not this host's to use. *Ours* is the agent's own process and
the guest PIDs the agent passes (QEMU processes): their utime and stime from
/proc/PID/stat, which for a process sums all its threads (vCPU threads
included). Everything else is the volunteer's, the agent's helper processes
(wireguard-go, libvirtd) too: they are small, and counting them as the
volunteer's errs on the volunteer's side. A guest PID seen for the first time
counts all its CPU time if it started after the previous sample, else from this
sample on (so a process adopted late may look like other load once); PIDs are
tracked with their start time, so a reused PID is a new process. CPU a guest
used between the previous sample and its exit is lost, so its exit may look
like other load for one sample. The first sample measures from the probe's
construction; too short an interval (no tick passed) repeats the last value.

*One namespace only.* With ``namespace_only`` the volunteer's load is the CPU
of the processes in the agent's own network namespace (less ours), not the
whole machine's: how a testbed host, one namespace among several on one
machine, sees only its own "volunteer" (a load started in it) and not its
neighbours' guests. There a process counts its CPU *demand* (run plus run-queue
wait, /proc/PID/schedstat), since the neighbours' load would otherwise hide it.
On a real host the agent runs in the root namespace with everything else, and
the whole machine is the right measure.

*Input idle time.* Lines of /proc/interrupts whose device names a keyboard,
mouse, touchpad or HID device (i8042, ``keyboard``, ``mouse``, ``hid``, ...):
the time their counters last changed. None when there are no such lines (a
server, a VM). The first sample counts as input just now, since we cannot know
better: a desktop host starts busy for ``policy.input_idle_s``. A USB keyboard
shares its controller's interrupt with disks and the like, so it is not seen
(xhci lines are not counted: disk traffic is not the owner at the keyboard).

*Battery.* /sys/class/power_supply/*: on battery means a system battery
(``type`` Battery, not ``scope`` Device: a mouse's or headset's battery does not
count) is Discharging and no Mains or USB supply is online. None when there
is no power supply information.

*Minute of day* is ``now`` in local time.
"""

from __future__ import annotations

import os
import platform
import re
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from node.policy.machine import HostSampled


@dataclass(frozen=True, slots=True)
class HostFacts:
    """What this machine is, read once: the peer record advertises it, the caps start from it."""

    arch: str
    vcpus: int
    memory_mib: int  # physical memory; 0 when the system does not say
    kvm: bool


def host_facts() -> HostFacts:
    try:
        memory_mib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") >> 20
    except (ValueError, OSError):
        memory_mib = 0
    return HostFacts(
        arch=platform.machine() or "unknown",
        vcpus=os.cpu_count() or 1,
        memory_mib=memory_mib,
        kvm=os.path.exists("/dev/kvm"),
    )


class ProbeError(Exception):
    """The host cannot be sampled (no /proc/stat): the message says what failed."""


class Probe(Protocol):
    def sample(self, guest_pids: Collection[int], now: float) -> HostSampled: ...


_INPUT_DEVICE = re.compile(
    r"i8042|keyboard|kbd|mouse|touchpad|touchscreen|trackpoint|(?<![a-z])hid|usbhid|i2c[-_]hid",
    re.IGNORECASE,
)


@dataclass(frozen=True, slots=True)
class CpuReading:
    """Cumulative clock ticks at one instant."""

    total: int
    busy: int
    uptime_ticks: int
    ours: dict[tuple[int, int], int]  # (pid, start time in ticks since boot) -> utime + stime
    others: dict[tuple[int, int], int] | None = None  # namespace_only: the namespace's others


def parse_cpu_line(text: str) -> tuple[int, int]:
    """(total, busy) ticks from /proc/stat's aggregate ``cpu`` line."""
    for line in text.splitlines():
        fields = line.split()
        if fields and fields[0] == "cpu":
            values = [int(v) for v in fields[1:9]]
            values += [0] * (8 - len(values))  # old kernels have fewer columns
            user, nice, system, idle, iowait, irq, softirq, _steal = values
            busy = user + nice + system + irq + softirq
            return busy + idle + iowait, busy
    raise ValueError("no cpu line")


def parse_process_stat(text: str) -> tuple[int, int]:
    """(utime + stime, start time) in ticks from /proc/PID/stat (the name may hold spaces)."""
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[11]) + int(fields[12]), int(fields[19])


def parse_input_interrupts(text: str) -> dict[str, int] | None:
    """Interrupt counts (summed over CPUs) of input devices by IRQ; None if there are none."""
    lines = text.splitlines()
    if not lines:
        return None
    cpus = len(lines[0].split())
    counts: dict[str, int] = {}
    for line in lines[1:]:
        irq, _, rest = line.partition(":")
        fields = rest.split()
        numbers = [int(f) for f in fields[:cpus] if f.isdigit()]
        name = " ".join(fields[len(numbers) :])
        if _INPUT_DEVICE.search(name):
            counts[irq.strip()] = sum(numbers)
    return counts or None


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def on_battery(power_supply: Path) -> bool | None:
    """From /sys/class/power_supply: a system battery discharging and no supply online."""
    try:
        supplies = sorted(power_supply.iterdir())
    except OSError:
        return None
    known = discharging = external = False
    for supply in supplies:
        kind = _read(supply / "type")
        if kind == "Battery" and _read(supply / "scope") != "Device":
            known = True
            discharging = discharging or _read(supply / "status") == "Discharging"
        elif kind is not None and (kind == "Mains" or kind.startswith("USB")):
            known = True
            external = external or _read(supply / "online") == "1"
    return (discharging and not external) if known else None


class HostProbe:
    """Samples the real host from ``proc`` and ``sys`` (other roots for tests)."""

    def __init__(
        self,
        proc: str | Path = "/proc",
        sys: str | Path = "/sys",
        own_pid: int | None = None,
        namespace_only: bool = False,
    ) -> None:
        self.proc = Path(proc)
        self.namespace_only = namespace_only
        self.power_supply = Path(sys) / "class" / "power_supply"
        self.own_pid = os.getpid() if own_pid is None else own_pid
        self.ticks_per_s = os.sysconf("SC_CLK_TCK")
        self._previous = self._read_cpu(())
        total, busy = self._previous.total, self._previous.busy
        self._other_load = min(busy / total, 1.0) if total else 0.0  # since boot, until a delta
        self._ours_load = 0.0
        self._interval_ticks = 0
        self._input_counts: dict[str, int] | None = None
        self._input_at = 0.0
        self._samples = 0

    def sample(self, guest_pids: Collection[int], now: float) -> HostSampled:
        """Look at the host now; ``guest_pids`` are ours (with the agent's own process)."""
        self._samples += 1
        self._sample_cpu(guest_pids)
        local = time.localtime(now)
        return HostSampled(
            other_load=self._other_load,
            input_idle_s=self._input_idle(now),
            on_battery=on_battery(self.power_supply),
            minute_of_day=local.tm_hour * 60 + local.tm_min,
        )

    def statistics(self) -> dict[str, Any]:
        """The last sample's loads (shares of all cores) and the ticks it spanned."""
        return {
            "samples": self._samples,
            "other_load": self._other_load,
            "ours_load": self._ours_load,
            "interval_ticks": self._interval_ticks,
        }

    # -- CPU ---------------------------------------------------------------------------------

    def _sample_cpu(self, guest_pids: Collection[int]) -> None:
        previous, current = self._previous, self._read_cpu(guest_pids)
        self._previous = current
        total = current.total - previous.total
        busy = max(current.busy - previous.busy, 0)
        if total <= 0:
            return
        ours = 0
        for key, ticks in current.ours.items():
            if key in previous.ours:
                ours += max(ticks - previous.ours[key], 0)
            elif key[1] >= previous.uptime_ticks:  # started since the previous reading
                ours += ticks
        if current.others is not None and previous.others is not None:
            busy = ours + _delta(previous, current.others)
        ours = min(ours, busy)
        self._interval_ticks = total
        self._ours_load = ours / total
        self._other_load = min((busy - ours) / total, 1.0)

    def _read_cpu(self, guest_pids: Collection[int]) -> CpuReading:
        stat, uptime = self.proc / "stat", self.proc / "uptime"
        try:
            total, busy = parse_cpu_line(stat.read_text())
            uptime_ticks = int(float(uptime.read_text().split()[0]) * self.ticks_per_s)
        except (OSError, ValueError, IndexError) as exc:
            raise ProbeError(f"reading {stat} and {uptime}: {exc}") from exc
        ours: dict[tuple[int, int], int] = {}
        for pid in {self.own_pid, *guest_pids}:
            try:
                ticks, started = parse_process_stat((self.proc / str(pid) / "stat").read_text())
            except (OSError, ValueError, IndexError):
                continue  # gone (a guest that just exited): nothing to count
            ours[(pid, started)] = ticks
        others = self._namespace_others(set(ours)) if self.namespace_only else None
        return CpuReading(total, busy, uptime_ticks, ours, others)

    def _demand_ticks(self, entry: Path, fallback: int) -> int:
        """A process's CPU *demand* in ticks: time run plus time waiting for a CPU.

        Several testbed hosts share one machine, so a volunteer's busy loop may
        get only a slice of a core while other hosts' guests run; what it asked
        for is the fair measure of the volunteer being back. Without schedstat,
        the CPU time it got.
        """
        try:
            nanoseconds = parse_schedstat((entry / "schedstat").read_text())
        except (OSError, ValueError):
            return fallback
        return nanoseconds * self.ticks_per_s // 1_000_000_000

    def _namespace_others(self, ours: set[tuple[int, int]]) -> dict[tuple[int, int], int]:
        """CPU ticks of every other process in our network namespace."""
        try:
            mine = os.readlink(self.proc / str(self.own_pid) / "ns" / "net")
        except OSError:
            return {}
        others: dict[tuple[int, int], int] = {}
        for entry in self.proc.iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if os.readlink(entry / "ns" / "net") != mine:
                    continue
                ticks, started = parse_process_stat((entry / "stat").read_text())
                ticks = self._demand_ticks(entry, ticks)
            except (OSError, ValueError, IndexError):
                continue
            if (int(entry.name), started) not in ours:
                others[(int(entry.name), started)] = ticks
        return others

    # -- input -------------------------------------------------------------------------------

    def _input_idle(self, now: float) -> float | None:
        text = _read(self.proc / "interrupts")
        counts = parse_input_interrupts(text) if text is not None else None
        if counts is None:
            self._input_counts = None
            return None
        if counts != self._input_counts:
            self._input_at = now  # changed, or the first look: taken as input just now
            self._input_counts = counts
        return max(now - self._input_at, 0.0)


def parse_schedstat(text: str) -> int:
    """Nanoseconds a task ran plus waited on a run queue, from /proc/PID/schedstat."""
    ran, waited = text.split()[:2]
    return int(ran) + int(waited)


def _delta(previous: CpuReading, current: dict[tuple[int, int], int]) -> int:
    """Ticks used since ``previous`` by the processes in ``current`` (new ones: all theirs)."""
    before = previous.others or {}
    used = 0
    for key, ticks in current.items():
        if key in before:
            used += max(ticks - before[key], 0)
        elif key[1] >= previous.uptime_ticks:
            used += ticks
    return used


@dataclass(slots=True)
class FakeProbe:
    """The test twin: returns what the test set, and remembers the guest PIDs it was given."""

    other_load: float = 0.0
    input_idle_s: float | None = None
    on_battery: bool | None = None
    minute_of_day: int = 12 * 60
    samples: int = 0
    guest_pids: frozenset[int] = field(default_factory=frozenset)

    def sample(self, guest_pids: Collection[int], now: float) -> HostSampled:
        self.samples += 1
        self.guest_pids = frozenset(guest_pids)
        return HostSampled(self.other_load, self.input_idle_s, self.on_battery, self.minute_of_day)
