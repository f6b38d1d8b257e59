"""
Task-log reading on the orchestration plane without connecting to agents.

For a RUNNING (or DEFERRED) task, Airflow's ``FileTaskHandler._read`` reads the remote log *and* asks the
worker's log server at ``http://<ti.hostname>:[logging] worker_log_server_port/log/...`` (a deferred
task's: its triggerer's, on ``trigger_log_server_port``); for a finished task without a remote log it
asks that server too. Agents are outbound-only, so for tasks run by a RemoteExecutor (and triggers run
by agent triggerers) the plane must not try: their logs come from the remote log folder, where agents
upload them while tasks run (``[remote_execution] log_upload_interval``) and when they end.

Use on the api-server::

    [logging]
    logging_config_class = airflow_remote_execution.log_handler.LOGGING_CONFIG  # this module, re-exported there

This is Airflow's default logging config with the ``task`` handler swapped for
:class:`RemoteExecutionTaskHandler`; remote logging itself (``remote_logging``,
``remote_base_log_folder``, ``remote_log_conn_id``) is configured as usual.
"""

from __future__ import annotations

import copy
import logging
from functools import cache
from typing import TYPE_CHECKING

from airflow.config_templates.airflow_local_settings import (  # noqa: F401 - REMOTE_*: see below
    DEFAULT_LOGGING_CONFIG,
    DEFAULT_REMOTE_CONN_ID,
    REMOTE_TASK_LOG,
)
from airflow.utils.log.file_task_handler import FileTaskHandler

if TYPE_CHECKING:
    from airflow.models.taskinstance import TaskInstance
    from airflow.models.taskinstancehistory import TaskInstanceHistory

log = logging.getLogger(__name__)

REMOTE_EXECUTOR = "airflow_remote_execution.executors.RemoteExecutor"
HANDLER = f"{__name__}.RemoteExecutionTaskHandler"
NOT_SERVED = (
    "Not asking a log server on a Remote Execution agent: the plane never connects to agents. "
    "Logs of agents' tasks are read from the remote log folder ([logging] remote_base_log_folder)."
)


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
    """``FileTaskHandler`` that never fetches served logs from Remote Execution agents."""

    def _read_from_logs_server(self, ti: TaskInstance | TaskInstanceHistory, worker_log_rel_path: str):
        if job := getattr(ti, "triggerer_job", None):  # Airflow asks the triggerer for a deferred task
            on_agent = _is_agent_triggerer(job)
        else:
            on_agent = _is_remote_executor(ti.executor)
        if not on_agent:  # the stock triggerer, other executors' workers: Airflow's way
            return super()._read_from_logs_server(ti, worker_log_rel_path)
        return [NOT_SERVED], []


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
