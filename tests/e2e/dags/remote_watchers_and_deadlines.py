"""An asset watcher and a deadline alert whose triggers run on agent triggerers (tests/e2e/test_deferrable_sensors.py).

``asset_watched`` runs when FileDeleteTrigger (an asset watcher) finds ``landing/ready`` beside this bundle and
deletes it; ``deadline_missed`` misses its 3-second deadline and the AsyncCallback ``rex_deadline_callbacks.on_deadline``
(installed in the triggerer's plugins folder) writes ``deadline-marker`` beside this bundle, naming its AIRFLOW_HOME.
"""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path

from airflow.providers.standard.triggers.file import FileDeleteTrigger
from airflow.sdk import DAG, Asset, AssetWatcher, task
from airflow.sdk.definitions.callback import AsyncCallback
from airflow.sdk.definitions.deadline import DeadlineAlert, DeadlineReference

HERE = Path(__file__).resolve().parent.parent

landing = Asset("landing_file", watchers=[AssetWatcher(
    name="landing_watcher", trigger=FileDeleteTrigger(filepath=str(HERE / "landing" / "ready"), poke_interval=1),
)])

with DAG("asset_watched", schedule=[landing], catchup=False, tags=["remote-execution-test"]):

    @task
    def consume():
        return "landed"

    consume()

with DAG(
    "deadline_missed", schedule=None, catchup=False, tags=["remote-execution-test"],
    deadline=DeadlineAlert(
        reference=DeadlineReference.DAGRUN_QUEUED_AT, interval=timedelta(seconds=3),
        callback=AsyncCallback("rex_deadline_callbacks.on_deadline", kwargs={"marker": str(HERE / "deadline-marker")}),
    ),
):

    @task
    def slow():
        time.sleep(20)

    slow()
