"""``POST /remote_execution/v1/xcom/live``: which XCom objects still have their XCom row (for agents' ``xcom gc``).

The plane owns the XCom table but not the storage credentials; the agent owns the credentials but not
the table. The agent lists old objects and asks here; only coordinates and URLs cross, never values.
"""

from __future__ import annotations

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from airflow_remote_execution.plane.api.agent_routes import ERRORS, Authorization, _as_agent
from airflow_remote_execution.wire.xcom import LiveRequest, LiveResponse

xcom_router = APIRouter(tags=["Agent"], responses=ERRORS)


@xcom_router.post("/xcom/live", response_model=LiveResponse)
async def xcom_live(body: LiveRequest, authorization: Authorization = None) -> LiveResponse:
    """Which of these objects an XCom row still references; the rest are orphans ``xcom gc`` may delete."""
    from airflow_remote_execution.xcom.references import references
    from airflow_remote_execution.xcom.store import Coordinates

    def run(session, _token, _agent) -> LiveResponse:
        return LiveResponse(
            live=[
                references(session, Coordinates(o.dag_id, o.run_id, o.task_id, o.map_index, o.key), o.ref)
                for o in body.objects
            ]
        )

    return await run_in_threadpool(_as_agent(authorization, run))
