"""
The Remote Agents page of the Airflow UI: its bundle and its page API (``/remote_execution/ui/...``).

The page API is for a person in the Airflow UI, so it takes only Airflow's own credentials (the UI's
session cookie, or an Airflow API JWT as a bearer token) and asks Airflow's auth manager:

* no valid UI session (none, expired, malformed, an agent token, an execution-API token): 401;
* reading agents and queues needs read on the **Jobs** view, the token list read on **Configuration**,
  a task instance's remote tries read on that DAG's task instances;
* every action (drain, resume, remove, create / rotate / revoke tokens) needs edit on **Configuration**
  (the same resources the admin API under ``/v1/admin`` uses); without them: 403.

The data comes from the same plane functions as the admin API and the CLI (``plane.agents``,
``plane.tokens``); this module only shapes it for the page.
"""

from __future__ import annotations

import hashlib
import platform
from datetime import datetime
from functools import cache
from importlib.metadata import version
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import FileResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field
from sqlalchemy import func, select
from starlette.concurrency import run_in_threadpool

from airflow.sdk import timezone
from airflow.utils.session import create_session

from airflow_remote_execution import __version__, config
from airflow_remote_execution.models import AgentModel, AgentTokenModel, WorkItemModel
from airflow_remote_execution.plane import agents, identity, tokens
from airflow_remote_execution.plane.api.admin import _set_drained
from airflow_remote_execution.wire.api import (
    AgentInfo,
    AgentState,
    DrainRequest,
    TokenCreated,
    TokenCreateRequest,
    TokenInfo,
    TokenRotateRequest,
    WorkState,
)

WWW = Path(__file__).parents[2] / "www"
BUNDLE = WWW / "remote-agents.js"
ICONS = {"remote-agents.svg", "remote-agents-dark.svg"}

ui_router = APIRouter(tags=["UI"], include_in_schema=True)
_bearer = HTTPBearer(auto_error=False)


# ------------------------------------------------------------------ the bundle (public, like Airflow's own JS)


@cache
def bundle_digest() -> str:
    return hashlib.sha256(BUNDLE.read_bytes()).hexdigest()[:16]


@ui_router.get("/remote-agents.js", include_in_schema=False)
async def bundle() -> Response:
    # A ``.js`` name and a JavaScript type: the UI import()s it as a module script.
    return FileResponse(BUNDLE, media_type="text/javascript; charset=utf-8", headers={"Cache-Control": "no-cache"})


@ui_router.get("/{icon}", include_in_schema=False)
async def icon(icon: str) -> Response:
    if icon not in ICONS:
        raise HTTPException(404, "Not Found")
    return FileResponse(WWW / icon, media_type="image/svg+xml", headers={"Cache-Control": "max-age=3600"})


# ------------------------------------------------------------------ authentication and authorization


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(401, f"{detail}: sign in to the Airflow UI", headers={"WWW-Authenticate": "Bearer"})


def _execution_audiences() -> set[str]:
    from airflow.configuration import conf

    return {a.strip() for a in conf.get("execution_api", "jwt_audience", fallback="").split(",") if a.strip()}


def _is_execution_token(token: str) -> bool:
    """A Task SDK workload / execution-API token: its ``scope`` claim, the execution API's audience, or the
    claims binding it to an agent's lease (``plane/exec_guard.py``)."""
    import jwt

    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return False
    aud = claims.get("aud")
    auds = {aud} if isinstance(aud, str) else set(aud or [])
    return (
        claims.get("scope") in ("execution", "workload")
        or "rex_work" in claims
        or bool(auds & _execution_audiences())
    )


async def ui_user(
    request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)
) -> Any:
    """The signed-in Airflow user, or 401. Airflow's own ``get_user`` answers 403 to a token it cannot
    validate; for this page that is "not signed in" too."""
    from airflow.api_fastapi.auth.managers.base_auth_manager import COOKIE_NAME_JWT_TOKEN
    from airflow.api_fastapi.core_api.security import get_user

    presented = credentials.credentials if credentials and credentials.scheme.lower() == "bearer" else None
    if presented and presented.startswith(f"{tokens.PREFIX}_"):
        raise _unauthorized("Agent tokens are not accepted by the Remote Agents page")
    presented = presented or request.cookies.get(COOKIE_NAME_JWT_TOKEN)
    if presented and _is_execution_token(presented):
        raise _unauthorized("Execution-API tokens are not accepted by the Remote Agents page")
    try:
        return await get_user(request, None, credentials)
    except HTTPException as e:
        if e.status_code in (401, 403):
            raise _unauthorized(f"No valid Airflow session ({e.detail})") from None
        raise


Need = Literal["read", "tokens_read", "edit"]
NEEDS: dict[str, str] = {
    "read": "read access on the Jobs view",
    "tokens_read": "read access on Configuration",
    "edit": "edit access on Configuration",
}


def allowed(user: Any, need: Need) -> bool:
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.models.resource_details import AccessView

    manager = get_auth_manager()
    if need == "read":
        return manager.is_authorized_view(access_view=AccessView.JOBS, user=user)
    return manager.is_authorized_configuration(method="GET" if need == "tokens_read" else "PUT", user=user)


def requires(need: Need):
    async def check(user: Any = Depends(ui_user)) -> Any:
        if not allowed(user, need):
            raise HTTPException(403, f"Forbidden: {user.get_name()} lacks {NEEDS[need]}")
        return user

    return check


# ------------------------------------------------------------------ answers


class SentinelView(BaseModel):
    status: str
    at: datetime
    age: float
    stale: bool
    checks: list[dict[str, Any]]


class WorkRef(BaseModel):
    id: int
    kind: str
    state: str
    queue: str
    label: str
    dag_id: str | None = None
    task_id: str | None = None
    run_id: str | None = None
    map_index: int | None = None
    try_number: int | None = None


Health = Literal["healthy", "degraded", "draining", "lost", "offline"]


class AgentView(BaseModel):
    name: str
    hostname: str | None
    health: Health
    health_reasons: list[str]
    state: str
    drained: bool
    drain_reason: str | None
    drained_by: str | None
    drained_at: datetime | None
    queues: list[str]
    concurrency: int
    slots_used: int
    running: list[WorkRef]
    last_heartbeat_at: datetime | None
    heartbeat_age: float | None
    versions: dict[str, str]
    version_mismatch: list[str] = Field(description="Keys of `versions` that differ from the plane's.")
    sentinel: SentinelView | None
    token_id: str | None
    token_status: str | None


class QueueView(BaseModel):
    queue: str
    queued: int
    leased: int
    running: int
    oldest_queued_age: float | None
    agents: list[str]
    live_agents: list[str] = Field(description="Agents leasing from this queue now (active, not drained).")
    warning: str | None


class Permissions(BaseModel):
    user: str
    can_edit: bool
    can_read_tokens: bool


class Overview(BaseModel):
    generated_at: datetime
    heartbeat_interval: float
    plane_versions: dict[str, str]
    agents: list[AgentView]
    queues: list[QueueView]
    permissions: Permissions


class TimelineStep(BaseModel):
    step: Literal["queued", "leased", "start_confirmed", "running", "finished"]
    label: str
    at: datetime | None
    note: str | None = None


class TaskTry(BaseModel):
    try_number: int
    work_id: int
    state: str
    queue: str
    agent_name: str | None
    agent_hostname: str | None
    info: str | None
    steps: list[TimelineStep]


class TaskRemote(BaseModel):
    dag_id: str
    run_id: str
    task_id: str
    map_index: int
    tries: list[TaskTry]


@cache
def plane_versions() -> dict[str, str]:
    """The same keys an agent reports when it registers (``agent/worker.py``)."""
    return {
        "airflow": version("apache-airflow-core"),
        "airflow-remote-execution": __version__,
        "python": platform.python_version(),
    }


def version_mismatch(theirs: dict[str, str], ours: dict[str, str]) -> list[str]:
    """Keys whose value differs from the plane's; Python by major.minor (patch releases are compatible)."""

    def norm(key: str, value: str) -> str:
        return ".".join(value.split(".")[:2]) if key == "python" else value

    return sorted(k for k, v in theirs.items() if k in ours and norm(k, v) != norm(k, ours[k]))


def health(
    agent: AgentModel, heartbeat_age: float | None, sentinel: dict, interval: float, token_status: str | None = None
) -> tuple[Health, list[str]]:
    """healthy / degraded / draining / lost / offline, and why (from heartbeats, the last sentinel report and
    the token it registered with)."""
    reasons: list[str] = []
    if token_status in ("revoked", "expired"):
        reasons.append(f"its token is {token_status}: the plane refuses it")
    if sentinel:
        if sentinel["sentinel_stale"]:
            reasons.append(f"sentinel silent for {sentinel['sentinel_age']:.0f}s")
        elif sentinel["sentinel_status"] != "ok":
            checks = (agent.sentinel_report or {}).get("checks", [])
            failing = [c["name"] for c in checks if not c.get("ok") and not c.get("skipped")]
            warning = [c["name"] for c in checks if c.get("ok") and c.get("warning")]
            named = ", ".join([*failing, *(f"{n} (warning)" for n in warning)])
            reasons.append(f"sentinel {sentinel['sentinel_status']}" + (f": {named}" if named else ""))
    if agent.state == AgentState.LOST.value:
        return "lost", [f"no heartbeat for {heartbeat_age:.0f}s" if heartbeat_age is not None else "no heartbeat"]
    if agent.state == AgentState.OFFLINE.value:
        return "offline", ["stopped cleanly"]
    if agent.drained or agent.state == AgentState.STOPPING.value:
        why = "drained by an operator" if agent.drained else "shutting down (finishing its work)"
        return "draining", [why, *reasons]
    if heartbeat_age is not None and heartbeat_age > 2 * interval:
        reasons.insert(0, f"heartbeat late ({heartbeat_age:.0f}s)")
    return ("degraded" if reasons else "healthy"), reasons


def _work_ref(row) -> WorkRef:
    key = list(row.key)
    if key and key[0] == "ti":
        _, dag_id, task_id, run_id, map_index, try_number = key
        mapped = f"[{map_index}]" if map_index is not None and map_index >= 0 else ""
        return WorkRef(
            id=row.id, kind=row.kind, state=row.state, queue=row.queue,
            label=f"{dag_id}.{task_id}{mapped} {run_id} try {try_number}",
            dag_id=dag_id, task_id=task_id, run_id=run_id, map_index=map_index, try_number=try_number,
        )
    return WorkRef(id=row.id, kind=row.kind, state=row.state, queue=row.queue, label=f"{row.kind} {key[1:]}")


def build_overview(session, user: Any) -> Overview:
    now = timezone.utcnow()
    interval = agents.heartbeat_interval(session)
    ours = plane_versions()
    rows = list(session.scalars(select(AgentModel).order_by(AgentModel.name)))
    token_rows = {
        t.id: t
        for t in session.scalars(
            select(AgentTokenModel).where(AgentTokenModel.id.in_([a.token_id for a in rows if a.token_id]))
        )
    } if rows else {}
    held = session.execute(
        select(WorkItemModel.id, WorkItemModel.kind, WorkItemModel.key, WorkItemModel.queue, WorkItemModel.state,
               WorkItemModel.agent_id)
        .where(WorkItemModel.state.in_([WorkState.LEASED.value, WorkState.RUNNING.value]))
        .order_by(WorkItemModel.id)
    ).all()
    by_agent: dict[int, list] = {}
    for row in held:
        if row.agent_id is not None:
            by_agent.setdefault(row.agent_id, []).append(row)

    views: list[AgentView] = []
    for a in rows:
        hb_age = max(0.0, (now - a.last_heartbeat_at).total_seconds()) if a.last_heartbeat_at else None
        sentinel = agents.sentinel_view(a, now)
        token = token_rows.get(a.token_id) if a.token_id else None
        token_status = tokens.token_status(token, now) if token else None
        state, reasons = health(a, hb_age, sentinel, interval, token_status)
        report = a.sentinel_report or {}
        views.append(
            AgentView(
                name=a.name, hostname=a.hostname, health=state, health_reasons=reasons, state=a.state,
                drained=a.drained, drain_reason=a.drain_reason, drained_by=a.drained_by, drained_at=a.drained_at,
                queues=list(a.queues), concurrency=a.concurrency, slots_used=len(by_agent.get(a.id, [])),
                running=[_work_ref(r) for r in by_agent.get(a.id, [])],
                last_heartbeat_at=a.last_heartbeat_at, heartbeat_age=round(hb_age, 1) if hb_age is not None else None,
                versions=dict(a.versions or {}), version_mismatch=version_mismatch(dict(a.versions or {}), ours),
                sentinel=SentinelView(
                    status=sentinel["sentinel_status"], at=sentinel["sentinel_at"], age=sentinel["sentinel_age"],
                    stale=sentinel["sentinel_stale"],
                    checks=[
                        {k: c.get(k, d) for k, d in (("name", ""), ("ok", False), ("skipped", False),
                                                       ("warning", False), ("detail", ""), ("hint", ""))}
                        for c in report.get("checks", [])
                    ],
                ) if sentinel else None,
                token_id=a.token_id, token_status=token_status,
            )
        )

    counts: dict[str, dict[str, int]] = {}
    oldest: dict[str, datetime] = {}
    for queue, state, n, first in session.execute(
        select(WorkItemModel.queue, WorkItemModel.state, func.count(), func.min(WorkItemModel.queued_at))
        .where(WorkItemModel.state.in_([WorkState.QUEUED.value, WorkState.LEASED.value, WorkState.RUNNING.value]))
        .group_by(WorkItemModel.queue, WorkItemModel.state)
    ):
        counts.setdefault(queue, {})[state] = n
        if state == WorkState.QUEUED.value:
            oldest[queue] = first
    queue_views = []
    for queue in sorted(set(counts) | {q for a in rows for q in a.queues}):
        serving = [a for a in rows if queue in a.queues]
        live = [a.name for a in serving if agents.accepts_work(a)]
        c = counts.get(queue, {})
        queued = c.get(WorkState.QUEUED.value, 0)
        age = max(0.0, (now - oldest[queue]).total_seconds()) if queue in oldest else None
        warning = None
        if queued and not live:
            others = ", ".join(f"{a.name} ({'drained' if a.drained else a.state})" for a in serving)
            warning = (
                f"{queued} work item(s) queued in '{queue}' for {age:.0f}s and no live agent serves it"
                + (f" (agents: {others})" if others else "")
            )
        queue_views.append(
            QueueView(
                queue=queue, queued=queued, leased=c.get(WorkState.LEASED.value, 0),
                running=c.get(WorkState.RUNNING.value, 0),
                oldest_queued_age=round(age, 1) if age is not None else None,
                agents=[a.name for a in serving], live_agents=live, warning=warning,
            )
        )
    return Overview(
        generated_at=now, heartbeat_interval=interval, plane_versions=ours, agents=views, queues=queue_views,
        permissions=Permissions(
            user=user.get_name(), can_edit=allowed(user, "edit"), can_read_tokens=allowed(user, "tokens_read")
        ),
    )


def _ti_times(session, dag_id: str, run_id: str, task_id: str, map_index: int) -> dict[int, tuple]:
    """try_number -> (start_date, end_date, state) of the task instance and its earlier tries."""
    from airflow.models.taskinstance import TaskInstance
    from airflow.models.taskinstancehistory import TaskInstanceHistory

    times: dict[int, tuple] = {}
    for model in (TaskInstanceHistory, TaskInstance):
        for row in session.execute(
            select(model.try_number, model.start_date, model.end_date, model.state).where(
                model.dag_id == dag_id, model.run_id == run_id, model.task_id == task_id,
                model.map_index == map_index,
            )
        ):
            times[row.try_number] = (row.start_date, row.end_date, row.state)
    return times


def build_task_remote(session, dag_id: str, run_id: str, task_id: str, map_index: int) -> TaskRemote:
    items = [
        w for w in session.scalars(
            select(WorkItemModel).where(WorkItemModel.dag_id == dag_id, WorkItemModel.run_id == run_id)
        )
        if w.key[0] == "ti" and w.key[2] == task_id and w.key[4] == map_index
    ]
    times = _ti_times(session, dag_id, run_id, task_id, map_index) if items else {}
    hosts = dict(
        session.execute(
            select(AgentModel.name, AgentModel.hostname).where(
                AgentModel.name.in_({w.agent_name for w in items if w.agent_name})
            )
        ).all()
    ) if items else {}
    tries = []
    for w in sorted(items, key=lambda w: (w.key[5], w.id)):
        start, end, ti_state = times.get(w.key[5], (None, None, None))
        finished = w.finished_at if w.state in (WorkState.SUCCESS.value, WorkState.FAILED.value,
                                                 WorkState.REVOKED.value) else None
        tries.append(
            TaskTry(
                try_number=w.key[5], work_id=w.id, state=w.state, queue=w.queue, agent_name=w.agent_name,
                agent_hostname=hosts.get(w.agent_name), info=w.info,
                steps=[
                    TimelineStep(step="queued", label="Queued", at=w.queued_at,
                                 note=f"work item {w.id} in queue '{w.queue}'"),
                    TimelineStep(step="leased", label="Leased", at=w.leased_at,
                                 note=f"by agent {w.agent_name}" if w.agent_name and w.leased_at else None),
                    TimelineStep(step="start_confirmed", label="Start confirmed", at=w.started_at,
                                 note="the plane let the agent start it" if w.started_at else None),
                    TimelineStep(step="running", label="Running", at=start,
                                 note="task start_date (the agent's clock when it asked to start it)"
                                 if start else None),
                    TimelineStep(step="finished", label="Finished", at=finished,
                                 note=f"{w.state}" + (f"; task instance {ti_state}" if ti_state else "")
                                 if finished else None),
                ],
            )
        )
    return TaskRemote(dag_id=dag_id, run_id=run_id, task_id=task_id, map_index=map_index, tries=tries)


# ------------------------------------------------------------------ routes


def _in_session(fn, *args):
    def run():
        with create_session() as session:
            return fn(session, *args)

    return run_in_threadpool(run)


@ui_router.get("/api/overview", response_model=Overview)
async def overview(user: Any = Depends(requires("read"))) -> Overview:
    """Agents (with health, running work, versions, sentinel report, token) and queues, for the page."""
    return await _in_session(build_overview, user)


@ui_router.get("/api/task-instance", response_model=TaskRemote)
async def task_instance(
    user: Any = Depends(ui_user),
    dag_id: str = Query(),
    run_id: str = Query(),
    task_id: str = Query(),
    map_index: int = Query(default=-1),
) -> TaskRemote:
    """Every try of one task instance that went to an agent: which agent, and its timeline."""
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity, DagDetails
    from airflow.configuration import conf

    team = None
    if conf.getboolean("core", "multi_team", fallback=False):
        from airflow.models.dag import DagModel

        team = await run_in_threadpool(DagModel.get_team_name, dag_id)
    if not get_auth_manager().is_authorized_dag(
        method="GET", access_entity=DagAccessEntity.TASK_INSTANCE, details=DagDetails(id=dag_id, team_name=team),
        user=user,
    ):
        raise HTTPException(403, f"Forbidden: {user.get_name()} lacks read access on task instances of {dag_id}")
    return await _in_session(build_task_remote, dag_id, run_id, task_id, map_index)


@ui_router.post("/api/agents/{name}/drain", response_model=AgentInfo)
async def drain(name: str, body: DrainRequest, user: Any = Depends(requires("edit"))):
    return await run_in_threadpool(_set_drained, name, True, body.reason, user.get_name())


@ui_router.post("/api/agents/{name}/resume", response_model=AgentInfo)
async def resume(name: str, user: Any = Depends(requires("edit"))):
    return await run_in_threadpool(_set_drained, name, False)


@ui_router.delete("/api/agents/{name}", status_code=204)
async def remove(name: str, force: bool = False, user: Any = Depends(requires("edit"))) -> None:
    await _in_session(lambda s: agents.remove(s, name, force=force))


@ui_router.get("/api/tokens", response_model=list[TokenInfo])
async def list_tokens(user: Any = Depends(requires("tokens_read"))) -> list[TokenInfo]:
    return await _in_session(lambda s: [tokens.to_info(t) for t in reversed(tokens.list_tokens(s))])


@ui_router.post("/api/tokens", response_model=TokenCreated, status_code=201)
async def create_token(body: TokenCreateRequest, user: Any = Depends(requires("edit"))) -> TokenCreated:
    """The clear token is in this answer only."""

    def run(session):
        clear, row = tokens.create(
            session, agent_name=body.agent_name, queues=body.queues, expires_in=body.expires_in,
            description=body.description or f"created in the UI by {user.get_name()}", bundles=body.bundles,
        )
        return TokenCreated(token=clear, info=tokens.to_info(row))

    return await _in_session(run)


@ui_router.post("/api/tokens/{token_id}/rotate", response_model=TokenCreated, status_code=201)
async def rotate_token(token_id: str, body: TokenRotateRequest, user: Any = Depends(requires("edit"))) -> TokenCreated:
    def run(session):
        clear, row = tokens.rotate(session, token_id, expires_in=body.expires_in, old_valid_for=body.old_valid_for)
        return TokenCreated(token=clear, info=tokens.to_info(row))

    return await _in_session(run)


@ui_router.delete("/api/tokens/{token_id}", response_model=TokenInfo)
async def revoke_token(token_id: str, user: Any = Depends(requires("edit"))) -> TokenInfo:
    return await _in_session(lambda s: tokens.to_info(identity.revoke(s, token_id)))


def react_apps(base_path: str) -> list[dict]:
    """The plugin's ``react_apps``: the nav page and the task instance tab. Each needs its own
    ``bundle_url``: the UI import()s a URL once and reads ``globalThis.AirflowPlugin`` after it."""
    root = f"{base_path.rstrip('/')}{config.API_PREFIX}/ui"
    bundle = f"{root}/remote-agents.js?v={bundle_digest()}"
    return [
        {
            "name": "Remote Agents",
            "bundle_url": bundle,
            "destination": "nav",
            "url_route": "remote-agents",
            "nav_top_level": True,
            "icon": f"{root}/remote-agents.svg",
            "icon_dark_mode": f"{root}/remote-agents-dark.svg",
        },
        {
            "name": "Remote execution",
            "bundle_url": f"{bundle}&view=task_instance",
            "destination": "task_instance",
            "url_route": "remote-execution",
        },
    ]
