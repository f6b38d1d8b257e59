"""Test-only DAG for ``[core] executor = LocalExecutor,RemoteExecutor:...``: one task each."""

from __future__ import annotations

from airflow.sdk import dag, task


@dag(schedule=None, catchup=False)
def remote_mixed_executors():
    @task
    def on_plane() -> int:
        return 20

    @task(executor="RemoteExecutor")
    def on_agent(n: int) -> int:
        return n + 1

    on_agent(on_plane())


remote_mixed_executors()
