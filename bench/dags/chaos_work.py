"""
Chaos benchmark DAG: ``chaos_work`` with N independent tasks that each sleep 1-3 s and record
their own execution.

``chaos.json`` next to this file (written by ``bench/chaos.py`` into the temporary dags folder
shared by the plane and the agents) gives the number of tasks and the execution log. Every try
appends a ``start`` line before sleeping and an ``end`` line after, with ``time.time_ns()``, the
try's key, its pid and the agent it ran on (``REX_AGENT_NAME``, set in each agent's environment:
``[remote_execution]`` settings are not visible to tasks). A try whose agent was SIGKILLed has no
``end`` line. Lines are single ``O_APPEND`` writes (< PIPE_BUF), so concurrent writers from all
agents on this host do not interleave.
"""

from __future__ import annotations

import json
import os
import time
from datetime import timedelta
from pathlib import Path

from airflow.providers.standard.operators.python import PythonOperator
from airflow.sdk import DAG

_SPEC_FILE = Path(__file__).with_name("chaos.json")
SPEC: dict = json.loads(_SPEC_FILE.read_text()) if _SPEC_FILE.exists() else {"tasks": 100, "log": "/tmp/chaos-executions.log"}


def _record(event: str, ti, seconds: float) -> None:
    line = json.dumps(
        {
            "event": event,
            "ns": time.time_ns(),
            "key": [ti.dag_id, ti.run_id, ti.task_id, ti.map_index, ti.try_number],
            "agent": os.environ.get("REX_AGENT_NAME", "?"),
            "pid": os.getpid(),
            "sleep": seconds,
        },
        separators=(",", ":"),
    )
    fd = os.open(SPEC["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def work(seconds: float, ti=None) -> None:
    """Sleep ``seconds``, recorded as one execution of this try."""
    _record("start", ti, seconds)
    time.sleep(seconds)
    _record("end", ti, seconds)


with DAG(
    "chaos_work",
    schedule=None,
    catchup=False,
    max_active_runs=16,
    max_active_tasks=64,  # the agents' slots are the limit, not the DAG
    tags=["benchmark"],
) as chaos_work:
    for _i in range(1, SPEC["tasks"] + 1):
        PythonOperator(
            task_id=f"t{_i}",
            python_callable=work,
            op_kwargs={"seconds": 1.0 + (_i * 7 % 21) / 10},  # 1.0 .. 3.0 s, mean ~2 s
            retries=5,
            retry_delay=timedelta(seconds=1),
            do_xcom_push=False,
        )
