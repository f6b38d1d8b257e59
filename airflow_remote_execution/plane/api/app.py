"""The Remote Execution API: a FastAPI app the plugin mounts in ``airflow api-server``."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from airflow_remote_execution import __version__
from airflow_remote_execution.plane.agents import AgentForbidden, AgentNotRegistered
from airflow_remote_execution.plane.leases import LeaseConflict
from airflow_remote_execution.plane.tokens import TokenError


def _problem(status: int, exc: Exception, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content={"detail": str(exc)}, headers=headers)


def create_app() -> FastAPI:
    from airflow_remote_execution.plane.api.admin import admin_router
    from airflow_remote_execution.plane.api.agent_routes import agent_router
    from airflow_remote_execution.plane.api.xcom_routes import xcom_router
    from airflow_remote_execution.plane.api.trigger_routes import trigger_router
    from airflow_remote_execution.plane.api.parsing_routes import parsing_router
    from airflow_remote_execution.plane.api.ui_routes import ui_router

    app = FastAPI(
        title="Airflow Remote Execution API",
        version=__version__,
        description=(
            "Agents call `/v1/agents/*`, `/v1/leases` and `/v1/work/*` with their own bearer token "
            "(`airflow remote-execution tokens create`). `/v1/admin/*` uses Airflow's own auth."
        ),
    )
    app.include_router(agent_router, prefix="/v1")
    app.include_router(trigger_router, prefix="/v1")
    app.include_router(admin_router, prefix="/v1/admin")
    app.include_router(xcom_router, prefix="/v1")
    app.include_router(parsing_router, prefix="/v1")
    app.include_router(ui_router, prefix="/ui")  # the Remote Agents page: its bundle and page API

    for exc_class, status in _STATUS.items():
        app.add_exception_handler(exc_class, _handler(status))
    return app


# Domain errors -> HTTP answers; each message says what is wrong and what to do.
_STATUS: dict[type[Exception], int] = {
    TokenError: 401,
    AgentForbidden: 403,
    LeaseConflict: 409,
    AgentNotRegistered: 409,
    LookupError: 404,
    ValueError: 422,
}


def _handler(status: int):
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None

    async def handle(_: Request, exc: Exception) -> JSONResponse:
        return _problem(status, exc, headers)

    return handle
