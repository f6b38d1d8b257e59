"""Airflow plugin: mounts the Remote Execution API at ``/remote_execution`` in ``airflow api-server``."""

from __future__ import annotations

import sys

from airflow.plugins_manager import AirflowPlugin

from airflow_remote_execution import config

# Plugins load in every Airflow process; only the api-server needs (and pays for) the FastAPI app.
_ON_API_SERVER = len(sys.argv) > 1 and sys.argv[1] == "api-server"


def _api_app() -> dict:
    from airflow_remote_execution.plane.api.app import create_app

    return {"app": create_app(), "url_prefix": config.API_PREFIX, "name": "Remote Execution API"}


class RemoteExecutionPlugin(AirflowPlugin):
    name = "remote_execution"
    fastapi_apps = [_api_app()] if _ON_API_SERVER and config.getboolean("api_enabled") else []
