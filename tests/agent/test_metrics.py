"""The agent's metrics at a real StatsD listener, sent from the agent's own parts (status publisher, runner
pool, worker hooks, sentinel) with Airflow's [metrics] settings of the agent."""

from __future__ import annotations

import os
import signal

import pytest

from airflow_remote_execution import stats
from airflow_remote_execution.agent import metrics
from airflow_remote_execution.agent.runners import RunnerPool
from airflow_remote_execution.agent.sentinel import CheckResult, aggregate
from airflow_remote_execution.agent.status import StatusPublisher, WorkerFigures
from airflow_remote_execution.agent.worker import backoff
from airflow_remote_execution.wire.api import Lease
from statsd_listener import StatsdListener


@pytest.fixture
def statsd(monkeypatch):
    listener = StatsdListener()
    for key, value in listener.env(prefix="agent").items():
        monkeypatch.setenv(key, value)
    stats.reset()
    monkeypatch.setattr(metrics, "_agent", "unregistered")
    yield listener
    listener.close()
    stats.reset()


def figures(name: str | None, free: int, running: int) -> WorkerFigures:
    return WorkerFigures(name=name, running=running, concurrency=4, free_slots=free, paused=False, stopping=False,
                         heartbeat_interval=5, long_poll_wait=20, request_timeout=30)


def test_status_publisher_sends_slots_under_the_agent_name(statsd, tmp_path):
    publisher = StatusPublisher(tmp_path / "status.json")
    publisher.publish(figures(None, 4, 0))
    assert statsd.wait_for("agent.remote_execution.agent.slots_free.unregistered") == 4
    publisher.publish(figures("eu-1", 1, 3))
    assert statsd.wait_for("agent.remote_execution.agent.slots_used.eu-1") == 3
    assert statsd.wait_for("agent.remote_execution.agent.slots_free.eu-1") == 1
    assert statsd.wait_for("agent.remote_execution.agent.running.eu-1") == 3
    publisher.error("heartbeat", "plane not reachable")
    assert statsd.wait_for("agent.remote_execution.agent.plane_errors.heartbeat.eu-1") == 1


def test_backoff_lease_to_start_and_outcomes(statsd):
    metrics._named("eu-2")
    delay = backoff(3)
    assert statsd.wait_for("agent.remote_execution.agent.backoff.eu-2") == pytest.approx(delay * 1000, abs=1)
    lease = Lease(work_id=7, fence=1, kind="task", queue="gpu", workload={})
    metrics.leases_received([lease])
    metrics.started(lease)
    assert statsd.wait_for("agent.remote_execution.agent.lease_to_start.gpu.eu-2") >= 0
    metrics.started(lease)  # once per lease
    assert len(statsd.values("agent.remote_execution.agent.lease_to_start.gpu.eu-2")) == 1
    metrics.finished(lease, "success", killed=False)
    metrics.finished(lease, "failed", killed=True)
    assert statsd.wait_for("agent.remote_execution.agent.workloads.success.task.gpu.eu-2") == 1
    assert statsd.wait_for("agent.remote_execution.agent.workloads.killed.task.gpu.eu-2") == 1
    assert statsd.wait_for("agent.remote_execution.agent.runner_restarts.killed.eu-2") == 1


def test_a_dead_idle_runner_is_counted_as_restarted(statsd):
    pool = RunnerPool(1)
    try:
        pool.fill()
        dead = pool._idle[0]
        os.kill(dead.pid, signal.SIGKILL)
        dead.process.join(10)
        runner = pool.take()
        assert runner is not dead
        runner.stop()
    finally:
        pool.close()
    assert statsd.wait_for("agent.remote_execution.agent.runner_restarts.died.unregistered") == 1


def test_sentinel_check_states(statsd):
    evaluation = aggregate([CheckResult("agent_alive", True, "up"), CheckResult("disk", False, "full"),
                            CheckResult("secrets", True, "not configured", skipped=True)])
    metrics.sentinel(evaluation.status, evaluation.checks, lambda: WorkerFigures(
        name="eu-3", running=0, concurrency=1, free_slots=1, paused=False, stopping=False, heartbeat_interval=5,
        long_poll_wait=20, request_timeout=30))
    assert statsd.wait_for("agent.remote_execution.sentinel.check.agent_alive.eu-3") == 1
    assert statsd.wait_for("agent.remote_execution.sentinel.check.disk.eu-3") == 0
    assert statsd.wait_for("agent.remote_execution.sentinel.status.eu-3") == metrics.STATUS_VALUES[evaluation.status]
    assert "agent.remote_execution.sentinel.check.secrets.eu-3" not in statsd.names()


def test_a_damaged_status_file_keeps_the_sentinel_metrics(statsd):
    metrics._named("eu-4")

    def damaged():
        raise ValueError("not JSON")

    metrics.sentinel("ok", [CheckResult("agent_alive", True, "up")], damaged)
    assert statsd.wait_for("agent.remote_execution.sentinel.status.eu-4") == 0


# ------------------------------------------------------------------ Prometheus endpoints (agent_metrics_port)


def test_the_worker_endpoint_follows_the_option(monkeypatch):
    import requests

    from localplane import free_port

    monkeypatch.setattr(stats, "_prom", None)
    monkeypatch.setattr(metrics, "_agent", "unregistered")  # whatever an earlier test of this process registered
    monkeypatch.setenv("AIRFLOW__REMOTE_EXECUTION__AGENT_METRICS_PORT", "0")
    assert metrics.serve_from_config() is None and stats._prom is None  # off: nothing recorded either
    port = free_port()
    monkeypatch.setenv("AIRFLOW__REMOTE_EXECUTION__AGENT_METRICS_PORT", str(port))
    monkeypatch.setenv("AIRFLOW__REMOTE_EXECUTION__AGENT_METRICS_HOST", "127.0.0.1")
    assert metrics.serve_from_config() == ("127.0.0.1", port)
    metrics.plane_error("heartbeat")
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    assert 'remote_execution_agent_plane_errors_total{agent="unregistered",operation="heartbeat"} 1.0' in text
    with pytest.raises(SystemExit, match="agent_metrics_port"):  # the port is taken: a clear error at start
        metrics.serve_from_config()


def test_the_sentinel_serves_its_checks_on_its_probe_port(monkeypatch, tmp_path):
    """The sentinel is a process of its own: with the endpoint on, its probe server answers /metrics."""
    import requests

    from airflow_remote_execution.agent.client import PlaneClient
    from airflow_remote_execution.agent.sentinel import Sentinel
    from localplane import wait_for

    monkeypatch.setattr(stats, "_prom", None)
    monkeypatch.setattr(metrics, "_agent", "unregistered")  # whatever an earlier test of this process registered
    monkeypatch.setenv("AIRFLOW__REMOTE_EXECUTION__STATUS_FILE", str(tmp_path / "status.json"))
    monkeypatch.setenv("AIRFLOW__REMOTE_EXECUTION__AGENT_METRICS_PORT", "9")
    monkeypatch.setattr(Sentinel, "integration_names", lambda self: [])
    sentinel = Sentinel(PlaneClient("http://127.0.0.1:9", "rex_x", timeout=1), report_interval=0.2)
    host, port = sentinel.start("127.0.0.1", 0)
    try:
        def scraped() -> str | None:
            text = requests.get(f"http://{host}:{port}/metrics", timeout=10).text
            return text if 'remote_execution_sentinel_check{agent="unregistered",check="agent_alive"} 0.0' in text else None

        text = wait_for(scraped, 30, "the sentinel's checks on /metrics")
        assert 'remote_execution_sentinel_status{agent="unregistered"} 2.0' in text  # no agent: failing
    finally:
        sentinel.shutdown()
    monkeypatch.setenv("AIRFLOW__REMOTE_EXECUTION__AGENT_METRICS_PORT", "0")
    monkeypatch.setattr(stats, "_prom", None)
    off = Sentinel(PlaneClient("http://127.0.0.1:9", "rex_x", timeout=1), report_interval=60)
    host, port = off.start("127.0.0.1", 0)
    try:
        assert requests.get(f"http://{host}:{port}/metrics", timeout=10).status_code == 404
    finally:
        off.shutdown()
