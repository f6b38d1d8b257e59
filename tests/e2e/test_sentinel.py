"""
The sentinel beside a real agent, against a real plane (api-server on PostgreSQL): probes follow the
agent through kill -9 and restart, the plane keeps getting the sentinel's reports while the agent is
down (`agents list` shows them), and a revoked token makes /readyz fail with a clear detail while
the plane marks the silent sentinel's last report stale.
"""

from __future__ import annotations

import json

import psutil
import pytest
import requests

from localplane import AIRFLOW, Agent, Plane, Proc, free_port, fresh_pg_database, wait_for

pytestmark = pytest.mark.e2e
REPORT_INTERVAL = 2.0  # stale on the plane after 3 x 2 + 10 s


def probe(url: str, path: str) -> tuple[int, dict]:
    r = requests.get(url + path, timeout=10)
    return r.status_code, r.json()


def failing(body: dict) -> dict[str, str]:
    return {c["name"]: c["detail"] for c in body["checks"] if not c["ok"] and not c["skipped"]}


def probe_until(url: str, path: str, code: int, timeout: float, also=lambda body: True) -> dict:
    def answered():
        got, body = probe(url, path)
        return body if got == code and also(body) else None

    try:
        return wait_for(answered, timeout, f"{path} -> {code}", 0.25)
    except TimeoutError as e:
        raise AssertionError(f"{e}; last answer: {probe(url, path)}") from None


@pytest.fixture(scope="module")
def setup(tmp_path_factory, pg_url):
    base = tmp_path_factory.mktemp("sentinel")
    plane = Plane(base / "plane", db_url=fresh_pg_database(pg_url, "sentinel_e2e"))  # heartbeats every 5 s
    agent = sentinel = None
    try:
        plane.start(components=("api-server",))  # agents and sentinels talk only to the api-server
        token = plane.create_agent_token("edge-1", "default")
        agent = Agent("edge-1", base / "edge-1", plane.url, token, concurrency=2).start()
        agent.wait_registered()
        port = free_port()
        sentinel = Proc(
            "sentinel",
            [AIRFLOW, "remote-execution", "sentinel", "--port", str(port), "--report-interval", str(REPORT_INTERVAL)],
            agent.env,
            agent.home,
        )
        yield plane, agent, sentinel, f"http://127.0.0.1:{port}", token
    finally:
        for proc in (sentinel, agent.proc if agent else None):
            if proc:
                proc.stop()
        plane.stop()
        for proc in [*plane.procs.values(), agent.proc if agent else None, sentinel]:
            if proc:
                print(f"--- {proc.name}\n{proc.tail(40)}")


def agent_row(plane: Plane, name: str = "edge-1") -> dict:
    r = plane.api("GET", "/remote_execution/v1/admin/agents")
    r.raise_for_status()
    return next(a for a in r.json() if a["name"] == name)


def test_sentinel_follows_the_agent(setup):
    plane, agent, sentinel, url, token = setup

    # All well: ready, and the plane shows the report.
    body = probe_until(url, "/readyz", 200, 90, also=lambda b: any(c["name"] == "report" and c["ok"] and not c["skipped"]
                                                                   for c in b["checks"]))
    assert set(failing(body)) <= {"cpu", "memory", "disk"}, body  # a loaded test machine only degrades
    checks = {c["name"]: c for c in body["checks"]}
    assert {"agent_alive", "agent_heartbeat", "agent_poll", "agent_slots", "report"} <= set(checks)
    assert checks["agent_slots"]["detail"] == "0 running, 0 of 2 slots busy"
    assert checks["report"]["ok"]
    wait_for(lambda: (lambda a: a["sentinel_status"] in ("ok", "degraded") and not a["sentinel_stale"])(agent_row(plane)),
             60, "a fresh report on the plane")
    rss = psutil.Process(sentinel.pid).memory_full_info()
    print(f"sentinel memory: rss {rss.rss / 2**20:.0f} MiB, pss {rss.pss / 2**20:.0f} MiB")

    # kill -9: the probes fail, and the plane hears it from the sentinel while the agent is down.
    agent.kill()
    wait_for(lambda: not agent.proc.alive(), 10, "the agent to die")
    body = probe_until(url, "/healthz", 503, 10)
    assert "is not running" in failing(body)["agent_alive"]
    assert probe(url, "/readyz")[0] == 503 and probe(url, "/livez")[0] == 200
    row = wait_for(lambda: (lambda a: a if a["sentinel_status"] == "failing" else None)(agent_row(plane)), 30,
                   "the failing report on the plane")
    assert any(f.startswith("agent_alive: agent edge-1 pid") for f in row["sentinel_failing"])
    (listed,) = [a for a in json.loads(plane.airflow("remote-execution", "agents", "list", "--output", "json").stdout)
                 if a["name"] == "edge-1"]
    # (Airflow's console prints every value of --output json as a string.)
    assert listed["sentinel_status"] == "failing" and str(listed["sentinel_stale"]) == "False"
    assert "is not running" in str(listed["sentinel_failing"])
    table = plane.airflow("remote-execution", "agents", "list").stdout
    assert "failing" in table and "agent_alive" in table

    # Restart: ready again, and the plane sees it.
    agent.start()
    body = probe_until(url, "/readyz", 200, 120)
    assert failing(body).keys() <= {"cpu", "memory", "disk"}
    wait_for(lambda: agent_row(plane)["sentinel_status"] in ("ok", "degraded") and not any(
        f.startswith("agent_") for f in agent_row(plane)["sentinel_failing"]), 30, "the plane to see the agent back")

    # Revoke the token: not ready, with a detail that says so; the plane's copy goes stale.
    plane.airflow("remote-execution", "tokens", "revoke", token.split("_")[1])
    body = probe_until(url, "/readyz", 503, 30, also=lambda b: "report" in failing(b))
    assert "the plane rejected the agent token" in failing(body)["report"]
    assert "revoked" in failing(body)["report"]
    assert body["status"] == "failing"
    row = wait_for(lambda: (lambda a: a if a["sentinel_stale"] else None)(agent_row(plane)), 3 * REPORT_INTERVAL + 30,
                   "the last report to go stale")
    assert row["sentinel_status"] in ("ok", "degraded")  # the last report that got through, now marked stale
    body = probe_until(url, "/readyz", 503, 60, also=lambda b: "agent_heartbeat" in failing(b))
    assert "revoked" in failing(body)["agent_heartbeat"]  # the agent's own heartbeats are refused too
