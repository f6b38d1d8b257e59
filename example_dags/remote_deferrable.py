"""Deferrable sensors on an agent: the task defers, the agent's triggerer runs the trigger, and the
task resumes on an agent. Run ``airflow remote-execution agent triggerer`` beside the agent worker.

``wait_seconds`` (trigger conf or param) sets how long after the run was triggered the second sensor waits until.
"""

from __future__ import annotations

from datetime import timedelta

from airflow.providers.standard.sensors.date_time import DateTimeSensorAsync
from airflow.providers.standard.sensors.time_delta import TimeDeltaSensor
from airflow.sdk import Param, dag, task


@dag(
    schedule=None,
    catchup=False,
    params={"wait_seconds": Param(5, type="integer", minimum=0)},
    tags=["remote-execution", "example"],
)
def remote_deferrable():
    short_wait = TimeDeltaSensor(task_id="short_wait", delta=timedelta(seconds=3), deferrable=True)
    wait_until = DateTimeSensorAsync(
        task_id="wait_until",
        target_time="{{ (dag_run.run_after + macros.timedelta(seconds=params.wait_seconds)).isoformat() }}",
    )

    @task
    def after_waiting() -> str:
        return "resumed and done on an agent"

    short_wait >> wait_until >> after_waiting()


remote_deferrable()
