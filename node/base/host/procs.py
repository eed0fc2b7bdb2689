"""Stopping processes we did not fork, by PID, safely.

Daemons outlive the process that started them (an agent killed with SIGKILL
leaves its wireguard-go; libvirt daemonises QEMU; `testbed up` exits while its
agents run). They are stopped by the PID that was recorded, never by name,
and only after checking that the PID still runs what was recorded (PIDs are
reused). A zombie counts as gone: its parent, often PID 1, reaps it later.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

POLL_S = 0.02


def pid_alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def cmdline(pid: int) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return []


def terminate_pid(pid: int, timeout_s: float) -> bool:
    """SIGTERM, then SIGKILL after `timeout_s`; True once it is gone (False: it survived)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return True
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not pid_alive(pid):
                return True
            time.sleep(POLL_S)
    return not pid_alive(pid)


def stop_recorded(pid_file: Path, markers: tuple[bytes, ...], timeout_s: float) -> int | None:
    """Stop the process a PID file names if its command line holds every marker.

    Removes the PID file either way; returns the PID it stopped, if any.
    """
    try:
        pid = int(pid_file.read_text())
    except (OSError, ValueError):
        return None
    try:
        arguments = cmdline(pid)
        if pid_alive(pid) and all(any(m in a for a in arguments) for m in markers):
            terminate_pid(pid, timeout_s)
            return pid
        return None
    finally:
        pid_file.unlink(missing_ok=True)
