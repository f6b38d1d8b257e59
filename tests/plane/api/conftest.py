"""Fixtures shared by the API tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def airflow_tables(sqlite_engine):
    """Airflow's own tables (parsing and trigger routes use them), emptied after this module."""
    from sqlalchemy import delete

    from airflow.models import import_all_models
    from airflow.models.base import Base

    from airflow_remote_execution.models.tables import AgentTriggererModel

    def wipe() -> None:  # job ids restart: triggerer rows (not wiped by airflow_db) would clash
        with sqlite_engine.begin() as conn:
            conn.execute(delete(AgentTriggererModel))
            for table in reversed(Base.metadata.sorted_tables):
                conn.execute(delete(table))

    import_all_models()
    Base.metadata.create_all(sqlite_engine)
    wipe()
    yield
    wipe()
