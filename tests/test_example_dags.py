"""Every example DAG imports cleanly with Airflow's own DagBag (what a dag processor would report)."""

from __future__ import annotations

from pathlib import Path

EXAMPLE_DAGS = Path(__file__).resolve().parents[1] / "example_dags"


def test_example_dags_import_without_errors(airflow_db):
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(EXAMPLE_DAGS))
    assert bag.import_errors == {}
    assert {
        "remote_fan_out_fan_in", "remote_two_queues", "remote_variable_and_connection", "remote_retry",
        "remote_deadline_callback", "remote_deferrable", "remote_git_bundle",
    } <= set(bag.dag_ids)
