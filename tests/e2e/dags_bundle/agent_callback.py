"""A failing run whose DAG-level failure callback must run on the agent (it writes a marker file there)."""

from __future__ import annotations

from pathlib import Path

from airflow.sdk import DAG, task

MARKER = Path(__file__).with_name("dag-failure-callback.ran")


def on_failure(context) -> None:
    MARKER.write_text(context["dag_run"].run_id)


with DAG("agent_callback", schedule=None, on_failure_callback=on_failure):

    @task(retries=0)
    def fail() -> None:
        raise RuntimeError("failing on purpose")

    fail()
