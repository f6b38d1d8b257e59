"""
The sentinel: a small process beside the agent that answers Kubernetes probes and reports the
agent's health to the plane on its own schedule, so status keeps flowing while the agent restarts.

It never talks to the agent: it reads the status file the agent rewrites every heartbeat
(:mod:`.status`) and runs the shared check registry (:mod:`airflow_remote_execution.agent.checks`).
Cheap checks (the agent's components, CPU, memory, disk) run on every probe; the integration
checks (api, token, clock, secrets, xcom, bundles, ...) run on a slower schedule in a thread and
their last results are served from memory, so a probe never waits on the network.

- ``/livez``: the sentinel itself works (its loops run).
- ``/healthz``: ... and the agent process is alive (its pid, with the same start time, exists) and
  writes its status; the pid check needs a shared PID namespace (``shareProcessNamespace: true``).
- ``/readyz``: ... and the agent is registered, polls and heartbeats, the plane accepts the
  sentinel's reports with the agent's token, and the integration checks pass. CPU, memory and
  disk only degrade the status: a busy agent is still ready.
"""

from __future__ import annotations

import json
import logging
import signal
import socket
import threading
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psutil

from airflow_remote_execution import stats
from airflow_remote_execution.agent import metrics
from airflow_remote_execution.agent.client import PlaneClient, PlaneError
from airflow_remote_execution.agent.status import AgentStatus, read_status, status_path
from airflow_remote_execution.agent.checks import CHECKS, CheckResult, check, load_checks, run_checks
from airflow_remote_execution.wire.api import SentinelCheck, SentinelReport

log = logging.getLogger("airflow_remote_execution.sentinel")

COMPONENT_CHECKS = ("agent_alive", "agent_heartbeat", "agent_poll", "agent_slots")
RESOURCE_CHECKS = ("cpu", "memory", "disk")  # ``disk`` is the doctor's, in checks.py
REQUIRED = ("agent_alive", "agent_heartbeat", "agent_poll")  # for the sentinel, "no agent here" is a failure
CRITICAL = ("sentinel", "agent_alive", "report", "api", "token")  # failing: the agent cannot work at all
CPU_BUSY_PERCENT = 95.0
MEMORY_FAIL_PERCENT = 95.0


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _ago(when: datetime | None, now: datetime) -> str:
    return "never" if when is None else f"{(now - when).total_seconds():.0f}s ago"


def _last_error(status: AgentStatus) -> str:
    return f"; last error {_ago(status.last_error_at, _now())}: {status.last_error}" if status.last_error else ""


def _load(name: str) -> tuple[Path, AgentStatus | None, CheckResult | None]:
    """The agent's status, or the (skipped) result to return when there is none."""
    path = status_path()
    status = read_status(path)
    if status is None:
        return path, None, CheckResult(
            name, False, f"no agent status file at {path}: no agent has started here",
            "start the agent; agent and sentinel must share [remote_execution] status_file", skipped=True,
        )
    return path, status, None


def agent_process_alive(status: AgentStatus) -> bool:
    """The pid exists, is not a zombie, and started when the agent did (pids get reused)."""
    try:
        proc = psutil.Process(status.pid)
        return abs(proc.create_time() - status.pid_started) < 1.0 and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def status_stale_after(status: AgentStatus) -> float:
    """The agent writes every heartbeat; a heartbeat may block up to the request timeout (plane down)."""
    return 3 * status.heartbeat_interval + status.request_timeout + 5


# ---------------------------------------------------------------------------------- component checks


@check("agent_alive")
def check_agent_alive() -> CheckResult:
    _, status, missing = _load("agent_alive")
    if missing:
        return missing
    now = _now()
    who = f"agent {status.name or '(not registered yet)'} pid {status.pid}"
    if not agent_process_alive(status):
        return CheckResult(
            "agent_alive", False,
            f"{who} is not running (its last status is from {_ago(status.updated_at, now)}"
            f"{', while stopping' if status.stopping else ''}){_last_error(status)}",
            "see the agent's log and restarts; in Kubernetes the sentinel needs shareProcessNamespace: true",
        )
    age, limit = status.age(now), status_stale_after(status)
    if status.name and age > limit:
        return CheckResult(
            "agent_alive", False, f"{who} runs but has not written its status for {age:.0f}s (limit {limit:.0f}s)",
            "the agent's heartbeat loop is stuck: see its log; restart it",
        )
    return CheckResult("agent_alive", True, f"{who} up {(now - status.started_at).total_seconds():.0f}s")


@check("agent_heartbeat")
def check_agent_heartbeat() -> CheckResult:
    _, status, missing = _load("agent_heartbeat")
    if missing:
        return missing
    now = _now()
    if not status.name:
        return CheckResult(
            "agent_heartbeat", False,
            f"agent not registered with the plane yet (started {_ago(status.started_at, now)}){_last_error(status)}",
            "see the agent's log: the plane must be reachable and accept its token",
        )
    limit = 3 * status.heartbeat_interval + 2
    if status.last_heartbeat_at is None or (now - status.last_heartbeat_at).total_seconds() > limit:
        return CheckResult(
            "agent_heartbeat", False,
            f"last successful heartbeat {_ago(status.last_heartbeat_at, now)} (every {status.heartbeat_interval:g}s)"
            f"{_last_error(status)}",
            "the plane counts a silent agent as lost and fails its running tasks: check the network and the token",
        )
    return CheckResult("agent_heartbeat", True, f"last heartbeat {_ago(status.last_heartbeat_at, now)}")


@check("agent_poll")
def check_agent_poll() -> CheckResult:
    _, status, missing = _load("agent_poll")
    if missing:
        return missing
    now = _now()
    if status.stopping or status.paused or status.free_slots == 0:
        why = "stopping" if status.stopping else "drained on the plane" if status.paused else "all slots busy"
        return CheckResult("agent_poll", True, f"not leasing ({why}); last poll {_ago(status.last_poll_at, now)}")
    since = max(t for t in (status.last_poll_at, status.wants_work_since, status.started_at) if t is not None)
    limit = status.long_poll_wait + status.request_timeout + status.heartbeat_interval
    if (now - since).total_seconds() > limit:
        return CheckResult(
            "agent_poll", False,
            f"{status.free_slots} free slot(s) but no lease request answered since {_ago(since, now)} "
            f"(a long poll returns within {status.long_poll_wait:g}s){_last_error(status)}",
            "the agent cannot lease work: check the network to the plane and the token",
        )
    return CheckResult("agent_poll", True, f"last poll {_ago(status.last_poll_at, now)}")


@check("agent_slots")
def check_agent_slots() -> CheckResult:
    _, status, missing = _load("agent_slots")
    if missing:
        return missing
    busy = status.concurrency - status.free_slots
    return CheckResult(
        "agent_slots", True, f"{status.running} running, {busy} of {status.concurrency} slots busy"
        + (", drained" if status.paused else "")
    )


# ---------------------------------------------------------------------------------- resource checks


@check("cpu")
def check_cpu() -> CheckResult:
    """Busy share of all CPUs since the previous call (the sentinel calls it on every probe)."""
    busy = psutil.cpu_percent(interval=None)
    load1 = psutil.getloadavg()[0]
    detail = f"CPU {busy:.0f}% busy, load {load1:.2f} on {psutil.cpu_count()} CPUs"
    if busy >= CPU_BUSY_PERCENT:  # a warning, not a failure: busy is not broken (the sentinel says degraded)
        hint = "tasks run slowly: lower [remote_execution] concurrency or add CPUs"
        return CheckResult("cpu", True, detail, hint, warning=True)
    return CheckResult("cpu", True, detail)


def _cgroup_memory() -> tuple[int, int] | None:
    """(used, limit) bytes of this container's cgroup v2, if it has a limit."""
    base = Path("/sys/fs/cgroup")
    try:
        limit = (base / "memory.max").read_text().strip()
        if limit == "max":
            return None
        used = int((base / "memory.current").read_text())
        # Page cache can be reclaimed: do not count inactive file pages as used.
        for line in (base / "memory.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "inactive_file":
                used -= int(value)
        return max(used, 0), int(limit)
    except (OSError, ValueError):
        return None


@check("memory")
def check_memory() -> CheckResult:
    """Memory use against the container's cgroup limit (what the OOM killer enforces), else the host's."""
    cgroup = _cgroup_memory()
    if cgroup:
        used, total, scope = *cgroup, "container limit"
    else:
        vm = psutil.virtual_memory()
        used, total, scope = vm.total - vm.available, vm.total, "host"
    percent = 100.0 * used / total if total else 0.0
    detail = f"memory {used / (1 << 30):.1f} of {total / (1 << 30):.1f} GiB used ({percent:.0f}% of the {scope})"
    if percent >= MEMORY_FAIL_PERCENT:
        return CheckResult("memory", False, detail, "tasks risk the OOM killer: lower concurrency or raise the limit")
    return CheckResult("memory", True, detail)


# ---------------------------------------------------------------------------------- the sentinel


@dataclass(frozen=True)
class Evaluation:
    status: str  # ok | degraded | failing
    healthy: bool
    ready: bool
    checks: list[CheckResult]

    def body(self, names: tuple[str, ...] | None = None) -> dict:
        shown = [c for c in self.checks if names is None or c.name in names]
        return {
            "status": self.status,
            "healthy": self.healthy,
            "ready": self.ready,
            "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail, "hint": c.hint, "skipped": c.skipped,
                        "warning": getattr(c, "warning", False)} for c in shown],
        }


def aggregate(results: list[CheckResult]) -> Evaluation:
    """ok / degraded / failing, and the probe answers, from a list of check results.

    Resource checks only degrade (also on a warning, such as a busy CPU); other warnings (say, a
    token expiring in a few days) show in the checks without changing the status."""
    results = [
        replace(r, skipped=False) if r.skipped and r.name in REQUIRED else r for r in results
    ]
    failing = {r.name for r in results if not r.ok and not r.skipped}
    strained = {r.name for r in results if r.name in RESOURCE_CHECKS and getattr(r, "warning", False)}
    healthy = not failing & {"sentinel", "agent_alive"} and "agent_alive" in {r.name for r in results}
    ready = healthy and not failing - set(RESOURCE_CHECKS)
    status = "failing" if failing & set(CRITICAL) else "degraded" if failing or strained else "ok"
    return Evaluation(status, healthy, ready, results)


class Sentinel:
    def __init__(
        self,
        client: PlaneClient,
        *,
        report_interval: float = 15.0,
        integration_interval: float | None = None,
        hostname: str | None = None,
    ) -> None:
        if report_interval <= 0:
            raise ValueError(f"report interval must be positive, not {report_interval}")
        self.client = client
        self.report_interval = report_interval
        self.integration_interval = integration_interval or max(30.0, 4 * report_interval)
        self.hostname = hostname or socket.getfqdn()
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self._integration: list[CheckResult] = []
        self._report = CheckResult("report", True, "first report not sent yet", skipped=True)
        self._last_status: str | None = None
        self._beats: dict[str, float] = {}  # loop name -> monotonic time of its last round
        self.server: ThreadingHTTPServer | None = None
        self._threads: list[threading.Thread] = []
        load_checks()
        psutil.cpu_percent(interval=None)  # the first call only sets the baseline

    # ------------------------------------------------------------------ checks

    def integration_names(self) -> list[str]:
        return [n for n in CHECKS if n not in COMPONENT_CHECKS + RESOURCE_CHECKS]

    def run_integration_checks(self) -> None:
        names = self.integration_names()
        results = run_checks(names) if names else load_checks()
        with self._lock:
            self._integration = results

    def _self_check(self) -> CheckResult:
        now = time.monotonic()
        limits = {"report": self.report_interval * 2 + 4 * self.client.timeout, "checks": self.integration_interval * 3}
        late = [f"{loop} loop last ran {now - self._beats[loop]:.0f}s ago" for loop, limit in limits.items()
                if loop in self._beats and now - self._beats[loop] > limit]
        dead = [t.name for t in self._threads if not t.is_alive()]
        if late or dead:
            return CheckResult("sentinel", False, "; ".join(late + [f"{d} thread died" for d in dead]),
                               "restart the sentinel and look at its log")
        return CheckResult("sentinel", True, f"reporting every {self.report_interval:g}s")

    def evaluate(self) -> Evaluation:
        cheap = [n for n in COMPONENT_CHECKS + RESOURCE_CHECKS if n in CHECKS]
        results = [r for r in run_checks(cheap) if not r.name.startswith("load:")]
        with self._lock:
            results += [*self._integration, self._report]
        return aggregate([self._self_check(), *results])

    # ------------------------------------------------------------------ reporting

    def report_once(self) -> Evaluation:
        evaluation = self.evaluate()
        report = SentinelReport(
            status=evaluation.status,
            checks=[SentinelCheck(name=c.name, ok=c.ok, detail=c.detail[:2000], hint=c.hint[:2000], skipped=c.skipped,
                                  warning=getattr(c, "warning", False)) for c in evaluation.checks],
            interval=self.report_interval,
            hostname=self.hostname[:250],
        )
        try:
            self.client.sentinel_report(report)
            result = CheckResult("report", True, f"plane at {self.client.base} accepted the report")
        except PlaneError as e:
            result = self._report_failure(e)
        with self._lock:
            if result.ok != self._report.ok or result.detail != self._report.detail:
                (log.info if result.ok else log.warning)("Report: %s", result.detail)
            self._report = result
        evaluation = self.evaluate()  # with this report's outcome
        metrics.sentinel(evaluation.status, evaluation.checks, lambda: read_status(status_path()))
        if evaluation.status != self._last_status:
            failing = [c.name for c in evaluation.checks if not c.ok and not c.skipped]
            log.info("Agent status %s%s", evaluation.status, f" (failing: {', '.join(failing)})" if failing else "")
            self._last_status = evaluation.status
        return evaluation

    def _report_failure(self, e: PlaneError) -> CheckResult:
        if e.status == 0:
            return CheckResult("report", False, e.detail, "check [remote_execution] api_url and the network path")
        if e.status == 401:
            return CheckResult(
                "report", False, f"the plane rejected the agent token: {e.detail}",
                "create a token (`airflow remote-execution tokens create` on the plane) and update the token file "
                "of both agent and sentinel",
            )
        if e.status == 409:
            return CheckResult(
                "report", False, f"the plane keeps no report yet: {e.detail}",
                "the agent must register first (the plane stores reports on the agent's row)",
            )
        return CheckResult("report", False, f"the plane refused the report: {e}", "see the plane's api-server log")

    def _loop(self, name: str, interval: float, fn) -> None:
        while not self.stop.is_set():
            self._beats[name] = time.monotonic()
            try:
                fn()
            except Exception:  # noqa: BLE001 - keep reporting; the next round may work
                log.exception("Sentinel %s round failed", name)
            self.stop.wait(interval)

    # ------------------------------------------------------------------ serving

    def start(self, host: str, port: int) -> tuple[str, int]:
        """Serve the probes and start the loops; returns the bound address."""
        self.prometheus = metrics.sentinel_prometheus()  # /metrics here too when agent_metrics_port is on
        self.server = ThreadingHTTPServer((host, port), _handler(self))
        self.server.daemon_threads = True
        self._threads = [
            threading.Thread(target=self.server.serve_forever, name="http", daemon=True),
            threading.Thread(target=self._loop, args=("checks", self.integration_interval, self.run_integration_checks),
                             name="checks", daemon=True),
            threading.Thread(target=self._loop, args=("report", self.report_interval, self.report_once),
                             name="report", daemon=True),
        ]
        for t in self._threads:
            t.start()
        bound = self.server.server_address[:2]
        log.info("Sentinel serving /livez /healthz /readyz on http://%s:%s; reporting to %s every %gs",
                 *bound, self.client.base, self.report_interval)
        return bound

    def shutdown(self) -> None:
        self.stop.set()
        if self.server:
            self.server.shutdown()
            self.server.server_close()

    def run(self, host: str, port: int) -> int:
        """Serve until SIGTERM/SIGINT."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop.set())
        self.start(host, port)
        while not self.stop.wait(0.5):
            pass
        self.shutdown()
        return 0


def _handler(sentinel: Sentinel) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            path = self.path.split("?", 1)[0].rstrip("/") or "/"
            if path == "/metrics" and getattr(sentinel, "prometheus", None) is not None:
                return self._send(200, sentinel.prometheus.text(), stats.PROMETHEUS_CONTENT_TYPE)
            if path == "/livez":
                result = sentinel._self_check()
                code, body = (200 if result.ok else 503), {"status": "ok" if result.ok else "failing",
                                                           "checks": [result.as_dict()]}
            elif path == "/healthz":
                evaluation = sentinel.evaluate()
                code, body = (200 if evaluation.healthy else 503), evaluation.body(("sentinel", "agent_alive"))
            elif path == "/readyz":
                evaluation = sentinel.evaluate()
                code, body = (200 if evaluation.ready else 503), evaluation.body()
            else:
                code, body = 404, {"detail": "not found: use /livez, /healthz or /readyz"}
            self._send(code, json.dumps(body).encode(), "application/json")

        def _send(self, code: int, data: bytes, content_type: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args) -> None:  # noqa: A002 - http.server's signature
            log.debug("%s " + format, self.address_string(), *args)

    return Handler
