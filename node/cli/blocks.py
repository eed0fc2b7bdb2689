"""`gleaner blocks`: put files into a block store, and fetch a checkpoint with a progress bar.

    gleaner blocks put FILE... --store DIR [--manifest OUT]
    gleaner blocks get MANIFEST --holder HOST:PORT [--holder …] --store DIR [--output PATH]

``put`` chunks files into the store and writes their manifest, signed by this
node (the key in ``--state-dir``). ``get`` fetches the blocks of a manifest
that the store lacks from every holder at once, each block verified, showing
progress, then optionally writes the file out. Operators use it to seed a
host with a checkpoint or image before it is needed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import trio
from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

from node.base.records import parse_endpoint
from node.base.wire import RemoteProtocolError
from node.runtime.config import default_state_dir
from node.runtime.keystore import load_or_create
from segments.store.blocks import BlockStore, BlockStoreError
from segments.store.manifest import decode_manifest
from segments.store.transfer import FetchError, fetch


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="gleaner blocks", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="action", required=True)
    put = sub.add_parser("put", help="chunk files into a store; write their signed manifest")
    put.add_argument("files", nargs="+", type=Path)
    put.add_argument("--store", type=Path, required=True)
    put.add_argument("--manifest", type=Path, help="write the manifest here")
    put.add_argument("--state-dir", type=Path, default=Path(default_state_dir()))
    get = sub.add_parser("get", help="fetch a manifest's missing blocks from holders")
    get.add_argument("manifest", type=Path)
    get.add_argument("--holder", action="append", required=True, help="HOST:PORT, repeatable")
    get.add_argument("--store", type=Path, required=True)
    get.add_argument("--output", type=Path, help="write the fetched file(s) here")
    args = parser.parse_args(argv)
    try:
        return _put(args) if args.action == "put" else _get(args)
    except (BlockStoreError, FetchError, OSError, ValueError) as exc:
        print(f"gleaner blocks: {exc}", file=sys.stderr)
        return 1


def _put(args: argparse.Namespace) -> int:
    identity = load_or_create(args.state_dir)
    store = BlockStore(args.store)
    try:
        manifest = store.put_files({path.name: path for path in args.files}, identity)
    finally:
        store.close()
    if args.manifest:
        args.manifest.write_bytes(manifest.encode())
    print(f"{manifest.digest.hex()}  {manifest.total_size} bytes  {len(manifest.files)} file(s)")
    return 0


def _get(args: argparse.Namespace) -> int:
    try:
        manifest = decode_manifest(args.manifest.read_bytes())
    except RemoteProtocolError as exc:
        raise ValueError(f"{args.manifest} is not a valid manifest: {exc}") from None
    holders = []
    for text in args.holder:
        try:
            holders.append(parse_endpoint(text))
        except ValueError:
            raise ValueError(f"--holder {text!r} is not HOST:PORT") from None
    store = BlockStore(args.store)
    try:
        with Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
        ) as bar:
            task = bar.add_task(f"manifest {manifest.digest.hex()[:12]}", total=None)

            def progress(done: int, total: int) -> None:
                bar.update(task, completed=done, total=total)

            stats = trio.run(fetch, manifest, holders, store, progress)
        if args.output:
            store.materialize(manifest, args.output)
    finally:
        store.close()
    print(
        f"fetched {stats.blocks_done} blocks ({stats.bytes_done} bytes) of "
        f"{manifest.total_size} bytes; {stats.bad_blocks} bad blocks refetched"
    )
    return 0
