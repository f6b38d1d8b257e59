"""The plugin's hooks on the api-server's root app (plane/api/root_app.py): agents' long-polls and heartbeats
skip the root app's middlewares, a waiting long-poll is answered after its request machinery is gone, and
errors while it waits are the API's own 4xx answers."""

from __future__ import annotations

import threading
import time

import pytest
from fastapi import FastAPI
from starlette.middleware.gzip import GZipMiddleware
from starlette.testclient import TestClient

from airflow_remote_execution.plane.api import root_app
from airflow_remote_execution.plane.api.app import create_app

from .test_agent_routes import auth, enqueue, new_token

pytestmark = pytest.mark.usefixtures("airflow_db")


class Recorder:
    """Stands for Airflow's own root middlewares (access log, gzip, JWT refresh): the paths they saw."""

    def __init__(self, app) -> None:
        self.app = app
        self.seen: list[str] = []
        Recorder.last = self

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            self.seen.append(scope["path"])
        await self.app(scope, receive, send)


@pytest.fixture(scope="module")
def root():
    app = FastAPI()
    app.mount("/remote_execution", create_app())
    app.add_middleware(root_app.RootAppHooks)  # a plugin root middleware: inside Airflow's
    app.add_middleware(GZipMiddleware, minimum_size=1024)
    app.add_middleware(Recorder)
    with TestClient(app) as client:
        assert isinstance(app.middleware_stack, root_app._Dispatcher)  # installed at the lifespan start-up
        yield client


def test_long_polls_and_heartbeats_skip_the_root_middlewares_other_routes_do_not(root):
    token = new_token("fast-1", ("fast-q",))
    headers = auth(token)
    assert root.post("/remote_execution/v1/agents/register", json={"concurrency": 2}, headers=headers).status_code == 200
    r = root.post("/remote_execution/v1/agents/heartbeat", json={"free_slots": 2, "running": []}, headers=headers)
    assert r.status_code == 200 and r.json()["heartbeat_interval"] > 0, r.text
    r = root.post("/remote_execution/v1/leases", json={"slots": 1, "wait": 0}, headers=headers)
    assert r.status_code == 200 and r.json() == {"leases": []}, r.text
    assert root.get("/remote_execution/v1/agents/me", headers=headers).status_code == 200
    assert Recorder.last.seen == ["/remote_execution/v1/agents/register", "/remote_execution/v1/agents/me"]


def test_a_parked_long_poll_is_answered_with_work_queued_while_it_waits(root):
    token = new_token("fast-2", ("fast-wait",))
    headers = auth(token)
    assert root.post("/remote_execution/v1/agents/register", json={"concurrency": 1}, headers=headers).status_code == 200
    queued: list[int] = []
    later = threading.Timer(0.5, lambda: queued.append(enqueue("parked", queue="fast-wait")))
    later.start()
    began = time.monotonic()
    r = root.post("/remote_execution/v1/leases", json={"slots": 1, "wait": 10}, headers=headers)
    later.join()
    assert r.status_code == 200, r.text
    assert [lease["work_id"] for lease in r.json()["leases"]] == queued
    assert time.monotonic() - began < 9, "woken by the work, not by the end of its wait"


def test_an_error_while_parked_is_the_apis_own_answer(root):
    token = new_token("fast-never-registered", ("fast-unregistered",))
    r = root.post("/remote_execution/v1/leases", json={"slots": 1, "wait": 1}, headers=auth(token))
    assert r.status_code == 409, r.text
    assert "register" in r.json()["detail"]
    r = root.post("/remote_execution/v1/leases", json={"slots": "many"}, headers=auth(token))
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "slots"], r.text


def test_airflows_execution_api_is_built_before_the_api_server_serves():
    """Its first request builds its versioned routes (~3 s in which the process answered nobody): the
    start-up does it now, not an agent's first task start."""
    from airflow.api_fastapi.execution_api.app import create_task_execution_api_app
    from starlette.routing import Mount

    execution = create_task_execution_api_app()
    app = FastAPI(lifespan=lambda app: execution.router.lifespan_context(execution))  # as Airflow's enters mounts'
    app.router.routes.append(Mount("/execution", execution))
    app.mount("/remote_execution", create_app())
    app.add_middleware(root_app.RootAppHooks)
    assert not execution._cadwyn_initialized
    with TestClient(app):
        assert execution._cadwyn_initialized
