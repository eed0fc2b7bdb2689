"""`gleaner image | blocks`: the store tools, which parse their own arguments.

Their code is node/cli/image.py and node/cli/blocks.py; it is imported only
when the command runs, so that every other command starts without it.
"""

from __future__ import annotations

import argparse

from node.cli.common import Subcommands


def add_commands(sub: Subcommands) -> None:
    image = sub.add_parser(
        "image", help="guest images: build RECIPE, list", add_help=False, prefix_chars="\0"
    )
    image.add_argument("image_args", nargs=argparse.REMAINDER)
    image.set_defaults(func=cmd_image)

    blocks = sub.add_parser(
        "blocks",
        help="block stores: put FILE…, get MANIFEST (progress)",
        add_help=False,
        prefix_chars="\0",
    )
    blocks.add_argument("blocks_args", nargs=argparse.REMAINDER)
    blocks.set_defaults(func=cmd_blocks)


def cmd_image(args: argparse.Namespace) -> int:
    from node.cli.image import main as image_main

    return image_main(args.image_args)


def cmd_blocks(args: argparse.Namespace) -> int:
    from node.cli.blocks import main as blocks_main

    return blocks_main(args.blocks_args)
