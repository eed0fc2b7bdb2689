"""Images people bring: what an import costs, and what a second image sharing a base adds.

Builds two OCI archives locally, with no registry and no daemon
(``segments.image.oci_pack``): a base whose one layer is a root holding this
machine's Python standard library (``/usr/lib/python3.11``, about 54 MB), and
a second image of that base plus one application layer (``--app-mib`` of
random data and a script). It imports the base into an empty image store,
then the second image into the same store, and prints one JSON object:

* ``import_s`` and ``image_bytes``: the base's import time (whole call:
  check, unpack, hash, store) and its uncompressed size;
* ``second_image_bytes`` and ``second_image_new_bytes``: the second image's
  size and the block bytes its import added, against ``app_layer_bytes``;
  the target is ``second_image_new_bytes <= 1.05 * app_layer_bytes``;
* ``not_yet_measured``: the figures of issue 14 that need images to travel
  and guests to run them (fetch, checkpoints with disks, a whole job), which
  do not exist yet.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from node.base.identity import Identity
from segments.image.library import ImageLibrary
from segments.image.oci import RunSettings
from segments.image.oci_pack import pack
from segments.store.blocks import DEFAULT_BLOCK_SIZE

BASE_SOURCE = Path("/usr/lib/python3.11")
IDENTITY = Identity.from_seeds(b"\x31" * 32, b"\x32" * 32)


def run(work: Path, app_mib: float) -> dict[str, object]:
    base_root, app_root = work / "base", work / "app"
    shutil.copytree(BASE_SOURCE, base_root / BASE_SOURCE.relative_to("/"), symlinks=True)
    (app_root / "app").mkdir(parents=True)
    (app_root / "app" / "data.bin").write_bytes(random.Random(7).randbytes(int(app_mib * 2**20)))
    (app_root / "app" / "run.sh").write_text("#!/bin/sh\nsha256sum /app/data.bin\n")
    settings = RunSettings(cmd=("/bin/sh", "/app/run.sh"), env=("PATH=/usr/bin:/bin",))
    started = time.monotonic()
    base_archive = pack([base_root], work / "base.tar", settings)
    second_archive = pack([base_root, app_root], work / "second.tar", settings)
    pack_s = time.monotonic() - started
    with ImageLibrary(work / "store") as library:
        first = library.import_archive(base_archive, IDENTITY, "bench/base")
        second = library.import_archive(second_archive, IDENTITY, "bench/app")
        app_layer_bytes = int(second.image.layers[-1]["size"])
    ratio = second.new_bytes / app_layer_bytes
    return {
        "bench": "workloads",
        "import_s": round(first.seconds, 3),
        "image_bytes": first.image.size_bytes,
        "archive_bytes": base_archive.stat().st_size,
        "image_new_bytes": first.new_bytes,
        "second_image_bytes": second.image.size_bytes,
        "second_image_new_bytes": second.new_bytes,
        "second_import_s": round(second.seconds, 3),
        "app_layer_bytes": app_layer_bytes,
        "second_new_over_app_layer": round(ratio, 4),
        "target_second_new_over_app_layer_max": 1.05,
        "target_met": ratio <= 1.05,
        "pack_two_archives_s": round(pack_s, 3),
        "not_yet_measured": {
            name: "needs images to travel and guests to run imported images (issue 14)"
            for name in (
                "first_fetch_bytes",
                "checkpoint_disk_bytes_shipped",
                "job_wall_s",
                "segments",
                "outputs_ok",
            )
        },
        "conditions": {
            "base": str(BASE_SOURCE),
            "app_mib": app_mib,
            "block_bytes": DEFAULT_BLOCK_SIZE,
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "layer_compression": "gzip in the archive, stored uncompressed",
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--app-mib", type=float, default=4.0, help="the app layer's random data")
    parser.add_argument("--json", action="store_true", help="print JSON (the only output form)")
    args = parser.parse_args()
    if not BASE_SOURCE.is_dir():
        print(f"bench/workloads.py: needs {BASE_SOURCE}", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="gleaner-bench-workloads-") as tmp:
        print(json.dumps(run(Path(tmp), args.app_mib)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
