"""
Wake long-polling lease requests the moment work is queued, within and across API servers.

PostgreSQL: :func:`notify` issues ``pg_notify`` inside the queuing transaction, so it is delivered
on commit; every API server LISTENs on one dedicated connection. SQLite (one host by nature): on
commit, :func:`notify` sends a datagram to each API server's Unix socket in a directory named after
the database; API servers also watch a cheap per-queue signature of queued work every
``wakeup_poll_interval`` in case a datagram is lost. When the LISTEN connection is (re)made, every
waiter looks again, as notifications may have been missed meanwhile. A waiter does not poll the table:
each long-poll looks once when it starts, so a lost wake-up costs at most ``long_poll_wait``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import os
import re
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


class Waiter:
    """A waiting lease request: woken at most once, through :meth:`Waker.wake`. ``done`` resolves when it
    is woken or its wait ends; a bare future, because thousands of these are parked at a time."""

    __slots__ = ("done", "loop", "queues", "rank", "woken", "woken_for")

    def __init__(self, queues: tuple[str, ...], rank: tuple = ()) -> None:
        self.loop = asyncio.get_running_loop()
        self.done: asyncio.Future[None] = self.loop.create_future()
        self.queues = queues
        self.rank = rank
        self.woken = False
        self.woken_for: str | None = None  # the queue whose work woke it (None: wake_all)


def _resolve(future: asyncio.Future, *_: object) -> None:
    if not future.done():
        future.set_result(None)


def rank(agent_name: str) -> tuple:
    """An agent's place in line for work: names in natural order (``workers-2`` before ``workers-10``).

    Work goes to the lowest-numbered idle agents, so the highest-numbered ones of a group are the idle ones:
    those a StatefulSet removes first when it shrinks (scale-in takes idle agents, not busy ones)."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", agent_name) if part)


def _by_rank(waiter: Waiter) -> tuple:
    return waiter.rank  # min() keeps the first (longest waiting) of equal ranks: dicts keep insertion order


class Waker:
    """
    In-process registry of waiting lease requests, fed by a LISTEN or polling thread.

    A wake-up for a queue wakes **one** waiter of that queue (the lowest :func:`rank`, then the longest
    waiting), not all of them:
    with thousands of idle agents on one queue, waking all for one task would make thousands of lease
    queries to give one of them work. The woken one passes the wake-up on when there may be more
    (it filled all its slots, or it could not take what was there): :meth:`wake` again.
    """

    def __init__(self) -> None:
        self._waiters: dict[str, dict[Waiter, None]] = defaultdict(dict)  # queue -> waiters, oldest first
        self._lock = threading.Lock()
        # Counts of wake-ups for new work per queue, and of times every waiter had to look again: equal
        # counts mean no work was announced meanwhile (see ``mark``/``unchanged_since``).
        self._announced: dict[str, int] = defaultdict(int)
        self._resets = 0
        self._thread: threading.Thread | None = None
        self._listening = False  # the listener is connected and delivering wake-ups

    def arm(self, queues: Iterable[str], rank: tuple = ()) -> Waiter:
        """Register interest before looking for work, so a notify in between is not missed. Of the waiters of
        a queue, a wake-up picks the lowest ``rank`` (then the longest waiting): see :func:`rank`."""
        self._ensure_listener()
        waiter = Waiter(tuple(queues), rank)
        with self._lock:
            for queue in waiter.queues:
                self._waiters[queue][waiter] = None
        return waiter

    def disarm(self, waiter: Waiter) -> None:
        with self._lock:
            for queue in waiter.queues:
                waiters = self._waiters.get(queue)
                if waiters is not None:
                    waiters.pop(waiter, None)
                    if not waiters:
                        del self._waiters[queue]

    @staticmethod
    async def wait(waiter: Waiter, timeout: float, gone: asyncio.Future | None = None) -> bool:
        """Whether ``waiter`` was woken within ``timeout`` seconds (before ``gone`` completes: its client left)."""
        if timeout > 0 and not waiter.woken:
            timer = waiter.loop.call_later(timeout, _resolve, waiter.done)
            left = functools.partial(_resolve, waiter.done)
            if gone is not None:
                gone.add_done_callback(left)
            try:
                await waiter.done
            finally:
                timer.cancel()
                if gone is not None:
                    gone.remove_done_callback(left)
        return waiter.woken

    def mark(self, queues: Iterable[str]) -> tuple:
        """What has been announced for ``queues`` so far; take it *before* looking for work."""
        with self._lock:
            return (self._resets, self._listening, *(self._announced[q] for q in sorted(queues)))

    def unchanged_since(self, mark: tuple, queues: Iterable[str]) -> bool:
        """Whether no new work was announced for ``queues`` since ``mark``, with the listener up throughout."""
        return self._listening and self.mark(queues) == mark

    def pass_on(self, waiter: Waiter) -> None:
        """A woken waiter that may have left work behind wakes another waiter of the queue that woke it."""
        self.wake([waiter.woken_for] if waiter.woken_for else waiter.queues, one=True)

    def wake(self, queues: Iterable[str], *, one: bool = False) -> None:
        """Wake one waiter of each of ``queues`` (work was queued on each), or with ``one`` a single waiter of
        the first of them that has one; see the class docstring."""
        chosen = []
        with self._lock:
            for queue in queues:
                if not one:
                    self._announced[queue] += 1
                waiter = min((w for w in self._waiters.get(queue, ()) if not w.woken), key=_by_rank, default=None)
                if waiter is not None:
                    waiter.woken, waiter.woken_for = True, queue
                    chosen.append(waiter)
                if one and chosen:
                    break
        for waiter in chosen:
            self._set(waiter)

    def wake_all(self) -> None:
        """Wake every waiter (after wake-ups may have been missed: the listener reconnected)."""
        with self._lock:
            self._resets += 1
            chosen = {w for waiters in self._waiters.values() for w in waiters if not w.woken}
            for waiter in chosen:
                waiter.woken = True
        for waiter in chosen:
            self._set(waiter)

    def waiting(self) -> int:
        with self._lock:
            return len({w for waiters in self._waiters.values() for w in waiters})

    @staticmethod
    def _set(waiter: Waiter) -> None:
        with contextlib.suppress(RuntimeError):  # its event loop is closed: nobody waits any more
            waiter.loop.call_soon_threadsafe(_resolve, waiter.done)

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
                self._listening = False
                log.exception("Remote execution waker failed; restarting in 1s")
                time.sleep(1)

    def _listen_postgres(self, engine) -> None:
        raw = engine.raw_connection()
        try:
            conn = raw.driver_connection
            conn.autocommit = True
            conn.cursor().execute(f"LISTEN {CHANNEL}")
            self._listening = True
            self.wake_all()  # what was notified before this LISTEN (or while it was down) is not missed
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
        woken_by_datagram = False
        with self._local_socket() as sock:
            self._listening = True
            while True:
                with self._lock:
                    waiting = any(self._waiters.values())
                if waiting:
                    with engine.connect() as conn:
                        current = {row[0]: tuple(row[1:]) for row in conn.execute(query)}
                    # New work only (more rows, a newer row, a re-queued key), not work being leased away;
                    # and not what a datagram just announced: each wake-up makes a waiter look.
                    grew = [q for q, sig in current.items() if q not in seen or any(n > o for n, o in zip(sig, seen[q], strict=True))]
                    seen = current
                    if grew and not woken_by_datagram:
                        self.wake(grew)
                woken_by_datagram = False
                if sock is None:
                    time.sleep(interval)
                    continue
                # A datagram wakes waiters at once; the signature check above is the fallback.
                if select_mod.select([sock], [], [], max(interval, 0.25))[0]:
                    with contextlib.suppress(BlockingIOError):
                        while True:
                            self.wake(sock.recv(65536).decode().split("\n"))
                            woken_by_datagram = True

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
