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


# ------------------------------------------------------------------ against a real plane API, in-process


@pytest.fixture
def plane_api(airflow_db, tmp_path):
    """The Remote Execution API (uvicorn, a thread of this process) on the unit SQLite DB with Airflow's tables."""
    import socket
    import threading

    import uvicorn
    from sqlalchemy import delete

    from airflow.models import import_all_models
    from airflow.models.base import Base as AirflowBase

    from airflow_remote_execution.plane.api.app import create_app

    import_all_models()
    AirflowBase.metadata.create_all(airflow_db)

    def wipe():
        with airflow_db.begin() as conn:
            for table in reversed(AirflowBase.metadata.sorted_tables):
                conn.execute(delete(table))

    wipe()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    from fastapi import FastAPI

    root = FastAPI()
    root.mount("/remote_execution", create_app())  # where the plugin mounts it in the api-server
    server = uvicorn.Server(uvicorn.Config(root, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)
    wipe()


def _token(bundles: list[str]) -> str:
    from airflow.utils.session import create_session

    from airflow_remote_execution.plane import tokens

    with create_session() as s:
        return tokens.create(s, agent_name="parser", queues=["default"], bundles=bundles)[0]


def test_manager_hooks_write_through_the_api(plane_api, tmp_path, monkeypatch):
    import structlog
    from sqlalchemy import select

    from airflow.dag_processing.bundles.local import LocalDagBundle
    from airflow.dag_processing.dagbag import BundleDagBag
    from airflow.dag_processing.processor import DagFileParsingResult, _serialize_dags
    from airflow.models.dag import DagModel
    from airflow.models.dagbundle import DagBundleModel
    from airflow.models.dagcode import DagCode
    from airflow.models.errors import ParseImportError
    from airflow.sdk import timezone
    from airflow.utils.session import create_session

    from airflow_remote_execution.agent.dag_processor import AgentDagProcessorManager

    source = "from airflow.sdk import DAG\n\nwith DAG('sent_with_source', schedule=None):\n    pass\n"
    (tmp_path / "dag.py").write_text(source)
    (tmp_path / "broken.py").write_text("from airflow.sdk import DAG\nraise ValueError('broken on purpose')\n")
    bundle = LocalDagBundle(name="mine", path=str(tmp_path))
    monkeypatch.setattr(AgentDagProcessorManager, "get_all_bundles", lambda self: [bundle])
    manager = AgentDagProcessorManager(max_runs=1, plane=PlaneClient(plane_api, _token(["mine"])), send_source=True)
    manager.sync_bundles()
    manager._dag_bundles = [bundle]
    assert manager.get_bundle_state("mine").version is None
    now = timezone.utcnow()
    manager.update_bundle_state("mine", last_refreshed=now, version="v7")
    assert manager.get_bundle_state("mine") == (now, "v7")

    for rel in ("dag.py", "broken.py"):
        bag = BundleDagBag(dag_folder=tmp_path / rel, bundle_path=tmp_path, bundle_name="mine", load_op_links=False)
        dags, errors = _serialize_dags(bag, structlog.get_logger())
        manager.persist_parsing_result(
            bundle_name="mine", bundle_version="v7", version_data=None, run_duration=0.2, relative_fileloc=rel,
            parsing_result=DagFileParsingResult(fileloc=str(tmp_path / rel), serialized_dags=dags,
                                                import_errors={**bag.import_errors, **errors}),
        )
    with create_session() as s:
        assert s.get(DagModel, "sent_with_source").bundle_name == "mine"
        assert DagCode.code("sent_with_source", session=s) == source  # send_dag_source = True
        assert s.scalar(select(ParseImportError.filename)) == "broken.py"
        assert s.get(DagBundleModel, "mine").version == "v7"


def test_manager_with_a_token_for_other_bundles_stops_with_the_planes_reason(plane_api, monkeypatch, tmp_path):
    from airflow.dag_processing.bundles.local import LocalDagBundle

    from airflow_remote_execution.agent.dag_processor import AgentDagProcessorManager

    monkeypatch.setattr(AgentDagProcessorManager, "get_all_bundles",
                        lambda self: [LocalDagBundle(name="mine", path=str(tmp_path))])
    manager = AgentDagProcessorManager(max_runs=1, plane=PlaneClient(plane_api, _token(["theirs"])))
    with pytest.raises(SystemExit, match=r"refused this agent's DAG bundles: Bundle\(s\) mine are outside token \w+'s bundles \(theirs\)"):
        manager.sync_bundles()


def test_results_carry_the_bundle_version_they_were_parsed_at(plane_api, tmp_path, monkeypatch):
    """The bundle moves on while a file is being parsed: the result keeps the version it was parsed at
    (Airflow's manager would label it with the newer one and move the DAG version to that commit)."""
    from sqlalchemy import select

    from airflow.dag_processing.bundles.local import LocalDagBundle
    from airflow.dag_processing.manager import DagFileInfo
    from airflow.models.dag_version import DagVersion
    from airflow.utils.session import create_session

    from airflow_remote_execution.agent.dag_processor import AgentDagProcessorManager

    (tmp_path / "dag.py").write_text("from airflow.sdk import DAG\n\nwith DAG('parsed_at_v1', schedule=None):\n    pass\n")
    bundle = LocalDagBundle(name="mine", path=str(tmp_path))
    monkeypatch.setattr(AgentDagProcessorManager, "get_all_bundles", lambda self: [bundle])
    manager = AgentDagProcessorManager(max_runs=1, plane=PlaneClient(plane_api, _token(["mine"])))
    manager.prepare_process_context()
    manager.sync_bundles()
    manager._dag_bundles = [bundle]
    manager._bundle_versions["mine"] = "v1"
    info = DagFileInfo(rel_path=Path("dag.py"), bundle_name="mine", bundle_path=tmp_path)
    manager._processors[info] = proc = manager._create_process(info)
    manager._bundle_versions["mine"] = "v2"  # a refresh while the parser runs
    deadline = time.monotonic() + 60
    while not proc.is_ready and time.monotonic() < deadline:
        manager._service_processor_sockets(timeout=0.2)
    manager._collect_results()
    with create_session() as s:
        assert s.scalars(select(DagVersion.bundle_version).where(DagVersion.dag_id == "parsed_at_v1")).all() == ["v1"]
