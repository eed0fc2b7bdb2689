"""The README's layout table names every package of the tree, and nothing else."""

from __future__ import annotations

import re
from pathlib import Path

from kit.paths import REPO_ROOT

CODE = ("node", "overlay", "segments")
TOP_FOLDERS = ("tests", "bench", "deploy", "docs")
ROW = re.compile(r"^\| `([^`]+)/` \|", re.M)


def listed_paths(readme: str) -> set[str]:
    layout = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    return set(ROW.findall(layout))


def packages(root: Path) -> set[str]:
    """Every package of node/, overlay/ and segments/ that holds modules of its own."""
    found = set()
    for top in CODE:
        for init in (root / top).rglob("__init__.py"):
            own = {p.name for p in init.parent.glob("*.py")} - {"__init__.py", "__main__.py"}
            if own:  # node/ and segments/ themselves are only their rooms
                found.add(init.parent.relative_to(root).as_posix())
    return found


def test_the_layout_table_lists_every_package_and_top_folder() -> None:
    listed = listed_paths((REPO_ROOT / "README.md").read_text())
    assert listed == packages(REPO_ROOT) | set(TOP_FOLDERS)


def test_a_package_missing_from_the_table_is_noticed(tmp_path: Path) -> None:
    for package in ("node/base", "node/extra", "overlay"):
        (tmp_path / package).mkdir(parents=True)
        (tmp_path / package / "__init__.py").write_text("")
        (tmp_path / package / "core.py").write_text("")
    (tmp_path / "node" / "__init__.py").write_text("")
    readme = "## Layout\n\n| path | what |\n|---|---|\n| `node/base/` | x |\n| `overlay/` | y |\n"
    assert packages(tmp_path) - listed_paths(readme) == {"node/extra"}
