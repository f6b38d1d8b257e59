"""
Task logs of agent tasks read by the plane's REST API (what the UI calls), with a real plane and a real
agent (no DB), both ways:

* remote logging to a real storage emulator: while the task runs, the API shows the agent's partial
  upload; after the end the whole log, which never was on the plane's disk;
* no remote logging at all and no ``logging_config_class`` (Airflow's defaults): the agent sends the log
  through the Remote Execution API to the plane log store, shown while the task runs and after.

Either way the plane never connects to the agent (a listener on the worker log-server port counts attempts).
"""

from __future__ import annotations

import json
import shutil
import socket
import threading
from pathlib import Path

import boto3
import pytest

from emulators import AWS_TEST_CREDENTIALS, moto
from localplane import Agent, Plane, free_port, fresh_pg_database, wait_for

pytestmark = pytest.mark.e2e
DAGS = Path(__file__).parent / "dags"
DAG = "remote_slow_logger"
TASK = "slow_logger"
BUCKET = "customer-task-logs"
FIRST, SECOND = "first line: started", "second line: woke up"


class Tripwire:
    """Accepts and counts TCP connections on a port: where the plane would fetch an agent's served logs."""

    def __init__(self, port: int):
        self.sock = socket.create_server(("0.0.0.0", port))
        self.sock.settimeout(0.5)
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


def s3_logging(server_url: str, creds: dict[str, str]) -> dict[str, str]:
    """[logging] for remote logging to s3://BUCKET/logs; the connection comes from the environment."""
    conn = {
        "conn_type": "aws",
        "login": creds["aws_access_key_id"],
        "password": creds["aws_secret_access_key"],
        "extra": {"endpoint_url": server_url, "region_name": creds["region_name"]},
    }
    return {
        "AIRFLOW__LOGGING__REMOTE_LOGGING": "True",
        "AIRFLOW__LOGGING__REMOTE_BASE_LOG_FOLDER": f"s3://{BUCKET}/logs",
        "AIRFLOW__LOGGING__REMOTE_LOG_CONN_ID": "customer_logs",
        "AIRFLOW_CONN_CUSTOMER_LOGS": json.dumps(conn),
    }


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, pg_url):
    base = tmp_path_factory.mktemp("task-logs")
    dags = base / "dags"
    dags.mkdir()
    shutil.copy(DAGS / f"{DAG}.py", dags)
    tripwire = Tripwire(free_port())
    with moto() as s3:
        client = boto3.client("s3", endpoint_url=s3.url, **AWS_TEST_CREDENTIALS)
        client.create_bucket(Bucket=BUCKET)
        plane = Plane(
            base / "plane",
            # PostgreSQL: on SQLite a loaded machine stalled the whole plane on the database lock for ~40 s.
            db_url=fresh_pg_database(pg_url, "task_logs"),
            dags_folder=dags,
            extra_env={
                **s3_logging(s3.url, AWS_TEST_CREDENTIALS),
                "AIRFLOW__LOGGING__LOGGING_CONFIG_CLASS": "airflow_remote_execution.log_handler.LOGGING_CONFIG",
                "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(tripwire.sock.getsockname()[1]),
            },
        )
        agent = None
        try:
            plane.start()
            token = plane.create_agent_token("logger", "default")
            agent = Agent(
                "logger", base / "agent", plane.url, token, dags_folder=dags,
                extra_env={
                    **s3_logging(s3.url, AWS_TEST_CREDENTIALS),
                    "AIRFLOW__REMOTE_EXECUTION__LOG_UPLOAD_INTERVAL": "2",
                    # A loaded machine has stalled the api-server for ~40 s on a task's first execution-API
                    # call (seen in other e2e planes too); Airflow's default 5 tries of 5 s gave up on it.
                    "AIRFLOW__WORKERS__EXECUTION_API_TIMEOUT": "60",
                },
            ).start()
            agent.wait_registered()
            yield plane, agent, client, tripwire
        finally:
            procs = [*plane.procs.values(), *([agent.proc] if agent else [])]
            if agent:
                agent.stop()
            plane.stop()
            tripwire.close()
            for proc in procs:
                print(f"--- {proc.name}\n{proc.tail(40)}")


def read_log(plane: Plane, run_id: str) -> tuple[list[str], list[str]]:
    """The task log through the REST API: (its events, the 'log message source details' lines)."""
    r = plane.api("GET", f"/api/v2/dags/{DAG}/dagRuns/{run_id}/taskInstances/{TASK}/logs/1", headers={"Accept": "application/json"})
    r.raise_for_status()
    events = [m.get("event", "") for m in r.json()["content"]]
    start, end = events.index("::group::Log message source details"), events.index("::endgroup::")
    return events[end + 1:], events[start + 1:end]


def ti_state(plane: Plane, run_id: str) -> str | None:
    return plane.api("GET", f"/api/v2/dags/{DAG}/dagRuns/{run_id}/taskInstances/{TASK}").json().get("state")


def test_log_readable_while_running_and_after(cluster):
    plane, agent, s3, tripwire = cluster
    run_id = plane.trigger(DAG, conf={"seconds": 40})  # long enough to read it while running on a busy machine
    wait_for(lambda: ti_state(plane, run_id) == "running", 300, "the task running on the agent", 0.5)

    # While it runs: the first line comes from the agent's partial upload (every 2 s here).
    def first_line_shown():
        events, sources = read_log(plane, run_id)
        return (events, sources) if any(FIRST in e for e in events) else None

    events, sources = wait_for(first_line_shown, 30, "the first line in the running task's log", 0.5)
    assert ti_state(plane, run_id) == "running", "the log should be readable before the task ends"
    assert not any(SECOND in e for e in events)
    assert any(s.startswith(f"s3://{BUCKET}/logs/dag_id={DAG}/run_id={run_id}/") for s in sources), sources
    assert not any("served logs" in s.lower() and "could not" in s.lower() for s in sources), sources
    assert tripwire.connections == 0, "the plane tried to reach the agent's log server"

    assert plane.wait_run(DAG, run_id) == "success"
    # The task is marked success before its supervisor's final upload: the rest shows up moments later.
    events, sources = wait_for(
        lambda: (log := read_log(plane, run_id)) and any(SECOND in e for e in log[0]) and log, 60, "the whole log", 0.5
    )
    assert [e for e in events if FIRST in e or SECOND in e] == [e for e in events if FIRST in e] + [
        e for e in events if SECOND in e
    ]
    assert len([e for e in events if FIRST in e]) == 1 and len([e for e in events if SECOND in e]) == 1, events
    assert tripwire.connections == 0

    # In the customer's bucket, once each; on the agent's disk; never on the plane's.
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=f"logs/dag_id={DAG}/run_id={run_id}/")["Contents"]]
    assert len(keys) == 1 and keys[0].endswith("attempt=1.log"), keys
    body = s3.get_object(Bucket=BUCKET, Key=keys[0])["Body"].read().decode()
    lines = [json.loads(line) for line in body.splitlines() if line.strip()]
    assert [x["event"] for x in lines].count(next(x["event"] for x in lines if FIRST in x["event"])) == 1
    assert sum(SECOND in x["event"] for x in lines) == 1
    assert list((agent.home / "logs").rglob(f"run_id={run_id}/task_id={TASK}/*.log")), "written on the agent"
    assert not list((plane.home / "logs").rglob(f"run_id={run_id}/**/*.log")), "a task log on the plane's disk"


# ---------------------------------------------------------------- no remote logging: the plane log store


@pytest.fixture(scope="module")
def store_cluster(tmp_path_factory, pg_url):
    """Plane and agent with Airflow's default logging (no remote logging, no logging_config_class)."""
    base = tmp_path_factory.mktemp("task-logs-store")
    dags = base / "dags"
    dags.mkdir()
    shutil.copy(DAGS / f"{DAG}.py", dags)
    tripwire = Tripwire(free_port())
    plane = Plane(
        base / "plane",
        db_url=fresh_pg_database(pg_url, "task_logs_store"),
        dags_folder=dags,
        extra_env={"AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(tripwire.sock.getsockname()[1])},
    )
    agent = None
    try:
        plane.start()
        token = plane.create_agent_token("store-logger", "default")
        agent = Agent(
            "store-logger", base / "agent", plane.url, token, dags_folder=dags,
            extra_env={
                "AIRFLOW__REMOTE_EXECUTION__LOG_UPLOAD_INTERVAL": "2",
                "AIRFLOW__WORKERS__EXECUTION_API_TIMEOUT": "60",  # see cluster() above
            },
        ).start()
        agent.wait_registered()
        yield plane, agent, tripwire
    finally:
        procs = [*plane.procs.values(), *([agent.proc] if agent else [])]
        if agent:
            agent.stop()
        plane.stop()
        tripwire.close()
        for proc in procs:
            print(f"--- {proc.name}\n{proc.tail(40)}")


def test_without_remote_logging_the_plane_log_store_shows_the_log_while_running_and_after(store_cluster):
    plane, agent, tripwire = store_cluster
    assert "Sending task logs to the plane's log store" in agent.proc.log_path.read_text(errors="replace")
    run_id = plane.trigger(DAG, conf={"seconds": 40})
    wait_for(lambda: ti_state(plane, run_id) == "running", 300, "the task running on the agent", 0.5)

    def first_line_shown():
        events, sources = read_log(plane, run_id)
        return (events, sources) if any(FIRST in e for e in events) else None

    events, sources = wait_for(first_line_shown, 30, "the first line in the running task's log", 0.5)
    assert ti_state(plane, run_id) == "running", "the log should be readable before the task ends"
    assert not any(SECOND in e for e in events)
    assert any("log store" in s and "store-logger" in s for s in sources), sources
    assert not any("served logs" in s.lower() and "could not" in s.lower() for s in sources), sources
    assert tripwire.connections == 0, "the plane tried to reach the agent's log server"

    assert plane.wait_run(DAG, run_id) == "success"
    events, sources = wait_for(
        lambda: (log := read_log(plane, run_id)) and any(SECOND in e for e in log[0]) and log, 60, "the whole log", 0.5
    )
    assert len([e for e in events if FIRST in e]) == 1 and len([e for e in events if SECOND in e]) == 1, events
    assert tripwire.connections == 0
    # The agent keeps its own file; the plane has the log in its database, not on its disk.
    (local,) = (agent.home / "logs").rglob(f"run_id={run_id}/task_id={TASK}/*.log")
    lines = [json.loads(line)["event"] for line in local.read_text().splitlines() if line.strip()]
    assert [e for e in events if e in lines] == lines, "the plane's copy is the agent's file, in order"
    assert not list((plane.home / "logs").rglob(f"run_id={run_id}/**/*.log")), "a task log on the plane's disk"
