"""A private libvirtd per testbed host, started and stopped with the host.

Each host's daemon runs in the host's network namespace and in a private mount
namespace of its own (segments.vm.libvirtd), with a distinct, fixed host_uuid
derived from the testbed tag and host name (two daemons with one uuid refuse to
migrate to each other) and its incoming migrations bound to the host's
underlay address. Its state lives under a short path in /run (unix socket
paths are limited to 107 bytes), recorded in the testbed state with the
daemon's PID and mount namespace, so ``testbed down`` — another process —
stops exactly that daemon and the QEMU processes it started.

The first QEMU capability probe costs a new daemon about 4 s; the first daemon
ever started here probes and its result seeds every later one (0.1 s).
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from segments.vm.libvirtd import Libvirtd

LIBVIRT_ROOT = Path("/run/gleaner-testbed-lv")
CAPABILITIES_SEED = Path("/var/cache/gleaner/qemu-capabilities")


def _daemon(state: dict[str, Any], host: dict[str, Any]) -> Libvirtd:
    name = f"{state['tag']}-{host['name']}"
    return Libvirtd(
        name,
        LIBVIRT_ROOT / name,
        host["netns"],
        host_uuid=str(uuid.uuid5(uuid.NAMESPACE_URL, f"gleaner-testbed:{name}")),
        capabilities_seed=CAPABILITIES_SEED if any(CAPABILITIES_SEED.glob("*.xml")) else None,
        migration_address=host["underlay"],
    )


def start(state: dict[str, Any], host: dict[str, Any], save: Callable[[], None]) -> None:
    daemon = _daemon(state, host)
    host["libvirt_root"] = str(daemon.root_dir)
    save()  # recorded before it exists: a failed start is still cleaned up
    daemon.start()
    host.update(
        libvirtd_pid=daemon.pid,
        libvirtd_mount_ns=daemon.mount_namespace,
        libvirt_uri=daemon.uri,
    )
    save()
    if daemon.capabilities_seed is None:
        daemon.warm_up()
        CAPABILITIES_SEED.mkdir(parents=True, exist_ok=True)
        for cached in daemon.capabilities_dir.glob("*.xml"):
            shutil.copy2(cached, CAPABILITIES_SEED / cached.name)


def stop(host: dict[str, Any]) -> None:
    """Stop the host's daemon (and its QEMU) by the recorded PID; remove its state."""
    root = host.get("libvirt_root")
    if not root:
        return
    name = Path(root).name
    daemon = Libvirtd(
        name, Path(root), host["netns"], host_uuid="00000000-0000-0000-0000-000000000000"
    )
    pid = host.get("libvirtd_pid")
    if pid:
        daemon.stop_by_pid(pid, host.get("libvirtd_mount_ns"))
    shutil.rmtree(root, ignore_errors=True)
