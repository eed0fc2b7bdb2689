"""A job owner's own program on the testbed, as a user would run it.

* ``user_image`` makes an OCI archive from a root folder built here (this
  machine's static busybox, its applets and the owner's scripts): no
  registry, no Docker daemon;
* ``build_run_image`` builds the swarm's "run" boot image (Debian's cloud
  kernel and Gleaner's /init) into the testbed's recipe store;
* ``submit_job_file`` and ``fetch_outputs`` are ``gleaner submit job.toml``
  and ``gleaner fetch JOB -o DIR``, run as commands against the owner's
  agent. The job file names the archive, so the submit imports it into the
  owner's own image library first; the other hosts take it from the owner
  block by block when they win a segment.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from segments.image.oci import RunSettings
from segments.image.oci_pack import pack
from segments.image.store import Image, build

RUN_RECIPE = Path(__file__).resolve().parents[2] / "deploy" / "recipes" / "run.toml"
BUSYBOX = Path("/bin/busybox")  # static on Debian (the busybox-static or busybox package)


def user_image(
    folder: Path, applets: Sequence[str], scripts: Mapping[str, str], cmd: Sequence[str]
) -> Path:
    """``folder/image.tar``: an OCI archive of busybox, `applets` and `scripts` (0755)."""
    root = user_root(folder / "root", applets, scripts)
    return pack([root], folder / "image.tar", RunSettings(cmd=tuple(cmd)))


def user_root(root: Path, applets: Sequence[str], scripts: Mapping[str, str]) -> Path:
    """`root` as a root file system: busybox, a link per applet, the scripts, and /data."""
    (root / "bin").mkdir(parents=True)
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    for applet in applets:
        (root / "bin" / applet).symlink_to("busybox")
    for name, text in scripts.items():
        target = root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        target.chmod(0o755)
    (root / "data").mkdir()  # the program's own files, on the scratch disk
    return root


def build_run_image(root: Path) -> Image:
    """The run boot image in the testbed's shared recipe store (cached once built)."""
    return build(RUN_RECIPE, root / "images")


def write_job_file(path: Path, settings: Mapping[str, Any]) -> Path:
    """A job file of `settings` (strings, integers, lists of strings, tables of strings)."""
    lines = []
    tables = {k: v for k, v in settings.items() if isinstance(v, dict)}
    for key, value in settings.items():
        if key not in tables:
            lines.append(f"{key} = {_toml(value)}")
    for key, table in tables.items():
        lines.append(f"\n[{key}]")
        lines.extend(f"{json.dumps(k)} = {_toml(v)}" for k, v in table.items())
    path.write_text("\n".join(lines) + "\n")
    return path


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, str)):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(item) for item in value) + "]"
    raise TypeError(f"no TOML for {value!r}")


def submit_job_file(owner: dict[str, Any], job_file: Path) -> dict[str, Any]:
    """``gleaner submit JOB_FILE --json`` on the owner's agent: the job's summary."""
    return dict(_gleaner(owner, "submit", str(job_file)))


def fetch_outputs(owner: dict[str, Any], job_id: str, dest: Path) -> dict[str, Any]:
    """``gleaner fetch JOB -o DEST --json``: console.txt, exit-status and outputs/ in DEST."""
    return dict(_gleaner(owner, "fetch", job_id, "-o", str(dest)))


def _gleaner(owner: dict[str, Any], *args: str) -> Any:
    command = [sys.executable, "-m", "node", args[0], "--config", owner["config"], "--json"]
    done = subprocess.run(
        [*command, *args[1:]], capture_output=True, text=True, timeout=300, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"gleaner {' '.join(args)}: {done.stderr.strip()[-800:]}")
    return json.loads(done.stdout)
