"""
Late is not lost: an overloaded plane never declares live agents lost. 300 simulated agents heartbeat
every second (the plane may not lengthen the interval here) beside a real agent running a task; then the
api-server stalls for twice the lost-agent window (SIGSTOP, as a plane too busy to answer) and gets the
whole backlog at once when it resumes. No agent is declared lost at any moment, and the task succeeds on
its first try.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from localplane import Agent, Plane, fresh_pg_database, shutdown, wait_for
from simulated_agents import raise_fd_limit, simulate

pytestmark = pytest.mark.e2e
TEST_DAGS = Path(__file__).parent / "dags"
AGENTS = 300


def test_an_overloaded_plane_declares_no_live_agent_lost(tmp_path, pg_url):
    raise_fd_limit()
    dags = tmp_path / "dags"
    dags.mkdir()
    shutil.copy(TEST_DAGS / "remote_sleepy.py", dags)
    plane = Plane(tmp_path / "plane", db_url=fresh_pg_database(pg_url, "overload"), dags_folder=dags, extra_env={
        "AIRFLOW__REMOTE_EXECUTION__HEARTBEAT_INTERVAL": "1",
        "AIRFLOW__REMOTE_EXECUTION__LOST_AGENT_THRESHOLD": "3",
        "AIRFLOW__REMOTE_EXECUTION__MAX_HEARTBEAT_RATE": "0",  # no lengthening: 300 heartbeats a second
    })
    engine = create_engine(plane.db_url)
    agent = None
    try:
        plane.start()
        out = plane.airflow("remote-execution", "tokens", "create", "--name", "real", "--queues", "drain", "--output", "json")
        agent = Agent("real", tmp_path / "agent", plane.url, json.loads(out.stdout.strip().splitlines()[-1])["token"],
                      dags_folder=dags).start()
        agent.wait_registered()
        # Warm: an api-server's first task start initialises Airflow's execution API in-process, which holds
        # the process for ~3 s once (measured here); that one-off is not what this test is about.
        assert plane.wait_run("remote_sleepy", plane.trigger("remote_sleepy", conf={"seconds": 1}), 180) == "success"
        script = (
            "import json\nfrom airflow.utils.session import create_session\n"
            "from airflow_remote_execution.plane import tokens\nwith create_session() as s:\n"
            f"    print(json.dumps([tokens.create(s, agent_name=f'sim-{{i}}', queues=['sim'])[0] for i in range({AGENTS})]))\n"
        )
        import subprocess
        import sys

        sim_tokens = json.loads(subprocess.run([sys.executable, "-c", script], env=plane.env, capture_output=True,
                                               text=True, check=True).stdout.strip().splitlines()[-1])
        results: dict = {}
        lost: set[str] = set()
        watching = threading.Event()

        def watch() -> None:  # every agent the plane ever declares lost, from the first registration on
            while not watching.is_set():
                with engine.connect() as conn:
                    lost.update(r[0] for r in conn.execute(text("SELECT name FROM remote_agent WHERE state = 'lost'")))
                time.sleep(0.3)

        watcher = threading.Thread(target=watch)
        watcher.start()
        fleet = threading.Thread(target=lambda: results.update(asyncio.run(simulate(plane.url, sim_tokens, 5, 5, 40))))
        fleet.start()
        fleet_ends = time.monotonic() + 5 + 5 + 40  # ramp, settle, measure: then the simulated agents just stop
        run_id = plane.trigger("remote_sleepy", conf={"seconds": 40})
        wait_for(lambda: any(w["state"] == "running" for w in plane.work_items(dag_id="remote_sleepy", run_id=run_id)),
                 120, "the real task running")
        time.sleep(5)
        api = plane.procs["api-server"]
        api.signal(signal.SIGSTOP)
        try:
            time.sleep(6)  # twice the 3 s window: every request meanwhile waits in the socket backlog
        finally:
            api.signal(signal.SIGCONT)
        assert fleet_ends - time.monotonic() > 10, "the load ended before the plane had caught up"
        time.sleep(fleet_ends - time.monotonic() - 2)
        watching.set()
        watcher.join(10)
        fleet.join(120)
        assert lost == set(), f"live agents declared lost: {sorted(lost)[:10]} ({len(lost)})"
        assert results["heartbeats"] > AGENTS * 10, results  # the fleet did beat throughout
        assert plane.wait_run("remote_sleepy", run_id, timeout=180) == "success"
        (ti,) = plane.task_instances("remote_sleepy", run_id)
        assert (ti["state"], ti["try_number"]) == ("success", 1)
    finally:
        engine.dispose()
        shutdown(plane, [agent])
