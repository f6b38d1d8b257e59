"""The agent side of parsing: component supervision (real child processes), the manager's stand-in for
the in-process execution API, and its hooks against a plane that refuses or is down.
(The whole loop against a real plane: tests/e2e/test_agent_dag_processor.py.)"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from pathlib import Path

import pytest

from airflow_remote_execution.agent.client import PlaneClient
from airflow_remote_execution.cli import agent_command


def test_parse_components(monkeypatch):
    assert agent_command.parse_components(None) == ["worker"]
    assert agent_command.parse_components("dag-processor, worker,worker") == ["dag-processor", "worker"]
    monkeypatch.setenv("AIRFLOW__REMOTE_EXECUTION__COMPONENTS", "worker,dag-processor")
    assert agent_command.parse_components(None) == ["worker", "dag-processor"]
    with pytest.raises(SystemExit, match=r"Unknown agent component\(s\) schedulr: use a comma-separated list of worker"):
        agent_command.parse_components("worker,schedulr")


def _until_sigterm(marker: Path):
    def run(_args) -> int:
        stop = []
        signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
        marker.write_text("started")
        while not stop:
            time.sleep(0.05)
        marker.write_text("stopped by SIGTERM")
        return 0

    return run


def _exits_with(code: int, after: float):
    def run(_args) -> int:
        time.sleep(after)
        return code

    return run


def test_a_dying_component_stops_the_others_and_the_agent_fails(monkeypatch, tmp_path):
    marker = tmp_path / "steady"
    monkeypatch.setattr(agent_command, "COMPONENTS", {"steady": _until_sigterm(marker), "crashy": _exits_with(3, 1.0)})
    started = time.monotonic()
    code = agent_command.run_components(["steady", "crashy"], args=None, poll=0.1)
    assert code == 3 and marker.read_text() == "stopped by SIGTERM"
    assert time.monotonic() - started < 30


def _supervise(names: list[str]) -> None:
    os._exit(agent_command.run_components(names, args=None, poll=0.1))


def test_sigterm_is_forwarded_and_a_clean_stop_exits_zero(monkeypatch, tmp_path):
    markers = [tmp_path / "one", tmp_path / "two"]
    monkeypatch.setattr(agent_command, "COMPONENTS", {"one": _until_sigterm(markers[0]), "two": _until_sigterm(markers[1])})
    parent = multiprocessing.get_context("fork").Process(target=_supervise, args=(["one", "two"],))
    parent.start()
    deadline = time.monotonic() + 30
    while not all(m.exists() for m in markers) and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(parent.pid, signal.SIGTERM)  # only the parent: it must forward
    parent.join(30)
    assert parent.exitcode == 0
    assert [m.read_text() for m in markers] == ["stopped by SIGTERM"] * 2


def test_parse_time_lookups_say_not_found_instead_of_reaching_for_a_db():
    from airflow.sdk.api.datamodels._generated import ConnectionResponse
    from airflow.sdk.execution_time.comms import ErrorResponse

    from airflow_remote_execution.agent.dag_processor import AgentDagProcessorManager

    manager = AgentDagProcessorManager(max_runs=1, plane=PlaneClient("http://127.0.0.1:9", "rex_x"))
    assert manager._api_server is None  # the stock in-process execution API (metadata DB) is never built
    variable = manager.client.variables.get("some_key")
    assert isinstance(variable, ErrorResponse) and variable.error.value == "VARIABLE_NOT_FOUND"
    connection = manager.client.connections.get("some_conn")
    assert not isinstance(connection, ConnectionResponse)


def test_unreachable_plane_does_not_break_the_parsing_loop():
    from airflow.dag_processing.manager import DagFileInfo

    from airflow_remote_execution.agent.dag_processor import AgentDagProcessorManager

    plane = PlaneClient("http://127.0.0.1:9", "rex_x", timeout=2)  # nothing listens on port 9
    manager = AgentDagProcessorManager(max_runs=1, plane=plane)

    class Bundle:
        name = "b"
        path = Path("/nowhere")

    manager._dag_bundles = [Bundle()]
    assert manager.claim_priority_files() == []
    assert manager.fetch_callbacks() == []
    info = DagFileInfo(rel_path=Path("a.py"), bundle_name="b", bundle_path=Path("/nowhere"))
    manager.deactivate_deleted_dags("b", {info})  # logged, not raised
    from airflow.sdk import timezone

    manager.deactivate_stale_dags({info: timezone.utcnow()})
