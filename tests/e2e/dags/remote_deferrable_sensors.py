"""Stock deferrable sensors whose triggers ask the plane about other runs (tests/e2e/test_deferrable_sensors.py).

``deferrable_sensors``: each sensor defers to a trigger the agent's triggerer runs; ``ext_denied`` waits on a
DAG of a bundle the agent's token does not allow, so its trigger's requests are refused; ``parked_deferral``
defers until a file appears, for the test that a plane triggerer never takes an agent's trigger.
"""

from __future__ import annotations

from datetime import timedelta

from airflow.providers.standard.operators.hitl import HITLOperator
from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.providers.standard.sensors.date_time import DateTimeSensorAsync
from airflow.providers.standard.sensors.external_task import ExternalTaskSensor
from airflow.providers.standard.sensors.filesystem import FileSensor
from airflow.providers.standard.sensors.time_delta import TimeDeltaSensor, TimeDeltaSensorAsync
from airflow.sdk import DAG

with DAG("deferrable_sensors", schedule=None, catchup=False, tags=["remote-execution-test"]):
    # GetTICount: the task of target_a's run with the same logical date.
    ExternalTaskSensor(task_id="external_task", external_dag_id="target_a", external_task_id="done",
                       deferrable=True, poke_interval=2, timeout=300)
    # GetDRCount: target_a's run itself.
    ExternalTaskSensor(task_id="external_dag", external_dag_id="target_a", external_task_id=None,
                       deferrable=True, poke_interval=2, timeout=300)
    # GetDRCount + GetDagRunState: a new run of target_a, waited for by DagStateTrigger.
    TriggerDagRunOperator(task_id="trigger_and_wait", trigger_dag_id="target_a", wait_for_completion=True,
                          deferrable=True, poke_interval=2)
    DateTimeSensorAsync(task_id="datetime_async", target_time="{{ (logical_date + macros.timedelta(seconds=75)).isoformat() }}")
    TimeDeltaSensorAsync(task_id="timedelta_async", delta=timedelta(seconds=75))
    TimeDeltaSensor(task_id="timedelta_deferrable", delta=timedelta(seconds=75), deferrable=True)
    # Airflow 3.3 parks it in AWAITING_INPUT with no trigger; unanswered, the scheduler takes the default at the timeout.
    HITLOperator(task_id="hitl_default", subject="Proceed?", options=["yes", "no"], defaults=["yes"],
                 response_timeout=timedelta(seconds=5))
    # FileTrigger on the agent's filesystem; fs_default is the agent's own connection (AIRFLOW_CONN_FS_DEFAULT).
    FileSensor(task_id="file", filepath="{{ dag_run.conf['flag'] }}", deferrable=True, poke_interval=1, timeout=300)

with DAG("ext_denied", schedule=None, catchup=False, tags=["remote-execution-test"]):
    ExternalTaskSensor(task_id="external_other_team", external_dag_id="target_b", external_task_id="done",
                       deferrable=True, poke_interval=2, timeout=300)

with DAG("parked_deferral", schedule=None, catchup=False, tags=["remote-execution-test"]):
    FileSensor(task_id="wait", filepath="{{ dag_run.conf['flag'] }}", deferrable=True, poke_interval=1, timeout=600)
