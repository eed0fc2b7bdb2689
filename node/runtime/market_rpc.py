"""The market's control requests: job_submit, jobs, job, job_output, ledger, market,
drain and undrain.

``gleaner submit/jobs/watch/fetch/ledger/drain`` (node/cli/market.py) call these
on the local agent's control socket. ``MarketRpc`` holds the services that answer
them (the owner and host halves of the market, the ledger, the host policy and
the segment store the consoles come from) and ``register`` puts its methods into
the control socket's dispatch table (``node.runtime.control.RpcTable``). Every
parameter is checked here; a bad one is an ``RpcError`` naming it, and the agent
keeps running.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import trio

from node.base.identity import Identity
from node.market.jobs import JobSpecError
from node.market.offer_messages import Work
from node.market.run_requests import split_request, wants_run
from node.runtime.control import RpcError, RpcTable
from node.runtime.job_bundles import BundleError
from node.runtime.ledger_service import LedgerService
from node.runtime.market_host import HostMarket
from node.runtime.market_owner import OwnerMarket, spec_from_request
from node.runtime.policy_service import PolicyService
from node.runtime.segment_service import SegmentService
from segments.image.runner import parse_exit
from segments.image.store import ImageError
from segments.image.workload import parse_result


@dataclass
class MarketRpc:
    identity: Identity
    owner: OwnerMarket
    host: HostMarket
    ledger: LedgerService
    policy: PolicyService
    segments: SegmentService

    def register(self, table: RpcTable) -> None:
        table.register("job_submit", self.job_submit)
        table.register("jobs", self.jobs)
        table.register("job", self.job)
        table.register("job_output", self.job_output)
        table.register("ledger", self.ledger_view)
        table.register("market", self.market)
        table.register("drain", self.drain)
        table.register("undrain", self.undrain)

    async def job_submit(self, params: dict[str, Any]) -> Any:
        job = params.get("job")
        if not isinstance(job, dict) or not all(isinstance(key, str) for key in job):
            raise RpcError("parameter 'job' must be a table of job settings")
        work = None
        try:
            if wants_run(job) or await self._library_image(job.get("image")):
                job, work = await self._run_job(job)
            spec = spec_from_request(self.identity, job, time.time(), work)
            job_id = await self.owner.submit(spec)
        except (JobSpecError, BundleError) as exc:
            if work is not None:  # refused after its bundle was stored: drop the bundle
                await trio.to_thread.run_sync(self.segments.store.remove_manifest, work.bundle)
                await trio.to_thread.run_sync(self.segments.store.gc)
            raise RpcError(str(exc)) from None
        return self.owner.summary(job_id)

    async def _library_image(self, image: Any) -> bool:
        """Whether `image` names an image in this node's library (not a recipe image): a
        job of it runs that image's own command. Anything else is a recipe image's job."""
        bundles = self.segments.bundles
        if not isinstance(image, str) or bundles is None:
            return False
        try:
            await trio.to_thread.run_sync(bundles.library.resolve, image)
        except ImageError:
            return False
        return True

    async def _run_job(self, job: dict[str, Any]) -> tuple[dict[str, Any], Work]:
        """The job's own program: its bundle made and stored here, booted by a run image."""
        bundles = self.segments.bundles
        if bundles is None:
            raise RpcError("this node has no image library for a job's own image")
        table, request = split_request(job)
        try:  # the image first: the error a user most needs
            await trio.to_thread.run_sync(bundles.library.resolve, request.image)
        except ImageError as exc:
            raise RpcError(f"image: {exc}") from None
        boot = await trio.to_thread.run_sync(
            bundles.boot_image, self.segments.image_store, request.boot
        )
        work = await bundles.make(request)
        return {**table, "image": boot}, work

    async def jobs(self, params: dict[str, Any]) -> Any:
        return [self.owner.summary(job_id) for job_id in self.owner.jobs]

    async def job(self, params: dict[str, Any]) -> Any:
        return self.owner.detail(self._job_id(params))

    async def job_output(self, params: dict[str, Any]) -> dict[str, Any]:
        """The job's console output, segment by segment, from the committed checkpoints."""
        job_id = self._job_id(params)
        rows = self.owner.detail(job_id)["rows"]
        parts = []
        for row in rows:
            if row["manifest"] is None:
                break
            text = await self.segments.console_of(bytes.fromhex(row["manifest"]))
            if text is None:
                raise RpcError(f"segment {row['segment']}: its checkpoint is not held here")
            parts.append(text)
        console = "".join(parts)
        summary = self.owner.summary(job_id)
        output = {
            **summary,
            "console": console,
            "result": parse_result(console),
            "manifest": rows[-1]["manifest"] if rows else None,
        }
        if summary["own_program"]:
            output.update(await self._own_outputs(job_id, summary, console, output["manifest"]))
        return output

    async def _own_outputs(
        self, job_id: bytes, summary: dict[str, Any], console: str, manifest: str | None
    ) -> dict[str, Any]:
        """A job owner's program's exit status and files, once its guest powered off."""
        if summary["state"] != "halted" or manifest is None or self.segments.bundles is None:
            return {"exit_status": None, "outputs": None, "files": []}
        folder = self.segments.state_dir / "outputs" / job_id.hex()
        try:
            files = await trio.to_thread.run_sync(
                self.segments.bundles.outputs, bytes.fromhex(manifest), folder
            )
        except BundleError as exc:
            raise RpcError(str(exc)) from None
        return {
            "exit_status": parse_exit(console),
            "outputs": str(folder),
            "files": [[file.path, file.size] for file in files],
        }

    async def ledger_view(self, params: dict[str, Any]) -> Any:
        return self.ledger.view()

    async def market(self, params: dict[str, Any]) -> Any:
        """The host side, and what the owner side refused before any job."""
        return {**self.host.view(), "owner_statistics": self.owner.statistics()}

    async def drain(self, params: dict[str, Any]) -> Any:
        deadline_s = params.get("deadline_s")
        if deadline_s is not None and (
            type(deadline_s) not in (int, float) or not 0 < deadline_s <= 7 * 86400
        ):
            raise RpcError("parameter 'deadline_s' must be seconds from now (up to a week)")
        deadline = time.time() + deadline_s if deadline_s is not None else None
        return await self.policy.drain(deadline)

    async def undrain(self, params: dict[str, Any]) -> Any:
        return await self.policy.undrain()

    def _job_id(self, params: dict[str, Any]) -> bytes:
        prefix = params.get("job")
        if not isinstance(prefix, str):
            raise RpcError("parameter 'job' must be a job id (or a unique prefix of one)")
        try:
            return bytes(self.owner.find(prefix))
        except KeyError as exc:
            raise RpcError(str(exc.args[0])) from None
