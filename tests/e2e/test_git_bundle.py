"""
End to end with a GitDagBundle: a real git server on loopback (``git http-backend`` behind basic
auth, the token in an ``AIRFLOW_CONN_*`` git connection), a plane whose dag processor parses the
bundle, and an agent with the same bundle config but its own bundle storage and no metadata DB.

A run created at commit A runs A's code on the agent even after B is pushed and a new run uses B,
also when its task is cleared and re-run; the agent's stale bundle versions are removed.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from git_server import GitServer
from localplane import AIRFLOW, Agent, Plane, shutdown, wait_for

from airflow_remote_execution.agent.bundles import git_bundle

pytestmark = pytest.mark.e2e

DAG_ID = "git_versioned"
TOKEN = ("git", "e2e-git-token-123")
DAG_FILE = '''\
from __future__ import annotations

import pendulum

from airflow.sdk import dag, task

CODE = "{code}"


@dag(schedule=None, start_date=pendulum.datetime(2024, 1, 1, tz="UTC"), catchup=False)
def git_versioned():
    @task
    def which():
        return {{"code": CODE, "file": __file__}}

    which()


git_versioned()
'''


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("git-bundle")
    with GitServer(auth=TOKEN) as server:
        repo = server.create_repo("dags")
        sha_a = repo.commit({"dags/git_versioned.py": DAG_FILE.format(code="A"), "README.md": "not DAGs\n"}, "A")
        bundle_env = {
            "AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST": json.dumps(
                [git_bundle("repo", repo.url, conn_id="git_dags", subdir="dags", refresh_interval=5)]
            ),
            "AIRFLOW_CONN_GIT_DAGS": json.dumps({"conn_type": "git", "login": TOKEN[0], "password": TOKEN[1]}),
        }
        plane = Plane(
            base / "plane",
            extra_env={**bundle_env, "AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_STORAGE_PATH": str(base / "plane-bundles")},
        )
        agent_storage = base / "agent-bundles"
        agent = None
        try:
            plane.start()
            agent = Agent(
                "git-agent", base / "agent", plane.url, plane.create_agent_token("git-agent", "default"),
                extra_env={
                    **bundle_env,
                    "AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_STORAGE_PATH": str(agent_storage),
                    "AIRFLOW__DAG_PROCESSOR__STALE_BUNDLE_CLEANUP_INTERVAL": "2",
                    "AIRFLOW__DAG_PROCESSOR__STALE_BUNDLE_CLEANUP_AGE_THRESHOLD": "0",
                    "AIRFLOW__DAG_PROCESSOR__STALE_BUNDLE_CLEANUP_MIN_VERSIONS": "1",
                },
            ).start()
            agent.wait_registered()
            yield plane, agent, repo, sha_a, agent_storage
        finally:
            shutdown(plane, [agent], lines=30)


def _result(plane: Plane, run_id: str) -> dict:
    r = plane.api("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/which/xcomEntries/return_value")
    r.raise_for_status()
    value = r.json()["value"]
    return json.loads(value) if isinstance(value, str) else value


def _run(plane: Plane, run_id: str | None = None) -> tuple[str, dict]:
    run_id = run_id or plane.trigger(DAG_ID)
    state = plane.wait_run(DAG_ID, run_id)
    assert state == "success", plane.task_instances(DAG_ID, run_id)
    return run_id, _result(plane, run_id)


def _versions(storage: Path) -> set[str]:
    versions = storage / "repo" / "versions"
    return {p.name for p in versions.iterdir()} if versions.exists() else set()


def test_runs_keep_their_commit_and_stale_versions_are_cleaned(setup):
    plane, agent, repo, sha_a, storage = setup

    # Run 1 at commit A: the agent fetches exactly A into its own storage.
    run_1, result = _run(plane)
    assert plane.api("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_1}").json()["bundle_version"] == sha_a
    assert result["code"] == "A"
    assert result["file"] == str(storage / "repo" / "versions" / sha_a / "dags" / "git_versioned.py")
    assert {w["agent_name"] for w in plane.work_items(dag_id=DAG_ID, run_id=run_1)} == {"git-agent"}

    # Push B (only the task's code changes); the plane's dag processor picks it up.
    sha_b = repo.commit({"dags/git_versioned.py": DAG_FILE.format(code="B")}, "B")
    wait_for(lambda: plane.api("GET", f"/api/v2/dags/{DAG_ID}").json()["bundle_version"] == sha_b, 180,
             "the plane parsing commit B", 1)
    run_2, result = _run(plane)
    assert plane.api("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_2}").json()["bundle_version"] == sha_b
    assert result == {"code": "B", "file": str(storage / "repo" / "versions" / sha_b / "dags" / "git_versioned.py")}
    # Kept: the newest used version; A is stale (min_versions=1, age_threshold=0) and removed by the agent.
    wait_for(lambda: _versions(storage) == {sha_b}, 60, "the agent removing stale version A", 0.5)

    # Clear run 1's task: it runs again on A's code (fetched again), although main is at B.
    r = plane.api("POST", f"/api/v2/dags/{DAG_ID}/clearTaskInstances", json={
        "dry_run": False, "dag_run_id": run_1, "task_ids": ["which"], "only_failed": False,
        "reset_dag_runs": True, "run_on_latest_version": False,
    })
    r.raise_for_status()
    wait_for(lambda: plane.task_instances(DAG_ID, run_1)[0]["try_number"] == 2, 60, "the cleared task requeued", 0.5)
    _, result = _run(plane, run_1)
    assert result == {"code": "A", "file": str(storage / "repo" / "versions" / sha_a / "dags" / "git_versioned.py")}
    assert plane.task_instances(DAG_ID, run_1)[0]["try_number"] == 2
    wait_for(lambda: _versions(storage) == {sha_a}, 60, "the agent removing stale version B", 0.5)
    tracking = storage / "_tracking" / "repo"
    assert {p.name for p in tracking.iterdir()} == {sha_a}
    assert "removing stale bundle" in agent.proc.log_path.read_text(errors="replace")

    # The doctor on the agent (no metadata DB) validates the bundle and fetches main, now at B.
    doctor = subprocess.run([AIRFLOW, "remote-execution", "check", "--only", "bundles", "--output", "json"],
                            env=agent.env, capture_output=True, text=True, timeout=180)
    # Airflow's own log lines (GitDagBundle's "Cloning ...") go to stdout too: the JSON starts at "[".
    out = "\n" + doctor.stdout
    report = json.loads(out[out.index("\n[\n") + 1:])
    [bundles_result] = [r for r in report if r["name"] == "bundles"]
    assert (doctor.returncode, bundles_result["status"], bundles_result["detail"]) == (0, "PASS", f"repo @ {sha_b[:12]}")
