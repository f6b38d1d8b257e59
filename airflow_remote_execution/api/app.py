"""The Remote Execution API: a FastAPI app the plugin mounts in ``airflow api-server``."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from airflow_remote_execution import __version__
from airflow_remote_execution.agents import AgentForbidden, AgentNotRegistered
from airflow_remote_execution.leases import LeaseConflict
from airflow_remote_execution.tokens import TokenError


def _problem(status: int, exc: Exception, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content={"detail": str(exc)}, headers=headers)


def create_app() -> FastAPI:
    from airflow_remote_execution.api.admin import admin_router
    from airflow_remote_execution.api.agent_routes import agent_router

    app = FastAPI(
        title="Airflow Remote Execution API",
        version=__version__,
        description=(
            "Agents call `/v1/agents/*`, `/v1/leases` and `/v1/work/*` with their own bearer token "
            "(`airflow remote-execution tokens create`). `/v1/admin/*` uses Airflow's own auth."
        ),
    )
    app.include_router(agent_router, prefix="/v1")
    app.include_router(admin_router, prefix="/v1/admin")

    @app.exception_handler(TokenError)
    async def _unauthorized(_: Request, exc: TokenError):
        return _problem(401, exc, {"WWW-Authenticate": "Bearer"})

    @app.exception_handler(AgentForbidden)
    async def _forbidden(_: Request, exc: AgentForbidden):
        return _problem(403, exc)

    @app.exception_handler(LeaseConflict)
    async def _conflict(_: Request, exc: LeaseConflict):
        return _problem(409, exc)

    @app.exception_handler(AgentNotRegistered)
    async def _not_registered(_: Request, exc: AgentNotRegistered):
        return _problem(409, exc)

    @app.exception_handler(LookupError)
    async def _not_found(_: Request, exc: LookupError):
        return _problem(404, exc)

    @app.exception_handler(ValueError)
    async def _bad_value(_: Request, exc: ValueError):
        return _problem(422, exc)

    return app
