"""
Deferrable tasks on agents, end to end: a plane with NO triggerer process (api-server, scheduler,
dag-processor on PostgreSQL) and two agents, each ``agent start --components worker,triggerer``
with no metadata DB. Triggers run on the agents, events resume the tasks on agents, and a kill -9 of the
agent running a long trigger hands that trigger to the other agent at once (not after the
triggerer health threshold, which is set far out of reach here).
"""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import pytest

from localplane import EXAMPLE_DAGS, Agent, Plane, Proc, fresh_pg_database, shutdown, wait_for

pytestmark = pytest.mark.e2e
DAG = "remote_deferrable"


class TriggeringAgent:
    """``agent start --components worker,triggerer``: each component in its own process."""

    def __init__(self, name: str, base: Path, plane: Plane, dags: Path):
        token = plane.create_agent_token(name, "default")
        self.name = name
        self.agent = Agent(
            name, base / name, plane.url, token, dags_folder=dags,
            extra_env={"AIRFLOW__REMOTE_EXECUTION__COMPONENTS": "worker,triggerer",
                       "AIRFLOW__TRIGGERER__CAPACITY": "10"},
        ).start()

    @property
    def home(self) -> Path:
        return self.agent.home

    @property
    def proc(self) -> Proc:
        return self.agent.proc

    def log(self) -> str:
        return self.agent.proc.log_path.read_text(errors="replace")

    def started(self, trigger_id: int) -> bool:
        return f"Starting trigger {trigger_id} " in self.log()

    def kill(self) -> None:
        self.agent.kill()

    def stop(self) -> None:
        self.agent.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, pg_url):
    base = tmp_path_factory.mktemp("triggerer")
    dags = base / "dags"
    dags.mkdir()
    shutil.copy(EXAMPLE_DAGS / f"{DAG}.py", dags)
    plane = Plane(
        base / "plane",
        db_url=fresh_pg_database(pg_url, "agent_triggerer"),
        dags_folder=dags,
        extra_env={
            # Lost after 15 s of silence: quick, yet few false alarms on a busy 2-core machine.
            "AIRFLOW__REMOTE_EXECUTION__HEARTBEAT_INTERVAL": "3",
            "AIRFLOW__REMOTE_EXECUTION__LOST_AGENT_THRESHOLD": "5",
            # Only the lost-agent hook can hand a killed agent's trigger over within this test.
            "AIRFLOW__TRIGGERER__TRIGGERER_HEALTH_CHECK_THRESHOLD": "600",
        },
    )
    agents: dict[str, TriggeringAgent] = {}
    try:
        plane.start(components=("api-server", "scheduler", "dag-processor"))
        for name in ("alpha", "beta"):
            agents[name] = TriggeringAgent(name, base, plane, dags)
        for agent in agents.values():
            agent.agent.wait_registered()
            wait_for(lambda a=agent: "Triggerer registered as" in a.log(), 90, f"{agent.name}'s triggerer")
        plane.wait_dag(DAG)
        yield plane, agents
    finally:
        shutdown(plane, [a.agent for a in agents.values()])


def _states(plane: Plane, run_id: str) -> dict[str, str]:
    return {ti["task_id"]: ti["state"] for ti in plane.task_instances(DAG, run_id)}


def test_deferrable_dag_completes_through_the_agents_triggerer(cluster):
    plane, agents = cluster
    assert "triggerer" not in plane.procs
    run_id = plane.trigger(DAG, conf={"wait_seconds": 10})
    state = plane.wait_run(DAG, run_id, timeout=240)
    assert state == "success", _states(plane, run_id)
    assert _states(plane, run_id) == {"short_wait": "success", "wait_until": "success", "after_waiting": "success"}

    # The triggers ran on an agent: its triggerer started them and reported their events, and the
    # trigger's own log (path rendered by the plane, suffix = the triggerer's Job id) is on that agent.
    # (short_wait defers only if it starts within 15 s of the run; wait_until always defers.)
    logs = [
        p for a in agents.values()
        for p in a.home.glob(f"logs/dag_id={DAG}/run_id={run_id}/task_id=wait_until/*.trigger.*.log")
    ]
    assert len(logs) == 1, logs
    assert "trigger starting" in logs[0].read_text()
    combined = "".join(a.log() for a in agents.values())
    assert re.search(r"Starting trigger \d+ \(airflow\.providers\.standard\.triggers\.temporal\.DateTimeTrigger\)",
                     combined)
    assert re.search(r"Trigger \d+ event reported", combined)
    # The resumed tasks ran on agents too (the plane has no worker of its own).
    finished = [w for w in plane.settled_work_items(dag_id=DAG, run_id=run_id) if w["state"] == "success"]
    assert {w["key"][2] for w in finished} == {"short_wait", "wait_until", "after_waiting"}
    assert {w["agent_name"] for w in finished} <= {"alpha", "beta"}


def test_killed_agents_trigger_is_reassigned_at_once_and_the_task_completes(cluster):
    plane, agents = cluster
    run_id = plane.trigger(DAG, conf={"wait_seconds": 45})
    wait_for(lambda: _states(plane, run_id).get("wait_until") == "deferred", 120, "wait_until to defer")
    trigger_id, owner = wait_for(lambda: _long_trigger(plane, agents, run_id), 60, "an agent to start the trigger")
    survivor = next(name for name in agents if name != owner)
    killed_at = time.monotonic()
    agents[owner].kill()

    wait_for(lambda: agents[survivor].started(trigger_id), 60, f"{survivor} to take over trigger {trigger_id}")
    took = time.monotonic() - killed_at
    assert took < 90, f"handover took {took:.1f}s"  # lost after ~15 s; the health threshold is 600 s
    assert plane.wait_run(DAG, run_id, timeout=180) == "success", _states(plane, run_id)
    assert f"Trigger {trigger_id} event reported" in agents[survivor].log()
    states = {a["name"]: a["state"] for a in plane.api("GET", "/remote_execution/v1/admin/agents").json()}
    assert states[owner] == "lost"
    scheduler_log = plane.procs["scheduler"].log_path.read_text(errors="replace")
    assert re.search(rf"Agent {owner} is lost: .* [1-9]\d* triggers freed", scheduler_log)  # the executor's hook
    print(f"trigger {trigger_id} handed from {owner} to {survivor} {took:.1f}s after kill -9")


def _long_trigger(plane: Plane, agents: dict[str, TriggeringAgent], run_id: str):
    """(trigger id, agent) of the running wait_until trigger of ``run_id``, once an agent started it."""
    ti = next(t for t in plane.task_instances(DAG, run_id) if t["task_id"] == "wait_until")
    trigger = ti.get("trigger") or {}
    trigger_id = trigger.get("id")
    if not trigger_id:
        return None
    owners = [name for name, agent in agents.items() if agent.started(trigger_id)]
    return (trigger_id, owners[0]) if owners else None
