"""
Warm workload runners: processes forked from the agent ahead of time that run one workload after
another with Airflow's own supervisors (``BaseExecutor.run_workload`` -> Task SDK), as
LocalExecutor's workers do. Forking the agent per task cost ~10-25 ms of dispatch latency; a warm
runner only pays for the supervisor's set-up, and forks even the task process ahead.

A runner is its own process group, so the agent can kill a workload (supervisor and runner) with
one signal; a killed runner is not reused.

A task is handed over *gated*, before the plane confirmed its lease: the runner sets up the supervisor,
whose task process does nothing until it is sent its startup details, and waits at the gate. The agent
confirms the lease with that process's pid, and the plane makes the execution API's start report in
the same round trip. The pid is known before the set-up: an idle runner forks the next task's process
ahead (:mod:`.prefork`) and announces it (:meth:`Runner.take_waiting`), or announces it as soon as it
is handed the task; else the runner tells it once the supervisor forked (:meth:`Runner.wait_forked`).
:meth:`Runner.go` hands the plane's answer to the supervisor, which uses it in place of asking the
execution API itself (or asks itself when there is no answer); :meth:`Runner.abort` kills the
unstarted task process instead. The agent sends one of the two for every announced task, and a runner
that failed before its gate waits for it, so no word is left in the pipe for the next workload.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from multiprocessing.connection import Connection

from airflow_remote_execution.agent import metrics, prefork

log = logging.getLogger("airflow_remote_execution.agent")

_STOP = None
_GO = "go"
_ABORT = "abort"
_FORKED = "forked"
_WAITING = "waiting"
_AT_GATE = ("at-gate",)
_NOTHING = object()
_gate: dict = {}  # in a runner while a gated task is set up, until its gate: {"conn", "agent_pid"[, "announced"]}


class StartAborted(RuntimeError):
    """The agent's start confirmation failed: the forked task process was killed before it started."""


def _receive(conn: Connection, agent_pid: int, or_else=_STOP):
    """The agent's next message, or ``or_else`` once the agent is gone (siblings hold our pipe open, so
    its death is no EOF: the parent pid tells)."""
    try:
        while not conn.poll(1.0):
            if os.getppid() != agent_pid:
                return or_else
        return conn.recv()
    except (EOFError, OSError):
        return or_else


def _gate_task_start() -> None:
    """Make the supervisor of a gated task wait for the agent's go before it reports the task started."""
    from airflow.sdk.execution_time.supervisor import ActivitySubprocess

    if getattr(ActivitySubprocess, "_rex_start_gated", False):
        return
    original = ActivitySubprocess._on_child_started

    def _on_child_started(self, **kwargs):
        if not _gate:
            return original(self, **kwargs)
        conn, agent_pid = _gate.pop("conn"), _gate.pop("agent_pid")  # one gate per gated task
        announced = _gate.pop("announced", None)
        if announced is None:
            conn.send(_announcement(_FORKED, self.pid))
        conn.send(_AT_GATE)  # set up: the agent's watch on a task it confirmed before that ends
        message = _receive(conn, agent_pid, or_else=_ABORT)
        if not (isinstance(message, tuple) and message[0] == _GO):
            self.kill(signal.SIGKILL, force=True)
            raise StartAborted("the plane did not confirm the lease; the task was not started")
        if announced is not None and self.pid != announced:  # the waiting process died: a real fork
            self.kill(signal.SIGKILL, force=True)
            raise StartAborted(f"the task process is {self.pid}, not {announced} as confirmed; not started")
        with _start_report_answered(message[1]):
            return original(self, **kwargs)

    ActivitySubprocess._on_child_started = _on_child_started
    ActivitySubprocess._rex_start_gated = True


def _announcement(kind: str, pid: int) -> tuple:
    """``(kind, TaskProcess fields)`` of a task process: forked for a task, or waiting for the next one."""
    from airflow.sdk.api.client import get_hostname, getuser
    from airflow.sdk.api.datamodels._generated import API_VERSION

    return (kind, {"pid": pid, "hostname": get_hostname(), "unixname": getuser(), "api_version": API_VERSION})


@contextlib.contextmanager
def _start_report_answered(reply: dict | None):
    """While the supervisor starts its task, its start report gets the plane's reply (an
    ``ExecutionApiReply``) instead of making a request, through the client's own response hooks (token
    swap, errors). No reply, or a 5xx, leaves the report to the supervisor's own request and retries.
    (A runner supervises one task at a time, in one thread.)"""
    if reply is None or reply["status"] >= 500:
        yield
        return
    import httpx

    from airflow.sdk.api.client import TaskInstanceOperations
    from airflow.sdk.api.datamodels._generated import TIRunContext

    def start(operations, id, pid, when):  # noqa: A002 - Airflow's signature
        client = operations.client
        response = httpx.Response(
            reply["status"],
            headers=reply["headers"],
            content=reply["body"].encode(),
            request=client.build_request("PATCH", f"task-instances/{id}/run"),
        )
        for hook in client.event_hooks["response"]:
            hook(response)
        return TIRunContext.model_validate_json(response.content)

    own = TaskInstanceOperations.start
    TaskInstanceOperations.start = start
    try:
        yield
    finally:
        TaskInstanceOperations.start = own


def _fix_supervisor_exit_race() -> None:
    """Airflow's supervisor can sleep a whole ``[workers] min_heartbeat_interval`` (5 s) after its task
    ended: when the task's sockets reach EOF before the kernel has made it a zombie, the supervisor's next
    ``select()`` runs on an empty selector. While every socket is closed, wait on the process instead."""
    from airflow.sdk.execution_time.supervisor import ActivitySubprocess

    if getattr(ActivitySubprocess, "_rex_exit_race_fixed", False):
        return
    original = ActivitySubprocess._service_subprocess

    def _service_subprocess(self, max_wait_time: float, raise_on_timeout: bool = False, expect_signal=None):
        selector_map = self.selector.get_map()
        if self._exit_code is None and selector_map is not None and not selector_map:
            with contextlib.suppress(Exception):  # a timeout: fall through to the usual exit check
                self._process.wait(timeout=max(0.01, max_wait_time))
            return self._check_subprocess_exit(raise_on_timeout=raise_on_timeout, expect_signal=expect_signal)
        return original(self, max_wait_time, raise_on_timeout=raise_on_timeout, expect_signal=expect_signal)

    ActivitySubprocess._service_subprocess = _service_subprocess
    ActivitySubprocess._rex_exit_race_fixed = True


def _workload_adapter():
    from pydantic import TypeAdapter

    from airflow.executors import workloads

    return TypeAdapter(workloads.ExecutorWorkload)


def forks_into_waiting(queue: str | None) -> bool:
    """Tasks of this queue are supervised with ``WatchedSubprocess.start`` (the Python coordinator), so
    :mod:`.prefork` can hand them a waiting process."""
    try:
        from airflow.sdk.execution_time.coordinator import _PythonCoordinator, get_coordinator_manager

        return isinstance(get_coordinator_manager().for_queue(queue or "default"), _PythonCoordinator)
    except Exception:  # noqa: BLE001 - unknown: let the supervisor fork as usual
        return False


def _fork_and_announce_waiting(conn: Connection) -> None:
    """Fork the next task's process while idle and tell the agent, which can confirm its next task's lease
    with that pid before handing the task over."""
    pid = prefork.fork_waiting()
    if pid is not None:
        conn.send(_announcement(_WAITING, pid))


def run_one(workload, server: str) -> int:
    """Run one workload to its end in this process; returns its exit code."""
    from airflow.executors.base_executor import BaseExecutor

    code = BaseExecutor.run_workload(
        workload, server=server, proctitle=f"airflow remote-execution agent: {workload.display_name}"
    )
    return code or 0


def _runner_main(conn: Connection, agent_pid: int) -> None:
    """Body of a runner: receive ``(workload_json, server, gated)``, run it, send the exit code; repeat."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.setpgrp()  # the agent kills the whole group: runner/supervisor and task
    _fix_supervisor_exit_race()
    _gate_task_start()
    with contextlib.suppress(ImportError):
        from setproctitle import setproctitle

        setproctitle("airflow remote-execution agent: idle runner")
    adapter = _workload_adapter()
    prefork.install()
    _fork_and_announce_waiting(conn)
    while True:
        message = _receive(conn, agent_pid)
        if message is _STOP:
            os._exit(0)
        workload_json, server, gated, announced = message
        try:
            workload = adapter.validate_json(workload_json)
            if gated:
                _gate.update(conn=conn, agent_pid=agent_pid)
                if announced is None and forks_into_waiting(workload.ti.queue):
                    announced = prefork.waiting_pid()
                    if announced is not None:  # the agent confirms with it while the supervisor sets up
                        conn.send(_announcement(_FORKED, announced))
                if announced is not None:
                    _gate["announced"] = announced
            else:
                prefork.discard()  # the workload forks its own process, which alone should count as running
            with prefork.armed() if "announced" in _gate else contextlib.nullcontext():
                code = run_one(workload, server)
        except StartAborted:
            code = 1
        except BaseException:  # noqa: BLE001 - report a failure, never take the runner down silently
            log.exception("Workload failed in the supervisor")
            code = 1
        if "announced" in _gate:  # announced, but failed before its gate: the agent still sends go or abort
            _receive(conn, agent_pid)
        _gate.clear()  # failed before the fork, unannounced: the agent gets the code instead, and sends no go
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            conn.send(code)
            _fork_and_announce_waiting(conn)
        except (EOFError, OSError):
            os._exit(0)


class Runner:
    """One warm process; ``submit`` hands it a workload, ``result`` waits for the exit code."""

    def __init__(self, ctx) -> None:
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_runner_main, args=(child, os.getpid()), name="workload-runner")
        self.process.start()
        with contextlib.suppress(OSError):  # the child does this too; done here, a kill right away finds the group
            os.setpgid(self.process.pid, self.process.pid)
        child.close()
        self.busy = False
        self._code: int | None = None  # the workload's exit code, once read
        self.waiting: dict | None = None  # the task process it forked ahead, as it last announced
        self.at_gate = False  # the gated task's supervisor is set up and its process forked

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.is_alive()

    def task_processes(self) -> int | None:
        """How many processes the runner's supervisor has forked that are still running (an exited task
        stays a zombie until the supervisor reaps it); None if that cannot be read. Two small reads of
        /proc: the agent asks every 50 ms per workload (psutil's ``children()`` reads all of /proc)."""
        try:
            with open(f"/proc/{self.pid}/task/{self.pid}/children") as f:
                children = f.read().split()
        except OSError:
            return None
        running = 0
        for child in children:
            try:
                with open(f"/proc/{child}/stat") as f:
                    state = f.read().rpartition(")")[2].split()[0]
            except (OSError, IndexError):
                continue  # gone since the list was read
            running += state != "Z"
        return running

    def submit(self, workload_json: str, server: str, gated: bool = False, announced: int | None = None) -> None:
        """Run a workload; ``gated``: only a task, whose forked process then waits for :meth:`go` or
        :meth:`abort` (after :meth:`wait_forked` returned it, or, with ``announced``, the pid of the
        :meth:`take_waiting` process the lease was confirmed with, at once)."""
        self.busy = True
        self._code = None
        self.at_gate = False
        self.waiting = None  # the runner may use it for this workload
        self.conn.send((workload_json, server, gated, announced))

    def take_waiting(self) -> dict | None:
        """The task process the runner forked ahead for its next task (a ``TaskProcess``), if it said so;
        each is handed out once."""
        with contextlib.suppress(EOFError, OSError):
            self._next(0)  # read any announcement already in the pipe
        waiting, self.waiting = self.waiting, None
        return waiting

    def _next(self, timeout: float):
        """The runner's next message other than a waiting process's announcement (kept in ``waiting``
        if it came while the runner was idle: one sent before a workload reached it may be used by that
        workload); ``_NOTHING`` after ``timeout``. EOFError/OSError once the runner is gone."""
        deadline = time.monotonic() + timeout
        while self.conn.poll(max(0.0, deadline - time.monotonic())):
            message = self.conn.recv()
            if isinstance(message, tuple) and message[0] == _WAITING:
                self.waiting = None if self.busy else message[1]
                continue
            if message == _AT_GATE:
                self.at_gate = True
                continue
            return message
        return _NOTHING

    def wait_forked(self, timeout: float) -> dict | None:
        """A gated task's process, forked and waiting (a ``TaskProcess``); None if the workload ended before
        (its exit code is kept for :meth:`result`), the runner died, or ``timeout`` passed."""
        deadline = time.monotonic() + timeout
        while self._code is None:
            try:
                message = self._next(min(1.0, max(0.0, deadline - time.monotonic())))
            except (EOFError, OSError):
                return None
            if message is _NOTHING:
                if not self.process.is_alive() or time.monotonic() >= deadline:
                    return None
                continue
            if isinstance(message, tuple) and message[0] == _FORKED:
                return message[1]
            self._code = int(message)
        return None

    def go(self, start_report: dict | None = None) -> None:
        """Start the gated task; ``start_report``: the execution API's answer to its start report."""
        self.conn.send((_GO, start_report))

    def abort(self) -> None:
        self.conn.send(_ABORT)

    def done(self, timeout: float) -> bool:
        """True once the workload's exit code is there or the runner died."""
        if self._code is not None:
            return True
        try:
            message = self._next(timeout)
        except (EOFError, OSError):
            return True
        if message is not _NOTHING:
            self._code = int(message)
            return True
        return not self.process.is_alive()

    def result(self) -> int:
        """The workload's exit code; a dead runner's exit code (negative: killed by that signal)."""
        if self._code is None:
            self.done(0)
        if self._code is not None:
            self.busy = False
            code, self._code = self._code, None
            return code
        self.process.join(10)
        return self.process.exitcode if self.process.exitcode is not None else -signal.SIGKILL

    def stop(self) -> None:
        with contextlib.suppress(OSError, EOFError):
            self.conn.send(_STOP)
        self.process.join(5)
        if self.process.exitcode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.join(5)
        self.conn.close()


class RunnerPool:
    """Up to ``size`` idle runners, forked ahead. A lease takes one (forking one cold when none is idle,
    and more in the background); a runner comes back when its workload ended, unless it was killed or
    the pool is full. Forks happen off the lease path."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._ctx = multiprocessing.get_context("fork")
        self._idle: list[Runner] = []
        self._lock = threading.Lock()
        self._closed = False
        self._refill_wanted = threading.Event()
        threading.Thread(target=self._refill_loop, name="runner-refill", daemon=True).start()

    def fill(self) -> None:
        while True:
            with self._lock:
                if self._closed or len(self._idle) >= self.size:
                    return
            runner = Runner(self._ctx)
            with self._lock:
                if self._closed or len(self._idle) >= self.size:
                    extra = runner
                else:
                    self._idle.append(runner)
                    extra = None
            if extra:
                extra.stop()

    def take(self) -> Runner:
        with self._lock:
            while self._idle:
                runner = self._idle.pop()
                if not runner.alive():
                    metrics.runner_restart("died")
                else:
                    if not self._idle:  # keep one warm for the next lease; returned runners refill the rest
                        self._refill_wanted.set()
                    return runner
        self._refill_wanted.set()
        return Runner(self._ctx)  # cold: none idle (e.g. all held by supervisors finishing up)

    def idle_count(self) -> int:
        with self._lock:
            return len(self._idle)

    def give_back(self, runner: Runner) -> None:
        with self._lock:
            if not self._closed and runner.alive() and not runner.busy and len(self._idle) < self.size:
                self._idle.append(runner)
                return
        runner.stop()

    def _refill_loop(self) -> None:
        while not self._closed:
            self._refill_wanted.wait()
            self._refill_wanted.clear()
            try:
                self.fill()
            except Exception:  # noqa: BLE001 - the next take() forks cold instead
                log.exception("Could not start a workload runner")

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        self._refill_wanted.set()
        for runner in idle:
            runner.stop()
