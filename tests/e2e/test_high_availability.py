"""
Several api-servers and schedulers share one plane: two api-server processes behind a round-robin
proxy, two schedulers (Airflow's HA scheduler on PostgreSQL), three agents. A few hundred tasks run
while one api-server is restarted: none is lost, none runs twice, none fails, and no agent is
declared lost.
"""

from __future__ import annotations

import shutil
import time
from collections import Counter
from pathlib import Path

import pytest
import requests

from fault_proxy import FaultProxy
from localplane import AIRFLOW, Agent, Plane, Proc, fresh_pg_database, free_port, shutdown, wait_for

pytestmark = pytest.mark.e2e
TEST_DAGS = Path(__file__).parent / "dags"
TASKS = 240


def test_two_api_servers_and_two_schedulers_lose_nothing_while_one_api_server_restarts(tmp_path, pg_url):
    dags = tmp_path / "dags"
    dags.mkdir()
    shutil.copy(TEST_DAGS / "remote_ha_load.py", dags)
    executions = tmp_path / "executions.log"
    plane = Plane(tmp_path / "plane", db_url=fresh_pg_database(pg_url, "high_availability"), dags_folder=dags,
                  extra_env={"AIRFLOW__REMOTE_EXECUTION__HEARTBEAT_INTERVAL": "3"})
    second_port = free_port()
    second_env = {**plane.env, "AIRFLOW__API__PORT": str(second_port)}
    extra: list[Proc] = []
    agents: list[Agent] = []
    proxy = None
    try:
        plane.start()
        extra.append(Proc("api-server-2", [AIRFLOW, "api-server"], second_env, plane.logs))
        extra.append(Proc("scheduler-2", [AIRFLOW, "scheduler"], plane.env, plane.logs))
        wait_for(lambda: requests.get(f"http://127.0.0.1:{second_port}/api/v2/monitor/health", timeout=2).ok,
                 120, "the second api-server")
        proxy = FaultProxy([("127.0.0.1", plane.port), ("127.0.0.1", second_port)])
        for i in range(3):
            agent = Agent(f"ha-{i}", tmp_path / f"agent-{i}", proxy.url, plane.create_agent_token(f"ha-{i}", "ha"),
                          concurrency=4, dags_folder=dags).start()
            agents.append(agent)
        for agent in agents:
            agent.wait_registered()

        run_id = plane.trigger("remote_ha_load", conf={"n": TASKS, "log": str(executions)})
        wait_for(lambda: executions.exists() and len(executions.read_text().splitlines()) >= TASKS // 4, 300,
                 "a quarter of the tasks")
        # Restart the first api-server (the one the test's REST calls use too) in the middle of the run.
        plane.stop_component("api-server")
        time.sleep(3)
        plane.start_component("api-server")
        plane.wait_healthy()

        assert plane.wait_run("remote_ha_load", run_id, timeout=600) == "success"
        tis = [ti for ti in _all_task_instances(plane, run_id) if ti["task_id"] == "work"]
        assert len(tis) == TASKS
        assert Counter((ti["state"], ti["try_number"]) for ti in tis) == {("success", 1): TASKS}
        ran = Counter(int(line.split()[0]) for line in executions.read_text().splitlines())
        assert sorted(ran) == list(range(TASKS)) and set(ran.values()) == {1}, "a task ran twice (or not at all)"
        items = plane.settled_work_items(dag_id="remote_ha_load", run_id=run_id)
        assert Counter(w["state"] for w in items) == {"success": TASKS + 1}
        assert {w["agent_name"] for w in items} == {a.name for a in agents}, "all three agents worked"
        states = {a["name"]: a["state"] for a in plane.api("GET", "/remote_execution/v1/admin/agents").json()}
        assert states == {a.name: "active" for a in agents}
        assert len(proxy.relayed) == 2 and min(proxy.relayed.values()) > 50, proxy.relayed  # both served agents
    finally:
        for proc in extra:
            proc.stop()
        shutdown(plane, agents)
        for proc in extra:
            print(f"--- {proc.name}\n{proc.tail(40)}")
        if proxy is not None:
            proxy.stop()


def _all_task_instances(plane: Plane, run_id: str) -> list[dict]:
    """Every task instance of the run: the REST API answers at most 100 a page."""
    found: list[dict] = []
    while True:
        r = plane.api("GET", f"/api/v2/dags/remote_ha_load/dagRuns/{run_id}/taskInstances",
                      params={"limit": 100, "offset": len(found)})
        r.raise_for_status()
        page = r.json()["task_instances"]
        found += page
        if len(page) < 100:
            return found
