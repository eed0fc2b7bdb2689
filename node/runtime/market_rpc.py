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

from node.base.identity import Identity
from node.market.jobs import JobSpecError
from node.runtime.control import RpcError, RpcTable
from node.runtime.ledger_service import LedgerService
from node.runtime.market_host import HostMarket
from node.runtime.market_owner import OwnerMarket, spec_from_request
from node.runtime.policy_service import PolicyService
from node.runtime.segment_service import SegmentService
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
        try:
            spec = spec_from_request(self.identity, job, time.time())
            job_id = await self.owner.submit(spec)
        except JobSpecError as exc:
            raise RpcError(str(exc)) from None
        return self.owner.summary(job_id)

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
        return {
            **summary,
            "console": console,
            "result": parse_result(console),
            "manifest": rows[-1]["manifest"] if rows else None,
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
