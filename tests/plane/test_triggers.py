"""Plane side of agent triggerers against real Airflow tables (SQLite and PostgreSQL): claims by queue,
executor and capacity, races between api-servers, coexistence with the stock triggerer, lost agents,
events and failures through Airflow's own Trigger.submit_event/submit_failure."""

from __future__ import annotations

import threading
import uuid
from datetime import datetime, timedelta, timezone

import pytest
from cryptography.fernet import Fernet
from sqlalchemy import delete, insert, select, update

from airflow.configuration import conf
from airflow.jobs.job import Job
from airflow.models.asset import AssetModel, AssetWatcherModel, DagScheduleAssetReference
from airflow.models.callback import Callback
from airflow.models.crypto import get_fernet
from airflow.models.dag import DagModel
from airflow.models.dag_version import DagVersion
from airflow.models.dagbundle import DagBundleModel
from airflow.models.dagrun import DagRun
from airflow.models.taskinstance import TaskInstance
from airflow.models.trigger import Trigger
from airflow.sdk.serde import serialize
from airflow.triggers.base import TaskSuccessEvent

from airflow_remote_execution.plane import exec_guard, tokens, triggers
from airflow_remote_execution.models.tables import AgentTokenModel, AgentTriggererModel
from airflow_remote_execution.wire.triggers import TriggererRegisterRequest, TriggerSyncRequest

DAG = "deferring_dag"
CLASSPATH = "airflow.providers.standard.triggers.temporal.DateTimeTrigger"
MOMENT = datetime(2030, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
_AIRFLOW_TABLES = (AssetWatcherModel, DagScheduleAssetReference, AssetModel, Callback, TaskInstance, DagRun, Trigger, DagVersion, DagModel, DagBundleModel, Job, AgentTriggererModel)
_created: set[str] = set()


@pytest.fixture
def adb(db, monkeypatch):
    """``db`` plus Airflow's own tables (created once per engine, emptied around each test) and a fernet key."""
    from airflow.models import import_all_models
    from airflow.models.base import Base

    if db.name not in _created:
        import_all_models()
        Base.metadata.create_all(db.engine)
        _created.add(db.name)
    monkeypatch.setenv("AIRFLOW__CORE__FERNET_KEY", Fernet.generate_key().decode())
    get_fernet.cache_clear()
    _wipe(db)
    triggers._scopes.clear()
    exec_guard._bundles_of_dags.clear()  # per process, not per database
    # The plane parses DAG's bundle itself: the triggers it makes for it are not parked (exec_guard.parks).
    monkeypatch.setenv("AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST", '[{"name": "bundle", "classpath": '
                       '"airflow.dag_processing.bundles.local.LocalDagBundle", "kwargs": {"path": "/nowhere"}}]')
    monkeypatch.setattr(tokens, "_parsed_by_agents", (float("-inf"), frozenset()))
    exec_guard.plane_bundles.cache_clear()
    yield db
    _wipe(db)
    get_fernet.cache_clear()
    exec_guard.plane_bundles.cache_clear()


def _wipe(db) -> None:
    with db.session() as s:
        for model in _AIRFLOW_TABLES:
            s.execute(delete(model))


def _dag(s) -> uuid.UUID:
    if s.get(DagModel, DAG) is None:
        s.add(DagBundleModel(name="bundle"))
        s.flush()
        s.add(DagModel(dag_id=DAG, bundle_name="bundle", relative_fileloc="deferring_dag.py", max_active_tasks=16,
                       max_consecutive_failed_dag_runs=0, has_task_concurrency_limits=False))
        s.flush()
        s.add(DagVersion(dag_id=DAG, version_number=1, bundle_name="bundle"))
        s.flush()
        s.execute(insert(DagRun.__table__).values(dag_id=DAG, run_id="r1", run_type="manual", state="running",
                                                  run_after=datetime.now(timezone.utc), clear_number=0))
    return s.scalar(select(DagVersion.id).where(DagVersion.dag_id == DAG))


def deferred(db, task_id: str, *, queue: str = "default", trigger_queue: str | None = None, priority: int = 1,
             executor: str | None = None, state: str = "deferred") -> int:
    """A task instance of DAG run r1 deferred on a fresh DateTimeTrigger, as the execution API defers one (the
    trigger inserted while its task instance's state report is served, then linked by a Core UPDATE);
    returns the trigger id."""
    with db.session() as s:
        version = _dag(s)
        ti_id = uuid.uuid4()
        s.execute(insert(TaskInstance.__table__).values(
            id=ti_id, dag_id=DAG, run_id="r1", task_id=task_id, map_index=-1, try_number=1,
            pool="default_pool", pool_slots=1, queue=queue, priority_weight=priority, state=state,
            dag_version_id=version, executor=executor, next_method="execute_complete", next_kwargs={},
        ))
        trigger = Trigger(classpath=CLASSPATH, kwargs={"moment": MOMENT, "end_from_trigger": False},
                          queue=trigger_queue)
        serving = exec_guard._SERVING_TI.set(str(ti_id))  # what ExecutionApiGuard sets for the PATCH .../state
        try:
            s.add(trigger)
            s.flush()
        finally:
            exec_guard._SERVING_TI.reset(serving)
        s.execute(update(TaskInstance).where(TaskInstance.id == ti_id).values(trigger_id=trigger.id))
        return trigger.id


_token_of_job: dict[int, str] = {}


def triggerer(db, agent: str, queues: list[str], capacity: int = 10) -> int:
    with db.session() as s:
        _, token = tokens.create(s, agent_name=agent, queues=queues)
        job_id = triggers.register(s, token, TriggererRegisterRequest(hostname="h", capacity=capacity)).job_id
        _token_of_job[job_id] = token.id
        return job_id


def sync(db, job_id: int, capacity: int = 10, running: list[int] | None = None):
    """What the sync route does: resolve the triggerer for the token's agent, then sync."""
    with db.session() as s:
        row = triggers.for_agent(s, s.get(AgentTokenModel, _token_of_job[job_id]), job_id)
        return triggers.sync(s, row, TriggerSyncRequest(capacity=capacity, running=running or []))


def owner(db, trigger_id: int) -> int | None:
    with db.session() as s:
        return s.scalar(select(Trigger.triggerer_id).where(Trigger.id == trigger_id))


def ti_row(db, task_id: str):
    with db.session() as s:
        return s.execute(select(TaskInstance.__table__).where(TaskInstance.task_id == task_id)).one()


def test_claims_only_deferred_remote_tasks_in_its_queues_by_priority_up_to_capacity(adb):
    low = deferred(adb, "low", priority=1)
    high = deferred(adb, "high", priority=9)
    mid = deferred(adb, "mid", priority=5)
    gpu = deferred(adb, "gpu", queue="gpu")
    local = deferred(adb, "local", executor="LocalExecutor")
    named = deferred(adb, "named", executor="RemoteExecutor")
    deferred(adb, "not_deferred", state="scheduled")

    a = triggerer(adb, "agent-a", ["default"], capacity=2)
    answer = sync(adb, a, capacity=2)
    assert answer.assigned == sorted([high, mid])  # highest priority first, capacity 2
    assert sync(adb, a, capacity=2).assigned == answer.assigned  # full: nothing more

    b = triggerer(adb, "agent-b", ["default", "gpu"])
    taken_by_b = set(sync(adb, b).assigned)
    assert taken_by_b == {low, gpu, named}  # executor named explicitly counts as remote
    assert owner(adb, local) is None  # a LocalExecutor task's trigger is not an agent's


def test_triggers_of_an_agent_parsed_bundle_go_only_to_tokens_allowing_it(adb):
    """The DAG's bundle ("bundle") is parsed by an agent: only a triggerer whose token allows it claims."""
    from airflow_remote_execution.plane import parsing

    trigger = deferred(adb, "t")
    with adb.session() as s:
        tokens.create(s, agent_name="bundle-parser", queues=["default"], bundles=["bundle"])
    tokens._parsed_by_agents = (float("-inf"), frozenset())
    other = triggerer(adb, "other-team", ["default"])
    with adb.session() as s:
        token = s.get(AgentTokenModel, _token_of_job[other])
        refused = parsing.bundles_refused_to(s, token)
        row = triggers.for_agent(s, token, other)
        assert refused == ["bundle"]
        assert triggers.sync(s, row, TriggerSyncRequest(capacity=10, running=[]), not_bundles=refused).assigned == []
    assert owner(adb, trigger) is None
    assert sync(adb, other).assigned == [trigger]  # without the restriction it would have been taken


def test_trigger_queue_set_by_queues_enabled_wins_over_the_task_queue(adb):
    trigger = deferred(adb, "t", queue="default", trigger_queue="gpu")
    assert sync(adb, triggerer(adb, "agent-a", ["default"])).assigned == []
    assert sync(adb, triggerer(adb, "agent-g", ["gpu"])).assigned == [trigger]


def test_sync_hands_out_airflows_workload_with_decrypted_kwargs_once(adb):
    trigger = deferred(adb, "t")
    with adb.session() as s:
        stored = s.scalar(select(Trigger.encrypted_kwargs).where(Trigger.id == trigger))
    assert not stored.startswith("{")  # encrypted at rest with the plane's fernet key
    job = triggerer(adb, "agent-a", ["default"])
    (work,) = sync(adb, job).start
    workload = work.workload
    assert (workload["id"], workload["classpath"], workload["ti"]["task_id"]) == (trigger, CLASSPATH, "t")
    assert Trigger._decrypt_kwargs(workload["encrypted_kwargs"])["moment"] == MOMENT  # no key needed for this
    assert work.log_path.endswith(f"task_id=t/attempt=1.log.trigger.{job}.log")
    assert sync(adb, job, running=[trigger]).start == []


def test_racing_claims_never_share_a_trigger(adb):
    ids = {deferred(adb, f"t{i}") for i in range(30)}
    jobs = [triggerer(adb, f"agent-{i}", ["default"], capacity=4) for i in range(6)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(jobs))

    def claim(job_id: int) -> None:
        barrier.wait()
        for _ in range(3):
            try:
                sync(adb, job_id, capacity=4)
            except Exception as e:  # noqa: BLE001 - SQLite may answer "database is locked"; counted below
                if adb.name == "postgresql" or "locked" not in str(e):
                    errors.append(e)

    threads = [threading.Thread(target=claim, args=(j,)) for j in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    with adb.session() as s:
        owners = dict(s.execute(select(Trigger.id, Trigger.triggerer_id)).all())
    per_job = {j: [t for t, o in owners.items() if o == j] for j in jobs}
    assert all(len(v) <= 4 for v in per_job.values()), per_job
    if adb.name == "postgresql":
        assert sum(len(v) for v in per_job.values()) == 24  # 6 x capacity 4, no trigger twice
    assert set(owners) == ids


def test_live_stock_triggerer_keeps_its_triggers_and_never_takes_agents_ones(adb):
    stock_owned = deferred(adb, "stock_owned")
    agent_owned = deferred(adb, "agent_owned")
    with adb.session() as s:
        stock = Job(job_type="TriggererJob", state="running")
        s.add(stock)
        s.flush()
        stock_id = stock.id
        s.execute(update(Trigger).where(Trigger.id == stock_owned).values(triggerer_id=stock_id))
    job = triggerer(adb, "agent-a", ["default"])
    assert sync(adb, job).assigned == [agent_owned]

    # Airflow's own assignment for the stock triggerer sees the agent triggerer's Job as alive.
    with adb.session() as s:
        Trigger.assign_unassigned(stock_id, 100, 30, session=s)
    assert (owner(adb, stock_owned), owner(adb, agent_owned)) == (stock_id, job)

    # The stock triggerer goes silent past [triggerer] triggerer_health_check_threshold: its trigger is free.
    with adb.session() as s:
        stale = datetime.now(timezone.utc) - timedelta(seconds=conf.getfloat("triggerer", "triggerer_health_check_threshold") + 5)
        s.execute(update(Job).where(Job.id == stock_id).values(latest_heartbeat=stale))
    assert sync(adb, job).assigned == sorted([stock_owned, agent_owned])


def test_lost_agents_triggers_are_free_at_once_and_its_triggerer_retired(adb):
    trigger = deferred(adb, "t")
    lost = triggerer(adb, "agent-lost", ["default"])
    other = triggerer(adb, "agent-other", ["default"])
    assert sync(adb, lost).assigned == [trigger]
    assert sync(adb, other).assigned == []
    with adb.session() as s:
        assert triggers.release_agent(s, "agent-lost") == 1
    assert sync(adb, other).assigned == [trigger]  # no waiting for the health threshold
    with adb.session() as s:
        assert s.get(Job, lost).end_date is not None
    with pytest.raises(triggers.TriggererRetired):
        sync(adb, lost)


def test_stop_hands_triggers_back(adb):
    trigger = deferred(adb, "t")
    job = triggerer(adb, "agent-a", ["default"])
    sync(adb, job)
    with adb.session() as s:
        assert triggers.stop(s, s.get(AgentTriggererModel, job)) == 1
    assert owner(adb, trigger) is None


def test_event_resumes_the_task_through_airflow_and_only_from_the_owner(adb):
    trigger = deferred(adb, "t")
    job = triggerer(adb, "agent-a", ["default"])
    intruder = triggerer(adb, "agent-b", ["default"])
    sync(adb, job)
    with adb.session() as s, pytest.raises(triggers.TriggerNotOwned):
        triggers.submit_event(s, s.get(AgentTriggererModel, intruder), trigger, {"payload": serialize(MOMENT)})
    with adb.session() as s:
        triggers.submit_event(s, s.get(AgentTriggererModel, job), trigger, {"payload": serialize(MOMENT)})
    row = ti_row(adb, "t")
    assert (row.state, row.trigger_id, row.next_method) == ("scheduled", None, "execute_complete")
    from airflow.sdk.serde import deserialize

    assert deserialize(row.next_kwargs)["event"] == MOMENT  # a datetime again, not a string


def test_task_end_event_and_failure(adb):
    done = deferred(adb, "done")
    broken = deferred(adb, "broken")
    job = triggerer(adb, "agent-a", ["default"])
    sync(adb, job)
    with adb.session() as s:
        row = s.get(AgentTriggererModel, job)
        triggers.submit_event(s, row, done, TaskSuccessEvent().model_dump(mode="json"))
        triggers.submit_failure(s, row, broken, ["Traceback ...", "ValueError: boom"])
    assert ti_row(adb, "done").state == "success"
    failed = ti_row(adb, "broken")
    assert (failed.state, failed.next_method, failed.next_kwargs["traceback"][-1]) == (
        "scheduled", "__fail__", "ValueError: boom"
    )


def test_bad_input_is_a_clear_error(adb):
    with pytest.raises(ValueError, match="payload"):
        triggers.decode_event({"something": 1})
    with adb.session() as s:
        _, token = tokens.create(s, agent_name="agent-a", queues=["default"])
        with pytest.raises(triggers.AgentForbidden, match="outside token"):
            triggers.register(s, token, TriggererRegisterRequest(capacity=1, queues=["gpu"]))
        with pytest.raises(triggers.TriggererRetired, match="register again"):
            triggers.for_agent(s, token, 12345)


@pytest.fixture
def sqlite_adb(sqlite_engine, monkeypatch):
    """Like ``adb`` on Airflow's own (SQLite) engine, which the routes' ``create_session`` uses."""
    from unit_db import Db, wipe

    wipe(sqlite_engine)
    db = Db(sqlite_engine)
    if "sqlite" not in _created:
        from airflow.models import import_all_models
        from airflow.models.base import Base

        import_all_models()
        Base.metadata.create_all(sqlite_engine)
        _created.add("sqlite")
    monkeypatch.setenv("AIRFLOW__CORE__FERNET_KEY", Fernet.generate_key().decode())
    get_fernet.cache_clear()
    _wipe(db)
    triggers._scopes.clear()
    exec_guard._bundles_of_dags.clear()  # per process, not per database
    yield db
    _wipe(db)
    wipe(sqlite_engine)
    get_fernet.cache_clear()


def test_routes_authenticate_and_fence_triggerers_by_agent(sqlite_adb):
    from starlette.testclient import TestClient

    from airflow_remote_execution.plane.api.app import create_app

    trigger = deferred(sqlite_adb, "t")
    with sqlite_adb.session() as s:
        token_a = tokens.create(s, agent_name="agent-a", queues=["default"])[0]
        token_b = tokens.create(s, agent_name="agent-b", queues=["default"])[0]

    def post(path: str, token: str | None, body: dict):
        return client.post(f"/v1{path}", json=body, headers={"Authorization": f"Bearer {token}"} if token else {})

    with TestClient(create_app(), raise_server_exceptions=True) as client:
        assert post("/triggerers/register", None, {"capacity": 5}).status_code == 401
        refused = post("/triggerers/register", token_a, {"capacity": 5, "queues": ["gpu"]})
        assert refused.status_code == 403 and "outside token" in refused.json()["detail"]
        reg = post("/triggerers/register", token_a, {"hostname": "host-a", "capacity": 5})
        assert reg.status_code == 200, reg.text
        job = reg.json()["triggerer_id"]
        assert post(f"/triggerers/{job}/sync", token_b, {"capacity": 5, "running": []}).status_code == 409

        answer = post(f"/triggerers/{job}/sync", token_a, {"capacity": 5, "running": []}).json()
        assert answer["assigned"] == [trigger] and answer["start"][0]["workload"]["id"] == trigger

        event = {"triggerer_id": job, "event": {"payload": serialize(MOMENT)}}
        assert post(f"/triggers/{trigger}/event", token_b, event).status_code == 409
        ok = post(f"/triggers/{trigger}/event", token_a, event)
        assert ok.status_code == 200 and ok.json() == {"trigger_id": trigger, "accepted": True}
        assert ti_row(sqlite_adb, "t").state == "scheduled"
        assert post(f"/triggers/{trigger}/event", token_a, {"triggerer_id": job, "event": {"x": 1}}).status_code == 422
        evil = {"__classname__": "os.system", "__version__": 1, "__data__": "true"}
        refused = post(f"/triggers/{trigger}/event", token_a, {"triggerer_id": job, "event": {"payload": evil}})
        assert refused.status_code == 422 and "cannot be decoded" in refused.json()["detail"]
        assert post(f"/triggerers/{2**40}/sync", token_a, {"capacity": 5}).status_code == 422

        assert post(f"/triggerers/{job}/stop", token_a, {}).status_code == 200
        assert post(f"/triggerers/{job}/sync", token_a, {"capacity": 5, "running": []}).status_code == 409


def test_routes_fuzzed_from_their_openapi_never_answer_5xx(sqlite_adb):
    """Schemathesis on the triggerer routes (valid and invalid bodies and ids), with a valid token."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings

    from airflow_remote_execution.plane.api.app import create_app

    deferred(sqlite_adb, "t")
    with sqlite_adb.session() as s:
        token = tokens.create(s, agent_name="fuzz", queues=["default"])[0]
    schema = schemathesis.openapi.from_asgi("/openapi.json", create_app()).include(path_regex=r"^/v1/trigger")
    for operation in schema.get_all_operations():
        op = operation.ok()

        @given(case=op.as_strategy())
        @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
        def call(case):
            response = case.call(headers={"Authorization": f"Bearer {token}"})
            assert response.status_code < 500, f"{case.method} {case.formatted_path} -> {response.text}"

        call()


# ------------------------------------------------------------------ agents' triggers are parked


def _defer_as_agents_task(db, task_id: str, asked_queue: str | None) -> int:
    """A deferral served for a bound execution-API token (an agent's task), the agent asking for ``asked_queue``."""
    from airflow_remote_execution.plane import exec_guard

    exec_guard.park_agents_triggers()
    marker = exec_guard._SERVING_BOUND.set(True)
    try:
        return deferred(db, task_id, trigger_queue=asked_queue)
    finally:
        exec_guard._SERVING_BOUND.reset(marker)


def test_the_planes_own_triggers_are_parked_unless_the_plane_parses_their_dags_bundle(adb, monkeypatch):
    """Deny by default for triggers made without a bound token too: a deferral the execution API serves for
    an unbound token keeps its queue only if the task's DAG is in a bundle the plane parses itself; a trigger
    nothing links to a DAG when it is made is parked (and stays so unless a later flush links it to one)."""
    exec_guard.park_agents_triggers()  # as the plugin does in the api-server
    planes = deferred(adb, "planes", trigger_queue="gpu")
    with adb.session() as s:
        orphan = Trigger(classpath=CLASSPATH, kwargs={"moment": MOMENT, "end_from_trigger": False})
        s.add(orphan)
        s.flush()
        orphan = orphan.id
    monkeypatch.setenv("AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST", "[]")  # "bundle" is not the plane's
    exec_guard.plane_bundles.cache_clear()
    not_planes = deferred(adb, "not_planes", trigger_queue="gpu")
    with adb.session() as s:
        queues = dict(s.execute(select(Trigger.id, Trigger.queue)).all())
    assert queues == {planes: "gpu", orphan: triggers.AGENTS_ONLY_QUEUE, not_planes: triggers.AGENTS_ONLY_QUEUE}


def test_triggers_agents_tasks_create_are_parked_away_from_the_stock_triggerer(adb):
    parked = _defer_as_agents_task(adb, "from_agent", asked_queue=None)
    steered = _defer_as_agents_task(adb, "steered", asked_queue="gpu")  # an agent cannot pick the queue
    planes = deferred(adb, "from_plane")  # created without a bound token: not parked
    with adb.session() as s:
        queues = dict(s.execute(select(Trigger.id, Trigger.queue)).all())
        stock = Job(job_type="TriggererJob", state="running")
        s.add(stock)
        s.flush()
        stock_id = stock.id
    assert queues == {parked: triggers.AGENTS_ONLY_QUEUE, steered: triggers.AGENTS_ONLY_QUEUE, planes: None}

    # The stock triggerer (no --queues, or --queues naming real queues) never takes a parked trigger.
    with adb.session() as s:
        Trigger.assign_unassigned(stock_id, 100, 30, session=s)
        Trigger.assign_unassigned(stock_id, 100, 30, queues={"default", "gpu"}, session=s)
    assert (owner(adb, parked), owner(adb, steered), owner(adb, planes)) == (None, None, stock_id)

    # Agent triggerers claim parked triggers by the task's queue (the plane's), not the one the agent asked.
    assert sync(adb, triggerer(adb, "agent-g", ["gpu"])).assigned == []
    assert sync(adb, triggerer(adb, "agent-d", ["default"])).assigned == sorted([parked, steered])


# ------------------------------------------------------------------ what running triggers may ask the plane


def _other_dag(s, dag_id: str, bundle: str) -> None:
    if s.get(DagBundleModel, bundle) is None:
        s.add(DagBundleModel(name=bundle))
        s.flush()
    s.add(DagModel(dag_id=dag_id, bundle_name=bundle, relative_fileloc=f"{dag_id}.py", max_active_tasks=16,
                   max_consecutive_failed_dag_runs=0, has_task_concurrency_limits=False))


def test_a_triggers_reads_are_scoped_to_its_own_dags_bundles_and_its_tokens(adb):
    job = triggerer(adb, "agent-a", ["default"])

    def decide(method: str, path: str, query: str = ""):
        with adb.session() as s:
            token = s.get(AgentTokenModel, _token_of_job[job])
            return triggers.execution_refusal(s, token, triggers.for_agent(s, token, job), method, path, query)

    assert decide("GET", "task-instances/count", f"dag_id={DAG}")[0] == 403  # no trigger of that DAG yet
    trigger = deferred(adb, "t")
    with adb.session() as s:
        _other_dag(s, "same_bundle_dag", "bundle")
        _other_dag(s, "team_b_dag", "team_b")
        _other_dag(s, "team_c_dag", "team_c")
    assert sync(adb, job).assigned == [trigger]
    own_ti = str(ti_row(adb, "t").id)
    # Claimed a moment ago (within the scope's reuse time): the refusal is decided again on fresh data.
    assert decide("GET", "task-instances/count", f"dag_id={DAG}") is None

    # Its own DAG and its bundle's: every read a trigger makes.
    for path, query in [
        ("task-instances/count", f"dag_id={DAG}&states=success"),
        ("task-instances/states", "dag_id=same_bundle_dag"),
        ("dag-runs/count", f"dag_id={DAG}"),
        (f"dag-runs/{DAG}/r1/state", ""),
        (f"task-instances/previous/{DAG}/t", ""),
        (f"xcoms/{DAG}/r1/t/return_value", "map_index=-1"),
        (f"hitlDetails/{own_ti}", ""),
        ("store/asset/by-name/value", "name=a&key=k"),
    ]:
        assert decide("GET", path, query) is None, path
    # Another team's DAG: refused, unless the token allows its bundle.
    for path, query in [("task-instances/count", "dag_id=team_b_dag"), ("dag-runs/team_b_dag/r/state", ""),
                        ("xcoms/team_b_dag/r/t/k", ""), ("task-instances/previous/team_b_dag/t", "")]:
        assert decide("GET", path, query)[0] == 403, path
    assert decide("GET", "task-instances/count", "dag_id=team_c_dag")[0] == 403
    with adb.session() as s:
        s.execute(update(AgentTokenModel).where(AgentTokenModel.id == _token_of_job[job]).values(bundles=["team_c"]))
    assert decide("GET", "task-instances/count", "dag_id=team_c_dag") is None
    assert decide("GET", "task-instances/count", "dag_id=team_b_dag")[0] == 403
    # Read-only, except the HITL answer to its own trigger's task; no other task instance; no plane secrets.
    assert decide("PATCH", f"hitlDetails/{own_ti}") is None
    assert decide("GET", f"hitlDetails/{uuid.uuid4()}")[0] == 403
    assert decide("PATCH", f"task-instances/{own_ti}/state")[0] == 403
    for method, path in [("POST", f"xcoms/{DAG}/r1/t/k"), ("DELETE", f"xcoms/{DAG}/r1/t/k"), ("PUT", "variables/v"),
                         ("POST", f"dag-runs/{DAG}/new"), ("PUT", "store/asset/by-name/value")]:
        assert decide(method, path)[0] == 403, path
    assert decide("GET", "connections/c")[0] == 404
    # Nothing that the forwarded URL would read differently from what was decided on.
    for path in ["xcoms/../connections/c", "dag-runs/count?dag_id=team_b_dag", "xcoms/./x/y/z", "dag-runs//count",
                 "dag-runs/count%3Fdag_id=team_b_dag", "task-instances/count#x", "connections\\c", "dag-runs/a\nb"]:
        assert decide("GET", path)[0] == 400, path
    assert decide("GET", "variables/v")[0] == 404
    assert decide("PUT", "store/asset/by-name/value", "name=a&key=k")[0] == 403  # no trigger of its watches it


# ------------------------------------------------------------------ asset watchers and deadline callbacks


def _watcher_and_callback(db) -> tuple[int, int]:
    """An asset-watcher trigger of an asset DAG ``deferring_dag`` (bundle "bundle") is scheduled on, and a
    deadline-callback trigger of that DAG's bundle; returns their ids."""
    with db.session() as s:
        _dag(s)
        asset = AssetModel(name="landing", uri="file:///landing", group="asset")
        watcher = Trigger(classpath="airflow.providers.standard.triggers.file.FileDeleteTrigger",
                          kwargs={"filepath": "/tmp/x"})
        callback = Trigger(classpath="airflow.triggers.callback.CallbackTrigger",
                           kwargs={"callback_path": "m.f", "callback_kwargs": {}})
        s.add_all([asset, watcher, callback])
        s.flush()
        s.add(AssetWatcherModel(name="w", asset_id=asset.id, trigger_id=watcher.id))
        s.add(DagScheduleAssetReference(asset_id=asset.id, dag_id=DAG))
        s.execute(insert(Callback.__table__).values(
            id=uuid.uuid4(), type="triggerer", fetch_method="import_path", data={}, bundle_name="bundle",
            priority_weight=1, created_at=datetime.now(timezone.utc), trigger_id=callback.id,
        ))
        return watcher.id, callback.id


def test_asset_watchers_and_deadline_callbacks_go_to_triggerers_whose_token_allows_the_bundle(adb):
    watcher, callback = _watcher_and_callback(adb)
    assert sync(adb, triggerer(adb, "no-bundles", ["default"])).assigned == []  # queue-only tokens take neither
    other = triggerer(adb, "other-team", ["default"])
    with adb.session() as s:
        s.execute(update(AgentTokenModel).where(AgentTokenModel.id == _token_of_job[other]).values(bundles=["b2"]))
    job = triggerer(adb, "team", ["default"])
    with adb.session() as s:
        s.execute(update(AgentTokenModel).where(AgentTokenModel.id == _token_of_job[job]).values(bundles=["bundle"]))

    def sync_with_bundles(job_id: int):
        with adb.session() as s:
            token = s.get(AgentTokenModel, _token_of_job[job_id])
            row = triggers.for_agent(s, token, job_id)
            return triggers.sync(s, row, TriggerSyncRequest(capacity=10, running=[]), bundles=list(token.bundles))

    assert sync_with_bundles(other).assigned == []
    answer = sync_with_bundles(job)
    assert answer.assigned == sorted([watcher, callback])
    started = {w.workload["id"]: w.workload for w in answer.start}
    assert started[watcher]["watched_assets"] == {"landing": "file:///landing"}
    assert started[callback]["classpath"] == "airflow.triggers.callback.CallbackTrigger"
    with adb.session() as s:
        assert set(s.scalars(select(Trigger.queue))) == {triggers.AGENTS_ONLY_QUEUE}  # parked as taken
        token = s.get(AgentTokenModel, _token_of_job[job])
        row = triggers.for_agent(s, token, job)
        decide = lambda m, p, q: triggers.execution_refusal(s, token, row, m, p, q)  # noqa: E731
        assert decide("PUT", "store/asset/by-name/value", "name=landing&key=cursor") is None
        assert decide("DELETE", "store/asset/by-uri/clear", "uri=file%3A%2F%2F%2Flanding") is None
        assert decide("PUT", "store/asset/by-name/value", "name=elsewhere&key=cursor")[0] == 403

    # The triggerer goes away: a stock triggerer on the plane does not take them back (parked).
    with adb.session() as s:
        triggers.stop(s, triggers.for_agent(s, s.get(AgentTokenModel, _token_of_job[job]), job))
        stock = Job(job_type="TriggererJob", state="running")
        s.add(stock)
        s.flush()
        Trigger.assign_unassigned(stock.id, 100, 30, session=s)
    assert (owner(adb, watcher), owner(adb, callback)) == (None, None)
