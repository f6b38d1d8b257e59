"""
Several api-servers and schedulers share one plane: two api-server processes behind a round-robin
proxy, two schedulers (Airflow's HA scheduler on PostgreSQL), three agents. A few hundred tasks run
while one api-server is restarted and one scheduler is killed (-9) holding queued and running tasks:
the other scheduler adopts them (our executor finds their work items live), they run once, on try 1;
none is lost, none runs twice, none fails, no work item is leased twice, and no agent is declared lost.
"""

from __future__ import annotations

import shutil
import signal
import time
from collections import Counter
from pathlib import Path

import pytest
import requests
from sqlalchemy import create_engine, text

from fault_proxy import FaultProxy
from localplane import AIRFLOW, Agent, Plane, Proc, fresh_pg_database, free_port, shutdown, wait_for

pytestmark = pytest.mark.e2e
TEST_DAGS = Path(__file__).parent / "dags"
TASKS = 240
HEALTH_CHECK_THRESHOLD = 20  # s without a scheduler heartbeat before another scheduler adopts its tasks


def test_two_api_servers_and_two_schedulers_lose_nothing_while_an_api_server_restarts_and_a_scheduler_dies(
    tmp_path, pg_url
):
    dags = tmp_path / "dags"
    dags.mkdir()
    shutil.copy(TEST_DAGS / "remote_ha_load.py", dags)
    executions = tmp_path / "executions.log"
    hold = tmp_path / "hold"  # while it exists, work tasks wait (running) before they write their line
    db_url = fresh_pg_database(pg_url, "high_availability")
    plane = Plane(tmp_path / "plane", db_url=db_url, dags_folder=dags,
                  extra_env={"AIRFLOW__REMOTE_EXECUTION__HEARTBEAT_INTERVAL": "3",
                             "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_THRESHOLD": str(HEALTH_CHECK_THRESHOLD),
                             "AIRFLOW__SCHEDULER__ORPHANED_TASKS_CHECK_INTERVAL": "5"})
    db = create_engine(db_url)
    second_port = free_port()
    second_env = {**plane.env, "AIRFLOW__API__PORT": str(second_port)}
    extra: list[Proc] = []
    agents: list[Agent] = []
    proxy = None
    try:
        plane.start()
        (first_job,) = wait_for(lambda: _running_scheduler_jobs(db), 120, "the first scheduler's job")
        extra.append(Proc("api-server-2", [AIRFLOW, "api-server"], second_env, plane.logs))
        extra.append(Proc("scheduler-2", [AIRFLOW, "scheduler"], plane.env, plane.logs))
        (second_job,) = wait_for(lambda: _running_scheduler_jobs(db) - {first_job}, 120, "the second scheduler's job")
        wait_for(lambda: requests.get(f"http://127.0.0.1:{second_port}/api/v2/monitor/health", timeout=2).ok,
                 120, "the second api-server")
        proxy = FaultProxy([("127.0.0.1", plane.port), ("127.0.0.1", second_port)])
        for i in range(3):
            agent = Agent(f"ha-{i}", tmp_path / f"agent-{i}", proxy.url, plane.create_agent_token(f"ha-{i}", "ha"),
                          concurrency=4, dags_folder=dags).start()
            agents.append(agent)
        for agent in agents:
            agent.wait_registered()

        # Hold the tasks: the agents' 12 slots fill with running tasks, 4 more wait queued (max_active_tasks 16).
        hold.touch()
        run_id = plane.trigger("remote_ha_load", conf={"n": TASKS, "log": str(executions), "hold": str(hold)})
        seen: list = []
        wait_for(lambda: _held(_live_work(db, run_id), seen), 300, "12 tasks held running and others queued")
        owners = Counter(ti.queued_by_job_id for ti in _live_work(db, run_id))
        dead_job = owners.most_common(1)[0][0]
        survivor_job = first_job if dead_job == second_job else second_job
        orphans = {ti.map_index: ti.state for ti in _live_work(db, run_id) if ti.queued_by_job_id == dead_job}
        print(f"scheduler job {dead_job} is killed holding {Counter(orphans.values())}; owners: {owners}")

        if dead_job == first_job:
            plane.stop_component("scheduler", signal.SIGKILL)
        else:
            extra[1].signal(signal.SIGKILL)
            extra[1].stop()
        killed_at = time.monotonic()
        # The survivor marks the dead job failed and adopts its task instances: same state, same try.
        wait_for(lambda: all(ti.queued_by_job_id == survivor_job for ti in _live_work(db, run_id)), 240,
                 "the surviving scheduler to adopt the dead scheduler's task instances")
        adopted_after = time.monotonic() - killed_at
        print(f"adopted {len(orphans)} task instances {adopted_after:.1f} s after the kill "
              f"(scheduler_health_check_threshold {HEALTH_CHECK_THRESHOLD} s, orphaned_tasks_check_interval 5 s)")
        after = {ti.map_index: (ti.state, ti.try_number) for ti in _live_work(db, run_id)}
        assert {i: after.get(i) for i in orphans} == {i: (state, 1) for i, state in orphans.items()}, "reset, not adopted"
        with db.connect() as conn:
            assert conn.scalar(text("SELECT state FROM job WHERE id = :id"), {"id": dead_job}) == "failed"

        # The killed scheduler comes back (a new job) while the adopted tasks still run; then release them.
        extra.append(Proc("scheduler-restarted", [AIRFLOW, "scheduler"], plane.env, plane.logs))
        wait_for(lambda: _running_scheduler_jobs(db) - {first_job, second_job}, 120, "the restarted scheduler's job")
        hold.unlink()

        wait_for(lambda: _done(executions) >= TASKS // 4, 300, "a quarter of the tasks")
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
        assert Counter(w["fence"] for w in items) == {1: TASKS + 1}, "a work item was leased more than once"
        assert {w["agent_name"] for w in items} == {a.name for a in agents}, "all three agents worked"
        states = {a["name"]: a["state"] for a in plane.api("GET", "/remote_execution/v1/admin/agents").json()}
        assert states == {a.name: "active" for a in agents}
        with db.connect() as conn:  # the plane's cluster-wide event counters: no agent ever lost, no lease requeued
            events = dict(conn.execute(text("SELECT name, SUM(value) FROM remote_event_count GROUP BY name")).all())
        assert {n: events.get(n, 0) for n in ("agent_lost", "work_requeued")} == {"agent_lost": 0, "work_requeued": 0}
        assert len(proxy.relayed) == 2 and min(proxy.relayed.values()) > 50, proxy.relayed  # both served agents
    finally:
        for proc in extra:
            proc.stop()
        shutdown(plane, agents)
        for proc in extra:
            print(f"--- {proc.name}\n{proc.tail(40)}")
        if proxy is not None:
            proxy.stop()
        db.dispose()


def _done(executions: Path) -> int:
    return len(executions.read_text().splitlines()) if executions.exists() else 0


def _held(live: list, seen: list) -> bool:
    states = Counter(ti.state for ti in live)
    if not seen or seen[-1] != states:
        seen.append(states)
        print(f"held: {dict(states)}")
    return states["running"] == 12 and states["queued"] >= 1


def _running_scheduler_jobs(db) -> set[int]:
    with db.connect() as conn:
        return set(conn.scalars(text("SELECT id FROM job WHERE job_type = 'SchedulerJob' AND state = 'running'")))


def _live_work(db, run_id: str) -> list:
    """The run's ``work`` task instances that are queued or running, with the scheduler job that queued them."""
    with db.connect() as conn:
        return list(conn.execute(
            text("SELECT map_index, state, try_number, queued_by_job_id FROM task_instance "
                 "WHERE dag_id = 'remote_ha_load' AND task_id = 'work' AND run_id = :run_id "
                 "AND state IN ('queued', 'running')"),
            {"run_id": run_id},
        ))


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
