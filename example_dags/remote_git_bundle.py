"""
A DAG meant to live in a Git repository that agents clone (GitDagBundle), parsed and run on agents only.

Set-up (full walk-through: docs/bundles.md and docs/dag-processing.md):

1. Put this file in the repository, e.g. ``dags/remote_git_bundle.py``.
2. On the agent, the token connection and the bundle entry (checked against the repository)::

       export AIRFLOW_CONN_GIT_DAGS='{"conn_type": "git", "login": "x-access-token", "password": "<token>"}'
       airflow remote-execution bundles add-git team-a-dags \\
           --repo-url https://git.example.com/team-a/dags.git --conn-id git_dags --subdir dags --write

3. On the plane, a token that may write that bundle, then start the agent with its dag processor::

       airflow remote-execution tokens create --name cluster-eu-1 --queues default --bundles team-a-dags
       airflow remote-execution agent start --components worker,dag-processor

Each run records the commit it was created with; its tasks run that commit's code on the agent even
after newer commits are pushed, and the task below prints it.
"""

from __future__ import annotations

from airflow.sdk import dag, get_current_context, task


@dag(schedule=None, catchup=False, tags=["remote-execution", "example", "git-bundle"])
def remote_git_bundle():
    @task
    def which_commit() -> str | None:
        dag_run = get_current_context()["dag_run"]
        version = getattr(dag_run, "bundle_version", None)
        print(f"Running bundle version {version!r}")
        return version

    which_commit()


remote_git_bundle()
