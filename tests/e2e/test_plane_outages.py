"""
The plane goes away and comes back, on PostgreSQL with real processes: a 60 s api-server outage and a
scheduler restart mid-run fail nothing (the agent keeps running what it started, the Task SDK rides out
the outage, nobody is declared lost, a new scheduler adopts the running work); a revoked token stops an
agent leasing and a new token dropped in its token_file resumes it without a restart.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from localplane import Agent, Plane, fresh_pg_database, shutdown, wait_for

pytestmark = pytest.mark.e2e
TEST_DAGS = Path(__file__).parent / "dags"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, pg_url):
    base = tmp_path_factory.mktemp("outages")
    dags = base / "dags"
    dags.mkdir()
    shutil.copy(TEST_DAGS / "remote_outage.py", dags)
    plane = Plane(base / "plane", db_url=fresh_pg_database(pg_url, "outages"), dags_folder=dags)
    agent = None
    try:
        plane.start()
        agent = Agent("steady", base / "agent", plane.url, plane.create_agent_token("steady", "default"), dags_folder=dags)
        agent.start().wait_registered()
        yield plane, agent
    finally:
        shutdown(plane, [agent])


def _all_running(plane: Plane, run_id: str, n: int) -> bool:
    items = plane.work_items(dag_id="remote_outage", run_id=run_id)
    return sum(w["state"] == "running" for w in items) >= n


def _assert_nothing_failed(plane: Plane, run_id: str) -> None:
    assert plane.wait_run("remote_outage", run_id, timeout=400) == "success"
    tis = plane.task_instances("remote_outage", run_id)
    assert {(t["task_id"], t["state"], t["try_number"]) for t in tis} == {
        ("spans", "success", 1), ("ends_during", "success", 1), ("after", "success", 1)
    }
    items = plane.settled_work_items(dag_id="remote_outage", run_id=run_id, timeout=60)
    assert {w["state"] for w in items} == {"success"} and {w["agent_name"] for w in items} == {"steady"}
    assert len(items) == 5  # one try each: nothing ran twice


def test_a_60s_api_server_outage_fails_nothing(cluster):
    plane, agent = cluster
    run_id = plane.trigger("remote_outage", conf={"long": 100, "short": 20})
    wait_for(lambda: _all_running(plane, run_id, 4), 180, "spans and ends_during running")
    plane.stop_component("api-server")
    outage_started = time.monotonic()
    time.sleep(60)  # ends_during finish in here; their reports and every heartbeat fail meanwhile
    plane.start_component("api-server")
    plane.wait_healthy()
    assert time.monotonic() - outage_started >= 60
    _assert_nothing_failed(plane, run_id)
    agents = plane.api("GET", "/remote_execution/v1/admin/agents").json()
    assert [(a["name"], a["state"]) for a in agents] == [("steady", "active")]
    log = agent.proc.log_path.read_text(errors="replace")
    assert "Heartbeat failed" in log  # the agent did see the outage


def test_a_scheduler_restart_mid_run_loses_nothing(cluster):
    plane, _agent = cluster
    run_id = plane.trigger("remote_outage", conf={"long": 30, "short": 15})
    wait_for(lambda: _all_running(plane, run_id, 4), 180, "spans and ends_during running")
    plane.stop_component("scheduler")
    plane.start_component("scheduler")  # adopts the running work items
    _assert_nothing_failed(plane, run_id)
    log = plane.procs["scheduler"].log_path.read_text(errors="replace")
    assert "Adopting" in log or "adopt" in log.lower()


def test_revoked_token_stops_leasing_until_a_new_token_is_in_the_file(cluster):
    plane, agent = cluster
    listed = plane.api("GET", "/remote_execution/v1/admin/tokens", params={"agent_name": "steady"}).json()
    (token_id,) = [t["id"] for t in listed if t["status"] == "active"]
    plane.airflow("remote-execution", "tokens", "revoke", token_id)
    wait_for(lambda: "Agent token rejected" in agent.proc.log_path.read_text(errors="replace"), 60, "the agent to notice")
    run_id = plane.trigger("remote_outage", conf={"long": 1, "short": 1})
    time.sleep(15)
    items = plane.work_items(dag_id="remote_outage", run_id=run_id)
    assert items and {w["state"] for w in items} == {"queued"}  # nothing leased with a revoked token

    (agent.home / "agent-token").write_text(plane.create_agent_token("steady", "default"))
    _assert_nothing_failed(plane, run_id)
    assert "using the new token from [remote_execution] token_file" in agent.proc.log_path.read_text(errors="replace")
