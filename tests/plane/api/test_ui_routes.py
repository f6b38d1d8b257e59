"""The Remote Agents page's API (plane/api/ui_routes.py) in-process, on a real SQLite DB with Airflow's
own auth manager (SimpleAuthManager): every auth case, and what the page shows."""

from __future__ import annotations

import argparse
import json
import uuid
from datetime import timedelta

import pytest
from sqlalchemy import delete, insert, update
from starlette.testclient import TestClient

from airflow.models.taskinstancekey import TaskInstanceKey
from airflow.sdk import timezone
from airflow.utils.session import create_session

from airflow_remote_execution.models import AgentModel, AgentTokenModel, WorkItemModel
from airflow_remote_execution.plane import leases, tokens
from airflow_remote_execution.plane.api.app import create_app
from airflow_remote_execution.plane.api.ui_routes import plane_versions

pytestmark = pytest.mark.usefixtures("airflow_db")
UI = "/ui/api"


@pytest.fixture(scope="module")
def client():
    with TestClient(create_app(), raise_server_exceptions=True) as c:
        yield c


@pytest.fixture(scope="module")
def manager(sqlite_engine):
    """Airflow's auth manager initialised in-process, with the tables it and the task tab read."""
    from airflow.api_fastapi.app import init_auth_manager
    from airflow.models import import_all_models
    from airflow.models.revoked_token import RevokedToken
    from airflow.models.taskinstance import TaskInstance
    from airflow.models.taskinstancehistory import TaskInstanceHistory

    import_all_models()  # the task instance tables' foreign keys name other Airflow tables
    for table in (RevokedToken.__table__, TaskInstance.__table__, TaskInstanceHistory.__table__):
        table.create(sqlite_engine, checkfirst=True)
    return init_auth_manager()


def jwt(manager, role: str | None, **kw) -> str:
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser

    return manager.generate_jwt(SimpleAuthManagerUser(username=role or "nobody", role=role), **kw)


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def cookie(token: str) -> dict:
    return {"Cookie": f"_token={token}"}  # the UI's session, as the browser sends it


def new_token(name="agent-1", queues=("default",)) -> str:
    with create_session() as s:
        return tokens.create(s, agent_name=name, queues=list(queues))[0]


def register(client, name="agent-1", queues=("default",), versions=None, concurrency=2) -> str:
    token = new_token(name, queues)
    body = {"concurrency": concurrency, "hostname": f"{name}.example", "versions": versions or plane_versions()}
    r = client.post("/v1/agents/register", json=body, headers=bearer(token))
    assert r.status_code == 200, r.text
    return token


def enqueue(task="t", queue="default", try_number=1, dag="d", run="r") -> int:
    key = TaskInstanceKey(dag_id=dag, task_id=task, run_id=run, try_number=try_number, map_index=-1)
    with create_session() as s:
        leases.enqueue(s, key=key, kind="task", queue=queue, priority_weight=1, workload="{}")
    with create_session() as s:
        digest = leases.key_digest(leases.key_to_json(key))
        return s.query(WorkItemModel.id).filter(WorkItemModel.key_digest == digest).scalar()


READS = [("GET", f"{UI}/overview"), ("GET", f"{UI}/tokens"), ("GET", f"{UI}/task-instance?dag_id=d&run_id=r&task_id=t")]
ACTIONS = [
    ("POST", f"{UI}/agents/agent-1/drain", {"reason": "x"}),
    ("POST", f"{UI}/agents/agent-1/resume", None),
    ("DELETE", f"{UI}/agents/agent-1?force=true", None),
    ("POST", f"{UI}/tokens", {"agent_name": "new-agent", "queues": ["default"]}),
    ("POST", f"{UI}/tokens/TOKEN/rotate", {"old_valid_for": "1h"}),
    ("DELETE", f"{UI}/tokens/TOKEN", None),
]
EVERY = [(m, p, None) for m, p in READS] + ACTIONS


def _request(client, method, path, body, headers, token_id="nope"):
    return client.request(method, path.replace("TOKEN", token_id), json=body, headers=headers)


def _unchanged(agent_token_count: int) -> None:
    with create_session() as s:
        agent = s.query(AgentModel).filter(AgentModel.name == "agent-1").one()
        assert agent.drained is False and agent.drain_reason is None
        assert s.query(AgentTokenModel).count() == agent_token_count
        assert s.query(AgentTokenModel).filter(AgentTokenModel.revoked_at.is_not(None)).count() == 0


# ------------------------------------------------------------------ authentication: 401


@pytest.mark.parametrize("method, path, body", EVERY)
def test_no_session_is_401(client, manager, method, path, body):
    register(client)
    r = _request(client, method, path, body, {})
    assert r.status_code == 401, r.text
    assert "sign in to the Airflow UI" in r.json()["detail"]
    _unchanged(1)


@pytest.mark.parametrize("method, path, body", EVERY)
def test_agent_token_is_401(client, manager, method, path, body):
    agent_token = register(client)
    for headers in (bearer(agent_token), cookie(agent_token)):
        r = _request(client, method, path, body, headers, token_id=agent_token.split("_")[1])
        assert r.status_code == 401, r.text
    assert "Agent tokens are not accepted" in client.get(f"{UI}/overview", headers=bearer(agent_token)).json()["detail"]
    _unchanged(1)


def _execution_token(audience: str, **claims) -> str:
    """A task's execution-API token, minted like the scheduler does for a workload."""
    from airflow.api_fastapi.auth.tokens import JWTGenerator, get_signing_args

    generator = JWTGenerator(valid_for=600, audience=audience, **get_signing_args(make_secret_key_if_needed=False))
    return generator.generate(extras={"sub": "0190f1c8-0000-7000-8000-000000000001", "scope": "workload", **claims})


@pytest.mark.parametrize("method, path, body", EVERY)
def test_execution_api_token_is_401(client, manager, method, path, body):
    register(client)
    # Its own audience (the default set-up): Airflow's validator refuses it.
    r = _request(client, method, path, body, bearer(_execution_token("urn:airflow.apache.org:task")))
    assert r.status_code == 401, r.text
    # Signed for the UI's audience too (a deployment with one audience for both): its scope gives it away.
    # ... and so do the claims binding it to an agent's lease (plane/exec_guard.py), with no scope at all.
    bound = _execution_token("apache-airflow", scope=None, rex_work=1, rex_fence=1, rex_token="0" * 16)
    for headers in (bearer(_execution_token("apache-airflow")), cookie(_execution_token("apache-airflow")),
                    bearer(bound)):
        r = _request(client, method, path, body, headers)
        assert r.status_code == 401, r.text
        assert "Execution-API tokens are not accepted" in r.json()["detail"]
    _unchanged(1)


@pytest.mark.parametrize("method, path, body", EVERY)
def test_expired_or_forged_session_is_401(client, manager, method, path, body):
    register(client)
    expired = jwt(manager, "admin", expiration_time_in_seconds=-120)
    forged = jwt(manager, "admin")[:-4] + "AAAA"
    for headers in (cookie(expired), bearer(expired), cookie(forged), bearer("not-a-jwt")):
        r = _request(client, method, path, body, headers)
        assert r.status_code == 401, (headers, r.text)
    _unchanged(1)


# ------------------------------------------------------------------ authorization: 403


@pytest.mark.parametrize("method, path", READS)
def test_reading_needs_read_access(client, manager, method, path):
    assert client.request(method, path, headers=cookie(jwt(manager, None))).status_code == 403
    assert client.request(method, path, headers=cookie(jwt(manager, "viewer"))).status_code == 200


@pytest.mark.parametrize("method, path, body", ACTIONS)
def test_actions_need_edit_access_on_configuration(client, manager, method, path, body):
    register(client)
    token_id = new_token("other").split("_")[1]
    for role in (None, "viewer", "user"):  # "user" may edit DAGs but not configuration
        r = _request(client, method, path, body, cookie(jwt(manager, role)), token_id)
        assert r.status_code == 403, (role, r.text)
        assert r.json()["detail"].startswith("Forbidden")
    _unchanged(2)
    r = _request(client, method, path, body, cookie(jwt(manager, "op")), token_id)
    assert r.status_code in (200, 201, 204), r.text


def test_overview_says_what_the_user_may_do(client, manager):
    perms = lambda role: client.get(f"{UI}/overview", headers=cookie(jwt(manager, role))).json()["permissions"]  # noqa: E731
    assert perms("viewer") == {"user": "viewer", "can_edit": False, "can_read_tokens": True}
    assert perms("op") == {"user": "op", "can_edit": True, "can_read_tokens": True}
    assert perms("admin")["can_edit"] is True


# ------------------------------------------------------------------ what the page shows


def test_overview_agents_queues_health_and_versions(client, manager):
    admin = cookie(jwt(manager, "admin"))
    a = register(client, "agent-a", ("default", "gpu"), concurrency=3)
    register(client, "agent-b", ("analytics",), versions={**plane_versions(), "airflow": "3.3.0", "python": "3.11.0"})
    w1 = enqueue("t1")
    enqueue("t2", queue="nowhere")
    (lease,) = client.post("/v1/leases", json={"slots": 1, "wait": 0}, headers=bearer(a)).json()["leases"]
    assert client.post(f"/v1/work/{w1}/start", json={"fence": lease["fence"]}, headers=bearer(a)).status_code == 200
    report = {"status": "degraded", "interval": 15, "checks": [
        {"name": "disk", "ok": False, "detail": "3% free on /tmp"}, {"name": "api", "ok": True, "detail": "200 in 4 ms"},
        {"name": "cpu", "ok": True, "warning": True, "detail": "load 8 on 2 CPUs"}]}
    assert client.post("/v1/agents/sentinel", json=report, headers=bearer(a)).status_code == 200

    body = client.get(f"{UI}/overview", headers=admin).json()
    assert body["plane_versions"] == plane_versions()
    agents = {x["name"]: x for x in body["agents"]}
    ag = agents["agent-a"]
    assert ag["health"] == "degraded" and ag["health_reasons"] == ["sentinel degraded: disk, cpu (warning)"]
    assert (ag["queues"], ag["concurrency"], ag["slots_used"]) == (["default", "gpu"], 3, 1)
    assert [(w["id"], w["state"], w["label"]) for w in ag["running"]] == [(w1, "running", "d.t1 r try 1")]
    assert [(c["name"], c["ok"], c["detail"]) for c in ag["sentinel"]["checks"]] == [
        ("disk", False, "3% free on /tmp"), ("api", True, "200 in 4 ms"), ("cpu", True, "load 8 on 2 CPUs")]
    assert ag["token_id"] == a.split("_")[1] and ag["token_status"] == "active" and ag["hostname"] == "agent-a.example"
    assert ag["version_mismatch"] == [] and 0 <= ag["heartbeat_age"] < 5
    # agent-b: another Airflow is marked; a Python patch release is not.
    bg = agents["agent-b"]
    assert bg["health"] == "healthy" and bg["version_mismatch"] == ["airflow"]

    queues = {q["queue"]: q for q in body["queues"]}
    assert set(queues) == {"default", "gpu", "analytics", "nowhere"}
    assert (queues["default"]["running"], queues["default"]["queued"], queues["default"]["warning"]) == (1, 0, None)
    assert queues["default"]["live_agents"] == ["agent-a"]
    nowhere = queues["nowhere"]
    assert nowhere["queued"] == 1 and nowhere["agents"] == [] and nowhere["oldest_queued_age"] >= 0
    assert nowhere["warning"].startswith("1 work item(s) queued in 'nowhere'") and "no live agent" in nowhere["warning"]


@pytest.mark.parametrize("state, column, expected, reason", [
    ("lost", "state", "lost", "no heartbeat for"),
    ("offline", "state", "offline", "stopped cleanly"),
    ("stopping", "state", "draining", "shutting down"),
    ("late", "last_heartbeat_at", "degraded", "heartbeat late"),
])
def test_health_from_heartbeats(client, manager, state, column, expected, reason):
    register(client)
    values = {"last_heartbeat_at": timezone.utcnow() - timedelta(seconds=60)}
    if column == "state":
        values["state"] = state
    with create_session() as s:
        s.execute(update(AgentModel).values(**values))
    (agent,) = client.get(f"{UI}/overview", headers=cookie(jwt(manager, "viewer"))).json()["agents"]
    assert agent["health"] == expected and agent["health_reasons"][0].startswith(reason)


def test_drain_reason_everywhere_and_across_restarts(client, manager, capsys):
    from airflow_remote_execution.cli import commands

    op = cookie(jwt(manager, "op"))
    token = register(client, "agent-1", ("default",))
    r = client.post(f"{UI}/agents/agent-1/drain", json={"reason": "node pool upgrade"}, headers=op)
    assert r.status_code == 200 and r.json()["drain_reason"] == "node pool upgrade" and r.json()["drained_by"] == "op"
    (agent,) = client.get(f"{UI}/overview", headers=op).json()["agents"]
    assert (agent["health"], agent["drain_reason"], agent["drained_by"]) == ("draining", "node pool upgrade", "op")
    # The agent is told, and leases nothing.
    assert client.post("/v1/agents/heartbeat", json={"free_slots": 2}, headers=bearer(token)).json()["drain"] is True
    enqueue("t1")
    assert client.post("/v1/leases", json={"slots": 1, "wait": 0}, headers=bearer(token)).json()["leases"] == []
    (queue,) = client.get(f"{UI}/overview", headers=op).json()["queues"]
    assert queue["live_agents"] == [] and "agent-1 (drained)" in queue["warning"]
    # The admin API and `agents list` show it too.
    (listed,) = client.get("/v1/admin/agents", headers=op).json()
    assert listed["drain_reason"] == "node pool upgrade"
    commands.agents_list(argparse.Namespace(output="json"))
    (row,) = json.loads(capsys.readouterr().out)
    assert (row["drained"], row["drain_reason"]) == ("True", "node pool upgrade")
    # A restarted agent registers again: still drained, same reason.
    assert client.post("/v1/agents/register", json={"concurrency": 2}, headers=bearer(token)).status_code == 200
    (agent,) = client.get(f"{UI}/overview", headers=op).json()["agents"]
    assert (agent["drained"], agent["drain_reason"]) == (True, "node pool upgrade")
    # Resume clears it; the CLI records its own reason.
    assert client.post(f"{UI}/agents/agent-1/resume", headers=op).json()["drain_reason"] is None
    commands.agents_drain(argparse.Namespace(name="agent-1", reason="from the shell"))
    (agent,) = client.get(f"{UI}/overview", headers=op).json()["agents"]
    assert agent["drain_reason"] == "from the shell" and agent["drained_by"].endswith("(cli)")
    # The admin API takes a reason as well (and still works without a body).
    r = client.post("/v1/admin/agents/agent-1/drain", json={"reason": "via admin API"}, headers=op)
    assert r.json()["drain_reason"] == "via admin API"
    assert client.post("/v1/admin/agents/agent-1/drain", headers=op).json()["drain_reason"] is None


def test_drain_needs_a_known_agent_and_remove_a_stopped_one(client, manager):
    op = cookie(jwt(manager, "op"))
    register(client)
    assert client.post(f"{UI}/agents/nobody/drain", json={"reason": "x"}, headers=op).status_code == 404
    r = client.delete(f"{UI}/agents/agent-1", headers=op)
    assert r.status_code == 403 and "stop it first" in r.json()["detail"]
    assert client.delete(f"{UI}/agents/agent-1?force=true", headers=op).status_code == 204
    assert client.get(f"{UI}/overview", headers=op).json()["agents"] == []


def test_tokens_create_rotate_revoke(client, manager):
    op = cookie(jwt(manager, "op"))
    r = client.post(f"{UI}/tokens", json={"agent_name": "ui-agent", "queues": ["b", "a"], "expires_in": "30d"}, headers=op)
    assert r.status_code == 201, r.text
    clear, info = r.json()["token"], r.json()["info"]
    assert info["queues"] == ["a", "b"] and info["description"] == "created in the UI by op"
    listed = client.get(f"{UI}/tokens", headers=cookie(jwt(manager, "viewer")))
    assert [t["id"] for t in listed.json()] == [info["id"]] and clear.split("_", 2)[2] not in listed.text
    assert client.post("/v1/agents/register", json={"concurrency": 1}, headers=bearer(clear)).status_code == 200

    r = client.post(f"{UI}/tokens/{info['id']}/rotate", json={"old_valid_for": "1h"}, headers=op)
    assert r.status_code == 201
    new_clear = r.json()["token"]
    old = next(t for t in client.get(f"{UI}/tokens", headers=op).json() if t["id"] == info["id"])
    assert old["status"] == "active" and old["expires_at"] < info["expires_at"]  # the overlap: 1 h, not 30 d
    assert client.post("/v1/agents/heartbeat", json={"free_slots": 1}, headers=bearer(clear)).status_code == 200

    r = client.delete(f"{UI}/tokens/{info['id']}", headers=op)
    assert r.status_code == 200 and r.json()["status"] == "revoked"
    assert client.post("/v1/agents/heartbeat", json={"free_slots": 1}, headers=bearer(clear)).status_code == 401
    (agent,) = client.get(f"{UI}/overview", headers=op).json()["agents"]  # registered with the revoked token
    assert (agent["token_status"], agent["health"]) == ("revoked", "degraded")
    assert agent["health_reasons"] == ["its token is revoked: the plane refuses it"]
    assert client.post("/v1/agents/heartbeat", json={"free_slots": 1}, headers=bearer(new_clear)).status_code == 200
    bad = client.post(f"{UI}/tokens", json={"agent_name": "x", "queues": ["q"], "expires_in": "forever"}, headers=op)
    assert bad.status_code == 422 and "Invalid duration" in bad.json()["detail"]


def test_task_instance_tab_tries_agents_and_timeline(client, manager, sqlite_engine):
    from airflow.models.taskinstancehistory import TaskInstanceHistory

    viewer = cookie(jwt(manager, "viewer"))
    a = register(client, "agent-a")
    w1 = enqueue("t", try_number=1)
    (lease,) = client.post("/v1/leases", json={"slots": 1, "wait": 0}, headers=bearer(a)).json()["leases"]
    client.post(f"/v1/work/{w1}/start", json={"fence": lease["fence"]}, headers=bearer(a))
    client.post(f"/v1/work/{w1}/finish", json={"fence": lease["fence"], "outcome": "failed"}, headers=bearer(a))
    enqueue("t", try_number=2)
    enqueue("other-task", try_number=1)
    started = timezone.utcnow() - timedelta(seconds=1)
    history = TaskInstanceHistory.__table__
    with sqlite_engine.connect() as conn:  # a try's row alone, without its DAG run and task instance
        conn.exec_driver_sql("PRAGMA foreign_keys=OFF")
        conn.execute(insert(history).values(
            task_instance_id=uuid.UUID(int=1), dag_id="d", run_id="r", task_id="t", map_index=-1, try_number=1, pool="p",
            start_date=started, state="failed"))
        conn.commit()
        conn.exec_driver_sql("PRAGMA foreign_keys=ON")
    try:
        r = client.get(f"{UI}/task-instance", params={"dag_id": "d", "run_id": "r", "task_id": "t"}, headers=viewer)
    finally:
        with sqlite_engine.begin() as conn:
            conn.execute(delete(history))
    assert r.status_code == 200, r.text
    first, second = r.json()["tries"]
    assert (first["try_number"], first["agent_name"], first["agent_hostname"], first["state"]) == (
        1, "agent-a", "agent-a.example", "failed")
    steps = {s["step"]: s for s in first["steps"]}
    assert list(steps) == ["queued", "leased", "start_confirmed", "running", "finished"]
    assert all(steps[s]["at"] for s in steps), steps
    assert steps["queued"]["at"] <= steps["leased"]["at"] <= steps["start_confirmed"]["at"] <= steps["finished"]["at"]
    assert steps["running"]["at"].startswith(started.isoformat()[:19])
    assert steps["finished"]["note"] == "failed; task instance failed"
    assert (second["try_number"], second["agent_name"], second["state"]) == (2, None, "queued")
    assert [s["step"] for s in second["steps"] if s["at"]] == ["queued"]
    none = client.get(f"{UI}/task-instance", params={"dag_id": "d", "run_id": "r", "task_id": "x"}, headers=viewer)
    assert none.json()["tries"] == []


def test_bundle_and_icons_are_served_as_javascript_and_svg(client):
    r = client.get("/ui/remote-agents.js")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/javascript")
    assert "AirflowPlugin" in r.text
    assert client.get("/ui/remote-agents.svg").headers["content-type"] == "image/svg+xml"
    assert client.get("/ui/..%2Fapp.py").status_code == 404
    assert client.get("/ui/build-info.json").status_code == 404


def test_overview_queries_on_sqlite_and_postgres(db, manager):
    """The page's own queries (per-queue counts and oldest item, held work per agent), on both databases."""
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser

    from airflow_remote_execution.plane.api.ui_routes import build_overview

    now = timezone.utcnow()
    with db.session() as s:
        _, token = tokens.create(s, agent_name="pg-agent", queues=["default"])
        agent = AgentModel(name="pg-agent", state="active", drained=False, queues=["default"], concurrency=2,
                           free_slots=1, versions=plane_versions(), token_id=token.id, registered_at=now,
                           last_heartbeat_at=now)
        s.add(agent)
        s.flush()
        for i, (queue, state, age) in enumerate([("default", "running", 5), ("default", "queued", 30),
                                                 ("default", "queued", 90), ("gpu", "queued", 40), ("gpu", "success", 9)]):
            s.add(WorkItemModel(kind="task", key=["ti", "d", f"t{i}", "r", -1, 1], key_digest=f"k{i}", dag_id="d",
                                run_id="r", queue=queue, workload="{}", state=state, fence=1, report_pending=False,
                                queued_at=now - timedelta(seconds=age),
                                agent_id=agent.id if state == "running" else None))
    with db.session() as s:
        view = build_overview(s, SimpleAuthManagerUser(username="admin", role="admin"))
    (a,) = view.agents
    assert (a.health, a.slots_used, [w.label for w in a.running], a.token_status) == (
        "healthy", 1, ["d.t0 r try 1"], "active")
    queues = {q.queue: q for q in view.queues}
    assert (queues["default"].queued, queues["default"].running, queues["default"].warning) == (2, 1, None)
    assert 89 <= queues["default"].oldest_queued_age < 100
    assert queues["gpu"].queued == 1 and queues["gpu"].agents == [] and "no live agent" in queues["gpu"].warning
