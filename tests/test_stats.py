"""The Prometheus side of ``stats``: with the endpoint on, each metric of the process is served as
Prometheus text over real HTTP (counters ``_total``, gauges, timers as histograms in seconds, tags as
labels), parsed here by ``prometheus_client``'s own parser."""

from __future__ import annotations

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from airflow_remote_execution import stats
from airflow_remote_execution.agent import metrics
from airflow_remote_execution.wire.api import Lease


@pytest.fixture
def endpoint(monkeypatch):
    monkeypatch.setattr(stats, "_prom", None)
    monkeypatch.setattr(metrics, "_agent", "unregistered")
    host, port = stats.serve_prometheus("127.0.0.1", 0)
    yield f"http://{host}:{port}/metrics"


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    r = requests.get(url, timeout=10)
    r.raise_for_status()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def test_counters_gauges_and_timers_are_served_with_tags_as_labels(endpoint):
    metrics._named("eu-1")
    lease = Lease(work_id=7, fence=1, kind="task", queue="gpu", workload={})
    metrics.leases_received([lease])
    metrics.started(lease)
    metrics.finished(lease, "success", killed=False)
    metrics.finished(lease, "success", killed=False)
    metrics.finished(lease, "failed", killed=True)
    metrics.plane_error("lease")
    metrics.backoff(3.0)
    stats.gauge("agent.slots_free", 3, agent="eu-1")
    stats.gauge("agent.slots_free", 2, agent="eu-1")
    got = scrape(endpoint)
    work = (("agent", "eu-1"), ("kind", "task"), ("outcome", "success"), ("queue", "gpu"))
    assert got[("remote_execution_agent_workloads_total", work)] == 2
    killed = (("agent", "eu-1"), ("kind", "task"), ("outcome", "killed"), ("queue", "gpu"))
    assert got[("remote_execution_agent_workloads_total", killed)] == 1
    assert got[("remote_execution_agent_runner_restarts_total", (("agent", "eu-1"), ("reason", "killed")))] == 1
    assert got[("remote_execution_agent_plane_errors_total", (("agent", "eu-1"), ("operation", "lease")))] == 1
    assert got[("remote_execution_agent_slots_free", (("agent", "eu-1"),))] == 2
    start = (("agent", "eu-1"), ("queue", "gpu"))
    assert got[("remote_execution_agent_lease_to_start_seconds_count", start)] == 1
    assert got[("remote_execution_agent_backoff_seconds_count", (("agent", "eu-1"),))] == 1
    assert got[("remote_execution_agent_backoff_seconds_sum", (("agent", "eu-1"),))] == pytest.approx(3.0, abs=0.5)
    # histogram buckets in seconds: a 3 s backoff is above 2.5 and within 5
    assert got[("remote_execution_agent_backoff_seconds_bucket", (("agent", "eu-1"), ("le", "2.5")))] == 0
    assert got[("remote_execution_agent_backoff_seconds_bucket", (("agent", "eu-1"), ("le", "5.0")))] == 1


def test_label_values_are_the_statsd_tags_and_a_bad_call_raises_nothing(endpoint):
    stats.incr("work.requeued", queue='we"ird\nq', reason="lost_agent")
    stats.incr("work.requeued", queue="x")  # other label names than the family's: skipped, never raised
    got = scrape(endpoint)
    assert got[("remote_execution_work_requeued_total", (("queue", "we_ird_q"), ("reason", "lost_agent")))] == 1


def test_nothing_is_recorded_without_the_endpoint(monkeypatch):
    monkeypatch.setattr(stats, "_prom", None)
    stats.incr("agent.plane_errors", operation="lease", agent="a")
    assert stats._prom is None


def test_a_process_forked_after_the_endpoint_started_does_not_hold_its_port(monkeypatch):
    """The worker forks its runners after it starts the endpoint: a runner outliving a dead worker must not
    keep the port bound (the restarted worker could not serve it)."""
    import os
    import socket

    monkeypatch.setattr(stats, "_prom", None)
    host, port = stats.serve_prometheus("127.0.0.1", 0)
    read, write = os.pipe()
    ready_read, ready_write = os.pipe()
    child = os.fork()
    if child == 0:  # a runner (its fork handlers ran before fork() returned here): says so, waits to end
        os.write(ready_write, b"r")
        os.read(read, 1)
        os._exit(0)
    os.close(read)
    try:
        assert os.read(ready_read, 1) == b"r"
        listening = [fd for fd in os.listdir(f"/proc/{child}/fd") if _is_listening_on(child, fd, port)]
        assert not listening, "the forked process kept the endpoint's listening socket"
    finally:
        os.write(write, b"x")
        os.waitpid(child, 0)
    with socket.create_connection((host, port), timeout=5):  # the parent still serves it
        pass


def _is_listening_on(pid: int, fd: str, port: int) -> bool:
    import os

    try:
        target = os.readlink(f"/proc/{pid}/fd/{fd}")
    except OSError:
        return False
    if not target.startswith("socket:["):
        return False
    inode = target[len("socket:["):-1]
    with open(f"/proc/{pid}/net/tcp") as f:
        rows = [line.split() for line in f.readlines()[1:]]
    return any(r[9] == inode and r[3] == "0A" and int(r[1].split(":")[1], 16) == port for r in rows)
