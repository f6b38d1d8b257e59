"""Test-only DAG: two tasks on two queues (two agents), one after the other, for the OpenLineage test."""

from __future__ import annotations

from airflow.sdk import dag, task


@dag(schedule=None, catchup=False)
def remote_lineage():
    @task(queue="lineage-a")
    def extract() -> int:
        return 21

    @task(queue="lineage-b")
    def load(value: int) -> int:
        return value * 2

    load(extract())


remote_lineage()
