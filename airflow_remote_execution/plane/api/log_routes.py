"""``POST /remote_execution/v1/work/{work_id}/log`` and ``/v1/triggers/{trigger_id}/log``: an agent sends a piece
of its task's (or its triggerer's trigger's) log to the plane log store (no remote logging configured; see
:mod:`airflow_remote_execution.plane.task_logs`).

Authenticated on headers and size-bounded by :mod:`.admission` before the body is read; a piece is kept only
for a lease the token's agent holds, or a trigger its triggerer runs (``store_piece``, ``store_trigger_piece``).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path
from starlette.concurrency import run_in_threadpool

from airflow_remote_execution.plane.api.agent_routes import ERRORS, Authorization, WorkId, _as_agent, _bearer
from airflow_remote_execution.wire.task_logs import LogPiece, LogPieceResponse

log_router = APIRouter(tags=["Agent"], responses=ERRORS)


@log_router.post("/work/{work_id}/log", response_model=LogPieceResponse)
async def task_log_piece(work_id: WorkId, body: LogPiece, authorization: Authorization = None) -> LogPieceResponse:
    """Keep bytes ``start``..``end`` of this lease's task log; answers where the plane's copy ends (a retry of a
    piece it holds is not kept twice; a gap is a 409 naming where to resume)."""
    from airflow_remote_execution.plane.task_logs import store_piece

    return await run_in_threadpool(_as_agent(authorization, lambda s, _t, agent: store_piece(s, agent, work_id, body)))


TriggerId = Annotated[int, Path(ge=1, le=2**31 - 1, description="The trigger's id, as the triggerer's sync gave it")]


@log_router.post("/triggers/{trigger_id}/log", response_model=LogPieceResponse)
async def trigger_log_piece(
    trigger_id: TriggerId, body: LogPiece, authorization: Authorization = None
) -> LogPieceResponse:
    """Keep bytes ``start``..``end`` of the log of a trigger this agent's triggerer ``fence`` runs (shown with its
    task's log); answered as for a task's log."""
    from airflow.utils.session import create_session

    from airflow_remote_execution.plane import tokens
    from airflow_remote_execution.plane.task_logs import store_trigger_piece

    def run() -> LogPieceResponse:
        with create_session() as session:
            token = tokens.verify(session, _bearer(authorization))  # a triggerer alone never registers an agent
            return store_trigger_piece(session, token.agent_name, trigger_id, body)

    return await run_in_threadpool(run)
