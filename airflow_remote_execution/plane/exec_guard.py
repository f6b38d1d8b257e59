"""
Execution-API tokens handed to agents: bound to one lease, and seeing only their own task.

Airflow's execution API (``/execution`` in ``airflow api-server``) trusts any valid task token with
every Connection, Variable and XCom of the plane, and refreshes it for as long as it is used. Here a
token an agent receives is **bound**: when a work item is leased, the workload's token is re-signed
with three more claims (``rex_work``, ``rex_fence``, ``rex_token``: the work item, its fencing token
and the agent token that leased it). Airflow keeps extra claims when it refreshes a token; its
workload→execution swap on ``PATCH .../run`` does not, so the swapped token is re-bound on its way out
(here for requests through the api-server, in ``api/task_start.py`` for the plane's own start report).

:class:`ExecutionApiGuard`, a root middleware the plugin installs, then checks every ``/execution``
request that carries a bound token, before Airflow sees it:

* the lease must be live: the work item leased or running under that fence, its agent token neither
  revoked nor expired (read at most :data:`CACHE_SECONDS` ago, on every api-server), so a token stops
  working ≤ 1 s after the work finishes, is requeued or revoked, and is never refreshed past that;
* Connections and Variables of the plane are not served (a 404 that says so, which the Task SDK
  treats as "not found", so the agent's own secrets backends and defaults apply) unless
  ``[remote_execution] serve_plane_secrets_to_agents`` allows the work's queue or bundle;
* XComs are written only for the task's own task instance, and read (like DAG runs, DAG details and
  task-instance states) only of the task's own DAG, DAGs of its own bundle, or DAGs in bundles the
  agent token allows;
* per-task-instance routes (state, heartbeat, HITL, task state store, reschedules) only for its own
  task instance.

Requests with unbound tokens (other executors' workers, Airflow's own triggerer) pass unchanged.
Triggers such a request creates (an agent's task deferring) are **parked**: their ``queue`` becomes
:data:`AGENTS_ONLY_QUEUE`, whatever the agent asked, so a stock ``airflow triggerer`` on the plane never
runs them (it takes only triggers without a queue or of its ``--queues``); agent triggerers claim them by
the task's queue (``plane/triggers.py``). The same hook decides every other trigger made in the scheduler
and the api-server, deny by default (:func:`parks`): only a trigger known to be of a DAG whose bundle the
plane parses itself (its ``[dag_processor] dag_bundle_config_list``) and no live agent token names keeps
its queue; one of any other bundle, or of no DAG known when it is made, is parked. The one place that
decides parking.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING
from urllib.parse import parse_qs

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import MutableHeaders
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from airflow_remote_execution import config

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

EXECUTION_PREFIX = "/execution/"
CACHE_SECONDS = 1.0
CLAIMS = ("rex_work", "rex_fence", "rex_token")
AGENTS_ONLY_QUEUE = "remote-execution:agents-only"  # Trigger.queue of triggers agents' tasks created
_SERVING_BOUND: ContextVar[bool] = ContextVar("rex_serving_bound_token", default=False)
# The task instance an unbound token's state report names (a deferral inserts its trigger unlinked).
_SERVING_TI: ContextVar[str | None] = ContextVar("rex_serving_unbound_ti", default=None)
_TI_STATE = re.compile(r"^task-instances/([0-9a-fA-F-]{32,36})/state$")
_WRITE = {"POST", "PUT", "PATCH", "DELETE"}
TI_ROUTES = re.compile(r"^(?:task-instances|hitlDetails|task-reschedules|store/ti)/([0-9a-fA-F-]{32,36})(?:/|$)")
_DAG_ROUTES = re.compile(r"^(?:dag-runs|dags|task-instances/previous)/([^/]+)")
_DAG_QUERY_ROUTES = {"dag-runs/count", "dag-runs/previous", "task-instances/count", "task-instances/states",
                     "task-instances/breadcrumbs"}


# ------------------------------------------------------------------------------------------- binding


@cache
def _generator():
    """The scheduler's own recipe (``BaseExecutor.jwt_generator``): same key, audience and issuer."""
    from airflow.api_fastapi.auth.tokens import JWTGenerator, get_signing_args
    from airflow.configuration import conf

    return JWTGenerator(
        valid_for=conf.getint("execution_api", "jwt_expiration_time"),
        audience=conf.get_mandatory_list_value("execution_api", "jwt_audience")[0],
        issuer=conf.get("api_auth", "jwt_issuer", fallback=None),
        **get_signing_args(make_secret_key_if_needed=False),
    )


def _claims(token: str) -> dict:
    import jwt

    return jwt.decode(token, options={"verify_signature": False})


def bind(token: str, work_id: int, fence: int, agent_token_id: str) -> str:
    """``token`` (issued by the plane) re-signed with the lease's claims, expiring when it did."""
    claims = _claims(token)
    claims.update(rex_work=work_id, rex_fence=fence, rex_token=agent_token_id)
    valid_for = max(int(claims.get("exp", 0)) - int(time.time()), 1)
    for standard in ("jti", "iat", "nbf", "exp", "iss", "aud"):
        claims.pop(standard, None)
    return _generator().generate(claims, valid_for=valid_for)


def bound_claims(token: str | None) -> dict | None:
    """The lease claims of a token, or None for an unbound (or unreadable) one."""
    if not token:
        return None
    try:
        claims = _claims(token)
    except Exception:  # noqa: BLE001 - not ours to judge: Airflow answers a bad token itself
        return None
    return claims if all(c in claims for c in CLAIMS) else None


def rebind(new_token: str, bound: dict) -> str:
    """A token Airflow issued in exchange for a bound one (the workload→execution swap), bound too."""
    if bound_claims(new_token) is not None:
        return new_token
    return bind(new_token, bound["rex_work"], bound["rex_fence"], bound["rex_token"])


# ------------------------------------------------------------------------------------------- grants


@dataclass(frozen=True)
class Grant:
    """What a bound token may do now, read from the work item and the agent token behind it."""

    dead: str | None  # why the token no longer works; None while the lease is live
    ti_id: str | None = None
    dag_id: str | None = None
    run_id: str | None = None
    task_id: str | None = None
    map_index: int | None = None
    secrets: bool = False
    bundles: frozenset[str] = frozenset()


_cache: dict[tuple[int, int, str], tuple[float, Grant]] = {}


def secrets_allowed(queue: str, bundle: str | None) -> bool:
    """``serve_plane_secrets_to_agents``: False/empty (default), True/``*``, or ``queue:Q``/``bundle:B`` items."""
    value = config.get("serve_plane_secrets_to_agents").strip()
    if value.lower() in ("true", "*"):
        return True
    items = set(config.split_list(value))
    return f"queue:{queue}" in items or (bundle is not None and f"bundle:{bundle}" in items)


def load_grant(work_id: int, fence: int, token_id: str) -> Grant:
    from airflow.utils.session import create_session

    from airflow_remote_execution.models import AgentTokenModel, WorkItemModel
    from airflow_remote_execution.plane import tokens
    from airflow_remote_execution.wire.api import WorkState

    with create_session() as session:
        item = session.get(WorkItemModel, work_id)
        token = session.get(AgentTokenModel, token_id)
        if item is None or item.fence != fence or item.state not in (WorkState.LEASED.value, WorkState.RUNNING.value):
            state = "gone" if item is None else item.state if item.fence == fence else "leased again"
            return Grant(dead=f"the lease this token was issued for has ended (work item {work_id}: {state})")
        if token is None or (status := tokens.token_status(token)) != "active":
            return Grant(dead=f"the agent token that leased work item {work_id} is {status if token else 'deleted'}")
        workload = json.loads(item.workload)
        ti = workload.get("ti") or {}
        bundle = (workload.get("bundle_info") or {}).get("name")
        dag_id = ti.get("dag_id") or ((workload.get("callback") or {}).get("data") or {}).get("dag_id")
        return Grant(
            dead=None,
            ti_id=str(ti["id"]) if ti.get("id") else None,
            dag_id=dag_id,
            run_id=ti.get("run_id"),
            task_id=ti.get("task_id"),
            map_index=ti.get("map_index"),
            secrets=secrets_allowed(item.queue, bundle),
            # Its own bundle's DAGs (a team's DAGs read each other's XComs, trigger each other) and those
            # of the bundles its agent token may parse.
            bundles=frozenset({*(token.bundles or ()), *([bundle] if bundle else [])}),
        )


def _remember(store: dict, key, seconds: float, load):
    """``load()``'s value, reused for ``seconds`` (per process; the store is emptied past 10,000 keys)."""
    now = time.monotonic()
    hit = store.get(key)
    if hit is not None and now - hit[0] < seconds:
        return hit[1]
    value = load()
    if len(store) > 10_000:
        store.clear()
    store[key] = (now, value)
    return value


def grant_for(claims: dict) -> Grant:
    key = (int(claims["rex_work"]), int(claims["rex_fence"]), str(claims["rex_token"]))
    return _remember(_cache, key, CACHE_SECONDS, lambda: load_grant(*key))


_bundles_of_dags: dict[str, tuple[float, str | None]] = {}


def _dag_bundle(dag_id: str, session: Session | None = None) -> str | None:
    """The bundle a DAG was parsed from (remembered a minute: a DAG moves between bundles rarely), read with
    the caller's ``session`` if it has one (no second connection while it holds one)."""
    from sqlalchemy import select

    from airflow.models.dag import DagModel
    from airflow.utils.session import create_session

    def load() -> str | None:
        query = select(DagModel.bundle_name).where(DagModel.dag_id == dag_id)
        if session is not None:
            return session.scalar(query)
        with create_session() as own:
            return own.scalar(query)

    return _remember(_bundles_of_dags, dag_id, 60, load)


def dag_allowed(grant: Grant, dag_id: str, session: Session | None = None) -> bool:
    return dag_id == grant.dag_id or (bool(grant.bundles) and _dag_bundle(dag_id, session) in grant.bundles)


# ------------------------------------------------------------------------------------------- decisions


def refusal(
    grant: Grant, method: str, path: str, query: str, session: Session | None = None
) -> tuple[int, str] | None:
    """(status, message) to answer instead of Airflow, or None to let the request through. ``path`` is
    relative to ``/execution/``. Blocking (a DB read for another DAG's bundle, with ``session`` if given,
    else a session of its own): call in a thread."""
    if grant.dead:
        return 403, f"Execution API token refused: {grant.dead}"
    if path.startswith(("connections/", "variables/")):
        if grant.secrets:
            return None
        what = "Connections" if path.startswith("connections/") else "Variables"
        return 404, (
            f"The plane does not serve its {what} to agents' tasks: define it in the agent's secrets backend "
            "or as AIRFLOW_CONN_*/AIRFLOW_VAR_* on the agent, or allow this queue or bundle in the plane's "
            "[remote_execution] serve_plane_secrets_to_agents"
        )
    if m := TI_ROUTES.match(path):
        if m.group(1).replace("-", "") != (grant.ti_id or "").replace("-", ""):
            return 403, "This token may act only on its own task instance"
        return None
    if path.startswith("xcoms/"):
        parts = path.split("/")
        if len(parts) < 5:
            return None  # Airflow answers 404 itself
        dag_id, run_id, task_id = parts[1], parts[2], parts[3]
        if method in _WRITE:
            if (dag_id, run_id, task_id) != (grant.dag_id, grant.run_id, grant.task_id):
                return 403, "This token may write XComs only of its own task instance"
            map_index = parse_qs(query).get("map_index", [None])[0]
            if map_index is not None and grant.map_index is not None and str(map_index) != str(grant.map_index):
                return 403, "This token may write XComs only of its own task instance (map_index)"
            return None
        return None if dag_allowed(grant, dag_id, session) else (403, _other_dag(dag_id))
    if m := _DAG_ROUTES.match(path):
        dag_id = m.group(1)
        if path.split("/")[0] == "dag-runs" and dag_id in ("count", "previous"):
            dag_id = None
        if dag_id is not None:
            return None if dag_allowed(grant, dag_id, session) else (403, _other_dag(dag_id))
    if path.rstrip("/") in _DAG_QUERY_ROUTES:
        for dag_id in parse_qs(query).get("dag_id", []):
            if not dag_allowed(grant, dag_id, session):
                return 403, _other_dag(dag_id)
    return None


def _other_dag(dag_id: str) -> str:
    return (
        f"This token may read only its own DAG and DAGs in bundles its agent token allows; DAG {dag_id!r} "
        "is neither (create the agent token with --bundles naming that DAG's bundle if it should)"
    )


# ------------------------------------------------------------------------------------------- middleware


@cache
def plane_bundles() -> frozenset[str]:
    """The bundles the plane itself parses: ``[dag_processor] dag_bundle_config_list`` as Airflow's
    ``DagBundlesManager`` reads it here (example bundles included with ``load_examples``). Read once per
    process: it comes from config, and the scheduler's every flush may ask. A list Airflow cannot read
    counts as no bundles (every trigger parked), never as all of them."""
    from airflow.dag_processing.bundles.manager import DagBundlesManager

    try:
        return frozenset(DagBundlesManager().get_all_bundle_names())
    except Exception:  # noqa: BLE001 - deny by default: the plane parses nothing we could trust
        import logging

        logging.getLogger(__name__).exception("Cannot read [dag_processor] dag_bundle_config_list: "
                                              "every trigger made on the plane is parked for agents")
        return frozenset()


def parks(bundle: str | None, session: Session) -> bool:
    """Whether a trigger of a DAG in ``bundle`` is parked (agents only): unless the plane parses that bundle
    itself and no live agent token may parse it. Deny by default: an unknown bundle, one only agents have
    (whether or not a token names it yet) and one both have are all agents'. The token list is read (at
    most once a second) only for a bundle the plane parses."""
    if bundle is None or bundle not in plane_bundles():
        return True
    from airflow_remote_execution.plane.tokens import bundles_parsed_by_agents

    return bundle in bundles_parsed_by_agents(session)


_PENDING = "remote_execution.pending_triggers"  # Session.info: (Trigger, asked queue) parked in this flush
_UNDECIDED = "remote_execution.undecided_triggers"  # Session.info: trigger id → queue Airflow asked for


def _park_agents_triggers(session, _flush_context, _instances) -> None:
    """``before_flush``: a new Trigger gets :data:`AGENTS_ONLY_QUEUE` (no plane triggerer runs it) unless it
    is known to be of a DAG the plane's own triggerers may run (:func:`parks`). Made while a bound token's
    request is served (a task deferring) or an agent's parsing result is stored (asset watchers of its
    DAGs): always parked. Otherwise by its DAG's bundle: a deadline callback's ``bundle_name``; the task
    instance an unbound token's deferral names (:data:`_SERVING_TI`); or, for a trigger made before anything
    links it (``TaskInstance.defer_task`` flushes a ``start_from_trigger`` trigger alone, then sets the task
    instance's ``trigger_id`` in a later flush of the same transaction), parked now and decided in the
    flush that links it, where a plane bundle's trigger gets its queue back."""
    from airflow.models.trigger import Trigger

    new = [obj for obj in session.new if isinstance(obj, Trigger) and obj.queue != AGENTS_ONLY_QUEUE]
    if _SERVING_BOUND.get():
        for trigger in new:
            trigger.queue = AGENTS_ONLY_QUEUE
        return
    linked = _newly_linked_triggers(session)
    if not new and not linked:
        return
    with session.no_autoflush:
        ti_bundle: list[str | None] = []  # looked up once, for the unbound deferral being served
        for trigger in new:
            if trigger.callback is not None:
                bundle = getattr(trigger.callback, "bundle_name", None)
            elif (ti_id := _SERVING_TI.get()) is not None:
                if not ti_bundle:
                    ti_bundle.append(_ti_bundle(session, ti_id))
                bundle = ti_bundle[0]
            else:
                session.info.setdefault(_PENDING, []).append((trigger, trigger.queue))
                trigger.queue = AGENTS_ONLY_QUEUE
                continue
            if parks(bundle, session):
                trigger.queue = AGENTS_ONLY_QUEUE
        if linked:
            _decide_linked(session, linked)


def _decide_linked(session, linked: dict[int, str]) -> None:
    """Triggers just linked to task instances: parked unless their DAG's bundle is the plane's alone; one
    parked earlier in this session only for want of a DAG gets back the queue Airflow asked for."""
    from sqlalchemy import select

    from airflow.models.dag import DagModel
    from airflow.models.trigger import Trigger

    bundles = dict(session.execute(
        select(DagModel.dag_id, DagModel.bundle_name).where(DagModel.dag_id.in_(set(linked.values())))
    ).all())
    undecided = session.info.get(_UNDECIDED, {})
    for trigger_id, dag_id in linked.items():
        trigger = session.get(Trigger, trigger_id)
        if trigger is None:
            continue
        if parks(bundles.get(dag_id), session):
            trigger.queue = AGENTS_ONLY_QUEUE
        elif trigger.queue == AGENTS_ONLY_QUEUE and trigger_id in undecided:
            trigger.queue = undecided.pop(trigger_id)


def _remember_undecided(session, _flush_context) -> None:
    """``after_flush``: key the triggers parked for want of a DAG by the ids the flush gave them (the
    instances may be gone by the flush that links them). Bounded: emptied past 10,000."""
    pending = session.info.pop(_PENDING, None)
    if not pending:
        return
    undecided = session.info.setdefault(_UNDECIDED, {})
    if len(undecided) > 10_000:
        undecided.clear()
    for trigger, asked in pending:
        if trigger.id is not None:
            undecided[trigger.id] = asked


def _ti_bundle(session, ti_id: str) -> str | None:
    from uuid import UUID

    from sqlalchemy import select

    from airflow.models.dag import DagModel
    from airflow.models.taskinstance import TaskInstance

    return session.scalar(
        select(DagModel.bundle_name).join(TaskInstance, TaskInstance.dag_id == DagModel.dag_id)
        .where(TaskInstance.id == UUID(ti_id))
    )


def _newly_linked_triggers(session) -> dict[int, str]:
    """Trigger id → DAG id of the task instances in this flush whose ``trigger_id`` was set (ORM changes only:
    the execution API's deferral is a Core UPDATE, and its triggers are parked by :data:`_SERVING_BOUND`)."""
    from sqlalchemy.orm.attributes import instance_state

    from airflow.models.taskinstance import TaskInstance

    # Read from the instances' state, never loading an attribute: an expired task instance costs no query.
    linked: dict[int, str] = {}
    for obj in session.new:
        if isinstance(obj, TaskInstance) and (trigger_id := instance_state(obj).dict.get("trigger_id")) is not None:
            linked[trigger_id] = obj.dag_id
    for obj in session.dirty:
        if isinstance(obj, TaskInstance) and "trigger_id" in (state := instance_state(obj)).committed_state:
            trigger_id = state.dict.get("trigger_id")
            if trigger_id is not None and trigger_id != state.committed_state["trigger_id"]:
                linked[trigger_id] = obj.dag_id
    return linked


@contextmanager
def on_agents_behalf() -> Iterator[None]:
    """Triggers created inside are agents' (see :func:`_park_agents_triggers`)."""
    park_agents_triggers()
    marker = _SERVING_BOUND.set(True)
    try:
        yield
    finally:
        _SERVING_BOUND.reset(marker)


def park_agents_triggers() -> None:
    """Install :func:`_park_agents_triggers` on every Session of this process (idempotent)."""
    from sqlalchemy import event
    from sqlalchemy.orm import Session

    if not event.contains(Session, "before_flush", _park_agents_triggers):
        event.listen(Session, "before_flush", _park_agents_triggers)
    if not event.contains(Session, "after_flush", _remember_undecided):
        event.listen(Session, "after_flush", _remember_undecided)


def _bearer(scope: Scope) -> str | None:
    for name, value in scope.get("headers") or ():
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
    return None


class ExecutionApiGuard:
    """Root ASGI middleware for ``/execution``: see the module docstring."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        park_agents_triggers()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):]  # an api-server under a sub-path ([api] base_url)
        claims = bound_claims(_bearer(scope)) if path.startswith(EXECUTION_PREFIX) else None
        if claims is None:
            ti = _TI_STATE.match(path[len(EXECUTION_PREFIX):]) if scope.get("method") == "PATCH" else None
            marker = _SERVING_TI.set(ti.group(1) if ti and path.startswith(EXECUTION_PREFIX) else None)
            try:
                await self.app(scope, receive, send)
            finally:
                _SERVING_TI.reset(marker)
            return
        relative = path[len(EXECUTION_PREFIX):]
        query = scope.get("query_string", b"").decode("latin-1")
        try:
            answer = await run_in_threadpool(
                lambda: refusal(grant_for(claims), scope["method"], relative, query)
            )
        except (KeyError, TypeError, ValueError):
            answer = (403, "Execution API token refused: malformed lease claims")
        if answer is not None:
            status, message = answer
            await JSONResponse({"detail": {"reason": "remote_execution", "message": message}}, status)(
                scope, receive, send
            )
            return

        async def send_rebound(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                if fresh := headers.get("refreshed-api-token"):
                    headers["refreshed-api-token"] = rebind(fresh, claims)
            await send(message)

        with on_agents_behalf():
            await self.app(scope, receive, send_rebound)
