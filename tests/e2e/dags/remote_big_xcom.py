"""
Test-only DAG: ``produce`` (queue ``default``) returns a large value that ``consume`` (queue
``analytics``, another agent) pulls and checks. The value travels through the object-storage XCom
backend configured on the agents; the plane only stores the reference.

``dag_run.conf``: ``mib`` (size of the payload, default 50) and ``seed``. When ``produce`` runs again
(a cleared task, try 2+), it returns nothing: its earlier object must have been purged by then.
"""

from __future__ import annotations

import hashlib
import random

from airflow.sdk import dag, get_current_context, task


def payload(mib: int, seed: int) -> str:
    """Deterministic, incompressible text of ``mib`` MiB (hex of random bytes)."""
    return random.Random(seed).randbytes(mib << 19).hex()


@dag(schedule=None, catchup=False, tags=["remote-execution", "test"])
def remote_big_xcom():
    # show_return_value_in_logs=False: by default Airflow logs the whole return value ("Done. Returned
    # value was: ..."): 50 MiB of task log and minutes of log shipping before the XCom is even pushed.
    @task(queue="default", show_return_value_in_logs=False)
    def produce() -> dict | None:
        ctx = get_current_context()
        if ctx["ti"].try_number > 1:
            return None
        conf = ctx["dag_run"].conf or {}
        text = payload(int(conf.get("mib", 50)), int(conf.get("seed", 1)))
        return {"payload": text, "sha256": hashlib.sha256(text.encode()).hexdigest(), "shape": (1, 2)}

    @task(queue="analytics", show_return_value_in_logs=False)
    def consume(value: dict) -> dict:
        text = value["payload"]
        got = hashlib.sha256(text.encode()).hexdigest()
        if got != value["sha256"] or value["shape"] != (1, 2):
            raise ValueError(f"XCom arrived damaged: sha256 {got} != {value['sha256']} or shape {value['shape']}")
        return {"sha256": got, "chars": len(text)}

    consume(produce())


remote_big_xcom()
