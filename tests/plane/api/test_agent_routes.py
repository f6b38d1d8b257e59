"""The Remote Execution API (api/app.py) in-process with starlette's TestClient, on a real SQLite DB."""

from __future__ import annotations

import json
import threading
import time
from datetime import timedelta

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.testclient import TestClient

from airflow.models.taskinstancekey import TaskInstanceKey
from airflow.sdk import timezone
from airflow.utils.session import create_session

from airflow_remote_execution.plane import exec_guard, leases, tokens
from airflow_remote_execution.plane.api.app import create_app
from airflow_remote_execution.models import AgentModel, AgentTokenModel, WorkItemModel

pytestmark = pytest.mark.usefixtures("airflow_db")


@pytest.fixture(scope="module")
def client():
    with TestClient(create_app(), raise_server_exceptions=True) as c:
        yield c


def new_token(name: str = "agent-1", queues=("default", "gpu"), expires_in: str | None = None) -> str:
    with create_session() as s:
        return tokens.create(s, agent_name=name, queues=list(queues), expires_in=expires_in)[0]


def auth(token: str | None) -> dict:
    return {"Authorization": f"Bearer {token}"} if token else {}


def post(client, path: str, token: str | None, body, **kw):
    return client.post(f"/v1{path}", json=body, headers=auth(token), **kw)


def registered(client, name: str = "agent-1", queues=("default", "gpu"), **body) -> str:
    token = new_token(name, queues)
    r = post(client, "/agents/register", token, {"concurrency": 2, **body})
    assert r.status_code == 200, r.text
    return token


def enqueue(task: str, queue: str = "default", priority: int = 1, workload: str = '{"type": "ExecuteTask"}') -> int:
    key = TaskInstanceKey(dag_id="d", task_id=task, run_id="r", try_number=1, map_index=-1)
    with create_session() as s:
        leases.enqueue(s, key=key, kind="task", queue=queue, priority_weight=priority, workload=workload)
    with create_session() as s:
        return s.query(WorkItemModel.id).filter(WorkItemModel.key_digest == leases.key_digest(leases.key_to_json(key))).scalar()


def state_of(work_id: int) -> str:
    with create_session() as s:
        return s.get(WorkItemModel, work_id).state


# ------------------------------------------------------------------ register


def test_register(client):
    token = new_token(queues=("default", "gpu"))
    r = post(client, "/agents/register", token, {"concurrency": 3, "hostname": "h", "versions": {"python": "3.11"}})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["name"] == "agent-1" and body["queues"] == ["default", "gpu"]
    assert body["heartbeat_interval"] == 5.0 and body["long_poll_wait"] == 20.0
    with create_session() as s:
        agent = s.get(AgentModel, body["agent_id"])
        assert (agent.concurrency, agent.hostname, agent.versions) == (3, "h", {"python": "3.11"})
    r = post(client, "/agents/register", token, {"concurrency": 1, "queues": ["gpu"], "name": "agent-1"})
    assert r.status_code == 200 and r.json()["queues"] == ["gpu"] and r.json()["agent_id"] == body["agent_id"]


def test_register_forbidden(client):
    token = new_token(queues=("default",))
    r = post(client, "/agents/register", token, {"concurrency": 1, "queues": ["default", "analytics"]})
    assert r.status_code == 403 and "Queue(s) analytics are outside token" in r.json()["detail"]
    r = post(client, "/agents/register", token, {"concurrency": 1, "name": "someone-else"})
    assert r.status_code == 403 and "belongs to agent 'agent-1', not 'someone-else'" in r.json()["detail"]


@pytest.mark.parametrize(
    "body",
    [{"concurrency": 0}, {"concurrency": "many"}, {"concurrency": 1, "bogus": True}, [], {}, {"concurrency": 1, "name": "x" * 251}],
)
def test_register_validation(client, body):
    assert post(client, "/agents/register", new_token(), body).status_code == 422


# ------------------------------------------------------------------ authentication


def test_token_errors_are_401_and_say_why(client):
    good = new_token()
    token_id, secret = good.split("_", 2)[1:]
    expired = new_token("old-agent")
    revoked = new_token("revoked-agent")
    with create_session() as s:
        s.get(AgentTokenModel, expired.split("_")[1]).expires_at = timezone.utcnow() - timedelta(seconds=1)
        tokens.revoke(s, revoked.split("_")[1])
    wrong = good[:-4] + ("AAAA" if not good.endswith("AAAA") else "BBBB")

    cases = [
        ({}, "Missing agent token: send 'Authorization: Bearer <agent token>'"),
        ({"Authorization": ""}, "Missing agent token"),
        ({"Authorization": f"Basic {good}"}, "Malformed Authorization header: expected 'Bearer <agent token>'"),
        ({"Authorization": "Bearer   "}, "Malformed Authorization header"),
        (auth("not-a-token"), "Malformed agent token"),
        (auth(wrong), "Invalid agent token: no such token"),
        (auth(expired), "expired at"),
        (auth(revoked), "was revoked at"),
    ]
    for headers, message in cases:
        for path, body in (("/agents/register", {"concurrency": 1}), ("/agents/heartbeat", {"free_slots": 1}), ("/leases", {"slots": 1, "wait": 0})):
            r = client.post(f"/v1{path}", json=body, headers=headers)
            assert r.status_code == 401, (headers, path, r.text)
            assert message in r.json()["detail"], (headers, path, r.text)
            assert r.headers["WWW-Authenticate"] == "Bearer"
            assert secret not in r.text and wrong.split("_", 2)[2] not in r.text
    # The good token is fine.
    assert post(client, "/agents/register", good, {"concurrency": 1}).status_code == 200


def test_routes_need_a_registered_agent(client):
    token = new_token()
    for path, body in (
        ("/agents/heartbeat", {"free_slots": 1}),
        ("/leases", {"slots": 1, "wait": 0}),
        ("/work/1/start", {"fence": 1}),
        ("/work/1/finish", {"fence": 1, "outcome": "success"}),
        ("/work/1/release", {"fence": 1}),
    ):
        r = post(client, path, token, body)
        assert r.status_code == 409, (path, r.text)
        assert r.json()["detail"] == "Agent 'agent-1' is not registered: POST /agents/register first"


# ------------------------------------------------------------------ heartbeat


def test_heartbeat(client, monkeypatch):
    token = registered(client)
    other = registered(client, "agent-2")
    mine, theirs = enqueue("mine", priority=2), enqueue("theirs", priority=1)
    assert [l["work_id"] for l in post(client, "/leases", token, {"slots": 1, "wait": 0}).json()["leases"]] == [mine]
    assert [l["work_id"] for l in post(client, "/leases", other, {"slots": 1, "wait": 0}).json()["leases"]] == [theirs]

    monkeypatch.setenv("AIRFLOW__REMOTE_EXECUTION__HEARTBEAT_INTERVAL", "7")
    r = post(client, "/agents/heartbeat", token, {"running": [mine, theirs, 31337], "free_slots": 1})
    assert r.status_code == 200, r.text
    assert r.json() == {"heartbeat_interval": 7.0, "kill": [theirs, 31337], "drain": False}

    r = post(client, "/agents/heartbeat", token, {"running": [mine], "free_slots": 1, "draining": True})
    assert r.json()["drain"] is False and r.json()["kill"] == []
    # An agent that is shutting down is handed no new work.
    enqueue("more")
    r = post(client, "/leases", token, {"slots": 5, "wait": 0})
    assert r.status_code == 200 and r.json() == {"leases": []}
    r = post(client, "/agents/heartbeat", token, {"free_slots": 1, "offline": True})
    with create_session() as s:
        assert s.query(AgentModel.state).filter(AgentModel.name == "agent-1").scalar() == "offline"

    for body in ({"free_slots": -1}, {"free_slots": 1, "running": ["a"]}, {"free_slots": 1, "kill": []}):
        assert post(client, "/agents/heartbeat", token, body).status_code == 422


# ------------------------------------------------------------------ leases


def test_lease_returns_queued_work_at_once(client):
    token = registered(client, queues=("default", "gpu"))
    low = enqueue("low", priority=1, workload='{"type": "ExecuteTask", "n": 1}')
    high = enqueue("high", "gpu", priority=5)
    enqueue("elsewhere", "analytics", priority=100)
    started = time.monotonic()
    r = post(client, "/leases", token, {"slots": 5, "wait": 10})
    assert time.monotonic() - started < 2
    assert r.status_code == 200, r.text
    got = r.json()["leases"]
    assert [(l["work_id"], l["fence"], l["queue"], l["kind"]) for l in got] == [(high, 1, "gpu", "task"), (low, 1, "default", "task")]
    assert got[1]["workload"] == {"type": "ExecuteTask", "n": 1}
    assert state_of(high) == "leased"


def test_lease_slots_limit(client):
    token = registered(client)
    ids = [enqueue(f"t{i}") for i in range(3)]
    r = post(client, "/leases", token, {"slots": 2, "wait": 0})
    assert [l["work_id"] for l in r.json()["leases"]] == ids[:2]
    assert state_of(ids[2]) == "queued"


def test_lease_serves_only_registered_queues_within_the_token(client):
    token = new_token(queues=("default", "gpu"))
    assert post(client, "/agents/register", token, {"concurrency": 1, "queues": ["gpu"]}).status_code == 200
    enqueue("default-work", "default")
    r = post(client, "/leases", token, {"slots": 5, "wait": 0})
    assert r.json() == {"leases": []}


def test_lease_returns_empty_after_wait(client):
    token = registered(client)
    started = time.monotonic()
    r = post(client, "/leases", token, {"slots": 1, "wait": 0.3})
    elapsed = time.monotonic() - started
    assert r.status_code == 200 and r.json() == {"leases": []}
    assert 0.3 <= elapsed < 2.0, elapsed


def test_lease_wait_is_capped_by_long_poll_wait(client, monkeypatch):
    token = registered(client)
    monkeypatch.setenv("AIRFLOW__REMOTE_EXECUTION__LONG_POLL_WAIT", "0.2")
    started = time.monotonic()
    r = post(client, "/leases", token, {"slots": 1, "wait": 60})
    assert r.json() == {"leases": []}
    assert time.monotonic() - started < 1.5


def test_long_poll_wakes_up_when_work_is_queued(client):
    token = registered(client)
    queued_at: list[float] = []

    def enqueue_later():
        time.sleep(0.3)
        queued_at.append(time.monotonic())
        enqueue("late")

    thread = threading.Thread(target=enqueue_later)
    started = time.monotonic()
    thread.start()
    r = post(client, "/leases", token, {"slots": 1, "wait": 10})
    answered = time.monotonic()
    thread.join()
    assert r.status_code == 200 and len(r.json()["leases"]) == 1
    # Woken by the waker, not by the once-a-second re-check or the end of the wait.
    assert answered - queued_at[0] < 0.6, f"answered {answered - queued_at[0]:.3f}s after the work was queued"
    assert answered - started < 1.0


def test_concurrent_long_polls_share_the_work(client):
    agent_tokens = [registered(client, f"agent-{i}") for i in range(3)]
    results: dict[int, list] = {}

    def poll(i: int):
        r = post(client, "/leases", agent_tokens[i], {"slots": 1, "wait": 3})
        results[i] = [l["work_id"] for l in r.json()["leases"]]

    threads = [threading.Thread(target=poll, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.2)
    ids = [enqueue(f"w{i}") for i in range(3)]
    for t in threads:
        t.join(10)
    assert sorted(w for got in results.values() for w in got) == sorted(ids)


@pytest.mark.parametrize("body", [{"slots": 0}, {"slots": 1001}, {"slots": 1, "wait": -1}, {"slots": 1, "wait": 121}, {"slots": "x"}, {"slots": 1, "x": 1}])
def test_lease_validation(client, body):
    assert post(client, "/leases", registered(client), body).status_code == 422


# ------------------------------------------------------------------ start / finish / release


def test_start_finish(client):
    token = registered(client)
    work_id = enqueue("t")
    (lease,) = post(client, "/leases", token, {"slots": 1, "wait": 0}).json()["leases"]
    r = post(client, f"/work/{work_id}/start", token, {"fence": lease["fence"]})
    assert r.status_code == 200 and r.json() == {"work_id": work_id, "state": "running", "fence": 1, "task_run": None}
    r = post(client, f"/work/{work_id}/finish", token, {"fence": 1, "outcome": "failed", "info": "exit code 3"})
    assert r.status_code == 200 and r.json() == {"work_id": work_id, "state": "failed", "fence": 1}
    with create_session() as s:
        assert s.get(WorkItemModel, work_id).info == "exit code 3"


def _jwt(sub: str, scope: str) -> str:
    """A token as the scheduler (workload) or the execution API (execution) issues it."""
    return exec_guard._generator().generate({"sub": sub, "scope": scope})


def test_start_makes_the_execution_api_start_report_for_a_forked_task():
    """Mounted beside an execution API (as in ``airflow api-server``), a confirmed start with the task's
    process is reported to it in-process, with the workload's own token; its answer comes back as is."""
    seen = []
    execution = FastAPI()

    @execution.patch("/task-instances/{ti_id}/run")
    async def run(ti_id: str, request: Request):
        seen.append((ti_id, request.headers["authorization"], request.headers["airflow-api-version"], await request.json()))
        return JSONResponse({"max_tries": 3}, headers={"Refreshed-API-Token": execution_jwt})

    root = FastAPI()
    root.mount("/execution", execution)
    root.mount("/remote_execution", create_app())
    process = {"pid": 4242, "hostname": "agent-host", "unixname": "airflow", "api_version": "2026-04-01"}
    workload_jwt, execution_jwt = _jwt("ti-1", "workload"), _jwt("ti-1", "execution")
    with TestClient(root, base_url="http://testserver/remote_execution") as c:
        token = registered(c, "reporter")
        work_id = enqueue("reported", workload=json.dumps({"type": "ExecuteTask", "token": workload_jwt, "ti": {"id": "ti-1"}}))
        (lease,) = post(c, "/leases", token, {"slots": 1, "wait": 0}).json()["leases"]
        # The agent gets the workload's token bound to this lease (plane/exec_guard.py).
        assert exec_guard.bound_claims(lease["workload"]["token"])["rex_work"] == work_id
        assert post(c, f"/work/{work_id}/start", token, {"fence": lease["fence"] + 1, "task": process}).status_code == 409
        assert seen == []  # not confirmed: nothing reported
        r = post(c, f"/work/{work_id}/start", token, {"fence": lease["fence"], "task": process})
    assert r.status_code == 200, r.text
    task_run = r.json()["task_run"]
    swapped = task_run["headers"].pop("refreshed-api-token")
    assert task_run == {"status": 200, "headers": {"content-type": "application/json"}, "body": '{"max_tries":3}'}
    # The execution token Airflow swapped in comes back bound to the lease too.
    claims = exec_guard.bound_claims(swapped)
    assert (claims["sub"], claims["scope"], claims["rex_work"], claims["rex_fence"]) == ("ti-1", "execution", work_id, lease["fence"])
    ((ti_id, authorization, version, body),) = seen
    assert (ti_id, authorization, version) == ("ti-1", f"Bearer {workload_jwt}", "2026-04-01")
    assert {k: body[k] for k in ("state", "pid", "hostname", "unixname")} == {
        "state": "running", "pid": 4242, "hostname": "agent-host", "unixname": "airflow"
    }
    with create_session() as s:  # no stamp from the agent: when the plane confirmed the lease
        assert timezone.parse(body["start_date"]) == s.get(WorkItemModel, work_id).started_at
    assert timezone.utcnow() - timezone.parse(body["start_date"]) < timedelta(minutes=1)
    assert state_of(work_id) == "running"


@pytest.mark.parametrize("skew", ["none", "behind", "ahead"])
def test_start_date_is_the_agents_stamp_kept_between_lease_and_confirmation(skew):
    """The task's start_date is the agent's clock when it asked (as a supervisor stamps before asking);
    a clock skewed behind the lease or ahead of the confirmation cannot move it outside them."""
    seen = []
    execution = FastAPI()

    @execution.patch("/task-instances/{ti_id}/run")
    async def run(ti_id: str, request: Request):
        seen.append(await request.json())
        return JSONResponse({})

    root = FastAPI()
    root.mount("/execution", execution)
    root.mount("/remote_execution", create_app())
    with TestClient(root, base_url="http://testserver/remote_execution") as c:
        token = registered(c, f"stamper-{skew}")
        work_id = enqueue(f"stamped-{skew}", workload=json.dumps({"type": "ExecuteTask", "token": _jwt("ti-2", "workload"), "ti": {"id": "ti-2"}}))
        (lease,) = post(c, "/leases", token, {"slots": 1, "wait": 0}).json()["leases"]
        time.sleep(0.05)
        stamp = {"none": timezone.utcnow(), "behind": timezone.utcnow() - timedelta(hours=1),
                 "ahead": timezone.utcnow() + timedelta(hours=1)}[skew]
        process = {"pid": 1, "hostname": "h", "unixname": "u", "api_version": "2026-04-01",
                   "start_date": stamp.isoformat()}
        assert post(c, f"/work/{work_id}/start", token, {"fence": lease["fence"], "task": process}).status_code == 200
        naive = {**process, "start_date": "2026-11-22T10:00:00"}
        assert post(c, f"/work/{work_id}/start", token, {"fence": lease["fence"], "task": naive}).status_code == 422
    with create_session() as s:
        item = s.get(WorkItemModel, work_id)
        expected = {"none": stamp, "behind": item.leased_at, "ahead": item.started_at}[skew]
    assert timezone.parse(seen[0]["start_date"]) == expected
    if skew == "none":
        assert item.leased_at < expected < item.started_at


def test_conflicts_and_bad_requests(client):
    owner = registered(client, "owner")
    other = registered(client, "other")
    work_id = enqueue("t")
    (lease,) = post(client, "/leases", owner, {"slots": 1, "wait": 0}).json()["leases"]
    fence = lease["fence"]

    r = post(client, f"/work/{work_id}/start", other, {"fence": fence})
    assert r.status_code == 409 and r.json()["detail"] == f"Work item {work_id} is not leased to agent 'other'"
    r = post(client, f"/work/{work_id}/start", owner, {"fence": fence + 1})
    assert r.status_code == 409 and "Stale fencing token" in r.json()["detail"]
    r = post(client, f"/work/{work_id}/finish", owner, {"fence": fence, "outcome": "success"})
    assert r.status_code == 409 and r.json()["detail"] == f"Work item {work_id} is leased, expected running"
    r = post(client, "/work/999999/start", owner, {"fence": 1})
    assert r.status_code == 404 and r.json()["detail"] == "No work item 999999"
    r = post(client, f"/work/{work_id}/finish", owner, {"fence": fence, "outcome": "queued"})
    assert r.status_code == 422 and r.json()["detail"] == "outcome must be 'success' or 'failed'"
    for path, body in (
        (f"/work/{work_id}/start", {"fence": "x"}),
        (f"/work/{work_id}/start", {"fence": 0}),
        (f"/work/{work_id}/start", {"slots": 1}),
        (f"/work/{work_id}/finish", {"fence": fence, "outcome": "maybe"}),
        (f"/work/{work_id}/finish", {"fence": fence, "outcome": "success", "info": "x" * 10_001}),
        ("/work/abc/start", {"fence": 1}),
    ):
        assert post(client, path, owner, body).status_code == 422, (path, body)
    assert state_of(work_id) == "leased"  # none of that changed anything

    r = post(client, f"/work/{work_id}/release", owner, {"fence": fence})
    assert r.status_code == 200 and r.json() == {"work_id": work_id, "state": "queued", "fence": fence}
    assert post(client, f"/work/{work_id}/release", owner, {"fence": fence}).status_code == 409
    (again,) = post(client, "/leases", other, {"slots": 1, "wait": 0}).json()["leases"]
    assert again["work_id"] == work_id and again["fence"] == fence + 1
    assert post(client, f"/work/{work_id}/start", owner, {"fence": fence}).status_code == 409
    assert post(client, f"/work/{work_id}/start", other, {"fence": fence + 1}).status_code == 200


def test_released_work_wakes_a_waiting_agent(client):
    owner = registered(client, "owner")
    waiting = registered(client, "waiting")
    work_id = enqueue("t")
    (lease,) = post(client, "/leases", owner, {"slots": 1, "wait": 0}).json()["leases"]
    result: list = []
    thread = threading.Thread(target=lambda: result.append(post(client, "/leases", waiting, {"slots": 1, "wait": 5})))
    thread.start()
    time.sleep(0.2)
    released_at = time.monotonic()
    assert post(client, f"/work/{work_id}/release", owner, {"fence": lease["fence"]}).status_code == 200
    thread.join(10)
    assert time.monotonic() - released_at < 0.6, "woken by the release, not by the once-a-second re-check"
    assert [l["work_id"] for l in result[0].json()["leases"]] == [work_id]


# ------------------------------------------------------------------ admin routes (Airflow auth)


@pytest.fixture(scope="module")
def jwt_for(sqlite_engine):
    """Bearer headers for a SimpleAuthManager user of the given role (Airflow's own auth, initialised in-process)."""
    from airflow.api_fastapi.app import init_auth_manager
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser
    from airflow.models.revoked_token import RevokedToken

    RevokedToken.__table__.create(sqlite_engine, checkfirst=True)
    manager = init_auth_manager()
    return lambda role: {"Authorization": f"Bearer {manager.generate_jwt(SimpleAuthManagerUser(username=role, role=role))}"}


@pytest.mark.parametrize("method, path", [("GET", "/v1/admin/agents"), ("GET", "/v1/admin/work"), ("GET", "/v1/admin/tokens"), ("POST", "/v1/admin/tokens"), ("DELETE", "/v1/admin/tokens/abc")])
def test_admin_routes_need_airflow_credentials(client, jwt_for, method, path):
    body = {"agent_name": "x", "queues": ["q"]} if method == "POST" else None
    r = client.request(method, path, json=body)
    assert r.status_code == 401 and r.json()["detail"] == "Not authenticated"
    # An agent token is not an Airflow credential.
    r = client.request(method, path, headers=auth(new_token()), json=body)
    assert r.status_code == 403 and r.json()["detail"] == "Invalid JWT token"
    with create_session() as s:
        assert s.query(AgentTokenModel).filter(AgentTokenModel.agent_name == "x").count() == 0


def test_admin_tokens(client, jwt_for):
    admin, viewer = jwt_for("admin"), jwt_for("viewer")
    r = client.post("/v1/admin/tokens", headers=viewer, json={"agent_name": "x", "queues": ["q"]})
    assert r.status_code == 403
    r = client.post("/v1/admin/tokens", headers=admin, json={"agent_name": "ci-agent", "queues": ["b", "a"], "expires_in": "1d"})
    assert r.status_code == 201, r.text
    created = r.json()
    clear, info = created["token"], created["info"]
    assert info["queues"] == ["a", "b"] and info["status"] == "active" and info["expires_at"]
    # The clear token works for the agent routes and is never listed.
    assert post(client, "/agents/register", clear, {"concurrency": 1}).status_code == 200
    listed = client.get("/v1/admin/tokens", headers=admin)
    assert listed.status_code == 200 and [t["id"] for t in listed.json()] == [info["id"]]
    assert clear.split("_", 2)[2] not in listed.text
    assert client.get("/v1/admin/tokens", headers=admin, params={"agent_name": "nobody"}).json() == []

    r = client.post("/v1/admin/tokens", headers=admin, json={"agent_name": "bad name!", "queues": ["q"]})
    assert r.status_code == 422
    r = client.post("/v1/admin/tokens", headers=admin, json={"agent_name": "x", "queues": ["q"], "expires_in": "forever"})
    assert r.status_code == 422 and "Invalid duration" in r.json()["detail"]
    assert client.delete(f"/v1/admin/tokens/{info['id']}", headers=viewer).status_code == 403
    r = client.delete(f"/v1/admin/tokens/{info['id']}", headers=admin)
    assert r.status_code == 200 and r.json()["status"] == "revoked"
    assert client.delete("/v1/admin/tokens/nope", headers=admin).status_code == 404
    assert post(client, "/agents/heartbeat", clear, {"free_slots": 1}).status_code == 401


def test_admin_agents_and_work(client, jwt_for):
    viewer = jwt_for("viewer")
    token = registered(client, "agent-1")
    w1 = enqueue("t1")
    post(client, "/leases", token, {"slots": 1, "wait": 0})
    enqueue("t2")
    agents_ = client.get("/v1/admin/agents", headers=viewer)
    assert agents_.status_code == 200
    (agent,) = agents_.json()
    assert agent["name"] == "agent-1" and agent["running"] == 1 and agent["state"] == "active"
    work = client.get("/v1/admin/work", headers=viewer).json()
    assert [(w["key"][2], w["state"], w["agent_name"]) for w in work] == [("t2", "queued", None), ("t1", "leased", "agent-1")]
    assert [w["id"] for w in client.get("/v1/admin/work", headers=viewer, params={"state": "leased"}).json()] == [w1]
    assert client.get("/v1/admin/work", headers=viewer, params={"dag_id": "other"}).json() == []
    assert len(client.get("/v1/admin/work", headers=viewer, params={"dag_id": "d", "run_id": "r"}).json()) == 2
    assert client.get("/v1/admin/work", headers=viewer, params={"limit": 0}).status_code == 422
    # Filters apply before the limit: newer items of other DAGs do not hide older matching ones.
    with create_session() as s:
        key = TaskInstanceKey(dag_id="newer", task_id="x", run_id="r", try_number=1, map_index=-1)
        leases.enqueue(s, key=key, kind="task", queue="default", priority_weight=1, workload="{}")
    got = client.get("/v1/admin/work", headers=viewer, params={"dag_id": "d", "limit": 1}).json()
    assert [w["key"][2] for w in got] == ["t2"]


def test_registration_says_when_queued_work_is_out_of_the_tokens_bundles(client):
    """Work of a bundle agents parse goes only to tokens allowing it: an agent whose token does not is told
    at registration, instead of polling and waiting silently."""

    with create_session() as s:
        tokens.create(s, agent_name="bundle-owner", queues=["default"], bundles=["team-b"])
        leases.enqueue(s, key=TaskInstanceKey(dag_id="b", task_id="t", run_id="r", try_number=1, map_index=-1),
                       kind="task", queue="default", priority_weight=1, workload="{}", bundle="team-b")
    tokens._parsed_by_agents = (float("-inf"), frozenset())
    token = new_token("plain-worker", ("default",))
    warnings = post(client, "/agents/register", token, {"concurrency": 1}).json()["warnings"]
    assert len(warnings) == 1 and warnings[0].startswith("1 queued work item(s) on this agent's queues belong to DAG "
                                                         "bundle 'team-b'") and "--bundles team-b" in warnings[0]
    assert post(client, "/leases", token, {"slots": 1, "wait": 0}).json()["leases"] == []


# ------------------------------------------------------------------ what an idle fleet costs


def test_heartbeats_arriving_together_are_written_together(client):
    """Group commit: 40 agents beating at once take far fewer transactions than heartbeats."""
    from airflow_remote_execution.plane.heartbeats import heartbeats

    agent_tokens = [registered(client, f"beat-{i}") for i in range(40)]
    batches, written = heartbeats.batches, heartbeats.written
    barrier = threading.Barrier(len(agent_tokens))
    answers: list[int] = []

    def beat(token: str) -> None:
        barrier.wait()
        answers.append(post(client, "/agents/heartbeat", token, {"free_slots": 2}).status_code)

    threads = [threading.Thread(target=beat, args=(t,)) for t in agent_tokens]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert answers == [200] * 40
    assert heartbeats.written - written == 40
    assert heartbeats.batches - batches < 20, f"{heartbeats.batches - batches} transactions for 40 heartbeats"
    with create_session() as s:
        beaten = s.query(AgentModel).filter(AgentModel.name.like("beat-%")).all()
        assert len(beaten) == 40 and all(a.state == "active" and a.free_slots == 2 for a in beaten)


def test_a_lease_request_is_a_sign_of_life(client):
    token = registered(client)
    old = timezone.utcnow() - timedelta(minutes=5)
    with create_session() as s:
        s.query(AgentModel).filter(AgentModel.name == "agent-1").update({"last_heartbeat_at": old})
    assert post(client, "/leases", token, {"slots": 1, "wait": 0}).status_code == 200

    def heard() -> bool:
        with create_session() as s:
            return s.query(AgentModel.last_heartbeat_at).filter(AgentModel.name == "agent-1").scalar() > old

    deadline = time.monotonic() + 5
    while not heard():
        assert time.monotonic() < deadline, "the lease request was not recorded as a sign of life"
        time.sleep(0.05)


def test_a_token_revoked_by_another_process_stops_working_within_a_second(client):
    """Tokens are verified from memory; revocation elsewhere (CLI, another api-server) still counts within 1 s."""
    token = registered(client)
    assert post(client, "/agents/heartbeat", token, {"free_slots": 1}).status_code == 200  # now cached
    with create_session() as s:
        tokens.revoke(s, token.split("_")[1])  # as `tokens revoke` in another process: not through this cache
    revoked_at = time.monotonic()
    while (status := post(client, "/agents/heartbeat", token, {"free_slots": 1}).status_code) == 200:
        assert time.monotonic() - revoked_at < 1.5, "a revoked token still works after 1.5 s"
        time.sleep(0.05)
    assert status == 401
    assert post(client, "/leases", token, {"slots": 1, "wait": 0}).status_code == 401


def test_one_queued_item_wakes_one_waiting_agent_not_all(client, sqlite_engine):
    """Thousands of idle agents on a queue must not all look when one task is queued."""
    from sqlalchemy import event

    agent_tokens = [registered(client, f"idle-{i}") for i in range(8)]
    lease_statements: list[str] = []

    def count(conn, cursor, statement, *args):
        if statement.lstrip().upper().startswith(("UPDATE REMOTE_WORK_ITEM", "WITH PICKED")):
            lease_statements.append(statement)

    results: list[list] = []

    def poll(token: str) -> None:
        r = post(client, "/leases", token, {"slots": 1, "wait": 2})
        results.append(r.json()["leases"])

    threads = [threading.Thread(target=poll, args=(t,)) for t in agent_tokens]
    for t in threads:
        t.start()
    time.sleep(0.5)  # all waiting (each looked once on arrival)
    event.listen(sqlite_engine, "before_cursor_execute", count)
    try:
        enqueue("one")
        time.sleep(1.0)
    finally:
        event.remove(sqlite_engine, "before_cursor_execute", count)
    for t in threads:
        t.join(10)
    assert sum(len(r) for r in results) == 1
    assert len(lease_statements) <= 2, f"{len(lease_statements)} lease queries for one queued item"


def test_a_locked_sqlite_database_is_a_503_saying_to_use_postgresql(client, sqlite_engine):
    import sqlite3

    token = registered(client)
    locker = sqlite3.connect(sqlite_engine.url.database, timeout=1)
    try:
        locker.execute("BEGIN EXCLUSIVE")
        r = post(client, "/agents/register", token, {"concurrency": 1})
    finally:
        locker.rollback()
        locker.close()
    assert r.status_code == 503, r.text
    assert r.headers["Retry-After"] == "1" and "PostgreSQL" in r.json()["detail"]


def test_a_held_lease_request_keeps_its_agent_alive(client, monkeypatch):
    """Late is not lost: while an agent holds a long-poll here, it is seen, whether its heartbeats get through or not."""
    from airflow_remote_execution.plane import heartbeats as heartbeats_module

    monkeypatch.setattr(heartbeats_module, "HELD_EVERY", 0.3)
    monkeypatch.setattr(heartbeats_module.heartbeats, "interval", 0.0)
    token = registered(client)
    seen: list = []

    def watch() -> None:
        for _ in range(25):
            with create_session() as s:
                seen.append(s.query(AgentModel.last_heartbeat_at).filter(AgentModel.name == "agent-1").scalar())
            time.sleep(0.1)

    watcher = threading.Thread(target=watch)
    watcher.start()
    assert post(client, "/leases", token, {"slots": 1, "wait": 2.5}).json() == {"leases": []}
    watcher.join()
    assert len(set(seen)) >= 4, f"seen only at {sorted(set(seen))}"


def test_an_idle_agents_long_polls_query_nothing_until_work_is_announced(client, sqlite_engine, monkeypatch):
    from sqlalchemy import event

    from airflow_remote_execution.plane.api import agent_routes

    monkeypatch.setattr(agent_routes, "RECHECK_EVERY", 1.5)
    token = registered(client)
    for _ in range(2):  # looked: nothing (the first also starts this process's wake-up listener)
        assert post(client, "/leases", token, {"slots": 1, "wait": 0.3}).json() == {"leases": []}
    lease_queries: list[str] = []

    def count(conn, cursor, statement, *args):
        if statement.lstrip().upper().startswith(("UPDATE REMOTE_WORK_ITEM", "WITH PICKED")):
            lease_queries.append(statement)

    event.listen(sqlite_engine, "before_cursor_execute", count)
    try:
        for _ in range(3):
            assert post(client, "/leases", token, {"slots": 1, "wait": 0.1}).json() == {"leases": []}
        assert lease_queries == [], "an idle agent's long-poll queried although nothing was announced"
        work_id = enqueue("announced")  # leases.enqueue notifies
        assert [l["work_id"] for l in post(client, "/leases", token, {"slots": 1, "wait": 2}).json()["leases"]] == [work_id]
        assert len(lease_queries) == 1
    finally:
        event.remove(sqlite_engine, "before_cursor_execute", count)
    # Work that appears unannounced (nothing in the product does that) is still found within RECHECK_EVERY.
    assert post(client, "/leases", token, {"slots": 1, "wait": 0.1}).json() == {"leases": []}
    with create_session() as s:
        s.query(WorkItemModel).filter(WorkItemModel.id == work_id).update({"state": "queued", "agent_id": None})
    time.sleep(1.6)
    assert [l["work_id"] for l in post(client, "/leases", token, {"slots": 1, "wait": 0.1}).json()["leases"]] == [work_id]


def test_a_drained_agent_woken_for_work_passes_the_wake_up_on(client):
    """Parked without a look (nothing announced), a drained agent can be the one woken: the work still goes out."""
    from airflow_remote_execution.plane import agents

    first, second = registered(client, "pool-0"), registered(client, "pool-1")
    for token in (first, second):  # each looks once and finds nothing
        assert post(client, "/leases", token, {"slots": 1, "wait": 0.1}).json() == {"leases": []}
    with create_session() as s:
        agents.set_drained(s, "pool-0", True)  # pool-0 ranks first for wake-ups
    results: dict[str, list] = {}

    def poll(name: str, token: str) -> None:
        results[name] = post(client, "/leases", token, {"slots": 1, "wait": 4}).json()["leases"]

    threads = [threading.Thread(target=poll, args=item) for item in (("pool-0", first), ("pool-1", second))]
    for t in threads:
        t.start()
    time.sleep(0.5)
    work_id = enqueue("for-pool")
    for t in threads:
        t.join(10)
    assert results["pool-0"] == [] and [l["work_id"] for l in results["pool-1"]] == [work_id]
