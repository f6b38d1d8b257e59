"""The agent worker process as a user starts it (``airflow remote-execution agent start``)."""

from __future__ import annotations

import http.server
import json
import multiprocessing
import os
import subprocess
import threading
import time
from types import SimpleNamespace

from agent.test_runners import _task_json, _waiting
from emulators import LoopbackHttp
from localplane import Agent

from airflow_remote_execution.agent.runners import Runner
from airflow_remote_execution.agent.worker import START_TIMEOUT, AgentWorker, Running
from airflow_remote_execution.wire.api import Lease


def test_refused_registration_exits_with_the_reason(tmp_path):
    """A refused token ends the agent with the plane's reason; it must not hang at exit on its warm
    runners (non-daemon children that only leave when their parent does)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            body = json.dumps({"detail": "Agent token revoked"}).encode()
            self.send_response(401)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_PUT = do_POST

    with LoopbackHttp(Handler) as plane:
        agent = Agent("refused", tmp_path / "agent", plane.url, "not-a-valid-token", concurrency=2).start()
        try:
            code = agent.proc.popen.wait(120)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the agent did not exit:\n{agent.proc.tail()}") from None
        finally:
            agent.proc.stop()
    assert code != 0
    assert "Agent registration refused: Agent token revoked" in agent.proc.tail()


def test_a_confirmed_task_whose_runner_never_gets_to_its_gate_is_killed(tmp_path):
    """Its lease was confirmed (and the task reported started) with a process forked ahead, but the
    supervisor's set-up hangs (its log file is a FIFO nobody reads): after START_TIMEOUT the agent
    kills the runner, whose failure it then reports, instead of holding the slot forever."""
    os.mkfifo(tmp_path / "t.log")
    runner = Runner(multiprocessing.get_context("fork"))
    try:
        runner.submit(_task_json(tmp_path), "http://127.0.0.1:9/execution/", gated=True,
                      announced=_waiting(runner)["pid"])
        lease = Lease(work_id=1, fence=1, kind="task", queue="default", workload={})
        run = Running(lease=lease, runner=runner, gated=True, started=time.monotonic() - START_TIMEOUT + 1.5)
        worker = SimpleNamespace(_kill=AgentWorker._kill, slot_freed=threading.Event())
        watch = threading.Thread(target=AgentWorker._wait_for_task_process, args=(worker, run), daemon=True)
        watch.start()
        watch.join(60)  # returns once the runner is gone
        assert not watch.is_alive(), "the agent still waits on a runner stuck before its gate"
        assert run.killed and time.monotonic() - run.started > START_TIMEOUT
        assert runner.result() < 0  # killed by a signal: reported as failed
    finally:
        runner.stop()


def test_a_confirmation_whose_answer_was_lost_is_sent_again_with_the_same_fence():
    """A timed-out start confirmation may have been committed: the agent asks again under the same lease
    (the plane answers it as the first) instead of killing a task the plane believes started (issue 14).
    A refusal (409) is final at once."""
    from airflow_remote_execution.agent.client import LeaseLost, PlaneError

    calls = []

    def start(work_id, fence, task):
        calls.append((work_id, fence))
        if len(calls) == 1:
            raise PlaneError(0, "Request to http://plane timed out")
        return "confirmed"

    lease = Lease(work_id=7, fence=3, kind="task", queue="default", workload={})
    worker = SimpleNamespace(client=SimpleNamespace(start=start), exited=threading.Event())
    assert AgentWorker._confirm(worker, lease, None) == "confirmed"
    assert calls == [(7, 3), (7, 3)]

    def refused(work_id, fence, task):
        calls.append("refused")
        raise LeaseLost(409, "Stale fencing token")

    worker.client = SimpleNamespace(start=refused)
    try:
        AgentWorker._confirm(worker, lease, None)
    except LeaseLost:
        pass
    else:
        raise AssertionError("a 409 must not be retried")
    assert calls[2:] == ["refused"]
