"""Test-only DAG: ``width`` parallel tasks on one queue (``dag_run.conf``: ``queue`` is fixed per DAG, so
two DAGs), each sleeping ``seconds`` (default 4): work for the fleet metrics and scale-in tests."""

from __future__ import annotations

import time

from airflow.sdk import dag, get_current_context, task

WIDTH = 6


def fanout(dag_id: str, queue: str):
    @dag(dag_id=dag_id, schedule=None, catchup=False, max_active_tasks=WIDTH)
    def _dag():
        @task(queue=queue, retries=0)
        def work(i: int) -> int:
            time.sleep(float(get_current_context()["dag_run"].conf.get("seconds", 4)))
            return i

        for i in range(WIDTH):
            work.override(task_id=f"work_{i}")(i)

    return _dag()


fanout("remote_fleet_fanout", "fleet")
fanout("remote_scale_in", "scale-in")
