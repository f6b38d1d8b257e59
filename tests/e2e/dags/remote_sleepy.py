"""Test-only DAG: a task on queue ``drain`` that runs for a few seconds."""

from __future__ import annotations

import time

from airflow.sdk import dag, task


@dag(schedule=None, catchup=False, max_active_runs=4)
def remote_sleepy():
    @task(queue="drain")
    def nap(seconds: float = 6) -> str:
        time.sleep(seconds)
        return "rested"

    nap()


remote_sleepy()
