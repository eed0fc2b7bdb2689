"""Job images for the VM tests: a root folder of the host's static busybox and a script."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

from kit.paths import REPO_ROOT

RUN_RECIPE = REPO_ROOT / "deploy" / "recipes" / "run.toml"
BUSYBOX = Path("/bin/busybox")


def root_folder(path: Path, applets: Sequence[str], scripts: dict[str, str]) -> Path:
    """`path` as a root: /bin/busybox, a link per applet, and each script at its path (0755)."""
    (path / "bin").mkdir(parents=True)
    shutil.copy2(BUSYBOX, path / "bin" / "busybox")
    for applet in applets:
        (path / "bin" / applet).symlink_to("busybox")
    for name, text in scripts.items():
        target = path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        target.chmod(0o755)
    return path
