"""The plane as the official Apache Airflow chart configures it with docs/kubernetes.md's snippet, run: its
rendered airflow.cfg and the api-server's and scheduler's environment (Secrets resolved), `airflow db migrate`
as its migrate job runs it, then api-server and scheduler on PostgreSQL; an agent registers, parses the DAGs
(the snippet turns the plane's dag-processor off) and runs a DAG to success.

What is not the chart's: loopback addresses and a fresh PostgreSQL database instead of the chart's service
names, and Airflow's simple auth manager instead of the chart's FAB one (the FAB provider is not installed
here; the official image has it). RemoteExecutor, the logging config class and the Remote Execution API come
from the chart's airflow.cfg only (the local plane's own executor variable is removed)."""

from __future__ import annotations

import base64

import pytest

from localplane import EXAMPLE_DAGS, Agent, Plane, fresh_pg_database

from .conftest import by_kind
from .test_official_chart import env_of, render_plane, doc_snippet, workloads

pytestmark = [pytest.mark.e2e, pytest.mark.chart]
LOOPBACK_ONLY = ("AIRFLOW__CORE__SQL_ALCHEMY_CONN", "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "AIRFLOW_CONN_AIRFLOW_DB",
                 "AIRFLOW_HOME")


def resolved_env(container: dict, secrets: dict[str, dict[str, str]]) -> dict[str, str]:
    env = {}
    for name, value in env_of(container).items():
        if isinstance(value, dict):
            ref = value["secretKeyRef"]
            value = secrets[ref["name"]][ref["key"]]
        env[name] = value
    return env


def test_plane_from_the_official_chart_runs_agent_work(pg_url, tmp_path):
    values = tmp_path / "values-plane.yaml"
    values.write_text(doc_snippet())
    objects = render_plane(values)
    secrets = {s["metadata"]["name"]: {**{k: base64.b64decode(v).decode() for k, v in s.get("data", {}).items()},
                                       **s.get("stringData", {})} for s in by_kind(objects, "Secret")}
    specs = workloads(objects)
    envs = [resolved_env(next(c for c in specs[name]["containers"] if c["name"] == name), secrets)
            for name in ("api-server", "scheduler")]
    assert envs[0] == envs[1], "the chart gives api-server and scheduler different Airflow environments"
    chart_env = {k: v for k, v in envs[0].items() if k not in LOOPBACK_ONLY}
    assert {"AIRFLOW__API_AUTH__JWT_SECRET", "AIRFLOW__CORE__FERNET_KEY"} <= set(chart_env)
    (cm,) = [c for c in by_kind(objects, "ConfigMap") if "airflow.cfg" in c.get("data", {})]
    home = tmp_path / "plane"
    home.mkdir()
    (home / "airflow.cfg").write_text(cm["data"]["airflow.cfg"])
    (tmp_path / "no-dags").mkdir()

    plane = Plane(home, db_url=fresh_pg_database(pg_url, "official_chart"), dags_folder=tmp_path / "no-dags",
                  extra_env={**chart_env, "AIRFLOW_CONFIG": str(home / "airflow.cfg"),
                             "AIRFLOW__CORE__AUTH_MANAGER":
                                 "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
                             "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(home / "logs"),
                             "AIRFLOW__METRICS__STATSD_ON": "False"})
    del plane.env["AIRFLOW__CORE__EXECUTOR"]  # the chart's airflow.cfg names the executor
    assert plane.airflow("config", "get-value", "core", "executor").stdout.strip() == (
        "airflow_remote_execution.executors.RemoteExecutor")
    agent = None
    try:
        plane.start(components=("api-server", "scheduler"))
        token = plane.create_agent_token("official-chart", "default", "--bundles", "dags-folder")
        agent = Agent("official-chart", tmp_path / "agent", plane.url, token, dags_folder=EXAMPLE_DAGS,
                      extra_env={"AIRFLOW__REMOTE_EXECUTION__COMPONENTS": "worker,dag-processor"}).start()
        agent.wait_registered()
        run_id = plane.trigger("remote_fan_out_fan_in")
        assert plane.wait_run("remote_fan_out_fan_in", run_id) == "success"
        items = plane.settled_work_items(dag_id="remote_fan_out_fan_in", run_id=run_id)
        assert items and {(w["agent_name"], w["state"]) for w in items} == {("official-chart", "success")}
    finally:
        if agent:
            agent.stop()
        plane.stop()
        for proc in plane.history + ([agent.proc] if agent and agent.proc else []):
            print(f"--- {proc.name}\n{proc.tail(30)}")

