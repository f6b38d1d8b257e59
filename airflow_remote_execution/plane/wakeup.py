"""
Wake long-polling lease requests the moment work is queued, within and across API servers.

PostgreSQL: :func:`notify` issues ``pg_notify`` inside the queuing transaction, so it is delivered
on commit; every API server LISTENs on one dedicated connection. SQLite (one host by nature): on
commit, :func:`notify` sends a datagram to each API server's Unix socket in a directory named after
the database; API servers also watch a cheap per-queue signature of queued work every
``wakeup_poll_interval`` in case a datagram is lost. Waiters re-check the table at least once a
second anyway, so a lost wake-up costs at most that.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import select as select_mod
import socket
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

from sqlalchemy import event as sa_event, func, select, text
from sqlalchemy.orm import Session

CHANNEL = "remote_execution_work"
log = logging.getLogger(__name__)


def notify(session: Session, queue: str) -> None:
    """Announce queued work on ``queue``; delivered when the caller's transaction commits."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_notify(:channel, :queue)"), {"channel": CHANNEL, "queue": queue})
        return
    pending = session.info.get("remote_execution_wake")
    if pending is None:
        pending = session.info["remote_execution_wake"] = set()
        sa_event.listen(session, "after_commit", _send_local)
        sa_event.listen(session, "after_rollback", lambda s: s.info.get("remote_execution_wake", set()).clear())
    pending.add(queue)


def local_socket_dir() -> Path:
    """Where API servers sharing this (SQLite) database listen; short, as Unix socket paths must be."""
    from airflow import settings

    digest = hashlib.sha1(str(settings.SQL_ALCHEMY_CONN).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"rex-wakeup-{digest}"


def _send_local(session: Session) -> None:
    queues = session.info.get("remote_execution_wake")
    if not queues:
        return
    payload = "\n".join(sorted(queues)).encode()
    queues.clear()
    try:
        targets = list(local_socket_dir().glob("*.sock"))
    except OSError:
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        for target in targets:
            try:
                sock.sendto(payload, str(target))
            except (ConnectionRefusedError, FileNotFoundError):
                with contextlib.suppress(OSError):
                    target.unlink()  # its API server is gone
            except OSError:
                pass  # full buffer: the waiter's own polling catches up


class Waker:
    """In-process registry of waiting lease requests, fed by a LISTEN or polling thread."""

    def __init__(self) -> None:
        self._waiters: dict[str, set[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = defaultdict(set)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def arm(self, queues: Iterable[str]) -> asyncio.Event:
        """Register interest before looking for work, so a notify in between is not missed."""
        queues = tuple(queues)
        self._ensure_listener()
        event = asyncio.Event()
        entry = (asyncio.get_running_loop(), event)
        with self._lock:
            for queue in queues:
                self._waiters[queue].add(entry)
        event._remote_entry = (entry, queues)  # type: ignore[attr-defined]
        return event

    def disarm(self, event: asyncio.Event) -> None:
        entry, queues = event._remote_entry  # type: ignore[attr-defined]
        with self._lock:
            for queue in queues:
                self._waiters[queue].discard(entry)

    def wake(self, queues: Iterable[str]) -> None:
        with self._lock:
            entries = {entry for q in queues for entry in self._waiters.get(q, ())}
        for loop, event in entries:
            loop.call_soon_threadsafe(event.set)

    # ------------------------------------------------------------ listener thread

    def _ensure_listener(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._thread = threading.Thread(target=self._run, name="remote-execution-waker", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        from airflow import settings

        while True:
            try:
                if settings.engine.dialect.name == "postgresql":
                    self._listen_postgres(settings.engine)
                else:
                    self._poll(settings.engine)
            except Exception:
                log.exception("Remote execution waker failed; restarting in 1s")
                time.sleep(1)

    def _listen_postgres(self, engine) -> None:
        raw = engine.raw_connection()
        try:
            conn = raw.driver_connection
            conn.autocommit = True
            conn.cursor().execute(f"LISTEN {CHANNEL}")
            if hasattr(conn, "poll"):  # psycopg2
                while True:
                    if select_mod.select([conn], [], [], 5.0) == ([], [], []):
                        continue
                    conn.poll()
                    queues = {n.payload for n in conn.notifies}
                    conn.notifies.clear()
                    if queues:
                        self.wake(queues)
            else:  # psycopg 3
                while True:
                    for notify in conn.notifies(timeout=5.0):
                        self.wake([notify.payload])
        finally:
            raw.invalidate()

    def _poll(self, engine) -> None:
        from airflow_remote_execution import config
        from airflow_remote_execution.models import WorkItemModel

        interval = config.getfloat("wakeup_poll_interval")
        seen: dict[str, tuple] = {}
        query = (
            select(WorkItemModel.queue, func.count(), func.max(WorkItemModel.id), func.max(WorkItemModel.fence))
            .where(WorkItemModel.state == "queued")
            .group_by(WorkItemModel.queue)
        )
        with self._local_socket() as sock:
            while True:
                with self._lock:
                    waiting = any(self._waiters.values())
                if waiting:
                    with engine.connect() as conn:
                        current = {row[0]: tuple(row[1:]) for row in conn.execute(query)}
                    changed = [q for q, sig in current.items() if seen.get(q) != sig]
                    seen = current
                    if changed:
                        self.wake(changed)
                if sock is None:
                    time.sleep(interval)
                    continue
                # A datagram wakes waiters at once; the signature check above is the fallback.
                if select_mod.select([sock], [], [], max(interval, 0.25))[0]:
                    with contextlib.suppress(BlockingIOError):
                        while True:
                            self.wake(sock.recv(65536).decode().split("\n"))

    @contextlib.contextmanager
    def _local_socket(self):
        path = None
        sock = None
        try:
            directory = local_socket_dir()
            directory.mkdir(mode=0o700, exist_ok=True)
            path = directory / f"{os.getpid()}-{id(self):x}.sock"
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sock.bind(str(path))
            sock.setblocking(False)
        except OSError as e:
            log.warning("No local wake-up socket (%s); polling every wakeup_poll_interval instead", e)
            if sock is not None:
                sock.close()
            sock = None
        try:
            yield sock
        finally:
            if sock is not None:
                sock.close()
                with contextlib.suppress(OSError):
                    path.unlink()


waker = Waker()
