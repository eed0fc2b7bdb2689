"""What a host runs for the market: a replica order, and a migration source's view of it.

``ReplicaOrder`` is what ``SegmentService.run_replica`` carries out;
``parse_destination_spec`` reads the files a destination host sent for a live
migration (a peer's map: checked strictly). Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from node.market.offer_messages import Work
from node.runtime.routing import is_interface_name
from segments.vm.replica import ReplicaResult
from segments.vm.runtime import VmSpec

ARRIVAL_TIMEOUT_S = 120.0  # an adopting replica's wait for its guest (a fresh daemon: ~6 s)
DESTINATION_KEYS = frozenset({"kernel", "initrd", "serial_log", "tap"})
MAX_PATH_CHARS = 4096


@dataclass(frozen=True, slots=True)
class ReplicaOrder:
    """What to run: ``name`` names the VM and its work directory (letters, digits, dashes).

    A restored guest keeps the domain name it was saved with, so every segment of
    a job runs under the name of its first: one name per job, and a host runs
    one replica of a job at a time.
    """

    name: str
    segment: int
    image_id: str
    args: str
    vcpus: int
    extent_cpu_s: float
    memory_mib: int | None = None  # None: the image's default
    attempt: int = 0
    tap: str | None = None  # a network job's NIC: the tap libvirt creates here
    address: str | None = None  # a network job's overlay address (kernel command line)
    adopt: bool = False  # run the rest of a segment whose guest migrates here (no checkpoint)
    arrival_timeout_s: float = ARRIVAL_TIMEOUT_S  # adopt: how long to wait for the guest
    work: Work | None = None  # a job owner's own program: its disks are made from its bundle
    work_holders: tuple[tuple[str, int], ...] = ()  # where its bundle and image are


@dataclass(frozen=True, slots=True)
class ReplicaOutcome:
    result: ReplicaResult
    fetched: dict[str, Any]


def parse_destination_spec(vm_name: str, fields: Any) -> VmSpec:
    """The destination's files (``destination_spec``, from a peer) as a VmSpec to migrate onto.

    Strict: exactly the keys kernel, initrd, serial_log (absolute paths) and
    tap (an interface name, or None); anything else raises ValueError. Only
    the fields ``vm.relocated_xml`` uses are meaningful in the result.
    """
    if not isinstance(fields, dict):
        raise ValueError(f"a destination spec is a map, not {type(fields).__name__}")
    keys = set(fields)
    if keys != DESTINATION_KEYS:
        missing = ", ".join(sorted(str(k) for k in DESTINATION_KEYS - keys)) or "none"
        extra = ", ".join(sorted(repr(k) for k in keys - DESTINATION_KEYS)) or "none"
        raise ValueError(f"a destination spec's keys: missing {missing}; unknown {extra}")
    paths = {key: _absolute_path(fields[key], key) for key in ("kernel", "initrd", "serial_log")}
    tap = fields["tap"]
    if tap is not None and not is_interface_name(tap):
        raise ValueError(f"destination 'tap' must be an interface name or None, not {tap!r:.40}")
    return VmSpec(
        name=vm_name,
        kernel=paths["kernel"],
        initrd=paths["initrd"],
        cmdline="",
        serial_log=paths["serial_log"],
        tap=tap,
    )


def _absolute_path(value: Any, key: str) -> Path:
    what = f"destination {key!r}"
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a path (a string), not {type(value).__name__}")
    if not value.startswith("/") or len(value) > MAX_PATH_CHARS:
        raise ValueError(f"{what} must be an absolute path of at most {MAX_PATH_CHARS} chars")
    if not value.isprintable() or ".." in PurePosixPath(value).parts:
        raise ValueError(f"{what} must be printable, without '..': {value!r:.60}")
    return Path(value)
