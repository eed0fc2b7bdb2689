"""A private libvirtd for one host: start it, know it is up, stop it and everything it started.

Theory of operation
-------------------
Each Gleaner host (a network namespace in tests, the machine itself in
production) runs its own libvirtd, which owns nothing outside ``root_dir``:

    root_dir/etc/      a prepared copy of /etc/libvirt   -> /etc/libvirt
    root_dir/run/                                        -> /run/libvirt
    root_dir/lib/                                        -> /var/lib/libvirt
    root_dir/cache/                                      -> /var/cache/libvirt
    root_dir/log/                                        -> /var/log/libvirt
    root_dir/sock/     unix_sock_dir: the daemon's sockets (not bind-mounted, so
                       clients in any mount namespace reach them)
    root_dir/libvirtd.log, root_dir/libvirtd.pid

The daemon runs in the foreground inside ``unshare --mount`` (a private mount
namespace, where the bind mounts above live and die with it) and, when a
network namespace is named, inside ``ip netns exec NS``. ``ip netns exec``,
``unshare`` and the ``sh -c`` that makes the mounts all *exec* their successor,
so the PID that ``Popen`` returns is libvirtd's own.

The copy of /etc/libvirt differs from the original in these ways (see
LAB-NOTES): none of the host's own domains, secrets or autostart links (so no
autostarted network: no bridge, no firewall rules);
``libvirtd.conf`` sets the host's fixed ``host_uuid`` (daemons with equal
uuids refuse to migrate to each other) and ``unix_sock_dir``; ``qemu.conf``
runs QEMU as root with ``stdio_handler = "file"`` (no virtlogd) and no cgroup
controllers (inside ``ip netns exec`` /sys is remounted without cgroups anyway,
and outside it this keeps the daemon from leaving cgroups behind), and no
per-domain mount namespace (so QEMU shares the daemon's, see ``stop``). An
incoming migration's QEMU listens on every address of the host unless
``migration_address`` names one (the URI a source is given only says where
the source connects).

*Up* means a libvirt connection to the socket opens and answers. ``start``
waits for that, bounded; a daemon that exits or does not answer in time is
stopped and ``LibvirtdError`` carries the log's tail.

``stop`` first destroys every running domain through the daemon (libvirt then
cleans up after QEMU itself), then sends SIGTERM to the daemon's PID, SIGKILL
after a timeout, and reaps it. QEMU is daemonised by libvirt (it is not
libvirtd's child), so finally any QEMU still named by a PID file in the
private /run/libvirt/qemu — and still in the daemon's mount namespace, which
proves it is ours — is stopped by PID the same way. Nothing is ever killed by
name.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import libvirt

from node.base.host.procs import pid_alive, terminate_pid

ETC_SOURCE = Path("/etc/libvirt")
START_TIMEOUT_S = 30.0
GUEST_NICE = 10  # the daemon and the QEMU it starts run this much below the agent
STOP_TIMEOUT_S = 10.0
CALL_TIMEOUT_S = 10.0
POLL_INTERVAL_S = 0.05
LOG_TAIL_BYTES = 3000
SOCKET_PATH_MAX = 107  # sun_path holds 108 bytes with the terminating NUL

# (directory under root_dir, mount point)
PRIVATE_MOUNTS = (
    ("etc", "/etc/libvirt"),
    ("run", "/run/libvirt"),
    ("lib", "/var/lib/libvirt"),
    ("cache", "/var/cache/libvirt"),
    ("log", "/var/log/libvirt"),
)

T = TypeVar("T")


class LibvirtdError(Exception):
    """The private libvirtd could not be prepared, started, reached or stopped."""


def _ignore_libvirt_error(_ctx: object, _err: object) -> None:
    """libvirt errors arrive as exceptions; keep the C library from also printing them."""


libvirt.registerErrorHandler(_ignore_libvirt_error, None)


class Libvirtd:
    """One private libvirtd for host `name`, with all its state under `root_dir`."""

    def __init__(
        self,
        name: str,
        root_dir: Path,
        netns: str | None,
        host_uuid: str,
        start_timeout_s: float = START_TIMEOUT_S,
        stop_timeout_s: float = STOP_TIMEOUT_S,
        capabilities_seed: Path | None = None,
        migration_address: str | None = None,
    ) -> None:
        self.name = name
        self.root_dir = root_dir.resolve()
        self.netns = netns
        self.host_uuid = host_uuid
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.capabilities_seed = capabilities_seed
        self.migration_address = migration_address
        self._process: subprocess.Popen[bytes] | None = None
        self._mount_ns: str | None = None
        if len(str(self.socket_path)) > SOCKET_PATH_MAX:
            raise LibvirtdError(
                f"libvirtd for {name}: socket path {self.socket_path} is longer than "
                f"{SOCKET_PATH_MAX} bytes; use a shorter root_dir"
            )

    @property
    def socket_path(self) -> Path:
        return self.root_dir / "sock" / "libvirt-sock"

    @property
    def uri(self) -> str:
        return f"qemu+unix:///system?socket={self.socket_path}"

    @property
    def capabilities_dir(self) -> Path:
        """Where the daemon caches its QEMU capability probe (a seed for other daemons)."""
        return self.root_dir / "cache" / "qemu" / "capabilities"

    @property
    def log_path(self) -> Path:
        return self.root_dir / "libvirtd.log"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self.is_running() and self._process else None

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def argv(self) -> list[str]:
        mounts = [
            f"mkdir -p {shlex.quote(target)} && "
            f"mount --bind {shlex.quote(str(self.root_dir / sub))} {shlex.quote(target)}"
            for sub, target in PRIVATE_MOUNTS
        ]
        # Guests inherit the daemon's priority: they get what the host and its agent
        # (membership probes, transfers, verification) leave over.
        daemon = ["nice", "-n", str(GUEST_NICE), "libvirtd"]
        daemon += ["--pid-file", str(self.root_dir / "libvirtd.pid")]
        script = "set -e; " + "; ".join(mounts) + "; exec " + shlex.join(daemon)
        command = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script]
        return ["ip", "netns", "exec", self.netns, *command] if self.netns else command

    def start(self) -> None:
        """Prepare root_dir, start the daemon and wait until its socket answers."""
        if self.is_running():
            raise LibvirtdError(f"starting libvirtd for {self.name}: already running")
        self.prepare()
        with open(self.log_path, "ab") as log:
            try:
                self._process = subprocess.Popen(
                    self.argv(),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    start_new_session=True,  # a terminal's ^C is ours; stop() ends the daemon
                )
            except OSError as exc:
                raise LibvirtdError(f"starting libvirtd for {self.name}: {exc}") from exc
        try:
            self._wait_until_ready()
        except BaseException:
            self.stop()
            raise

    def prepare(self) -> None:
        """Lay out root_dir and write the private configuration (idempotent)."""
        for sub, _target in PRIVATE_MOUNTS:
            (self.root_dir / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
        self.socket_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        etc = self.root_dir / "etc"
        try:
            shutil.copytree(
                ETC_SOURCE, etc, symlinks=True, dirs_exist_ok=True, ignore=_not_host_state
            )
        except OSError as exc:
            raise LibvirtdError(f"copying {ETC_SOURCE} to {etc}: {exc}") from exc
        for autostart in etc.glob("**/autostart"):
            for link in autostart.iterdir():
                link.unlink()
        (etc / "libvirtd.conf").write_text(
            f'host_uuid = "{self.host_uuid}"\n'
            f'unix_sock_dir = "{self.socket_path.parent}"\n'
            'unix_sock_group = "root"\n'
            'unix_sock_rw_perms = "0700"\n'
            'auth_unix_rw = "none"\n'
            'auth_unix_ro = "none"\n'
        )
        self._seed_capabilities()
        qemu_conf = (
            'user = "root"\ngroup = "root"\nstdio_handler = "file"\n'
            "cgroup_controllers = [ ]\nnamespaces = [ ]\n"
        )
        if self.migration_address is not None:
            qemu_conf += f'migration_address = "{self.migration_address}"\n'
        (etc / "qemu.conf").write_text(qemu_conf)

    def warm_up(self) -> None:
        """Make the daemon probe QEMU now (a few seconds) rather than at the first define."""

        def probe() -> None:
            conn = libvirt.open(self.uri)
            try:
                conn.getDomainCapabilities()
            finally:
                conn.close()

        try:
            _bounded(probe, self.start_timeout_s)
        except (libvirt.libvirtError, TimeoutError) as exc:
            raise LibvirtdError(
                f"probing QEMU with libvirtd for {self.name}: {exc}; "
                f"log {self.log_path}:\n{self.log_tail()}"
            ) from exc

    def stop(self) -> None:
        """Destroy running domains, stop the daemon by PID, then any QEMU it left."""
        process = self._process
        mount_ns = self._mount_ns
        try:
            if process is not None and process.poll() is None:
                self._destroy_domains()
                _terminate(process, self.stop_timeout_s, f"libvirtd for {self.name}")
        finally:
            self._process = None
            self._stop_left_qemu(mount_ns)

    @property
    def mount_namespace(self) -> str | None:
        """The daemon's private mount namespace (proves which QEMU processes are its own)."""
        return self._mount_ns

    def stop_by_pid(self, pid: int, mount_ns: str | None) -> None:
        """Stop a daemon that another process started, by its recorded PID, and its QEMU.

        The PID is trusted only while it is still in the recorded mount
        namespace (a recycled PID would be in another one).
        """
        try:
            if pid_alive(pid) and mount_ns is not None and _mount_namespace(pid) == mount_ns:
                self._destroy_domains()
                _kill_pid(pid, self.stop_timeout_s)
        finally:
            self._stop_left_qemu(mount_ns)

    def log_tail(self) -> str:
        try:
            with open(self.log_path, "rb") as log:
                log.seek(max(0, log.seek(0, os.SEEK_END) - LOG_TAIL_BYTES))
                return log.read().decode("utf-8", errors="replace").strip()
        except OSError as exc:
            return f"(log {self.log_path} unreadable: {exc})"

    def qemu_pids(self) -> list[int]:
        """PIDs of the QEMU processes this daemon started that still run."""
        return [pid for pid in self._recorded_qemu_pids(self._mount_ns) if pid_alive(pid)]

    # -- internals ---------------------------------------------------------------

    def _wait_until_ready(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            code = self._process.poll()
            if code is not None:
                raise LibvirtdError(
                    f"starting libvirtd for {self.name}: exited with {code}; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise LibvirtdError(
                    f"starting libvirtd for {self.name}: {self.socket_path} did not answer "
                    f"within {self.start_timeout_s:g} s; log {self.log_path}:\n{self.log_tail()}"
                )
            if self.socket_path.exists() and self._answers(remaining):
                self._mount_ns = _mount_namespace(self._process.pid)
                return
            time.sleep(POLL_INTERVAL_S)

    def _answers(self, timeout_s: float) -> bool:
        def probe() -> bool:
            conn = libvirt.open(self.uri)
            try:
                conn.getLibVersion()
            finally:
                conn.close()
            return True

        try:
            return _bounded(probe, min(timeout_s, CALL_TIMEOUT_S))
        except (libvirt.libvirtError, TimeoutError):
            return False

    def _destroy_domains(self) -> None:
        def destroy_all() -> None:
            conn = libvirt.open(self.uri)
            try:
                for domain in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
                    try:
                        domain.destroy()
                    except libvirt.libvirtError:
                        pass  # gone meanwhile; the PID sweep below catches a stuck one
            finally:
                conn.close()

        try:
            _bounded(destroy_all, CALL_TIMEOUT_S)
        except (libvirt.libvirtError, TimeoutError):
            pass  # the daemon is unwell; stopping it and the PID sweep still run

    def _seed_capabilities(self) -> None:
        if self.capabilities_seed is None or any(self.capabilities_dir.glob("*.xml")):
            return
        self.capabilities_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        for cached in self.capabilities_seed.glob("*.xml"):
            shutil.copy2(cached, self.capabilities_dir / cached.name)

    def _recorded_qemu_pids(self, mount_ns: str | None) -> list[int]:
        pids = []
        for pid_file in sorted((self.root_dir / "run" / "qemu").glob("*.pid")):
            try:
                pid = int(pid_file.read_text().strip())
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except (OSError, ValueError):
                continue
            if b"qemu" in cmdline.split(b"\0")[0] and _mount_namespace(pid) == mount_ns:
                pids.append(pid)
        return pids

    def _stop_left_qemu(self, mount_ns: str | None) -> None:
        if mount_ns is None:
            return
        for pid in self._recorded_qemu_pids(mount_ns):
            _kill_pid(pid, self.stop_timeout_s)


def _not_host_state(directory: str, names: list[str]) -> set[str]:
    """What the private /etc/libvirt must not inherit: the host's domains, secrets, autostarts."""
    skip = {name for name in names if name in ("autostart", "secrets")}
    if Path(directory) == ETC_SOURCE / "qemu":
        skip |= {name for name in names if name.endswith(".xml")}  # the host's own domains
    return skip


def _bounded(fn: Callable[[], T], timeout_s: float) -> T:
    """Run a blocking libvirt call in a daemon thread; TimeoutError if it outlasts `timeout_s`.

    A call that times out is left to finish on its own: stopping the daemon
    closes its socket, which ends the call.
    """
    outcome: list[T] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            outcome.append(fn())
        except BaseException as exc:  # handed to the caller's thread below
            failure.append(exc)

    thread = threading.Thread(target=run, name="libvirtd-call", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise TimeoutError(f"libvirt call did not return within {timeout_s:g} s")
    if failure:
        raise failure[0]
    return outcome[0]


def _terminate(process: subprocess.Popen[bytes], timeout_s: float, what: str) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired as exc:
            raise LibvirtdError(f"stopping {what}: PID {process.pid} survived SIGKILL") from exc


def _kill_pid(pid: int, timeout_s: float) -> None:
    """SIGTERM a process that is not our child, SIGKILL it after the timeout, wait until gone."""
    if not terminate_pid(pid, timeout_s):
        raise LibvirtdError(f"stopping QEMU PID {pid}: it survived SIGKILL")


def _mount_namespace(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return None
