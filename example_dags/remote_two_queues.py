"""Tasks routed by ``queue`` to two different agents (e.g. two clusters or teams)."""

from __future__ import annotations

from airflow.sdk import dag, task


@dag(schedule=None, catchup=False, tags=["remote-execution", "example"])
def remote_two_queues():
    @task(queue="default")
    def extract() -> dict:
        return {"rows": 3}

    @task(queue="analytics")
    def transform(data: dict) -> int:
        return data["rows"] * 2

    @task(queue="default")
    def load(rows: int) -> None:
        assert rows == 6

    load(transform(extract()))


remote_two_queues()
