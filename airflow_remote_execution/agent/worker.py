"""
The agent worker: long-polls the plane for work and runs each workload with Airflow's own
supervisors (``BaseExecutor.run_workload`` -> Task SDK) in a warm runner process
(:mod:`.runners`), one workload per runner at a time.

Threads: the *poller* leases work when slots are free and starts it only after the plane
confirms the lease; the *heartbeater* reports running work and kills what the plane says is no
longer ours; one *reaper* per workload reports its outcome (retrying until the plane answers).
The main thread waits for SIGTERM/SIGINT, then drains: no new leases, running work may finish
within ``shutdown_timeout``, the rest is terminated.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import random
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

from airflow_remote_execution import __version__
from airflow_remote_execution.agent import code_policy
from airflow_remote_execution.agent import metrics as agent_metrics
from airflow_remote_execution.agent.client import LeaseLost, PlaneClient, PlaneError
from airflow_remote_execution.agent.log_shipper import TaskLog, start_log_shipper
from airflow_remote_execution.agent.runners import Runner, RunnerPool, forks_into_waiting
from airflow_remote_execution.agent.status import StatusPublisher, WorkerFigures
from airflow_remote_execution.agent.task_sdk import share_tls_with_task_sdk
from airflow_remote_execution.wire.api import HeartbeatRequest, Lease, RegisterRequest, TaskProcess, WorkState

log = logging.getLogger("airflow_remote_execution.agent")
START_TIMEOUT = 60.0  # a runner whose task is not set up and forked by then is stuck


def backoff(attempt: int, base: float = 0.5, cap: float = 30.0) -> float:
    """Capped exponential backoff with full jitter."""
    delay = random.uniform(0, min(cap, base * 2**attempt))
    agent_metrics.backoff(delay)
    return delay


@dataclass
class Running:
    lease: Lease
    runner: Runner
    killed: bool = False
    slot_released: bool = False  # the task process is gone; only the supervisor is finishing up
    gated: bool = False  # a task whose runner must reach its gate within START_TIMEOUT of the start
    started: float = field(default_factory=time.monotonic)
    ended: bool = False  # its runner has finished it (and may run other work now): nothing left to kill


class AgentWorker:
    def __init__(
        self,
        client: PlaneClient,
        *,
        concurrency: int,
        queues: list[str] | None,
        execution_api_url: str,
        shutdown_timeout: float = 300.0,
        hostname: str | None = None,
    ) -> None:
        self.client = client
        self.concurrency = concurrency
        self.queues = queues or None
        self.execution_api_url = execution_api_url
        self.shutdown_timeout = shutdown_timeout
        self.hostname = hostname or socket.getfqdn()
        self.running: dict[int, Running] = {}
        self.lock = threading.Lock()
        self.slot_freed = threading.Event()
        self.stopping = threading.Event()  # local shutdown (SIGTERM/SIGINT): drain, then exit
        self.exited = threading.Event()
        self.paused = False  # drained by an operator on the plane: lease nothing, keep running
        self.heartbeat_interval = 5.0
        self.long_poll_wait = 20.0
        self.name = "?"
        self.pool: RunnerPool | None = None
        self.log_sender = None  # what sends running tasks' logs away (agent/log_shipper.py), if anything
        self._token_warned_at = float("-inf")
        self.status = StatusPublisher()  # read by the sentinel beside the agent

    # ------------------------------------------------------------------ lifecycle

    def register(self) -> None:
        from importlib.metadata import version

        req = RegisterRequest(
            queues=self.queues,
            concurrency=self.concurrency,
            hostname=self.hostname,
            versions={
                "airflow": version("apache-airflow-core"),
                "airflow-remote-execution": __version__,
                "python": sys.version.split()[0],
            },
            running=list(self.running),  # empty at start: the plane takes back what a predecessor held
        )
        attempt = 0
        while not self.stopping.is_set():
            try:
                reply = self.client.register(req)
                break
            except PlaneError as e:
                if not e.retryable:
                    raise SystemExit(f"Agent registration refused: {e.detail}") from None
                delay = backoff(attempt)
                log.warning("Plane unreachable (%s); retrying registration in %.1fs", e.detail, delay)
                attempt += 1
                self.stopping.wait(delay)
        else:
            return
        self.name = reply.name
        self.queues = reply.queues
        for warning in reply.warnings:
            log.warning("The plane says: %s", warning)
        self.heartbeat_interval = reply.heartbeat_interval
        self.long_poll_wait = reply.long_poll_wait
        log.info(
            "Agent %s registered: queues=%s concurrency=%d plane=%s",
            self.name, ",".join(self.queues), self.concurrency, self.client.base,
        )
        self._check_executor_config(reply.core_executor)

    @staticmethod
    def _check_executor_config(plane_executors: str) -> list[str]:
        """A task's DAG loads only where every ``executor=`` its tasks name (an alias, class name or module
        path of the plane's ``[core] executor``) resolves from ``[core] executor``. Warn, naming them, only
        about names the plane accepts that do not resolve here: DAGs that name no executor run anywhere,
        and another order, spacing or more executors here are no mismatch. Returns the unresolved names."""
        from airflow.executors.executor_loader import ExecutorLoader

        names: list[str] = []
        for team_part in plane_executors.split(";"):  # "LocalExecutor;team1=CeleryExecutor,..."
            team, eq, executors = team_part.partition("=")
            for entry in (executors if eq and ":" not in team else team_part).split(","):
                alias, _, path = entry.strip().rpartition(":")
                path = path.strip()
                names += [n for n in dict.fromkeys((alias.strip(), path, path.rsplit(".", 1)[-1])) if n and n not in names]
        missing = []
        for name in names:
            try:
                ExecutorLoader.lookup_executor_name_by_str(name, validate_teams=False)
            except Exception:  # noqa: BLE001 - UnknownExecutorException, or an unparsable setting here
                missing.append(name)
        if missing:
            from airflow.configuration import conf

            log.warning(
                "Tasks of DAGs that set executor=%s fail to load on this agent: [core] executor here is %r, on "
                "the plane %r. DAGs that name no executor are not affected. To run them here, set [core] "
                "executor = %s on the agent.",
                " or ".join(repr(n) for n in missing), conf.get("core", "executor", fallback=""), plane_executors,
                plane_executors,
            )
        return missing

    def run(self) -> int:
        """Run until SIGTERM/SIGINT; returns the process exit code."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stopping.set())
        self._preload(self.client.tls)
        self.pool = RunnerPool(self.concurrency)
        try:
            self.pool.fill()
            # Task logs to object storage (remote logging) or the plane's log store; before any fork.
            self.log_sender = start_log_shipper(self.task_logs, self.exited, self.client)
            self.status.publish(self.figures())
            self.register()
            self.status.publish(self.figures())
            threads = [
                threading.Thread(target=self._poll_loop, name="poller", daemon=True),
                threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True),
            ]
            for t in threads:
                t.start()
            # Airflow cleans old dag bundle versions only in dag processors and local-executor schedulers.
            from airflow_remote_execution.agent.bundles import remove_stale_versions_periodically

            threading.Thread(
                target=remove_stale_versions_periodically, args=(self.stopping,), name="bundle-cleanup", daemon=True
            ).start()
            while not self.stopping.wait(0.5):
                pass
            return self._drain()
        finally:
            # Idle runners are non-daemon children that outlive a living parent: left running, the
            # interpreter's exit would join them forever (e.g. after "registration refused").
            self.pool.close()

    def _drain(self) -> int:
        log.info("Stopping: no new work; waiting up to %ss for %d running", self.shutdown_timeout, len(self.running))
        self._send_heartbeat()  # says draining: an in-flight lease request returns empty within a second
        deadline = time.monotonic() + self.shutdown_timeout
        while self.running and time.monotonic() < deadline:
            time.sleep(0.2)
        with self.lock:
            leftover = list(self.running.values())
        for run in leftover:
            log.warning("Terminating work %s after shutdown timeout", run.lease.work_id)
            self._kill(run)
        end = time.monotonic() + 15
        while self.running and time.monotonic() < end:
            time.sleep(0.2)
        self.exited.set()
        self.pool.close()
        self._send_heartbeat(offline=True)
        self.status.publish(self.figures())
        log.info("Agent %s stopped", self.name)
        return 0

    @staticmethod
    def _preload(tls: tuple[str, str, str]) -> None:
        """Do before forking what every workload would otherwise do again (measured: ~350 ms a task):
        imports, including the DAG bag and operators the task process loads, and the execution-API
        TLS context."""
        import airflow.dag_processing.bundles.manager  # noqa: F401
        import airflow.dag_processing.dagbag  # noqa: F401
        import airflow.executors.base_executor  # noqa: F401
        import airflow.executors.workloads  # noqa: F401
        import airflow.sdk.execution_time.supervisor  # noqa: F401
        import airflow.sdk.execution_time.task_runner  # noqa: F401
        from airflow.sdk.api import client as sdk_client

        share_tls_with_task_sdk(*tls)
        sdk_client.Client._get_ssl_context_cached(sdk_client.API_SSL_CA_FILE_PATH, sdk_client.API_SSL_CERT_PATH)
        # What most DAG files use (``@task`` -> PythonOperator): ~45 ms a task otherwise.
        for module in ("airflow.providers.standard.operators.python", "airflow.providers.standard.decorators.python"):
            with contextlib.suppress(ImportError):
                importlib.import_module(module)

    # ------------------------------------------------------------------ leasing

    def figures(self) -> WorkerFigures:
        """This worker's state for the status record the sentinel reads."""
        return WorkerFigures(
            name=None if self.name == "?" else self.name,
            running=len(self.running),
            concurrency=self.concurrency,
            free_slots=self.free_slots(),
            paused=self.paused,
            stopping=self.stopping.is_set(),
            heartbeat_interval=self.heartbeat_interval,
            long_poll_wait=self.long_poll_wait,
            request_timeout=self.client.timeout,
        )

    def task_logs(self) -> list[TaskLog]:
        """Running workloads that write a task log, and whether their task process still runs."""
        with self.lock:
            runs = list(self.running.values())
        return [
            # The worker sets slot_released when the task process is gone (the supervisor is finishing up).
            TaskLog(path, not run.slot_released and not run.killed, run.lease.work_id, run.lease.fence)
            for run in runs
            if (path := (run.lease.workload or {}).get("log_path"))
        ]

    def free_slots(self) -> int:
        with self.lock:
            busy = sum(1 for r in self.running.values() if not r.slot_released)
        return max(0, self.concurrency - busy)

    def _poll_loop(self) -> None:
        attempt = 0
        while not self.stopping.is_set():
            free = self.free_slots()
            if self.paused:
                self.stopping.wait(1.0)
                continue
            if free == 0:
                self.slot_freed.wait(1.0)
                self.slot_freed.clear()
                continue
            try:
                leases = self.client.lease(free, self.long_poll_wait)
                attempt = 0
                self.status.poll_ok()
            except PlaneError as e:
                if e.status == 409:  # plane forgot us (e.g. agent row removed): register again
                    self.register()
                    continue
                if e.status == 401 and self._token_rejected(e):
                    continue  # a new token was in token_file: lease with it at once
                delay = backoff(attempt)
                attempt += 1
                if e.status != 401:  # that one is logged once a minute by _token_rejected
                    log.warning("Lease request failed (%s); retrying in %.1fs", e.detail, delay)
                self.status.error("lease", e.detail)
                self.stopping.wait(delay)
                continue
            agent_metrics.leases_received(leases)
            self._start_all(leases)

    def _token_rejected(self, error: PlaneError) -> bool:
        """The plane refused our token (revoked, expired, replaced). Re-read ``token_file`` (a rotated token
        is picked up without a restart) and return True if it changed; else say so, once a minute, while
        leasing waits. Running tasks carry on: they talk to the execution API with their own tokens."""
        if self.client.reload_token():
            log.warning("Agent token rejected (%s); using the new token from [remote_execution] token_file", error.detail)
            return True
        now = time.monotonic()
        if now - self._token_warned_at > 60:
            self._token_warned_at = now
            log.error(
                "Agent token rejected: %s. Leasing no work until [remote_execution] token_file holds a valid "
                "token (create or rotate one with `airflow remote-execution tokens ...` on the plane).",
                error.detail,
            )
        return False

    def _start_all(self, leases: list[Lease]) -> None:
        """Start leased work. Each task goes to its runner first (all at once, so their set-ups overlap the
        confirmations), then the plane confirms each lease and reports the task started in one round
        trip; other workloads start once confirmed."""
        if self.stopping.is_set():
            for lease in leases:
                self._release(lease)
            return
        handed = []
        for lease in leases:
            if why := code_policy.refusal(lease.kind, lease.workload or {}):
                self._refuse(lease, why)
                continue
            runner = self.pool.take()
            waiting = None
            if lease.kind == "task":
                if forks_into_waiting(lease.queue):
                    waiting = runner.take_waiting()
                announced = waiting["pid"] if waiting else None
                runner.submit(json.dumps(lease.workload), self.execution_api_url, gated=True, announced=announced)
            handed.append((lease, runner, waiting))
        for lease, runner, waiting in handed:
            self._start(lease, runner, waiting)

    def _confirm(self, lease: Lease, task: TaskProcess | None):
        """Confirm a lease, retrying what may only have lost its answer (a timeout, a 5xx) with the same
        fence for up to START_TIMEOUT: the plane answers a repeated confirmation of the same lease as the
        first, so a lost reply neither starts the work twice nor leaves the plane believing it runs."""
        deadline = time.monotonic() + START_TIMEOUT
        attempt = 0
        while True:
            try:
                return self.client.start(lease.work_id, lease.fence, task)
            except PlaneError as e:
                delay = backoff(attempt, cap=5.0)
                if not e.retryable or time.monotonic() + delay > deadline or self.exited.is_set():
                    raise
                log.warning("Confirming work %s failed (%s); retrying in %.1fs", lease.work_id, e.detail, delay)
                attempt += 1
                time.sleep(delay)

    def _refuse(self, lease: Lease, why: str) -> None:
        """Work this agent must not run (``code_policy``): confirmed and reported failed with the reason, so
        the task or callback fails with it instead of being handed to the next agent again and again."""
        log.error("Work %s (%s) refused: %s", lease.work_id, lease.kind, why)
        try:
            self.client.start(lease.work_id, lease.fence, None)
            self.client.finish(lease.work_id, lease.fence, WorkState.FAILED, why)
        except PlaneError as e:
            log.warning("Could not report refused work %s: %s", lease.work_id, e.detail)

    def _start(self, lease: Lease, runner: Runner, waiting: dict | None = None) -> None:
        """A task: confirm the lease with its task process's pid, so the plane reports the task started in
        the same round trip; that process is the one the runner forked ahead (``waiting``, or announced
        by the runner once handed the task) or else the one it forks now. Other work: confirm, then run."""
        task = None
        if lease.kind == "task":
            forked = waiting or runner.wait_forked(START_TIMEOUT)
            if forked is None and not runner.done(0):  # stuck before the fork: let another agent have it
                log.warning("Work %s: the runner did not fork its task within %ss", lease.work_id, START_TIMEOUT)
                runner.stop()
                self._release(lease)
                return
            # A task that failed before the fork is confirmed all the same, so its failure is reported.
            # Stamped now, as a supervisor stamps its task's start before it asks the execution API.
            task = TaskProcess(**forked, start_date=datetime.now(timezone.utc)) if forked else None
        try:
            reply = self._confirm(lease, task)
        except PlaneError as e:
            log.warning("Not starting work %s: %s", lease.work_id, e.detail)
            if lease.kind == "task":
                if task:
                    runner.abort()
                runner.done(60)
                runner.result()
            self.pool.give_back(runner)
            return
        if task:
            runner.go(reply.task_run.model_dump() if reply.task_run else None)
        elif lease.kind != "task":
            runner.submit(json.dumps(lease.workload), self.execution_api_url)
        run = Running(lease=lease, runner=runner, gated=task is not None)
        agent_metrics.started(lease)
        with self.lock:
            self.running[lease.work_id] = run
        log.info("Started work %s (%s) pid=%s", lease.work_id, lease.kind, runner.pid)
        threading.Thread(target=self._reap, args=(run,), name=f"reaper-{lease.work_id}", daemon=True).start()

    def _release(self, lease: Lease) -> None:
        try:
            self.client.release(lease.work_id, lease.fence)
        except PlaneError as e:
            log.warning("Could not release work %s: %s", lease.work_id, e.detail)

    def _reap(self, run: Running) -> None:
        self._wait_for_task_process(run)
        while not run.runner.done(1.0):
            pass
        code = run.runner.result()
        run.ended = True  # before the runner goes back: a late "kill" must not reach its next workload
        if run.killed:
            run.runner.stop()
        else:
            self.pool.give_back(run.runner)
        outcome = WorkState.SUCCESS if code == 0 else WorkState.FAILED
        agent_metrics.finished(run.lease, outcome.value, run.killed)
        info = None if code == 0 else (f"killed by signal {-code}" if code and code < 0 else f"exit code {code}")
        log.info("Work %s finished: %s%s", run.lease.work_id, outcome.value, f" ({info})" if info else "")
        if self.log_sender is not None:  # the rest of its log first: the plane shows it finished once told
            self.log_sender.task_ended(run.lease.work_id, run.lease.fence)
        attempt = 0
        while True:
            try:
                self.client.finish(run.lease.work_id, run.lease.fence, outcome, info)
                break
            except LeaseLost as e:
                log.warning("Outcome of work %s not accepted: %s", run.lease.work_id, e.detail)
                break
            except PlaneError as e:
                if e.status == 401 and not self.exited.is_set():
                    self._token_rejected(e)  # keep the outcome until a valid token is back
                elif not e.retryable:
                    log.error("Outcome of work %s rejected: %s", run.lease.work_id, e.detail)
                    break
                delay = backoff(attempt)
                log.warning("Reporting the outcome of work %s failed (%s); retrying in %.1fs", run.lease.work_id,
                            e.detail, delay)
                attempt += 1
                time.sleep(delay)
        with self.lock:
            self.running.pop(run.lease.work_id, None)
        self.slot_freed.set()

    def _wait_for_task_process(self, run: Running) -> None:
        """Free the slot as soon as the workload's own process (the supervisor's child) is gone.

        Airflow's supervisor can linger up to ``[workers] min_heartbeat_interval`` (5 s) after its
        task ended; counting that as a busy slot starves short tasks on a small agent.
        """
        seen_child = False
        while not run.runner.done(0.05):
            if run.gated and not run.killed and not run.runner.at_gate and time.monotonic() - run.started > START_TIMEOUT:
                # Confirmed (and reported started) with a process forked ahead, the runner never got its
                # task going: fail it, as its supervisor would have (the scheduler then retries it).
                log.warning("Work %s: the runner did not set up its task within %ss; killing it",
                            run.lease.work_id, START_TIMEOUT)
                self._kill(run)
            running = run.runner.task_processes()
            if running is None:
                return
            if running:
                seen_child = True
            elif seen_child:
                run.slot_released = True
                self.slot_freed.set()
                return

    # ------------------------------------------------------------------ heartbeats

    def _send_heartbeat(self, offline: bool = False) -> None:
        with self.lock:
            running = list(self.running)
        request = HeartbeatRequest(
            running=running, free_slots=self.free_slots(), draining=self.stopping.is_set(), offline=offline
        )
        try:
            reply = self.client.heartbeat(request)
            self.status.heartbeat_ok()
        except PlaneError as e:
            if e.status == 401:
                self._token_rejected(e)
            else:
                log.warning("Heartbeat failed: %s", e.detail)
            self.status.error("heartbeat", e.detail)
            return
        self.heartbeat_interval = reply.heartbeat_interval
        for work_id in reply.kill:
            with self.lock:
                run = self.running.get(work_id)
            if run is not None and not run.ended:  # ended: its outcome is on its way (the plane saw it first)
                log.warning("Plane took work %s away; killing it", work_id)
                self._kill(run)
        if reply.drain != self.paused:
            log.info("Drained on the plane: leasing nothing new" if reply.drain else "Resumed: leasing again")
            self.paused = reply.drain

    def _heartbeat_loop(self) -> None:
        """Heartbeats continue while draining, so running work is not taken for lost."""
        while not self.exited.wait(self.heartbeat_interval):
            self._send_heartbeat()
            self.status.publish(self.figures())

    @staticmethod
    def _kill(run: Running) -> None:
        """SIGTERM the runner's group (the supervisor forwards it to the task, whose ``on_kill`` runs),
        then SIGKILL whatever is left of the runner and the task's own process group."""
        if run.killed:
            return
        run.killed = True
        pid = run.runner.pid

        def _terminate() -> None:
            import psutil

            try:
                tasks = psutil.Process(pid).children(recursive=True)
                os.killpg(pid, signal.SIGTERM)
            except (ProcessLookupError, psutil.NoSuchProcess):
                return
            run.runner.process.join(10)
            for proc in [*tasks, None]:
                with contextlib.suppress(ProcessLookupError, PermissionError, psutil.Error):
                    os.killpg(proc.pid if proc else pid, signal.SIGKILL)

        threading.Thread(target=_terminate, daemon=True).start()
