"""The agent's own wireguard-go daemon: start, watch, restart and stop it, and set up its link.

Theory of operation
-------------------
The agent runs one wireguard-go per host and holds it by PID. The daemon runs
in the foreground (``-f`` and ``WG_PROCESS_FOREGROUND=1``), so the PID that
``Popen`` returns is the daemon's; inside a network namespace the command is
prefixed with ``ip netns exec NS``, which execs the daemon in its own place, so
the PID is still the daemon's. Its output goes to a log file the caller names.

*Ready* means the UAPI socket answers a ``get``. ``start`` waits for that, or
for the process to exit, with a bounded wait; either failure raises
``OverlayError`` with the tail of the log. ``stop`` sends SIGTERM to the PID,
SIGKILL after a timeout, and reaps the process; wireguard-go removes its socket
on SIGTERM but not when killed, so a socket that no longer answers is removed.
``restart`` is ``stop`` then ``start``: the TUN device is new, so the caller
must configure the link again and reconcile the full config (a diff against the
fresh, empty device does that).

Names: /run/wireguard is shared by all network namespaces, so two daemons with
one interface name collide even in different namespaces. ``interface_name``
derives a name from the node key, so hosts never share one. A socket that
already answers when ``start`` is called belongs to a daemon this object did
not start (another host, or one left by an earlier agent); ``start`` refuses
rather than kill a process it does not own.

The daemon is not tied to the agent with PR_SET_PDEATHSIG: that signal fires
when the *thread* that forked exits, and the agent calls this blocking API
from worker threads.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import os
import signal
import subprocess
import time
from pathlib import Path

from overlay.errors import OverlayError
from overlay.wireguard.uapi import SOCKET_DIR, UapiClient, UapiError, socket_path

IFNAME_PREFIX = "gl"
IFNAME_HASH_CHARS = 10
DEFAULT_MTU = 1420
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0
PROBE_TIMEOUT_S = 1.0
POLL_INTERVAL_S = 0.02
LOG_TAIL_BYTES = 2000
IP_TIMEOUT_S = 30.0


def interface_name(node_key: bytes) -> str:
    """``gl`` + 10 base32 characters of the key's hash: 12 characters, a valid ifname."""
    digest = hashlib.blake2b(node_key, digest_size=10, person=b"gleaner-wgif").digest()
    return IFNAME_PREFIX + base64.b32encode(digest).decode("ascii").lower()[:IFNAME_HASH_CHARS]


class WireGuardGo:
    """One wireguard-go daemon for interface `ifname`, optionally inside `netns`."""

    def __init__(
        self,
        ifname: str,
        log_path: Path,
        run_dir: Path = SOCKET_DIR,
        netns: str | None = None,
        executable: str = "wireguard-go",
        verbose: bool = False,
        start_timeout_s: float = START_TIMEOUT_S,
        stop_timeout_s: float = STOP_TIMEOUT_S,
        priority: int = 0,
    ) -> None:
        if not 0 < len(ifname) <= 15 or "/" in ifname or ifname.strip() != ifname:
            raise ValueError(f"not a valid interface name: {ifname!r}")
        self.ifname = ifname
        self.log_path = log_path
        self.run_dir = run_dir  # wireguard-go itself always uses /var/run/wireguard
        self.netns = netns
        self.executable = executable
        self.verbose = verbose
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.priority = priority
        self._process: subprocess.Popen[bytes] | None = None

    def _raise_priority(self) -> None:
        """In the child before exec: the data plane gets the CPU before the control plane.

        A nice value lowered before exec is inherited by every thread the Go
        runtime starts. Needs CAP_SYS_NICE; without it the daemon runs at the
        default priority.
        """
        try:
            os.nice(-self.priority)
        except OSError:
            pass

    @property
    def socket_path(self) -> Path:
        return socket_path(self.ifname, self.run_dir)

    @property
    def pid(self) -> int | None:
        """The daemon's PID while it runs."""
        return self._process.pid if self.is_running() and self._process else None

    def argv(self) -> list[str]:
        command = [self.executable, "-f", self.ifname]
        return ["ip", "netns", "exec", self.netns, *command] if self.netns else command

    def start(self) -> None:
        """Start the daemon and wait until its UAPI socket answers."""
        if self.is_running():
            raise OverlayError(f"starting wireguard-go for {self.ifname}: already running")
        self._refuse_foreign_daemon()
        env = {**os.environ, "WG_PROCESS_FOREGROUND": "1"}
        env["LOG_LEVEL"] = "verbose" if self.verbose else "error"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            try:
                self._process = subprocess.Popen(
                    self.argv(),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    env=env,
                    preexec_fn=self._raise_priority if self.priority else None,
                )
            except OSError as exc:
                raise OverlayError(f"starting wireguard-go for {self.ifname}: {exc}") from exc
        self._wait_until_ready()

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def is_healthy(self) -> bool:
        """The process is alive and its UAPI socket answers."""
        return self.is_running() and self._answers()

    def restart(self) -> None:
        self.stop()
        self.start()

    def stop(self) -> None:
        """SIGTERM the daemon by PID, SIGKILL it after the timeout, reap it, drop a stale socket."""
        process = self._process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                try:
                    process.wait(timeout=self.stop_timeout_s)
                except subprocess.TimeoutExpired as exc:
                    raise OverlayError(
                        f"stopping wireguard-go for {self.ifname}: PID {process.pid} "
                        "survived SIGKILL"
                    ) from exc
        self._process = None
        if self.socket_path.exists() and not self._answers():
            self.socket_path.unlink(missing_ok=True)

    def configure_link(self, address: ipaddress.IPv6Interface, mtu: int = DEFAULT_MTU) -> None:
        """Give the link its overlay address (no DAD), set its MTU and bring it up.

        ``addr replace`` rather than ``add``, so calling this again is harmless.
        """
        context = f"configuring link {self.ifname} with {address}"
        self._ip(context, "addr", "replace", str(address), "dev", self.ifname, "nodad")
        self._ip(context, "link", "set", "dev", self.ifname, "mtu", str(mtu), "up")

    def log_tail(self) -> str:
        try:
            with open(self.log_path, "rb") as log:
                log.seek(max(0, log.seek(0, os.SEEK_END) - LOG_TAIL_BYTES))
                return log.read().decode("utf-8", errors="replace").strip()
        except OSError as exc:
            return f"(log {self.log_path} unreadable: {exc})"

    def _answers(self) -> bool:
        try:
            UapiClient(self.ifname, self.run_dir, PROBE_TIMEOUT_S).get()
        except UapiError:
            return False
        return True

    def _refuse_foreign_daemon(self) -> None:
        if not self.socket_path.exists():
            return
        if self._answers():
            raise OverlayError(
                f"starting wireguard-go for {self.ifname}: {self.socket_path} already answers; "
                "another daemon owns this interface name"
            )
        self.socket_path.unlink(missing_ok=True)

    def _wait_until_ready(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            code = self._process.poll()
            if code is not None:
                self._process = None
                raise OverlayError(
                    f"starting wireguard-go for {self.ifname}: exited with {code}; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            if self._answers():
                return
            if time.monotonic() > deadline:
                self.stop()
                raise OverlayError(
                    f"starting wireguard-go for {self.ifname}: UAPI socket {self.socket_path} "
                    f"did not answer within {self.start_timeout_s} s; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(POLL_INTERVAL_S)

    def _ip(self, context: str, *args: str) -> None:
        command = ["ip", *(("-n", self.netns) if self.netns else ()), *args]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=IP_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise OverlayError(f"{context}: {' '.join(command)}: {exc}") from exc
        if result.returncode != 0:
            raise OverlayError(
                f"{context}: {' '.join(command)}: {result.stderr.strip() or result.returncode}"
            )
