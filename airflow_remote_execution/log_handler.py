"""
Task-log reading on the orchestration plane without connecting to agents.

For a RUNNING (or DEFERRED) task, Airflow's ``FileTaskHandler._read`` reads the remote log *and* asks the
worker's log server at ``http://<ti.hostname>:[logging] worker_log_server_port/log/...``; for a finished
task without a remote log it asks that server too. Agents are outbound-only, so for tasks run by a
RemoteExecutor the plane must not try: their logs come from the remote log folder, where agents upload
them while tasks run (``[remote_execution] log_upload_interval``) and when they end.

Use on the api-server::

    [logging]
    logging_config_class = airflow_remote_execution.log_handler.LOGGING_CONFIG

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
    "Not asking the worker's log server: this task ran on a Remote Execution agent, which the plane "
    "never connects to. Its log is read from the remote log folder ([logging] remote_base_log_folder)."
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


class RemoteExecutionTaskHandler(FileTaskHandler):
    """``FileTaskHandler`` that never fetches served logs of tasks run on Remote Execution agents."""

    def _read_from_logs_server(self, ti: TaskInstance | TaskInstanceHistory, worker_log_rel_path: str):
        if getattr(ti, "triggerer_job", None) or not _is_remote_executor(ti.executor):
            # Trigger logs (the triggerer's log server) and other executors' workers: Airflow's way.
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
