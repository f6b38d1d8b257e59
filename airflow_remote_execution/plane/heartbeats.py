"""
Heartbeats written by group commit: one transaction for all the heartbeats that arrived while the
previous one was being written.

Heartbeats are the plane's steady load, one per agent per interval. Written one transaction each, on
an api-server's thread pool, they queued behind one another from a few hundred agents on, until live
agents looked lost. Here an api-server process has one writer thread: a heartbeat joins the next batch
and its request waits (on the event loop, no thread) for that batch's answer. With a few agents a batch
is one heartbeat and nothing waits longer than before; with thousands, one transaction records
hundreds (see :func:`airflow_remote_execution.plane.agents.record_heartbeats`).

A lease request the agent holds open is a sign of life too (:meth:`Heartbeats.holding`): when it arrives,
and then every heartbeat interval (at least :data:`HELD_EVERY` seconds) while it waits here connected, its agent joins a batch without
anyone waiting for it. So liveness does not hang on each heartbeat getting through in time: a plane too
busy to take every request at once still sees the connections agents hold, all in one batch, and never
counts a live agent lost because its heartbeat waited in a queue. An agent whose process ended hangs up
(the wait ends); one whose host vanished without a word is seen at most ``long_poll_wait`` longer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Iterator

from airflow.sdk import timezone

from airflow_remote_execution.plane import agents
from airflow_remote_execution.plane.own_connections import own_session
from airflow_remote_execution.wire.api import HeartbeatRequest, HeartbeatResponse

log = logging.getLogger(__name__)
MAX_BATCH = 2000
HELD_EVERY = 0.5  # least seconds between signs of life of agents holding a lease request here (else: the interval)


class Heartbeats:
    """The per-process group-commit writer; see the module docstring."""

    def __init__(self) -> None:
        self._pending: list[tuple[agents.Beat, asyncio.Future | None]] = []
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self.batches = self.written = 0  # transactions and heartbeats written by this process (tests, metrics)
        self._held: Counter[str] = Counter()  # agent name -> lease requests it holds open here
        self._held_at = time.monotonic()
        self.interval = 0.0  # the heartbeat interval last dictated

    async def beat(self, agent_name: str, req: HeartbeatRequest) -> HeartbeatResponse:
        """Record a heartbeat; returns once it is committed, with the answer for the agent."""
        future = asyncio.get_running_loop().create_future()
        self._add(agents.Beat(agent_name, req, timezone.utcnow()), future)
        return await future

    def seen(self, agent_name: str) -> None:
        """The agent was heard from: recorded with the next batch, nobody waits."""
        self._add(agents.Beat(agent_name, None, timezone.utcnow()), None)

    @contextlib.contextmanager
    def holding(self, agent_name: str) -> Iterator[None]:
        """While the agent holds a (connected) lease request here, it is seen every HELD_EVERY seconds."""
        with self._lock:
            self._held[agent_name] += 1
        self.seen(agent_name)
        try:
            yield
        finally:
            with self._lock:
                self._held[agent_name] -= 1
                if not self._held[agent_name]:
                    del self._held[agent_name]

    def _add(self, beat: agents.Beat, future: asyncio.Future | None) -> None:
        with self._lock:
            self._pending.append((beat, future))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="remote-execution-heartbeats", daemon=True)
                self._thread.start()
        self._ready.set()

    def _run(self) -> None:
        while True:
            every = max(HELD_EVERY, self.interval)
            self._ready.wait(every)
            if time.monotonic() - self._held_at >= every:
                self._held_at = time.monotonic()
                now = timezone.utcnow()
                with self._lock:
                    self._pending += [(agents.Beat(name, None, now), None) for name in list(self._held)]
            with self._lock:
                batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
                if not self._pending:
                    self._ready.clear()
            if batch:
                self._write(batch)

    def _write(self, batch: list[tuple[agents.Beat, asyncio.Future | None]]) -> None:
        try:
            with own_session() as session:
                answers: list = agents.record_heartbeats(session, [beat for beat, _ in batch])
            self.batches += 1
            self.written += len(batch)
            self.interval = next((a.heartbeat_interval for a in answers if hasattr(a, "heartbeat_interval")), self.interval)
        except Exception as e:  # noqa: BLE001 - the database: every heartbeat of the batch gets the error
            if not any(future for _, future in batch):
                log.warning("Could not record %d agents' lease requests as signs of life: %s", len(batch), e)
            answers = [e] * len(batch)
        for (_, future), answer in zip(batch, answers, strict=True):
            if future is not None:
                try:
                    future.get_loop().call_soon_threadsafe(_settle, future, answer)
                except RuntimeError:  # its event loop is closed: nobody waits for it any more
                    pass


def _settle(future: asyncio.Future, answer) -> None:
    if future.done():  # the request went away meanwhile
        return
    if isinstance(answer, BaseException):
        future.set_exception(answer)
    else:
        future.set_result(answer)


heartbeats = Heartbeats()
