"""``POST /remote_execution/v1/work/{work_id}/log``: an agent sends a piece of its task's log to the plane log
store (no remote logging configured; see :mod:`airflow_remote_execution.plane.task_logs`).

Authenticated on headers and size-bounded by :mod:`.admission` before the body is read; the piece is kept
only for a lease the token's agent holds (:func:`~airflow_remote_execution.plane.task_logs.store_piece`).
"""

from __future__ import annotations

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from airflow_remote_execution.plane.api.agent_routes import ERRORS, Authorization, WorkId, _as_agent
from airflow_remote_execution.wire.task_logs import LogPiece, LogPieceResponse

log_router = APIRouter(tags=["Agent"], responses=ERRORS)


@log_router.post("/work/{work_id}/log", response_model=LogPieceResponse)
async def task_log_piece(work_id: WorkId, body: LogPiece, authorization: Authorization = None) -> LogPieceResponse:
    """Keep bytes ``start``..``end`` of this lease's task log; answers where the plane's copy ends (a retry of a
    piece it holds is not kept twice; a gap is a 409 naming where to resume)."""
    from airflow_remote_execution.plane.task_logs import store_piece

    return await run_in_threadpool(_as_agent(authorization, lambda s, _t, agent: store_piece(s, agent, work_id, body)))
