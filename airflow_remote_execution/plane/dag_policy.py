"""
What the plane accepts in a serialized DAG that an agent's dag processor uploads.

An agent token that may parse bundle B is not trusted with the plane, nor with other teams' agents:
a serialized DAG is data, but some of its fields name code that Airflow later imports and calls
elsewhere. Those are checked here before anything is stored (:class:`DagRefused` is a 422 that names
the DAG, the field and the path):

* deadline-alert callbacks (``SyncCallback`` runs through the DAG's executor, ``AsyncCallback`` in a
  triggerer, which may be the plane's own), trigger classes of tasks that start from a trigger, and
  asset watchers' trigger classes (run by triggerers): a path may name code **installed on the plane**
  (the standard library, Airflow, providers, any site-package) only if it matches
  ``[remote_execution] parsed_dag_import_allowlist``. A path into the bundle's own modules (which the
  plane cannot import) is left to the agents that hold the bundle: they run it, and check it resolves
  inside the bundle (``agent/code_policy.py``; the rule is ``wire/import_paths.py``). An ``AsyncCallback`` or a trigger class always needs
  the allow-list, since a triggerer on the plane may run it;
* every task's and ``SyncCallback``'s ``executor`` must be a RemoteExecutor: an agent's DAG never
  reaches the plane's LocalExecutor;
* ``is_paused_upon_creation`` is dropped: a new DAG is paused or not by the plane's
  ``[core] dags_are_paused_at_creation``, never by what an agent says.

The paths are never imported here: only the top-level module's *location* is looked up
(``importlib.util.find_spec`` of a top-level name imports nothing).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from airflow_remote_execution.wire import import_paths

CALLBACK_CLASSES = {
    "airflow.sdk.definitions.callback.SyncCallback": "SyncCallback",
    "airflow.sdk.definitions.callback.AsyncCallback": "AsyncCallback",
}


class DagRefused(ValueError):
    """422: the serialized DAG names code or settings an agent may not choose."""


def _check_path(dag_id: str, field: str, path: Any, *, plane_may_run: bool, patterns: list[str]) -> None:
    if plane_may_run and not (isinstance(path, str) and import_paths.allowed_by_list(path, patterns)):
        raise DagRefused(
            f"DAG {dag_id}: {field} {path!r} would run in a triggerer, which may be the plane's: it must match "
            "[remote_execution] parsed_dag_import_allowlist on the plane (now: "
            f"{', '.join(patterns) or 'empty'}); use a SyncCallback (it runs on your agents) or ask the plane's "
            "administrator to allow it"
        )
    if why := import_paths.refusal(path, patterns):
        raise DagRefused(f"DAG {dag_id}: {field} {why}")


def _watchers(node: Any) -> Iterator[dict]:
    """Every asset watcher anywhere in the DAG (schedules, inlets and outlets all carry assets)."""
    if isinstance(node, dict):
        watchers = node.get("watchers")
        if isinstance(watchers, list):
            yield from watchers
        for value in node.values():
            yield from _watchers(value)
    elif isinstance(node, list):
        for value in node:
            yield from _watchers(value)


def _check_executor(dag_id: str, field: str, executor: Any) -> None:
    from airflow_remote_execution.plane.triggers import remote_executor_names  # Airflow's executor loader: lazily

    names, remote_is_default = remote_executor_names()
    if executor is None and remote_is_default:
        return
    if executor in names:
        return
    what = "the default executor" if executor is None else f"executor {executor!r}"
    raise DagRefused(
        f"DAG {dag_id}: {field} uses {what}, which is not a RemoteExecutor on the plane: "
        "DAGs parsed by agents run only on agents (set executor to the RemoteExecutor's alias, or leave it "
        "unset where RemoteExecutor is the default)"
    )


def check(data: dict[str, Any]) -> dict[str, Any]:
    """Refuse (:class:`DagRefused`) what an agent may not choose; returns ``data`` with
    ``is_paused_upon_creation`` removed. ``data`` is ``DagSerialization.to_dict()`` output."""
    dag = data.get("dag")
    if not isinstance(dag, dict):
        raise DagRefused("serialized DAG has no 'dag' object: send DagSerialization.to_dict() output")
    dag_id = dag.get("dag_id")
    if not isinstance(dag_id, str) or not dag_id:
        raise DagRefused("serialized DAG has no dag_id: send DagSerialization.to_dict() output")
    patterns = import_paths.allowlist()
    dag.pop("is_paused_upon_creation", None)

    for i, alert in enumerate(dag.get("deadline") or []):
        callback = alert.get("callback") if isinstance(alert, dict) else None
        field = f"deadline[{i}].callback"
        if not isinstance(callback, dict):
            raise DagRefused(f"DAG {dag_id}: {field} is missing")
        kind = CALLBACK_CLASSES.get(callback.get("__classname__"))
        if kind is None:
            raise DagRefused(
                f"DAG {dag_id}: {field} is a {callback.get('__classname__')!r}; only SyncCallback and "
                "AsyncCallback are accepted"
            )
        body = callback.get("__data__") or {}
        _check_path(dag_id, f"{field} ({kind})", body.get("path"), plane_may_run=kind == "AsyncCallback",
                    patterns=patterns)
        if kind == "SyncCallback":
            _check_executor(dag_id, f"{field} (SyncCallback)", body.get("executor"))

    for task in dag.get("tasks") or []:
        var = task.get("__var", task) if isinstance(task, dict) else {}
        task_id = var.get("task_id", "?")
        _check_executor(dag_id, f"task {task_id}", var.get("executor"))
        start = var.get("start_trigger_args")
        if isinstance(start, dict) and var.get("start_from_trigger"):
            _check_path(dag_id, f"task {task_id} start_trigger_args.trigger_cls", start.get("trigger_cls"),
                        plane_may_run=True, patterns=patterns)

    for watcher in _watchers(dag):
        trigger = watcher.get("trigger") if isinstance(watcher, dict) else None
        classpath = trigger.get("classpath") if isinstance(trigger, dict) else None
        _check_path(dag_id, f"asset watcher {watcher.get('name')!r} trigger", classpath, plane_may_run=True,
                    patterns=patterns)
    return data
