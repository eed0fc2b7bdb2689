"""`gleaner image`: build guest images from recipes, import the images people bring, list."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from node.runtime import keystore
from node.runtime.config import Config, ConfigError, load
from segments.image.library import ImageLibrary, ImportedImage, ImportResult
from segments.image.oci import RunSettings
from segments.image.oci_pack import pack
from segments.image.store import DEFAULT_CACHE, Image, ImageError, build, list_images

FORMATS = ("oci", "raw", "qcow2")


def _describe(image: Image) -> dict[str, Any]:
    return {
        "id": image.id,
        "kernel": str(image.kernel),
        "initrd": str(image.initrd),
        "memory_mb": image.memory_mb,
        "cmdline": image.cmdline,
        "size_bytes": image.size_bytes,
        "created": image.created,
    }


def _describe_imported(image: ImportedImage) -> dict[str, Any]:
    return {
        "id": image.id,
        "kind": image.kind,
        "names": list(image.names),
        "layers": [layer["diff_id"] for layer in image.layers],
        "disk": image.disk,
        "settings": image.settings,
        "size_bytes": image.size_bytes,
        "created": image.created,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """``image build|import|pack|rm|list``; for ``gleaner image`` and ``python -m``."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--store", type=Path, help="store folder (default: the agent's, from --config)"
    )
    common.add_argument("--config", type=Path, help="the agent's config file (for its store)")
    common.add_argument("--json", action="store_true", help="print JSON")
    parser = argparse.ArgumentParser(prog="gleaner image", description="guest images")
    sub = parser.add_subparsers(dest="command", required=True)
    build_cmd = sub.add_parser(
        "build", parents=[common], help="build from a recipe (free if built)"
    )
    build_cmd.add_argument("recipe", type=Path)
    build_cmd.add_argument("--cache", type=Path, help=f"package cache (default {DEFAULT_CACHE})")
    import_cmd = sub.add_parser(
        "import",
        parents=[common],
        help="import an OCI or docker-save archive, or a raw or qcow2 root disk",
    )
    import_cmd.add_argument("file", type=Path)
    import_cmd.add_argument("--name", help="NAME[:TAG] to give it (tag default: latest)")
    import_cmd.add_argument(
        "--format", choices=FORMATS, help="oci (also docker save), raw or qcow2 (default: guessed)"
    )
    pack_cmd = sub.add_parser(
        "pack", help="pack folders (lowest layer first) into an OCI archive, for import"
    )
    pack_cmd.add_argument("folders", type=Path, nargs="+")
    pack_cmd.add_argument("-o", "--output", type=Path, required=True, help="archive to write")
    pack_cmd.add_argument("--cmd", default="", help="the command, as a shell would split it")
    pack_cmd.add_argument("--env", action="append", default=[], help="NAME=VALUE (repeatable)")
    pack_cmd.add_argument("--workdir", default="/", help="working folder (default /)")
    remove_cmd = sub.add_parser(
        "rm", parents=[common], help="remove imported images (by name or id) and unused layers"
    )
    remove_cmd.add_argument("images", nargs="+", help="NAME[:TAG] or image id")
    sub.add_parser("list", parents=[common], help="the images in the store, with their names")
    args = parser.parse_args(argv)
    if args.command == "pack":
        return _pack(args)
    try:
        config = load(args.config)
        store = args.store or config.image_store  # where the agent looks for images
        library_root = args.store or config.library  # and imported ones
        if args.command == "build":
            _print_built([build(args.recipe, store, args.cache)], args.json)
        elif args.command == "import":
            _print_import(_import(args, config, library_root), args.json)
        elif args.command == "rm":
            with ImageLibrary(library_root) as library:
                for reference in args.images:
                    removed, freed = library.remove(reference)
                    print(
                        f"removed {removed.id} ({', '.join(removed.names) or 'no name'}): "
                        f"{freed / 2**20:.1f} MiB freed"
                    )
        else:
            _print_built(list_images(store), args.json)
            with ImageLibrary(library_root) as library:
                _print_imported(library.list(), args.json)
    except (ImageError, ConfigError, OSError) as exc:
        print(f"gleaner image: {exc}", file=sys.stderr)
        return 1
    return 0


def _import(args: argparse.Namespace, config: Config, store: Path) -> ImportResult:
    if not args.file.is_file():
        raise ImageError(f"no file {args.file}")
    fmt = args.format or guess_format(args.file)
    identity = keystore.load_or_create(config.state_dir)  # the store's manifests are ours
    with ImageLibrary(store) as library:
        if fmt == "oci":
            return library.import_archive(args.file, identity, args.name)
        return library.import_disk(args.file, identity, args.name, fmt)


def _pack(args: argparse.Namespace) -> int:
    missing = [str(folder) for folder in args.folders if not folder.is_dir()]
    if missing or any("=" not in pair for pair in args.env):
        problem = f"no folder {missing[0]}" if missing else "--env takes NAME=VALUE"
        print(f"gleaner image pack: {problem}", file=sys.stderr)
        return 1
    try:
        settings = RunSettings(
            cmd=tuple(shlex.split(args.cmd)), env=tuple(args.env), working_dir=args.workdir
        )
        pack(args.folders, args.output, settings)
    except (ValueError, OSError) as exc:
        print(f"gleaner image pack: {exc}", file=sys.stderr)
        return 1
    print(f"packed {len(args.folders)} layers into {args.output}")
    return 0


def guess_format(path: Path) -> str | None:
    """ "oci" for a tar (POSIX and GNU tars say ustar at 257), else None: the disk decides."""
    with open(path, "rb") as file:
        head = file.read(512)
    return "oci" if head[257:262] == b"ustar" else None


def _print_built(images: list[Image], as_json: bool) -> None:
    for image in images:
        if as_json:
            print(json.dumps({"kind": "recipe", **_describe(image)}, sort_keys=True))
        else:
            print(f"{'(recipe)':24}  {image.id[:12]}  {image.size_bytes / 2**20:8.1f} MiB  recipe")


def _print_imported(images: list[ImportedImage], as_json: bool) -> None:
    for image in images:
        if as_json:
            print(json.dumps(_describe_imported(image), sort_keys=True))
            continue
        for name in image.names or ("(no name)",):
            size = image.size_bytes / 2**20
            print(f"{name:24}  {image.id[:12]}  {size:8.1f} MiB  {image.kind}")


def _print_import(result: ImportResult, as_json: bool) -> None:
    image = result.image
    if as_json:
        summary = {
            "new_bytes": result.new_bytes,
            "import_s": round(result.seconds, 3),
            "skipped_layers": result.skipped_layers,
            "archive_tags": list(result.tags),
        }
        print(json.dumps({**_describe_imported(image), **summary}, sort_keys=True))
    else:
        names = ", ".join(image.names) or "no name"
        print(
            f"imported {image.kind} image {image.id} ({names}): "
            f"{image.size_bytes / 2**20:.1f} MiB, {result.new_bytes / 2**20:.1f} MiB new, "
            f"{result.seconds:.1f} s"
        )
