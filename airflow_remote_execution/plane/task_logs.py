"""
Task logs of agents' tasks on the orchestration plane, read without ever connecting to an agent.

For a RUNNING (or DEFERRED) task, Airflow's ``FileTaskHandler._read`` reads the remote log *and* asks the
worker's log server at ``http://<ti.hostname>:[logging] worker_log_server_port/log/...`` (a deferred
task's: its triggerer's, on ``trigger_log_server_port``); for a finished task without a remote log it
asks that server too. Agents are outbound-only, so for tasks run by a RemoteExecutor (and triggers run
by agent triggerers) :class:`RemoteExecutionTaskHandler` never asks. Their logs come from:

* the remote log folder (``[logging] remote_logging``), where agents upload them while tasks run and
  when they end; or, with no remote logging configured,
* the **plane log store** (this module's table ``remote_task_log_chunk``): agents send each task's log
  through the Remote Execution API (``POST /v1/work/{id}/log``, :func:`store_piece`), scoped to the
  leases they hold, capped per task try (``task_log_max_size``) and kept ``task_log_retention`` seconds.
  It lives in the metadata database, so every api-server process and host reads the same logs.

The api-server uses this handler by default: the plugin's app :func:`install`\ s it on the ``task`` log
handler when that is Airflow's ``FileTaskHandler``. The same is available as a logging config::

    [logging]
    logging_config_class = airflow_remote_execution.log_handler.LOGGING_CONFIG  # this module, re-exported there

This is Airflow's default logging config with the ``task`` handler swapped for
:class:`RemoteExecutionTaskHandler`; remote logging itself (``remote_logging``,
``remote_base_log_folder``, ``remote_log_conn_id``) is configured as usual.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from datetime import timedelta
from functools import cache
from typing import TYPE_CHECKING

from airflow.config_templates.airflow_local_settings import (  # noqa: F401 - REMOTE_*: see below
    DEFAULT_LOGGING_CONFIG,
    DEFAULT_REMOTE_CONN_ID,
    REMOTE_TASK_LOG,
)
from airflow.utils.log.file_task_handler import FileTaskHandler

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from airflow.models.taskinstance import TaskInstance
    from airflow.models.taskinstancehistory import TaskInstanceHistory

    from airflow_remote_execution.models import AgentModel
    from airflow_remote_execution.wire.task_logs import LogPiece, LogPieceResponse

log = logging.getLogger(__name__)

REMOTE_EXECUTOR = "airflow_remote_execution.executors.RemoteExecutor"
HANDLER = f"{__name__}.RemoteExecutionTaskHandler"
NOT_SERVED = (
    "Not asking a log server on a Remote Execution agent: the plane never connects to agents. "
    "Logs of agents' tasks are read from the remote log folder ([logging] remote_base_log_folder) or, "
    "without remote logging, from the plane's log store ([remote_execution] plane_task_logs)."
)
LATE = timedelta(minutes=15)  # how long after its work ended an agent may still send the end of a log
PURGE_EVERY = 600.0  # seconds between two purges of old logs by one api-server process
_last_purge = float("-inf")


@cache
def _is_remote_executor(executor: str | None) -> bool:
    """Whether ``ti.executor`` (a name, alias or class path; None = the default executor) is a RemoteExecutor."""
    from airflow.executors.executor_loader import ExecutorLoader

    try:
        name = ExecutorLoader.lookup_executor_name_by_str(executor) if executor else (
            ExecutorLoader.get_default_executor_name()
        )
        cls, _ = ExecutorLoader.import_executor_cls(name)
    except Exception:  # noqa: BLE001 - an unknown executor name: not ours
        log.debug("Cannot resolve executor %r", executor, exc_info=True)
        return False
    from airflow_remote_execution.executors import RemoteExecutor

    return issubclass(cls, RemoteExecutor)


def _is_agent_triggerer(job) -> bool:
    """Whether a TriggererJob is an agent's triggerer (``triggers.register`` names it ``agent@host``)."""
    if "@" in (job.hostname or ""):
        return True
    from airflow.utils.session import create_session

    from airflow_remote_execution.models.tables import AgentTriggererModel

    with create_session() as session:
        return session.get(AgentTriggererModel, job.id) is not None


class RemoteExecutionTaskHandler(FileTaskHandler):
    """``FileTaskHandler`` that never fetches served logs from Remote Execution agents, and reads agents'
    tasks' logs from the plane log store when no remote logging is configured."""

    def _read_remote_logs(self, ti, try_number, metadata=None):
        try:
            return super()._read_remote_logs(ti, try_number, metadata)
        except NotImplementedError:  # no remote logging configured
            if not _is_remote_executor(ti.executor):
                raise
        from airflow.utils.session import create_session

        with create_session() as session:
            return read_pieces(session, ti.dag_id, ti.run_id, ti.task_id, ti.map_index, try_number)

    def _read_from_logs_server(self, ti: TaskInstance | TaskInstanceHistory, worker_log_rel_path: str):
        if job := getattr(ti, "triggerer_job", None):  # Airflow asks the triggerer for a deferred task
            on_agent = _is_agent_triggerer(job)
        else:
            on_agent = _is_remote_executor(ti.executor)
        if not on_agent:  # the stock triggerer, other executors' workers: Airflow's way
            return super()._read_from_logs_server(ti, worker_log_rel_path)
        return [NOT_SERVED], []


def install() -> bool:
    """Make the api-server read task logs with :class:`RemoteExecutionTaskHandler` (the plugin's app calls
    this), so the plane never asks an agent's log server even without ``logging_config_class``.

    Airflow's log reader uses the handler named ``[logging] task_log_reader``; if that is Airflow's own
    ``FileTaskHandler``, its class is swapped (it holds no other state); another handler class (e.g.
    Elasticsearch's) reads logs its own way and is kept. Returns whether this handler now reads logs.
    """
    from airflow.configuration import conf

    name = conf.get("logging", "task_log_reader", fallback="task")
    task_logger = logging.getLogger("airflow.task")
    handler = next((h for h in [*task_logger.handlers, *logging.getLogger().handlers] if h.name == name), None)
    if handler is None:  # Airflow's reader would fall back to a fresh FileTaskHandler: give it ours
        handler = RemoteExecutionTaskHandler(conf.get("logging", "base_log_folder"))
        handler.name = name
        handler.setLevel(logging.CRITICAL + 1)  # reads only; the api-server writes no task logs
        task_logger.addHandler(handler)
        return True
    if type(handler) is FileTaskHandler:
        handler.__class__ = RemoteExecutionTaskHandler
    if not isinstance(handler, RemoteExecutionTaskHandler):
        log.warning("Task logs are read by %s, not %s: it may ask agents' log servers", type(handler).__name__, HANDLER)
        return False
    return True


# ---------------------------------------------------------------- the plane log store


def _refuse_if_off() -> None:
    from airflow_remote_execution import config
    from airflow_remote_execution.plane.agents import AgentForbidden

    if not config.getboolean("plane_task_logs"):
        raise AgentForbidden(
            "This plane keeps no task logs ([remote_execution] plane_task_logs = False): configure remote "
            "logging on the agent, or set plane_task_logs = False on the agent to stop sending them"
        )


def store_piece(session: Session, agent: AgentModel, work_id: int, piece: LogPiece) -> LogPieceResponse:
    """Keep a piece of the log of ``agent``'s task ``work_id`` (leased with ``piece.fence``), each byte once.

    Read-only on the work item (its transitions are :mod:`.leases`'s): the agent must hold that lease,
    the task must have started and not have ended more than :data:`LATE` ago. A piece the plane already
    holds (a retry) is answered with where the log ends; a gap after the lease's first piece is a 409
    naming where to resume.
    """
    from airflow.sdk import timezone

    from airflow_remote_execution.models import WorkItemModel
    from airflow_remote_execution.plane.leases import LeaseConflict
    from airflow_remote_execution.wire.api import WorkState

    _refuse_if_off()
    item = session.get(WorkItemModel, work_id)
    if item is None:
        raise LookupError(f"No work item {work_id}")
    if item.agent_id != agent.id:
        raise LeaseConflict(f"Work item {work_id} is not leased to agent {agent.name!r}")
    if item.fence != piece.fence:
        raise LeaseConflict(f"Stale fencing token {piece.fence} for work item {work_id}: the current lease is {item.fence}")
    if item.kind != "task" or not isinstance(item.key, list) or len(item.key) != 6:
        raise ValueError(f"Work item {work_id} is a {item.kind}, not a task: it has no task log")
    if item.state in (WorkState.QUEUED.value, WorkState.LEASED.value):
        raise LeaseConflict(f"Work item {work_id} is {item.state}: its task has not started")
    now = timezone.utcnow()
    if item.finished_at is not None and now - item.finished_at > LATE:
        raise LeaseConflict(f"Work item {work_id} ended more than {LATE} ago: its log is closed")
    _, dag_id, task_id, run_id, map_index, try_number = item.key
    return _store(session, agent.name, (dag_id, run_id, task_id, map_index, try_number), "task", work_id, piece, now)


def store_trigger_piece(session: Session, agent_name: str, trigger_id: int, piece: LogPiece) -> LogPieceResponse:
    """Keep a piece of the log of trigger ``trigger_id`` that agent ``agent_name``'s triggerer ``piece.fence``
    runs (Airflow's ``<task log>.trigger.<job>.log``), shown with its task's log.

    While the trigger runs, it must be that triggerer's and belong to a task instance. Once it fired (Airflow
    unlinks or deletes it), more of its log is taken only after a first piece the plane checked so, from the
    same agent and triggerer, and not after :data:`LATE`: so the agent sends a trigger's lines at once.
    """
    from sqlalchemy import func, select

    from airflow.models.trigger import Trigger
    from airflow.sdk import timezone

    from airflow_remote_execution.models.tables import AgentTriggererModel, TaskLogChunkModel as chunk
    from airflow_remote_execution.plane.leases import LeaseConflict

    _refuse_if_off()
    now = timezone.utcnow()
    job = session.get(AgentTriggererModel, piece.fence)
    if job is None or job.agent_name != agent_name:
        raise LeaseConflict(f"Triggerer {piece.fence} is not a live triggerer of agent {agent_name!r}")
    trigger = session.get(Trigger, trigger_id)
    ti = trigger.task_instance if trigger is not None and trigger.triggerer_id == piece.fence else None
    if ti is not None:
        key = (ti.dag_id, ti.run_id, ti.task_id, ti.map_index, ti.try_number)
    else:  # fired meanwhile: the task instance its first piece was checked for
        first = session.execute(
            select(chunk.dag_id, chunk.run_id, chunk.task_id, chunk.map_index, chunk.try_number, func.min(chunk.created_at))
            .where(chunk.source == "trigger", chunk.work_id == trigger_id, chunk.fence == piece.fence,
                   chunk.agent_name == agent_name)
            .group_by(chunk.dag_id, chunk.run_id, chunk.task_id, chunk.map_index, chunk.try_number)
        ).first()
        if first is None or now - first[5] > LATE:
            if trigger is not None and trigger.triggerer_id == piece.fence:
                raise ValueError(f"Trigger {trigger_id} belongs to no task instance: it has no task log")
            raise LeaseConflict(f"Trigger {trigger_id} is not run by triggerer {piece.fence} of agent {agent_name!r}")
        key = tuple(first[:5])
    return _store(session, agent_name, key, "trigger", trigger_id, piece, now)


def _store(
    session: Session, agent_name: str, try_key: tuple, source: str, log_id: int, piece: LogPiece, now
) -> LogPieceResponse:
    """Keep ``piece`` of log ``(source, log_id, piece.fence)`` of the task try ``try_key``, each byte once, within
    the try's cap."""
    from sqlalchemy import func, select
    from sqlalchemy.exc import IntegrityError

    from airflow_remote_execution import config
    from airflow_remote_execution.models.tables import TaskLogChunkModel as chunk
    from airflow_remote_execution.plane.leases import LeaseConflict
    from airflow_remote_execution.wire.task_logs import LogPieceResponse

    _purge_now_and_then(session, now)
    dag_id, run_id, task_id, map_index, try_number = try_key
    this_try = (chunk.dag_id == dag_id, chunk.run_id == run_id, chunk.task_id == task_id,
                chunk.map_index == map_index, chunk.try_number == try_number)
    stored, total = session.execute(
        select(
            select(func.max(chunk.start + chunk.size))
            .where(*this_try, chunk.source == source, chunk.work_id == log_id, chunk.fence == piece.fence)
            .scalar_subquery(),
            select(func.sum(chunk.size)).where(*this_try).scalar_subquery(),
        )
    ).one()
    # A lease's first piece may start anywhere: the agent's file can hold the lines of the same task try's
    # earlier leases (before a deferral), which those leases sent.
    stored, total = piece.start if stored is None else stored, total or 0
    cap = config.getint("task_log_max_size")
    if total >= cap:  # the rest is dropped: the agent moves on
        return LogPieceResponse(stored_until=max(stored, piece.end), truncated=True)
    if piece.end <= stored:  # a retry of what is here
        return LogPieceResponse(stored_until=stored)
    if piece.start > stored:
        raise LeaseConflict(
            f"The plane holds this log ({source} {log_id}) up to byte {stored}: send it from there, not from "
            f"byte {piece.start}"
        )
    data = piece.text.encode("utf-8")[stored - piece.start:]  # a retry that overlaps: only what is new
    truncated = len(data) > cap - total
    if truncated:
        data = data[: data.rfind(b"\n", 0, cap - total) + 1] + _truncation_line(cap, now)
    row = chunk(
        dag_id=dag_id, run_id=run_id, task_id=task_id, map_index=map_index, try_number=try_number, source=source,
        work_id=log_id, fence=piece.fence, start=stored, size=piece.end - stored,
        text=data.decode("utf-8", errors="replace"), agent_name=agent_name, created_at=now,
    )
    try:
        with session.begin_nested():
            session.add(row)
    except IntegrityError:  # another api-server stored this piece meanwhile (a retry raced its original)
        return LogPieceResponse(stored_until=piece.end)
    return LogPieceResponse(stored_until=piece.end, truncated=truncated)


def _truncation_line(cap: int, now) -> bytes:
    """A log line (as the Task SDK writes them: JSON) saying the rest of the log was dropped."""
    return json.dumps({
        "timestamp": now.isoformat(), "level": "warning", "logger": "airflow_remote_execution",
        "event": f"The rest of this log was dropped: the plane keeps at most {cap} bytes of a task's log "
                 "([remote_execution] task_log_max_size)",
    }).encode() + b"\n"


def read_pieces(
    session: Session, dag_id: str, run_id: str, task_id: str, map_index: int, try_number: int
) -> tuple[list[str], list[str]]:
    """A task try's log from the plane log store: (where it came from, [the log text]), both empty if none.

    Each lease's part and each trigger's log in the order they began (before a deferral, the trigger,
    after it); Airflow's reader then orders the lines by their timestamps."""
    from sqlalchemy import select

    from airflow_remote_execution.models.tables import TaskLogChunkModel as chunk

    rows = session.execute(
        select(chunk.source, chunk.work_id, chunk.fence, chunk.agent_name, chunk.text)
        .where(chunk.dag_id == dag_id, chunk.run_id == run_id, chunk.task_id == task_id,
               chunk.map_index == map_index, chunk.try_number == try_number)
        .order_by(chunk.id)
    ).all()
    if not rows:
        return [], []
    parts: dict[tuple, list[str]] = {}  # first piece first: ids grow with time
    agents: list[str] = []
    for source, log_id, fence, agent_name, text in rows:
        parts.setdefault((source, log_id, fence), []).append(text)
        if agent_name not in agents:
            agents.append(agent_name)
    triggers = sum(1 for source, _, _ in parts if source == "trigger")
    source = f"The plane's log store (sent by agent {', '.join(agents)}"
    source += f"; with the log of {triggers} trigger(s))" if triggers else ")"
    texts = ["".join(p).rstrip("\n") for p in parts.values()]
    return [source], ["\n".join(t for t in texts if t) + "\n"]


def purge_pieces(session: Session, older_than: timedelta) -> int:
    """Delete stored task-log pieces older than ``older_than``; returns how many."""
    from sqlalchemy import delete

    from airflow.sdk import timezone

    from airflow_remote_execution.models.tables import TaskLogChunkModel as chunk

    cutoff = timezone.utcnow() - older_than
    return session.execute(
        delete(chunk).where(chunk.created_at < cutoff).execution_options(synchronize_session=False)
    ).rowcount


def _purge_now_and_then(session: Session, now) -> None:
    """Purge at most every :data:`PURGE_EVERY` seconds per api-server process (each process may: a
    DELETE of nothing is cheap on the indexed ``created_at``)."""
    global _last_purge
    from airflow_remote_execution import config

    if time.monotonic() - _last_purge < PURGE_EVERY:
        return
    _last_purge = time.monotonic()
    if deleted := purge_pieces(session, timedelta(seconds=config.getint("task_log_retention"))):
        log.info("Deleted %d task-log pieces older than task_log_retention", deleted)


def _logging_config() -> dict:
    config = copy.deepcopy(DEFAULT_LOGGING_CONFIG)
    task = config["handlers"]["task"]
    if task["class"] != "airflow.utils.log.file_task_handler.FileTaskHandler":
        # e.g. Elasticsearch/OpenSearch handlers: they read logs their own way; keep them.
        log.warning("Keeping task handler %s; %s only replaces FileTaskHandler", task["class"], HANDLER)
    else:
        task["class"] = HANDLER
    return config


LOGGING_CONFIG = _logging_config()
# Airflow looks for the remote-log IO next to a custom logging config first; these are the default
# config's, so remote logging resolves exactly as without this module.
__all__ = ["DEFAULT_REMOTE_CONN_ID", "LOGGING_CONFIG", "REMOTE_TASK_LOG", "RemoteExecutionTaskHandler"]
