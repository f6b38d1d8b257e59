"""
An agent dies (kill -9 of it and its task processes): the plane notices within a few heartbeat
intervals, fails its running try so Airflow retries it, and a healthy agent runs the retry.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from localplane import Agent, Plane, fresh_pg_database, shutdown, wait_for

pytestmark = pytest.mark.e2e
TEST_DAGS = Path(__file__).parent / "dags"


def test_killed_agent_is_lost_and_its_task_retried_elsewhere(tmp_path, pg_url):
    dags = tmp_path / "dags"
    dags.mkdir()
    shutil.copy(TEST_DAGS / "remote_sleepy.py", dags)
    plane = Plane(
        tmp_path / "plane",
        db_url=fresh_pg_database(pg_url, "agent_failures"),
        dags_folder=dags,
        extra_env={"AIRFLOW__REMOTE_EXECUTION__HEARTBEAT_INTERVAL": "3"},
    )
    agents: dict[str, Agent] = {}
    try:
        plane.start()
        victim_token = plane.create_agent_token("victim", "drain")
        agents["victim"] = Agent("victim", tmp_path / "victim", plane.url, victim_token, dags_folder=dags).start()
        agents["victim"].wait_registered()
        run_id = plane.trigger("remote_sleepy", conf={"seconds": 120})
        (item,) = wait_for(
            lambda: [w for w in plane.work_items(dag_id="remote_sleepy", run_id=run_id) if w["state"] == "running"],
            120,
            "the victim to start the task",
        )
        assert item["agent_name"] == "victim"
        agents["survivor"] = Agent(
            "survivor", tmp_path / "survivor", plane.url, plane.create_agent_token("survivor", "drain"), dags_folder=dags
        ).start()
        agents["survivor"].wait_registered()
        agents["victim"].kill()

        assert plane.wait_run("remote_sleepy", run_id, timeout=120) == "success"
        tries = {w["key"][5]: w for w in plane.settled_work_items(dag_id="remote_sleepy", run_id=run_id)}
        assert (tries[1]["agent_name"], tries[1]["state"], tries[1]["info"]) == (
            "victim", "failed", "agent victim lost (no heartbeat)"
        )
        assert (tries[2]["agent_name"], tries[2]["state"]) == ("survivor", "success")
        states = {a["name"]: a["state"] for a in plane.api("GET", "/remote_execution/v1/admin/agents").json()}
        assert states == {"victim": "lost", "survivor": "active"}
    finally:
        shutdown(plane, agents.values())
