"""
In-process test database: a throwaway AIRFLOW_HOME with a SQLite metadata DB holding only our tables,
plus an optional fresh PostgreSQL database (``pg_url`` fixture) for the state-machine tests.

Importing this module sets the Airflow environment, so it must be imported (by ``tests/conftest.py``)
before anything imports ``airflow``. The end-to-end tests start their processes with an environment
of their own (``scripts/localplane.py`` drops every ``AIRFLOW*`` variable), so this does not leak
into them.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

_HOME = Path(tempfile.mkdtemp(prefix="rex-unit-home-"))
atexit.register(shutil.rmtree, _HOME, ignore_errors=True)
SQLITE_URL = f"sqlite:///{_HOME / 'airflow.db'}"

for _name in [k for k in os.environ if k.startswith("AIRFLOW__") or k == "AIRFLOW_CONFIG"]:
    del os.environ[_name]
os.environ.update(
    {
        "AIRFLOW_HOME": str(_HOME),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": SQLITE_URL,
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": str(_HOME / "dags"),
        "AIRFLOW__CORE__EXECUTOR": "airflow_remote_execution.executors.RemoteExecutor",
        "AIRFLOW__API_AUTH__JWT_SECRET": "unit-tests-only-" + "0123456789abcdef" * 4,
        "AIRFLOW__CORE__AUTH_MANAGER": "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin,viewer:viewer",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(_HOME / "passwords.json"),
        "AIRFLOW__REMOTE_EXECUTION__WAKEUP_POLL_INTERVAL": "0.02",
    }
)

TABLES = ("remote_work_item", "remote_agent", "remote_agent_token")  # children first


def wipe(engine) -> None:
    from sqlalchemy import text

    with engine.begin() as conn:
        for table in TABLES:
            conn.execute(text(f"DELETE FROM {table}"))


@pytest.fixture(scope="session")
def sqlite_engine():
    """Airflow's own engine (``airflow.settings.engine``) on the temporary SQLite file, with our tables."""
    from airflow import settings

    from airflow_remote_execution.models.tables import metadata

    assert settings.engine.url.render_as_string() == SQLITE_URL, "Airflow was imported before tests/unit_db.py"
    metadata.create_all(settings.engine)
    return settings.engine


@pytest.fixture
def airflow_db(sqlite_engine):
    """Empty Remote Execution tables in Airflow's metadata DB (used by ``create_session`` in the product code)."""
    wipe(sqlite_engine)
    yield sqlite_engine
    wipe(sqlite_engine)


@pytest.fixture(scope="session")
def pg_engine(pg_url):
    """A fresh PostgreSQL database with our tables (the server comes from the ``pg_url`` fixture)."""
    from sqlalchemy import create_engine

    from airflow_remote_execution.models.tables import metadata
    from localplane import fresh_pg_database

    engine = create_engine(fresh_pg_database(pg_url, "rex_unit"), pool_size=20, max_overflow=20)
    metadata.create_all(engine)
    yield engine
    engine.dispose()


def _maker(engine) -> Callable:
    from sqlalchemy.orm import sessionmaker

    return sessionmaker(bind=engine, expire_on_commit=False, autoflush=False)


class Db:
    """A database for a test: ``session()`` opens a transaction that commits on success."""

    def __init__(self, engine):
        self.engine = engine
        self.name = engine.dialect.name
        self.maker = _maker(engine)

    @contextmanager
    def session(self) -> Iterator:
        session = self.maker()
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db(request) -> Iterator[Db]:
    """The test runs once on SQLite (Airflow's engine) and once on a fresh PostgreSQL database."""
    engine = request.getfixturevalue("sqlite_engine" if request.param == "sqlite" else "pg_engine")
    wipe(engine)
    yield Db(engine)
    wipe(engine)


@pytest.fixture
def sqlite_db(airflow_db) -> Db:
    return Db(airflow_db)


def pytest_configure(config) -> None:
    # The product code still imports ``airflow.utils.timezone``; keep that deprecation out of the report.
    config.addinivalue_line("filterwarnings", "ignore:The `airflow.utils.timezone.:Warning")
