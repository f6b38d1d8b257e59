"""Airflow plugin: mounts the Remote Execution API at ``/remote_execution`` in ``airflow api-server``, the
Remote Agents page, and the guard in front of the execution API for agents' tokens."""

from __future__ import annotations

import sys

from airflow.plugins_manager import AirflowPlugin

from airflow_remote_execution import config

# Plugins load in every Airflow process; only the api-server needs (and pays for) the FastAPI app.
_ON_API_SERVER = len(sys.argv) > 1 and sys.argv[1] == "api-server"


def _api_app() -> dict:
    from airflow_remote_execution.plane.api.app import create_app

    return {"app": create_app(), "url_prefix": config.API_PREFIX, "name": "Remote Execution API"}


def _react_apps() -> list[dict]:
    """The Remote Agents page (nav) and the "Remote execution" tab of task instances (docs/ui.md)."""
    from urllib.parse import urlparse

    from airflow.configuration import conf

    from airflow_remote_execution.plane.api.ui_routes import react_apps

    return react_apps(urlparse(conf.get("api", "base_url", fallback="/") or "/").path)


_SERVED = _ON_API_SERVER and config.getboolean("api_enabled")


def _root_middlewares() -> list[dict]:
    """The guard in front of Airflow's execution API for tokens handed to agents (plane/exec_guard.py), and
    the fast path of agents' long-polls and heartbeats past Airflow's UI middlewares (plane/api/root_app.py)."""
    from airflow_remote_execution.plane.exec_guard import ExecutionApiGuard

    guard = {"middleware": ExecutionApiGuard, "args": [], "kwargs": {}, "name": "Remote Execution token guard"}
    if not _SERVED:
        return [guard]
    from airflow_remote_execution.plane.api.root_app import RootAppHooks

    return [guard, {"middleware": RootAppHooks, "args": [], "kwargs": {}, "name": "Remote Execution fast path"}]


class RemoteExecutionPlugin(AirflowPlugin):
    name = "remote_execution"
    fastapi_apps = [_api_app()] if _SERVED else []
    # Always on in an api-server, even with the Remote Execution API off: agents' tokens may still be live.
    fastapi_root_middlewares = _root_middlewares() if _ON_API_SERVER else []
    react_apps = _react_apps() if _SERVED else []
