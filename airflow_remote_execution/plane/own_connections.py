"""
Database connections of the plane's own background threads (heartbeat writer, token re-reader, the
counts of refused reports), apart from the api-server's shared pool.

Under load every pooled connection can be held by request threads (lease queries, registrations); a
heartbeat batch waiting for one of them would make live agents look silent. So these threads get a
small pool of their own, made exactly as Airflow makes its engine (``[database]`` settings,
``airflow_local_settings`` overrides, connect args), and never wait behind requests.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

_engine: Engine | None = None
_lock = threading.Lock()
POOL_SIZE = 2


def _own_engine() -> Engine:
    global _engine
    with _lock:
        if _engine is None:
            from airflow import settings

            args = settings.prepare_engine_args()
            if "pool_size" in args:
                args.update(pool_size=POOL_SIZE, max_overflow=POOL_SIZE)
            connect_args = settings._get_connect_args("sync")
            if settings.SQL_ALCHEMY_CONN.startswith("sqlite"):
                connect_args["check_same_thread"] = False
            _engine = settings.create_metadata_engine(
                settings.SQL_ALCHEMY_CONN, engine_args=args, connect_args=connect_args
            )
        return _engine


@contextlib.contextmanager
def own_session() -> Iterator[Session]:
    """A session on the background threads' own connections, committed at the end (rolled back on error)."""
    with Session(_own_engine(), expire_on_commit=False) as session, session.begin():
        yield session
