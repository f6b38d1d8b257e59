"""
Test-only DAG: ``produce`` (queue ``default``) returns a large value that ``consume`` (queue
``analytics``, another agent) pulls and checks. The value travels through the object-storage XCom
backend configured on the agents; the plane only stores the reference.

``dag_run.conf``: ``mib`` (size of the payload, default 50) and ``seed``. While the Variable
``remote_big_xcom_empty`` is ``yes``, ``produce`` returns nothing (the test clears it to check that the
earlier object is purged when the task runs again). Retries absorb agent hiccups on a loaded test host.
"""

from __future__ import annotations

import hashlib
import random

from datetime import timedelta

from airflow.sdk import Variable, dag, get_current_context, task


def payload(mib: int, seed: int) -> str:
    """Deterministic, incompressible text of ``mib`` MiB (hex of random bytes)."""
    return random.Random(seed).randbytes(mib << 19).hex()


@dag(schedule=None, catchup=False, tags=["remote-execution", "test"],
     default_args={"retries": 2, "retry_delay": timedelta(seconds=1)})
def remote_big_xcom():
    # show_return_value_in_logs=False: by default Airflow logs the whole return value ("Done. Returned
    # value was: ..."): 50 MiB of task log and minutes of log shipping before the XCom is even pushed.
    @task(queue="default", show_return_value_in_logs=False)
    def produce() -> dict | None:
        ctx = get_current_context()
        if Variable.get("remote_big_xcom_empty", default="") == "yes":
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
