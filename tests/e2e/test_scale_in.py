"""
Scale-in that never kills running work: a worker group of three agents runs twelve tasks (six at a time,
six queued); while six run, the group shrinks to one, as a StatefulSet scale-in would do it: the highest
ordinals get SIGTERM on the agent's process alone (the chart's preStop hook sends it, the kubelet's own
SIGTERM follows). Each stopping agent drains: it leases nothing new, finishes what it runs and exits 0.
No task fails or is retried (every task instance succeeds on try 1), and the remaining agent runs the rest.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from localplane import Agent, Plane, fresh_pg_database, wait_for

pytestmark = pytest.mark.e2e
DAGS = Path(__file__).parent / "dags"
DAG, QUEUE, SLOTS = "remote_scale_in", "scale-in", 2


@pytest.fixture(scope="module")
def group(tmp_path_factory, pg_url):
    base = tmp_path_factory.mktemp("scale-in")
    dags = base / "dags"
    dags.mkdir()
    shutil.copy(DAGS / "remote_fleet_fanout.py", dags)
    plane = Plane(base / "plane", db_url=fresh_pg_database(pg_url, "scale_in"), dags_folder=dags)
    agents: list[Agent] = []
    try:
        plane.start()
        for i in range(3):
            name = f"scale-in-{i}"
            agents.append(Agent(name, base / name, plane.url, plane.create_agent_token(name, QUEUE), concurrency=SLOTS,
                                dags_folder=dags, extra_env={"AIRFLOW__REMOTE_EXECUTION__SHUTDOWN_TIMEOUT": "120"}))
        for agent in agents:
            agent.start()
        for agent in agents:
            agent.wait_registered()
        yield plane, agents
    finally:
        for agent in agents:
            agent.stop()
        plane.stop()
        for proc in [*plane.history, *(a.proc for a in agents if a.proc)]:
            print(f"--- {proc.name}\n{proc.tail(40)}")


def running_on(plane: Plane) -> dict[str, int]:
    counts: dict[str, int] = {}
    for item in plane.work_items(state="running"):
        counts[item["agent_name"]] = counts.get(item["agent_name"], 0) + 1
    return counts


def test_shrinking_the_group_while_tasks_run_fails_nothing(group):
    plane, agents = group
    runs = [plane.trigger(DAG, conf={"seconds": 12}) for _ in range(2)]  # 12 tasks for 6 slots

    # Every agent busy: two tasks each, six more queued.
    wait_for(lambda: running_on(plane) == {a.name: SLOTS for a in agents}, 240, "all six slots running", 0.5)

    # Scale 3 -> 1: the highest ordinals go, busy as they are; SIGTERM to the agent process only.
    leaving = agents[1:]
    for agent in leaving:
        os.kill(agent.proc.pid, signal.SIGTERM)
    for agent in leaving:
        try:
            code = agent.proc.popen.wait(180)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{agent.name} did not drain within 180 s")
        assert code == 0, f"{agent.name} exited {code}"
        log = agent.proc.log_path.read_text(errors="replace")
        assert "Terminating work" not in log, f"{agent.name} killed running work"

    for run_id in runs:
        assert plane.wait_run(DAG, run_id, timeout=300) == "success"
        tis = plane.task_instances(DAG, run_id)
        assert len(tis) == 6
        assert [(t["task_id"], t["state"], t["try_number"]) for t in tis if (t["state"], t["try_number"]) != ("success", 1)] == []

    items = plane.settled_work_items()
    by_agent: dict[str, int] = {}
    for item in items:
        assert item["state"] == "success", item
        by_agent[item["agent_name"]] = by_agent.get(item["agent_name"], 0) + 1
    # The leaving agents finished only what they ran when told to stop; the remaining one ran the rest.
    assert by_agent == {agents[0].name: 12 - 2 * SLOTS, agents[1].name: SLOTS, agents[2].name: SLOTS}, by_agent
    states = {a["name"]: a["state"] for a in plane.api("GET", "/remote_execution/v1/admin/agents").json()}
    assert states[agents[1].name] == states[agents[2].name] == "offline"
