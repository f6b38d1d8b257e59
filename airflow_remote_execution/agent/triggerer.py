"""
The agent's triggerer: Airflow's own ``TriggerRunnerSupervisor`` and ``TriggerRunner``, with the
job-less hooks going to the Remote Execution API instead of the metadata DB.

* ``load_triggers`` syncs with the plane (which is also the heartbeat of this triggerer's Job):
  the answer lists every trigger this triggerer owns and the RunTrigger workloads of new ones.
* ``on_trigger_event`` / ``on_trigger_failure`` post to the plane, which calls Airflow's
  ``Trigger.submit_event`` / ``submit_failure``. A 409 means the trigger was reassigned: dropped.
* A trigger's other requests to its supervisor (task-instance and DAG-run counts and states, previous
  task instances, XCom reads, HITL details, asset state store) go to the plane's
  ``/v1/triggerers/{id}/execution/...``, which scopes them to this triggerer's triggers and its token's
  bundles and serves them with Airflow's execution API, as the stock triggerer does in-process.
* Connections and variables for triggers come from the agent's own secrets backends and
  ``AIRFLOW_CONN_*`` / ``AIRFLOW_VAR_*`` (the trigger process looks there first); the supervisor's
  fallback answers "not found" without asking the plane.
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
import time

import attrs
import httpx
import requests

from airflow.executors import workloads
from airflow.jobs.triggerer_job_runner import TriggerLoggingFactory, TriggerRunnerSupervisor
from airflow.triggers.base import BaseTaskEndEvent

from airflow_remote_execution.agent.client import LeaseLost, PlaneClient, PlaneError
from airflow_remote_execution.agent.log_shipper import TaskLog, start_trigger_log_sender
from airflow_remote_execution.wire.triggers import TriggerWork

log = logging.getLogger(__name__)

_REPORT_RETRY_FOR = 120.0  # seconds an event/failure report keeps being retried while the plane is away


def encode_event(event) -> dict:
    """TriggerEvent -> wire form; the payload in Airflow's serde form so datetimes etc. survive JSON."""
    if isinstance(event, BaseTaskEndEvent):
        return event.model_dump(mode="json")
    from airflow.sdk.serde import serialize

    return {"payload": serialize(event.payload)}


_FORWARDED = ("content-type", "accept", "airflow-api-version")


class PlaneTransport(httpx.BaseTransport):
    """The trigger supervisor's execution-API client, through the plane's triggerer route: connections and
    variables answered "not found" here (the agent's own backends were asked first), the rest forwarded
    with the agent's token over the PlaneClient's session (TLS, proxy, retries)."""

    def __init__(self, plane: PlaneClient, triggerer_id) -> None:
        self.plane = plane
        self.triggerer_id = triggerer_id  # a callable: the id changes when the triggerer registers again

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path.lstrip("/")
        if path == "variables/keys":
            return httpx.Response(200, json={"keys": [], "total_entries": 0})
        if path.startswith(("connections/", "variables/")):
            return httpx.Response(404, json={"detail": {"reason": "not_found", "message": (
                "Agent triggerers read connections and variables from the agent's secrets backends and "
                "AIRFLOW_CONN_*/AIRFLOW_VAR_* only")}})
        url = f"{self.plane.base}/triggerers/{self.triggerer_id()}/execution/{path}"
        if request.url.query:
            url += "?" + request.url.query.decode("ascii")
        headers = {k: v for k, v in request.headers.items() if k.lower() in _FORWARDED}
        try:
            answer = self.plane.http.request(
                request.method, url, data=request.read() or None, headers=headers,
                timeout=self.plane.timeout, verify=self.plane.verify,
            )
        except requests.RequestException as e:
            raise httpx.ConnectError(f"Plane not reachable at {self.plane.base}: {type(e).__name__}") from None
        kept = {k: v for k, v in answer.headers.items() if k.lower() == "content-type"}
        return httpx.Response(answer.status_code, headers=kept, content=answer.content)


@attrs.define(kw_only=True)
class AgentTriggerRunnerSupervisor(TriggerRunnerSupervisor):
    """Runs Airflow's TriggerRunner subprocess for triggers this agent claims through the API."""

    plane: PlaneClient
    triggerer_id: int
    hostname: str
    sync_interval: float = 1.0
    register_queues: list[str] | None = None

    _work: dict[int, TriggerWork] = attrs.field(factory=dict, init=False)
    _last_sync: float = attrs.field(default=0.0, init=False)
    _stuck_logged: bool = attrs.field(default=False, init=False)

    # ------------------------------------------------------------ hooks: no Job, no DB

    def make_client(self):
        from airflow.sdk.api.client import Client

        client = Client(base_url=None, token="", dry_run=True,
                        transport=PlaneTransport(self.plane, lambda: self.triggerer_id))
        client.base_url = "http://plane-via-triggerer-route.invalid./"
        return client

    def heartbeat(self) -> None:
        """The plane-side Job heartbeat is the sync in :meth:`load_triggers`."""

    def metric_tags(self) -> dict[str, str]:
        return {"hostname": self.hostname}

    def clean_unused(self) -> None:
        """Done on the plane (it has the DB)."""

    def _runner_stuck(self) -> bool:
        """Like the stock heartbeat: a silent runner stops our syncs so the plane reassigns our triggers."""
        elapsed = time.monotonic() - self._last_runner_comms
        stuck = self.runner_health_check_threshold > 0 and elapsed > self.runner_health_check_threshold
        if stuck and not self._stuck_logged:
            log.error("Trigger runner silent for %.0fs: not syncing, so the plane reassigns its triggers", elapsed)
        self._stuck_logged = stuck
        return stuck

    def load_triggers(self) -> None:
        if time.monotonic() - self._last_sync < self.sync_interval or self._runner_stuck():
            return
        self._last_sync = time.monotonic()
        known = self.running_triggers | {w.id for w in self.creating_triggers}
        try:
            answer = self.plane.sync_triggers(self.triggerer_id, self.capacity, sorted(known))
        except LeaseLost as e:
            log.warning("Plane retired triggerer %s (%s): cancelling its triggers, registering again",
                        self.triggerer_id, e.detail)
            self.update_triggers(set())
            self._register_again()
            return
        except PlaneError as e:
            log.warning("Trigger sync failed (%s); triggers keep running", e)
            return
        for work in answer.start:
            self._work[work.workload["id"]] = work
        self.update_triggers(set(answer.assigned))

    def _register_again(self) -> None:
        try:
            reg = self.plane.register_triggerer(self.hostname, self.capacity, self.register_queues)
        except PlaneError as e:
            log.warning("Registering the triggerer again failed (%s); will retry", e)
            return
        self.triggerer_id = reg.triggerer_id
        log.info("Triggerer registered again as %s", reg.triggerer_id)

    def build_trigger_workloads(self, new_trigger_ids: set[int]) -> list[workloads.RunTrigger]:
        out = []
        for trigger_id in sorted(new_trigger_ids):
            work = self._work.pop(trigger_id, None)
            if work is None:
                continue  # the plane sends it again on the next sync
            workload = workloads.RunTrigger.model_validate(work.workload)
            if work.log_path and workload.ti is not None:
                self.logger_cache[trigger_id] = TriggerLoggingFactory(log_path=work.log_path, ti=workload.ti)
            log.info("Starting trigger %s (%s)", trigger_id, workload.classpath)
            out.append(workload)
        return out

    def on_trigger_event(self, trigger_id: int, event) -> None:
        try:
            data = encode_event(event)
        except Exception as e:  # noqa: BLE001 - a payload serde cannot encode fails the trigger, as stock does
            self.on_trigger_failure(trigger_id, [f"Trigger event payload cannot be serialized: {e!r}"])
            return
        self._report(trigger_id, "event", lambda: self.plane.trigger_event(self.triggerer_id, trigger_id, data))

    def on_trigger_failure(self, trigger_id: int, exc: list[str] | None) -> None:
        self._report(trigger_id, "failure", lambda: self.plane.trigger_failure(self.triggerer_id, trigger_id, exc))

    def _report(self, trigger_id: int, what: str, send) -> None:
        deadline = time.monotonic() + _REPORT_RETRY_FOR
        delay = 0.5
        while True:
            try:
                send()
                log.info("Trigger %s %s reported", trigger_id, what)
                return
            except LeaseLost as e:
                log.warning("Trigger %s %s dropped: %s", trigger_id, what, e.detail)
                return
            except PlaneError as e:
                if not e.retryable or time.monotonic() > deadline:
                    log.error("Trigger %s %s could not be reported: %s", trigger_id, what, e)
                    if what == "event" and not e.retryable:
                        self.on_trigger_failure(trigger_id, [f"The plane refused the trigger's event: {e.detail}"])
                    return
                log.warning("Reporting trigger %s %s failed (%s); retrying", trigger_id, what, e)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)


def _trigger_logs(runner: AgentTriggerRunnerSupervisor) -> list[TaskLog]:
    """The running triggers' log files (Airflow's ``<task log>.trigger.<job>.log``), for the plane log store."""
    return [
        TaskLog(factory.log_path, True, trigger_id, runner.triggerer_id, trigger=True)
        for trigger_id, factory in list(runner.logger_cache.items())
        if getattr(factory, "log_path", None)
    ]


def run_triggerer(plane: PlaneClient, capacity: int, queues: list[str] | None) -> int:
    """Register, run Airflow's trigger runner until SIGTERM/SIGINT, then hand the triggers back."""
    hostname = socket.getfqdn()
    while True:
        try:
            reg = plane.register_triggerer(hostname, capacity, queues)
            break
        except PlaneError as e:
            if not e.retryable:
                log.error("Triggerer registration refused: %s", e)
                return 1
            log.warning("Plane not reachable (%s); retrying in 5s", e)
            time.sleep(5)
    log.info("Triggerer registered as %s for queues %s (capacity %d)", reg.triggerer_id, ", ".join(reg.queues), capacity)
    runner = AgentTriggerRunnerSupervisor.start(
        plane=plane, triggerer_id=reg.triggerer_id, hostname=hostname, capacity=capacity,
        sync_interval=reg.sync_interval, register_queues=queues,
    )

    def on_signal(signum, _frame):
        if not runner.stop:
            log.info("Signal %s: stopping the triggerer (again to force)", signum)
            runner.stop = True
        else:
            runner.kill(signal.SIGKILL)
            raise SystemExit(1)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    stopped = threading.Event()
    start_trigger_log_sender(plane, lambda: _trigger_logs(runner), stopped)  # without remote logging
    try:
        runner.run()
    finally:
        stopped.set()
        runner.kill(escalation_delay=10, force=True)
        runner.handle_events()
        runner.handle_failed_triggers()
        try:
            plane.stop_triggerer(runner.triggerer_id)
            log.info("Triggerer %s stopped; its triggers are free for other triggerers", runner.triggerer_id)
        except PlaneError as e:
            log.warning("Could not hand triggers back (%s); the plane frees them when this one goes silent", e)
    return 0 if runner.stop else 1  # stopped by a signal, or the runner died
