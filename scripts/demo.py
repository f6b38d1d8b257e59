"""
Quickstart: a local orchestration plane on SQLite plus two agents, running the example DAGs.

The plane (api-server, scheduler, dag-processor with RemoteExecutor) lives in .demo/plane; each
agent has its own AIRFLOW_HOME under .demo/ with nothing but the API URL and its token (its
database URL points nowhere). Run through ``scripts/demo.sh``.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from localplane import ROOT, Agent, Plane, free_port  # noqa: E402

# Agents read Variables and Connections from their own secrets (here the environment; a secrets backend
# in production): the plane does not serve its own to agents unless serve_plane_secrets_to_agents says so.
AGENT_SECRETS = {
    "AIRFLOW_VAR_REMOTE_DEMO_GREETING": "hello from the agent's own secrets",
    "AIRFLOW_CONN_REMOTE_DEMO_HTTP": '{"conn_type": "http", "host": "example.org"}',
}

EXAMPLES = [
    "remote_fan_out_fan_in",
    "remote_two_queues",
    "remote_variable_and_connection",
    "remote_retry",
    "remote_deadline_callback",
]
AGENTS = {"agent-default": "default", "agent-analytics": "analytics"}


def _port(preferred: int) -> int:
    """The usual Airflow port if it is free, else any free one."""
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", preferred))
            return preferred
        except OSError:
            return free_port()


def _task_log_source(plane: Plane, dag_id: str, run_id: str) -> str | None:
    """Where the UI reads a finished task's log from (what its 'Log message source details' says), once the
    log has lines; None if it has none within 30 s."""
    task_id = plane.task_instances(dag_id, run_id)[0]["task_id"]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        r = plane.api("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/logs/1",
                      headers={"Accept": "application/json"})
        events = [m.get("event", "") for m in r.json().get("content", [])] if r.ok else []
        if "::endgroup::" in events and events[events.index("::endgroup::") + 1:]:
            details = events[events.index("::group::Log message source details") + 1: events.index("::endgroup::")]
            return f"{dag_id}.{task_id}: {'; '.join(details)}"
        time.sleep(1)
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--exit", action="store_true", help="stop everything once the example DAGs are done")
    parser.add_argument("--dir", default=str(ROOT / ".demo"), help="where the plane and agents live")
    args = parser.parse_args()

    base = Path(args.dir)
    shutil.rmtree(base, ignore_errors=True)
    plane = Plane(base / "plane", port=_port(8080))
    agents: list[Agent] = []
    try:
        print(f"Starting the orchestration plane (api-server, scheduler, dag-processor) in {plane.home} ...", flush=True)
        plane.start()
        for name, queues in AGENTS.items():
            token = plane.create_agent_token(name, queues)
            agents.append(Agent(name, base / name, plane.url, token, extra_env=AGENT_SECRETS).start())
            print(f"Started {name} (queues: {queues}) in {base / name}, with only the API URL and its token", flush=True)
        for agent in agents:
            agent.wait_registered()
        runs = {dag_id: plane.trigger(dag_id) for dag_id in EXAMPLES}
        print(f"Triggered {', '.join(EXAMPLES)}", flush=True)
        failed = []
        for dag_id, run_id in runs.items():
            state = plane.wait_run(dag_id, run_id)
            ran_on = sorted({w["agent_name"] for w in plane.work_items(dag_id=dag_id, run_id=run_id)})
            print(f"  {dag_id:34s} {state:8s} ran on {', '.join(ran_on)}", flush=True)
            if state != "success":
                failed.append(dag_id)
        log_source = _task_log_source(plane, EXAMPLES[0], runs[EXAMPLES[0]])
        print(f"Task logs in the UI (no remote logging here; the plane never connects to agents): {log_source}", flush=True)
        if not log_source:
            failed.append(f"{EXAMPLES[0]} (no task log)")
        print(
            f"\nAirflow UI: {plane.url}  (login admin / admin)\n"
            f"Remote Agents page (agents, queues, tokens; drain, resume, create tokens): {plane.url}/plugin/remote-agents\n"
            f"Where each task ran: a task instance's 'Remote execution' tab in the UI (docs/ui.md)\n"
            f"Remote Execution API docs: {plane.url}/remote_execution/docs\n"
            f"Agents: AIRFLOW_HOME={plane.home} .venv/bin/airflow remote-execution agents list\n"
            f"Logs: {plane.logs} and the agents' homes under {base}",
            flush=True,
        )
        if failed:
            print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
            return 1
        print("All example DAGs succeeded on the agents.", flush=True)
        if not args.exit:
            print("Press Ctrl-C to stop.", flush=True)
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
            while all(p.alive() for p in plane.procs.values()):
                time.sleep(1)
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        print("Stopping agents and plane ...", flush=True)
        for agent in agents:
            agent.stop()
        plane.stop()


if __name__ == "__main__":
    sys.exit(main())
