"""
Heartbeats written by group commit: one transaction for all the heartbeats that arrived while the
previous one was being written.

Heartbeats are the plane's steady load, one per agent per interval. Written one transaction each, on
an api-server's thread pool, they queued behind one another from a few hundred agents on, until live
agents looked lost. Here an api-server process has one writer thread: a heartbeat joins the next batch
and its request waits (on the event loop, no thread) for that batch's answer. With a few agents a batch
is one heartbeat and nothing waits longer than before; with thousands, one transaction records
hundreds (see :func:`airflow_remote_execution.plane.agents.record_heartbeats`).

A lease request is a sign of life too: it joins a batch without waiting for it (:meth:`Heartbeats.seen`).
"""

from __future__ import annotations

import asyncio
import logging
import threading

from airflow.sdk import timezone

from airflow_remote_execution.plane import agents
from airflow_remote_execution.wire.api import HeartbeatRequest, HeartbeatResponse

log = logging.getLogger(__name__)
MAX_BATCH = 2000


class Heartbeats:
    """The per-process group-commit writer; see the module docstring."""

    def __init__(self) -> None:
        self._pending: list[tuple[agents.Beat, asyncio.Future | None]] = []
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self.batches = self.written = 0  # transactions and heartbeats written by this process (tests, metrics)

    async def beat(self, agent_name: str, req: HeartbeatRequest) -> HeartbeatResponse:
        """Record a heartbeat; returns once it is committed, with the answer for the agent."""
        future = asyncio.get_running_loop().create_future()
        self._add(agents.Beat(agent_name, req, timezone.utcnow()), future)
        return await future

    def seen(self, agent_name: str) -> None:
        """The agent was heard from (a lease request): recorded with the next batch, nobody waits."""
        self._add(agents.Beat(agent_name, None, timezone.utcnow()), None)

    def _add(self, beat: agents.Beat, future: asyncio.Future | None) -> None:
        with self._lock:
            self._pending.append((beat, future))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="remote-execution-heartbeats", daemon=True)
                self._thread.start()
        self._ready.set()

    def _run(self) -> None:
        while True:
            self._ready.wait()
            with self._lock:
                batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
                if not self._pending:
                    self._ready.clear()
            if batch:
                self._write(batch)

    def _write(self, batch: list[tuple[agents.Beat, asyncio.Future | None]]) -> None:
        from airflow.utils.session import create_session

        try:
            with create_session() as session:
                answers: list = agents.record_heartbeats(session, [beat for beat, _ in batch])
            self.batches += 1
            self.written += len(batch)
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
