"""Recipes: what a guest image is made of, checked, with defaults filled in.

A recipe is a TOML file with three tables (see ``deploy/recipes/demo.toml``):

    [image]   workload (the /init script, see workload.py), memory_mb
    [kernel]  package (Debian), optional version pin, modules, cmdline
    [init]    settings for /init, each overridable at boot as gleaner.KEY=VALUE

``parse_recipe`` refuses unknown tables and keys (a typo must not silently
become a default), wrong types, and init values with characters a shell could
misread (they end up in ``/etc/gleaner.conf``). The canonical form, sorted
compact JSON of the checked recipe, is what image ids and the build index hash.
Nothing here does I/O but ``load_recipe``, which reads the file.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any, TypeVar

from segments.image.errors import ImageError
from segments.image.workload import WORKLOADS

T = TypeVar("T")
MIN_MEMORY_MB = 72  # LAB-NOTES: the cloud kernel's initramfs unpack needs about 67.5 MiB
SAFE_VALUE = re.compile(r"[A-Za-z0-9._:/+@,=-]*")
KEY_PATTERN = re.compile(r"[a-z][a-z0-9_]*")
PACKAGE_PATTERN = re.compile(r"[a-z0-9][a-z0-9+.-]+")
VERSION_PATTERN = re.compile(r"[A-Za-z0-9.+~:-]+")
MODULE_PATTERN = re.compile(r"[A-Za-z0-9_-]+")

DEFAULTS: dict[str, dict[str, Any]] = {
    "image": {"workload": "demo", "memory_mb": 96},
    "kernel": {
        "package": "linux-image-cloud-amd64",
        "modules": ["virtio_pci", "virtio_net"],
        "cmdline": "console=ttyS0 panic=-1",
    },
    "init": {"steps": 100, "seed": "gleaner", "every": 1, "hostname": "gleaner"},
}


def _check_table(name: str, table: Any, allowed: set[str] | None) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise ImageError(f"recipe: [{name}] must be a table")
    if allowed is not None and (unknown := sorted(set(table) - allowed)):
        raise ImageError(f"recipe: unknown key {name}.{unknown[0]}")
    return dict(table)


def _expect(name: str, value: object, kind: type[T], pattern: re.Pattern[str] | None = None) -> T:
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ImageError(f"recipe: {name} must be a {kind.__name__}, got {value!r}")
    if pattern is not None and not pattern.fullmatch(str(value)):
        raise ImageError(f"recipe: {name} has unsafe or invalid characters: {value!r}")
    return value


def parse_recipe(data: dict[str, Any]) -> dict[str, Any]:
    """Check a decoded recipe and fill in defaults; raise ImageError naming the bad key."""
    top = _check_table("recipe", data, set(DEFAULTS))
    image = {
        **DEFAULTS["image"],
        **_check_table("image", top.get("image", {}), {"workload", "memory_mb"}),
    }
    kernel_keys = {"package", "version", "modules", "cmdline"}
    kernel = {**DEFAULTS["kernel"], **_check_table("kernel", top.get("kernel", {}), kernel_keys)}
    init = {**DEFAULTS["init"], **_check_table("init", top.get("init", {}), None)}

    if _expect("image.workload", image["workload"], str) not in WORKLOADS:
        raise ImageError(
            f"recipe: unknown workload {image['workload']!r} (known: {sorted(WORKLOADS)})"
        )
    if _expect("image.memory_mb", image["memory_mb"], int) < MIN_MEMORY_MB:
        raise ImageError(f"recipe: image.memory_mb must be at least {MIN_MEMORY_MB}")
    _expect("kernel.package", kernel["package"], str, PACKAGE_PATTERN)
    if "version" in kernel:
        _expect("kernel.version", kernel["version"], str, VERSION_PATTERN)
    modules = _expect("kernel.modules", kernel["modules"], list)
    for index, module in enumerate(modules):
        _expect(f"kernel.modules[{index}]", module, str, MODULE_PATTERN)
    kernel["modules"] = [module.replace("-", "_") for module in modules]
    cmdline = _expect("kernel.cmdline", kernel["cmdline"], str)
    if not cmdline.isprintable():
        raise ImageError("recipe: kernel.cmdline must be one printable line")
    for key, value in init.items():
        if not KEY_PATTERN.fullmatch(key) or key == "modules":
            raise ImageError(f"recipe: bad init setting name {key!r} (a-z, 0-9, _; not 'modules')")
        if not isinstance(value, str | int) or isinstance(value, bool):
            raise ImageError(f"recipe: init.{key} must be a string or an integer")
        if isinstance(value, str):
            _expect(f"init.{key}", value, str, SAFE_VALUE)
    if _expect("init.steps", init["steps"], int) < 0:
        raise ImageError("recipe: init.steps must be >= 0 (0 runs until stopped)")
    if not _expect("init.seed", init["seed"], str):
        raise ImageError("recipe: init.seed must not be empty")
    return {"image": image, "kernel": kernel, "init": init}


def load_recipe(path: Path) -> dict[str, Any]:
    """Read and check a recipe file; errors name the file."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ImageError(f"recipe {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ImageError(f"recipe {path}: cannot read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ImageError(f"recipe {path}: not valid TOML: {exc}") from None
    try:
        return parse_recipe(data)
    except ImageError as exc:
        raise ImageError(f"{path}: {exc}") from None


def canonical(recipe: dict[str, Any]) -> bytes:
    """The bytes that stand for a checked recipe in hashes."""
    return json.dumps(recipe, sort_keys=True, separators=(",", ":")).encode("utf-8")


def recipe_toml(recipe: dict[str, Any]) -> str:
    """The checked recipe as TOML (values are strings, integers or lists of strings)."""
    lines = ["# Written by gleaner image build: the checked recipe, defaults filled in."]
    for table in sorted(recipe):
        lines.append(f"\n[{table}]")
        lines.extend(f"{key} = {json.dumps(recipe[table][key])}" for key in sorted(recipe[table]))
    return "\n".join(lines) + "\n"
