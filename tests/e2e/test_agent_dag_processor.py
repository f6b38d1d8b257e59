"""
End to end: a plane with no DAG files and no dag-processor; an agent (``--components worker,dag-processor``
via ``[remote_execution] components``, a database URL that cannot work) parses a LocalDagBundle and a
GitDagBundle served by a real ``git http-backend``, the plane stores the results, runs the DAGs on the
agent, shows import errors, runs DAG callbacks on the agent, and keeps each run on its DAG version.
"""

from __future__ import annotations

import json
import shutil
import textwrap
import time
from pathlib import Path

import pytest
import requests

from git_server import GitServer
from localplane import EXAMPLE_DAGS, NO_DB, Agent, Plane, shutdown, wait_for

pytestmark = pytest.mark.e2e
BUNDLE_SRC = Path(__file__).parent / "dags_bundle"
PARSING = "/remote_execution/v1/parsing"
GIT_DAG = """
from airflow.sdk import DAG, task

with DAG("git_versioned", schedule=None):
{tasks}
"""


def _git_dag(*task_ids: str) -> str:
    body = "".join(
        f"    @task(task_id={t!r})\n    def t_{t}() -> str:\n        return {t!r}\n\n    t_{t}()\n" for t in task_ids
    )
    return textwrap.dedent(GIT_DAG).format(tasks=body)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("agent-dag-processor")
    empty_dags = base / "plane-dags"
    empty_dags.mkdir()
    plane = Plane(
        base / "plane",
        dags_folder=empty_dags,
        extra_env={"AIRFLOW__CORE__MIN_SERIALIZED_DAG_UPDATE_INTERVAL": "1"},
    )
    agent_home = base / "agent"
    local_bundle = agent_home / "bundle"
    shutil.copytree(BUNDLE_SRC, local_bundle, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(EXAMPLE_DAGS / "remote_deferrable.py", local_bundle)  # its trigger runs on the agent too
    with GitServer() as git:
        repo = git.create_repo("dags")
        first_sha = repo.commit({"dags/git_versioned.py": _git_dag("a")}, "first version")
        bundles = [
            {"name": "agent-local", "classpath": "airflow.dag_processing.bundles.local.LocalDagBundle",
             "kwargs": {"path": str(local_bundle), "refresh_interval": 2}},
            {"name": "agent-git", "classpath": "airflow.providers.git.bundles.git.GitDagBundle",
             "kwargs": {"repo_url": repo.url, "tracking_ref": "main", "subdir": "dags", "refresh_interval": 2}},
        ]
        agent = None
        try:
            plane.start(components=("api-server", "scheduler"))
            token = plane.create_agent_token("parser", "default", "--bundles", "agent-local,agent-git")
            agent = Agent(
                "parser", agent_home, plane.url, token, dags_folder=local_bundle,
                extra_env={
                    "AIRFLOW__REMOTE_EXECUTION__COMPONENTS": "worker,dag-processor,triggerer",
                    "AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST": json.dumps(bundles),
                    "AIRFLOW__DAG_PROCESSOR__BUNDLE_REFRESH_CHECK_INTERVAL": "1",
                    "AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_STORAGE_PATH": str(agent_home / "dag_bundles"),
                    "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "5",
                    "AIRFLOW_CONN_GIT_DEFAULT": json.dumps({"conn_type": "git", "host": repo.url}),
                },
            ).start()
            agent.wait_registered()
            yield plane, agent, repo, first_sha, base
        finally:
            shutdown(plane, [agent], lines=80)


def test_parsing_triggers_and_tasks_all_on_the_agent(setup):
    """The whole of "code stays home": a DAG the plane never saw defers, its trigger fires on the agent's
    triggerer, and the task resumes on the agent; the plane runs no dag-processor and no triggerer."""
    plane, agent, *_ = setup
    assert set(plane.procs) == {"api-server", "scheduler"}
    assert _dag(plane, "remote_deferrable")["bundle_name"] == "agent-local"
    run_id = plane.trigger("remote_deferrable", conf={"wait_seconds": 5})
    assert plane.wait_run("remote_deferrable", run_id, timeout=300) == "success"
    tis = {t["task_id"]: t for t in plane.task_instances("remote_deferrable", run_id)}
    assert {k: v["state"] for k, v in tis.items()} == {k: "success" for k in ("short_wait", "wait_until", "after_waiting")}
    log = agent.proc.log_path.read_text(errors="replace")
    assert "DateTimeTrigger" in log and "event reported" in log  # the trigger ran on this agent
    items = plane.settled_work_items(dag_id="remote_deferrable", run_id=run_id, timeout=60)
    assert {w["agent_name"] for w in items} == {"parser"} and {w["key"][2] for w in items} >= set(tis)


def _dag(plane: Plane, dag_id: str, timeout: float = 180) -> dict:
    plane.wait_dag(dag_id, timeout)
    return plane.api("GET", f"/api/v2/dags/{dag_id}").json()


def test_plane_runs_without_dag_files_or_dag_processor(setup):
    plane, agent, *_ = setup
    assert set(plane.procs) == {"api-server", "scheduler"}
    dag = _dag(plane, "agent_parsed")
    assert dag["bundle_name"] == "agent-local" and not dag["is_stale"]
    assert dag["fileloc"].startswith(str(agent.home))  # parsed where the code lives
    assert dag["tags"][0]["name"] == "remote-parsing"
    # The plane keeps no code: the Code view shows where it lives instead.
    source = plane.api("GET", "/api/v2/dagSources/agent_parsed").json()["content"]
    assert "stays on the agent" in source and "gethostname" not in source


def test_run_succeeds_on_the_agent(setup):
    plane, *_ = setup
    run_id = plane.trigger("agent_parsed")
    assert plane.wait_run("agent_parsed", run_id) == "success"
    items = plane.settled_work_items(dag_id="agent_parsed", run_id=run_id)
    assert [(w["agent_name"], w["state"]) for w in items] == [("parser", "success")]


def test_import_error_shows_on_the_plane(setup):
    plane, *_ = setup

    def broken():
        errors = plane.api("GET", "/api/v2/importErrors").json()["import_errors"]
        return [e for e in errors if e["filename"] == "agent_broken.py"]

    [error] = wait_for(broken, 120, "the agent's import error on the plane", 1)
    assert error["bundle_name"] == "agent-local"
    assert "module_that_only_exists_nowhere" in error["stack_trace"]


def test_dag_failure_callback_runs_on_the_agent(setup):
    plane, agent, *_ = setup
    run_id = plane.trigger("agent_callback")
    assert plane.wait_run("agent_callback", run_id) == "failed"
    marker = agent.home / "bundle" / "dag-failure-callback.ran"
    wait_for(marker.exists, 120, "the DAG failure callback on the agent", 1)
    assert marker.read_text() == run_id


def test_reparse_request_reaches_the_agent(setup):
    plane, agent, *_ = setup
    path = agent.home / "bundle" / "agent_parsed.py"
    path.write_text(path.read_text().replace('tags=["remote-parsing"]', 'tags=["remote-parsing", "reparsed"]'))
    r = plane.api("PUT", "/api/v2/parseDagFile/" + _file_token(plane, "agent_parsed"))
    assert r.status_code in (200, 201), r.text
    # The request row the API wrote is taken by the agent (a regular re-parse would leave it there).
    from sqlalchemy import create_engine, text

    engine = create_engine(plane.db_url)
    try:
        def pending() -> int:
            with engine.connect() as conn:
                return conn.execute(text("SELECT count(*) FROM dag_priority_parsing_request")).scalar()

        wait_for(lambda: pending() == 0, 60, "the agent to claim the re-parse request", 0.5)
    finally:
        engine.dispose()
    wait_for(lambda: "reparsed" in {t["name"] for t in _dag(plane, "agent_parsed")["tags"]}, 60, "re-parse", 1)


def _file_token(plane: Plane, dag_id: str) -> str:
    return plane.api("GET", f"/api/v2/dags/{dag_id}/details").json()["file_token"]


def test_pushed_commit_is_a_new_dag_version_old_runs_keep_theirs(setup):
    plane, _agent, repo, first_sha, _ = setup
    dag = _dag(plane, "git_versioned")
    assert dag["bundle_name"] == "agent-git"
    old_run = plane.trigger("git_versioned")
    assert plane.wait_run("git_versioned", old_run) == "success"

    second_sha = repo.commit({"dags/git_versioned.py": _git_dag("a", "b")}, "second version")
    pushed = time.monotonic()

    expected = [(1, first_sha), (2, second_sha)]
    seen = []

    def versions():
        found = plane.api("GET", "/api/v2/dags/git_versioned/dagVersions").json()["dag_versions"]
        seen.append([(v["version_number"], v["bundle_version"]) for v in found])
        return seen[-1] == expected

    try:
        wait_for(versions, 120, "the pushed commit as a new DAG version", 0.5)
    finally:
        print(f"push -> DAG versions {expected} on the plane: {time.monotonic() - pushed:.1f}s "
              f"(bundle refresh_interval 2s); last seen {seen[-1:]}")
    new_run = plane.trigger("git_versioned")
    assert plane.wait_run("git_versioned", new_run) == "success"

    def run_versions(run_id):
        run = plane.api("GET", f"/api/v2/dags/git_versioned/dagRuns/{run_id}").json()
        return [v["bundle_version"] for v in run["dag_versions"]], run["bundle_version"]

    assert run_versions(old_run) == ([first_sha], first_sha)
    assert run_versions(new_run) == ([second_sha], second_sha)
    assert sorted(t["task_id"] for t in plane.task_instances("git_versioned", old_run)) == ["a"]
    assert sorted(t["task_id"] for t in plane.task_instances("git_versioned", new_run)) == ["a", "b"]


def test_token_without_the_bundle_is_refused(setup):
    plane, _agent, repo, _sha, base = setup
    token = plane.create_agent_token("outsider", "default", "--bundles", "somebody-else")
    r = requests.post(f"{plane.url}{PARSING}/bundles/sync", json={"bundles": ["agent-local"]},
                      headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert r.status_code == 403
    assert "agent-local are outside token" in r.json()["detail"] and "(somebody-else)" in r.json()["detail"]
    # A dag processor with such a token stops at once and says why.
    outsider = Agent(
        "outsider", base / "outsider", plane.url, token, dags_folder=base / "outsider" / "dags",
        extra_env={"AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST": json.dumps([
            {"name": "agent-local", "classpath": "airflow.dag_processing.bundles.local.LocalDagBundle",
             "kwargs": {"path": str(base / "outsider" / "dags")}}])},
    )
    (base / "outsider" / "dags").mkdir(parents=True)
    from localplane import AIRFLOW, Proc

    outsider.proc = Proc("outsider", [AIRFLOW, "remote-execution", "agent", "dag-processor"], outsider.env, outsider.home)
    code = outsider.proc.popen.wait(120)
    log = outsider.proc.log_path.read_text()
    assert code != 0 and "The plane refused this agent's DAG bundles" in log and "agent-local" in log


def test_files_removed_from_the_bundle_go_from_the_plane(setup):
    plane, agent, *_ = setup
    (agent.home / "bundle" / "agent_parsed.py").unlink()
    (agent.home / "bundle" / "agent_broken.py").unlink()
    wait_for(lambda: _dag(plane, "agent_parsed")["is_stale"], 60, "the removed file's DAG to go stale", 1)
    errors = plane.api("GET", "/api/v2/importErrors").json()["import_errors"]
    assert [e for e in errors if e["filename"] == "agent_broken.py"] == []
    assert not _dag(plane, "agent_callback")["is_stale"]


def test_the_plane_holds_no_dag_files_and_the_agent_no_db(setup):
    plane, agent, *_ = setup
    assert list(plane.home.rglob("*.py")) == []
    assert list(Path(plane.env["AIRFLOW__CORE__DAGS_FOLDER"]).iterdir()) == []
    # The agent ran everything with a metadata DB URL that cannot work, and never tried it.
    assert agent.env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] == NO_DB
    assert not Path(NO_DB.removeprefix("sqlite:///")).parent.exists()
    log = agent.proc.log_path.read_text(errors="replace")
    assert "unable to open database file" not in log and "OperationalError" not in log
    assert "Parsing DAG bundles agent-git, agent-local" in log or "Parsing DAG bundles agent-local, agent-git" in log
