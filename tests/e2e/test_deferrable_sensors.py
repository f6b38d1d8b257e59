"""
Stock deferrable sensors on agent triggerers (issue 16) and agents' triggers kept off the plane's
triggerer (issue 13), end to end on PostgreSQL.

The plane (api-server, scheduler, dag-processor; no triggerer at first) parses two bundles: ``team_a``
(``deferrable_sensors``, ``ext_denied``, ``target_a``) and ``team_b`` (``target_b``). Agent ``alpha``'s token
serves queue ``default`` and bundle ``team_a``; it runs a worker and, in its own process, a triggerer
(``agent triggerer``), with no metadata DB.

1. Every stock deferrable sensor completes: ExternalTaskSensor (task and DAG level), TriggerDagRunOperator
   waiting for its run, DateTimeSensorAsync, TimeDeltaSensorAsync, TimeDeltaSensor(deferrable) and
   FileSensor(deferrable) on the agent's filesystem (and an unanswered HITLOperator, which in Airflow 3.3
   waits with no trigger). Their triggers' requests (task-instance and DAG-run counts, DAG-run state)
   reach the plane through the triggerer's route.
2. An ExternalTaskSensor on team_b's DAG fails: the plane refuses its trigger's request (403) and says why.
3. An asset watcher (FileDeleteTrigger on the agent's filesystem) and a deadline alert's AsyncCallback run
   on the agent's triggerer: its token allows their DAGs' bundle.
4. With a stock ``airflow triggerer`` running on the plane and the agent's triggerer stopped, a trigger an
   agent's task created, and one the scheduler made for a ``start_from_trigger`` task of team_a, are never
   taken by the plane's triggerer; the agent's triggerer, back, runs both.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from localplane import AIRFLOW, Agent, Plane, Proc, fresh_pg_database, shutdown, wait_for

pytestmark = pytest.mark.e2e
DAGS = Path(__file__).parent / "dags"
SENSORS = ("external_task", "external_dag", "trigger_and_wait", "datetime_async", "timedelta_async",
           "timedelta_deferrable", "hitl_default", "file")


def _bundles(base: Path) -> str:
    return json.dumps([
        {"name": name, "classpath": "airflow.dag_processing.bundles.local.LocalDagBundle",
         "kwargs": {"path": str(base / name)}}
        for name in ("team_a", "team_b")
    ])


def _install_callbacks(home: Path) -> None:
    """The deadline callback's module in AIRFLOW_HOME/plugins (on every Airflow process's sys.path)."""
    (home / "plugins").mkdir(exist_ok=True)
    shutil.copy(DAGS / "rex_deadline_callbacks.py", home / "plugins")


def _watch_landing(cluster) -> None:
    """``asset_watched`` unpaused, and the agent's triggerer running its asset watcher."""
    cluster.plane.wait_dag("asset_watched")
    cluster.plane.api("PATCH", "/api/v2/dags/asset_watched", json={"is_paused": False}).raise_for_status()
    wait_for(lambda: "(airflow.providers.standard.triggers.file.FileDeleteTrigger)" in cluster.triggerer_log(), 120,
             "the agent's triggerer to start the asset watcher")


class Cluster:
    def __init__(self, base: Path, plane: Plane, agent: Agent):
        self.base, self.plane, self.agent = base, plane, agent
        self.triggerer: Proc | None = None
        self.triggerers = 0

    def start_triggerer(self) -> None:
        self.triggerers += 1
        self.triggerer = Proc(f"agent-triggerer-{self.triggerers}", [AIRFLOW, "remote-execution", "agent", "triggerer"],
                              self.agent.env, self.agent.home)
        wait_for(lambda: "Triggerer registered as" in self.triggerer_log(), 90, "the agent's triggerer")

    def stop_triggerer(self) -> None:
        self.triggerer.stop()

    def triggerer_log(self) -> str:
        return self.triggerer.log_path.read_text(errors="replace") if self.triggerer else ""

    def trigger(self, dag_id: str, logical_date: str, conf: dict | None = None) -> str:
        plane = self.plane
        plane.wait_dag(dag_id)
        plane.api("PATCH", f"/api/v2/dags/{dag_id}", json={"is_paused": False}).raise_for_status()
        r = plane.api("POST", f"/api/v2/dags/{dag_id}/dagRuns", json={"logical_date": logical_date, "conf": conf or {}})
        r.raise_for_status()
        return r.json()["dag_run_id"]

    def states(self, dag_id: str, run_id: str) -> dict[str, str]:
        return {ti["task_id"]: ti["state"] for ti in self.plane.task_instances(dag_id, run_id)}

    def trigger_logs(self, home: Path, dag_id: str, run_id: str) -> list[Path]:
        return sorted(home.glob(f"logs/dag_id={dag_id}/run_id={run_id}/task_id=*/*.trigger.*.log"))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, pg_url):
    base = tmp_path_factory.mktemp("sensors")
    for bundle, files in (("team_a", ("remote_deferrable_sensors.py", "remote_sensor_target_a.py",
                                      "remote_watchers_and_deadlines.py", "remote_start_from_trigger.py")),
                          ("team_b", ("remote_sensor_target_b.py",))):
        (base / bundle).mkdir()
        for name in files:
            shutil.copy(DAGS / name, base / bundle)
    (base / "landing").mkdir()
    bundles = {"AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST": _bundles(base)}
    plane = Plane(base / "plane", db_url=fresh_pg_database(pg_url, "deferrable_sensors"), dags_folder=base / "team_a",
                  extra_env=bundles)
    _install_callbacks(plane.home)
    agent = cluster = None
    try:
        plane.start(components=("api-server", "scheduler", "dag-processor"))
        token = plane.create_agent_token("alpha", "default", "--bundles", "team_a")
        agent = Agent("alpha", base / "alpha", plane.url, token, dags_folder=base / "team_a", extra_env={
            **bundles,
            "AIRFLOW__REMOTE_EXECUTION__COMPONENTS": "worker",
            "AIRFLOW__TRIGGERER__CAPACITY": "20",
            "AIRFLOW_CONN_FS_DEFAULT": json.dumps({"conn_type": "fs"}),  # the agent's own connection
        })
        _install_callbacks(agent.home)
        agent.start().wait_registered()
        cluster = Cluster(base, plane, agent)
        cluster.start_triggerer()
        yield cluster
    finally:
        if cluster is not None and cluster.triggerer is not None:
            cluster.triggerer.stop()
        shutdown(plane, [agent] if agent else [])


def test_stock_deferrable_sensors_complete_on_the_agents_triggerer(cluster):
    plane = cluster.plane
    assert "triggerer" not in plane.procs
    flag = cluster.base / "flag-file"
    logical_date = datetime.now(timezone.utc).isoformat()
    target = cluster.trigger("target_a", logical_date)
    run_id = cluster.trigger("deferrable_sensors", logical_date, conf={"flag": str(flag)})
    assert plane.wait_run("target_a", target, timeout=180) == "success"
    wait_for(lambda: cluster.states("deferrable_sensors", run_id).get("file") == "deferred", 180, "the file sensor to defer")
    flag.write_text("here")
    state = plane.wait_run("deferrable_sensors", run_id, timeout=300)
    states = cluster.states("deferrable_sensors", run_id)
    assert state == "success", states
    assert states == dict.fromkeys(SENSORS, "success")

    # Each sensor deferred (the time sensors wait 75 s past the logical date), and its trigger ran on the
    # agent's triggerer (its log is on the agent).
    logs = cluster.trigger_logs(cluster.agent.home, "deferrable_sensors", run_id)
    assert {p.parent.name.removeprefix("task_id=") for p in logs} == set(SENSORS) - {"hitl_default"}, logs
    log = cluster.triggerer_log()
    for classpath in ("external_task.WorkflowTrigger", "external_task.DagStateTrigger", "temporal.DateTimeTrigger",
                      "file.FileTrigger"):
        assert re.search(rf"Starting trigger \d+ \(airflow\.providers\.standard\.triggers\.{classpath}\)", log), classpath
    assert not list((plane.home / "logs").glob("**/*.trigger.*.log"))


def test_a_sensor_on_a_dag_of_a_bundle_the_token_does_not_allow_fails_with_the_reason(cluster):
    logical_date = datetime.now(timezone.utc).isoformat()
    run_id = cluster.trigger("ext_denied", logical_date)
    assert cluster.plane.wait_run("ext_denied", run_id, timeout=240) == "failed"
    assert cluster.states("ext_denied", run_id) == {"external_other_team": "failed"}
    [log] = cluster.trigger_logs(cluster.agent.home, "ext_denied", run_id)
    text = log.read_text(errors="replace")
    assert "403" in text and "DAG 'target_b' is neither" in text, text[-3000:]


def test_an_asset_watcher_and_a_deadline_callback_run_on_the_agents_triggerer(cluster):
    plane = cluster.plane
    assert "triggerer" not in plane.procs
    _watch_landing(cluster)
    ready = cluster.base / "landing" / "ready"
    ready.write_text("landed")  # on the agent's filesystem: the watcher deletes it and the asset has an event

    def watched_run_succeeded():
        runs = plane.api("GET", "/api/v2/dags/asset_watched/dagRuns").json()["dag_runs"]
        return [r for r in runs if r["state"] == "success"]

    [run] = wait_for(watched_run_succeeded, 180, "asset_watched to run on the watcher's event")
    assert run["run_type"] == "asset_triggered"
    assert not ready.exists()

    marker = cluster.base / "deadline-marker"
    run_id = cluster.trigger("deadline_missed", datetime.now(timezone.utc).isoformat())
    wait_for(marker.exists, 120, "the deadline callback")
    assert marker.read_text() == str(cluster.agent.home)  # it ran on the agent
    [callback] = re.findall(r"Starting trigger (\d+) \(airflow\.triggers\.callback\.CallbackTrigger\)",
                            cluster.triggerer_log())
    # Its events (running, then success with the callback's result) reached Airflow's Trigger.submit_event.
    wait_for(lambda: cluster.triggerer_log().count(f"Trigger {callback} event reported") == 2, 60, "the callback's events")
    assert f"Trigger {callback} event dropped" not in cluster.triggerer_log()
    from sqlalchemy import create_engine, text

    engine = create_engine(plane.db_url)
    try:
        with engine.connect() as db:
            states = db.execute(text("SELECT state, output FROM callback")).all()
    finally:
        engine.dispose()
    assert [(state, output) for state, output in states] == [("success", "called")]
    assert plane.wait_run("deadline_missed", run_id, timeout=180) == "success"


def test_each_request_a_trigger_can_make_is_served_or_refused_by_the_plane(cluster):
    """The route the agent's trigger supervisor uses, called as it does, for every kind of request."""
    import requests

    plane = cluster.plane
    target = cluster.trigger("target_a", datetime.now(timezone.utc).isoformat())
    assert plane.wait_run("target_a", target, timeout=180) == "success"
    _watch_landing(cluster)  # the agent's triggerer owns the asset watcher of "landing_file"
    triggerer_id = re.findall(r"Triggerer registered as (\d+)", cluster.triggerer_log())[-1]
    base = f"{plane.url}/remote_execution/v1/triggerers/{triggerer_id}/execution"
    headers = {"Authorization": f"Bearer {cluster.agent.token}"}

    def call(method: str, path: str, **kwargs) -> requests.Response:
        return requests.request(method, f"{base}/{path}", headers=headers, timeout=30, **kwargs)

    served = {
        "GetTICount": call("GET", "task-instances/count",
                           params={"dag_id": "target_a", "task_ids": ["done"], "run_ids": [target]}),
        "GetTaskStates": call("GET", "task-instances/states", params={"dag_id": "target_a"}),
        "GetDRCount": call("GET", "dag-runs/count", params={"dag_id": "target_a", "states": ["success"]}),
        "GetDagRunState": call("GET", f"dag-runs/target_a/{target}/state"),
        "GetPreviousTI": call("GET", "task-instances/previous/target_a/done"),
        "GetXCom": call("GET", f"xcoms/target_a/{target}/done/return_value"),
        "GetAssetStateStore": call("GET", "store/asset/by-name/value", params={"name": "landing_file", "key": "k"}),
        "SetAssetStateStore (a watched asset)": call(
            "PUT", "store/asset/by-name/value", params={"name": "landing_file", "key": "cursor"}, json={"value": 1}),
    }
    statuses = {kind: r.status_code for kind, r in served.items()}
    assert statuses == {**dict.fromkeys(served, 200), "GetAssetStateStore": 404, "SetAssetStateStore (a watched asset)": 204}, {
        kind: r.text[:300] for kind, r in served.items()}
    assert served["GetTICount"].json() == 1
    assert served["GetDagRunState"].json() == {"state": "success"}
    assert served["GetXCom"].json()["value"] == "done"
    assert call("GET", "store/asset/by-name/value", params={"name": "landing_file", "key": "cursor"}).json()["value"] == 1

    refused = {
        "GetTICount (team_b)": call("GET", "task-instances/count", params={"dag_id": "target_b"}),
        "GetDagRunState (team_b)": call("GET", "dag-runs/target_b/r/state"),
        "SetXCom": call("POST", f"xcoms/target_a/{target}/done/k", json="v"),
        "DeleteXCom": call("DELETE", f"xcoms/target_a/{target}/done/return_value"),
        "PutVariable": call("PUT", "variables/v", json={"key": "v", "value": "x"}),
        "GetConnection": call("GET", "connections/fs_default"),
        "UpdateHITLDetail (not its trigger's)": call("PATCH", "hitlDetails/01a245e5-b33f-78ab-a816-f2409eb85f78", json={}),
        "SetAssetStateStore (not watched)": call(
            "PUT", "store/asset/by-name/value", params={"name": "other", "key": "k"}, json={"value": 1}),
    }
    assert {kind: r.status_code for kind, r in refused.items()} == {
        **dict.fromkeys(refused, 403), "GetConnection": 404}, {kind: r.text[:300] for kind, r in refused.items()}
    assert "DAG 'target_b' is neither" in refused["GetTICount (team_b)"].text
    # A query or a '..' smuggled into the path (percent-encoded) is a 400, never another route or DAG.
    for path in ("dag-runs/count%3Fdag_id=target_b", "xcoms/%2E%2E/connections/fs_default"):
        assert call("GET", path).status_code == 400, path
    # Another agent's token, or no token, gets nothing.
    assert requests.get(f"{base}/dag-runs/count", params={"dag_id": "target_a"}, timeout=30).status_code == 401


def test_a_plane_triggerer_never_runs_a_trigger_an_agents_task_created(cluster):
    """Nor one the scheduler made for a start_from_trigger task of a bundle an agent token names."""
    plane = cluster.plane
    cluster.stop_triggerer()
    plane.start_component("triggerer")
    try:
        flag = cluster.base / "parked-flag"
        now = datetime.now(timezone.utc).isoformat()
        runs = {"parked_deferral": cluster.trigger("parked_deferral", now, conf={"flag": str(flag)}),
                "start_from_trigger": cluster.trigger("start_from_trigger", now)}
        for dag_id, run_id in runs.items():
            wait_for(lambda d=dag_id, r=run_id: cluster.states(d, r).get("wait") == "deferred", 180,
                     f"{dag_id}'s task to defer")
        # The plane's triggerer polls for free triggers every second; give it many chances to take them
        # (start_from_trigger's moment has passed: taken, it would fire at once).
        time.sleep(15)
        trigger_ids = {}
        for dag_id, run_id in runs.items():
            [ti] = plane.task_instances(dag_id, run_id)
            assert ti["state"] == "deferred", (dag_id, ti)
            assert ti["trigger"]["triggerer_id"] is None, (dag_id, ti["trigger"])
            assert ti["trigger"]["queue"] == "remote-execution:agents-only", (dag_id, ti["trigger"])
            trigger_ids[dag_id] = ti["trigger"]["id"]
        assert not list((plane.home / "logs").glob("**/*.trigger.*.log"))

        flag.write_text("go")
        cluster.start_triggerer()  # the agent's triggerer, back, claims and runs them
        plane_log = plane.procs["triggerer"].log_path
        for dag_id, run_id in runs.items():
            assert plane.wait_run(dag_id, run_id, timeout=180) == "success", cluster.states(dag_id, run_id)
            assert f"Starting trigger {trigger_ids[dag_id]} " in cluster.triggerer_log()
            assert cluster.trigger_logs(cluster.agent.home, dag_id, run_id)
            assert f"(ID {trigger_ids[dag_id]})" not in plane_log.read_text(errors="replace")
        assert not list((plane.home / "logs").glob("**/*.trigger.*.log"))
    finally:
        plane.stop_component("triggerer")
