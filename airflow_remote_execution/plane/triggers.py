"""
Triggers of deferred remote tasks, run by agent triggerers (plane side).

Ownership is Airflow's own: each agent triggerer is a ``TriggererJob`` row kept alive by the
triggerer's syncs, and ``trigger.triggerer_id`` points at it. So the stock triggerer (if one runs on
the plane) treats those triggers as taken, exactly as it does another triggerer's, and takes over
only triggers whose triggerer went silent. ``remote_agent_triggerer`` says which agent owns which Job.

An agent claims only triggers of DEFERRED task instances that ran on RemoteExecutor, in one of its
queues (``trigger.queue`` when ``[triggerer] queues_enabled`` set it, else the task's queue), up to
its capacity. Claims are conditional updates (``triggerer_id`` still free or dead), with
``FOR UPDATE SKIP LOCKED`` on PostgreSQL so api-servers racing for the same rows do not block.
Events and failures go through Airflow's ``Trigger.submit_event``/``submit_failure``, so a task
resumes exactly as with the stock triggerer.

Triggers that agents' tasks create (through an execution-API token bound to a lease) are **parked** by
``exec_guard``: their ``queue`` is set to :data:`AGENTS_ONLY_QUEUE` as they are inserted, so a stock ``airflow triggerer`` on the
plane (which takes only triggers without a queue, or of the queues given with ``--queues``) never imports
their class paths; agent triggerers claim parked triggers by the task's queue, never by a queue the agent
wrote.

A running trigger's requests to its supervisor (task-instance and DAG-run counts and states, previous task
instances, XCom reads, HITL details, asset state store reads) reach the plane through
``/v1/triggerers/{id}/execution/...``: :func:`execution_refusal` scopes them as ``exec_guard`` scopes a
task's (DAGs of the triggerer's own triggers, their bundles, the token's bundles), read-only except a HITL
answer to its own trigger's task, then Airflow's in-process execution API (the stock triggerer's) serves them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from urllib.parse import parse_qs
from functools import cache
from types import SimpleNamespace
from typing import Any

from sqlalchemy import and_, delete, func, or_, select, update
from sqlalchemy.orm import Session

from airflow.configuration import conf
from airflow.jobs.job import Job, JobState
from airflow.models.taskinstance import TaskInstance
from airflow.models.trigger import Trigger
from airflow.sdk import timezone
from airflow.utils.state import TaskInstanceState

from airflow_remote_execution.plane import exec_guard
from airflow_remote_execution.plane.agents import AgentForbidden
from airflow_remote_execution.plane.exec_guard import AGENTS_ONLY_QUEUE
from airflow_remote_execution.plane.leases import LeaseConflict
from airflow_remote_execution.models import AgentModel, AgentTokenModel
from airflow_remote_execution.models.tables import AgentTriggererModel
from airflow_remote_execution.wire.api import AgentState
from airflow_remote_execution.wire.triggers import (
    TriggererRegisterRequest,
    TriggerSyncRequest,
    TriggerSyncResponse,
    TriggerWork,
)

JOB_TYPE = "TriggererJob"  # what Trigger.assign_unassigned counts as a live triggerer
SYNC_INTERVAL = 1.0  # seconds between an agent triggerer's syncs (the stock triggerer polls every second)
_CLEAN_EVERY = 60.0
_last_clean = 0.0


class TriggererRetired(LeaseConflict):
    """409: this triggerer's Job was ended (agent lost, stopped) or is another agent's: register again."""


class TriggerNotOwned(LeaseConflict):
    """409: the trigger is not (or no longer) this triggerer's: drop its event, cancel it."""


def health_threshold() -> float:
    return conf.getfloat("triggerer", "triggerer_health_check_threshold")


def _alive_job_ids(now: datetime):
    return select(Job.id).where(
        Job.end_date.is_(None),
        Job.latest_heartbeat > now - timedelta(seconds=health_threshold()),
        Job.job_type == JOB_TYPE,
    )


@cache
def remote_executor_names() -> tuple[frozenset[str], bool]:
    """How task instances name RemoteExecutor (``ti.executor``), and whether it is the default (None)."""
    from airflow.executors.executor_loader import ExecutorLoader

    names: set[str] = set()
    default = False
    for i, name in enumerate(ExecutorLoader.get_executor_names(validate_teams=False)):
        if name.module_path.rsplit(".", 1)[-1] == "RemoteExecutor":
            names.update(n for n in (name.alias, name.module_path, "RemoteExecutor") if n)
            default = default or i == 0
    return frozenset(names), default


def _runs_remotely():
    names, default = remote_executor_names()
    clause = TaskInstance.executor.in_(names)
    return or_(clause, TaskInstance.executor.is_(None)) if default else clause


def _in_queues(queues: list[str]):
    """Parked triggers and those without a queue go by the task's queue (the plane's); others by their own."""
    by_task = or_(Trigger.queue.is_(None), Trigger.queue == AGENTS_ONLY_QUEUE)
    return or_(and_(~by_task, Trigger.queue.in_(queues)), and_(by_task, TaskInstance.queue.in_(queues)))


# ------------------------------------------------------------------ triggerer lifecycle


def register(session: Session, token: AgentTokenModel, req: TriggererRegisterRequest) -> AgentTriggererModel:
    """A new TriggererJob for the token's agent; its triggers start empty (a restart claims afresh)."""
    allowed = list(token.queues)
    queues = sorted(set(req.queues)) if req.queues else sorted(allowed)
    outside = sorted(set(queues) - set(allowed))
    if outside:
        raise AgentForbidden(
            f"Queue(s) {', '.join(outside)} are outside token {token.id}'s queues ({', '.join(allowed)}); "
            "drop them from the triggerer's --queues or create a token with them"
        )
    job = Job(job_type=JOB_TYPE, state=JobState.RUNNING)
    job.hostname = f"{token.agent_name}@{req.hostname}" if req.hostname else token.agent_name
    session.add(job)
    session.flush()
    row = AgentTriggererModel(
        job_id=job.id,
        agent_name=token.agent_name,
        queues=queues,
        capacity=req.capacity,
        hostname=req.hostname or None,
        registered_at=timezone.utcnow(),
    )
    session.add(row)
    session.flush()
    return row


def for_agent(session: Session, token: AgentTokenModel, triggerer_id: int) -> AgentTriggererModel:
    row = session.get(AgentTriggererModel, triggerer_id)
    if row is None or row.agent_name != token.agent_name:
        raise TriggererRetired(
            f"Triggerer {triggerer_id} is not a live triggerer of agent {token.agent_name!r} "
            "(retired after the agent was lost or stopped): register again"
        )
    return row


def _release(session: Session, job_ids: list[int], state: str) -> int:
    if not job_ids:
        return 0
    freed = session.execute(
        update(Trigger)
        .where(Trigger.triggerer_id.in_(job_ids))
        .values(triggerer_id=None)
        .execution_options(synchronize_session=False)
    ).rowcount
    session.execute(
        update(Job)
        .where(Job.id.in_(job_ids), Job.end_date.is_(None))
        .values(state=state, end_date=timezone.utcnow())
        .execution_options(synchronize_session=False)
    )
    session.execute(delete(AgentTriggererModel).where(AgentTriggererModel.job_id.in_(job_ids)))
    return freed


def stop(session: Session, row: AgentTriggererModel) -> int:
    """A triggerer shutting down hands its triggers back at once; returns how many."""
    return _release(session, [row.job_id], JobState.SUCCESS)


def release_agent(session: Session, agent_name: str) -> int:
    """Free the triggers of a lost agent's triggerers at once (not after the health threshold)."""
    ids = list(session.scalars(select(AgentTriggererModel.job_id).where(AgentTriggererModel.agent_name == agent_name)))
    return _release(session, ids, JobState.FAILED)


# ------------------------------------------------------------------ sync: heartbeat, claim, hand out


def _heartbeat(session: Session, row: AgentTriggererModel, now: datetime) -> None:
    alive = session.execute(
        update(Job)
        .where(Job.id == row.job_id, Job.end_date.is_(None))
        .values(latest_heartbeat=now)
        .execution_options(synchronize_session=False)
    ).rowcount
    if not alive:
        raise TriggererRetired(f"Triggerer {row.job_id}'s Job has ended: register again")


def owned_ids(session: Session, job_id: int) -> list[int]:
    """Triggers of this triggerer that something still waits on: a DEFERRED task, an asset's watcher, a
    callback (the stock runner skips the others too; Airflow's clean_unused deletes them)."""
    query = select(Trigger.id).where(
        Trigger.triggerer_id == job_id,
        or_(
            Trigger.task_instance.has(TaskInstance.state == TaskInstanceState.DEFERRED),
            Trigger.asset_watchers.any(),
            Trigger.callback.has(),
        ),
    )
    return sorted(set(session.scalars(query)))


def _of_bundles(bundles: list[str]):
    """Asset-watcher triggers of assets that DAGs of ``bundles`` are scheduled on, and deadline-callback
    triggers of DAGs of ``bundles``."""
    from airflow.models.asset import AssetWatcherModel, DagScheduleAssetReference
    from airflow.models.callback import Callback
    from airflow.models.dag import DagModel

    scheduled = (
        select(DagScheduleAssetReference.asset_id)
        .join(DagModel, DagModel.dag_id == DagScheduleAssetReference.dag_id)
        .where(DagModel.bundle_name.in_(bundles))
    )
    return or_(
        Trigger.asset_watchers.any(AssetWatcherModel.asset_id.in_(scheduled)),
        Trigger.callback.has(Callback.bundle_name.in_(bundles)),
    )


def claim(
    session: Session,
    row: AgentTriggererModel,
    room: int,
    now: datetime,
    not_bundles: list[str] | None = None,
    bundles: list[str] | None = None,
) -> list[int]:
    """Take up to ``room`` free triggers: of deferred tasks in the triggerer's queues, leaving those of DAGs in
    ``not_bundles`` (bundles agents parse that the triggerer's token does not allow); then asset-watcher and
    deadline-callback triggers of the token's ``bundles``, which are parked as they are taken (a stock
    triggerer never takes them back). Returns the ids taken."""
    if room <= 0:
        return []
    alive = _alive_job_ids(now)
    free = or_(Trigger.triggerer_id.is_(None), Trigger.triggerer_id.not_in(alive))
    query = (
        select(Trigger.id)
        .join(TaskInstance, TaskInstance.trigger_id == Trigger.id)
        .where(TaskInstance.state == TaskInstanceState.DEFERRED, free, _in_queues(list(row.queues)), _runs_remotely())
        .order_by(func.coalesce(TaskInstance.priority_weight, 0).desc(), Trigger.created_date, Trigger.id)
        .limit(room)
    )
    if not_bundles:
        from airflow.models.dag import DagModel

        query = query.where(~TaskInstance.dag_id.in_(select(DagModel.dag_id).where(DagModel.bundle_name.in_(not_bundles))))
    taken = _take(session, query, free, row.job_id, {})
    if bundles and len(taken) < room:
        query = (
            select(Trigger.id)
            .where(free, ~Trigger.task_instance.has(), or_(Trigger.queue.is_(None), Trigger.queue == AGENTS_ONLY_QUEUE),
                   _of_bundles(list(bundles)))
            .order_by(Trigger.created_date, Trigger.id)
            .limit(room - len(taken))
        )
        taken += _take(session, query, free, row.job_id, {"queue": AGENTS_ONLY_QUEUE})
    return taken


def _take(session: Session, query, free, job_id: int, values: dict) -> list[int]:
    """Assign the triggers ``query`` selects to ``job_id`` if still ``free``; returns those it got."""
    if session.get_bind().dialect.name == "postgresql":
        query = query.with_for_update(of=Trigger, skip_locked=True)
    ids = list(session.scalars(query))
    if not ids:
        return []
    session.execute(
        update(Trigger)
        .where(Trigger.id.in_(ids), free)  # still free: another api-server may have won meanwhile
        .values(triggerer_id=job_id, **values)
        .execution_options(synchronize_session=False)
    )
    return list(session.scalars(select(Trigger.id).where(Trigger.id.in_(ids), Trigger.triggerer_id == job_id)))


def sync(
    session: Session,
    row: AgentTriggererModel,
    req: TriggerSyncRequest,
    not_bundles: list[str] | None = None,
    bundles: list[str] | None = None,
) -> TriggerSyncResponse:
    """Heartbeat the triggerer's Job, claim up to its capacity (tasks' triggers not of ``not_bundles``' DAGs;
    asset-watcher and deadline-callback triggers of ``bundles``), and hand out what it must start."""
    now = timezone.utcnow()
    _heartbeat(session, row, now)
    owned = owned_ids(session, row.job_id)
    if _accepts_triggers(session, row.agent_name):
        claim(session, row, min(req.capacity, row.capacity) - len(owned), now, not_bundles, bundles)
        owned = owned_ids(session, row.job_id)
    running = set(req.running)
    start = _workloads(session, row.job_id, [i for i in owned if i not in running])
    _maybe_clean_unused(session)
    return TriggerSyncResponse(assigned=owned, start=start)


def _accepts_triggers(session: Session, agent_name: str) -> bool:
    """A drained, stopping or lost agent takes no new triggers (it keeps those it runs)."""
    agent = session.scalar(select(AgentModel).where(AgentModel.name == agent_name))
    return agent is None or (agent.state == AgentState.ACTIVE.value and not agent.drained)


def _plain_kwargs(encrypted: str) -> str:
    """The serialized kwargs as JSON. Task SDK deferrals store them unencrypted; others are fernet-encrypted."""
    if encrypted.startswith("{"):
        return encrypted
    from airflow.models.crypto import get_fernet

    return get_fernet().decrypt(encrypted.encode("utf-8")).decode("utf-8")


def _workloads(session: Session, job_id: int, trigger_ids: list[int]) -> list[TriggerWork]:
    """Airflow's own RunTrigger workloads (start_from_trigger included), built as the stock triggerer does."""
    if not trigger_ids:
        return []
    from airflow.jobs.triggerer_job_runner import TriggerRunnerSupervisor
    from airflow.models.dagbag import DBDagBag
    from airflow.utils.helpers import log_filename_template_renderer

    dag_bag = DBDagBag()
    render = log_filename_template_renderer()
    # _create_workload reads only job.id, id and logger_cache of the supervisor: give it just those.
    builder = SimpleNamespace(job=SimpleNamespace(id=job_id), id=job_id, logger_cache={})
    out: list[TriggerWork] = []
    for trigger in Trigger.bulk_fetch(trigger_ids, session=session).values():
        workload = TriggerRunnerSupervisor._create_workload(builder, trigger, dag_bag, render, session)
        if workload is None:
            continue
        workload.encrypted_kwargs = _plain_kwargs(trigger.encrypted_kwargs)
        factory = builder.logger_cache.pop(trigger.id, None)
        out.append(TriggerWork(workload=workload.model_dump(mode="json"), log_path=factory and factory.log_path))
    return out


def _maybe_clean_unused(session: Session) -> None:
    """Delete triggers nothing waits on any more: the stock triggerer's chore, needed when none runs."""
    global _last_clean
    if time.monotonic() - _last_clean < _CLEAN_EVERY:
        return
    _last_clean = time.monotonic()
    Trigger.clean_unused(session=session)


# ------------------------------------------------------------------ events and failures


def _owned_by(session: Session, row: AgentTriggererModel, trigger_id: int) -> None:
    owner = session.scalar(select(Trigger.triggerer_id).where(Trigger.id == trigger_id))
    if owner != row.job_id:
        raise TriggerNotOwned(
            f"Trigger {trigger_id} is not triggerer {row.job_id}'s (reassigned or gone): drop it"
        )


def decode_event(data: dict[str, Any]):
    """The agent's wire form back to Airflow's TriggerEvent / TaskSuccessEvent / ... ."""
    from pydantic import TypeAdapter

    from airflow.sdk.serde import deserialize
    from airflow.triggers.base import DiscrimatedTriggerEvent, TriggerEvent

    if "task_instance_state" in data:
        return TypeAdapter(DiscrimatedTriggerEvent).validate_python(data)
    if set(data) != {"payload"}:
        raise ValueError("event must be {'payload': ...} or {'task_instance_state': ..., 'xcoms': ...}")
    try:
        return TriggerEvent(deserialize(data["payload"]))
    except Exception as e:  # serde raises ImportError, TypeError, KeyError... for what it will not decode
        raise ValueError(f"Event payload cannot be decoded on the plane: {type(e).__name__}: {e}") from None


def submit_event(session: Session, row: AgentTriggererModel, trigger_id: int, data: dict[str, Any]) -> None:
    """Resume the trigger's task with the event. Ownership first (409), then decoding: decoding imports the
    classes the payload names, which only the trigger's own triggerer may make the plane do."""
    _owned_by(session, row, trigger_id)
    event = decode_event(data)
    Trigger.submit_event(trigger_id=trigger_id, event=event, session=session)


def submit_failure(session: Session, row: AgentTriggererModel, trigger_id: int, traceback: list[str] | None) -> None:
    _owned_by(session, row, trigger_id)
    Trigger.submit_failure(trigger_id=trigger_id, exc=traceback, session=session)


# ------------------------------------------------------------------ requests of running triggers

_READ_ONLY = (
    "Agent triggerers have read-only access to the plane (task-instance and DAG-run counts and states, "
    "previous task instances, XComs, asset state store); they write only a HITL answer to their own "
    "triggers' tasks and the state store of assets their triggers watch. Connections and Variables come "
    "from the agent's secrets backends"
)


@dataclass(frozen=True)
class _Scope:
    """What a triggerer's own triggers give it: their task instances (ids without dashes), the bundles of
    their DAGs (tasks' and deadline callbacks'), and the assets they watch."""

    tis: frozenset[str]
    bundles: frozenset[str]
    asset_names: frozenset[str]
    asset_uris: frozenset[str]


_scopes: dict[int, tuple[float, _Scope]] = {}
SCOPE_SECONDS = 1.0  # a triggerer's scope is reused this long for what it allows (a refusal is re-checked)


def _load_scope(session: Session, job_id: int) -> _Scope:
    from airflow.models.asset import AssetModel, AssetWatcherModel
    from airflow.models.callback import Callback
    from airflow.models.dag import DagModel

    tis = session.execute(
        select(TaskInstance.id, TaskInstance.dag_id)
        .join(Trigger, TaskInstance.trigger_id == Trigger.id)
        .where(Trigger.triggerer_id == job_id)
    ).all()
    dag_ids = {dag_id for _, dag_id in tis}
    bundles = set(session.scalars(select(DagModel.bundle_name).where(DagModel.dag_id.in_(dag_ids)))) if dag_ids else set()
    bundles |= set(session.scalars(
        select(Callback.bundle_name).join(Trigger, Trigger.id == Callback.trigger_id).where(Trigger.triggerer_id == job_id)
    ))
    assets = session.execute(
        select(AssetModel.name, AssetModel.uri)
        .join(AssetWatcherModel, AssetWatcherModel.asset_id == AssetModel.id)
        .join(Trigger, Trigger.id == AssetWatcherModel.trigger_id)
        .where(Trigger.triggerer_id == job_id)
    ).all()
    return _Scope(
        tis=frozenset(str(ti_id).replace("-", "") for ti_id, _ in tis),
        bundles=frozenset(bundles - {None}),
        asset_names=frozenset(name for name, _ in assets),
        asset_uris=frozenset(uri for _, uri in assets),
    )


def _unsafe_path(path: str) -> str | None:
    """Why ``path`` (percent-decoded) cannot be forwarded as is, or None. It is sent on as a URL path, so
    nothing in it may start a query or fragment, escape again, or be normalised away (``..``), which would
    make Airflow serve another route than the one decided on."""
    if any(c in path for c in "?#%\\") or any(ord(c) < 0x20 or ord(c) == 0x7F for c in path):
        return "it contains '?', '#', '%', a backslash or a control character"
    if any(part in ("", ".", "..") for part in path.split("/")):
        return "empty, '.' or '..' path segments"
    return None


def execution_refusal(
    session: Session, token: AgentTokenModel, row: AgentTriggererModel, method: str, path: str, query: str
) -> tuple[int, str] | None:
    """(status, message) refusing a running trigger's execution-API request, or None to serve it. ``path``
    is relative to the execution API. The DAGs it may read are exec_guard's rule for a task: those of its
    own triggers (tasks, deadline callbacks), of their bundles, and of the bundles its agent token allows.
    Writes: a HITL answer to its own trigger's task, the state store of assets its own triggers watch.
    The triggerer's scope is reused for :data:`SCOPE_SECONDS`; a refusal is decided again on fresh data
    (a trigger claimed a moment ago asks at once)."""
    if bad := _unsafe_path(path):
        return 400, f"Execution API path refused: {bad}"
    token_bundles = frozenset(token.bundles or ())
    scope = exec_guard._remember(_scopes, row.job_id, SCOPE_SECONDS, lambda: _load_scope(session, row.job_id))
    answer = _decide(session, scope, token_bundles, method, path, query)
    if answer is not None and answer[0] == 403:
        scope = _load_scope(session, row.job_id)
        _scopes[row.job_id] = (time.monotonic(), scope)
        answer = _decide(session, scope, token_bundles, method, path, query)
    return answer


def _decide(
    session: Session, scope: _Scope, token_bundles: frozenset[str], method: str, path: str, query: str
) -> tuple[int, str] | None:
    if m := exec_guard.TI_ROUTES.match(path):
        if not path.startswith("hitlDetails/") or m.group(1).replace("-", "") not in scope.tis:
            return 403, "An agent triggerer may act on a task instance only through the HITL details of its own triggers' tasks"
        return None if method in ("GET", "PATCH") else (403, _READ_ONLY)
    if path.startswith("store/asset/") and method != "GET":
        params = parse_qs(query)
        names, uris = params.get("name", []), params.get("uri", [])
        if (names or uris) and set(names) <= scope.asset_names and set(uris) <= scope.asset_uris:
            return None
        return 403, "An agent triggerer may write the state store only of assets its own triggers watch"
    if method != "GET":
        return 403, _READ_ONLY
    grant = exec_guard.Grant(dead=None, bundles=token_bundles | scope.bundles)
    return exec_guard.refusal(grant, method, path, query, session)


@cache
def _execution_api():
    """Airflow's in-process execution API, as the stock triggerer's supervisor uses it (its own auth off:
    :func:`execution_refusal` has decided)."""
    import httpx

    from airflow.api_fastapi.execution_api.app import InProcessExecutionAPI

    return httpx.Client(transport=InProcessExecutionAPI().transport, base_url="http://in-process.invalid./")


def serve_execution(method: str, path: str, query: str, body: bytes, headers: dict[str, str]):
    """Serve a trigger's (already scoped) request with Airflow's execution API; returns the httpx response."""
    url = "/" + path + (f"?{query}" if query else "")
    return _execution_api().request(method, url, content=body or None, headers=headers)
