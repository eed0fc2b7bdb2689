"""Guest images: build one from a recipe, reproducibly, and keep it by content address.

Theory of operation
-------------------
A recipe (TOML, checked by ``recipe.py``; see ``deploy/recipes/demo.toml``)
names a kernel package, the kernel modules the guest needs, a workload (the
``/init`` script) and its default settings. ``build`` turns it into a kernel
and a gzip'd newc initramfs:

* the kernel comes from Debian's package (``kernelpkg``: download, follow the
  meta package to the versioned one, unpack, never install);
* the initramfs holds the host's static busybox (``busybox-static``) with one
  symlink per applet the workload uses, the modules (dependencies first),
  ``/etc/gleaner.conf`` (the settings), ``/dev/console`` and ``/init``. It is
  byte-for-byte reproducible: our own cpio writer fixes every field
  (``cpio.py``), and gzip runs with mtime 0 and no file name.

The image id is the hex BLAKE2b-256 (personalised ``gleaner-image``) over the canonical
recipe (sorted compact JSON of the checked recipe, defaults filled in), the
kernel and the initramfs, each prefixed by its length. An image lives in
``STORE/images/ID/{vmlinuz,initrd.img,recipe.toml,image.json}``; it is built in
a temporary folder beside it and renamed into place, so a crash leaves no half
image. Same inputs, same bytes, same id, on any host with the same busybox.

A second build of a recipe should be free. ``STORE/images/index/KEY`` holds the
id built for a key over (canonical recipe, kernel package version, busybox
digest, workload script, its applets): finding it, ``build`` returns the stored image with
no download and no unpacking. The kernel version comes from the recipe's pin
or from ``apt-cache`` (a local look-up), so a new kernel in Debian means a new
image, and so does a new busybox on the host or a changed workload script.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import struct
import tempfile
import time
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from segments.image import kernelpkg
from segments.image.cpio import Entry, write_newc
from segments.image.errors import ImageError
from segments.image.recipe import canonical, load_recipe, parse_recipe, recipe_toml
from segments.image.workload import WORKLOAD_APPLETS, WORKLOADS

__all__ = ["Image", "ImageError", "build", "list_images", "load", "load_recipe", "parse_recipe"]

DEFAULT_CACHE = Path("/var/cache/gleaner/packages")
BUSYBOX = Path("/bin/busybox")
IMAGES = "images"
INDEX = "index"
KERNEL_FILE, INITRD_FILE, RECIPE_FILE, META_FILE = (
    "vmlinuz",
    "initrd.img",
    "recipe.toml",
    "image.json",
)
ID_PATTERN = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True, slots=True)
class Image:
    """A built image in a store; `created` is UNIX seconds, `size_bytes` kernel + initrd."""

    id: str
    kernel: Path
    initrd: Path
    recipe: dict[str, Any]
    size_bytes: int
    created: float

    @property
    def directory(self) -> Path:
        return self.kernel.parent

    @property
    def memory_mb(self) -> int:
        return int(self.recipe["image"]["memory_mb"])

    @property
    def cmdline(self) -> str:
        """The kernel command line the recipe asks for (add ``gleaner.KEY=VALUE`` to it)."""
        return str(self.recipe["kernel"]["cmdline"])


# --- the initramfs -------------------------------------------------------------


def _read_busybox(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except OSError:
        raise ImageError(f"no busybox at {path}: install the busybox-static package") from None
    if data[:6] != b"\x7fELF\x02\x01":
        raise ImageError(f"{path} is not a 64-bit ELF executable")
    (phoff,) = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    for index in range(phnum):
        if struct.unpack_from("<I", data, phoff + index * phentsize)[0] == 3:  # PT_INTERP
            raise ImageError(f"{path} is dynamically linked: install the busybox-static package")
    return data


def _conf(recipe: dict[str, Any], modules: Sequence[str]) -> bytes:
    settings = {**recipe["init"], "modules": " ".join(modules)}
    lines = [f"g_{key}='{value}'" for key, value in sorted(settings.items())]
    return ("# Written by gleaner image build.\n" + "\n".join(lines) + "\n").encode()


def build_initramfs(
    recipe: dict[str, Any], busybox: bytes, modules: Sequence[kernelpkg.Module]
) -> bytes:
    """The gzip'd newc initramfs: busybox, applet links, modules, settings and /init."""
    applets = WORKLOAD_APPLETS[recipe["image"]["workload"]]
    entries = [
        Entry.file("bin/busybox", busybox, 0o755),
        *(Entry.symlink(f"bin/{applet}", "busybox") for applet in applets),
        Entry.char_device("dev/console", 5, 1),
        Entry.file("etc/gleaner.conf", _conf(recipe, [m.name for m in modules])),
        Entry.file("init", WORKLOADS[recipe["image"]["workload"]].encode(), 0o755),
        *(Entry.file(f"lib/modules/{m.name}.ko", m.data) for m in modules),
        *(Entry.directory(name) for name in ("proc", "sys", "run", "root")),
        Entry.directory("tmp", 0o1777),
    ]
    return gzip.compress(write_newc(entries), compresslevel=9, mtime=0)


def image_id(recipe: dict[str, Any], vmlinuz: bytes, initrd: bytes) -> str:
    digest = hashlib.blake2b(digest_size=32, person=b"gleaner-image")
    for part in (canonical(recipe), vmlinuz, initrd):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.hexdigest()


def _index_key(recipe: dict[str, Any], kernel_version: str, busybox: bytes) -> str:
    digest = hashlib.blake2b(digest_size=32, person=b"gleaner-imgidx")
    name = recipe["image"]["workload"]
    workload = WORKLOADS[name].encode()
    applets = " ".join(WORKLOAD_APPLETS[name]).encode()
    for part in (canonical(recipe), kernel_version.encode(), busybox, workload, applets):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(hashlib.blake2b(part, digest_size=32).digest())
    return digest.hexdigest()


# --- the store -----------------------------------------------------------------


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _lookup(store: Path, key: str) -> Image | None:
    try:
        found = (store / IMAGES / INDEX / key).read_text().strip()
        return load(store, found)
    except (OSError, ImageError):
        return None


def _install(images: Path, ident: str, files: dict[str, bytes]) -> None:
    """Put an image's files in place all at once (a concurrent build of it may win)."""
    (images / INDEX).mkdir(parents=True, exist_ok=True)
    final = images / ident
    if (final / META_FILE).exists():
        return
    with tempfile.TemporaryDirectory(prefix=".build-", dir=images) as tmp:
        staging = Path(tmp) / ident
        staging.mkdir()
        for name, data in files.items():
            (staging / name).write_bytes(data)
        try:
            os.rename(staging, final)
        except OSError:
            if not (final / META_FILE).exists():
                raise


def build(recipe_path: Path, store: Path, cache: Path | None = None) -> Image:
    """Build the image `recipe_path` describes into `store`, or find the one built before."""
    recipe = load_recipe(recipe_path)
    spec = recipe["kernel"]
    cache = cache or DEFAULT_CACHE
    busybox = _read_busybox(BUSYBOX)
    version = spec.get("version") or kernelpkg.candidate_version(spec["package"])
    key = _index_key(recipe, version, busybox)
    if (existing := _lookup(store, key)) is not None:
        return existing

    named, real = kernelpkg.fetch_kernel(spec["package"], version, cache)
    kernel = kernelpkg.unpack_kernel(real.path, spec["modules"])
    initrd = build_initramfs(recipe, busybox, kernel.modules)
    ident = image_id(recipe, kernel.vmlinuz, initrd)
    meta = {
        "id": ident,
        "recipe_digest": hashlib.blake2b(canonical(recipe), digest_size=32).hexdigest(),
        "kernel_package": {"name": named.name, "version": named.version},
        "kernel_image_package": {"name": real.name, "version": real.version},
        "kernel_release": kernel.release,
        "modules": [module.name for module in kernel.modules],
        "busybox_sha256": hashlib.sha256(busybox).hexdigest(),
        "size_bytes": len(kernel.vmlinuz) + len(initrd),
        "created": time.time(),
    }
    files = {
        KERNEL_FILE: kernel.vmlinuz,
        INITRD_FILE: initrd,
        RECIPE_FILE: recipe_toml(recipe).encode(),
        META_FILE: (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode(),
    }
    try:
        _install(store / IMAGES, ident, files)
        _write_atomic(store / IMAGES / INDEX / key, (ident + "\n").encode())
    except OSError as exc:
        raise ImageError(f"cannot write image {ident[:12]} into {store}: {exc}") from exc
    return load(store, ident)


def load(store: Path, image_id: str) -> Image:
    """The image `image_id` in `store`; raise ImageError if it is missing or damaged."""
    if not ID_PATTERN.fullmatch(image_id):
        raise ImageError(f"not an image id (64 hex digits): {image_id!r}")
    directory = store / IMAGES / image_id
    try:
        meta = json.loads((directory / META_FILE).read_text())
        recipe = parse_recipe(tomllib.loads((directory / RECIPE_FILE).read_text()))
        kernel, initrd = directory / KERNEL_FILE, directory / INITRD_FILE
        size = kernel.stat().st_size + initrd.stat().st_size
    except FileNotFoundError:
        raise ImageError(f"no image {image_id} in {store}") from None
    except (OSError, ValueError, ImageError) as exc:
        raise ImageError(f"image {image_id} in {store} is damaged: {exc}") from None
    return Image(image_id, kernel, initrd, recipe, size, float(meta.get("created", 0.0)))


def verify(image: Image) -> None:
    """Recompute the image's content address; raise ImageError if the files changed."""
    actual = image_id(image.recipe, image.kernel.read_bytes(), image.initrd.read_bytes())
    if actual != image.id:
        raise ImageError(f"image {image.id} does not match its content (hashes to {actual})")


def list_images(store: Path) -> list[Image]:
    """Every image in `store`, oldest first."""
    root = store / IMAGES
    if not root.is_dir():
        return []
    ids = sorted(p.name for p in root.iterdir() if ID_PATTERN.fullmatch(p.name))
    return sorted((load(store, ident) for ident in ids), key=lambda i: (i.created, i.id))
