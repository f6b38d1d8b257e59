"""Admin routes for operators and the UI; guarded by Airflow's own auth manager."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from airflow.api_fastapi.auth.managers.models.resource_details import AccessView
from airflow.api_fastapi.core_api.security import GetUserDep, requires_access_configuration, requires_access_view
from airflow.utils.session import create_session

from airflow_remote_execution.plane import agents, identity, tokens
from airflow_remote_execution.models import WorkItemModel
from airflow_remote_execution.wire.api import (
    AgentInfo,
    DrainRequest,
    TokenCreated,
    TokenCreateRequest,
    TokenInfo,
    TokenRotateRequest,
    WorkItemInfo,
)

admin_router = APIRouter(tags=["Admin"])
_read = [Depends(requires_access_view(access_view=AccessView.JOBS))]
_tokens_read = [Depends(requires_access_configuration("GET"))]
_tokens_write = [Depends(requires_access_configuration("PUT"))]
_write = _tokens_write  # changing agents is an operator's configuration change too


@admin_router.get("/agents", response_model=list[AgentInfo], dependencies=_read)
async def list_agents() -> list[AgentInfo]:
    def run():
        with create_session() as session:
            return agents.list_agents(session)

    return await run_in_threadpool(run)


@admin_router.post("/agents/{name}/drain", response_model=AgentInfo, dependencies=_write)
async def drain_agent(name: str, user: GetUserDep, body: DrainRequest | None = None) -> AgentInfo:
    """The agent finishes what it runs and leases nothing new until resumed; ``reason`` is shown with it."""
    return await run_in_threadpool(_set_drained, name, True, body.reason if body else None, user.get_name())


@admin_router.post("/agents/{name}/resume", response_model=AgentInfo, dependencies=_write)
async def resume_agent(name: str) -> AgentInfo:
    return await run_in_threadpool(_set_drained, name, False)


@admin_router.delete("/agents/{name}", status_code=204, dependencies=_write)
async def remove_agent(name: str, force: bool = False) -> None:
    """Forget a stopped or lost agent (``force`` for a live one; revoke its tokens too)."""

    def run():
        with create_session() as session:
            agents.remove(session, name, force=force)

    await run_in_threadpool(run)


def _set_drained(name: str, drained: bool, reason: str | None = None, by: str | None = None) -> AgentInfo:
    with create_session() as session:
        agents.set_drained(session, name, drained, reason=reason, by=by)
        session.flush()
        return next(a for a in agents.list_agents(session) if a.name == name)


@admin_router.get("/work", response_model=list[WorkItemInfo], dependencies=_read)
async def list_work(
    state: str | None = None,
    dag_id: str | None = None,
    run_id: str | None = None,
    limit: int = Query(default=500, ge=1, le=10_000),
) -> list[WorkItemInfo]:
    """Work items, newest first; ``key`` is ``["ti", dag_id, task_id, run_id, map_index, try]`` for tasks."""

    def run():
        with create_session() as session:
            query = select(WorkItemModel).order_by(WorkItemModel.id.desc()).limit(limit)
            for column, value in ((WorkItemModel.state, state), (WorkItemModel.dag_id, dag_id), (WorkItemModel.run_id, run_id)):
                if value:
                    query = query.where(column == value)
            return [WorkItemInfo.model_validate(r, from_attributes=True) for r in session.scalars(query)]

    return await run_in_threadpool(run)


@admin_router.get("/tokens", response_model=list[TokenInfo], dependencies=_tokens_read)
async def list_tokens(agent_name: str | None = None) -> list[TokenInfo]:
    def run():
        with create_session() as session:
            return [tokens.to_info(t) for t in tokens.list_tokens(session, agent_name)]

    return await run_in_threadpool(run)


@admin_router.post("/tokens", response_model=TokenCreated, status_code=201, dependencies=_tokens_write)
async def create_token(body: TokenCreateRequest) -> TokenCreated:
    """Create an agent token. The clear token is in this response only."""

    def run():
        with create_session() as session:
            clear, row = tokens.create(
                session,
                agent_name=body.agent_name,
                queues=body.queues,
                expires_in=body.expires_in,
                description=body.description,
                bundles=body.bundles,
            )
            return TokenCreated(token=clear, info=tokens.to_info(row))

    return await run_in_threadpool(run)


@admin_router.post("/tokens/{token_id}/rotate", response_model=TokenCreated, status_code=201, dependencies=_tokens_write)
async def rotate_token(token_id: str, body: TokenRotateRequest) -> TokenCreated:
    """A new token for the same agent; the old one stays valid for ``old_valid_for`` (or until revoked)."""

    def run():
        with create_session() as session:
            clear, row = tokens.rotate(
                session, token_id, expires_in=body.expires_in, old_valid_for=body.old_valid_for
            )
            return TokenCreated(token=clear, info=tokens.to_info(row))

    return await run_in_threadpool(run)


@admin_router.delete("/tokens/{token_id}", response_model=TokenInfo, dependencies=_tokens_write)
async def revoke_token(token_id: str) -> TokenInfo:
    def run():
        with create_session() as session:
            return tokens.to_info(identity.revoke(session, token_id))

    return await run_in_threadpool(run)
