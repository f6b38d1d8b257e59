"""Shared fixtures: real PostgreSQL (throwaway cluster or $REMOTE_EXECUTION_TEST_PG_URL)."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from localplane import PostgresCluster  # noqa: E402

# In-process tests: a throwaway AIRFLOW_HOME and SQLite DB, set before anything imports airflow.
from unit_db import airflow_db, db, pg_engine, pytest_configure, sqlite_db, sqlite_engine  # noqa: E402,F401


@pytest.fixture(scope="session")
def pg_url():
    """A PostgreSQL server URL: from the environment, else a cluster started for this session."""
    if url := os.environ.get("REMOTE_EXECUTION_TEST_PG_URL"):
        yield url
        return
    base = Path(tempfile.mkdtemp(prefix="rex-pg-"))
    os.chmod(base, 0o755)
    cluster = PostgresCluster(base / "cluster")
    try:
        yield cluster.start()
    finally:
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)
