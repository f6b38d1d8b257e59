"""The plane's metrics: fleet figures from a real database, events sent to a real StatsD listener through
Airflow's facade, and the autoscaling and Prometheus routes with their read-only metrics token."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections import Counter
from datetime import timedelta

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import delete, update
from starlette.testclient import TestClient

from airflow.models.taskinstancekey import TaskInstanceKey
from airflow.sdk import timezone
from airflow.utils.session import create_session

from airflow_remote_execution import stats
from airflow_remote_execution.models import AgentModel, WorkItemModel
from airflow_remote_execution.models.tables import EventCountModel, MetricsTokenModel
from airflow_remote_execution.plane import agents, leases, metrics, metrics_tokens, tokens
from airflow_remote_execution.plane.api.app import create_app
from airflow_remote_execution.wire.api import RegisterRequest, SentinelCheck, SentinelReport
from statsd_listener import StatsdListener

pytestmark = pytest.mark.usefixtures("airflow_db")


@pytest.fixture(autouse=True)
def no_metrics_tokens(airflow_db):
    with airflow_db.begin() as conn:
        conn.execute(delete(MetricsTokenModel))
    yield


@pytest.fixture
def statsd(monkeypatch):
    """Airflow's [metrics] StatsD settings pointing at a real UDP listener; the facade re-reads them."""
    listener = StatsdListener()
    for key, value in listener.env().items():
        monkeypatch.setenv(key, value)
    stats.reset()
    yield listener
    listener.close()
    stats.reset()  # the next test starts from its own [metrics]


class OtlpReceiver:
    """A real OTLP/HTTP metrics receiver on loopback: decodes what Airflow's OpenTelemetry exporter POSTs."""

    def __init__(self) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.points: list[tuple[str, dict, float | None]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                receiver.decode(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def decode(self, body: bytes) -> None:
        from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest

        request = ExportMetricsServiceRequest()
        request.ParseFromString(body)
        for resource in request.resource_metrics:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    for point in getattr(metric, metric.WhichOneof("data")).data_points:
                        attributes = {a.key: a.value.string_value for a in point.attributes}
                        try:
                            which = point.WhichOneof("value")  # as_int or as_double
                        except ValueError:  # a histogram point has no single value
                            which = None
                        value = getattr(point, which) if which else None
                        self.points.append((metric.name, attributes, value))

    def wait_for(self, name: str, attributes: dict, timeout: float = 15) -> float | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for n, a, v in list(self.points):
                if n == name and a == attributes:
                    return v
            time.sleep(0.1)
        raise AssertionError(f"no {name} {attributes} at the OTLP receiver; got {sorted({p[0] for p in self.points})}")

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def otlp(monkeypatch):
    """Airflow's [metrics] OpenTelemetry settings pointing at a real OTLP/HTTP receiver."""
    receiver = OtlpReceiver()
    monkeypatch.setenv("AIRFLOW__METRICS__OTEL_ON", "True")
    monkeypatch.setenv("AIRFLOW__METRICS__OTEL_HOST", "127.0.0.1")
    monkeypatch.setenv("AIRFLOW__METRICS__OTEL_PORT", str(receiver.server.server_address[1]))
    monkeypatch.setenv("AIRFLOW__METRICS__OTEL_INTERVAL_MILLISECONDS", "200")
    stats.reset()
    yield receiver
    import atexit

    from opentelemetry import metrics as otel_metrics

    from airflow.sdk._shared.observability.metrics import otel_logger

    with contextlib.suppress(Exception):
        otel_metrics.get_meter_provider().shutdown()  # its exporter stops; so must Airflow's flush at exit
    atexit.unregister(otel_logger.flush_otel_metrics)
    stats.reset()
    receiver.close()


@pytest.fixture(autouse=True)
def fresh_figures(monkeypatch):
    """Each test reads the figures it just made (the routes share a snapshot for 2 s), with no failed
    authentications counted against it."""
    from airflow_remote_execution.plane.api import scaling_routes

    monkeypatch.setattr(scaling_routes, "_cache", None)
    monkeypatch.setattr(scaling_routes, "_throttle", scaling_routes._Throttle())


@pytest.fixture(scope="module")
def client():
    with TestClient(create_app(), raise_server_exceptions=True) as c:
        yield c


def key(task: str) -> TaskInstanceKey:
    return TaskInstanceKey(dag_id="d", task_id=task, run_id="r", try_number=1, map_index=-1)


def enqueue(task: str, queue: str) -> None:
    with create_session() as s:
        leases.enqueue(s, key=key(task), kind="task", queue=queue, priority_weight=1, workload=json.dumps({}))


def agent(name: str, queues: list[str], concurrency: int = 4) -> tuple[str, int]:
    with create_session() as s:
        clear, token = tokens.create(s, agent_name=name, queues=queues)
        return clear, agents.register(s, token, RegisterRequest(concurrency=concurrency)).id


def lease(agent_id: int, queues: list[str], slots: int) -> list[WorkItemModel]:
    with create_session() as s:
        return leases.lease(s, s.get(AgentModel, agent_id), queues, slots, 30)


def metrics_token(name: str = "keda") -> str:
    with create_session() as s:
        return metrics_tokens.create(s, name=name)[0]


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


# ------------------------------------------------------------------ figures


def test_snapshot_per_queue_and_suggested_agents():
    for i in range(5):
        enqueue(f"a{i}", "alpha")
    enqueue("b0", "beta")
    _, busy = agent("busy", ["alpha"], concurrency=2)
    agent("idle", ["alpha", "gamma"], concurrency=3)
    _, drained = agent("drained", ["alpha"], concurrency=8)
    with create_session() as s:
        agents.set_drained(s, "drained", True)
        s.execute(update(WorkItemModel).where(WorkItemModel.queue == "beta").values(
            queued_at=timezone.utcnow() - timedelta(seconds=90)))
    taken = lease(busy, ["alpha"], 2)
    with create_session() as s:
        leases.confirm_start(s, s.get(AgentModel, busy), taken[0].id, taken[0].fence)
        s.execute(update(AgentModel).where(AgentModel.id == busy).values(free_slots=0))

    with create_session() as s:
        snap = metrics.snapshot(s, ["empty"])
    alpha, beta, gamma, empty = (snap.queues[q] for q in ("alpha", "beta", "gamma", "empty"))
    assert (alpha.queued, alpha.leased, alpha.running) == (3, 1, 1)
    assert (alpha.agents, alpha.free_slots) == (2, 3)  # the drained agent's 8 slots do not count
    assert (beta.queued, beta.agents, beta.free_slots) == (1, 0, 0)
    assert 89 < beta.oldest_queued_age < 120
    assert (gamma.agents, gamma.free_slots, gamma.queued) == (1, 3, 0)
    assert empty.demand == 0 and empty.suggested_agents(4) == 0  # scale to zero
    assert alpha.suggested_agents(2) == 3 and alpha.suggested_agents(4) == 2 and beta.suggested_agents(4) == 1
    assert snap.agents_by_state == {"active": 3}

    view = metrics.scaling_view(snap, 2, ["alpha", "beta"])
    assert view["queues"]["alpha"]["suggested_agents"] == 3
    assert view["total"]["queued"] == 4 and view["total"]["suggested_agents"] == 3  # ceil(6 / 2)


# ------------------------------------------------------------------ events at a real StatsD listener


def test_plane_events_and_gauges_reach_statsd(statsd, client):
    clear, agent_id = agent("a1", ["default"], concurrency=2)
    enqueue("t1", "default")
    enqueue("t2", "default")
    enqueue("waiting", "nobody-serves")
    with create_session() as s:
        s.execute(update(WorkItemModel).values(queued_at=timezone.utcnow() - timedelta(seconds=3)))
    first, second = lease(agent_id, ["default"], 2)
    statsd.wait_for("airflow.remote_execution.work.queued_to_leased")
    assert statsd.last("airflow.remote_execution.work.queued_to_leased.default") >= 3000  # ms, legacy name

    # Confirmed through the API (leased -> confirmed timer); a stale fence is a fencing conflict.
    r = client.post(f"/v1/work/{first.id}/start", json={"fence": first.fence}, headers=bearer(clear))
    assert r.status_code == 200, r.text
    statsd.wait_for("airflow.remote_execution.work.leased_to_confirmed")
    r = client.post(f"/v1/work/{first.id}/finish", json={"fence": first.fence + 7, "outcome": "success"},
                    headers=bearer(clear))
    assert r.status_code == 409
    assert statsd.wait_for("airflow.remote_execution.lease.conflict.stale_fence") == 1

    # Authentication failures by reason.
    assert client.post("/v1/leases", json={"slots": 1, "wait": 0}).status_code == 401
    assert client.post("/v1/leases", json={"slots": 1, "wait": 0}, headers=bearer("rex_nope")).status_code == 401
    statsd.wait_for("airflow.remote_execution.auth.failed.missing")
    statsd.wait_for("airflow.remote_execution.auth.failed.malformed")

    # Heartbeat handling time; waiting long-polls back to 0 after a lease request.
    r = client.post("/v1/agents/heartbeat", json={"running": [first.id], "free_slots": 1}, headers=bearer(clear))
    assert r.status_code == 200, r.text
    statsd.wait_for("airflow.remote_execution.heartbeat.duration")
    client.post("/v1/leases", json={"slots": 1, "wait": 0}, headers=bearer(clear))
    statsd.wait_for("airflow.remote_execution.lease.long_polls", value=0)
    assert statsd.values("airflow.remote_execution.lease.long_polls") == [1, 0]  # waiting, then done

    # An expired lease and a lost agent put work back in the queue, by reason.
    with create_session() as s:
        s.execute(update(WorkItemModel).where(WorkItemModel.id == second.id).values(
            lease_expires_at=timezone.utcnow() - timedelta(seconds=1)))
        assert leases.requeue_expired_leases(s) == 1
    assert statsd.wait_for("airflow.remote_execution.work.requeued.default.expired_lease") == 1
    again = lease(agent_id, ["default"], 1)
    assert again
    with create_session() as s:
        requeued, failed = leases.reclaim_from_lost(s, s.get(AgentModel, agent_id))
        metrics.agent_lost("a1", failed)
    assert (requeued, failed) == (1, 1)
    assert statsd.wait_for("airflow.remote_execution.work.requeued.default.lost_agent") == 1
    assert statsd.wait_for("airflow.remote_execution.agent.lost.a1") == 1
    assert statsd.wait_for("airflow.remote_execution.work.failed_on_lost_agent.a1") == 1

    # The fleet gauges, as the executor's sync loop sends them.
    metrics.GaugeEmitter().maybe_emit()
    assert statsd.wait_for("airflow.remote_execution.queue.queued.nobody-serves") == 1
    assert statsd.wait_for("airflow.remote_execution.queue.queued.default") == 1
    assert statsd.wait_for("airflow.remote_execution.queue.agents.default") == 1
    assert statsd.wait_for("airflow.remote_execution.queue.free_slots.default") == 1
    assert statsd.last("airflow.remote_execution.queue.oldest_queued_age.nobody-serves") >= 3
    assert statsd.wait_for("airflow.remote_execution.agents.active") == 1
    # Tagged names are sent too (with tags for backends that take them: OpenTelemetry, InfluxDB, Datadog).
    assert {"airflow.remote_execution.queue.queued", "airflow.remote_execution.work.requeued",
            "airflow.remote_execution.auth.failed"} <= statsd.names()


def test_executor_sync_sends_the_gauges(statsd):
    from airflow_remote_execution.executors import RemoteExecutor

    enqueue("x", "sync-queue")
    executor = RemoteExecutor()
    executor.sync()
    assert statsd.wait_for("airflow.remote_execution.queue.queued.sync-queue") == 1


def test_a_queue_that_empties_is_sent_once_as_zero(statsd):
    enqueue("x", "short-lived")
    emitter = metrics.GaugeEmitter()
    emitter.maybe_emit()
    with create_session() as s:
        s.execute(delete(WorkItemModel))
    statsd.wait_for("airflow.remote_execution.queue.queued.short-lived")
    statsd.clear()
    emitter._last = 0
    emitter.maybe_emit()
    statsd.wait_for("airflow.remote_execution.queue.queued.short-lived", value=0)
    statsd.clear()
    emitter._last = 0
    emitter.maybe_emit()
    statsd.wait_for("airflow.remote_execution.agents.active")
    assert "airflow.remote_execution.queue.queued.short-lived" not in statsd.names()


# ------------------------------------------------------------------ autoscaling and Prometheus routes


def test_scaling_route_reads_with_a_metrics_token_only(client, statsd):
    for i in range(5):
        enqueue(f"w{i}", "gpu")
    agent_token, _ = agent("gpu-1", ["gpu"], concurrency=2)
    token = metrics_token()

    r = client.get("/metrics/scaling", params={"slots_per_agent": 2, "queues": "gpu,cpu"}, headers=bearer(token))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["queues"]["gpu"]["queued"] == 5 and body["queues"]["gpu"]["suggested_agents"] == 3
    assert body["queues"]["cpu"] == {"queued": 0, "oldest_queued_age": 0.0, "leased": 0, "running": 0,
                                     "free_slots": 0, "agents": 0, "suggested_agents": 0}
    assert body["total"]["suggested_agents"] == 3 and body["agents"] == {"active": 1}

    # An agent token cannot read the figures; a metrics token cannot act as an agent.
    r = client.get("/metrics/scaling", headers=bearer(agent_token))
    assert r.status_code == 401 and "not a metrics token" in r.json()["detail"]
    statsd.wait_for("airflow.remote_execution.auth.failed.wrong_kind")
    for path, body in (("/v1/leases", {"slots": 1, "wait": 0}), ("/v1/agents/register", {"concurrency": 1})):
        assert client.post(path, json=body, headers=bearer(token)).status_code == 401
    assert client.get("/v1/agents/me", headers=bearer(token)).status_code == 401
    assert client.get("/metrics/scaling").status_code == 401
    assert client.get("/metrics/scaling", headers={"Authorization": "Basic x"}).status_code == 401

    # Malformed parameters are a 422 that names them.
    r = client.get("/metrics/scaling", params={"slots_per_agent": 0}, headers=bearer(token))
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["query", "slots_per_agent"]
    r = client.get("/metrics/scaling", params={"queues": ",".join(f"q{i}" for i in range(101))}, headers=bearer(token))
    assert r.status_code == 422 and "at most 100" in r.json()["detail"]

    for bad in ("abc", str(2**70), "-1", "NaN", ""):
        r = client.get("/metrics/scaling", params={"slots_per_agent": bad}, headers=bearer(token))
        assert r.status_code == 422, (bad, r.status_code)
    r = client.get("/metrics/scaling", params={"queues": "q" * 5000}, headers=bearer(token))
    assert r.status_code == 422
    r = client.get("/metrics/prometheus", headers={"Authorization": "Bearer " + "x" * 100_000})
    assert r.status_code == 401 and len(r.text) < 1000

    # Revoked: refused.
    with create_session() as s:
        metrics_tokens.revoke(s, token.split("_")[1])
    r = client.get("/metrics/scaling", headers=bearer(token))
    assert r.status_code == 401 and "revoked" in r.json()["detail"]


def test_prometheus_text_parses(client):
    enqueue("p1", 'odd"queue')
    enqueue("p2", "default")
    agent("prom-agent", ["default"], concurrency=3)
    _, quiet = agent("quiet-agent", ["other"], concurrency=2)
    with create_session() as s:
        report = SentinelReport(status="degraded", interval=15, checks=[
            SentinelCheck(name="agent_alive", ok=True), SentinelCheck(name="disk", ok=False, detail="97% full"),
            SentinelCheck(name="secrets", ok=True, skipped=True)])
        agents.record_sentinel(s, s.get(AgentModel, quiet), report)
        s.execute(update(AgentModel).where(AgentModel.id == quiet).values(free_slots=1))
    r = client.get("/metrics/prometheus", params={"slots_per_agent": 2}, headers=bearer(metrics_token("prometheus")))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(r.text) for s in family.samples
    }
    assert samples[("remote_execution_queue_queued", (("queue", 'odd"queue'),))] == 1
    assert samples[("remote_execution_queue_suggested_agents", (("queue", "default"),))] == 1
    assert samples[("remote_execution_queue_free_slots", (("queue", "default"),))] == 3
    assert samples[("remote_execution_agents", (("state", "active"),))] == 2
    assert samples[("remote_execution_agents", (("state", "lost"),))] == 0
    # Each agent's health, from its heartbeats and its sentinel's last report.
    assert samples[("remote_execution_agent_up", (("agent", "quiet-agent"), ("drained", "false"), ("state", "active")))] == 1
    assert samples[("remote_execution_agent_slots_used", (("agent", "quiet-agent"),))] == 1
    assert samples[("remote_execution_agent_slots_free", (("agent", "prom-agent"),))] == 3
    assert samples[("remote_execution_agent_heartbeat_age_seconds", (("agent", "prom-agent"),))] < 60
    assert samples[("remote_execution_sentinel_status", (("agent", "quiet-agent"),))] == 1
    assert samples[("remote_execution_sentinel_check", (("agent", "quiet-agent"), ("check", "disk")))] == 0
    assert samples[("remote_execution_sentinel_check", (("agent", "quiet-agent"), ("check", "agent_alive")))] == 1
    assert ("remote_execution_sentinel_check", (("agent", "quiet-agent"), ("check", "secrets"))) not in samples
    assert ("remote_execution_sentinel_status", (("agent", "prom-agent"),)) not in samples  # no report


def test_metrics_token_lifecycle_and_bad_input():
    with create_session() as s:
        clear, row = metrics_tokens.create(s, name="keda", expires_in="1h")
        assert clear.startswith(f"rexm_{row.id}_")
        assert metrics_tokens.verify(s, f"Bearer {clear}").id == row.id
        with pytest.raises(ValueError, match="Invalid name"):
            metrics_tokens.create(s, name="no spaces")
        with pytest.raises(tokens.TokenError, match="no such token"):
            metrics_tokens.verify(s, f"Bearer {clear[:-1]}A" if not clear.endswith("A") else f"Bearer {clear[:-1]}B")
        s.execute(update(MetricsTokenModel).values(expires_at=timezone.utcnow() - timedelta(seconds=1)))
        with pytest.raises(tokens.TokenError, match="expired"):
            metrics_tokens.verify(s, f"Bearer {clear}")


def test_opentelemetry_gets_the_same_metrics_with_tags_as_attributes(otlp):
    """Airflow's OpenTelemetry settings work unchanged: names as for StatsD, tags as attributes."""
    enqueue("o1", "otel-queue")
    metrics.GaugeEmitter().maybe_emit()
    metrics.requeued(["otel-queue"], "lost_agent")
    metrics.lease_conflict("Stale fencing token 3 for work item 1: the current lease is 4")
    assert otlp.wait_for("airflow.remote_execution.queue.queued", {"queue": "otel-queue"}) == 1
    assert otlp.wait_for("airflow.remote_execution.work.requeued", {"queue": "otel-queue", "reason": "lost_agent"}) == 1
    assert otlp.wait_for("airflow.remote_execution.lease.conflict", {"reason": "stale_fence"}) == 1


def test_failed_metrics_tokens_are_throttled(client, statsd, monkeypatch):
    monkeypatch.setenv("AIRFLOW__REMOTE_EXECUTION__AUTH_FAILURE_LIMIT", "2")
    good = metrics_token()
    codes = [client.get("/metrics/scaling", headers=bearer("rexm_wrong")).status_code for _ in range(3)]
    assert codes == [401, 401, 429]
    r = client.get("/metrics/prometheus", headers=bearer(good))
    assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1 and "metrics token" in r.json()["detail"]
    assert statsd.wait_for("airflow.remote_execution.auth.failed.throttled", value=1)


def test_throttled_authentications_are_counted(statsd, monkeypatch):
    monkeypatch.setenv("AIRFLOW__REMOTE_EXECUTION__AUTH_FAILURE_LIMIT", "2")
    with TestClient(create_app()) as own:  # its own admission state: the throttle stays in this test
        codes = [own.post("/v1/leases", json={"slots": 1, "wait": 0}, headers=bearer("rex_bad")).status_code
                 for _ in range(3)]
    assert codes == [401, 401, 429]
    assert statsd.wait_for("airflow.remote_execution.auth.failed.throttled") == 1
    assert statsd.values("airflow.remote_execution.auth.failed.malformed") == [1, 1]


def test_metrics_tokens_cli(capsys):
    import argparse

    from airflow_remote_execution.cli import metrics_commands as cli

    cli.metrics_tokens_create(argparse.Namespace(name="keda", expires_in="30d", description="KEDA", output="json"))
    created = json.loads(capsys.readouterr().out)
    assert created["token"].startswith(f"rexm_{created['id']}_") and created["name"] == "keda"
    with pytest.raises(SystemExit, match="Invalid name"):
        cli.metrics_tokens_create(argparse.Namespace(name="a b", expires_in=None, description=None, output="json"))
    cli.metrics_tokens_list(argparse.Namespace(output="json"))
    (listed,) = json.loads(capsys.readouterr().out)
    assert listed["id"] == created["id"] and listed["status"] == "active" and "token" not in listed
    assert "secret_hash" not in listed
    cli.metrics_tokens_revoke(argparse.Namespace(token_id=created["id"]))
    assert "revoked" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="No metrics token"):
        cli.metrics_tokens_revoke(argparse.Namespace(token_id="0" * 16))
    with create_session() as s, pytest.raises(tokens.TokenError, match="revoked"):
        metrics_tokens.verify(s, f"Bearer {created['token']}")


def test_polls_within_two_seconds_share_one_snapshot(client):
    token = metrics_token()
    enqueue("c1", "cached")
    first = client.get("/metrics/scaling", params={"queues": "cached"}, headers=bearer(token)).json()
    enqueue("c2", "cached")
    again = client.get("/metrics/scaling", params={"queues": "cached"}, headers=bearer(token)).json()
    assert first["queues"]["cached"]["queued"] == again["queues"]["cached"]["queued"] == 1
    assert first["taken_at"] == again["taken_at"]
    # A bad token is still refused while the snapshot is shared.
    assert client.get("/metrics/scaling", headers=bearer(token[:-2] + "xx")).status_code == 401


def test_a_broken_metric_never_breaks_the_transition_it_measures():
    class Odd:  # a row with what a hook does not expect
        queue = "q"
        queued_at = "not a datetime"
        leased_at = started_at = 7

    metrics.leased([Odd()], timezone.utcnow())
    metrics.confirmed(Odd())
    metrics.requeued(None, "expired_lease")


# ------------------------------------------------------------------ cluster-wide event counters (database)


def _db_agent(db, name: str, queues: list[str]) -> int:
    with db.session() as s:
        _, token = tokens.create(s, agent_name=name, queues=queues)
        return agents.register(s, token, RegisterRequest(concurrency=4)).id


def _db_enqueue(db, task: str, queue: str) -> None:
    with db.session() as s:
        leases.enqueue(s, key=key(task), kind="task", queue=queue, priority_weight=1, workload=json.dumps({}))


def _db_counts(db) -> dict[tuple[str, str, str], int]:
    with db.session() as s:
        return metrics.event_counts(s)


@pytest.fixture
def no_event_counts(db):
    with db.engine.begin() as conn:
        conn.execute(delete(EventCountModel))
    yield
    with db.engine.begin() as conn:
        conn.execute(delete(EventCountModel))


def test_requeues_and_lost_agents_are_counted_in_the_database_with_the_event(db, no_event_counts):
    agent_id = _db_agent(db, "counted", ["q1", "q2"])
    for i in range(3):
        _db_enqueue(db, f"c{i}", "q1")
    _db_enqueue(db, "c3", "q2")
    with db.session() as s:
        taken = leases.lease(s, s.get(AgentModel, agent_id), ["q1", "q2"], 4, 30)
        leases.confirm_start(s, s.get(AgentModel, agent_id), taken[0].id, taken[0].fence)
    running_queue = taken[0].queue
    # Expired leases: two, counted by queue, one upsert per queue and event.
    with db.session() as s:
        s.execute(update(WorkItemModel).where(WorkItemModel.id.in_([t.id for t in taken[1:3]])).values(
            lease_expires_at=timezone.utcnow() - timedelta(seconds=1)))
        assert leases.requeue_expired_leases(s) == 2
    expired = Counter(t.queue for t in taken[1:3])
    counts = _db_counts(db)
    for queue, n in expired.items():
        assert counts[("work_requeued", queue, "expired_lease")] == n
    # An event whose transaction rolls back is not counted.
    with contextlib.suppress(RuntimeError), db.session() as s:
        s.execute(update(WorkItemModel).where(WorkItemModel.id == taken[3].id).values(
            lease_expires_at=timezone.utcnow() - timedelta(seconds=1)))
        assert leases.requeue_expired_leases(s) == 1
        raise RuntimeError("the transition fails after the requeue")
    assert _db_counts(db) == counts
    # The agent is lost: its unstarted lease requeued, its running work failed, and the agent counted.
    with db.session() as s:
        assert leases.reclaim_from_lost(s, s.get(AgentModel, agent_id)) == (1, 1)
    counts = _db_counts(db)
    assert counts[("work_requeued", taken[3].queue, "lost_agent")] == 1
    assert counts[("agent_lost", "", "")] == 1
    assert counts[("work_failed_on_lost_agent", running_queue, "")] == 1
    # Requeued again later: the same row grows.
    with db.session() as s:
        again = leases.lease(s, s.get(AgentModel, agent_id), [taken[3].queue], 1, 30)
        leases.reclaim_from_lost(s, s.get(AgentModel, agent_id))
    assert len(again) == 1
    assert _db_counts(db)[("work_requeued", taken[3].queue, "lost_agent")] == 2
    assert _db_counts(db)[("agent_lost", "", "")] == 2
    # A restarted agent's work is requeued as such; no agent is counted lost for it.
    with db.session() as s:
        leases.lease(s, s.get(AgentModel, agent_id), [taken[3].queue], 1, 30)
        leases.reclaim_from_lost(s, s.get(AgentModel, agent_id), why="restarted")
    counts = _db_counts(db)
    assert counts[("work_requeued", taken[3].queue, "agent_restarted")] == 1
    assert counts[("agent_lost", "", "")] == 2


def test_concurrent_counts_from_many_sessions_add_up(db, no_event_counts):
    def bump() -> None:
        for _ in range(20):
            with db.session() as s:
                metrics.count_event(s, "work_requeued", 1, queue="busy", reason="expired_lease")

    threads = [threading.Thread(target=bump) for _ in range(4 if db.name == "postgresql" else 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert _db_counts(db)[("work_requeued", "busy", "expired_lease")] == 20 * len(threads)


def test_prometheus_serves_the_cluster_wide_counters(client, airflow_db):
    """Counts another process wrote (here straight into the table) and a conflict refused by this api-server
    (counted after its rolled-back request, by the process's counting thread) are served as counters."""
    with airflow_db.begin() as conn:
        conn.execute(delete(EventCountModel))
    with create_session() as s:
        metrics.count_event(s, "work_requeued", 3, queue="gpu", reason="lost_agent")
        metrics.count_event(s, "agent_lost", 2)
        metrics.count_event(s, "work_failed_on_lost_agent", 1, queue="gpu")
    clear, agent_id = agent("conflicted", ["default"])
    enqueue("x1", "default")
    [item] = lease(agent_id, ["default"], 1)
    r = client.post(f"/v1/work/{item.id}/start", json={"fence": item.fence + 1}, headers=bearer(clear))
    assert r.status_code == 409
    assert metrics.later.flush()
    r = client.get("/metrics/prometheus", headers=bearer(metrics_token("prometheus")))
    assert r.status_code == 200
    families = {family.name: family for family in text_string_to_metric_families(r.text)}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert families["remote_execution_work_requeued"].type == "counter"
    assert samples[("remote_execution_work_requeued_total", (("queue", "gpu"), ("reason", "lost_agent")))] == 3
    assert samples[("remote_execution_agent_lost_total", ())] == 2
    assert samples[("remote_execution_work_failed_on_lost_agent_total", (("queue", "gpu"),))] == 1
    assert samples[("remote_execution_lease_conflict_total", (("reason", "stale_fence"),))] == 1
    # This api-server's own timers, as histograms in seconds (the lease above, in this process).
    assert families["remote_execution_work_queued_to_leased_seconds"].type == "histogram"
    assert samples[("remote_execution_work_queued_to_leased_seconds_count", (("queue", "default"),))] >= 1
    with airflow_db.begin() as conn:
        conn.execute(delete(EventCountModel))
