"""
Plane side of agent DAG parsing (``parsing.py``), in-process on SQLite and PostgreSQL with Airflow's own
tables: results parsed by Airflow's own parser code land as the rows its dag processor writes; bundle
authorisation; re-parse requests, callbacks and stale DAGs. The HTTP routes are exercised at the end.
"""

from __future__ import annotations

import textwrap
from datetime import timedelta
from pathlib import Path

import pytest
import structlog
from sqlalchemy import delete, select

from airflow.models.base import Base as AirflowBase
from airflow.models.dag import DagModel
from airflow.models.dagbundle import DagBundleModel
from airflow.models.dagcode import DagCode
from airflow.models.dagwarning import DagWarning
from airflow.models.errors import ParseImportError
from airflow.models.serialized_dag import SerializedDagModel
from airflow.sdk import timezone

from airflow_remote_execution.plane import parsing, tokens
from airflow_remote_execution.plane.agents import AgentForbidden
from airflow_remote_execution.wire.parsing import (
    ParsedFile,
    ParsingResult,
    SerializedDagPayload,
    StaleCheckRequest,
)

BUNDLE = "team-a"
DAG_V1 = """
from airflow.sdk import DAG
from airflow.providers.standard.operators.empty import EmptyOperator

with DAG("{dag_id}", schedule=None, tags=["remote"]):
    EmptyOperator(task_id="first")
"""
DAG_V2 = DAG_V1 + """    EmptyOperator(task_id="second")
"""
_created: set[str] = set()


@pytest.fixture
def adb(db):
    """``db`` plus Airflow's own tables (created once per engine), emptied around each test."""
    if db.name not in _created:
        from airflow.models import import_all_models

        import_all_models()
        AirflowBase.metadata.create_all(db.engine)
        _created.add(db.name)
    _wipe(db)
    yield db
    _wipe(db)


def _wipe(db) -> None:
    with db.engine.begin() as conn:
        for table in reversed(AirflowBase.metadata.sorted_tables):
            conn.execute(delete(table))


def _token(db, bundles=(BUNDLE,), name="agent-a"):
    with db.session() as s:
        return tokens.create(s, agent_name=name, queues=["default"], bundles=list(bundles))[1]


def _parse(bundle_dir: Path, rel: str, bundle: str = BUNDLE, version: str | None = None) -> ParsingResult:
    """Parse one file with Airflow's own parser functions, as the agent's parser process does."""
    from airflow.dag_processing.dagbag import BundleDagBag
    from airflow.dag_processing.processor import _serialize_dags

    bag = BundleDagBag(dag_folder=bundle_dir / rel, bundle_path=bundle_dir, bundle_name=bundle, load_op_links=False)
    dags, errors = _serialize_dags(bag, structlog.get_logger())
    bag.import_errors.update(errors)
    return ParsingResult(
        bundle_name=bundle,
        bundle_version=version,
        relative_fileloc=rel,
        run_duration=0.1,
        serialized_dags=[SerializedDagPayload(data=d.data, last_loaded=d.last_loaded) for d in dags],
        import_errors=bag.import_errors,
        warnings=[],
    )


def _write(bundle_dir: Path, rel: str, text: str) -> None:
    path = bundle_dir / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))


def test_result_becomes_the_rows_the_dag_processor_writes(adb, tmp_path):
    token = _token(adb)
    _write(tmp_path, "dags/hello.py", DAG_V1.format(dag_id="hello"))
    _write(tmp_path, "dags/broken.py", "from airflow.sdk import DAG\nimport does_not_exist\n")
    with adb.session() as s:
        assert [b.name for b in parsing.sync_bundles(s, token, [BUNDLE])] == [BUNDLE]
        assert parsing.store_result(s, token, _parse(tmp_path, "dags/hello.py", version="v1")) == ["hello"]
        assert parsing.store_result(s, token, _parse(tmp_path, "dags/broken.py", version="v1")) == []
    with adb.session() as s:
        dag = s.get(DagModel, "hello")
        assert (dag.bundle_name, dag.relative_fileloc, dag.is_stale, dag.has_import_errors) == (
            BUNDLE, "dags/hello.py", False, False)
        assert dag.fileloc == str(tmp_path / "dags/hello.py")  # the agent's path, as its parser saw it
        assert [t.name for t in dag.tags] == ["remote"]
        sdm = SerializedDagModel.get("hello", session=s)
        assert sdm.dag_version.bundle_version == "v1" and sdm.dag_version.version_number == 1
        assert sorted(sdm.dag.task_dict) == ["first"]
        # The code stays on the agent: the plane keeps a note instead of the source.
        code = DagCode.code("hello", session=s)
        assert "stays on the agent" in code and "EmptyOperator" not in code
        error = s.scalar(select(ParseImportError))
        assert (error.bundle_name, error.filename) == (BUNDLE, "dags/broken.py")
        assert "does_not_exist" in error.stacktrace
        assert s.get(DagBundleModel, BUNDLE).active


def test_new_bundle_version_and_source(adb, tmp_path, monkeypatch):
    monkeypatch.setenv("AIRFLOW__CORE__MIN_SERIALIZED_DAG_UPDATE_INTERVAL", "0")
    token = _token(adb)
    _write(tmp_path, "d.py", DAG_V1.format(dag_id="versioned"))
    with adb.session() as s:
        parsing.store_result(s, token, _parse(tmp_path, "d.py", version="c1"))
    _write(tmp_path, "d.py", DAG_V2.format(dag_id="versioned"))
    result = _parse(tmp_path, "d.py", version="c2")
    result.source = "the source, sent by the agent"
    with adb.session() as s:
        parsing.store_result(s, token, result)
    with adb.session() as s:
        from airflow.models.dag_version import DagVersion

        versions = s.scalars(select(DagVersion).where(DagVersion.dag_id == "versioned").order_by(DagVersion.version_number)).all()
        # As with Airflow's own dag processor, a version no run has used yet is updated in place
        # (tests/e2e/test_agent_dag_processor.py shows a used one being kept).
        assert [(v.version_number, v.bundle_version) for v in versions] == [(1, "c2")]
        assert sorted(SerializedDagModel.get("versioned", session=s).dag.task_dict) == ["first", "second"]
        assert DagCode.code("versioned", session=s) == "the source, sent by the agent"


def test_fixed_file_clears_its_import_error_and_removed_files_go_stale(adb, tmp_path):
    token = _token(adb)
    _write(tmp_path, "a.py", "from airflow.sdk import DAG\nraise RuntimeError('boom')\n")
    _write(tmp_path, "b.py", DAG_V1.format(dag_id="dag_b"))
    with adb.session() as s:
        parsing.store_result(s, token, _parse(tmp_path, "a.py"))
        parsing.store_result(s, token, _parse(tmp_path, "b.py"))
    _write(tmp_path, "a.py", DAG_V1.format(dag_id="dag_a"))
    with adb.session() as s:
        parsing.store_result(s, token, _parse(tmp_path, "a.py"))
        assert s.scalar(select(ParseImportError)) is None
    with adb.session() as s:  # b.py deleted from the bundle
        out = parsing.bundle_files_present(s, token, BUNDLE, ["a.py"])
        assert out.dags_deactivated
    with adb.session() as s:
        assert (s.get(DagModel, "dag_a").is_stale, s.get(DagModel, "dag_b").is_stale) == (False, True)


def test_bundles_outside_the_token_are_forbidden(adb, tmp_path):
    token = _token(adb, bundles=("team-a", "shared"))
    none = _token(adb, bundles=(), name="agent-none")
    _write(tmp_path, "x.py", DAG_V1.format(dag_id="x"))
    with adb.session() as s:
        with pytest.raises(AgentForbidden, match=r"Bundle\(s\) team-b are outside token \w+'s bundles \(shared, team-a\)"):
            parsing.sync_bundles(s, token, ["team-a", "team-b"])
        with pytest.raises(AgentForbidden, match=r"outside token \w+'s bundles \(none\)"):
            parsing.store_result(s, none, _parse(tmp_path, "x.py"))
        for call in (lambda: parsing.bundle_state(s, none, BUNDLE),
                     lambda: parsing.update_bundle_state(s, none, BUNDLE, timezone.utcnow(), "v"),
                     lambda: parsing.bundle_files_present(s, none, BUNDLE, []),
                     lambda: parsing.claim(s, none, [BUNDLE], 10)):
            with pytest.raises(AgentForbidden):
                call()
    with adb.session() as s:
        assert s.scalar(select(DagModel)) is None and s.scalar(select(DagBundleModel)) is None


def test_an_agent_cannot_take_over_another_bundles_dag(adb, tmp_path):
    a = _token(adb, bundles=("team-a",))
    b = _token(adb, bundles=("team-b",), name="agent-b")
    _write(tmp_path, "same.py", DAG_V1.format(dag_id="payroll"))
    with adb.session() as s:
        parsing.store_result(s, a, _parse(tmp_path, "same.py", bundle="team-a"))
    with adb.session() as s:
        with pytest.raises(AgentForbidden, match=r"payroll \(bundle team-a\) belong to bundles"):
            parsing.store_result(s, b, _parse(tmp_path, "same.py", bundle="team-b"))
    with adb.session() as s:
        assert s.get(DagModel, "payroll").bundle_name == "team-a"


def test_bundle_state_round_trip(adb):
    token = _token(adb)
    now = timezone.utcnow()
    with adb.session() as s:
        assert parsing.bundle_state(s, token, BUNDLE) is None
        parsing.sync_bundles(s, token, [BUNDLE])
        parsing.update_bundle_state(s, token, BUNDLE, now, "abc")
        parsing.update_bundle_state(s, token, BUNDLE, now + timedelta(seconds=5), None)  # version unchanged
    with adb.session() as s:
        state = parsing.bundle_state(s, token, BUNDLE)
        assert state.version == "abc" and state.last_refreshed == now + timedelta(seconds=5)


def test_claim_hands_out_reparse_requests_and_callbacks_once(adb):
    from airflow.callbacks.callback_requests import DagCallbackRequest
    from airflow.models.dagbag import DagPriorityParsingRequest
    from airflow.models.db_callback_request import DbCallbackRequest

    token = _token(adb, bundles=(BUNDLE, "other"))
    with adb.session() as s:
        s.add(DagPriorityParsingRequest(bundle_name=BUNDLE, relative_fileloc="dags/hello.py"))
        s.add(DagPriorityParsingRequest(bundle_name="not-mine", relative_fileloc="x.py"))
        request = DagCallbackRequest(filepath="dags/hello.py", bundle_name=BUNDLE, bundle_version="v1",
                                     dag_id="hello", run_id="r1", is_failure_callback=True, msg="failed")
        s.add(DbCallbackRequest(priority_weight=10, callback=request))
        s.add(DbCallbackRequest(priority_weight=10, callback=request.model_copy(update={"bundle_name": "not-mine"})))
    with adb.session() as s:
        claimed = parsing.claim(s, token, [BUNDLE], 10)
    assert [(f.bundle_name, f.relative_fileloc) for f in claimed.priority_files] == [(BUNDLE, "dags/hello.py")]
    assert len(claimed.callbacks) == 1
    assert DagCallbackRequest.model_validate(claimed.callbacks[0]) == request
    with adb.session() as s:
        again = parsing.claim(s, token, [BUNDLE], 10)
        assert again.priority_files == [] and again.callbacks == []
        assert s.scalar(select(DagPriorityParsingRequest.bundle_name)) == "not-mine"  # other bundles untouched


def test_stale_dags_of_the_agents_bundles_are_deactivated(adb, tmp_path):
    token = _token(adb)
    _write(tmp_path, "multi.py", DAG_V1.format(dag_id="kept") + DAG_V1.format(dag_id="dropped"))
    with adb.session() as s:
        parsing.store_result(s, token, _parse(tmp_path, "multi.py"))
        s.add(DagWarning("dropped", "non-existent pool", "pool p does not exist"))
    later = timezone.utcnow() + timedelta(minutes=5)
    with adb.session() as s:  # the file now defines only "kept", parsed just now
        s.get(DagModel, "kept").last_parsed_time = later
    request = StaleCheckRequest(
        last_parsed=[ParsedFile(bundle_name=BUNDLE, relative_fileloc="multi.py", last_finish_time=later)],
        stale_dag_threshold=50,
    )
    with adb.session() as s:
        assert parsing.deactivate_stale_dags(s, token, request) == ["dropped"]
    with adb.session() as s:
        assert s.get(DagModel, "dropped").is_stale and not s.get(DagModel, "kept").is_stale
        assert s.scalar(select(DagWarning)) is None


# ------------------------------------------------------------------ HTTP routes


@pytest.mark.parametrize("db", ["sqlite"], indirect=True)
def test_routes(adb, tmp_path):
    from starlette.testclient import TestClient

    from airflow_remote_execution.plane.api.app import create_app

    with adb.session() as s:
        clear, _ = tokens.create(s, agent_name="agent-a", queues=["default"], bundles=[BUNDLE])
        other, _ = tokens.create(s, agent_name="agent-b", queues=["default"], bundles=["team-b"])
    _write(tmp_path, "dags/hello.py", DAG_V1.format(dag_id="hello"))
    result = _parse(tmp_path, "dags/hello.py", version="v1").model_dump(mode="json")
    with TestClient(create_app()) as client:
        def call(method, path, token, body=None):
            return client.request(method, f"/v1/parsing{path}", json=body, headers={"Authorization": f"Bearer {token}"})

        r = call("POST", "/bundles/sync", other, {"bundles": [BUNDLE]})
        assert r.status_code == 403
        assert r.json()["detail"].startswith(f"Bundle(s) {BUNDLE} are outside token") and "(team-b)" in r.json()["detail"]
        assert call("POST", "/results", other, result).status_code == 403
        assert call("GET", f"/bundles/{BUNDLE}/state", "rex_bogus", None).status_code == 401
        assert call("POST", "/results", clear, {**result, "bogus": 1}).status_code == 422

        assert call("POST", "/bundles/sync", clear, {"bundles": [BUNDLE]}).json() == {
            "bundles": [{"name": BUNDLE, "last_refreshed": None, "version": None}]}
        r = call("PUT", f"/bundles/{BUNDLE}/state", clear, {"last_refreshed": "2026-01-01T00:00:00Z", "version": "v1"})
        assert r.status_code == 200 and r.json()["version"] == "v1"
        assert call("GET", f"/bundles/{BUNDLE}/state", clear).json()["version"] == "v1"
        r = call("POST", "/results", clear, result)
        assert r.status_code == 200 and r.json() == {"dag_ids": ["hello"], "import_errors": 0}
        assert call("POST", "/claims", clear, {"bundles": [BUNDLE]}).json() == {"priority_files": [], "callbacks": []}
        r = call("PUT", f"/bundles/{BUNDLE}/files", clear, {"observed_filelocs": []})
        assert r.json() == {"dags_deactivated": True, "import_errors_cleared": 0}
        spec = client.get("/openapi.json").json()
        assert {"/v1/parsing/results", "/v1/parsing/bundles/sync", "/v1/parsing/claims"} <= set(spec["paths"])
    with adb.session() as s:
        assert s.get(DagModel, "hello").is_stale


def test_import_error_listeners_get_the_agents_path():
    """Airflow's import-error listeners ask for the file's full path, from a bundle the plane does not have."""
    result = ParsingResult(bundle_name=BUNDLE, bundle_path="/agent/bundles/team-a", run_duration=0)
    error = ParseImportError(filename="dags/broken.py", bundle_name=BUNDLE)
    with pytest.raises(ValueError, match="not configured"):
        error.full_file_path()  # the plane's own answer: it has no such bundle
    with parsing._from_agent(result):
        assert error.full_file_path() == "/agent/bundles/team-a/dags/broken.py"
        assert DagCode.get_code_from_file("/agent/bundles/team-a/dags/x.py") == parsing.source_note(result)


WATCHED = """
from airflow.providers.standard.triggers.file import FileDeleteTrigger
from airflow.sdk import DAG, Asset, AssetWatcher
from airflow.providers.standard.operators.empty import EmptyOperator

landing = Asset("landing", watchers=[AssetWatcher(name="w", trigger=FileDeleteTrigger(filepath="/nowhere/ready"))])
with DAG("watched", schedule=[landing]):
    EmptyOperator(task_id="consume")
"""


def test_an_agents_asset_watcher_trigger_is_parked_for_agent_triggerers(adb, tmp_path, monkeypatch):
    """An agent-parsed DAG's asset watcher never runs in a plane triggerer: its trigger is made parked."""
    from airflow.models.trigger import Trigger

    from airflow_remote_execution.plane.exec_guard import AGENTS_ONLY_QUEUE

    monkeypatch.setenv("AIRFLOW__REMOTE_EXECUTION__PARSED_DAG_IMPORT_ALLOWLIST", "airflow.providers.standard.triggers.*")
    token = _token(adb)
    _write(tmp_path, "watched.py", WATCHED)
    with adb.session() as s:
        parsing.sync_bundles(s, token, [BUNDLE])
        assert parsing.store_result(s, token, _parse(tmp_path, "watched.py")) == ["watched"]
    with adb.session() as s:  # Airflow makes watchers' triggers for unpaused DAGs only
        s.get(DagModel, "watched").is_paused = False
    with adb.session() as s:
        parsing.store_result(s, token, _parse(tmp_path, "watched.py"))
    with adb.session() as s:
        triggers = s.scalars(select(Trigger)).all()
        assert [(t.classpath.rsplit(".", 1)[-1], t.queue) for t in triggers] == [("FileDeleteTrigger", AGENTS_ONLY_QUEUE)]


PLANE_BUNDLES = ("plane-only", "shared")  # the plane's own [dag_processor] dag_bundle_config_list


@pytest.fixture
def plane_bundles(monkeypatch, tmp_path):
    """The plane parses ``plane-only`` and ``shared`` itself (read by Airflow's DagBundlesManager, cached per
    process by exec_guard: emptied around the test); the scheduler's trigger-parking hook is installed."""
    import json

    from airflow_remote_execution.plane import exec_guard

    monkeypatch.setenv("AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST", json.dumps([
        {"name": name, "classpath": "airflow.dag_processing.bundles.local.LocalDagBundle",
         "kwargs": {"path": str(tmp_path)}} for name in PLANE_BUNDLES
    ]))
    monkeypatch.setattr(tokens, "_parsed_by_agents", (float("-inf"), frozenset()))
    exec_guard.plane_bundles.cache_clear()
    exec_guard.park_agents_triggers()  # as the RemoteExecutor does in the scheduler
    yield exec_guard
    exec_guard.plane_bundles.cache_clear()


def _queue_deadline_callbacks(db, bundles) -> dict[str, str | None]:
    """What the scheduler does for a missed deadline of a DAG in each bundle: its AsyncCallback's trigger."""
    from airflow.models.callback import Callback, TriggererCallback
    from airflow.sdk.definitions.callback import AsyncCallback

    with db.session() as s:
        for bundle in bundles:
            callback = TriggererCallback(AsyncCallback("callbacks.on_miss", kwargs={}))
            callback.bundle_name = bundle
            s.add(callback)
            callback.queue(session=s)
    with db.session() as s:
        return {c.bundle_name: c.trigger.queue for c in s.scalars(select(Callback))}


def test_a_deadline_callback_runs_on_the_plane_only_for_a_bundle_the_plane_alone_parses(adb, plane_bundles):
    """Deny by default: parked unless the plane parses the bundle and no agent token names it; a bundle both
    parse is the agents' (agents' rule wins); one only agents have is parked whether or not a token names it."""
    _token(adb, bundles=(BUNDLE, "shared"))
    queues = _queue_deadline_callbacks(adb, (BUNDLE, "shared", "plane-only", "nobodys"))
    parked = plane_bundles.AGENTS_ONLY_QUEUE
    assert queues == {BUNDLE: parked, "shared": parked, "plane-only": None, "nobodys": parked}


def test_a_deadline_callback_made_before_any_token_names_its_bundle_is_parked(adb, plane_bundles, monkeypatch):
    """The race the token list cannot close: the scheduler's list of agents' bundles was read (and is reused
    for a second) before the token naming BUNDLE existed: still parked, since the plane does not parse
    BUNDLE itself."""
    monkeypatch.setattr(tokens, "_parsed_by_agents", (float("inf"), frozenset()))  # read before any token
    _token(adb)  # names BUNDLE, too late for the scheduler's cached list
    queues = _queue_deadline_callbacks(adb, (BUNDLE, "plane-only"))
    assert queues == {BUNDLE: plane_bundles.AGENTS_ONLY_QUEUE, "plane-only": None}


def test_with_no_bundles_of_its_own_the_plane_runs_no_trigger(adb, plane_bundles, monkeypatch):
    """A plane whose dag_bundle_config_list is empty parses nothing itself: every trigger is agents'."""
    monkeypatch.setenv("AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST", "[]")
    plane_bundles.plane_bundles.cache_clear()
    queues = _queue_deadline_callbacks(adb, ("plane-only", "nobodys"))
    assert set(queues.values()) == {plane_bundles.AGENTS_ONLY_QUEUE}


STARTS_FROM_TRIGGER = """
from airflow.sdk import DAG
from airflow.providers.standard.sensors.date_time import DateTimeSensorAsync

with DAG("{dag_id}", schedule=None):
    DateTimeSensorAsync(task_id="wait", target_time="2000-01-01T00:00:00+00:00", start_from_trigger=True)
"""
TEMPLATED_AND_MAPPED = """
from airflow.sdk import DAG
from airflow.providers.standard.sensors.date_time import DateTimeSensorAsync

with DAG("{dag_id}", schedule=None):
    DateTimeSensorAsync(task_id="wait", target_time="{{{{ dag_run.run_after }}}}", start_from_trigger=True)
    DateTimeSensorAsync.partial(task_id="each", start_from_trigger=True).expand(
        target_time=["2000-01-01T00:00:00+00:00", "2001-01-01T00:00:00+00:00", "{{{{ ds }}}}T00:00:00+00:00"]
    )
"""


def _scheduled_run(s, dag_id: str) -> None:
    """What the scheduler does with a new run of ``dag_id`` (``_schedule_dag_run``): its state, then its
    schedulable tasks, where ``TaskInstance.defer_task`` makes a start_from_trigger task's trigger."""
    from airflow.models.dagbag import DBDagBag
    from airflow.utils.db import synchronize_log_template
    from airflow.utils.state import DagRunState
    from airflow.utils.types import DagRunTriggeredByType, DagRunType

    synchronize_log_template(session=s)  # the row `airflow db migrate` writes, which runs point at
    s.flush()
    dag = DBDagBag().get_latest_version_of_dag(dag_id, session=s)
    run = dag.create_dagrun(run_id="r1", run_after=timezone.utcnow(), run_type=DagRunType.MANUAL,
                            triggered_by=DagRunTriggeredByType.TEST, state=DagRunState.RUNNING, session=s)
    run.dag = dag
    schedulable, _ = run.update_state(session=s, execute_callbacks=False)
    assert run.schedule_tis(schedulable, session=s) == 0  # deferred straight away, nothing for a worker


def _store_as_the_planes_dag_processor(s, tmp_path: Path, rel: str, bundle: str) -> None:
    """What the plane's own dag processor writes for a file of ``bundle``."""
    from airflow.dag_processing.manager import DagFileProcessorManager
    from airflow.dag_processing.processor import DagFileParsingResult
    from airflow.serialization.serialized_objects import LazyDeserializedDAG

    if s.get(DagBundleModel, bundle) is None:
        s.add(DagBundleModel(name=bundle))
        s.flush()
    parsed = _parse(tmp_path, rel, bundle=bundle)
    assert not parsed.import_errors, parsed.import_errors
    DagFileProcessorManager.persist_parsing_result(
        None, bundle_name=bundle, bundle_version=None, version_data=None, run_duration=0.1,
        relative_fileloc=rel, session=s, parsing_result=DagFileParsingResult(
            fileloc=rel, serialized_dags=[LazyDeserializedDAG(data=d.data) for d in parsed.serialized_dags]),
    )


def _deferred_triggers(db) -> dict[tuple[str, str, int], tuple[str, str | None, dict]]:
    """(dag, task, map index) → (state, trigger queue, trigger kwargs) of every task instance."""
    from airflow.models.taskinstance import TaskInstance
    from airflow.models.trigger import Trigger

    with db.session() as s:
        return {
            (ti.dag_id, ti.task_id, ti.map_index): (ti.state, (t := s.get(Trigger, ti.trigger_id)).queue, t.kwargs)
            for ti in s.scalars(select(TaskInstance))
        }


def _taken_by_a_stock_triggerer(db) -> dict[str, bool]:
    """Which task instances' triggers a stock ``airflow triggerer`` (no ``--queues``) takes."""
    from airflow.jobs.job import Job
    from airflow.models.taskinstance import TaskInstance
    from airflow.models.trigger import Trigger

    with db.session() as s:
        stock = Job(job_type="TriggererJob", state="running")
        s.add(stock)
        s.flush()
        Trigger.assign_unassigned(stock.id, 100, 30, session=s)
    with db.session() as s:
        return {f"{ti.dag_id}.{ti.task_id}[{ti.map_index}]": ti.trigger.triggerer_id is not None
                for ti in s.scalars(select(TaskInstance))}


def test_the_scheduler_parks_start_from_trigger_triggers_unless_the_plane_alone_parses_the_bundle(
    adb, tmp_path, monkeypatch, plane_bundles
):
    """A start_from_trigger task's trigger, made by the scheduler, is parked for agents' triggerers (a stock
    triggerer never takes it) for a DAG of a bundle an agent token names, of one the plane does not parse
    although no token names it (yet, or any more), and of one both parse; not for the plane's own."""
    monkeypatch.setenv("AIRFLOW__REMOTE_EXECUTION__PARSED_DAG_IMPORT_ALLOWLIST", "airflow.providers.standard.triggers.*")
    token = _token(adb, bundles=(BUNDLE, "shared", "gone"))
    for name in ("agents_dag", "planes_dag", "shared_dag", "gone_dag"):
        _write(tmp_path, f"{name}.py", STARTS_FROM_TRIGGER.format(dag_id=name))
    with adb.session() as s:
        parsing.sync_bundles(s, token, [BUNDLE, "gone"])
        assert parsing.store_result(s, token, _parse(tmp_path, "agents_dag.py")) == ["agents_dag"]
        assert parsing.store_result(s, token, _parse(tmp_path, "gone_dag.py", bundle="gone")) == ["gone_dag"]
        _store_as_the_planes_dag_processor(s, tmp_path, "planes_dag.py", "plane-only")
        _store_as_the_planes_dag_processor(s, tmp_path, "shared_dag.py", "shared")
    with adb.session() as s:  # no live agent token names "gone" any more: its DAG is still agents'
        tokens.revoke(s, _token_id(s, "agent-a"))
    _token(adb, bundles=(BUNDLE, "shared"), name="agent-b")
    monkeypatch.setattr(tokens, "_parsed_by_agents", (float("-inf"), frozenset()))
    with adb.session() as s:
        for dag_id in ("agents_dag", "planes_dag", "shared_dag", "gone_dag"):
            _scheduled_run(s, dag_id)
    queues = {dag: (state, queue) for (dag, _, _), (state, queue, _) in _deferred_triggers(adb).items()}
    parked = ("deferred", plane_bundles.AGENTS_ONLY_QUEUE)
    assert queues == {"agents_dag": parked, "planes_dag": ("deferred", None), "shared_dag": parked, "gone_dag": parked}
    assert _taken_by_a_stock_triggerer(adb) == {
        "agents_dag.wait[-1]": False, "planes_dag.wait[-1]": True, "shared_dag.wait[-1]": False, "gone_dag.wait[-1]": False,
    }


def _token_id(s, agent_name: str) -> str:
    from airflow_remote_execution.models import AgentTokenModel

    return s.scalar(select(AgentTokenModel.id).where(AgentTokenModel.agent_name == agent_name))


def test_templated_and_mapped_start_from_trigger_tasks_are_parked_for_an_agents_dag(
    adb, tmp_path, monkeypatch, plane_bundles
):
    """Through Airflow's real ``schedule_tis``: a start_from_trigger task whose trigger kwargs are templates
    (rendered later, by the triggerer that runs it) and a mapped one (one trigger per map index, all made
    in one scheduling pass) are parked for an agent's DAG, and not for the same DAG of the plane's bundle."""
    monkeypatch.setenv("AIRFLOW__REMOTE_EXECUTION__PARSED_DAG_IMPORT_ALLOWLIST", "airflow.providers.standard.triggers.*")
    token = _token(adb)
    _write(tmp_path, "agents.py", TEMPLATED_AND_MAPPED.format(dag_id="agents_dag"))
    _write(tmp_path, "planes.py", TEMPLATED_AND_MAPPED.format(dag_id="planes_dag"))
    with adb.session() as s:
        parsing.sync_bundles(s, token, [BUNDLE])
        assert parsing.store_result(s, token, _parse(tmp_path, "agents.py")) == ["agents_dag"]
        _store_as_the_planes_dag_processor(s, tmp_path, "planes.py", "plane-only")
    with adb.session() as s:
        _scheduled_run(s, "agents_dag")
        _scheduled_run(s, "planes_dag")
    triggers = _deferred_triggers(adb)
    expected_tis = {(dag, "wait", -1) for dag in ("agents_dag", "planes_dag")} | {
        (dag, "each", i) for dag in ("agents_dag", "planes_dag") for i in range(3)}
    assert set(triggers) == expected_tis
    for (dag, task, index), (state, queue, _) in triggers.items():
        assert state == "deferred"
        assert queue == (plane_bundles.AGENTS_ONLY_QUEUE if dag == "agents_dag" else None), (dag, task, index)
    assert "{{ dag_run.run_after }}" in str(triggers[("agents_dag", "wait", -1)][2])  # unrendered on the plane
    taken = _taken_by_a_stock_triggerer(adb)
    assert {key for key, took in taken.items() if took} == {k for k in taken if k.startswith("planes_dag.")}
