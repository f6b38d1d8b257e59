"""
The agent's and the sentinel's metrics, through Airflow's facade with the agent's own ``[metrics]``
settings (its StatsD or OpenTelemetry collector, not the plane's). Every metric carries the agent's
name as the ``agent`` tag once it registered (before: ``unregistered``). docs/metrics.md lists them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from airflow_remote_execution import stats

if TYPE_CHECKING:
    from airflow_remote_execution.wire.api import Lease

log = logging.getLogger(__name__)
_agent = "unregistered"
_leased_at: dict[int, float] = {}  # work id -> when its lease arrived (monotonic)
_lock = threading.Lock()
STATUS_VALUES = {"ok": 0, "degraded": 1, "failing": 2}


def _named(name: str | None) -> str:
    global _agent
    if name:
        _agent = name
    return _agent


def serve_from_config() -> tuple[str, int] | None:
    """Start this process's Prometheus endpoint if ``[remote_execution] agent_metrics_port`` is set (the
    worker calls this; the sentinel answers ``/metrics`` on its probe port instead). A port already in use
    is a clear error at start, not a silent gap in the metrics."""
    from airflow_remote_execution import config

    port = config.getint("agent_metrics_port")
    if not port:
        return None
    if not 0 < port < 65536:
        raise SystemExit(f"[remote_execution] agent_metrics_port {port} is not a TCP port (0 turns it off)")
    host = config.get("agent_metrics_host") or "0.0.0.0"
    try:
        bound = stats.serve_prometheus(host, port)
    except OSError as e:
        raise SystemExit(f"Cannot serve the agent's metrics on {host}:{port} ([remote_execution] "
                         f"agent_metrics_host/agent_metrics_port): {e}") from e
    log.info("Agent metrics for Prometheus on http://%s:%s/metrics", *bound)
    return bound


def sentinel_prometheus() -> stats.PrometheusRegistry | None:
    """The sentinel is a process (often a container) of its own: when the agent's endpoint is on
    (``agent_metrics_port``), its probe server answers ``/metrics`` with its checks from this registry."""
    from airflow_remote_execution import config

    try:
        on = config.getint("agent_metrics_port") > 0
    except Exception:  # noqa: BLE001 - an unreadable option: off
        on = False
    return stats.prometheus() if on else None


@stats.never_raises
def figures(f) -> None:
    """Slots used and free, running workloads (each time the worker publishes its status, ``f`` being its
    :class:`~airflow_remote_execution.agent.status.WorkerFigures`)."""
    agent = _named(f.name)
    stats.gauge("agent.slots_used", f.concurrency - f.free_slots, agent=agent)
    stats.gauge("agent.slots_free", f.free_slots, agent=agent)
    stats.gauge("agent.running", f.running, agent=agent)
    stats.gauge("agent.paused", int(f.paused), agent=agent)


@stats.never_raises
def plane_error(operation: str) -> None:
    """A call to the plane failed (``lease``, ``heartbeat``, ...): no answer, or an error answer."""
    stats.incr("agent.plane_errors", operation=operation, agent=_agent)


@stats.never_raises
def backoff(seconds: float) -> None:
    """The agent waits this long before retrying the plane."""
    stats.timing("agent.backoff", seconds, agent=_agent)


@stats.never_raises
def leases_received(leases: list[Lease]) -> None:
    now = time.monotonic()
    with _lock:
        for lease in leases:
            _leased_at[lease.work_id] = now
        if len(_leased_at) > 10_000:  # never started (released, refused): forget the oldest
            for work_id in sorted(_leased_at, key=_leased_at.get)[:5_000]:
                del _leased_at[work_id]


@stats.never_raises
def started(lease: Lease) -> None:
    """Lease received -> workload started (confirmed and handed to its runner)."""
    with _lock:
        since = _leased_at.pop(lease.work_id, None)
    if since is not None:
        stats.timing("agent.lease_to_start", time.monotonic() - since, queue=lease.queue, agent=_agent)


@stats.never_raises
def not_started(lease: Lease) -> None:
    with _lock:
        _leased_at.pop(lease.work_id, None)


@stats.never_raises
def finished(lease: Lease, outcome: str, killed: bool) -> None:
    """A workload ended: ``success``, ``failed``, or ``killed`` (taken away by the plane or at shutdown)."""
    stats.incr("agent.workloads", outcome="killed" if killed else outcome, kind=lease.kind, queue=lease.queue,
               agent=_agent)
    if killed:  # its runner is stopped, not reused
        runner_restart("killed")


@stats.never_raises
def runner_restart(why: str) -> None:
    """A warm runner process was replaced: it ``died`` while idle, or was ``killed`` with its workload."""
    stats.incr("agent.runner_restarts", reason=why, agent=_agent)


@stats.never_raises
def sentinel(status: str, checks: list, agent_status: Callable[[], object]) -> None:
    """The sentinel's aggregate (0 ok, 1 degraded, 2 failing) and each check (1 ok, 0 failing; skipped
    checks are not sent). The sentinel is its own process: the agent's name is in its status file, which
    ``agent_status`` reads (a damaged file costs the name, not the report)."""
    try:
        _named(getattr(agent_status(), "name", None))
    except (OSError, ValueError):
        pass  # unreadable or damaged: the last name known
    stats.gauge("sentinel.status", STATUS_VALUES.get(status, 2), agent=_agent)
    for check in checks:
        if not getattr(check, "skipped", False):
            stats.gauge("sentinel.check", int(bool(check.ok)), check=check.name, agent=_agent)
