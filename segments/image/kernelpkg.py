"""The guest kernel: fetch Debian's kernel package, unpack it, pick its modules.

Theory of operation
-------------------
A recipe names a kernel package, by default the meta package
``linux-image-cloud-amd64``. Its only dependency is the versioned package that
holds the kernel (``linux-image-6.1.0-N-cloud-amd64 (= V)``), so fetching is:

1. ask ``apt-cache`` for the candidate version of the named package (or take
   the version the recipe pins);
2. ``apt-get download PKG=VERSION`` into the package cache, unless a .deb of
   that exact version is already there (downloads land in a temporary folder
   and are renamed in, so a broken download never poisons the cache);
3. read its ``Depends`` with ``dpkg-deb -f``; if one names a ``linux-image-*``
   package, fetch that (at the pinned ``=`` version) the same way.

apt needs its package lists. If a look-up or download fails because a package
is unknown (as on a fresh machine where ``apt-get update`` never ran), we run
``apt-get update -qq`` once and try again. That is a read of Debian's package
registry, nothing is installed.

The kernel package is unpacked with ``dpkg-deb -x`` into a temporary folder,
never installed. It holds ``boot/vmlinuz-REL`` and ``lib/modules/REL``, but no
``modules.dep`` (``depmod`` writes that at install time), so a module's
dependencies come from its own ``.modinfo`` ELF section (``depends=a,b``),
read here without ``modinfo``. The modules to load come out in dependency order
(dependencies first), so the guest can ``insmod`` them one by one.
"""

from __future__ import annotations

import lzma
import os
import re
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from segments.image.errors import ImageError

__all__ = ["ImageError"]

APT_TIMEOUT_S = 900.0
UNKNOWN_PACKAGE = re.compile(r"Unable to locate package|No packages found|Can't select")


@dataclass(frozen=True, slots=True)
class Package:
    """A downloaded Debian package file."""

    name: str
    version: str
    path: Path


@dataclass(frozen=True, slots=True)
class Module:
    """A kernel module to load in the guest: its name and its (uncompressed) bytes."""

    name: str
    data: bytes


@dataclass(frozen=True, slots=True)
class Kernel:
    """What the image needs from an unpacked kernel package."""

    release: str
    vmlinuz: bytes
    modules: tuple[Module, ...]


def _one_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("E:")]
    return (errors or lines or ["(no output)"])[-1]


def _run(command: list[str], what: str, cwd: Path | None = None) -> str:
    try:
        result = subprocess.run(
            command,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=APT_TIMEOUT_S,
            env={**os.environ, "LC_ALL": "C"},
        )
    except FileNotFoundError as exc:
        raise ImageError(f"{what}: {command[0]} is not installed (this needs Debian)") from exc
    except subprocess.TimeoutExpired as exc:
        raise ImageError(f"{what}: {command[0]} took over {APT_TIMEOUT_S:.0f} s") from exc
    if result.returncode != 0:
        raise ImageError(f"{what}: {_one_line(result.stderr + result.stdout)}")
    return result.stdout


def _update_lists() -> None:
    _run(["apt-get", "update", "-qq"], "apt-get update (package lists were missing)")


def _apt(command: list[str], what: str, cwd: Path | None = None) -> str:
    """Run an apt command; if it fails on an unknown package, update the lists once and retry."""
    try:
        return _run(command, what, cwd)
    except ImageError as exc:
        if not UNKNOWN_PACKAGE.search(str(exc)):
            raise
    _update_lists()
    return _run(command, what, cwd)


def candidate_version(package: str) -> str:
    """The version `apt-get download PACKAGE` would fetch (updating apt's lists once if need be)."""
    what = f"looking up {package}"
    for attempt in range(2):
        out = _run(["apt-cache", "policy", package], what)
        match = re.search(r"^\s*Candidate:\s*(\S+)", out, re.MULTILINE)
        if match and match.group(1) != "(none)":
            return match.group(1)
        if attempt == 0:
            _update_lists()
    raise ImageError(f"{what}: apt knows no version of it (not a Debian package here?)")


def _deb_name(package: str, version: str) -> str:
    return f"{package}_{version.replace(':', '%3a')}_"


def cached(package: str, version: str, cache: Path) -> Path | None:
    """The cached .deb of exactly this package version, if any."""
    prefix = _deb_name(package, version)
    hits = sorted(p for p in cache.glob("*.deb") if p.name.startswith(prefix))
    return hits[0] if hits else None


def download(package: str, version: str, cache: Path) -> Path:
    """Fetch PACKAGE=VERSION into `cache` with apt-get (all or nothing)."""
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ImageError(f"cannot create package cache {cache}: {exc.strerror}") from exc
    with tempfile.TemporaryDirectory(prefix=".download-", dir=cache) as tmp:
        _apt(["apt-get", "download", f"{package}={version}"], f"downloading {package}", Path(tmp))
        debs = sorted(Path(tmp).glob("*.deb"))
        if len(debs) != 1:
            raise ImageError(f"downloading {package}: apt-get left {len(debs)} .deb files")
        target = cache / debs[0].name
        os.replace(debs[0], target)
    return target


def fetch(package: str, version: str, cache: Path) -> Package:
    """The .deb of PACKAGE=VERSION, from the cache or downloaded into it."""
    path = cached(package, version, cache) or download(package, version, cache)
    return Package(package, version, path)


def _field(deb: Path, name: str) -> str:
    return _run(["dpkg-deb", "-f", str(deb), name], f"reading {deb.name}").strip()


def image_dependency(deb: Path) -> tuple[str, str | None] | None:
    """(name, pinned version or None) of the linux-image-* package `deb` depends on."""
    for clause in _field(deb, "Depends").split(","):
        for alternative in clause.split("|"):
            match = re.fullmatch(r"\s*(\S+)\s*(?:\(\s*(\S+)\s*(\S+)\s*\))?\s*", alternative)
            if match and match.group(1).startswith("linux-image-"):
                pinned = match.group(3) if match.group(2) == "=" else None
                return match.group(1), pinned
    return None


def fetch_kernel(package: str, version: str | None, cache: Path) -> tuple[Package, Package]:
    """(the named package, the package holding the kernel); the same one if not a meta package."""
    named = fetch(package, version or candidate_version(package), cache)
    dependency = image_dependency(named.path)
    if dependency is None:
        return named, named
    real_name, pinned = dependency
    return named, fetch(real_name, pinned or candidate_version(real_name), cache)


def extract(deb: Path, dest: Path) -> None:
    """Unpack `deb` into `dest` (never installs it)."""
    _run(["dpkg-deb", "-x", str(deb), str(dest)], f"unpacking {deb.name}")


def modinfo(data: bytes) -> dict[str, str]:
    """The key=value pairs of a module's .modinfo ELF section (64-bit little-endian)."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError("not a 64-bit little-endian ELF file")
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def section(index: int) -> tuple[int, int, int]:
        name, _type, _flags, _addr, offset, size = struct.unpack_from(
            "<IIQQQQ", data, shoff + index * shentsize
        )
        return name, offset, size

    _, str_offset, _ = section(shstrndx)
    for index in range(shnum):
        name_offset, offset, size = section(index)
        start = str_offset + name_offset
        name = data[start : data.index(b"\0", start)]
        if name == b".modinfo":
            pairs = (item.split(b"=", 1) for item in data[offset : offset + size].split(b"\0"))
            return {p[0].decode(): p[1].decode(errors="replace") for p in pairs if len(p) == 2}
    return {}


def _module_index(moddir: Path) -> dict[str, Path]:
    index: dict[str, Path] = {}
    for path in sorted((moddir / "kernel").rglob("*.ko*")):
        stem = path.name.split(".ko", 1)[0]
        index[stem.replace("-", "_")] = path
    return index


def _builtin(moddir: Path) -> set[str]:
    listing = moddir / "modules.builtin"
    if not listing.exists():
        return set()
    names = (Path(line).name.split(".ko", 1)[0] for line in listing.read_text().split())
    return {name.replace("-", "_") for name in names}


def _module_bytes(path: Path) -> bytes:
    raw = path.read_bytes()
    if path.name.endswith(".ko"):
        return raw
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(raw)
    raise ImageError(f"module {path.name}: compression not supported (only .ko and .ko.xz)")


def resolve_modules(moddir: Path, wanted: list[str]) -> tuple[Module, ...]:
    """`wanted` and everything they depend on, dependencies first; built-ins skipped."""
    index, builtin = _module_index(moddir), _builtin(moddir)
    order: list[Module] = []
    done: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        name = name.replace("-", "_")
        if name in done or name in builtin:
            return
        if name in chain:
            raise ImageError(f"kernel modules depend on each other in a cycle: {chain}")
        if name not in index:
            raise ImageError(f"kernel module {name!r} is neither in {moddir.name} nor built in")
        data = _module_bytes(index[name])
        try:
            depends = modinfo(data).get("depends", "")
        except (ValueError, struct.error) as exc:
            raise ImageError(f"kernel module {name!r}: cannot read .modinfo: {exc}") from exc
        for dependency in filter(None, depends.split(",")):
            visit(dependency, (*chain, name))
        done.add(name)
        order.append(Module(name, data))

    for name in wanted:
        visit(name, ())
    return tuple(order)


def unpack_kernel(deb: Path, modules: list[str]) -> Kernel:
    """Unpack the kernel package in a temporary folder; take vmlinuz and `modules`."""
    with tempfile.TemporaryDirectory(prefix="gleaner-kernel-") as tmp:
        root = Path(tmp)
        extract(deb, root)
        kernels = sorted((root / "boot").glob("vmlinuz-*"))
        if len(kernels) != 1:
            raise ImageError(f"{deb.name} holds {len(kernels)} boot/vmlinuz-* files, expected 1")
        release = kernels[0].name.removeprefix("vmlinuz-")
        moddir = root / "lib" / "modules" / release
        if modules and not moddir.is_dir():
            raise ImageError(f"{deb.name} has no lib/modules/{release}")
        return Kernel(release, kernels[0].read_bytes(), resolve_modules(moddir, modules))
