"""Wake-ups for long-polling lease requests: the in-process Waker, SQLite polling and PostgreSQL NOTIFY."""

from __future__ import annotations

import asyncio
import os
import threading
import time

import pytest
from sqlalchemy import text

from airflow.models.taskinstancekey import TaskInstanceKey
from airflow.utils.session import create_session

from airflow_remote_execution.plane import leases, wakeup
from airflow_remote_execution.plane.wakeup import Waker
from unit_db import Db, wipe


def key(task: str) -> TaskInstanceKey:
    return TaskInstanceKey(dag_id="d", task_id=task, run_id="r", try_number=1, map_index=-1)


async def woken(waiter: wakeup.Waiter, timeout: float) -> bool:
    try:
        await asyncio.wait_for(asyncio.shield(waiter.done), timeout)
        return True
    except TimeoutError:
        return False


def later(delay: float, fn) -> threading.Thread:
    def run():
        time.sleep(delay)
        fn()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


# ------------------------------------------------------------------ Waker itself


def test_arm_wake_disarm(airflow_db):
    w = Waker()

    async def main():
        a = w.arm(["a", "b"])
        c = w.arm(["c"])
        w.wake(["b", "x"])
        assert await woken(a, 1.0)
        assert not await woken(c, 0.05)
        # A wake from another thread reaches the loop too.
        later(0.05, lambda: w.wake(["c"])).join()
        assert await woken(c, 1.0)
        w.disarm(a)
        w.disarm(c)
        again = w.arm(["a"])
        w.disarm(again)
        w.wake(["a", "b", "c"])
        assert not await woken(again, 0.05), "a disarmed event must not be woken"

    asyncio.run(main())


def test_wake_reaches_waiters_in_several_loops(airflow_db):
    w = Waker()
    results: list[bool] = []
    armed = threading.Barrier(3)

    def loop_thread():
        async def main():
            event = w.arm(["shared"])
            armed.wait()
            results.append(await woken(event, 2.0))
            w.disarm(event)

        asyncio.run(main())

    threads = [threading.Thread(target=loop_thread) for _ in range(2)]
    for t in threads:
        t.start()
    armed.wait()
    w.wake(["shared"])  # one waiter per wake-up
    w.wake(["shared"])
    for t in threads:
        t.join(5)
    assert results == [True, True]


def test_a_wake_up_wakes_the_longest_waiting_one_and_can_be_passed_on(airflow_db):
    """Thousands of idle agents on one queue: one queued task must not make all of them look for it."""
    w = Waker()

    async def main():
        waiters = [w.arm(["herd"]) for _ in range(50)]
        w.wake(["herd"])
        await asyncio.sleep(0.05)
        assert [x.done.done() for x in waiters] == [True] + [False] * 49
        w.disarm(waiters[0])
        w.wake(["herd"])  # passed on by the first (it took what it could, there may be more)
        await asyncio.sleep(0.05)
        assert [x.done.done() for x in waiters[1:]] == [True] + [False] * 48
        w.wake_all()
        await asyncio.sleep(0.05)
        assert all(x.done.done() for x in waiters)
        assert w.waiting() == 49
        for x in waiters:
            w.disarm(x)
        assert w.waiting() == 0

    asyncio.run(main())


def test_arm_with_a_generator_can_be_disarmed(airflow_db):
    w = Waker()

    async def main():
        event = w.arm(q for q in ["gen"])
        w.disarm(event)
        w.wake(["gen"])
        assert not await woken(event, 0.05)

    asyncio.run(main())


# ------------------------------------------------------------------ SQLite: polling listener


def test_sqlite_poller_wakes_a_waiter_when_work_is_queued(airflow_db):
    w = Waker()

    def enqueue(queue: str, task: str):
        with create_session() as s:
            leases.enqueue(s, key=key(task), kind="task", queue=queue, priority_weight=1, workload="{}")

    async def main():
        event = w.arm(["poll-q"])
        try:
            await asyncio.sleep(0.1)  # let the poller take its first look
            assert not event.done.done()
            later(0, lambda: enqueue("poll-other", "other")).join()
            assert not await woken(event, 0.2), "work on another queue must not wake this waiter"
            queued_at = time.monotonic()
            later(0, lambda: enqueue("poll-q", "mine"))
            assert await woken(event, 2.0)
            return time.monotonic() - queued_at
        finally:
            w.disarm(event)

    latency = asyncio.run(main())
    assert latency < 0.5, f"woken after {latency:.3f}s"


def test_sqlite_notify_on_commit_wakes_a_waiter_at_once(airflow_db, monkeypatch):
    """The datagram path, not the fallback poll (made too slow to matter here)."""
    monkeypatch.setenv("AIRFLOW__REMOTE_EXECUTION__WAKEUP_POLL_INTERVAL", "30")
    w = Waker()

    def enqueue(task: str, commit: bool = True):
        with create_session() as s:
            leases.enqueue(s, key=key(task), kind="task", queue="dgram-q", priority_weight=1, workload="{}")
            if not commit:
                s.rollback()

    async def main():
        event = w.arm(["dgram-q"])
        try:
            deadline = time.monotonic() + 10
            while not list(wakeup.local_socket_dir().glob("*.sock")):  # the listener binds its socket
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.1)
            later(0, lambda: enqueue("rolled-back", commit=False)).join()
            assert not await woken(event, 0.5), "a rolled-back enqueue must not wake anyone"
            queued_at = time.monotonic()
            later(0, lambda: enqueue("committed"))
            assert await woken(event, 5.0)
            return time.monotonic() - queued_at
        finally:
            w.disarm(event)

    latency = asyncio.run(main())
    assert latency < 1.0, f"woken after {latency:.3f}s (the fallback poll is 30 s)"


# ------------------------------------------------------------------ PostgreSQL: LISTEN/NOTIFY


class PgListener:
    """A Waker whose listener thread LISTENs on the given PostgreSQL engine (what ``Waker._run`` does for Airflow's).

    Readiness is proven by a NOTIFY that wakes a probe waiter, not by reading ``pg_stat_activity.query``
    (which timed out once in CI with the listener alive); the backend is found by its application_name.
    """

    def __init__(self, engine):
        # A pool of its own: the session engine's pool is shared with other test files in this process
        # (and with processes they fork), and the listener holds its connection for the whole test.
        from sqlalchemy import create_engine
        from sqlalchemy.pool import NullPool

        self.name = f"rex-test-listener-{os.getpid()}-{id(self):x}"
        self.engine = create_engine(engine.url, poolclass=NullPool, connect_args={"application_name": self.name})
        self.probe_engine = create_engine(engine.url, poolclass=NullPool)
        self.waker = Waker()
        self.errors: list[BaseException] = []
        self.done = threading.Event()
        self.waker._thread = threading.Thread(target=self._listen, name="test-pg-listener", daemon=True)
        self.waker._thread.start()

    def _listen(self):
        try:
            self.waker._listen_postgres(self.engine)
        except Exception as e:  # noqa: BLE001 - the connection is killed at teardown
            self.errors.append(e)
        finally:
            self.done.set()

    def backend(self) -> list:
        with self.probe_engine.connect() as conn:
            sql = "SELECT pid, state, wait_event, query FROM pg_stat_activity WHERE application_name = :n"
            return [tuple(r) for r in conn.execute(text(sql), {"n": self.name})]

    def wait_listening(self, timeout: float = 60) -> None:
        probe_queue = f"probe-{self.name}"

        async def probe() -> bool:
            event = self.waker.arm([probe_queue])
            try:
                deadline = time.monotonic() + timeout
                while time.monotonic() < deadline and not self.done.is_set():
                    with self.probe_engine.begin() as conn:
                        conn.execute(text("SELECT pg_notify(:c, :q)"), {"c": wakeup.CHANNEL, "q": probe_queue})
                    if await woken(event, 0.2):
                        return True
                return False
            finally:
                self.waker.disarm(event)

        ok = asyncio.run(probe())
        assert not self.done.is_set(), f"listener failed: {self.errors!r}"
        assert ok, f"listener did not start within {timeout}s; its backend: {self.backend()!r}"

    def stop(self) -> None:
        with self.probe_engine.connect() as conn:
            sql = "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = :n"
            conn.execute(text(sql), {"n": self.name})
        assert self.done.wait(10), "listener thread did not stop"
        self.engine.dispose()
        self.probe_engine.dispose()


@pytest.fixture
def pg_waker(pg_engine):
    listener = PgListener(pg_engine)
    listener.wait_listening()
    yield listener.waker
    listener.stop()


@pytest.mark.postgres
def test_pg_notify_on_commit_wakes_a_waiter_quickly(pg_engine, pg_waker):
    db = Db(pg_engine)
    wipe(pg_engine)
    hold = threading.Event()
    committed_at: list[float] = []

    def enqueue_and_commit():
        with db.session() as s:
            leases.enqueue(s, key=key("pg"), kind="task", queue="pg-q", priority_weight=1, workload="{}")
            hold.wait(5)  # the transaction is still open: nothing may be delivered yet
        committed_at.append(time.monotonic())

    async def main():
        other = pg_waker.arm(["pg-elsewhere"])
        event = pg_waker.arm(["pg-q"])
        try:
            thread = later(0, enqueue_and_commit)
            try:
                assert not await woken(event, 0.3), "NOTIFY must be delivered on commit, not before"
            finally:
                hold.set()
            assert await woken(event, 2.0)
            woke = time.monotonic()
            thread.join(5)
            assert not other.done.done()
            return woke - committed_at[0]
        finally:
            pg_waker.disarm(event)
            pg_waker.disarm(other)

    latency = asyncio.run(main())
    assert latency < 0.5, f"woken {latency:.3f}s after the commit"
    wipe(pg_engine)


@pytest.mark.postgres
def test_pg_notify_rolled_back_is_never_delivered(pg_engine, pg_waker):
    from sqlalchemy.orm import Session

    async def main():
        event = pg_waker.arm(["pg-rollback"])
        try:
            with Session(pg_engine) as s:
                wakeup.notify(s, "pg-rollback")
                s.rollback()
            assert not await woken(event, 0.3)
            with Session(pg_engine) as s:
                wakeup.notify(s, "pg-rollback")
                s.commit()
            assert await woken(event, 2.0)
        finally:
            pg_waker.disarm(event)

    asyncio.run(main())


@pytest.mark.postgres
def test_pg_listener_works_with_psycopg3(pg_engine):
    from sqlalchemy import create_engine

    engine = create_engine(pg_engine.url.set(drivername="postgresql+psycopg"))
    listener = PgListener(engine)
    try:
        listener.wait_listening()

        async def main():
            event = listener.waker.arm(["pg3"])
            try:
                with engine.begin() as conn:
                    conn.execute(text("SELECT pg_notify(:c, 'pg3')"), {"c": wakeup.CHANNEL})
                return await woken(event, 1.0)
            finally:
                listener.waker.disarm(event)

        assert asyncio.run(main()), f"not woken; listener errors: {listener.errors!r}"
    finally:
        if not listener.done.is_set():
            listener.stop()
        engine.dispose()


def test_work_goes_to_the_lowest_numbered_waiting_agent(airflow_db):
    """So a shrinking StatefulSet, which removes the highest ordinals first, removes idle agents."""
    assert sorted(["w-10", "w-2", "w-1", "v-3"], key=wakeup.rank) == ["v-3", "w-1", "w-2", "w-10"]
    w = Waker()

    async def main():
        waiters = {name: w.arm(["q"], wakeup.rank(name)) for name in ["workers-10", "workers-2", "workers-0", "workers-1"]}
        woken = []
        for _ in range(4):
            w.wake(["q"])
            await asyncio.sleep(0.02)
            woken += [n for n, x in waiters.items() if x.done.done() and n not in woken]
        for x in waiters.values():
            w.disarm(x)
        return woken

    assert asyncio.run(main()) == ["workers-0", "workers-1", "workers-2", "workers-10"]
