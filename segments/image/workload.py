"""The demo workload: a hash chain in guest RAM, checkable from outside the VM.

Theory of operation
-------------------
The guest's ``/init`` (a busybox ``sh`` script, ``DEMO_INIT`` below) computes

    STATE(0)   = seed
    STATE(i+1) = first 16 hex digits of sha256(STATE(i))   (no trailing newline)

for ``steps`` steps, printing to the console (``console=ttyS0``, the serial port)

    gleaner-start STEPS SEED
    gleaner-progress I STATE(I)        for I = E, 2E, 3E, ... (E = ``every``, default 1)
    gleaner-result STATE(STEPS)

and then powers off with ``poweroff -f``. ``steps = 0`` runs until stopped;
``every`` thins the progress lines of long runs (under TCG the loop does about
200-250 steps per second, one fork of ``sha256sum`` each). ``/init`` lowers the
kernel's console log level first, so kernel messages do not split its lines.

Every setting is a shell variable ``g_KEY``: the image's ``/etc/gleaner.conf``
holds the recipe's defaults and the kernel command line overrides them with
``gleaner.KEY=VALUE`` (e.g. ``gleaner.steps=6 gleaner.seed=abc``). The kernel
leaves dotted parameters in ``/proc/cmdline``, which is where ``/init`` reads.

The counter and the state are shell variables and a file in the initramfs, so
everything lives in guest RAM: a VM saved mid-run and restored (anywhere)
continues at the next step, with no reset and no gap. ``check_continuity``
verifies exactly that from the serial log: steps go up by ``every``, and each
state follows from the one before, so any restart or lost step is caught.

With ``gleaner.addr=ADDR/128`` (and optionally ``gleaner.gw=fe80::1``, the
default), ``/init`` loads the virtio modules listed in ``g_modules`` with
``insmod``, brings up ``eth0`` (duplicate address detection off, so the address
works at once), adds the address and a default route: the guest then answers
ping at its overlay address. Without it, nothing is loaded.

Nothing in this module does I/O; ``reference_*`` recompute the chain in Python.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass

from segments.image.runner import RUN_APPLETS, RUN_INIT

SANS_IO = True  # a core: tests/unit/test_import_graph.py holds it to no I/O

STATE_HEX = 16
PROGRESS = re.compile(rf"gleaner-progress (\d+) ([0-9a-f]{{{STATE_HEX}}})\r?$", re.MULTILINE)
RESULT = re.compile(rf"gleaner-result ([0-9a-f]{{{STATE_HEX}}})\r?$", re.MULTILINE)
START = re.compile(r"gleaner-start (\d+) (\S+)\r?$", re.MULTILINE)

# Busybox applets the image links into /bin (the script needs these; a few help debugging).
APPLETS = (
    "cat",
    "dmesg",
    "echo",
    "hostname",
    "insmod",
    "ip",
    "ls",
    "mkdir",
    "mount",
    "ping",
    "poweroff",
    "printf",
    "sh",
    "sha256sum",
    "sleep",
)

DEMO_INIT = r"""#!/bin/sh
# Gleaner guest /init: the demo workload (see segments/image/workload.py).
export PATH=/bin
set -f
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
dmesg -n 1
. /etc/gleaner.conf
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    gleaner.*=*)
      key=${arg#gleaner.}
      key=${key%%=*}
      case "$key" in
        ''|*[!a-z0-9_]*) ;;
        *) eval "g_$key=\${arg#*=}" ;;
      esac ;;
  esac
done
hostname "${g_hostname:-gleaner}"
ip link set lo up

if [ -n "$g_addr" ]; then
  for m in $g_modules; do
    insmod "/lib/modules/$m.ko" || echo "gleaner-warning insmod $m failed"
  done
  n=0
  while [ ! -e /sys/class/net/eth0 ] && [ "$n" -lt 10 ]; do sleep 1; n=$((n+1)); done
  if [ -e /sys/class/net/eth0 ]; then
    echo 0 > /proc/sys/net/ipv6/conf/eth0/accept_dad
    ip link set eth0 up
    ip -6 addr add "$g_addr" dev eth0
    ip -6 route add default via "${g_gw:-fe80::1}" dev eth0
    echo "gleaner-net $g_addr"
  else
    echo "gleaner-warning no eth0"
  fi
fi

case "$g_steps" in ''|*[!0-9]*) echo "gleaner-warning bad steps '$g_steps'"; g_steps=0 ;; esac
case "$g_every" in ''|0|*[!0-9]*) g_every=1 ;; esac
echo "gleaner-start $g_steps $g_seed"
s=$g_seed
i=0
while [ "$g_steps" -eq 0 ] || [ "$i" -lt "$g_steps" ]; do
  printf '%s' "$s" > /run/state.in
  sha256sum /run/state.in > /run/state.out
  read -r h rest < /run/state.out
  s=${h%"${h#????????????????}"}
  i=$((i+1))
  [ $((i % g_every)) -eq 0 ] && echo "gleaner-progress $i $s"
done
echo "gleaner-result $s"
poweroff -f
"""

WORKLOADS = {"demo": DEMO_INIT, "run": RUN_INIT}
WORKLOAD_APPLETS = {"demo": APPLETS, "run": RUN_APPLETS}


class ContinuityError(ValueError):
    """The progress lines show a reset, a gap, or a state that is not the chain's."""


@dataclass(frozen=True, slots=True)
class Continuity:
    """What a continuous run of progress lines covered."""

    first_step: int
    last_step: int
    last_state: str


def next_state(state: str) -> str:
    """One step of the chain: the first 16 hex digits of sha256 of the state's bytes."""
    return hashlib.sha256(state.encode("utf-8")).hexdigest()[:STATE_HEX]


def reference_states(seed: str, steps: int) -> list[str]:
    """STATE(1) .. STATE(steps), as the guest prints them."""
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    states: list[str] = []
    state = seed
    for _ in range(steps):
        state = next_state(state)
        states.append(state)
    return states


def reference_result(seed: str, steps: int) -> str:
    """STATE(steps): what the guest prints as ``gleaner-result`` (the seed if steps = 0)."""
    states = reference_states(seed, steps)
    return states[-1] if states else seed


def kernel_cmdline(
    steps: int,
    seed: str,
    addr: str | None = None,
    gw: str | None = None,
    base: str = "console=ttyS0 panic=-1",
) -> str:
    """A kernel command line running the demo for `steps` steps from `seed`."""
    parts = [base, f"gleaner.steps={steps}", f"gleaner.seed={seed}"]
    if addr:
        parts.append(f"gleaner.addr={addr}")
    if gw:
        parts.append(f"gleaner.gw={gw}")
    return " ".join(parts)


def parse_progress(serial_text: str) -> list[tuple[int, str]]:
    """Every ``gleaner-progress STEP STATE`` line in a serial log, in order."""
    return [(int(step), state) for step, state in PROGRESS.findall(serial_text)]


def parse_result(serial_text: str) -> str | None:
    """The state of the last ``gleaner-result`` line, or None if the run has not ended."""
    results = RESULT.findall(serial_text)
    return results[-1] if results else None


def parse_start(serial_text: str) -> tuple[int, str] | None:
    """(steps, seed) from the first ``gleaner-start`` line, or None."""
    match = START.search(serial_text)
    return (int(match.group(1)), match.group(2)) if match else None


def check_continuity(
    lines: Iterable[tuple[int, str]],
    seed: str | None = None,
    after_step: int | None = 0,
    every: int = 1,
) -> Continuity:
    """Check that progress lines form one unbroken run of the chain; raise ContinuityError.

    Steps must go up by exactly `every` and each state must be the chain's
    state `every` steps after the one before. The first line must be step
    ``after_step + every`` (``after_step=None`` accepts any start: a log that
    begins mid-run); with `seed`, the states must be the chain from that seed.
    """
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    lines = list(lines)
    if not lines:
        raise ContinuityError("no gleaner-progress lines")
    first, state = lines[0]
    if after_step is not None and first != after_step + every:
        raise ContinuityError(f"the run starts at step {first}, expected {after_step + every}")
    if seed is not None and state != reference_result(seed, first):
        raise ContinuityError(f"step {first}: state {state} is not the chain from seed {seed!r}")
    previous_step, previous_state = first, state
    for step, state in lines[1:]:
        if step <= previous_step:
            raise ContinuityError(
                f"reset: step {step} follows step {previous_step} (the run went back)"
            )
        if step != previous_step + every:
            raise ContinuityError(
                f"gap: step {step} follows step {previous_step} (expected {previous_step + every})"
            )
        if state != reference_result(previous_state, every):
            raise ContinuityError(
                f"step {step}: state {state} does not follow step {previous_step}'s "
                f"state {previous_state}"
            )
        previous_step, previous_state = step, state
    return Continuity(first, previous_step, previous_state)
