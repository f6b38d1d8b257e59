"""A task that fails on its first try and succeeds when Airflow retries it on an agent."""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import dag, get_current_context, task


@dag(schedule=None, catchup=False, tags=["remote-execution", "example"])
def remote_retry():
    @task(retries=2, retry_delay=timedelta(seconds=1))
    def flaky() -> int:
        try_number = get_current_context()["ti"].try_number
        if try_number == 1:
            raise RuntimeError("failing the first try on purpose; Airflow will retry")
        return try_number

    flaky()


remote_retry()
