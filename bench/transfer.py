"""How many bytes move when a receiver that holds checkpoint A fetches checkpoint B.

Two successive checkpoints of one guest: real save files (``--files A B``) or,
by default, two synthetic 72 MiB memory images in which B differs from A as a
guest's memory does over a segment (``--changed`` of the pages rewritten, in
runs; about a third of the pages zero, some turning zero or non-zero). With
``--layout stream`` the synthetic files are laid out as a QEMU migration stream
(an 8-byte header per page, zero pages compressed to a few bytes), as libvirt's
``save()`` writes them, instead of page-aligned.

The producer stores A and B; the receiver stores A, then fetches B over
loopback (127.0.0.1) from a block server and checks that the file it
materializes equals B. Prints one JSON object: ``checkpoint_bytes``,
``shipped_bytes`` (the blocks the receiver lacked), ``rsync_bytes`` (what
``rsync --stats --no-whole-file`` reports as sent updating A into B), the
hash's throughput per core, the same delta at other block sizes, and, for QEMU
streams, what a page-aligned layout of the same pages would ship.

With ``--relayout`` (real save files only) it also splits A and B with
``segments.vm.savestream`` into ``ram`` (pages at their guest addresses) and
``rest``, stores both files as one checkpoint, fetches B's over loopback,
joins it and checks that it equals B, and reports under ``relayout``: what B
ships given A (per file and at other block sizes) and the codec's MB/s.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import blake3
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from node.base.identity import Identity
from segments.store.blocks import DEFAULT_BLOCK_SIZE, BlockStore
from segments.store.manifest import ZERO, Manifest
from segments.store.transfer import fetch, serve_blocks
from segments.vm.savestream import join, split

PAGE = 4096
SIZES = (4096, 16384, 65536, 262144)


def synthesize(a: Path, b: Path, size: int, changed: float, layout: str, seed: int) -> None:
    rng = random.Random(seed)
    pool = [rng.randbytes(PAGE) for _ in range(512)]  # recurring contents (code, tables)

    def page() -> bytes:
        kind = rng.random()
        if kind < 0.34:
            return bytes(PAGE)
        if kind < 0.55:
            return rng.choice(pool)
        if kind < 0.75:  # sparse data: mostly zero with a few words set
            data = bytearray(PAGE)
            for _ in range(rng.randint(1, 40)):
                at = rng.randrange(0, PAGE - 8, 8)
                data[at : at + 8] = rng.randbytes(8)
            return bytes(data)
        return rng.randbytes(PAGE)

    pages = [page() for _ in range(size // PAGE)]
    after = list(pages)
    budget = int(len(pages) * changed)
    while budget > 0:  # dirtied memory comes in runs (heap arenas, page cache, stacks)
        run = min(budget, rng.choice([1, 1, 2, 4, 8, 16, 64]))
        start = rng.randrange(0, len(pages) - run)
        for i in range(start, start + run):
            after[i] = page()
        budget -= run
    for path, image in ((a, pages), (b, after)):
        with open(path, "wb") as out:
            if layout == "pages":
                out.write(b"".join(image))
            else:
                out.write(_as_qemu_stream(image))


def _as_qemu_stream(pages: list[bytes]) -> bytes:
    """Pages as a QEMU RAM migration stream: header per page, zero pages compressed."""
    parts = [
        b"QEVM\x00\x00\x00\x03",
        b"\x01\x00\x00\x00\x01\x03ram\x00\x00\x00\x00\x00\x00\x00\x04",
    ]
    for index, data in enumerate(pages):
        name = b"" if index else b"\x06pc.ram"
        more = 0x20 if index else 0
        if data == bytes(PAGE):
            parts.append(struct.pack(">Q", index * PAGE | 0x02 | more) + name + b"\x00")
        else:
            parts.append(struct.pack(">Q", index * PAGE | 0x08 | more) + name + data)
    parts.append(struct.pack(">Q", 0x10))
    return b"".join(parts)


def qemu_pages(path: Path) -> list[bytes] | None:
    """The guest RAM of a QEMU migration stream (or libvirt save) laid out by address."""
    data = path.read_bytes()
    at = data.find(b"QEVM\x00\x00\x00\x03")
    if at < 0:
        return None
    pos, block = at + 8, b""
    blocks: dict[bytes, int] = {}
    image: dict[tuple[int, int], bytes] = {}
    try:
        while pos < len(data):
            kind = data[pos]
            pos += 1
            if kind == 0x07:  # configuration section
                pos += 4 + struct.unpack_from(">I", data, pos)[0]
                continue
            if kind == 0x7E:  # section footer
                pos += 4
                continue
            if kind == 0x01:  # section start: RAM comes first; stop at the first device
                pos += 4
                name = data[pos + 1 : pos + 1 + data[pos]]
                pos += 1 + data[pos] + 8
                if name != b"ram":
                    break
            elif kind in (0x02, 0x03):
                pos += 4
            else:
                break
            while pos < len(data):
                (word,) = struct.unpack_from(">Q", data, pos)
                pos += 8
                flags, addr = word & 0xFFF, word & ~0xFFF
                if flags & 0x04:  # RAM block list
                    total = 0
                    while total < addr:
                        pos += 1 + data[pos]
                        total += struct.unpack_from(">Q", data, pos)[0]
                        pos += 8
                    continue
                if flags & 0x10:  # end of this part
                    break
                if not flags & 0x20:
                    block = data[pos + 1 : pos + 1 + data[pos]]
                    pos += 1 + data[pos]
                blocks.setdefault(block, len(blocks))
                if flags & 0x02:
                    pos += 1
                elif flags & 0x08:
                    image[(blocks[block], addr)] = data[pos : pos + PAGE]
                    pos += PAGE
                else:
                    return None
    except (IndexError, struct.error):
        return None
    return [image[key] for key in sorted(image)] if image else None


def page_delta(a_pages: list[bytes], b_pages: list[bytes]) -> int:
    """Bytes of B's non-zero pages whose contents A does not hold (4 KiB blocks)."""
    held = {blake3.blake3(p).digest() for p in a_pages}
    fresh = {blake3.blake3(p).digest() for p in b_pages if p != bytes(PAGE)} - held
    return len(fresh) * PAGE


def delta_at(store_root: Path, a: Path, b: Path, block_size: int) -> dict[str, int]:
    store = BlockStore(store_root / f"probe{block_size}", block_size=block_size)
    held = {ref.digest for ref in store.chunk_file(a)}
    refs = store.chunk_file(b)
    fresh = {ref.digest: ref.length for ref in refs if not ref.zero and ref.digest not in held}
    store.close()
    return {
        "shipped_bytes": sum(fresh.values()),
        "manifest_entries": len(refs),
        "zero_blocks": sum(1 for ref in refs if ref.digest == ZERO),
    }


def hash_rate(name: str, block_size: int) -> float:
    data = os.urandom(64 * 1024 * 1024)
    view = memoryview(data)

    def digest(chunk: memoryview) -> bytes:
        if name == "blake3":
            return bytes(blake3.blake3(chunk).digest())
        return hashlib.blake2b(chunk, digest_size=32).digest()

    best = 0.0
    for _ in range(3):
        start = time.perf_counter()
        for offset in range(0, len(data), block_size):
            digest(view[offset : offset + block_size])
        best = max(best, len(data) / (time.perf_counter() - start) / 1e6)
    return round(best, 1)


def rsync_sent(a: Path, b: Path, work: Path) -> dict[str, int]:
    src, dst = work / "rsync-src", work / "rsync-dst"
    src.mkdir()
    dst.mkdir()
    shutil.copyfile(b, src / "checkpoint")
    shutil.copyfile(a, dst / "checkpoint")
    out = subprocess.run(
        ["rsync", "-a", "--ignore-times", "--stats", "--no-whole-file", f"{src}/", f"{dst}/"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    if (dst / "checkpoint").read_bytes() != b.read_bytes():
        raise RuntimeError("rsync did not reproduce B")

    def field(label: str) -> int:
        match = re.search(rf"{label}: ([\d,]+)", out)
        return int(match.group(1).replace(",", "")) if match else -1

    return {"sent": field("Total bytes sent"), "literal": field("Literal data")}


async def loopback_fetch(producer: BlockStore, receiver: BlockStore, manifest: Manifest) -> float:
    (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listener.socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_blocks, producer, listener)
        start = time.perf_counter()
        await fetch(manifest, [("127.0.0.1", port)], receiver)
        elapsed = time.perf_counter() - start
        nursery.cancel_scope.cancel()
    await listener.aclose()
    return elapsed


def relayout(a: Path, b: Path, work: Path, block_size: int) -> dict[str, Any]:
    """B given A when both are split into ram and rest first (see the module docstring)."""
    timings: dict[str, float] = {}
    splits = {}
    for label, path in (("a", a), ("b", b)):
        start = time.perf_counter()
        splits[label] = split(path, work / f"split-{label}")
        timings[f"split_{label}_s"] = time.perf_counter() - start
    identity = Identity.generate()
    producer = BlockStore(work / "relayout-producer", block_size=block_size)
    receiver = BlockStore(work / "relayout-receiver", block_size=block_size)
    files = {label: {"ram": r.ram, "rest": r.rest} for label, r in splits.items()}
    producer.put_files(files["a"], identity)
    second = producer.put_files(files["b"], identity)
    receiver.put_files(files["a"], identity)
    missing = receiver.missing(second)
    fetch_s = trio.run(loopback_fetch, producer, receiver, second)
    receiver.materialize(second, work / "relayout-restored")
    start = time.perf_counter()
    join(work / "relayout-restored", work / "relayout-joined")
    timings["join_b_s"] = time.perf_counter() - start
    if (work / "relayout-joined").read_bytes() != b.read_bytes():
        raise RuntimeError("the joined checkpoint differs from B")
    per_file = {
        entry.name: sum({d: n for d, n in missing.items() if d in set(entry.digests)}.values())
        for entry in second.files
    }
    by_size = {}
    for size in SIZES:
        store = BlockStore(work / f"relayout-probe{size}", block_size=size)
        held = {ref.digest for f in files["a"].values() for ref in store.chunk_file(f)}
        refs = [ref for f in files["b"].values() for ref in store.chunk_file(f)]
        fresh = {r.digest: r.length for r in refs if not r.zero and r.digest not in held}
        by_size[size] = {"shipped_bytes": sum(fresh.values()), "manifest_entries": len(refs)}
        store.close()
    source_b = splits["b"].source_bytes
    return {
        "shipped_bytes": sum(missing.values()),
        "shipped_bytes_by_file": per_file,
        "ram_bytes": splits["b"].ram_bytes,
        "rest_bytes": splits["b"].rest_bytes,
        "pages": splits["b"].pages,
        "zero_pages": splits["b"].zero_pages,
        "verbatim_pages": splits["b"].verbatim_pages,
        "manifest_bytes": len(second.encode()),
        "loopback_fetch_s": round(fetch_s, 3),
        "split_mb_s": round(source_b / timings["split_b_s"] / 1e6, 1),
        "join_mb_s": round(source_b / timings["join_b_s"] / 1e6, 1),
        "by_block_size": by_size,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", nargs=2, type=Path, metavar=("A", "B"))
    parser.add_argument("--size-mib", type=int, default=72)
    parser.add_argument("--changed", type=float, default=0.10)
    parser.add_argument("--layout", choices=("pages", "stream"), default="pages")
    parser.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print JSON (the only output form)")
    parser.add_argument(
        "--relayout", action="store_true", help="also split A and B (needs --files)"
    )
    args = parser.parse_args()
    if args.relayout and not args.files:
        parser.error("--relayout needs real save files (--files A B)")
    work = Path(tempfile.mkdtemp(prefix="gleaner-bench-transfer-"))
    try:
        if args.files:
            a, b = args.files
            source = {"source": "files", "a": str(a), "b": str(b)}
        else:
            a, b = work / "a.save", work / "b.save"
            synthesize(a, b, args.size_mib * 2**20, args.changed, args.layout, args.seed)
            source = {"source": "synthetic", "layout": args.layout, "changed": args.changed}
        identity = Identity.generate()
        producer = BlockStore(work / "producer", block_size=args.block_size)
        receiver = BlockStore(work / "receiver", block_size=args.block_size)
        start = time.perf_counter()
        producer.put_file(a, identity, name="memory.save")
        cold_put_s = time.perf_counter() - start
        start = time.perf_counter()
        second = producer.put_file(b, identity, name="memory.save")
        warm_put_s = time.perf_counter() - start
        receiver.put_file(a, identity, name="memory.save")
        shipped = sum(receiver.missing(second).values())
        fetch_s = trio.run(loopback_fetch, producer, receiver, second)
        receiver.materialize(second, work / "restored")
        if (work / "restored").read_bytes() != b.read_bytes():
            raise RuntimeError("the fetched checkpoint differs from B")
        rsync = rsync_sent(a, b, work)
        result: dict[str, Any] = {
            "bench": "transfer",
            "checkpoint_bytes": b.stat().st_size,
            "shipped_bytes": shipped,
            "rsync_bytes": rsync["sent"],
            "rsync_literal_bytes": rsync["literal"],
            "block_size": args.block_size,
            "hash": "blake3",
            "hash_mb_s_per_core": hash_rate("blake3", args.block_size),
            "blake2b_mb_s_per_core": hash_rate("blake2b", args.block_size),
            "manifest_bytes": len(second.encode()),
            "cold_put_s": round(cold_put_s, 3),
            "warm_put_s": round(warm_put_s, 3),
            "loopback_fetch_s": round(fetch_s, 3),
            "by_block_size": {size: delta_at(work, a, b, size) for size in SIZES},
            "conditions": {
                **source,
                "first_checkpoint_bytes": a.stat().st_size,
                "receiver_holds": "A",
                "cores": os.cpu_count(),
                "cpu": platform.processor() or platform.machine(),
                "python": platform.python_version(),
                "blake3": blake3.__version__,
            },
        }
        a_pages, b_pages = qemu_pages(a), qemu_pages(b)
        if a_pages and b_pages:
            result["page_aligned_shipped_bytes"] = page_delta(a_pages, b_pages)
        if args.relayout:
            result["relayout"] = relayout(a, b, work, args.block_size)
        print(json.dumps(result))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
