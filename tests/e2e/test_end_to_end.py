"""
End to end on real processes: api-server, scheduler and dag-processor with RemoteExecutor, and two
agents (different queues, separate AIRFLOW_HOMEs, a database URL that cannot work) on loopback,
on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import json
import shutil
import signal
import time
from pathlib import Path

import pytest
import requests

from localplane import EXAMPLE_DAGS, Agent, Plane, fresh_pg_database, shutdown, wait_for

pytestmark = pytest.mark.e2e
TEST_DAGS = Path(__file__).parent / "dags"
V1 = "/remote_execution/v1"
# The agents' own Variables and Connections (the plane does not serve its own to agents by default).
AGENT_SECRETS = {
    "AIRFLOW_VAR_REMOTE_DEMO_GREETING": "bonjour",
    "AIRFLOW_CONN_REMOTE_DEMO_HTTP": json.dumps({"conn_type": "http", "host": "example.org"}),
}


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def cluster(request, tmp_path_factory):
    base = tmp_path_factory.mktemp(f"plane-{request.param}")
    dags = base / "dags"
    shutil.copytree(EXAMPLE_DAGS, dags, ignore=shutil.ignore_patterns("__pycache__"))
    for test_dag in ("remote_probe.py", "remote_sleepy.py"):
        shutil.copy(TEST_DAGS / test_dag, dags)
    db_url = fresh_pg_database(request.getfixturevalue("pg_url"), "e2e") if request.param == "postgres" else None
    plane = Plane(
        base / "plane", db_url=db_url, dags_folder=dags, extra_env={"AIRFLOW__CORE__TEST_CONNECTION": "Enabled"}
    )
    agents: list[Agent] = []
    try:
        plane.start()
        for name, queues in (("agent-a", "default"), ("agent-b", "analytics")):
            token = plane.create_agent_token(name, queues)
            agents.append(Agent(name, base / name, plane.url, token, dags_folder=dags, extra_env=AGENT_SECRETS).start())
        for agent in agents:
            agent.wait_registered()
        yield plane, {a.name: a for a in agents}
    finally:
        shutdown(plane, agents)


def test_installed_as_provider_with_documented_api(cluster):
    plane, _ = cluster
    assert "airflow-remote-execution" in plane.airflow("providers", "list").stdout
    config = plane.airflow("config", "list", "--section", "remote_execution", "--include-descriptions").stdout
    for option in ("api_url", "token_file", "heartbeat_interval", "lost_agent_threshold", "long_poll_wait",
                   "concurrency", "queues", "ca_bundle", "client_cert"):
        assert f"{option} =" in config
    spec = requests.get(f"{plane.url}/remote_execution/openapi.json", timeout=10).json()
    assert {"/v1/agents/register", "/v1/agents/heartbeat", "/v1/leases", "/v1/work/{work_id}/start",
            "/v1/work/{work_id}/finish", "/v1/admin/agents", "/v1/admin/tokens"} <= set(spec["paths"])
    listed = plane.airflow("remote-execution", "agents", "list", "--output", "json").stdout
    states = {a["name"]: a["state"] for a in json.loads(listed)}
    assert states.items() >= {"agent-a": "active", "agent-b": "active"}.items()
    # Admin routes use Airflow's auth: no JWT, no answer.
    assert requests.get(f"{plane.url}{V1}/admin/agents", timeout=10).status_code == 401


def _run(plane: Plane, dag_id: str) -> tuple[str, list[dict]]:
    run_id = plane.trigger(dag_id)
    state = plane.wait_run(dag_id, run_id)
    tis = plane.task_instances(dag_id, run_id)
    assert state == "success", tis
    return run_id, tis


def _agents_by_task(plane: Plane, dag_id: str, run_id: str) -> dict[tuple, str]:
    items = plane.work_items(dag_id=dag_id, run_id=run_id)
    return {(w["key"][2], w["key"][4], w["key"][5]): w["agent_name"] for w in items}


def test_fan_out_fan_in_runs_on_agent(cluster):
    plane, agents = cluster
    run_id, tis = _run(plane, "remote_fan_out_fan_in")
    assert {(t["task_id"], t["state"]) for t in tis} == {("numbers", "success"), ("square", "success"), ("total", "success")}
    assert len([t for t in tis if t["task_id"] == "square"]) == 5
    ran_on = _agents_by_task(plane, "remote_fan_out_fan_in", run_id)
    assert len(ran_on) == 7 and set(ran_on.values()) == {"agent-a"}
    # The reducer saw every mapped value through XCom.
    xcom = plane.api("GET", f"/api/v2/dags/remote_fan_out_fan_in/dagRuns/{run_id}/taskInstances/total/xcomEntries/return_value")
    assert xcom.json()["value"] == 55
    # Task logs were written on the agent (its own AIRFLOW_HOME), not on the plane.
    agent_logs = list((agents["agent-a"].home / "logs").rglob(f"run_id={run_id}/task_id=total/*.log"))
    assert agent_logs, "the task log should exist in the agent's home"
    assert not list((plane.home / "logs").rglob(f"run_id={run_id}/task_id=total/*.log"))
    # The plane reported each start to the execution API in the agent's confirmation round trip: the
    # supervisors reported their tasks' ends over HTTP, never a start.
    access = plane.procs["api-server"].log_path.read_text(errors="replace")
    ended = {line.split("task-instances/")[1].split("/")[0] for line in access.splitlines() if "/state query=" in line}
    assert {t["id"] for t in tis} <= ended
    assert "/run query=" not in access
    # Agents' long-polls and heartbeats skip Airflow's root middlewares (plane/api/root_app.py), the access
    # log among them; their other calls do not.
    assert "path=/remote_execution/v1/work/" in access
    assert "path=/remote_execution/v1/leases" not in access and "path=/remote_execution/v1/agents/heartbeat" not in access


def test_queues_route_to_different_agents(cluster):
    plane, _ = cluster
    run_id, _ = _run(plane, "remote_two_queues")
    assert _agents_by_task(plane, "remote_two_queues", run_id) == {
        ("extract", -1, 1): "agent-a",
        ("transform", -1, 1): "agent-b",
        ("load", -1, 1): "agent-a",
    }


def test_variable_and_connection_resolved_on_agent(cluster):
    """From the agent's own secrets: the plane's Connections and Variables of the same names are not served
    to agents' tasks ([remote_execution] serve_plane_secrets_to_agents is off)."""
    plane, _ = cluster
    plane.api("POST", "/api/v2/variables", json={"key": "remote_demo_greeting", "value": "from the plane"})
    plane.api("POST", "/api/v2/connections", json={"connection_id": "remote_demo_http", "conn_type": "http", "host": "plane.internal"})
    run_id, _ = _run(plane, "remote_variable_and_connection")
    xcom = plane.api(
        "GET",
        f"/api/v2/dags/remote_variable_and_connection/dagRuns/{run_id}/taskInstances/read_config/xcomEntries/return_value",
    )
    assert xcom.json()["value"] == "bonjour@example.org"


def test_failed_try_is_retried_on_agent(cluster):
    plane, _ = cluster
    run_id, tis = _run(plane, "remote_retry")
    (flaky,) = tis
    assert flaky["try_number"] == 2
    tries = _agents_by_task(plane, "remote_retry", run_id)
    assert tries == {("flaky", -1, 1): "agent-a", ("flaky", -1, 2): "agent-a"}
    # The first try's process exited cleanly after marking itself up_for_retry: the executor
    # outcome is about the process, the task state comes from the Task SDK.
    states = {w["key"][5]: w["state"] for w in plane.settled_work_items(dag_id="remote_retry", run_id=run_id)}
    assert states == {1: "success", 2: "success"}


def test_deadline_callback_runs_on_agent(cluster):
    plane, agents = cluster
    run_id, _ = _run(plane, "remote_deadline_callback")
    callbacks = wait_for(
        lambda: [w for w in plane.work_items() if w["kind"] == "callback" and w["state"] != "running"],
        60,
        "the deadline callback to finish",
    )
    assert [(w["agent_name"], w["state"]) for w in callbacks] == [("agent-a", "success")]
    (log,) = (agents["agent-a"].home / "logs" / "executor_callbacks" / "remote_deadline_callback" / run_id).iterdir()
    assert "Deadline missed: slow run" in log.read_text()


def test_connection_test_runs_on_agent(cluster):
    plane, agents = cluster
    agent_home = str(agents["agent-b"].home)
    body = {
        "connection_id": "agent_files",
        "conn_type": "fs",
        "extra": json.dumps({"path": agent_home}),
        "queue": "analytics",
    }
    r = plane.api("POST", "/api/v2/connections/enqueue-test", json=body)
    assert r.status_code in (200, 201, 202), r.text
    token = r.json()["token"]

    def finished():
        got = plane.api("GET", "/api/v2/connections/enqueue-test", headers={"Airflow-Connection-Test-Token": token}).json()
        return got if got["state"] in ("success", "failed") else None

    result = wait_for(finished, 90, "the connection test")
    assert result["state"] == "success", result
    assert result["result_message"] == f"Path {agent_home} is existing."
    tests_run = [w for w in plane.settled_work_items() if w["kind"] == "connection_test"]
    assert [(w["agent_name"], w["queue"], w["state"]) for w in tests_run] == [("agent-b", "analytics", "success")]


def test_sigterm_drains_agent(cluster, tmp_path):
    """SIGTERM: the agent leases nothing new, lets its running task finish, then exits 0."""
    plane, _ = cluster
    token = plane.create_agent_token("drainer", "drain")
    drainer = Agent("drainer", tmp_path / "drainer", plane.url, token, dags_folder=plane.dags_folder).start()
    drainer.wait_registered()
    first = plane.trigger("remote_sleepy")
    wait_for(
        lambda: [w for w in plane.work_items(dag_id="remote_sleepy", run_id=first) if w["state"] == "running"],
        120,
        "the first nap to start",
    )
    drainer.proc.signal(signal.SIGTERM)
    second = plane.trigger("remote_sleepy")
    assert drainer.proc.popen.wait(60) == 0
    assert plane.wait_run("remote_sleepy", first, timeout=30) == "success"
    (late,) = plane.work_items(dag_id="remote_sleepy", run_id=second)
    assert late["state"] == "queued" and late["agent_name"] is None
    agents = {a["name"]: a for a in plane.api("GET", f"{V1}/admin/agents").json()}
    assert agents["drainer"]["state"] == "offline"
    # Not stuck: the next agent for the queue runs it.
    again = Agent("drainer", tmp_path / "drainer2", plane.url, token, dags_folder=plane.dags_folder).start()
    try:
        assert plane.wait_run("remote_sleepy", second) == "success"
    finally:
        again.stop()
        drainer.stop()


# ------------------------------------------------------------------------- bad input


def _post(plane: Plane, path: str, token: str | None, body) -> requests.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return requests.post(f"{plane.url}{V1}{path}", json=body, headers=headers, timeout=30)


def test_token_errors_say_what_is_wrong(cluster):
    plane, _ = cluster
    register = {"concurrency": 1}
    r = _post(plane, "/agents/register", None, register)
    assert r.status_code == 401 and "Missing agent token" in r.json()["detail"]
    assert r.headers["WWW-Authenticate"] == "Bearer"

    good = plane.create_agent_token("bad-input", "probe")
    token_id = good.split("_")[1]
    wrong = good[:-4] + ("AAAA" if not good.endswith("AAAA") else "BBBB")
    r = _post(plane, "/agents/register", wrong, register)
    assert r.status_code == 401 and "Invalid agent token" in r.json()["detail"]
    assert good[-20:] not in r.text

    r = _post(plane, "/agents/register", "not-a-token", register)
    assert r.status_code == 401 and "Malformed agent token" in r.json()["detail"]

    expiring = plane.create_agent_token("short-lived", "probe", "--expires-in", "1s")
    time.sleep(1.2)
    r = _post(plane, "/agents/register", expiring, register)
    assert r.status_code == 401 and "expired at" in r.json()["detail"]

    revoked = plane.create_agent_token("revoked-agent", "probe")
    plane.airflow("remote-execution", "tokens", "revoke", revoked.split("_")[1])
    r = _post(plane, "/agents/register", revoked, register)
    assert r.status_code == 401 and "revoked at" in r.json()["detail"]

    r = _post(plane, "/agents/register", good, {"concurrency": 1, "queues": ["probe", "analytics"]})
    assert r.status_code == 403 and "analytics" in r.json()["detail"]
    r = _post(plane, "/agents/register", good, {"concurrency": 1, "name": "agent-a"})
    assert r.status_code == 403 and "belongs to agent 'bad-input'" in r.json()["detail"]

    for body in ({"concurrency": 0}, {"concurrency": "many"}, {"concurrency": 1, "bogus": True}, []):
        assert _post(plane, "/agents/register", good, body).status_code == 422
    listed = plane.airflow("remote-execution", "tokens", "list", "--output", "json").stdout
    assert token_id in listed and good.split("_", 2)[2] not in listed


def test_lease_fencing_and_ownership(cluster, tmp_path):
    """Foreign and stale reports get 409; the work is not stuck and finally runs on a real agent."""
    plane, _ = cluster
    owner = plane.create_agent_token("prober", "probe")
    other = plane.create_agent_token("other-prober", "probe")
    for token in (owner, other):
        assert _post(plane, "/agents/register", token, {"concurrency": 1}).status_code == 200

    run_id = plane.trigger("remote_probe")
    deadline = time.monotonic() + 120
    leases = []
    while not leases and time.monotonic() < deadline:
        r = _post(plane, "/leases", owner, {"slots": 1, "wait": 5})
        assert r.status_code == 200, r.text
        leases = r.json()["leases"]
    (lease,) = leases
    work_id, fence = lease["work_id"], lease["fence"]
    assert lease["workload"]["ti"]["task_id"] == "probe"

    r = _post(plane, f"/work/{work_id}/start", other, {"fence": fence})
    assert r.status_code == 409 and "not leased to agent 'other-prober'" in r.json()["detail"]
    r = _post(plane, f"/work/{work_id}/start", owner, {"fence": fence + 1})
    assert r.status_code == 409 and "Stale fencing token" in r.json()["detail"]
    r = _post(plane, f"/work/{work_id}/finish", owner, {"fence": fence, "outcome": "success"})
    assert r.status_code == 409 and "is leased, expected running" in r.json()["detail"]
    assert _post(plane, f"/work/{work_id}/start", owner, {"fence": "x"}).status_code == 422
    assert _post(plane, f"/work/{work_id}/finish", owner, {"fence": fence, "outcome": "maybe"}).status_code == 422
    assert _post(plane, f"/work/{work_id}/start", owner, {"slots": 1}).status_code == 422
    r = _post(plane, "/leases", owner, {"slots": 0})
    assert r.status_code == 422

    # Hand it back; an agent serving ``probe`` then runs it to success.
    assert _post(plane, f"/work/{work_id}/release", owner, {"fence": fence}).status_code == 200
    r = _post(plane, f"/work/{work_id}/release", owner, {"fence": fence})
    assert r.status_code == 409
    runner = Agent("probe-runner", tmp_path / "probe-runner", plane.url, plane.create_agent_token("probe-runner", "probe"), dags_folder=plane.dags_folder)
    runner.start()
    try:
        assert plane.wait_run("remote_probe", run_id) == "success"
    finally:
        runner.stop()
    items = plane.settled_work_items(dag_id="remote_probe", run_id=run_id)
    assert [(w["agent_name"], w["state"], w["fence"]) for w in items] == [("probe-runner", "success", fence + 1)]
    # The old fence is dead for good.
    r = _post(plane, f"/work/{work_id}/finish", owner, {"fence": fence, "outcome": "failed"})
    assert r.status_code == 409
