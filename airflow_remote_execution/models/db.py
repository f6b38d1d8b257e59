"""Registers our tables with ``airflow db migrate`` through Airflow's external DB manager hook."""

from __future__ import annotations

from pathlib import Path

from airflow.utils.db_manager import BaseDBManager

from airflow_remote_execution.models.tables import metadata

PACKAGE_DIR = Path(__file__).parents[1]


class RemoteExecutionDBManager(BaseDBManager):
    """Creates and upgrades the Remote Execution tables (own Alembic chain and version table)."""

    metadata = metadata
    version_table_name = "alembic_version_remote_execution"
    migration_dir = (PACKAGE_DIR / "migrations").as_posix()
    alembic_file = (PACKAGE_DIR / "migrations" / "alembic.ini").as_posix()
    supports_table_dropping = True
    revision_heads_map = {"0.1.0": "0006_event_count"}
