"""Routes agents call. Each resolves the agent from its bearer token; nothing else identifies it."""

from __future__ import annotations

import asyncio
import functools
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, TypeVar

from fastapi import APIRouter, Header, Path, Request, Response
from starlette.concurrency import run_in_threadpool

from airflow.configuration import conf
from airflow.sdk import timezone
from airflow.utils.session import create_session

from airflow_remote_execution.plane import agents, identity, leases, parsing, tokens
from airflow_remote_execution.plane.heartbeats import heartbeats

from airflow_remote_execution import config
from airflow_remote_execution.plane import exec_guard, metrics
from airflow_remote_execution.plane.api import root_app, task_start
from airflow_remote_execution.plane.api.db_threads import in_db_thread
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
from airflow_remote_execution.plane import wakeup
from airflow_remote_execution.plane.wakeup import Waiter, waker

T = TypeVar("T")
Authorization = Annotated[str | None, Header(description="Bearer <agent token>")]
WorkId = Annotated[int, Path(ge=1, le=2**31 - 1, description="The work item's id, as leased")]
ERRORS = {
    401: {"model": Problem, "description": "Token missing, malformed, unknown, expired or revoked"},
    403: {"model": Problem, "description": "The token does not allow this"},
    409: {"model": Problem, "description": "Not this agent's lease, stale fence, or not registered"},
}
agent_router = APIRouter(tags=["Agent"], responses=ERRORS)


_bearer = identity.bearer


async def _identity(request: Request, authorization: str | None) -> identity.Identity:
    """The token's identity: as the admission middleware resolved it, or resolved now."""
    found = getattr(request.state, "rex_identity", None)
    if found is None:
        found = await in_db_thread(identity.identities.resolve, authorization)
    return found


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
                heartbeat_interval=agents.heartbeat_interval(session),
                long_poll_wait=config.getfloat("long_poll_wait"),
                core_executor=conf.get("core", "executor", fallback=""),
                warnings=_starved_by_bundles(session, token, agent),
            )

    return await in_db_thread(run)


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
async def heartbeat(body: HeartbeatRequest, request: Request, authorization: Authorization = None) -> HeartbeatResponse:
    """Report liveness and running work; the answer lists work to kill and whether to drain. Written with
    other agents' heartbeats in one transaction (plane/heartbeats.py)."""
    who = await _identity(request, authorization)
    with metrics.timed("heartbeat"):
        return await heartbeats.beat(who.agent_name, body)


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

    A waiting request costs no thread and no query: it looks once, then sleeps until the wake-up for
    one of its queues (plane/wakeup.py) picks it, its time is up, or the agent hangs up. While it waits,
    connected, it is a sign of life of its agent, recorded with the heartbeats (plane/heartbeats.py): a
    plane too busy to take every heartbeat in time still sees the agent's held connection.
    """
    wait = min(body.wait, config.getfloat("long_poll_wait"))
    who = await _identity(request, authorization)
    if _long_polls[who.token_id] >= config.getint("max_long_polls_per_token"):
        response.headers["Retry-After"] = str(max(int(wait), 1))
        return LeaseResponse(leases=[])
    deadline = time.monotonic() + wait
    _long_polls[who.token_id] += 1
    metrics.long_polls(_long_polls.total())
    waiting = functools.partial(_wait_for_work, who, body.slots, deadline)
    if (parking := request.scope.get(root_app.PARK)) is not None:
        parking(waiting)  # the root app's fast path waits and answers, with this request's machinery gone
        return LeaseResponse(leases=[])  # not sent
    gone = asyncio.ensure_future(root_app.disconnected(request.receive))
    try:
        return await waiting(gone)
    finally:
        gone.cancel()


async def _wait_for_work(who: identity.Identity, slots: int, deadline: float, gone: asyncio.Future) -> LeaseResponse:
    """The long-poll counted in ``_long_polls`` by the route: its leases, and the end of its count."""
    try:
        with heartbeats.holding(who.agent_name):  # a sign of life while it waits here, connected
            return LeaseResponse(leases=await _long_poll(who, slots, deadline, gone))
    finally:
        _long_polls[who.token_id] -= 1
        if not _long_polls[who.token_id]:
            del _long_polls[who.token_id]
        metrics.long_polls(_long_polls.total())


async def _long_poll(who: identity.Identity, slots: int, deadline: float, gone: asyncio.Future) -> list[Lease]:
    queues: list[str] = list(_queues_of.get(who.token_id, who.queues))
    known = _nothing_for.get((tuple(sorted(queues)), who.bundles))
    woken: Waiter | None = None  # the waiter whose wake-up this turn answers
    place = wakeup.rank(who.agent_name)
    while True:
        waiter, again = waker.arm(queues, place), False
        try:
            if gone.done():
                if woken:
                    waker.pass_on(woken)
                return []
            if known and not woken and time.monotonic() < known.until and waker.unchanged_since(known.mark, queues):
                found, taking, refuses = [], True, False  # nothing announced since it last looked: no query
            else:
                mark = waker.mark(queues)
                try:
                    found, queues, taking, refuses = await in_db_thread(_take, who, slots)
                except Exception:  # e.g. no longer registered: whoever woke it is not lost
                    if woken:
                        waker.pass_on(woken)
                    raise
                _queues_of[who.token_id] = tuple(queues)
                scope = (tuple(sorted(queues)), who.bundles)
                if taking and not found:
                    until = known.until if known and time.monotonic() < known.until else time.monotonic() + RECHECK_EVERY
                    known = _nothing_for[scope] = _Nothing(mark, until)
                else:
                    _nothing_for.pop(scope, None)
                    known = None
            if woken and (len(found) >= slots or (not found and refuses)):
                waker.pass_on(woken)  # there may be more, or work this agent may not take
            if found or time.monotonic() >= deadline:
                return found
            if not taking:  # drained or not active: no use waking it for work
                waker.disarm(waiter)
                if woken:
                    waker.pass_on(woken)
                await asyncio.wait([gone], timeout=max(deadline - time.monotonic(), 0))
                return []
            again = await waker.wait(waiter, deadline - time.monotonic(), gone)
            if not again:
                return []
            woken = waiter
        finally:
            waker.disarm(waiter)
            if waiter.woken and not again:  # woken, but leaving without looking: another waiter looks
                waker.pass_on(waiter)


RECHECK_EVERY = 120.0  # seconds an agent's long-polls may go without a query while nothing is announced


@dataclass(frozen=True)
class _Nothing:
    """An agent serving these queues, with these token bundles, found nothing to lease when the waker's
    announcements stood at ``mark``: long-polls of agents with the same scope (or a subset of its queues) on
    this process skip the query while nothing new is announced for those queues (each looked once on
    arrival before: an idle fleet's main cost), but one of them looks again at the latest at ``until``.
    Anything that queues work announces it (``leases`` notifies on every transition to QUEUED); a listener
    reconnect counts as an announcement for all. A skipped look also skips the registration and drain
    checks of ``_take``: the next look (a wake-up, or ``until``) makes them."""

    mark: tuple
    until: float


_nothing_for: dict[tuple, _Nothing] = {}  # (sorted queues, token bundles) -> the last empty look
_queues_of: dict[str, tuple[str, ...]] = {}  # token id -> the queues its agent serves (as its last look found)


_long_polls: Counter[str] = Counter()  # open long-polls per agent token, in this process


def _take(who: identity.Identity, slots: int) -> tuple[list[Lease], list[str], bool, bool]:
    """Lease what there is for the token's agent: (leases, the queues it serves, whether it takes work,
    whether its token refuses some bundles agents parse)."""
    with create_session() as session:
        agent = agents.registered(session, who.agent_name)
        queues = [q for q in agent.queues if q in who.queues]
        if not agents.accepts_work(agent):
            return [], queues, False, False
        refused = parsing.bundles_refused_to(session, who)
        items = leases.lease(session, agent, queues, slots, config.getfloat("lease_confirm_timeout"), not_bundles=refused)
        return [_lease_view(i, who.token_id) for i in items], queues, True, bool(refused)


@agent_router.post("/work/{work_id}/start", response_model=StartResponse)
async def start(work_id: WorkId, body: StartRequest, request: Request, authorization: Authorization = None) -> StartResponse:
    """Confirm the lease is still this agent's before starting; 409 means: do not start. With ``task``, the
    plane then also makes the execution API's start report for the task and returns its answer."""

    def run(session, token, agent) -> tuple[StartResponse, tuple | None]:
        item = leases.confirm_start(session, agent, work_id, body.fence)
        metrics.confirmed(item)
        report = None
        if body.task is not None and item.kind == "task":
            stamped = body.task.start_date or item.started_at
            report = (item.workload, min(max(stamped, item.leased_at), item.started_at), (item.id, item.fence, token.id))
        return StartResponse(work_id=item.id, state=item.state, fence=item.fence), report

    reply, report = await in_db_thread(_as_agent(authorization, run))
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

    return await in_db_thread(_as_agent(authorization, run))


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
