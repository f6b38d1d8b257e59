"""Test-only DAG: ``n`` mapped tasks on queue ``ha`` (``dag_run.conf``), each appending
``<map_index> <try_number> <pid>`` to the file ``conf["log"]`` (one O_APPEND write), so the test can
see every execution, and any that ran twice. While the file ``conf["hold"]`` exists, ``work`` tasks wait
before writing (the test holds tasks running and queued while it kills a scheduler)."""

from __future__ import annotations

import os
import time

from airflow.sdk import dag, get_current_context, task


@dag(schedule=None, catchup=False, max_active_tasks=16)  # more than the agents' 12 slots: some stay queued
def remote_ha_load():
    @task(queue="ha")
    def indexes() -> list[int]:
        return list(range(int(get_current_context()["dag_run"].conf.get("n", 10))))

    @task(queue="ha", retries=0)
    def work(i: int) -> None:
        context = get_current_context()
        ti = context["ti"]
        hold = context["dag_run"].conf.get("hold")
        while hold and os.path.exists(hold):
            time.sleep(0.2)
        line = f"{ti.map_index} {ti.try_number} {os.getpid()}\n".encode()
        fd = os.open(context["dag_run"].conf["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)

    work.expand(i=indexes())


remote_ha_load()
