"""Test-only DAG: one task on queue ``probe`` that no long-running agent serves."""

from __future__ import annotations

from airflow.sdk import dag, task


@dag(schedule=None, catchup=False)
def remote_probe():
    @task(queue="probe")
    def probe() -> str:
        return "probed"

    probe()


remote_probe()
