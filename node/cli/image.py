"""`gleaner image`: build guest images from recipes and list a store."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from node.runtime.config import ConfigError, load
from segments.image.store import DEFAULT_CACHE, Image, ImageError, build, list_images


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


def main(argv: Sequence[str] | None = None) -> int:
    """``image build RECIPE`` and ``image list``; for ``gleaner image`` and ``python -m``."""
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
    sub.add_parser("list", parents=[common], help="the images in the store")
    args = parser.parse_args(argv)
    try:
        if args.store is None:
            args.store = load(args.config).image_store  # where the agent looks for images
        if args.command == "build":
            images = [build(args.recipe, args.store, args.cache)]
        else:
            images = list_images(args.store)
    except (ImageError, ConfigError) as exc:
        print(f"gleaner image: {exc}", file=sys.stderr)
        return 1
    for image in images:
        if args.json:
            print(json.dumps(_describe(image), sort_keys=True))
        else:
            print(f"{image.id}  {image.size_bytes / 2**20:6.1f} MiB  {image.directory}")
    return 0
