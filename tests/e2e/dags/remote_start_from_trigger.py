"""A task that starts in the triggerer (tests/e2e/test_deferrable_sensors.py): the scheduler makes its
trigger itself (``start_from_trigger``), which exec_guard parks for agents' triggerers since this DAG's
bundle is one an agent token names. The moment has passed: whichever triggerer takes it fires at once."""

from __future__ import annotations

from airflow.providers.standard.sensors.date_time import DateTimeSensorAsync
from airflow.sdk import DAG

with DAG("start_from_trigger", schedule=None, catchup=False, tags=["remote-execution-test"]):
    DateTimeSensorAsync(task_id="wait", target_time="2000-01-01T00:00:00+00:00", start_from_trigger=True)
