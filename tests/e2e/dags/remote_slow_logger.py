"""Test-only DAG: logs a line, sleeps (``dag_run.conf["seconds"]``, default 20), logs another - so a
test can read the log of a task that is still running."""

from __future__ import annotations

import logging
import time

from airflow.sdk import dag, get_current_context, task

log = logging.getLogger(__name__)


@dag(schedule=None, catchup=False)
def remote_slow_logger():
    @task
    def slow_logger() -> None:
        seconds = float(get_current_context()["dag_run"].conf.get("seconds", 20))
        log.info("first line: started, sleeping %ss", seconds)
        time.sleep(seconds)
        log.info("second line: woke up")

    slow_logger()


remote_slow_logger()
