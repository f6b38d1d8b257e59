"""
The execution API's start report (``PATCH /execution/task-instances/{id}/run``), made by the plane for
an agent right after it confirmed the agent's lease.

Without it, a task's start costs the agent two round trips to the plane one after the other: the
start confirmation, then its supervisor's start report. Here the confirmation carries what the report
needs (the forked task's pid, host and user), and the plane sends the report in-process to the
execution API that ``airflow api-server`` mounts at ``/execution``: the real app, its auth (the
workload's own token) and its API versioning. The agent's supervisor gets the answer as if it had
asked itself. Where this api-server serves no execution API (``--apps core``), nothing is sent and the
supervisor reports itself.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime

from starlette.routing import Mount
from starlette.types import ASGIApp, Scope

from airflow_remote_execution.plane import exec_guard
from airflow_remote_execution.wire.api import ExecutionApiReply, TaskProcess

log = logging.getLogger(__name__)

EXECUTION_API_MOUNT = "/execution"
_PASSED_HEADERS = ("content-type", "refreshed-api-token")  # what the Task SDK client reads from the answer


def execution_app(scope: Scope) -> ASGIApp | None:
    """The execution API mounted beside us in this api-server (Starlette keeps the root router in the scope)."""
    router = scope.get("router")
    for route in getattr(router, "routes", ()):
        if isinstance(route, Mount) and route.path == EXECUTION_API_MOUNT:
            return route.app
    return None


async def report_started(
    scope: Scope, workload_json: str, start_date: datetime, task: TaskProcess, lease: tuple[int, int, str]
) -> ExecutionApiReply | None:
    """Tell the execution API the task started, as its supervisor would; None if it cannot be done here.
    ``start_date``: when the agent asked to start it (``TaskProcess.start_date``, kept between the lease
    and the confirmation), as a supervisor stamps its task's start before asking the execution API.
    ``lease``: (work id, fence, agent token id) the execution token Airflow swaps in is bound to."""
    import httpx

    app = execution_app(scope)
    if app is None:
        return None
    workload = json.loads(workload_json)
    body = {
        "state": "running",
        "pid": task.pid,
        "hostname": task.hostname,
        "unixname": task.unixname,
        "start_date": start_date.isoformat(),
    }
    headers = {"Authorization": f"Bearer {workload['token']}", "Airflow-API-Version": task.api_version}
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://execution-api") as client:
            response = await client.patch(f"/task-instances/{workload['ti']['id']}/run", json=body, headers=headers)
    except Exception:  # noqa: BLE001 - the supervisor then reports itself, with its own retries
        log.exception("In-process start report for task %s failed", workload["ti"]["id"])
        return None
    headers = {k: response.headers[k] for k in _PASSED_HEADERS if k in response.headers}
    if fresh := headers.get("refreshed-api-token"):
        work_id, fence, token_id = lease
        headers["refreshed-api-token"] = exec_guard.bind(fresh, work_id, fence, token_id)
    return ExecutionApiReply(status=response.status_code, headers=headers, body=response.text)
