"""The owner's side of a job file's own-program keys (node/market/run_requests.py).

``gleaner submit job.toml`` reads the file here, where the owner's files are:

* ``inputs`` is a list of files and folders (each put in /gleaner/in under its
  own name; a folder's files under the folder's name) or a table of NAME =
  PATH. Relative paths are from the job file's folder. Every file must exist
  and be a regular file (links are followed); the total must be within
  ``MAX_INPUT_BYTES``. The agent receives NAME = absolute path.
* ``image`` may be the path of an OCI or Docker archive, or of a raw or qcow2
  disk: it is imported into this node's image library first and the job
  names the imported image's id. (A recipe, ``*.toml``, is built instead;
  node/cli/market.py.)

A bad key is refused in one line naming it, before anything is offered.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from node.cli.common import EXIT_USAGE, CliError
from segments.image.job_disks import MAX_INPUT_BYTES

MAX_INPUT_FILES = 10_000


def input_files(value: Any, base: Path, max_bytes: int = MAX_INPUT_BYTES) -> dict[str, str]:
    """`inputs` as NAME -> absolute path of a regular file (see the module docstring)."""
    if isinstance(value, list):
        pairs = []
        for item in value:
            if not isinstance(item, str):
                raise CliError("inputs: each entry is a path", EXIT_USAGE)
            pairs.append((Path(item).name, item))
    elif isinstance(value, dict):
        pairs = list(value.items())
    else:
        raise CliError("inputs: must be a list of paths or a table of NAME = PATH", EXIT_USAGE)
    files: dict[str, str] = {}
    total = 0
    for name, raw in pairs:
        if not isinstance(raw, str) or not isinstance(name, str) or not name:
            raise CliError(f"inputs: {name!r} must name a path", EXIT_USAGE)
        path = (base / raw).resolve()
        for member, file in _walk(name, path):
            if member in files:
                raise CliError(f"inputs: {member!r} is given twice", EXIT_USAGE)
            total += file.stat().st_size
            if total > max_bytes or len(files) >= MAX_INPUT_FILES:
                raise CliError(
                    f"inputs: over {max_bytes} bytes or {MAX_INPUT_FILES} files", EXIT_USAGE
                )
            files[member] = str(file)
    return files


def _walk(name: str, path: Path) -> list[tuple[str, Path]]:
    if path.is_file():
        return [(name, path)]
    if not path.is_dir():
        raise CliError(f"inputs: {name!r}: {path} is not a file or folder", EXIT_USAGE)
    found = []
    for folder, _, names in os.walk(path):
        for file in sorted(names):
            full = Path(folder) / file
            if not full.is_file():
                raise CliError(f"inputs: {full} is not a regular file", EXIT_USAGE)
            found.append((f"{name}/{full.relative_to(path).as_posix()}", full))
    return found


def import_image(path: Path, library_root: Path, state_dir: Path) -> str:
    """Import the archive or disk at `path` into the library; its id."""
    from node.cli.image import guess_format
    from node.runtime.keystore import load_or_create
    from segments.image.errors import ImageError
    from segments.image.library import ImageLibrary

    try:
        identity = load_or_create(state_dir)  # the library's manifests are this node's
        with ImageLibrary(library_root) as library:
            fmt = guess_format(path)
            if fmt == "oci":
                return library.import_archive(path, identity, None).image.id
            return library.import_disk(path, identity, None, fmt).image.id
    except (ImageError, OSError) as exc:
        raise CliError(f"image: importing {path}: {exc}", EXIT_USAGE) from None
