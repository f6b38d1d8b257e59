"""Warm workload runners: real forked processes, reused across workloads, never after a kill."""

from __future__ import annotations

import http.server
import json
import os
import signal
import time
from types import SimpleNamespace

import pytest

from emulators import LoopbackHttp

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
    taken = [pool.take(), pool.take()]
    assert {r.pid for r in taken} >= {pid}
    for r in taken:  # an idle runner left out of the pool would be joined forever at interpreter exit
        pool.give_back(r)


def test_killed_runner_reports_the_signal_and_is_not_reused(pool):
    runner = pool.take()
    os.killpg(runner.pid, signal.SIGKILL)  # the agent's kill: the runner's whole process group
    assert _finish(runner) == -signal.SIGKILL
    pool.give_back(runner)
    taken = [pool.take(), pool.take()]
    assert runner.pid not in {r.pid for r in taken}
    for r in taken:
        pool.give_back(r)


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


# ------------------------------------------------------------------ gated start (confirmation in flight)


@pytest.fixture
def execution_api():
    """A stand-in execution API on loopback: records what the supervisor asks (``.requests``: time, method,
    path, Authorization, JSON body) and answers 409 (the task is not queued), which ends the supervision
    at once."""
    seen: list[tuple[float, str, str, str, object]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_PATCH(self):
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            seen.append((time.monotonic(), self.command, self.path, self.headers.get("Authorization", ""),
                         json.loads(body) if body else None))
            body = b'{"detail": {"reason": "invalid_state", "message": "not queued"}}'
            self.send_response(409)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_PUT = do_POST = do_GET = do_PATCH

    with LoopbackHttp(Handler) as server:
        yield SimpleNamespace(url=server.url + "/execution/", requests=seen)


def _task_json(tmp_path) -> str:
    import uuid

    from airflow.executors import workloads

    ti = workloads.TaskInstanceDTO(
        id=uuid.uuid4(), task_id="t", dag_id="d", run_id="r", try_number=1, map_index=-1,
        dag_version_id=uuid.uuid4(), queue="default", pool_slots=1, priority_weight=1,
    )
    return workloads.ExecuteTask(
        ti=ti, dag_rel_path="d.py", bundle_info=workloads.BundleInfo(name="dags-folder"),
        log_path=str(tmp_path / "t.log"), token="jwt",
    ).model_dump_json()


def _task_children(runner) -> list:
    import psutil

    return [c for c in psutil.Process(runner.pid).children() if c.status() != psutil.STATUS_ZOMBIE]


def _waiting(runner, timeout: float = 30) -> dict:
    """The task process the runner forked ahead for its next task, as it announced it."""
    deadline = time.monotonic() + timeout
    while (waiting := runner.take_waiting()) is None:
        assert time.monotonic() < deadline, "the runner announced no waiting task process"
        time.sleep(0.05)
    return waiting


def _forked(runner) -> dict:
    forked = runner.wait_forked(30)
    assert forked is not None, "the task process was not forked while gated"
    assert [c.pid for c in _task_children(runner)] == [forked["pid"]]
    assert forked["hostname"] and forked["unixname"] and forked["api_version"]
    return forked


def test_gated_task_is_forked_but_not_started_until_go(pool, execution_api, tmp_path):
    runner = pool.take()
    waiting = _waiting(runner)
    runner.submit(_task_json(tmp_path), execution_api.url, gated=True)  # not told it was announced
    forked = _forked(runner)  # the runner said which process will be the task's, ahead of the confirmation
    assert forked["pid"] == waiting["pid"]  # the one it had forked while idle
    assert runner.task_processes() == 1
    time.sleep(0.3)
    assert execution_api.requests == [], "the execution API heard of the task before go"
    go_at = time.monotonic()
    runner.go()  # no answer from the plane: the supervisor reports the start itself
    assert _finish(runner) != 0  # the stand-in API refuses the start
    assert runner.task_processes() == 0  # the agent frees the slot on this, before the supervisor is done
    starts = [r for r in execution_api.requests if r[2].endswith("/run")]
    assert starts and starts[0][0] >= go_at and starts[0][3] == "Bearer jwt"
    assert starts[0][4]["pid"] == forked["pid"]  # the supervisor's task process is the announced one
    pool.give_back(runner)
    assert runner.alive()


def test_a_task_confirmed_with_the_process_forked_ahead_runs_in_it(pool, execution_api, tmp_path):
    """The agent confirms with the pid the idle runner announced before it has the task; the go may come
    before the supervisor is set up. Then the runner forks the next task's process ahead again."""
    runner = pool.take()
    waiting = _waiting(runner)
    assert [c.pid for c in _task_children(runner)] == [waiting["pid"]]
    runner.submit(_task_json(tmp_path), execution_api.url, gated=True, announced=waiting["pid"])
    runner.go()
    assert _finish(runner) != 0  # the stand-in API refuses the start report
    (start,) = [r for r in execution_api.requests if r[2].endswith("/run")]
    assert start[4]["pid"] == waiting["pid"]
    assert _waiting(runner)["pid"] != waiting["pid"]
    pool.give_back(runner)


def test_an_announcement_the_runner_sent_before_it_got_its_workload_is_not_handed_out_later(execution_api, tmp_path):
    """A cold runner announces its waiting process while the agent already handed it a task, which then
    runs in that process: the agent must not confirm a later task with it."""
    import multiprocessing

    from airflow_remote_execution.agent.runners import Runner

    runner = Runner(multiprocessing.get_context("fork"))
    try:
        runner.submit(_task_json(tmp_path), execution_api.url, gated=True)
        used = _forked(runner)["pid"]
        runner.go()
        assert _finish(runner) != 0
        assert _waiting(runner)["pid"] != used
    finally:
        runner.stop()


def test_a_task_confirmed_with_a_process_that_died_meanwhile_is_not_started(pool, execution_api, tmp_path):
    runner = pool.take()
    waiting = _waiting(runner)
    os.kill(waiting["pid"], signal.SIGKILL)
    runner.submit(_task_json(tmp_path), execution_api.url, gated=True, announced=waiting["pid"])
    runner.go()
    assert _finish(runner) == 1  # its task process is not the one the plane was told of
    assert execution_api.requests == []
    following = _waiting(runner)["pid"]
    assert [c.pid for c in _task_children(runner)] == [following] != [waiting["pid"]]  # the real fork was killed
    pool.give_back(runner)


def test_an_announced_task_failing_before_its_gate_still_takes_the_agents_word(pool, tmp_path):
    """The agent sends go or abort for every announced task: a runner that failed before its gate waits
    for it, so nothing stale is left in the pipe for the next workload."""
    runner = pool.take()
    waiting = _waiting(runner)
    runner.submit(_task_json(tmp_path), "ftp://nowhere/execution/", gated=True, announced=waiting["pid"])
    assert not runner.done(0.5)
    runner.go()
    assert _finish(runner) == 1
    assert _waiting(runner)["pid"] == waiting["pid"]  # unused: still waiting for a task
    runner.submit('{"type": "NotAWorkload"}', "http://127.0.0.1:9/execution/")
    assert _finish(runner) == 1
    pool.give_back(runner)


def test_the_agent_hears_when_its_task_is_set_up_at_the_gate(pool, execution_api, tmp_path):
    """Confirmed with a process forked ahead, a task can still hang in its supervisor's set-up (here: its
    log file is a FIFO that nobody reads yet); the runner says when it got to its gate."""
    os.mkfifo(tmp_path / "t.log")
    runner = pool.take()
    runner.submit(_task_json(tmp_path), execution_api.url, gated=True, announced=_waiting(runner)["pid"])
    assert not runner.done(1.0) and not runner.at_gate
    reader = os.open(tmp_path / "t.log", os.O_RDONLY | os.O_NONBLOCK)  # the set-up goes on
    try:
        deadline = time.monotonic() + 30
        while not runner.at_gate:
            assert not runner.done(0.1) and time.monotonic() < deadline, "the runner never reached its gate"
        runner.abort()
        assert _finish(runner) == 1
    finally:
        os.close(reader)
    pool.give_back(runner)


def test_the_waiting_process_ends_with_its_runner(pool):
    runner = pool.take()
    waiting = _waiting(runner)["pid"]
    runner.stop()
    deadline = time.monotonic() + 30
    while _alive(waiting):
        assert time.monotonic() < deadline, "the waiting task process outlived its runner"
        time.sleep(0.05)


def _reply(status: int, body: dict, **headers) -> dict:
    return {"status": status, "headers": {"content-type": "application/json", **headers}, "body": json.dumps(body)}


def test_the_planes_start_report_answer_is_used_instead_of_a_request(pool, execution_api, tmp_path):
    """The plane made the start report: the supervisor takes its answer (and the execution token it
    carries) through the Task SDK client's own hooks, and never sends PATCH .../run itself."""
    runner = pool.take()
    runner.submit(_task_json(tmp_path), execution_api.url, gated=True)
    _forked(runner)
    context = {
        "dag_run": {
            "dag_id": "d", "run_id": "r", "logical_date": None, "data_interval_start": None,
            "data_interval_end": None, "run_after": "2026-01-01T00:00:00Z", "start_date": None,
            "end_date": None, "run_type": "manual", "state": "running", "consumed_asset_events": [],
            "partition_key": None,
        },
        "max_tries": 0,
    }
    runner.go(_reply(200, context, **{"refreshed-api-token": "execution-jwt"}))
    assert _finish(runner) != 0  # the task cannot load d.py; its failure goes to the stand-in API
    assert not [r for r in execution_api.requests if r[2].endswith("/run")], "the supervisor reported the start again"
    assert execution_api.requests, "the task's failure was not reported"
    assert {r[3] for r in execution_api.requests} == {"Bearer execution-jwt"}  # the swapped token, not the workload's
    pool.give_back(runner)
    # The next task on this runner reports its start itself again (the answer was for one task only).
    again = pool.take()
    again.submit(_task_json(tmp_path), execution_api.url, gated=True)
    _forked(again)
    again.go()
    assert _finish(again) != 0
    assert [r for r in execution_api.requests if r[2].endswith("/run")]
    pool.give_back(again)


def test_a_refused_start_report_kills_the_task_before_it_starts(pool, execution_api, tmp_path):
    runner = pool.take()
    runner.submit(_task_json(tmp_path), execution_api.url, gated=True)
    pid = _forked(runner)["pid"]
    runner.go(_reply(409, {"detail": {"reason": "invalid_state", "previous_state": "running"}}))
    assert _finish(runner) == 1
    assert not [r for r in execution_api.requests if r[2].endswith("/run")]
    import psutil

    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    pool.give_back(runner)


def test_aborted_gated_task_never_starts_and_the_runner_is_reused(pool, execution_api, tmp_path):
    runner = pool.take()
    runner.submit(_task_json(tmp_path), execution_api.url, gated=True)
    _forked(runner)
    children = _task_children(runner)
    runner.abort()
    assert _finish(runner) == 1
    assert not any(c.is_running() and c.status() != "zombie" for c in children), "the unstarted task process lives on"
    assert execution_api.requests == []
    pool.give_back(runner)
    # The next workload on the same runner is not confused by the gate.
    again = pool.take()
    again.submit('{"type": "NotAWorkload"}', "http://127.0.0.1:9/execution/")
    assert _finish(again) == 1
    pool.give_back(again)


def test_gated_workload_failing_before_the_fork_reports_its_code_instead(pool, tmp_path):
    runner = pool.take()
    runner.submit('{"type": "NotAWorkload"}', "http://127.0.0.1:9/execution/", gated=True)
    assert runner.wait_forked(30) is None
    assert runner.done(0) and runner.result() == 1
    runner.submit('{"type": "NotAWorkload"}', "http://127.0.0.1:9/execution/")  # nothing stale in the pipe
    assert _finish(runner) == 1
    pool.give_back(runner)


def test_task_processes_counts_running_children_not_zombies(tmp_path):
    """What frees an agent slot before the supervisor is done: its exited (zombie) task does not count."""
    from airflow_remote_execution.agent.runners import Runner

    ready = tmp_path / "ready"
    parent = os.fork()
    if parent == 0:  # stands in for a runner: one running child, one exited and not reaped
        try:
            os.setpgrp()  # so the test kills it and its children at once
            if os.fork() == 0:
                time.sleep(60)
                os._exit(0)
            if os.fork() == 0:
                os._exit(0)
            time.sleep(0.5)
            ready.write_text("1")
            time.sleep(60)
        finally:
            os._exit(0)
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert Runner.task_processes(SimpleNamespace(pid=parent)) == 1
    finally:
        os.killpg(parent, signal.SIGKILL)
        os.waitpid(parent, 0)
    assert Runner.task_processes(SimpleNamespace(pid=parent)) is None  # gone
