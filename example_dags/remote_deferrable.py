"""Deferrable sensors on an agent: the task defers, the agent's triggerer runs the trigger, and the
task resumes on an agent. Run ``airflow remote-execution agent triggerer`` beside the agent worker.

``short_wait`` waits until 15 s after the run was triggered (no deferral if that has passed);
``wait_until`` waits ``wait_seconds`` (a param, 30 by default; pass it in the run's conf) from its start.
"""

from __future__ import annotations

from datetime import timedelta

from airflow.providers.standard.sensors.date_time import DateTimeSensorAsync
from airflow.providers.standard.sensors.time_delta import TimeDeltaSensor
from airflow.sdk import Param, dag, task


@dag(
    schedule=None,
    catchup=False,
    params={"wait_seconds": Param(30, type="integer", minimum=0)},
    # A try on an agent that is lost fails; retries run it again on a healthy agent.
    default_args={"retries": 2, "retry_delay": timedelta(seconds=5)},
    tags=["remote-execution", "example"],
)
def remote_deferrable():
    short_wait = TimeDeltaSensor(task_id="short_wait", delta=timedelta(seconds=15), deferrable=True)
    wait_until = DateTimeSensorAsync(
        task_id="wait_until",
        target_time="{{ (macros.datetime.now(dag_run.run_after.tzinfo) "
        "+ macros.timedelta(seconds=params.wait_seconds)).isoformat() }}",
    )

    @task
    def after_waiting() -> str:
        return "resumed and done on an agent"

    short_wait >> wait_until >> after_waiting()


remote_deferrable()
