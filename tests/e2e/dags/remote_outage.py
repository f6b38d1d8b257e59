"""Test-only DAG for plane outages and restarts: work that spans the outage, work that ends during it,
and work queued after it. No retries: any failure shows as a failed run."""

from __future__ import annotations

import time

from airflow.sdk import dag, get_current_context, task


@dag(schedule=None, catchup=False, max_active_runs=4, default_args={"retries": 0, "queue": "default"})
def remote_outage():
    @task
    def spans(seconds: float = 0) -> str:
        time.sleep(float(get_current_context()["dag_run"].conf.get("long", 90)))
        return "spanned"

    @task
    def ends_during(i: int) -> int:
        time.sleep(float(get_current_context()["dag_run"].conf.get("short", 20)))
        return i

    @task
    def after(values: list[int]) -> int:
        return sum(values)

    spans()
    after(ends_during.expand(i=[1, 2, 3]))


remote_outage()
