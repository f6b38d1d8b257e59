"""
The trust boundary on a real plane (api-server, scheduler, dag-processor on SQLite): an agent token's
scope holds on every path it unlocks. Each test is an attack from issue 13, tried the same way, by a
client that speaks HTTP like a compromised agent: it is refused and nothing happens.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import time
from datetime import datetime, timezone
from pathlib import Path

import jwt
import pytest
import requests

from localplane import EXAMPLE_DAGS, Plane, shutdown

pytestmark = pytest.mark.e2e
TEST_DAGS = Path(__file__).parent / "dags"
V1 = "/remote_execution/v1"


@pytest.fixture(scope="module")
def plane(tmp_path_factory):
    base = tmp_path_factory.mktemp("trust")
    dags = base / "dags"
    shutil.copytree(EXAMPLE_DAGS, dags, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(TEST_DAGS / "remote_probe.py", dags)
    plane = Plane(base / "plane", dags_folder=dags)
    try:
        plane.start()
        plane.api("POST", "/api/v2/variables", json={"key": "plane_only_var", "value": "plane-value"})
        plane.api("POST", "/api/v2/connections", json={
            "connection_id": "plane_secret_conn", "conn_type": "http", "host": "db.internal", "password": "hunter2"})
        yield plane
    finally:
        shutdown(plane, [])


def _post(plane: Plane, path: str, token: str | None, body) -> requests.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return requests.post(f"{plane.url}{V1}{path}", json=body, headers=headers, timeout=30)


def _execution(plane: Plane, method: str, path: str, token: str, **kwargs) -> requests.Response:
    from airflow.sdk.api.datamodels._generated import API_VERSION

    headers = {"Authorization": f"Bearer {token}", "Airflow-API-Version": API_VERSION}
    return requests.request(method, f"{plane.url}/execution/{path}", headers=headers, timeout=30, **kwargs)


def _lease_and_start(plane: Plane, token: str) -> tuple[dict, str]:
    """Trigger remote_probe, lease its task as the attacker's 'agent', confirm the start: the plane makes
    the execution API's start report and hands back the task's execution token, as to a real agent."""
    from airflow.sdk.api.datamodels._generated import API_VERSION

    assert _post(plane, "/agents/register", token, {"concurrency": 1}).status_code == 200
    run_id = plane.trigger("remote_probe")
    leases: list = []
    deadline = time.monotonic() + 120
    while not leases and time.monotonic() < deadline:
        r = _post(plane, "/leases", token, {"slots": 1, "wait": 5})
        assert r.status_code == 200, r.text
        leases = r.json()["leases"]
    (lease,) = leases
    task = {"pid": 4242, "hostname": "attacker", "unixname": "root", "api_version": API_VERSION,
            "start_date": datetime.now(timezone.utc).isoformat()}
    r = _post(plane, f"/work/{lease['work_id']}/start", token, {"fence": lease["fence"], "task": task})
    assert r.status_code == 200, r.text
    execution_token = r.json()["task_run"]["headers"]["refreshed-api-token"]
    lease["run_id"] = run_id
    return lease, execution_token


def test_execution_tokens_are_bound_to_the_lease_and_see_only_their_task(plane):
    """Finding 2: the token an agent gets for its task read every Connection and Variable of the plane,
    wrote other DAGs' XComs and Variables, and outlived its task and its agent token."""
    token = plane.create_agent_token("probe-attacker", "probe")
    lease, execution_token = _lease_and_start(plane, token)
    for t in (lease["workload"]["token"], execution_token):
        claims = jwt.decode(t, options={"verify_signature": False})
        assert (claims["rex_work"], claims["rex_fence"]) == (lease["work_id"], lease["fence"])

    r = _execution(plane, "GET", "connections/plane_secret_conn", execution_token)
    assert r.status_code == 404 and "does not serve its Connections" in r.text and "hunter2" not in r.text
    r = _execution(plane, "GET", "variables/plane_only_var", execution_token)
    assert r.status_code == 404 and "plane-value" not in r.text
    r = _execution(plane, "PUT", "variables/plane_only_var", execution_token, json={"value": "pwned"})
    assert r.status_code == 404
    assert plane.api("GET", "/api/v2/variables/plane_only_var").json()["value"] == "plane-value"

    ti = lease["workload"]["ti"]
    same_bundle = "xcoms/remote_fan_out_fan_in/some_run/extract/return_value"
    assert _execution(plane, "POST", same_bundle, execution_token, json="planted").status_code == 403
    assert _execution(plane, "GET", same_bundle, execution_token).status_code == 404  # readable: not there
    other_team = _other_teams_dag(plane)
    assert _execution(plane, "GET", f"xcoms/{other_team}/r/t/return_value", execution_token).status_code == 403
    assert _execution(plane, "POST", f"xcoms/{other_team}/r/t/k", execution_token, json="x").status_code == 403
    assert _execution(plane, "PATCH", "task-instances/0197a0b1-0000-7000-8000-000000000000/state", execution_token,
                      json={"state": "success", "end_date": datetime.now(timezone.utc).isoformat()}).status_code == 403
    own = f"xcoms/remote_probe/{ti['run_id']}/probe/note"
    r = _execution(plane, "POST", own, execution_token, json="mine")
    assert r.status_code in (200, 201), r.text
    assert _execution(plane, "GET", own, execution_token).status_code == 200

    # The work ends: within a second the token works nowhere, and is never refreshed again.
    r = _post(plane, f"/work/{lease['work_id']}/finish", token, {"fence": lease["fence"], "outcome": "success"})
    assert r.status_code == 200, r.text
    time.sleep(1.1)
    r = _execution(plane, "GET", own, execution_token)
    assert r.status_code == 403 and "lease this token was issued for has ended" in r.text
    assert "refreshed-api-token" not in {k.lower() for k in r.headers}


def test_revoking_the_agent_token_kills_its_tasks_tokens(plane):
    token = plane.create_agent_token("probe-revoked", "probe")
    lease, execution_token = _lease_and_start(plane, token)
    own = f"xcoms/remote_probe/{lease['run_id']}/probe/note"
    assert _execution(plane, "POST", own, execution_token, json="x").status_code in (200, 201)
    token_id = token.split("_")[1]
    plane.airflow("remote-execution", "tokens", "revoke", token_id)
    time.sleep(1.1)
    r = _execution(plane, "GET", own, execution_token)
    assert r.status_code == 403 and "is revoked" in r.text


def _other_teams_dag(plane: Plane) -> str:
    """A DAG of bundle team-b, uploaded by team B's parser agent."""
    token = plane.create_agent_token("team-b-parser", "team-b", "--bundles", "team-b")
    data = _serialized_dag(plane.home / "team-b", 'SyncCallback("team_b.callbacks.notify")', dag_id="team_b_dag")
    body = {"bundle_name": "team-b", "relative_fileloc": "b.py", "run_duration": 0.1, "serialized_dags": [{"data": data}]}
    r = _post(plane, "/parsing/results", token, body)
    assert r.status_code == 200, r.text
    return "team_b_dag"


def _serialized_dag(tmp_path: Path, callback: str, dag_id: str = "evil_dag") -> dict:
    """A DAG serialized by Airflow's own parser, as an agent's dag processor sends it."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    source = textwrap.dedent(f"""
        import json, sys
        from datetime import datetime, timedelta
        from airflow.sdk import DAG, task
        from airflow.sdk.definitions.callback import AsyncCallback, SyncCallback
        from airflow.sdk.definitions.deadline import DeadlineAlert, DeadlineReference
        from airflow.serialization.serialized_objects import DagSerialization
        with DAG("{dag_id}", schedule="@once", start_date=datetime(2024, 1, 1), is_paused_upon_creation=False,
                 deadline=DeadlineAlert(reference=DeadlineReference.DAGRUN_QUEUED_AT,
                                        interval=timedelta(seconds=1), callback={callback})) as dag:
            @task(queue="default")
            def t():
                pass
            t()
        json.dump(DagSerialization.to_dict(dag), sys.stdout)
    """)
    env = {"AIRFLOW_HOME": str(tmp_path), "AIRFLOW__CORE__LOAD_EXAMPLES": "False"}
    out = subprocess.run([sys.executable, "-c", source], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


@pytest.mark.parametrize("callback", [
    'SyncCallback("os.system", kwargs={{"command": "id > {pwned}"}})',
    'AsyncCallback("asyncio.create_subprocess_shell", kwargs={{"cmd": "id > {pwned}"}})',
])
def test_parse_only_token_cannot_plant_code_for_the_plane_or_other_agents(plane, tmp_path, callback):
    """Finding 1: a serialized DAG naming os.system as its deadline callback was stored and run by another
    team's agent (SyncCallback) or the plane's triggerer (AsyncCallback)."""
    pwned = tmp_path / "pwned"
    token = plane.create_agent_token("evil-parser", "team-a", "--bundles", "evil")
    data = _serialized_dag(tmp_path, callback.format(pwned=pwned))
    body = {"bundle_name": "evil", "relative_fileloc": "evil.py", "run_duration": 0.1,
            "serialized_dags": [{"data": data}]}
    r = _post(plane, "/parsing/results", token, body)
    assert r.status_code == 422, r.text
    assert "DAG evil_dag: deadline[0].callback" in r.json()["detail"]
    assert plane.api("GET", "/api/v2/dags/evil_dag").status_code == 404
    time.sleep(3)
    assert not pwned.exists()


def _raw_post(plane: Plane, path: str, token: str | None, declared: int, sent: int) -> tuple[str, float]:
    """Send headers declaring ``declared`` body bytes, then ``sent`` of them; return the status line and
    how long the answer took. The plane should answer without waiting for (or reading) the rest."""
    import socket

    host, port = plane.url.split("//")[1].split(":")
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    head = (f"POST {V1}{path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n{auth}"
            f"Content-Length: {declared}\r\n\r\n").encode()
    started = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head)
        try:
            sock.sendall(b" " * sent)
        except OSError:
            pass  # the plane answered and closed: it did not want the rest
        answer = sock.recv(4096).decode(errors="replace")
    return answer.split("\r\n", 1)[0], time.monotonic() - started


def _tree_rss(pid: int) -> int:
    import psutil

    proc = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)])


def test_no_work_before_authentication_and_bounded_work_after(plane):
    """Finding 4: an unauthenticated 100 MB body took 22.6 s to refuse and grew the api-server by 5 GB."""
    api = plane.procs["api-server"].pid
    before = _tree_rss(api)
    status, took = _raw_post(plane, "/parsing/results", None, 100 * 1024 * 1024, 4 * 1024 * 1024)
    assert status.endswith("401 Unauthorized") and took < 5, (status, took)
    token = plane.create_agent_token("big-body", "default", "--bundles", "b")
    status, took = _raw_post(plane, "/parsing/results", token, 100 * 1024 * 1024, 4 * 1024 * 1024)
    assert status.endswith("413 Request Entity Too Large") or " 413 " in status, status
    assert took < 5
    assert _tree_rss(api) - before < 100 * 1024 * 1024
    assert requests.get(f"{plane.url}/api/v2/monitor/health", timeout=5).status_code == 200


def test_one_token_cannot_hold_the_plane_with_long_polls(plane):
    """Finding 5: 1,000 concurrent long-polls from one token stalled the UI for 46.8 s."""
    from concurrent.futures import ThreadPoolExecutor

    token = plane.create_agent_token("greedy", "greedy-queue")
    assert _post(plane, "/agents/register", token, {"concurrency": 1}).status_code == 200

    def poll(_):
        started = time.monotonic()
        r = _post(plane, "/leases", token, {"slots": 1, "wait": 10})
        return r.status_code, r.headers.get("Retry-After"), time.monotonic() - started

    with ThreadPoolExecutor(60) as pool:
        futures = [pool.submit(poll, i) for i in range(60)]
        time.sleep(2)
        started = time.monotonic()
        assert plane.api("GET", "/api/v2/dags?limit=1").status_code == 200
        ui_latency = time.monotonic() - started
        answers = [f.result() for f in futures]
    assert all(status == 200 for status, _, _ in answers)
    refused = [a for a in answers if a[1] is not None]
    assert len(refused) >= 60 - 4 and all(took < 5 for _, _, took in refused)
    assert ui_latency < 2, ui_latency
