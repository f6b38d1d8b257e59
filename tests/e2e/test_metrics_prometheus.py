"""
Fleet metrics end to end, with real receivers: a real Prometheus (Debian's ``prometheus``) scrapes the
plane's ``/remote_execution/metrics/prometheus`` with a read-only metrics token, and a StatsD listener on
loopback UDP receives what the plane (scheduler, api-server) and the agents send through Airflow's own
``[metrics]`` settings.

Six tasks are queued on a queue no agent serves: the queue-depth gauge rises in Prometheus and the
suggested agent count follows (ceil(6 / 2 slots) = 3). The test then makes the scale decision an
autoscaler would, from ``/metrics/scaling`` (the JSON KEDA reads): it starts that many agents, and the
gauges fall back to zero as they run the work.

Prometheus also scrapes each agent's own ``/metrics`` (``agent_metrics_port``) and the sentinel's: the
agents' counters and timers (workloads by outcome, lease -> start) arrive there. Then an agent dies holding
leased, unstarted work: the scheduler declares it lost and requeues the work, and those scheduler events
reach Prometheus through the api-server's cluster-wide counters.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

import pytest
import requests

from localplane import AIRFLOW, Agent, Plane, Proc, free_port, fresh_pg_database, wait_for
from statsd_listener import StatsdListener

pytestmark = pytest.mark.e2e
DAGS = Path(__file__).parent / "dags"
DAG, QUEUE, WIDTH, SLOTS = "remote_fleet_fanout", "fleet", 6, 2
PROMETHEUS = shutil.which("prometheus")


class Prometheus:
    """A real Prometheus server scraping the plane every second."""

    def __init__(self, base: Path, plane_port: int, token: str, agent_ports: list[int], sentinel_port: int) -> None:
        base.mkdir(parents=True, exist_ok=True)
        (base / "token").write_text(token)
        (base / "prometheus.yml").write_text(json.dumps({  # JSON is YAML
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [{
                "job_name": "remote_execution",
                "metrics_path": "/remote_execution/metrics/prometheus",
                "params": {"slots_per_agent": [str(SLOTS)]},
                "authorization": {"type": "Bearer", "credentials_file": str(base / "token")},
                "static_configs": [{"targets": [f"127.0.0.1:{plane_port}"]}],
            }, {  # the agents' own endpoints, as a pod annotation or PodMonitor would point at them
                "job_name": "agents",
                "static_configs": [{"targets": [f"127.0.0.1:{p}" for p in agent_ports]}],
            }, {
                "job_name": "sentinel",
                "static_configs": [{"targets": [f"127.0.0.1:{sentinel_port}"]}],
            }],
        }))
        self.port = free_port()
        self.log = open(base / "prometheus.log", "ab")
        self.proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={base / 'prometheus.yml'}", f"--storage.tsdb.path={base / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self.log, stderr=subprocess.STDOUT,
        )
        self.url = f"http://127.0.0.1:{self.port}"
        wait_for(lambda: requests.get(f"{self.url}/-/ready", timeout=2).ok, 60, "prometheus ready")

    def value(self, query: str) -> float | None:
        r = requests.get(f"{self.url}/api/v1/query", params={"query": query}, timeout=5)
        r.raise_for_status()
        result = r.json()["data"]["result"]
        return float(result[0]["value"][1]) if result else None

    def wait_value(self, query: str, expected: float, timeout: float = 120) -> None:
        wait_for(lambda: self.value(query) == expected, timeout, f"{query} == {expected} in Prometheus", 0.5)

    def target_health(self) -> str:
        targets = requests.get(f"{self.url}/api/v1/targets", timeout=5).json()["data"]["activeTargets"]
        return ", ".join(f"{t['health']} {t.get('lastError', '')}" for t in targets)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, pg_url):
    if PROMETHEUS is None:
        pytest.fail("prometheus is not installed: scripts/system-deps.sh installs it")
    base = tmp_path_factory.mktemp("fleet-metrics")
    dags = base / "dags"
    dags.mkdir()
    shutil.copy(DAGS / f"{DAG}.py", dags)
    statsd = StatsdListener()
    # Unconfirmed leases wait 60 s: a dead agent's unstarted work is reclaimed as the agent's (lost, ~15 s).
    plane = Plane(base / "plane", db_url=fresh_pg_database(pg_url, "fleet_metrics"), dags_folder=dags,
                  extra_env={**statsd.env(prefix="plane"), "AIRFLOW__REMOTE_EXECUTION__LEASE_CONFIRM_TIMEOUT": "60"})
    ports = {"agents": [free_port() for _ in range(3)], "sentinel": free_port()}
    agents: list[Agent] = []
    prometheus = None
    try:
        plane.start()
        out = plane.airflow("remote-execution", "metrics-tokens", "create", "--name", "prometheus", "--output", "json")
        token = json.loads(out.stdout.strip().splitlines()[-1])["token"]
        prometheus = Prometheus(base / "prometheus", plane.port, token, ports["agents"], ports["sentinel"])
        yield plane, prometheus, statsd, token, agents, dags, base, ports
    finally:
        for agent in agents:
            if getattr(agent, "sentinel", None):
                agent.sentinel.stop()
            agent.stop()
        if prometheus:
            print(f"--- prometheus targets: {prometheus.target_health()}")
            prometheus.stop()
        plane.stop()
        statsd.close()
        for proc in [*plane.history, *(a.proc for a in agents if a.proc)]:
            print(f"--- {proc.name}\n{proc.tail(30)}")


def test_queue_depth_and_suggested_agents_drive_a_scale_up(fleet):
    plane, prometheus, statsd, token, agents, dags, base, ports = fleet
    queued = f'remote_execution_queue_queued{{queue="{QUEUE}"}}'
    suggested = f'remote_execution_queue_suggested_agents{{queue="{QUEUE}"}}'

    run_id = plane.trigger(DAG, conf={"seconds": 4})
    # No agent serves the queue: the work waits, Prometheus sees the depth and the suggested agent count.
    prometheus.wait_value(queued, WIDTH)
    prometheus.wait_value(suggested, math.ceil(WIDTH / SLOTS))
    assert prometheus.value(f'remote_execution_queue_agents{{queue="{QUEUE}"}}') == 0
    assert prometheus.value(f'remote_execution_queue_oldest_queued_age{{queue="{QUEUE}"}}') > 0

    # The scale decision, from the JSON KEDA's metrics-api scaler reads (valueLocation: total.suggested_agents).
    r = requests.get(f"{plane.url}/remote_execution/metrics/scaling", params={"slots_per_agent": SLOTS, "queues": QUEUE},
                     headers={"Authorization": f"Bearer {token}"}, timeout=30)
    r.raise_for_status()
    want = r.json()["total"]["suggested_agents"]
    assert want == 3, r.json()
    for i in range(want):
        name = f"fleet-{i}"
        own_metrics = {"AIRFLOW__REMOTE_EXECUTION__AGENT_METRICS_PORT": str(ports["agents"][i]),
                       "AIRFLOW__REMOTE_EXECUTION__AGENT_METRICS_HOST": "127.0.0.1"}
        agents.append(Agent(name, base / name, plane.url, plane.create_agent_token(name, QUEUE), concurrency=SLOTS,
                            dags_folder=dags, extra_env={**statsd.env(prefix="agent"), **own_metrics}).start())
    for agent in agents:
        agent.wait_registered()
    # A sentinel beside the first agent: its checks reach Prometheus through the plane, and StatsD directly.
    sentinel = Proc("sentinel-fleet-0", [AIRFLOW, "remote-execution", "sentinel", "--port", str(ports["sentinel"]),
                                         "--report-interval", "2"], agents[0].env, agents[0].home)
    agents[0].sentinel = sentinel

    # The agents take the work: the depth falls to 0 in Prometheus, then so does the suggestion.
    prometheus.wait_value(queued, 0)
    assert plane.wait_run(DAG, run_id) == "success"
    prometheus.wait_value(suggested, 0)
    prometheus.wait_value(f'remote_execution_queue_agents{{queue="{QUEUE}"}}', want)
    assert prometheus.value("sum(remote_execution_leases_total)") >= 1
    # The answering api-server's timers, as histograms (per process, like its other own counters).
    wait_for(lambda: (prometheus.value(
        f'sum(remote_execution_work_leased_to_confirmed_seconds_count{{job="remote_execution",queue="{QUEUE}"}})')
        or 0) >= 1, 30, "leased -> confirmed histogram in Prometheus")
    assert prometheus.value('sum(remote_execution_heartbeat_duration_seconds_count{job="remote_execution"})') >= 1
    # Each agent's health, as the plane knows it.
    for i in range(want):
        prometheus.wait_value(f'remote_execution_agent_slots_free{{job="remote_execution",agent="fleet-{i}"}}', SLOTS)
        assert prometheus.value(f'remote_execution_agent_up{{agent="fleet-{i}",state="active"}}') == 1
        assert prometheus.value(f'remote_execution_agent_heartbeat_age_seconds{{agent="fleet-{i}"}}') < 60
    prometheus.wait_value('remote_execution_sentinel_check{agent="fleet-0",check="agent_alive"}', 1, timeout=60)
    assert prometheus.value('remote_execution_sentinel_status{agent="fleet-0"}') in (0, 1)  # ok or degraded

    # The agents' own endpoints: their counters and timers, scraped from each agent, not through the plane.
    prometheus.wait_value(f'sum(remote_execution_agent_workloads_total{{job="agents",outcome="success",queue="{QUEUE}"}})',
                          WIDTH, timeout=60)
    prometheus.wait_value(f'sum(remote_execution_agent_lease_to_start_seconds_count{{job="agents",queue="{QUEUE}"}})',
                          WIDTH, timeout=30)
    for i in range(want):
        prometheus.wait_value(f'remote_execution_agent_slots_free{{job="agents",agent="fleet-{i}"}}', SLOTS, timeout=30)
    assert prometheus.value('up{job="agents"}') == 1
    # The sentinel's checks from its own probe port's /metrics.
    prometheus.wait_value('remote_execution_sentinel_check{job="sentinel",agent="fleet-0",check="agent_alive"}', 1,
                          timeout=60)

    # The same figures and the events reached StatsD from the scheduler, the api-server and the agents.
    assert statsd.wait_for(f"plane.remote_execution.queue.queued.{QUEUE}", value=0, timeout=30) == 0
    assert max(statsd.values(f"plane.remote_execution.queue.queued.{QUEUE}")) == WIDTH
    statsd.wait_for(f"plane.remote_execution.work.queued_to_leased.{QUEUE}")
    statsd.wait_for(f"plane.remote_execution.work.leased_to_confirmed.{QUEUE}")
    statsd.wait_for("plane.remote_execution.heartbeat.duration")
    statsd.wait_for("plane.remote_execution.agents.active")
    for i in range(want):
        statsd.wait_for(f"agent.remote_execution.agent.slots_free.fleet-{i}")
    assert sum(sum(statsd.values(f"agent.remote_execution.agent.workloads.success.task.{QUEUE}.fleet-{i}"))
               for i in range(want)) == WIDTH
    assert statsd.values(f"agent.remote_execution.agent.lease_to_start.{QUEUE}.fleet-0")
    assert statsd.wait_for("agent.remote_execution.sentinel.check.agent_alive.fleet-0") == 1
    statsd.wait_for("agent.remote_execution.sentinel.status.fleet-0")


def test_a_lost_agent_and_its_requeued_work_reach_prometheus_from_the_scheduler(fleet):
    """An agent leases two tasks and dies before starting them (its process gone between lease and start:
    here a client with an agent token that stops talking). The scheduler, not the scraped api-server,
    declares it lost and requeues its work; Prometheus reads both from the api-server's cluster-wide
    counters."""
    plane, prometheus, statsd, token, agents, dags, base, ports = fleet
    queue, dag = "scale-in", "remote_scale_in"
    lost = 'remote_execution_agent_lost_total{job="remote_execution"}'
    requeued = f'remote_execution_work_requeued_total{{job="remote_execution",queue="{queue}",reason="lost_agent"}}'
    prometheus.wait_value(lost, 0)  # present before the first event, so increase() sees it
    assert prometheus.value(requeued) is None

    victim = {"Authorization": f"Bearer {plane.create_agent_token('victim', queue)}"}
    v1 = f"{plane.url}/remote_execution/v1"
    r = requests.post(f"{v1}/agents/register", json={"concurrency": 2}, headers=victim, timeout=30)
    assert r.status_code == 200, r.text
    plane.trigger(dag, conf={"seconds": 1})
    taken: list = []

    def lease() -> bool:
        r = requests.post(f"{v1}/leases", json={"slots": 2 - len(taken), "wait": 5}, headers=victim, timeout=60)
        assert r.status_code == 200, r.text
        taken.extend(r.json()["leases"])
        return len(taken) == 2

    wait_for(lease, 120, "the victim to lease two tasks")
    # No heartbeat, no start: lost after 3 heartbeat intervals, its unstarted leases requeued (by the scheduler).
    prometheus.wait_value(lost, 1, timeout=120)
    prometheus.wait_value(requeued, 2, timeout=30)
    states = {a["name"]: a["state"] for a in plane.api("GET", "/remote_execution/v1/admin/agents").json()}
    assert states["victim"] == "lost"
    # The same events reached StatsD from the scheduler (per process there, as before).
    assert statsd.wait_for("plane.remote_execution.agent.lost.victim") == 1
    assert statsd.wait_for(f"plane.remote_execution.work.requeued.{queue}.lost_agent") == 2
