"""A job owner's own program, as the job file asks for it: the keys beside the job's.

Theory of operation
-------------------
``gleaner submit job.toml`` takes one table. The keys ``JobSpec.from_mapping``
knows (memory, vCPUs, extent, segments, redundancy, price, deadline, network)
describe the VM and the market; the keys here describe the owner's program:

    image       NAME[:TAG] or content id in the owner's image library
    command     the program and its arguments (replaces the image's Cmd)
    entrypoint  replaces the image's Entrypoint (and drops its Cmd)
    env         NAME=VALUE strings, or a table; added to the image's
    workdir     the working folder (else the image's, else /)
    inputs      a table: the name in /gleaner/in -> a file on the owner's host
    disk_mib    the scratch disk (the image's root and the job's files)
    output_mib  the output disk (a tar of /gleaner/out)
    boot        the swarm image that boots it (a "run" recipe; default: the newest)

``split_request`` takes them out of the table and checks each where it is
read: types, lengths, counts, the names of inputs (no absolute paths, no
``..``). Whether the files exist is the owner node's check, when it makes the
job's bundle. Unknown keys stay in the table for ``JobSpec.from_mapping`` to
refuse by name.

Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from node.market.jobs import JobSpecError
from node.market.offer_messages import MAX_WORK_DISK_MIB, MIN_WORK_DISK_MIB

RUN_KEYS = frozenset(
    {"command", "entrypoint", "env", "workdir", "inputs", "disk_mib", "output_mib", "boot"}
)
MAX_ARGV = 1024
MAX_ARG_CHARS = 32 * 1024
MAX_ENV = 1024
MAX_INPUTS = 10_000
MAX_PATH_CHARS = 4096
DEFAULT_DISK_MIB = 1024
DEFAULT_OUTPUT_MIB = 256


@dataclass(frozen=True, slots=True)
class RunRequest:
    """What a job owner asks to run (see the module docstring)."""

    image: str
    command: tuple[str, ...] | None = None
    entrypoint: tuple[str, ...] | None = None
    env: tuple[str, ...] = ()
    working_dir: str | None = None
    inputs: Mapping[str, str] = field(default_factory=dict)  # name -> absolute path here
    disk_mib: int = DEFAULT_DISK_MIB
    output_mib: int = DEFAULT_OUTPUT_MIB
    boot: str | None = None


def wants_run(data: Mapping[str, Any]) -> bool:
    """Whether the table asks for the owner's own program by any key of this module."""
    return any(key in data for key in RUN_KEYS)


def split_request(data: Mapping[str, Any]) -> tuple[dict[str, Any], RunRequest]:
    """The table without the run keys, and the RunRequest they (and ``image``) make.

    JobSpecError names the first bad field.
    """
    rest = {key: value for key, value in data.items() if key not in RUN_KEYS}
    image = data.get("image")
    if not isinstance(image, str) or not 0 < len(image) <= 255:
        raise JobSpecError("image: must name an image (NAME[:TAG] or an id)")
    request = RunRequest(
        image=image,
        command=_argv(data, "command"),
        entrypoint=_argv(data, "entrypoint"),
        env=_env(data.get("env", ())),
        working_dir=_workdir(data.get("workdir")),
        inputs=_inputs(data.get("inputs", {})),
        disk_mib=_mib(data, "disk_mib", DEFAULT_DISK_MIB),
        output_mib=_mib(data, "output_mib", DEFAULT_OUTPUT_MIB),
        boot=_boot(data.get("boot")),
    )
    return rest, request


def _argv(data: Mapping[str, Any], name: str) -> tuple[str, ...] | None:
    value = data.get(name)
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    ok = isinstance(value, list) and 0 < len(value) <= MAX_ARGV
    if not ok or not all(isinstance(a, str) and len(a) <= MAX_ARG_CHARS for a in value):
        raise JobSpecError(f"{name}: must be a list of 1..{MAX_ARGV} strings")
    if any("\x00" in a for a in value):
        raise JobSpecError(f"{name}: an argument holds a NUL character")
    return tuple(value)


def _env(value: Any) -> tuple[str, ...]:
    if isinstance(value, dict):
        value = [f"{k}={v}" for k, v in value.items()]
    if not isinstance(value, (list, tuple)) or len(value) > MAX_ENV:
        raise JobSpecError(f"env: must be a table or a list of at most {MAX_ENV} NAME=VALUE")
    for pair in value:
        if not isinstance(pair, str) or "=" not in pair or len(pair) > MAX_ARG_CHARS:
            raise JobSpecError(f"env: {str(pair)[:40]!r} is not NAME=VALUE")
        if "\x00" in pair:
            raise JobSpecError("env: a value holds a NUL character")
    return tuple(value)


def _workdir(value: Any) -> str | None:
    if value is None:
        return None
    ok = isinstance(value, str) and value.startswith("/") and len(value) <= MAX_PATH_CHARS
    if not ok or not value.isprintable():
        raise JobSpecError("workdir: must be an absolute path in the guest")
    return str(value)


def _inputs(value: Any) -> dict[str, str]:
    if not isinstance(value, dict) or len(value) > MAX_INPUTS:
        raise JobSpecError(f"inputs: must be a table of at most {MAX_INPUTS} NAME = PATH")
    checked = {}
    for name, path in value.items():
        parts = [part for part in name.split("/") if part] if isinstance(name, str) else []
        bad_name = not parts or name.startswith("/") or ".." in parts or len(name) > 255
        if bad_name or not name.isprintable():
            raise JobSpecError(f"inputs: {str(name)[:60]!r} is not a relative name without '..'")
        ok = isinstance(path, str) and path.startswith("/") and len(path) <= MAX_PATH_CHARS
        if not ok or "\x00" in path:
            raise JobSpecError(f"inputs: {name!r} must be an absolute path on this host")
        checked[name] = path
    return checked


def _mib(data: Mapping[str, Any], name: str, default: int) -> int:
    value = data.get(name, default)
    if type(value) is not int or not MIN_WORK_DISK_MIB <= value <= MAX_WORK_DISK_MIB:
        raise JobSpecError(
            f"{name}: must be an integer in {MIN_WORK_DISK_MIB}..{MAX_WORK_DISK_MIB}, got {value!r}"
        )
    return value


def _boot(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not 0 < len(value) <= 128:
        raise JobSpecError("boot: must name a built image")
    return value
