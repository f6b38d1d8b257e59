"""
Benchmark DAGs: linear chains ``t1 >> t2 >> ... >> tN`` of trivial Python tasks.

The chains (DAG id -> length) come from ``bench_chains.json`` next to this file, written by
``bench/dispatch.py`` into the temporary dags folder it shares between the plane and the agent,
so the scheduler, the dag-processor and the task runner all see the same DAGs.
"""

from __future__ import annotations

import json
from pathlib import Path

from airflow.providers.standard.operators.python import PythonOperator
from airflow.sdk import DAG, chain

_SPEC = Path(__file__).with_name("bench_chains.json")
CHAINS: dict[str, int] = json.loads(_SPEC.read_text()) if _SPEC.exists() else {"bench_chain": 100}


def noop() -> None:
    """The trivial task: no work, no XCom."""


for _dag_id, _length in CHAINS.items():
    with DAG(_dag_id, schedule=None, catchup=False, max_active_runs=1, tags=["benchmark"]) as _dag:
        chain(*[PythonOperator(task_id=f"t{i}", python_callable=noop, do_xcom_push=False) for i in range(1, _length + 1)])
    globals()[_dag_id] = _dag
