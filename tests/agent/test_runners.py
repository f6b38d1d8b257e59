"""Warm workload runners: real forked processes, reused across workloads, never after a kill."""

from __future__ import annotations

import os
import signal
import time

import pytest

from airflow_remote_execution.agent.runners import RunnerPool


@pytest.fixture
def pool():
    p = RunnerPool(2)
    p.fill()
    yield p
    p.close()


def _finish(runner, timeout: float = 30.0) -> int:
    deadline = time.monotonic() + timeout
    while not runner.done(0.1):
        assert time.monotonic() < deadline, "runner did not finish"
    return runner.result()


def test_runner_is_reused_after_a_workload(pool):
    runner = pool.take()
    pid = runner.pid
    runner.submit('{"type": "NotAWorkload"}', "http://127.0.0.1:9/execution/")
    assert _finish(runner) == 1  # an invalid workload fails; the runner survives it
    assert runner.alive()
    pool.give_back(runner)
    assert {pool.take().pid, pool.take().pid} >= {pid}


def test_killed_runner_reports_the_signal_and_is_not_reused(pool):
    runner = pool.take()
    os.killpg(runner.pid, signal.SIGKILL)  # the agent's kill: the runner's whole process group
    assert _finish(runner) == -signal.SIGKILL
    pool.give_back(runner)
    assert runner.pid not in {pool.take().pid, pool.take().pid}


def test_pool_forks_cold_when_none_is_idle_and_caps_what_it_keeps(pool):
    taken = [pool.take() for _ in range(4)]  # more than the pool holds
    assert len({r.pid for r in taken}) == 4 and all(r.alive() for r in taken)
    for r in taken:
        pool.give_back(r)
    time.sleep(0.5)
    assert pool.idle_count() == 2  # only ``size`` idle runners are kept (some may be fresh refills) ...
    assert sum(r.alive() for r in taken) <= 2  # ... the others were stopped


def test_runners_exit_when_the_agent_dies(tmp_path):
    """Idle runners must not outlive a SIGKILLed agent (siblings keep their pipes open: no EOF)."""
    pid_file = tmp_path / "runner.pid"
    agent = os.fork()
    if agent == 0:  # the "agent"
        try:
            p = RunnerPool(1)
            p.fill()
            pid_file.write_text(str(p.take().pid))
            time.sleep(60)
        finally:
            os._exit(0)
    deadline = time.monotonic() + 30
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    runner_pid = int(pid_file.read_text())
    os.kill(agent, signal.SIGKILL)
    os.waitpid(agent, 0)
    deadline = time.monotonic() + 60  # a runner first finishes its imports, slow on a loaded machine
    while _alive(runner_pid):
        assert time.monotonic() < deadline, "runner outlived its agent"
        time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # reparented to init (or us): a zombie counts as gone
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] != "Z"
