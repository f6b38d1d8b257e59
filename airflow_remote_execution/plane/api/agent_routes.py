"""Routes agents call. Each resolves the agent from its bearer token; nothing else identifies it."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from typing import Annotated, TypeVar

from fastapi import APIRouter, Header, Path, Request, Response
from starlette.concurrency import run_in_threadpool

from airflow.configuration import conf
from airflow.sdk import timezone
from airflow.utils.session import create_session

from airflow_remote_execution.plane import agents, leases, parsing, tokens

from airflow_remote_execution import config
from airflow_remote_execution.plane import exec_guard
from airflow_remote_execution.plane.api import task_start
from airflow_remote_execution.models import AgentModel, AgentTokenModel, WorkItemModel
from airflow_remote_execution.wire.api import (
    FencedRequest,
    FinishRequest,
    HeartbeatRequest,
    HeartbeatResponse,
    Lease,
    LeaseRequest,
    LeaseResponse,
    Problem,
    RegisterRequest,
    RegisterResponse,
    SentinelReport,
    SentinelReportResponse,
    StartRequest,
    StartResponse,
    WhoAmIResponse,
    WorkStateResponse,
)
from airflow_remote_execution.plane.wakeup import waker

T = TypeVar("T")
Authorization = Annotated[str | None, Header(description="Bearer <agent token>")]
WorkId = Annotated[int, Path(ge=1, le=2**31 - 1, description="The work item's id, as leased")]
ERRORS = {
    401: {"model": Problem, "description": "Token missing, malformed, unknown, expired or revoked"},
    403: {"model": Problem, "description": "The token does not allow this"},
    409: {"model": Problem, "description": "Not this agent's lease, stale fence, or not registered"},
}
agent_router = APIRouter(tags=["Agent"], responses=ERRORS)


def _bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise tokens.TokenError("Malformed Authorization header: expected 'Bearer <agent token>'")
    return value.strip()


def _as_agent(authorization: str | None, fn: Callable[..., T]) -> Callable[[], T]:
    """Run ``fn(session, token_row, agent_row)`` in one transaction for the token's agent."""

    def run() -> T:
        with create_session() as session:
            token = tokens.verify(session, _bearer(authorization))
            agent = agents.for_token(token)
            return fn(session, token, agent)

    return run


def _lease_view(item: WorkItemModel, token_id: str) -> Lease:
    """The lease as the agent gets it: the workload's execution-API token bound to this lease."""
    import json

    workload = json.loads(item.workload)
    if workload.get("token"):
        workload["token"] = exec_guard.bind(workload["token"], item.id, item.fence, token_id)
    return Lease(work_id=item.id, fence=item.fence, kind=item.kind, queue=item.queue, workload=workload)


@agent_router.post("/agents/register", response_model=RegisterResponse)
async def register(body: RegisterRequest, authorization: Authorization = None) -> RegisterResponse:
    """Register (or re-register) the token's agent with its queues, concurrency and versions."""

    def run() -> RegisterResponse:
        with create_session() as session:
            token = tokens.verify(session, _bearer(authorization))
            agent = agents.register(session, token, body)
            return RegisterResponse(
                agent_id=agent.id,
                name=agent.name,
                queues=list(agent.queues),
                heartbeat_interval=config.getfloat("heartbeat_interval"),
                long_poll_wait=config.getfloat("long_poll_wait"),
                core_executor=conf.get("core", "executor", fallback=""),
                warnings=_starved_by_bundles(session, token, agent),
            )

    return await run_in_threadpool(run)


def _starved_by_bundles(session, token: AgentTokenModel, agent: AgentModel) -> list[str]:
    """Queued work on the agent's queues that it will never lease, because its bundle is parsed by agents
    and this token does not allow it: said at registration, or the agent would poll and wait silently."""
    from sqlalchemy import func, select

    refused = parsing.bundles_refused_to(session, token)
    if not refused:
        return []
    rows = session.execute(
        select(WorkItemModel.bundle, func.count())
        .where(WorkItemModel.state == "queued", WorkItemModel.queue.in_(list(agent.queues)),
               WorkItemModel.bundle.in_(refused))
        .group_by(WorkItemModel.bundle)
    ).all()
    return [
        f"{count} queued work item(s) on this agent's queues belong to DAG bundle {bundle!r}, which agents parse "
        f"and token {token.id} does not allow: this agent will not run them (create its token with "
        f"--bundles {bundle} if it should; docs/dag-processing.md)"
        for bundle, count in sorted(rows)
    ]


@agent_router.post("/agents/heartbeat", response_model=HeartbeatResponse)
async def heartbeat(body: HeartbeatRequest, authorization: Authorization = None) -> HeartbeatResponse:
    """Report liveness and running work; the answer lists work to kill and whether to drain."""
    return await run_in_threadpool(_as_agent(authorization, lambda s, _t, a: agents.heartbeat(s, a, body)))


@agent_router.post("/agents/sentinel", response_model=SentinelReportResponse)
async def sentinel_report(body: SentinelReport, authorization: Authorization = None) -> SentinelReportResponse:
    """The sentinel beside the agent reports its aggregate status (with the agent's token). Stored on
    the agent's row; before the agent first registered there is no row and the answer is 409."""
    return await run_in_threadpool(_as_agent(authorization, lambda s, _t, a: agents.record_sentinel(s, a, body)))


@agent_router.post("/leases", response_model=LeaseResponse)
async def lease(
    body: LeaseRequest, request: Request, response: Response, authorization: Authorization = None
) -> LeaseResponse:
    """
    Long-poll for work: returns as soon as work for the agent's queues is queued (up to ``slots``
    items), or empty after ``wait`` seconds (capped by ``[remote_execution] long_poll_wait``). A token
    already holding ``max_long_polls_per_token`` long-polls here is answered at once, empty, with
    ``Retry-After``.
    """
    wait = min(body.wait, config.getfloat("long_poll_wait"))
    confirm_timeout = config.getfloat("lease_confirm_timeout")

    def who(_s, token: AgentTokenModel, agent: AgentModel) -> tuple[str, list[str]]:
        return token.id, [q for q in agent.queues if q in token.queues]

    token_id, queues = await run_in_threadpool(_as_agent(authorization, who))
    if _long_polls[token_id] >= config.getint("max_long_polls_per_token"):
        response.headers["Retry-After"] = str(max(int(wait), 1))
        return LeaseResponse(leases=[])

    def take(session, token: AgentTokenModel, agent: AgentModel) -> list[Lease]:
        if not agents.accepts_work(agent):
            return []
        refused = parsing.bundles_refused_to(session, token)
        items = leases.lease(session, agent, queues, body.slots, confirm_timeout, not_bundles=refused)
        return [_lease_view(i, token.id) for i in items]

    deadline = time.monotonic() + wait
    _long_polls[token_id] += 1
    try:
        while True:
            event = waker.arm(queues)
            try:
                if await request.is_disconnected():
                    return LeaseResponse(leases=[])
                found = await run_in_threadpool(_as_agent(authorization, take))
                remaining = deadline - time.monotonic()
                if found or remaining <= 0:
                    return LeaseResponse(leases=found)
                try:
                    await _wait(event, min(remaining, 1.0))
                except asyncio.TimeoutError:
                    pass
            finally:
                waker.disarm(event)
    finally:
        _long_polls[token_id] -= 1
        if not _long_polls[token_id]:
            del _long_polls[token_id]


_long_polls: Counter[str] = Counter()  # open long-polls per agent token, in this process


async def _wait(event, timeout: float) -> None:
    await asyncio.wait_for(event.wait(), timeout)


@agent_router.post("/work/{work_id}/start", response_model=StartResponse)
async def start(work_id: WorkId, body: StartRequest, request: Request, authorization: Authorization = None) -> StartResponse:
    """Confirm the lease is still this agent's before starting; 409 means: do not start. With ``task``, the
    plane then also makes the execution API's start report for the task and returns its answer."""

    def run(session, token, agent) -> tuple[StartResponse, tuple | None]:
        item = leases.confirm_start(session, agent, work_id, body.fence)
        report = None
        if body.task is not None and item.kind == "task":
            stamped = body.task.start_date or item.started_at
            report = (item.workload, min(max(stamped, item.leased_at), item.started_at), (item.id, item.fence, token.id))
        return StartResponse(work_id=item.id, state=item.state, fence=item.fence), report

    reply, report = await run_in_threadpool(_as_agent(authorization, run))
    if report is not None:  # the confirmation is committed: the task may start
        workload, start_date, lease = report
        reply.task_run = await task_start.report_started(request.scope, workload, start_date, body.task, lease)
    return reply


@agent_router.post("/work/{work_id}/finish", response_model=WorkStateResponse)
async def finish(work_id: WorkId, body: FinishRequest, authorization: Authorization = None) -> WorkStateResponse:
    """Report the outcome of work this agent ran under the given fence."""
    return await _report(
        authorization, lambda s, a: leases.finish(s, a, work_id, body.fence, body.outcome, body.info)
    )


@agent_router.post("/work/{work_id}/release", response_model=WorkStateResponse)
async def release(work_id: WorkId, body: FencedRequest, authorization: Authorization = None) -> WorkStateResponse:
    """Hand back leased work the agent will not start; it is queued for other agents at once."""
    return await _report(authorization, lambda s, a: leases.release(s, a, work_id, body.fence))


async def _report(authorization: str | None, transition) -> WorkStateResponse:
    def run(session, _t, agent):
        item = transition(session, agent)
        return WorkStateResponse(work_id=item.id, state=item.state, fence=item.fence)

    return await run_in_threadpool(_as_agent(authorization, run))


@agent_router.get("/agents/me", response_model=WhoAmIResponse)
async def whoami(authorization: Authorization = None) -> WhoAmIResponse:
    """The token's agent, queues and expiry, and the plane's clock; works before registration."""

    def run() -> WhoAmIResponse:
        with create_session() as session:
            token = tokens.verify(session, _bearer(authorization))
            return WhoAmIResponse(
                agent_name=token.agent_name,
                token_id=token.id,
                queues=list(token.queues),
                token_expires_at=token.expires_at,
                registered=token.agent is not None,  # loaded with the token
                server_time=timezone.utcnow(),
            )

    return await run_in_threadpool(run)
