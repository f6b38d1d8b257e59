"""Target of the deferrable sensors in bundle team_b, which the agents' token does not allow (tests/e2e/test_deferrable_sensors.py)."""

from __future__ import annotations

from airflow.sdk import DAG, task

with DAG("target_b", schedule=None, catchup=False, tags=["remote-execution-test"]):

    @task
    def done():
        return "done"

    done()
