"""
The sentinel in-process: the agent's status file, the component checks against real processes,
the aggregation, the plane's report route (SQLite + PostgreSQL), and the probes of a real
sentinel reporting over HTTP to the real Remote Execution API (uvicorn on loopback, SQLite).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from datetime import timedelta
from pathlib import Path

import psutil
import pytest
import requests
from starlette.testclient import TestClient

from airflow.sdk import timezone
from airflow.utils.session import create_session

from airflow_remote_execution.plane import agents, tokens

from airflow_remote_execution import config
from airflow_remote_execution.agent.client import PlaneClient
from airflow_remote_execution.agent.sentinel import Sentinel, aggregate
from airflow_remote_execution.agent.status import AgentStatus, StatusPublisher, read_status, write_status
from airflow_remote_execution.agent.worker import AgentWorker
from airflow_remote_execution.plane.api.app import create_app
from airflow_remote_execution.agent.checks import CheckResult, run_checks
from airflow_remote_execution.models import AgentModel
from airflow_remote_execution.wire.api import RegisterRequest, SentinelCheck, SentinelReport
from localplane import free_port, wait_for

COMPONENTS = ["agent_alive", "agent_heartbeat", "agent_poll", "agent_slots"]


@pytest.fixture
def status_file(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "agent" / "status.json"
    monkeypatch.setenv("AIRFLOW__REMOTE_EXECUTION__STATUS_FILE", str(path))
    return path


def status_of(pid: int | None = None, age: float = 0.0, **fields) -> AgentStatus:
    """A status record as the agent writes it, ``age`` seconds old."""
    pid = pid or os.getpid()
    now = timezone.utcnow() - timedelta(seconds=age)
    values = dict(
        pid=pid,
        pid_started=psutil.Process(pid).create_time(),
        name="agent-1",
        started_at=now - timedelta(seconds=60),
        updated_at=now,
        last_poll_at=now,
        wants_work_since=now - timedelta(seconds=30),
        last_heartbeat_at=now,
        running=1,
        concurrency=4,
        free_slots=3,
        heartbeat_interval=1.0,
        long_poll_wait=2.0,
        request_timeout=2.0,
    )
    return AgentStatus(**{**values, **fields})


def results(names=COMPONENTS) -> dict[str, CheckResult]:
    return {r.name: r for r in run_checks(names)}


# ------------------------------------------------------------------ status file


def test_worker_publishes_its_status_atomically(status_file):
    worker = AgentWorker(PlaneClient("http://127.0.0.1:9", "rex_x"), concurrency=3, queues=["q"], execution_api_url="x")
    assert worker.status.path == status_file
    worker.status.publish(worker.figures())  # before registration: no name yet
    first = read_status(status_file)
    assert (first.pid, first.name, first.concurrency, first.free_slots, first.running) == (os.getpid(), None, 3, 3, 0)
    assert first.last_poll_at is None and first.wants_work_since is not None

    worker.name = "agent-1"
    worker.status.poll_ok()
    worker.status.heartbeat_ok()
    worker.status.error("heartbeat", "401: Token revoked")
    worker.paused = True
    worker.status.publish(worker.figures())
    second = read_status(status_file)
    assert second.name == "agent-1" and second.paused and second.wants_work_since is None
    assert second.last_poll_at and second.last_heartbeat_at and second.last_error == "heartbeat: 401: Token revoked"
    assert second.updated_at >= first.updated_at

    # Readers never see half a record while the agent rewrites it.
    errors: list[Exception] = []
    stop = threading.Event()

    def read_forever():
        while not stop.is_set():
            try:
                assert read_status(status_file).name == "agent-1"
            except Exception as e:  # noqa: BLE001
                errors.append(e)

    reader = threading.Thread(target=read_forever)
    reader.start()
    for _ in range(300):
        worker.status.publish(worker.figures())
    stop.set()
    reader.join()
    assert errors == []
    assert [p.name for p in status_file.parent.iterdir()] == ["status.json"]  # no temp files left


def test_publish_never_raises_into_the_worker(tmp_path, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    publisher = StatusPublisher(blocker / "status.json")  # its directory cannot be created
    worker = AgentWorker(PlaneClient("http://127.0.0.1:9", "rex_x"), concurrency=1, queues=None, execution_api_url="x")
    publisher.publish(worker.figures())
    publisher.publish(worker.figures())
    assert caplog.text.count("Cannot write the agent status file") == 1


# ------------------------------------------------------------------ component checks


def test_no_status_file_is_skipped_for_the_doctor_but_failing_for_the_sentinel(status_file):
    found = results()
    assert all(r.skipped and not r.ok for r in found.values())
    assert f"no agent status file at {status_file}" in found["agent_alive"].detail
    evaluation = aggregate(list(found.values()))
    assert not evaluation.healthy and not evaluation.ready and evaluation.status == "failing"


def test_live_agent_passes(status_file):
    write_status(status_file, status_of())
    found = results()
    assert all(r.ok and not r.skipped for r in found.values()), found
    assert found["agent_slots"].detail == "1 running, 1 of 4 slots busy"
    evaluation = aggregate(list(found.values()))
    assert (evaluation.status, evaluation.healthy, evaluation.ready) == ("ok", True, True)


def test_killed_agent_is_not_alive(status_file):
    proc = subprocess.Popen(["sleep", "60"])
    try:
        write_status(status_file, status_of(proc.pid, last_error="lease: plane not reachable"))
        assert results(["agent_alive"])["agent_alive"].ok
        proc.send_signal(signal.SIGKILL)
        wait_for(lambda: psutil.Process(proc.pid).status() == psutil.STATUS_ZOMBIE, 10, "a zombie")
        dead = results(["agent_alive"])["agent_alive"]  # a zombie (not reaped yet) is dead too
        assert not dead.ok and f"agent agent-1 pid {proc.pid} is not running" in dead.detail
        assert "last error" in dead.detail and "plane not reachable" in dead.detail
    finally:
        proc.kill()
        proc.wait()
    assert not results(["agent_alive"])["agent_alive"].ok  # reaped: the pid is gone


def test_reused_pid_is_not_the_agent(status_file):
    status = status_of()
    write_status(status_file, status.model_copy(update={"pid_started": status.pid_started - 3600}))
    assert "is not running" in results(["agent_alive"])["agent_alive"].detail


def test_stuck_agent_and_stale_heartbeat_and_poll(status_file):
    # status_stale_after = 3 * 1 + 2 + 5 = 10 s; heartbeat limit 3 * 1 + 2 = 5 s; poll limit 2 + 2 + 1 = 5 s.
    write_status(status_file, status_of(age=11, last_error="heartbeat: 401: Token was revoked"))
    found = results()
    assert "has not written its status for 11s (limit 10s)" in found["agent_alive"].detail
    assert not found["agent_heartbeat"].ok and "401: Token was revoked" in found["agent_heartbeat"].detail
    assert not found["agent_poll"].ok and "3 free slot(s) but no lease request answered" in found["agent_poll"].detail

    # Busy, drained or stopping agents do not poll: that is fine.
    write_status(status_file, status_of(age=6, free_slots=0).model_copy(update={"updated_at": timezone.utcnow()}))
    found = results()
    assert found["agent_poll"].ok and "all slots busy" in found["agent_poll"].detail
    assert not found["agent_heartbeat"].ok

    # Not registered yet: alive, but not ready.
    write_status(status_file, status_of().model_copy(update={"name": None}))
    found = results()
    assert found["agent_alive"].ok and "not registered yet" in found["agent_alive"].detail
    assert not found["agent_heartbeat"].ok and "not registered with the plane yet" in found["agent_heartbeat"].detail


def test_damaged_status_file_fails_clearly(status_file):
    status_file.parent.mkdir(parents=True)
    status_file.write_text("{not json")
    alive = results(["agent_alive"])["agent_alive"]
    assert not alive.ok and "ValidationError" in alive.detail


def test_resource_checks_measure_this_machine():
    found = results(["cpu", "memory"])
    assert found["cpu"].detail.startswith("CPU ") and f"on {psutil.cpu_count()} CPUs" in found["cpu"].detail
    assert " GiB used (" in found["memory"].detail


def test_aggregation():
    ok = [CheckResult(n, True, "") for n in ("sentinel", *COMPONENTS, "report", "api", "token")]

    def with_failing(*names, skipped=()):
        changed = [CheckResult(r.name, False, "x") if r.name in names else r for r in ok]
        return aggregate(changed + [CheckResult(n, False, "not here", skipped=True) for n in skipped])

    assert (lambda e: (e.status, e.healthy, e.ready))(aggregate(ok)) == ("ok", True, True)
    assert (lambda e: (e.status, e.healthy, e.ready))(with_failing("agent_alive")) == ("failing", False, False)
    assert (lambda e: (e.status, e.healthy, e.ready))(with_failing("token")) == ("failing", True, False)
    assert (lambda e: (e.status, e.healthy, e.ready))(with_failing("agent_poll")) == ("degraded", True, False)
    assert (lambda e: (e.status, e.healthy, e.ready))(with_failing("xcom")) == ("ok", True, True)  # not there
    busy = aggregate(ok + [CheckResult("cpu", True, "CPU 99% busy", warning=True), CheckResult("token", True, "", warning=True)])
    assert (busy.status, busy.healthy, busy.ready) == ("degraded", True, True)
    assert aggregate(ok + [CheckResult("token", True, "expires in 3 d", warning=True)]).status == "ok"
    resources = aggregate(ok + [CheckResult("memory", False, "97%"), CheckResult("secrets", False, "", skipped=True)])
    assert (resources.status, resources.healthy, resources.ready) == ("degraded", True, True)
    integration = aggregate(ok + [CheckResult("bundles", False, "cannot fetch")])
    assert (integration.status, integration.ready) == ("degraded", False)


# ------------------------------------------------------------------ the plane's side


def report(status="failing", interval=15.0, failing=("agent_alive",)) -> SentinelReport:
    checks = [SentinelCheck(name=n, ok=n not in failing, detail=f"{n} detail") for n in ("agent_alive", "report")]
    checks.append(SentinelCheck(name="secrets", ok=False, skipped=True, detail="not configured"))
    return SentinelReport(status=status, checks=checks, interval=interval, hostname="node-1")


def test_record_and_show_reports(db):
    with db.session() as s:
        token = tokens.create(s, agent_name="agent-1", queues=["default"])[1]
        agent = agents.register(s, token, RegisterRequest(concurrency=2))
        heartbeat_before = agent.last_heartbeat_at
        (info,) = agents.list_agents(s)
        assert (info.sentinel_status, info.sentinel_at, info.sentinel_failing) == (None, None, [])
        agents.record_sentinel(s, agent, report())
        assert agent.last_heartbeat_at == heartbeat_before  # a sentinel report is not a sign of life of the agent
    with db.session() as s:
        (info,) = agents.list_agents(s)
        assert info.sentinel_status == "failing" and not info.sentinel_stale and info.sentinel_age < 5
        assert info.sentinel_failing == ["agent_alive: agent_alive detail"]
        row = s.query(AgentModel).one()
        assert row.sentinel_report["hostname"] == "node-1" and len(row.sentinel_report["checks"]) == 3
        row.sentinel_at = timezone.utcnow() - timedelta(seconds=56)  # 3 * 15 + 10 = 55 s
    with db.session() as s:
        (info,) = agents.list_agents(s)
        assert info.sentinel_stale and info.sentinel_status == "failing"


@pytest.mark.usefixtures("airflow_db")
def test_report_route():
    with TestClient(create_app()) as client:
        with create_session() as s:
            clear = tokens.create(s, agent_name="agent-1", queues=["default"])[0]
        body = report().model_dump(mode="json")
        headers = {"Authorization": f"Bearer {clear}"}
        assert client.post("/v1/agents/sentinel", json=body).status_code == 401
        r = client.post("/v1/agents/sentinel", json=body, headers=headers)
        assert r.status_code == 409 and "not registered" in r.json()["detail"]
        assert client.post("/v1/agents/register", json={"concurrency": 1}, headers=headers).status_code == 200
        for bad in ({**body, "status": "great"}, {**body, "interval": 0}, {**body, "extra": 1}):
            assert client.post("/v1/agents/sentinel", json=bad, headers=headers).status_code == 422
        r = client.post("/v1/agents/sentinel", json=body, headers=headers)
        assert r.status_code == 200 and "received_at" in r.json()
        with create_session() as s:
            assert s.query(AgentModel).one().sentinel_status == "failing"


# ------------------------------------------------------------------ a real sentinel against a real API


@pytest.fixture
def plane_api(airflow_db):
    """The Remote Execution API (create_app, mounted where the plugin mounts it) served by uvicorn on
    loopback, on the test's SQLite DB."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.routing import Mount

    port = free_port()
    app = Starlette(routes=[Mount(config.API_PREFIX, app=create_app())])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: server.started, 30, "uvicorn")
    yield url
    server.should_exit = True
    thread.join(10)


def probe(url: str, path: str) -> tuple[int, dict]:
    r = requests.get(url + path, timeout=10)
    return r.status_code, r.json()


def probe_until(url: str, path: str, code: int, timeout: float) -> tuple[int, dict]:
    deadline = time.monotonic() + timeout
    while True:
        got = probe(url, path)
        if got[0] == code:
            return got
        assert time.monotonic() < deadline, f"{path} still answers {got}"
        time.sleep(0.1)


def failing_checks(body: dict) -> dict[str, str]:
    return {c["name"]: c["detail"] for c in body["checks"] if not c["ok"] and not c["skipped"]}


def test_sentinel_probes_and_reports(plane_api, status_file, monkeypatch):
    monkeypatch.setenv("AIRFLOW__REMOTE_EXECUTION__API_URL", plane_api)
    # The doctor's integration checks (api, token, bundles, ...) need a configured agent home; whether
    # they are registered in this process depends on which test files ran before (the e2e covers them).
    monkeypatch.setattr(Sentinel, "integration_names", lambda self: [])
    with create_session() as s:
        clear = tokens.create(s, agent_name="agent-1", queues=["default"])[0]
    client = PlaneClient(plane_api, clear, timeout=5)
    client.register(RegisterRequest(concurrency=4))
    write_status(status_file, status_of())
    sentinel = Sentinel(client, report_interval=0.2, integration_interval=2)
    host, port = sentinel.start("127.0.0.1", 0)
    url = f"http://{host}:{port}"
    try:
        code, body = probe_until(url, "/readyz", 200, 30)
        assert set(failing_checks(body)) <= {"cpu", "memory", "disk"}  # a busy test machine only degrades
        names = {c["name"] for c in body["checks"]}
        assert {"sentinel", *COMPONENTS, "cpu", "memory", "report"} <= names
        assert probe(url, "/healthz")[0] == 200 and probe(url, "/livez")[0] == 200
        assert probe(url, "/nothing")[0] == 404

        def plane_view():
            with create_session() as s:
                (info,) = agents.list_agents(s)
            return info

        assert wait_for(lambda: plane_view().sentinel_status in ("ok", "degraded"), 10, "a report on the plane")

        # The agent dies: liveness fails at once, and the plane hears it from the sentinel.
        dead = subprocess.Popen(["true"])
        dead.wait()
        write_status(status_file, status_of().model_copy(update={"pid": dead.pid}))
        code, body = probe(url, "/healthz")
        assert code == 503 and not body["healthy"]
        assert [c["name"] for c in body["checks"]] == ["sentinel", "agent_alive"]
        assert f"pid {dead.pid} is not running" in failing_checks(body)["agent_alive"]
        assert probe(url, "/readyz")[0] == 503
        info = wait_for(lambda: (lambda i: i if i.sentinel_status == "failing" else None)(plane_view()), 10, "failing")
        assert any(f.startswith("agent_alive: agent agent-1 pid") for f in info.sentinel_failing)
        assert probe(url, "/livez")[0] == 200  # the sentinel itself is fine

        # Back, then the token is revoked: not ready, and the report check says why.
        write_status(status_file, status_of())
        probe_until(url, "/readyz", 200, 20)
        with create_session() as s:
            tokens.revoke(s, clear.split("_")[1])
        body = wait_for(lambda: (lambda b: b if "report" in failing_checks(b) else None)(probe(url, "/readyz")[1]), 20,
                        "the report to fail")
        assert "the plane rejected the agent token" in failing_checks(body)["report"]
        assert "was revoked at" in failing_checks(body)["report"]
        assert body["status"] == "failing" and not body["ready"] and probe(url, "/readyz")[0] == 503
        assert probe(url, "/healthz")[0] == 200
    finally:
        sentinel.shutdown()


def test_sentinel_before_the_agent_registered(plane_api, status_file, monkeypatch):
    monkeypatch.setenv("AIRFLOW__REMOTE_EXECUTION__API_URL", plane_api)
    with create_session() as s:
        clear = tokens.create(s, agent_name="newcomer", queues=["default"])[0]
    sentinel = Sentinel(PlaneClient(plane_api, clear, timeout=5), report_interval=0.2, integration_interval=60)
    try:
        sentinel.report_once()
        evaluation = sentinel.evaluate()
    finally:
        sentinel.shutdown()
    failing = {c.name: c.detail for c in evaluation.checks if not c.ok and not c.skipped}
    assert "the plane keeps no report yet: Agent 'newcomer' is not registered" in failing["report"]
    assert "no agent status file" in failing["agent_alive"]
    assert evaluation.status == "failing" and not evaluation.healthy


def test_report_body_is_what_the_plane_stores(status_file):
    write_status(status_file, status_of())
    evaluation = Sentinel(PlaneClient("http://127.0.0.1:9", "rex_x"), report_interval=1).evaluate()
    body = evaluation.body()
    assert json.loads(json.dumps(body)) == body
    assert {"status", "healthy", "ready", "checks"} == set(body)
