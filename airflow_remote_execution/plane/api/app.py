"""The Remote Execution API: a FastAPI app the plugin mounts in ``airflow api-server``."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from airflow_remote_execution import __version__
from airflow_remote_execution.plane.agents import AgentForbidden, AgentNotRegistered
from airflow_remote_execution.plane.leases import LeaseConflict
from airflow_remote_execution.plane.tokens import TokenError

log = logging.getLogger(__name__)


def _problem(status: int, exc: Exception, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content={"detail": str(exc)}, headers=headers)


def create_app() -> FastAPI:
    from airflow_remote_execution.plane.api.admin import admin_router
    from airflow_remote_execution.plane.api.admission import Admission
    from airflow_remote_execution.plane.api.agent_routes import agent_router
    from airflow_remote_execution.plane.api.log_routes import log_router
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
    app.include_router(log_router, prefix="/v1")
    app.include_router(ui_router, prefix="/ui")  # the Remote Agents page: its bundle and page API
    from airflow_remote_execution.plane.api.scaling_routes import scaling_router

    app.include_router(scaling_router, prefix="/metrics")  # fleet figures for KEDA and Prometheus (metrics tokens)
    app.add_middleware(Admission)  # agents' requests: authenticated on headers, bounded bodies, throttled
    _document_own_bodies(app)
    from airflow_remote_execution.plane.task_logs import install

    install()  # the api-server reads agents' task logs without asking their log servers, by default

    for exc_class, status in _STATUS.items():
        app.add_exception_handler(exc_class, _handler(status))
    app.add_exception_handler(LeaseConflict, _lease_conflict)
    app.add_exception_handler(LookupError, _not_found)
    app.add_exception_handler(OverflowError, _out_of_range)
    from sqlalchemy.exc import DataError, OperationalError

    app.add_exception_handler(DataError, _out_of_range)
    app.add_exception_handler(OperationalError, _database_busy)
    app.add_exception_handler(RequestValidationError, _invalid_request)
    _warn_if_sqlite_with_workers()
    return app


def _warn_if_sqlite_with_workers() -> None:
    from airflow import settings
    from airflow.configuration import conf

    workers = conf.getint("api", "workers", fallback=1)
    if settings.engine is not None and settings.engine.dialect.name == "sqlite" and workers > 1:
        log.warning(
            "Remote Execution on SQLite with [api] workers = %d: SQLite takes one writer at a time, so agents "
            "will be answered 503 'database busy' under load. Use PostgreSQL ([database] sql_alchemy_conn) "
            "or one worker (docs/architecture.md, 'Scale and high availability').", workers,
        )


def _document_own_bodies(app: FastAPI) -> None:
    from airflow_remote_execution.plane.api.parsing_routes import openapi_schemas

    default = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = default()
            schema.setdefault("components", {}).setdefault("schemas", {}).update(openapi_schemas())
        return app.openapi_schema

    app.openapi = openapi


# Domain errors -> HTTP answers; each message says what is wrong and what to do.
_STATUS: dict[type[Exception], int] = {
    TokenError: 401,
    AgentForbidden: 403,
    LeaseConflict: 409,
    AgentNotRegistered: 409,
    ValueError: 422,
}


def _handler(status: int):
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None

    async def handle(_: Request, exc: Exception) -> JSONResponse:
        return _problem(status, exc, headers)

    return handle


async def _lease_conflict(_: Request, exc: Exception) -> JSONResponse:
    """409, counted as a fencing conflict (``remote_execution.lease.conflict``)."""
    from airflow_remote_execution.plane import metrics

    metrics.lease_conflict(str(exc))
    return _problem(409, exc)


async def _not_found(request: Request, exc: Exception) -> JSONResponse:
    """404. The plane's own ``LookupError("No work item 7")`` messages say what is missing; a ``KeyError`` or
    ``IndexError`` from deeper down would carry an internal key, so its answer names the request instead."""
    if type(exc) is LookupError:
        return _problem(404, exc)
    log.warning("%s %s: %s: %r", request.method, request.url.path, type(exc).__name__, exc)
    return JSONResponse(
        status_code=404,
        content={
            "detail": f"Not found: something {request.method} {request.url.path} refers to does not exist on the "
            "plane (or no longer: deleted or finished meanwhile). Check the ids in the path and the body."
        },
    )


async def _out_of_range(request: Request, exc: Exception) -> JSONResponse:
    """422 for a value the database cannot hold (an integer beyond its column, a malformed value): never a
    500. The schemas bound every field, so this is a last line; the DB's own message is not echoed."""
    log.warning("%s %s: value out of range for the database: %s", request.method, request.url.path, exc)
    return JSONResponse(
        status_code=422,
        content={
            "detail": f"{request.method} {request.url.path}: a value in the path or body is out of range for the "
            f"plane's database ({type(exc).__name__}): ids, fences and counts are integers from 1 to 2147483647, "
            "times are between 1970 and 2200 with a time zone; fix the request."
        },
    )


async def _database_busy(request: Request, exc: Exception) -> JSONResponse:
    """503 with Retry-After (agents retry it) when the database cannot serve the request now, never a 500.
    On SQLite that is "database is locked": one writer at a time, a demo default that a fleet outgrows."""
    locked = "database is locked" in str(exc)
    log.warning("%s %s: database unavailable: %s", request.method, request.url.path, str(exc).splitlines()[0][:300])
    detail = (
        "The plane's SQLite database is busy (one writer at a time): SQLite suits a single-process demo. "
        "For more than a few agents, several api-server workers or schedulers, use PostgreSQL "
        "([database] sql_alchemy_conn; see docs/architecture.md, 'Scale and high availability')."
        if locked else "The plane's database is unavailable right now; retry shortly."
    )
    return JSONResponse(status_code=503, content={"detail": detail}, headers={"Retry-After": "1"})


def _short(value):
    """A wrong value as an error may show it: JSON-safe (no NaN/Infinity) and short (not a 10 MB string)."""
    if value is None or isinstance(value, bool | int) and abs(value) < 2**256:
        return value
    if isinstance(value, float) and value == value and abs(value) != float("inf"):
        return value
    text = value if isinstance(value, str) else repr(value) if not isinstance(value, Exception) else str(value)
    return text if len(text) <= 200 else f"{text[:200]}... ({len(text)} characters)"


async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 naming every wrong field (``loc``) and what is wrong with it (``msg``), as FastAPI answers, but
    with each wrong value shortened: FastAPI echoes it whole (a 300k-element list, a 10 MB string) and
    cannot write NaN or Infinity at all."""
    errors = []
    for error in exc.errors():
        item = {"type": error.get("type"), "loc": list(error.get("loc", ())), "msg": error.get("msg")}
        if "input" in error:
            item["input"] = _short(error["input"])
        if error.get("ctx"):
            item["ctx"] = {k: _short(v) for k, v in error["ctx"].items()}
        errors.append(item)
    return JSONResponse(status_code=422, content={"detail": errors})
