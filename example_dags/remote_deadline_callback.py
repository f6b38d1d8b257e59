"""A deadline alert whose callback runs on an agent: the run takes longer than its 3 s deadline."""

from __future__ import annotations

import time
from datetime import timedelta

from airflow.sdk import DeadlineAlert, DeadlineReference, SyncCallback, dag, task


@dag(
    schedule=None,
    catchup=False,
    tags=["remote-execution", "example"],
    deadline=DeadlineAlert(
        reference=DeadlineReference.DAGRUN_QUEUED_AT,
        interval=timedelta(seconds=3),
        callback=SyncCallback("remote_callbacks.on_deadline_missed", kwargs={"note": "slow run"}),
    ),
)
def remote_deadline_callback():
    @task
    def slow() -> None:
        time.sleep(12)

    slow()


remote_deadline_callback()
