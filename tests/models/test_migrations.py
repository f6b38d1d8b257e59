"""The Alembic chain builds exactly the tables the ORM declares, on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect

from airflow_remote_execution.models.db import RemoteExecutionDBManager
from airflow_remote_execution.models.tables import metadata
from localplane import fresh_pg_database


def _alembic_config():
    # get_alembic_config() only reads settings.SQL_ALCHEMY_CONN; the connection below is what is used.
    return RemoteExecutionDBManager(session=None).get_alembic_config()


@pytest.fixture(params=["sqlite", "postgres"])
def empty_db_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'migrations.db'}"
    return fresh_pg_database(request.getfixturevalue("pg_url"), "migrations")


def test_migrations_match_orm(empty_db_url):
    engine = create_engine(empty_db_url)
    try:
        with engine.begin() as conn:
            cfg = _alembic_config()
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "heads")
        with engine.connect() as conn:
            tables = set(inspect(conn).get_table_names())
            assert {"remote_agent", "remote_agent_token", "remote_work_item", "alembic_version_remote_execution"} <= tables
            diffs = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": False}), metadata)
            if conn.dialect.name == "sqlite":
                # Alembic reflects SQLite's descending index column as an expression it cannot compare, and
                # reports the lease index as changed: check its columns and order directly instead.
                diffs = [d for d in diffs if "idx_remote_work_item_lease" not in repr(d)]
                columns = conn.exec_driver_sql("PRAGMA index_xinfo(idx_remote_work_item_lease)").all()
                assert [(c.name, c.desc) for c in columns if c.key] == [
                    ("state", 0), ("queue", 0), ("priority_weight", 1), ("id", 0)]
            # Only our own tables count; Airflow's tables are not in this database.
            assert [d for d in diffs if "remote_" in repr(d) and "alembic_version" not in repr(d)] == []
            head = MigrationContext.configure(conn, opts={"version_table": "alembic_version_remote_execution"})
            assert head.get_current_revision() == RemoteExecutionDBManager.revision_heads_map["0.1.0"]
        with engine.begin() as conn:
            cfg = _alembic_config()
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, "base")
        with engine.connect() as conn:
            assert not {"remote_agent", "remote_agent_token", "remote_work_item"} & set(inspect(conn).get_table_names())
    finally:
        engine.dispose()
