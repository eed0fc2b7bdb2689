"""The agent's segment edge: its block store and block server, and replicas on request.

- The block store lives in ``<state_dir>/blocks``; its block server listens on
  the agent's overlay address (port ``BLOCK_PORT``), so peers fetch checkpoint
  blocks through WireGuard; an agent without an overlay (a test in the root
  namespace) serves on its underlay host instead.
- ``run_segment`` fetches the blocks of the previous checkpoint that this node
  lacks (from every holder it is given at once, each block verified), then
  runs a replica (segments.replica) in a worker thread against this host's
  libvirt, and returns the new checkpoint's signed manifest.

The market (which segment, which image, who holds what) decides *what* to run;
this service only knows how.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import trio

from node.identity import Identity
from node.records import parse_endpoint
from node.wire import RemoteProtocolError
from segments.blocks import BlockStore
from segments.image import ImageError, load
from segments.manifest import decode_manifest
from segments.replica import Replica, ReplicaError, SegmentRun
from segments.transfer import FetchError, fetch, serve_blocks
from segments.vm import LibvirtRuntime, VmError

log = logging.getLogger("gleaner.segments")

BLOCK_PORT = 7947


class SegmentError(Exception):
    """A segment request could not be carried out; the message says why."""


class SegmentService:
    def __init__(
        self, identity: Identity, state_dir: Path, libvirt_uri: str, image_store: Path
    ) -> None:
        self.identity = identity
        self.state_dir = state_dir
        self.libvirt_uri = libvirt_uri
        self.image_store = image_store
        self.store = BlockStore(state_dir / "blocks")
        self.listen: tuple[str, int] | None = None
        self.runs = 0
        self.replicas: dict[str, Replica] = {}

    async def serve(
        self,
        host: str,
        port: int = BLOCK_PORT,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        listeners = await trio.open_tcp_listeners(port, host=host)
        bound = listeners[0].socket.getsockname()
        self.listen = (host, bound[1])
        log.info("block server on [%s]:%d", host, bound[1])
        await serve_blocks(self.store, listeners[0], task_status=task_status)

    def close(self) -> None:
        self.store.close()

    async def run_segment(self, params: dict[str, Any]) -> dict[str, Any]:
        job = _text(params, "job")
        index = _number(params, "segment", int)
        image_id = _text(params, "image_id")
        try:
            image = await trio.to_thread.run_sync(load, self.image_store, image_id)
        except ImageError as exc:
            raise SegmentError(str(exc)) from None
        checkpoint = None
        fetched: dict[str, Any] = {}
        if params.get("checkpoint") is not None:
            try:
                checkpoint = decode_manifest(params["checkpoint"])
            except RemoteProtocolError as exc:
                raise SegmentError(f"bad checkpoint manifest: {exc}") from None
            holders = _holders(params.get("holders"))
            try:
                stats = await fetch(checkpoint, holders, self.store)
            except FetchError as exc:
                raise SegmentError(f"fetching the checkpoint: {exc}") from None
            fetched = {
                "blocks": stats.blocks_done,
                "bytes": stats.bytes_done,
                "bad_blocks": stats.bad_blocks,
            }
        run = SegmentRun(
            vm_name=f"gl-{job}",
            kernel=image.kernel,
            initrd=image.initrd,
            cmdline=f"{image.cmdline} {_text(params, 'args')}".strip(),
            memory_mb=image.memory_mb,
            vcpus=1,
            extent_cpu_s=_number(params, "extent_cpu_s", float),
        )
        work = self.state_dir / "replicas" / f"{job}-{index}"
        if not job.replace("-", "").isalnum() or len(job) > 40:
            raise SegmentError("job names are letters, digits and dashes, at most 40")
        result = await trio.to_thread.run_sync(self._run_blocking, run, checkpoint, work)
        self.runs += 1
        return {
            "checkpoint": result.checkpoint.encode() if result.checkpoint else None,
            "checkpoint_digest": result.checkpoint.digest.hex() if result.checkpoint else None,
            "checkpoint_bytes": result.checkpoint.total_size if result.checkpoint else 0,
            "cpu_s": result.cpu_s,
            "wall_s": result.wall_s,
            "powered_off": result.powered_off,
            "serial_log": str(result.serial_log),
            "fetched": fetched,
            "holder": f"[{self.listen[0]}]:{self.listen[1]}" if self.listen else None,
        }

    def _run_blocking(self, run: SegmentRun, checkpoint: Any, work: Path) -> Any:
        try:
            with LibvirtRuntime(self.libvirt_uri) as runtime:
                replica = Replica(runtime, self.store, self.identity, work)
                self.replicas[run.vm_name] = replica
                try:
                    return replica.run(run, checkpoint)
                finally:
                    self.replicas.pop(run.vm_name, None)
        except (ReplicaError, VmError) as exc:
            raise SegmentError(str(exc)) from None


def _holders(value: Any) -> list[tuple[str, int]]:
    if not isinstance(value, list) or not value or not all(isinstance(h, str) for h in value):
        raise SegmentError("parameter 'holders' must list at least one HOST:PORT")
    try:
        return [parse_endpoint(holder) for holder in value]
    except ValueError as exc:
        raise SegmentError(f"parameter 'holders': {exc}") from None


def _text(params: dict[str, Any], name: str) -> str:
    value = params.get(name, "")
    if not isinstance(value, str):
        raise SegmentError(f"parameter {name!r} must be a string")
    return value


def _number(params: dict[str, Any], name: str, kind: type) -> Any:
    value = params.get(name)
    if type(value) not in ((int,) if kind is int else (int, float)):
        raise SegmentError(f"parameter {name!r} must be a number")
    return kind(value)
