"""Test-only DAG: a task on queue ``drain`` that naps (``dag_run.conf["seconds"]``, default 6) on its
first try and returns at once on a retry."""

from __future__ import annotations

import time
from datetime import timedelta

from airflow.sdk import dag, get_current_context, task


@dag(schedule=None, catchup=False, max_active_runs=4)
def remote_sleepy():
    @task(queue="drain", retries=1, retry_delay=timedelta(seconds=1))
    def nap() -> str:
        context = get_current_context()
        if context["ti"].try_number == 1:
            time.sleep(float(context["dag_run"].conf.get("seconds", 6)))
        return "rested"

    nap()


remote_sleepy()
