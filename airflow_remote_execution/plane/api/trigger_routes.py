"""Routes agent triggerers call: register, sync (heartbeat + claim), events, failures, stop, and the
execution-API requests of their running triggers.

The agent is the bearer token's; a triggerer id is accepted only from the agent that registered it.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse, Response

from airflow_remote_execution.plane import parsing, triggers
from airflow_remote_execution.plane.api.agent_routes import ERRORS, Authorization, _bearer
from airflow_remote_execution.wire.triggers import (
    TriggerAck,
    TriggererRegisterRequest,
    TriggererRegisterResponse,
    TriggerEventRequest,
    TriggerFailureRequest,
    TriggerSyncRequest,
    TriggerSyncResponse,
)

Id = Annotated[int, Path(ge=1, le=2**31 - 1)]
ExecutionPath = Annotated[str, Path(min_length=1, max_length=4096, description="An execution-API path, e.g. task-instances/count")]
trigger_router = APIRouter(tags=["Agent triggerer"], responses=ERRORS)


def _run(authorization: str | None, fn):
    """``fn(session, token)`` in one transaction, in a worker thread."""
    from airflow.utils.session import create_session

    from airflow_remote_execution.plane import tokens

    def run():
        with create_session() as session:
            return fn(session, tokens.verify(session, _bearer(authorization)))

    return run_in_threadpool(run)


@trigger_router.post("/triggerers/register", response_model=TriggererRegisterResponse)
async def register(body: TriggererRegisterRequest, authorization: Authorization = None) -> TriggererRegisterResponse:
    """Start a triggerer of the token's agent: a new TriggererJob that will own the triggers it claims."""

    def run(session, token):
        row = triggers.register(session, token, body)
        return TriggererRegisterResponse(
            triggerer_id=row.job_id, queues=list(row.queues), sync_interval=triggers.SYNC_INTERVAL
        )

    return await _run(authorization, run)


@trigger_router.post("/triggerers/{triggerer_id}/sync", response_model=TriggerSyncResponse)
async def sync(triggerer_id: Id, body: TriggerSyncRequest, authorization: Authorization = None) -> TriggerSyncResponse:
    """Heartbeat, claim triggers up to ``capacity``; the answer lists all owned triggers and those to start."""
    return await _run(
        authorization,
        lambda s, t: triggers.sync(
            s, triggers.for_agent(s, t, triggerer_id), body, not_bundles=parsing.bundles_refused_to(s, t),
            bundles=list(t.bundles or ()),
        ),
    )


@trigger_router.post("/triggerers/{triggerer_id}/stop", response_model=TriggerSyncResponse)
async def stop(triggerer_id: Id, authorization: Authorization = None) -> TriggerSyncResponse:
    """A triggerer shutting down: its triggers are free for other triggerers at once."""

    def run(session, token):
        triggers.stop(session, triggers.for_agent(session, token, triggerer_id))
        return TriggerSyncResponse(assigned=[], start=[])

    return await _run(authorization, run)


@trigger_router.post("/triggers/{trigger_id}/event", response_model=TriggerAck)
async def event(trigger_id: Id, body: TriggerEventRequest, authorization: Authorization = None) -> TriggerAck:
    """A trigger fired: resume its deferred task (Airflow's ``Trigger.submit_event``). 409: not yours."""

    def run(session, token):
        row = triggers.for_agent(session, token, body.triggerer_id)
        triggers.submit_event(session, row, trigger_id, body.event)
        return TriggerAck(trigger_id=trigger_id, accepted=True)

    return await _run(authorization, run)


@trigger_router.post("/triggers/{trigger_id}/failure", response_model=TriggerAck)
async def failure(trigger_id: Id, body: TriggerFailureRequest, authorization: Authorization = None) -> TriggerAck:
    """A trigger failed: its task is failed through the worker path (Airflow's ``Trigger.submit_failure``)."""

    def run(session, token):
        row = triggers.for_agent(session, token, body.triggerer_id)
        triggers.submit_failure(session, row, trigger_id, body.traceback)
        return TriggerAck(trigger_id=trigger_id, accepted=True)

    return await _run(authorization, run)


# Headers of a trigger's request that reach Airflow's execution API (its API version picks the schema).
_FORWARDED = ("content-type", "accept", "airflow-api-version")


async def execution(triggerer_id: Id, path: ExecutionPath, request: Request, authorization: Authorization = None) -> Response:
    """A running trigger's request to its supervisor (task-instance and DAG-run counts and states, previous
    task instances, XCom reads, HITL details...), served by Airflow's execution API as for the stock
    triggerer, scoped to this triggerer's triggers and its token's bundles; read-only."""
    body = await request.body()
    query = request.url.query

    def check(session, token):
        row = triggers.for_agent(session, token, triggerer_id)
        return triggers.execution_refusal(session, token, row, request.method, path, query)

    refused = await _run(authorization, check)
    if refused is not None:
        status, message = refused
        return JSONResponse({"detail": {"reason": "remote_execution", "message": message}}, status)
    headers = {k: v for k, v in request.headers.items() if k.lower() in _FORWARDED}
    answer = await run_in_threadpool(triggers.serve_execution, request.method, path, query, body, headers)
    kept = {k: v for k, v in answer.headers.items() if k.lower() in ("content-type",)}
    return Response(answer.content, answer.status_code, headers=kept)


for _method in ("GET", "PATCH", "PUT", "POST", "DELETE"):  # one operation id per method in the OpenAPI document
    trigger_router.add_api_route(
        "/triggerers/{triggerer_id}/execution/{path:path}", execution, methods=[_method],
        operation_id=f"trigger_execution_{_method.lower()}", responses=ERRORS,
    )
