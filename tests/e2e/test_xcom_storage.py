"""
End to end: one plane (no storage credentials, no XCom backend), and per storage kind a pair of agents
(agent-a: queue default, agent-b: queue analytics; no DB) configured with ObjectStorageXComBackend.
A 50 MiB value goes from ``produce`` on agent-a to ``consume`` on agent-b through S3 (moto), Azure Blob
(Azurite), GCS (fake-gcs-server) and a local path. Then: the REST API shows the reference; clearing
the producer purges its object; ``xcom gc`` on an agent keeps referenced objects and deletes orphans.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import boto3
import pytest

from emulators import AWS_TEST_CREDENTIALS, azurite, azurite_connection_string, fake_gcs, moto
from localplane import AIRFLOW, Agent, Plane

pytestmark = pytest.mark.e2e
TEST_DAGS = Path(__file__).parent / "dags"
DAG = "remote_big_xcom"
MIB = 50
# storage kind -> compression used for it (covers all three)
KINDS = {"s3": "zstd", "azure": "gzip", "gcs": "none", "local": "none"}


def _payload_sha(mib: int, seed: int) -> str:
    import random

    return hashlib.sha256(random.Random(seed).randbytes(mib << 19).hex().encode()).hexdigest()


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    with moto() as s3, azurite() as az, fake_gcs() as gcs:
        boto3.client("s3", endpoint_url=s3.url, **AWS_TEST_CREDENTIALS).create_bucket(Bucket="xcom")
        from azure.storage.blob import BlobServiceClient

        BlobServiceClient.from_connection_string(azurite_connection_string(az)).create_container("xcom")
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        storage.Client(project="test", credentials=AnonymousCredentials(), client_options={"api_endpoint": gcs.url}
                       ).create_bucket("xcom")
        yield {"s3": s3, "azure": az, "gcs": gcs, "local": tmp_path_factory.mktemp("xcom-local")}


@pytest.fixture(scope="module")
def plane(tmp_path_factory):
    base = tmp_path_factory.mktemp("xcom-plane")
    dags = base / "dags"
    dags.mkdir()
    shutil.copy(TEST_DAGS / f"{DAG}.py", dags)
    # The DAG reads a plane Variable (remote_big_xcom_empty) to return nothing when rerun: this plane serves
    # its Variables to agents' tasks, which it does only where told (docs/security.md).
    plane = Plane(base / "plane", dags_folder=dags,
                  extra_env={"AIRFLOW__REMOTE_EXECUTION__SERVE_PLANE_SECRETS_TO_AGENTS": "True"})
    try:
        yield plane.start()
    finally:
        plane.stop()
        for proc in plane.procs.values():
            print(f"--- {proc.name}\n{proc.tail(30)}")


def _agent_env(kind: str, stores: dict) -> tuple[dict, str]:
    env = {
        "AIRFLOW__CORE__XCOM_BACKEND": "airflow_remote_execution.xcom.ObjectStorageXComBackend",
        "AIRFLOW__REMOTE_EXECUTION__XCOM_COMPRESSION": KINDS[kind],
        "AIRFLOW__REMOTE_EXECUTION__XCOM_THRESHOLD": "65536",
    }
    if kind == "s3":
        env["AIRFLOW_CONN_XCOM_STORE"] = json.dumps(
            {"conn_type": "aws", "extra": {**AWS_TEST_CREDENTIALS, "endpoint_url": stores["s3"].url}})
        env["AIRFLOW__REMOTE_EXECUTION__XCOM_CONN_ID"] = "xcom_store"
        path = "s3://xcom/e2e"
    elif kind == "azure":
        env["AIRFLOW_CONN_XCOM_STORE"] = json.dumps(
            {"conn_type": "wasb", "extra": {"connection_string": azurite_connection_string(stores["azure"])}})
        env["AIRFLOW__REMOTE_EXECUTION__XCOM_CONN_ID"] = "xcom_store"
        path = "abfs://xcom/e2e"
    elif kind == "gcs":
        env["STORAGE_EMULATOR_HOST"] = stores["gcs"].url
        path = "gs://xcom/e2e"
    else:
        path = f"file://{stores['local']}/e2e"
    env["AIRFLOW__REMOTE_EXECUTION__XCOM_PATH"] = path
    return env, path


@pytest.fixture(scope="module", params=list(KINDS))
def agents(request, plane, stores, tmp_path_factory):
    kind = request.param
    env, path = _agent_env(kind, stores)
    base = tmp_path_factory.mktemp(f"agents-{kind}")
    started = []
    try:
        for name, queue in (("a", "default"), ("b", "analytics")):
            agent_name = f"{kind}-agent-{name}"
            token = plane.create_agent_token(agent_name, queue)
            started.append(Agent(agent_name, base / agent_name, plane.url, token, concurrency=2,
                                 dags_folder=plane.dags_folder, extra_env=env).start())
        for agent in started:
            agent.wait_registered()
        yield kind, path, started
    finally:
        for agent in started:
            agent.stop()
        for agent in started:
            print(f"--- {agent.name}\n{agent.proc.tail(40)}")


def _object_exists(plane_agent: Agent, ref: str) -> bool:
    """Ask from the agent's side (its config and credentials), as an operator would."""
    code = (
        "import sys\nfrom airflow_remote_execution.xcom.store import Settings\n"
        "from airflow.sdk import ObjectStoragePath\n"
        "print(ObjectStoragePath(sys.argv[1], conn_id=Settings.from_config().conn_id).exists())"
    )
    out = subprocess.run([str(Path(AIRFLOW).parent / "python"), "-c", code, ref], env=plane_agent.env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()[-1] == "True"


def _gc(agent: Agent, *args: str) -> dict:
    out = subprocess.run([AIRFLOW, "remote-execution", "xcom", "gc", *args, "--output", "json"], env=agent.env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_50_mib_between_two_agents(plane, agents):
    kind, path, (agent_a, agent_b) = agents
    seed = list(KINDS).index(kind) + 7
    run_id = plane.trigger(DAG, conf={"mib": MIB, "seed": seed})
    state = plane.wait_run(DAG, run_id, timeout=600)
    tis = plane.task_instances(DAG, run_id)
    assert state == "success", tis
    ran_on = {w["key"][2]: w["agent_name"] for w in plane.work_items(dag_id=DAG, run_id=run_id)}
    assert ran_on == {"produce": agent_a.name, "consume": agent_b.name}

    base = f"/api/v2/dags/{DAG}/dagRuns/{run_id}/taskInstances"
    consumed = plane.api("GET", f"{base}/consume/xcomEntries/return_value").json()["value"]
    expected_sha = _payload_sha(MIB, seed)
    assert consumed == {"sha256": expected_sha, "chars": MIB << 20}

    # The plane shows a readable reference and size, not the value and not an opaque path.
    entry = plane.api("GET", f"{base}/produce/xcomEntries/return_value").json()["value"]
    ref = entry if isinstance(entry, dict) else json.loads(entry)
    assert ref["ref"] == f"{path}/{DAG}/{run_id}/produce/-1/return_value.json" + {
        "zstd": ".zst", "gzip": ".gz", "none": ""}[KINDS[kind]]
    assert ref["size"] == "50.0 MiB" and ref["bytes"] > MIB << 20
    assert ref["written_by"] == f"{DAG}.produce in run {run_id} (key 'return_value')"
    assert len(ref["xxh3_128"]) == 32 and ref["compression"] == KINDS[kind]
    if KINDS[kind] != "none":
        assert ref["stored_bytes"] < ref["bytes"]
    assert _object_exists(agent_a, ref["ref"])
    # The plane never had the value: its DB row is the small reference.
    assert len(json.dumps(ref)) < 1000

    # xcom gc on an agent: the object is referenced, so it stays (asks the plane with the agent token).
    kept = _gc(agent_b, "--older-than", "1s")
    assert kept["live_source"] == "plane API" and kept["deleted"] == [] and kept["kept_live"] >= 1, kept

    if kind != "local":
        return
    # Clearing the producer reruns it (returning nothing now): the Task SDK purges the old object first.
    plane.api("POST", "/api/v2/variables", json={"key": "remote_big_xcom_empty", "value": "yes"}).raise_for_status()
    r = plane.api("POST", f"/api/v2/dags/{DAG}/clearTaskInstances",
                  json={"dry_run": False, "task_ids": ["produce"], "dag_run_id": run_id, "only_failed": False,
                        "include_downstream": False})
    assert r.status_code == 200, r.text
    plane.wait_run(DAG, run_id, timeout=300)
    from localplane import wait_for

    wait_for(lambda: not _object_exists(agent_a, ref["ref"]), 120, "the cleared producer's object to be purged")

    assert plane.api("DELETE", "/api/v2/variables/remote_big_xcom_empty").status_code == 204
    # An orphan (its run deleted on the plane) goes with gc, --dry-run first.
    run2 = plane.trigger(DAG, conf={"mib": 1, "seed": 3})
    assert plane.wait_run(DAG, run2, timeout=300) == "success"
    ref2 = plane.api("GET", f"/api/v2/dags/{DAG}/dagRuns/{run2}/taskInstances/produce/xcomEntries/return_value"
                     ).json()["value"]
    ref2 = ref2 if isinstance(ref2, dict) else json.loads(ref2)
    assert plane.api("DELETE", f"/api/v2/dags/{DAG}/dagRuns/{run2}").status_code == 204
    dry = _gc(agent_a, "--older-than", "1s", "--dry-run")
    assert dry["deleted"] == [ref2["ref"]] and _object_exists(agent_a, ref2["ref"])
    done = _gc(agent_a, "--older-than", "1s")
    assert done["deleted"] == [ref2["ref"]] and not done["errors"]
    assert not _object_exists(agent_a, ref2["ref"])
