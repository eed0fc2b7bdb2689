"""The market's control requests: submit, jobs, job, job_output, ledger, market.

``gleaner submit/jobs/watch/fetch/ledger`` (node/cli/market.py) call these on
the local agent's control socket. Every parameter is checked here; a bad one
is an ``RpcError`` naming it, and the agent keeps running.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from node.market.jobs import JobSpecError
from node.runtime.control import RpcError
from node.runtime.market_owner import spec_from_request
from segments.image.workload import parse_result

if TYPE_CHECKING:
    from node.runtime.agent import Agent

MARKET_METHODS = frozenset(
    {"job_submit", "jobs", "job", "job_output", "ledger", "market", "drain", "undrain"}
)


async def market_rpc(agent: Agent, method: str, params: dict[str, Any]) -> Any:
    owner = agent.owner_market
    if method == "job_submit":
        job = params.get("job")
        if not isinstance(job, dict) or not all(isinstance(key, str) for key in job):
            raise RpcError("parameter 'job' must be a table of job settings")
        try:
            spec = spec_from_request(agent.identity, job, time.time())
            job_id = await owner.submit(spec)
        except JobSpecError as exc:
            raise RpcError(str(exc)) from None
        return owner.summary(job_id)
    if method == "jobs":
        return [owner.summary(job_id) for job_id in owner.jobs]
    if method == "ledger":
        assert agent.ledger is not None
        return agent.ledger.view()
    if method == "drain":
        deadline_s = params.get("deadline_s")
        if deadline_s is not None and (
            type(deadline_s) not in (int, float) or not 0 < deadline_s <= 7 * 86400
        ):
            raise RpcError("parameter 'deadline_s' must be seconds from now (up to a week)")
        deadline = time.time() + deadline_s if deadline_s is not None else None
        return await agent.policy.drain(deadline)
    if method == "undrain":
        return await agent.policy.undrain()
    if method == "market":  # the host side, and what the owner side refused before any job
        return {**agent.host_market.view(), "owner_statistics": owner.statistics()}
    job_id = _job(owner, params)
    if method == "job":
        return owner.detail(job_id)
    return await _output(agent, job_id)


def _job(owner: Any, params: dict[str, Any]) -> bytes:
    prefix = params.get("job")
    if not isinstance(prefix, str):
        raise RpcError("parameter 'job' must be a job id (or a unique prefix of one)")
    try:
        return bytes(owner.find(prefix))
    except KeyError as exc:
        raise RpcError(str(exc.args[0])) from None


async def _output(agent: Agent, job_id: bytes) -> dict[str, Any]:
    """The job's console output, segment by segment, from the committed checkpoints."""
    assert agent.segments is not None
    rows = agent.owner_market.detail(job_id)["rows"]
    parts = []
    for row in rows:
        if row["manifest"] is None:
            break
        text = await agent.segments.console_of(bytes.fromhex(row["manifest"]))
        if text is None:
            raise RpcError(f"segment {row['segment']}: its checkpoint is not held here")
        parts.append(text)
    console = "".join(parts)
    summary = agent.owner_market.summary(job_id)
    return {
        **summary,
        "console": console,
        "result": parse_result(console),
        "manifest": rows[-1]["manifest"] if rows else None,
    }
