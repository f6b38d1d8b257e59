"""Test-only DAGs for the Remote Agents page (tests/e2e/test_ui_browser.py): one task on ``default``,
one on ``nowhere`` (a queue no agent serves)."""

from __future__ import annotations

from airflow.sdk import dag, task


@dag(schedule=None, catchup=False)
def ui_default():
    @task(queue="default")
    def hello() -> str:
        return "hello from an agent"

    hello()


@dag(schedule=None, catchup=False)
def ui_nowhere():
    @task(queue="nowhere")
    def stranded() -> str:
        return "never runs: no agent serves queue nowhere"

    stranded()


ui_default()
ui_nowhere()
