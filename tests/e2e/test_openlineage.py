"""
OpenLineage from both sides, received by a real HTTP lineage receiver on loopback: the plane's scheduler
emits the DAG run's START and COMPLETE with its own [openlineage] transport, and each agent's tasks emit
their START and COMPLETE with the agent's own transport (another endpoint here, as a customer's lineage
server would be). A DAG whose two tasks run on two agents: each task's events name the job
``<dag_id>.<task_id>`` and carry the DAG run's event as their parent.
"""

from __future__ import annotations

import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from localplane import Agent, Plane, fresh_pg_database, wait_for

pytestmark = pytest.mark.e2e
DAGS = Path(__file__).parent / "dags"
DAG, NAMESPACE = "remote_lineage", "rex-e2e"


class LineageReceiver:
    """Records every event POSTed to it, with the path it came to (which side sent it)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    receiver.events.append((self.path, json.loads(body)))
                except ValueError:
                    pass
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def transport(self, endpoint: str) -> dict[str, str]:
        return {
            "AIRFLOW__OPENLINEAGE__TRANSPORT": json.dumps({"type": "http", "url": self.url, "endpoint": endpoint}),
            "AIRFLOW__OPENLINEAGE__NAMESPACE": NAMESPACE,
        }

    def of(self, path: str) -> list[dict]:
        return [event for p, event in list(self.events) if p == path]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def lineage(tmp_path_factory, pg_url):
    base = tmp_path_factory.mktemp("openlineage")
    dags = base / "dags"
    dags.mkdir()
    shutil.copy(DAGS / f"{DAG}.py", dags)
    receiver = LineageReceiver()
    plane = Plane(base / "plane", db_url=fresh_pg_database(pg_url, "openlineage"), dags_folder=dags,
                  extra_env=receiver.transport("plane/api/v1/lineage"))
    agents: list[Agent] = []
    try:
        plane.start()
        for queue in ("lineage-a", "lineage-b"):
            agents.append(Agent(queue, base / queue, plane.url, plane.create_agent_token(queue, queue), concurrency=1,
                                dags_folder=dags, extra_env=receiver.transport(f"{queue}/api/v1/lineage")).start())
        for agent in agents:
            agent.wait_registered()
        yield plane, receiver
    finally:
        for agent in agents:
            agent.stop()
        plane.stop()
        receiver.close()
        for proc in [*plane.history, *(a.proc for a in agents if a.proc)]:
            print(f"--- {proc.name}\n{proc.tail(40)}")


def test_task_events_from_agents_and_dag_run_events_from_the_plane(lineage):
    plane, receiver = lineage
    run_id = plane.trigger(DAG)
    assert plane.wait_run(DAG, run_id) == "success"

    def dag_run_events():
        events = [e for e in receiver.of("/plane/api/v1/lineage") if e.get("job", {}).get("name") == DAG]
        return events if {e["eventType"] for e in events} >= {"START", "COMPLETE"} else None

    dag_events = wait_for(dag_run_events, 60, "the DAG run's START and COMPLETE from the plane", 0.5)
    (dag_run_id,) = {e["run"]["runId"] for e in dag_events}
    assert {e["job"]["namespace"] for e in dag_events} == {NAMESPACE}

    for agent_queue, task_id in (("lineage-a", "extract"), ("lineage-b", "load")):
        path, job = f"/{agent_queue}/api/v1/lineage", f"{DAG}.{task_id}"

        def task_events(path=path, job=job):
            events = [e for e in receiver.of(path) if e.get("job", {}).get("name") == job]
            return events if {e["eventType"] for e in events} >= {"START", "COMPLETE"} else None

        events = wait_for(task_events, 60, f"START and COMPLETE of {job} from agent {agent_queue}", 0.5)
        for event in events:
            parent = event["run"]["facets"]["parent"]
            assert (parent["job"]["namespace"], parent["job"]["name"]) == (NAMESPACE, DAG), parent
            assert parent["run"]["runId"] == dag_run_id, (parent, dag_run_id)
            assert event["job"]["namespace"] == NAMESPACE
        assert len({e["run"]["runId"] for e in events}) == 1  # START and COMPLETE of one task run
    # Task events come only from the agents, never from the plane.
    assert not [e for e in receiver.of("/plane/api/v1/lineage") if e.get("job", {}).get("name", "").startswith(f"{DAG}.")]
