"""The host probe: exact arithmetic on a made-up /proc and /sys, then the real ones here.

The real-host tests make no timing or load assumptions (this machine may be
saturated by other tests): they compare two probes over the same intervals,
one told a busy-loop process is a guest and one not, and wait a bounded number
of samples for the difference to show.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from node.policy.machine import HostSampled
from node.runtime.host_probe import (
    FakeProbe,
    HostProbe,
    Probe,
    ProbeError,
    on_battery,
    parse_cpu_line,
    parse_input_interrupts,
    parse_process_stat,
)

HZ = os.sysconf("SC_CLK_TCK")
OWN = 1000
INTERRUPTS_HEADER = "           CPU0       CPU1       \n"
VIRTIO = " 38:          0      12317 PCI-MSIX-0000:00:03.0   1-edge      virtio2-input.0\n"
I8042 = "  1:        {}          0  IR-IO-APIC    1-edge      i8042\n"


class FakeHost:
    """A /proc and /sys tree under tmp_path that the tests advance by hand."""

    def __init__(self, root: Path) -> None:
        self.proc = root / "proc"
        self.sys = root / "sys"
        self.proc.mkdir()
        self.set_cpu(busy=0, idle=0, uptime_s=100.0)
        self.set_process(OWN, ticks=0, started=0)

    def set_cpu(self, busy: int, idle: int, uptime_s: float, steal: int = 0) -> None:
        # user nice system idle iowait irq softirq steal guest guest_nice
        user, system = busy - busy // 4, busy // 4
        fields = [user, 0, system, idle, 0, 0, 0, steal, 0, 0]
        cpu = "cpu  " + " ".join(str(v) for v in fields)
        (self.proc / "stat").write_text(f"{cpu}\ncpu0 {' '.join('1' * 10)}\nintr 5\n")
        (self.proc / "uptime").write_text(f"{uptime_s:.2f} 10.00\n")

    def set_process(self, pid: int, ticks: int, started: int) -> None:
        rest = ["S"] + ["1"] * 10 + [str(ticks - ticks // 3), str(ticks // 3)]
        rest += ["0"] * 6 + [str(started)] + ["0"] * 5
        (self.proc / str(pid)).mkdir(exist_ok=True)
        (self.proc / str(pid) / "stat").write_text(f"{pid} (qemu (x) 1) {' '.join(rest)}\n")

    def set_interrupts(self, text: str) -> None:
        (self.proc / "interrupts").write_text(text)

    def supply(self, name: str, **files: str) -> None:
        folder = self.sys / "class" / "power_supply" / name
        folder.mkdir(parents=True, exist_ok=True)
        for key, value in files.items():
            (folder / key).write_text(value + "\n")

    def probe(self) -> HostProbe:
        return HostProbe(self.proc, self.sys, own_pid=OWN)


@pytest.fixture
def host(tmp_path):
    return FakeHost(tmp_path)


# -- CPU on a made-up /proc -----------------------------------------------------------


def test_other_load_is_busy_less_ours_over_the_interval(host):
    host.set_cpu(busy=400, idle=600, uptime_s=100.0)
    host.set_process(42, ticks=1000, started=50)
    probe = host.probe()
    probe.sample([42], 0.0)  # the guest is tracked from here on
    host.set_cpu(busy=550, idle=650, uptime_s=101.0)  # 200 ticks: 150 busy
    host.set_process(42, ticks=1050, started=50)  # the guest: 50
    host.set_process(OWN, ticks=10, started=0)  # the agent: 10
    sampled = probe.sample([42], 1.0)
    assert sampled.other_load == pytest.approx(90 / 200)
    assert probe.statistics() == {
        "samples": 2,
        "other_load": pytest.approx(0.45),
        "ours_load": pytest.approx(0.30),
        "interval_ticks": 200,
    }


def test_a_pid_not_given_as_a_guest_is_the_volunteers(host):
    host.set_process(42, ticks=0, started=50)
    probe = host.probe()
    probe.sample([42], 0.0)
    host.set_cpu(busy=150, idle=50, uptime_s=101.0)
    host.set_process(42, ticks=50, started=50)
    assert probe.sample([], 1.0).other_load == pytest.approx(150 / 200)


def test_steal_is_not_the_hosts_time(host):
    probe = host.probe()
    host.set_cpu(busy=50, idle=50, uptime_s=101.0, steal=100)
    assert probe.sample([], 1.0).other_load == pytest.approx(0.5)


def test_a_new_guest_counts_whole_if_it_started_since_the_last_sample(host):
    probe = host.probe()  # uptime 100 s
    host.set_cpu(busy=100, idle=100, uptime_s=101.0)
    host.set_process(7, ticks=80, started=int(100.5 * HZ))  # started after the last reading
    host.set_process(8, ticks=30, started=int(10 * HZ))  # old: counted from now on
    assert probe.sample([7, 8], 1.0).other_load == pytest.approx(20 / 200)
    host.set_cpu(busy=200, idle=200, uptime_s=102.0)
    host.set_process(7, ticks=100, started=int(100.5 * HZ))
    host.set_process(8, ticks=60, started=int(10 * HZ))
    assert probe.sample([7, 8], 2.0).other_load == pytest.approx(50 / 200)


def test_a_reused_pid_is_a_new_process(host):
    host.set_process(9, ticks=5000, started=int(50 * HZ))
    probe = host.probe()
    probe.sample([9], 0.0)
    host.set_cpu(busy=100, idle=100, uptime_s=101.0)
    host.set_process(9, ticks=40, started=int(100.5 * HZ))  # another process, same pid
    assert probe.sample([9], 1.0).other_load == pytest.approx(60 / 200)


def test_ours_never_exceeds_busy_and_gone_pids_are_skipped(host):
    probe = host.probe()
    host.set_cpu(busy=10, idle=190, uptime_s=101.0)
    host.set_process(OWN, ticks=500, started=int(100.9 * HZ))
    assert probe.sample([12345], 1.0).other_load == 0.0  # 12345 does not exist


def test_no_tick_passed_repeats_the_last_value(host):
    probe = host.probe()
    host.set_cpu(busy=100, idle=100, uptime_s=101.0)
    assert probe.sample([], 1.0).other_load == pytest.approx(0.5)
    assert probe.sample([], 1.001).other_load == pytest.approx(0.5)
    host.set_cpu(busy=100, idle=300, uptime_s=102.0)
    assert probe.sample([], 2.0).other_load == 0.0


def test_no_proc_stat_is_a_probe_error(host):
    probe = host.probe()
    (host.proc / "stat").unlink()
    with pytest.raises(ProbeError, match="stat"):
        probe.sample([], 1.0)
    with pytest.raises(ProbeError):
        HostProbe(host.proc / "absent", host.sys)


def test_parsers():
    assert parse_cpu_line("cpu  10 1 5 100 4 1 2 7 3 0\ncpu0 1\n") == (123, 19)
    assert parse_cpu_line("cpu 10 1 5 100\n") == (116, 16)  # old kernels: fewer columns
    with pytest.raises(ValueError):
        parse_cpu_line("intr 1\n")
    line = "77 (a) b (c)) R 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 999 20 21\n"
    assert parse_process_stat(line) == (11 + 12, 999)


# -- input and battery on a made-up /proc and /sys -------------------------------------


def test_input_idle_is_the_time_since_input_counters_changed(host):
    probe = host.probe()
    assert probe.sample([], 0.0).input_idle_s is None  # no /proc/interrupts
    host.set_interrupts(INTERRUPTS_HEADER + VIRTIO)
    assert probe.sample([], 1.0).input_idle_s is None  # a virtio "input" queue is no keyboard
    host.set_interrupts(INTERRUPTS_HEADER + I8042.format(10) + VIRTIO)
    assert probe.sample([], 2.0).input_idle_s == 0.0  # first look: taken as just used
    assert probe.sample([], 12.5).input_idle_s == 10.5
    host.set_interrupts(INTERRUPTS_HEADER + I8042.format(11) + VIRTIO.replace("12317", "99"))
    assert probe.sample([], 20.0).input_idle_s == 0.0
    assert probe.sample([], 21.0).input_idle_s == 1.0


def test_input_device_names():
    text = INTERRUPTS_HEADER + "".join(
        f" {n}:  {n}  1  chip  {n}-edge  {name}\n"
        for n, name in enumerate(
            ["i8042", "i2c-hid-elan", "usbhid", "xhci_hcd", "nvidia", "virtio4-input", "ttyS0"]
        )
    )
    assert parse_input_interrupts(text) == {"0": 1, "1": 2, "2": 3}
    assert parse_input_interrupts(INTERRUPTS_HEADER) is None
    assert parse_input_interrupts("") is None


def test_battery(host):
    supplies = host.sys / "class" / "power_supply"
    assert on_battery(supplies) is None  # no such directory
    supplies.mkdir(parents=True)
    assert on_battery(supplies) is None
    host.supply("hidpp_battery_0", type="Battery", scope="Device", status="Discharging")
    assert on_battery(supplies) is None  # a mouse's battery says nothing about the host
    host.supply("BAT0", type="Battery", status="Discharging")
    assert on_battery(supplies) is True
    host.supply("AC", type="Mains", online="0")
    assert on_battery(supplies) is True
    host.supply("AC", type="Mains", online="1")
    assert on_battery(supplies) is False
    host.supply("AC", type="Mains", online="0")
    host.supply("ucsi-source-psy-USBC000:001", type="USB", online="1")
    assert on_battery(supplies) is False  # charging over USB-C
    host.supply("ucsi-source-psy-USBC000:001", type="USB", online="0")
    host.supply("BAT0", type="Battery", status="Charging")
    assert on_battery(supplies) is False
    probe = host.probe()
    host.supply("BAT0", type="Battery", status="Discharging")
    assert probe.sample([], 1.0).on_battery is True


def test_minute_of_day_is_local_time(host):
    probe = host.probe()
    now = 1_700_000_000.0
    local = time.localtime(now)
    assert probe.sample([], now).minute_of_day == local.tm_hour * 60 + local.tm_min


# -- the fake twin ---------------------------------------------------------------------


def test_fake_probe_returns_what_was_set():
    fake = FakeProbe()
    probe: Probe = fake
    assert probe.sample([3, 4], 0.0) == HostSampled(0.0, None, None, 720)
    fake.other_load, fake.input_idle_s, fake.on_battery, fake.minute_of_day = 0.8, 5.0, True, 61
    assert probe.sample([], 1.0) == HostSampled(0.8, 5.0, True, 61)
    assert fake.samples == 2 and fake.guest_pids == frozenset()


# -- the real host ---------------------------------------------------------------------


def test_the_real_host_gives_sensible_values():
    probe = HostProbe()
    start = time.time()
    for _ in range(3):
        time.sleep(0.05)
        now = time.time()
        sampled = probe.sample([], now)
        assert 0.0 <= sampled.other_load <= 1.0
        assert sampled.on_battery in (None, True, False)
        assert sampled.input_idle_s is None or 0 <= sampled.input_idle_s <= now - start
        local = time.localtime(now)
        assert sampled.minute_of_day == local.tm_hour * 60 + local.tm_min
    ticks, started = parse_process_stat(Path("/proc/self/stat").read_text())
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    assert ticks >= 0 and 0 < started <= uptime * HZ + 1


def test_a_busy_loop_is_other_load_unless_it_is_a_guest():
    """Two probes over the same intervals; only one is told the busy loop is a guest.

    Summed over the samples, the other load the two see differs by the loop's own
    CPU time (read from its /proc/PID/stat), up to the few ticks between the two
    probes' reads. The wait is bounded by the loop's CPU time, not by a clock.
    """
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    spinner_stat = Path(f"/proc/{spinner.pid}/stat")
    try:
        volunteer, gleaner = HostProbe(), HostProbe()
        spun_from = parse_process_stat(spinner_stat.read_text())[0]
        difference = spun = 0.0
        for _ in range(600):
            time.sleep(0.1)
            now = time.time()
            seen_as_other = volunteer.sample([], now).other_load
            seen_as_guest = gleaner.sample([spinner.pid], now).other_load
            assert seen_as_guest <= 1.0 and seen_as_other <= 1.0
            difference += (
                seen_as_other * volunteer.statistics()["interval_ticks"]
                - seen_as_guest * gleaner.statistics()["interval_ticks"]
            )
            spun = parse_process_stat(spinner_stat.read_text())[0] - spun_from
            if spun >= 50:
                break
        else:
            pytest.fail(f"the busy loop used only {spun} ticks")
        assert difference >= spun / 2, (difference, spun)
    finally:
        spinner.kill()
        spinner.wait()
    # A guest that has exited is skipped without error.
    assert 0.0 <= gleaner.sample([spinner.pid], time.time()).other_load <= 1.0
