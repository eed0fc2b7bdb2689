"""A job owner's program travels: the owner's bundle, a host's disks, and the outputs home.

The owner and the host each have their own segment store and image library; the
host fetches over a real block server on loopback, as the agents do.
"""

from __future__ import annotations

import io
import re
import tarfile
from dataclasses import replace
from pathlib import Path

import pytest
import trio
from kit.oci import ImageSpec, files_layer, write_oci_archive
from kit.transfer import start_server

from node.base.identity import Identity
from node.market.offer_messages import Work
from node.market.run_requests import RunRequest
from node.runtime import job_bundles
from node.runtime.job_bundles import (
    JOB_TAR,
    OUTPUT_DISK,
    RECORD_FILE,
    BlockSources,
    BundleError,
    JobBundles,
)
from node.runtime.rerun_check import RerunCheck
from segments.image.errors import ImageError
from segments.image.job_disks import JOB
from segments.image.library import ImageLibrary
from segments.store.blocks import BlockStore
from segments.vm.replica import CONSOLE_FILE
from segments.vm.verify import Verdict

OWNER = Identity.from_seeds(b"\x31" * 32, b"\x32" * 32)
HOST = Identity.from_seeds(b"\x33" * 32, b"\x34" * 32)
BASE = files_layer({"bin/tool": b"tool" * 5000, "etc/base": b"base"})
SPEC = ImageSpec([BASE, files_layer({"app/run": b"#!/bin/sh\necho hi\n"})], cmd=["/app/run"])


class Node:
    def __init__(self, root: Path, identity: Identity) -> None:
        self.store = BlockStore(root / "blocks")
        self.library = ImageLibrary(root / "library")
        self.bundles = JobBundles(identity, self.store, self.library, 1 << 30)

    def close(self) -> None:
        self.store.close()
        self.library.close()


@pytest.fixture
def nodes(tmp_path: Path):
    owner, host = Node(tmp_path / "owner", OWNER), Node(tmp_path / "host", HOST)
    yield owner, host
    owner.close()
    host.close()


def _request(tmp_path: Path, owner: Node, **changes) -> RunRequest:
    archive = write_oci_archive(tmp_path / "image.tar", SPEC)
    owner.library.import_archive(archive, OWNER, "tools:1")
    data = tmp_path / "numbers.txt"
    data.write_text("1\n2\n3\n")
    fields = {"image": "tools:1", "inputs": {"numbers.txt": str(data)}, "disk_mib": 32}
    return RunRequest(**{**fields, "output_mib": 16, **changes})


async def _disks_at_host(owner: Node, host: Node, work: Work, folder: Path):
    """The host's disks, fetched from the owner's block server (or its BundleError)."""
    outcome: dict[str, object] = {}
    async with trio.open_nursery() as nursery:
        scope, port = await start_server(nursery, BlockSources([owner.store, owner.library.store]))
        try:
            outcome["disks"] = await host.bundles.disks(work, [("127.0.0.1", port)], folder)
        except BundleError as exc:
            outcome["error"] = exc
        finally:
            scope.cancel()
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["disks"]


def test_a_host_makes_the_same_disks_as_the_owner_from_the_bundle_alone(tmp_path, nodes):
    owner, host = nodes
    request = _request(tmp_path, owner)
    work = trio.run(owner.bundles.make, request)
    assert work.disk_mib == 32 and work.output_mib == 16
    assert work.bundle_bytes >= owner.library.resolve("tools:1").size_bytes
    mine = trio.run(owner.bundles.disks, work, (), tmp_path / "owner-disks")
    theirs = trio.run(_disks_at_host, owner, host, work, tmp_path / "host-disks")
    assert [d.path.name for d in theirs] == [d.path.name for d in mine]
    assert [d.read_only for d in theirs] == [False, True, True, False]
    for a, b in zip(mine, theirs, strict=True):
        assert a.path.read_bytes() == b.path.read_bytes(), a.path.name
    with tarfile.open(tmp_path / "host-disks" / JOB) as job:
        assert job.extractfile("in/numbers.txt").read() == b"1\n2\n3\n"  # type: ignore[union-attr]
    image = owner.library.resolve("tools:1")
    assert host.library.load(image.id).id == image.id  # the host's own library holds it now
    assert host.bundles.image_held(work) == work.bundle_bytes  # a second run fetches nothing


def test_a_missing_input_or_an_unknown_image_is_a_bundle_error(tmp_path, nodes):
    owner, _ = nodes
    with pytest.raises(BundleError, match="not a file"):
        trio.run(owner.bundles.make, _request(tmp_path, owner, inputs={"x": "/nonexistent/x"}))
    with pytest.raises(BundleError, match="no image named absent:1"):
        trio.run(owner.bundles.make, _request(tmp_path, owner, image="absent:1"))


def test_a_bundle_with_other_files_is_refused_before_its_blocks_are_fetched(tmp_path, nodes):
    owner, host = nodes
    (tmp_path / "x").write_bytes(b"x")
    odd = owner.store.put_files(
        {RECORD_FILE: tmp_path / "x", JOB_TAR: tmp_path / "x", "extra": tmp_path / "x"}, OWNER
    )
    work = Work(odd.digest, 1 << 30, 16, 16)
    with pytest.raises(BundleError, match=r"holds image\.json and job\.tar"):
        trio.run(_disks_at_host, owner, host, work, tmp_path / "host-disks")
    assert host.store.manifest(odd.digest) is None


def test_a_record_that_is_not_its_image_is_refused(tmp_path, nodes):
    owner, host = nodes
    _request(tmp_path, owner)
    image = owner.library.resolve("tools:1")
    record = owner.library.record(image.id).replace(b'"cmd":["/app/run"]', b'"cmd":["/bin/sh"]')
    (tmp_path / "record").write_bytes(record)
    (tmp_path / "tar").write_bytes(b"\0" * 1024)
    forged = owner.store.put_files(
        {RECORD_FILE: tmp_path / "record", JOB_TAR: tmp_path / "tar"}, OWNER
    )
    with pytest.raises(BundleError, match="does not hash to its id"):
        trio.run(_disks_at_host, owner, host, Work(forged.digest, 1 << 30, 16, 16), tmp_path / "d")


def test_outputs_are_read_from_the_final_checkpoint_s_output_disk(tmp_path, nodes):
    owner, _ = nodes
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as archive:
        info = tarfile.TarInfo("./result.txt")
        info.size = 3
        archive.addfile(info, io.BytesIO(b"42\n"))
        evil = tarfile.TarInfo("../escape")
        evil.size = 1
        archive.addfile(evil, io.BytesIO(b"x"))
    disk = tmp_path / "outputs.raw"
    disk.write_bytes(raw.getvalue().ljust(1 << 20, b"\0"))
    checkpoint = owner.store.put_files({OUTPUT_DISK: disk}, OWNER)
    with pytest.raises(BundleError, match="outputs"):
        owner.bundles.outputs(checkpoint.digest, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "escape").exists()
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as archive:
        info = tarfile.TarInfo("./result.txt")
        info.size = 3
        archive.addfile(info, io.BytesIO(b"42\n"))
    disk.write_bytes(raw.getvalue().ljust(1 << 20, b"\0"))
    good = owner.store.put_files({OUTPUT_DISK: disk}, OWNER)
    files = owner.bundles.outputs(good.digest, tmp_path / "out")
    assert [(f.path, f.size) for f in files] == [("result.txt", 3)]
    assert (tmp_path / "out" / "result.txt").read_bytes() == b"42\n"
    again = owner.bundles.outputs(good.digest, tmp_path / "out")  # extracted once, listed after
    assert [(f.path, f.size) for f in again] == [("result.txt", 3)]
    no_disk = owner.store.put_files({"console": disk}, OWNER)
    with pytest.raises(BundleError, match="no output disk"):
        owner.bundles.outputs(no_disk.digest, tmp_path / "other")


def _finished(owner: Node, tmp_path: Path, name: str, files: dict[str, bytes], exit_status: int):
    """A halted checkpoint: a console ending in the exit line, and an output disk of `files`."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as archive:
        for path, data in files.items():
            info = tarfile.TarInfo(f"./{path}")
            info.size, info.mtime = len(data), 1000 * len(name)  # mtimes differ by run
            archive.addfile(info, io.BytesIO(data))
    (tmp_path / f"{name}.raw").write_bytes(raw.getvalue().ljust(1 << 20, b"\0"))
    (tmp_path / f"{name}.console").write_text(f"working\ngleaner-exit {exit_status}\n")
    return owner.store.put_files(
        {CONSOLE_FILE: tmp_path / f"{name}.console", OUTPUT_DISK: tmp_path / f"{name}.raw"},
        OWNER,
    )


@pytest.mark.parametrize(
    ("theirs", "exit_status", "reason"),
    [
        ({"result.txt": b"42\n"}, 0, None),
        ({"result.txt": b"41\n"}, 0, r"outputs differ \(\['result\.txt'\]\)"),
        ({"result.txt": b"42\n", "extra": b""}, 0, "outputs differ"),
        ({"result.txt": b"42\n"}, 1, "exit status 0, not 1"),
    ],
)
def test_a_rerun_passes_only_with_the_same_exit_status_and_output_files(
    tmp_path, nodes, theirs, exit_status, reason
):
    owner, _ = nodes
    mine = _finished(owner, tmp_path, "mine", {"result.txt": b"42\n"}, 0)
    claimed = _finished(owner, tmp_path, "claimed", theirs, exit_status)
    check = RerunCheck(lambda: None, owner.store, OWNER, owner.bundles)  # type: ignore[arg-type,return-value]
    before = Verdict(True, "powered off", 0, 0, 0.0)
    verdict = check._compare(claimed, mine, tmp_path / "compare", before)
    if reason is None:
        assert verdict.ok and "same 1 outputs" in verdict.reason
    else:
        assert not verdict.ok and re.search(reason, verdict.reason), verdict.reason


def test_a_host_fetches_no_more_than_the_offer_declared(tmp_path, nodes):
    owner, host = nodes
    work = trio.run(owner.bundles.make, _request(tmp_path, owner))
    bundle = owner.store.manifest(work.bundle)
    assert bundle is not None
    small = replace(work, bundle_bytes=bundle.total_size - 1)  # a lie about the bundle
    with pytest.raises(BundleError, match="over what was offered"):
        trio.run(_disks_at_host, owner, host, small, tmp_path / "a")
    assert host.store.manifest(work.bundle) is None  # refused before it was kept
    no_room = replace(work, bundle_bytes=bundle.total_size + 10)  # ... or about the image
    with pytest.raises(BundleError, match="over"):
        trio.run(_disks_at_host, owner, host, no_room, tmp_path / "b")
    image = owner.library.resolve("tools:1")
    with pytest.raises(ImageError):
        host.library.load(image.id)  # not taken


def test_a_host_keeps_only_the_newest_bundles_other_owners_made(tmp_path, nodes, monkeypatch):
    owner, host = nodes
    monkeypatch.setattr(job_bundles, "MAX_TAKEN_BUNDLES", 2)
    works = []
    for n in range(3):
        (tmp_path / f"in{n}").write_text(str(n))
        request = _request(tmp_path, owner, inputs={"n": str(tmp_path / f"in{n}")})
        works.append(trio.run(owner.bundles.make, request))
    for n, work in enumerate(works):
        trio.run(_disks_at_host, owner, host, work, tmp_path / f"d{n}")
    held = [host.store.manifest(work.bundle) is not None for work in works]
    assert held == [False, True, True] and host.bundles.stats["bundles_dropped"] == 1
    assert all(owner.store.manifest(work.bundle) is not None for work in works)  # the owner's
