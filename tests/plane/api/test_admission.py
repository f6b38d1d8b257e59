"""What the Remote Execution API admits before a route runs (``plane/api/admission.py``): authentication on
headers before the body is read, bounded bodies, the failed-authentication throttle, the long-poll limit."""

from __future__ import annotations

import threading
import time

import pytest
from starlette.testclient import TestClient

from airflow.utils.session import create_session

from airflow_remote_execution.plane import tokens
from airflow_remote_execution.plane.api.app import create_app

pytestmark = pytest.mark.usefixtures("airflow_db")


def _token(name: str) -> str:
    with create_session() as s:
        return tokens.create(s, agent_name=name, queues=["default"], bundles=["b"])[0]


class Endless:
    """A request body that counts how much of it was read."""

    def __init__(self, size: int):
        self.size, self.sent = size, 0

    def __iter__(self):
        chunk = b"x" * 65536
        while self.sent < self.size:
            self.sent += len(chunk)
            yield chunk


def test_unauthenticated_body_is_not_read():
    body = Endless(100 * 1024 * 1024)
    with TestClient(create_app()) as c:
        r = c.post("/v1/parsing/results", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 401 and "Missing agent token" in r.json()["detail"]
    assert body.sent <= 65536 * 2, body.sent


@pytest.mark.parametrize("declared", [True, False])
def test_body_over_the_limit_is_413_naming_it(monkeypatch, declared):
    monkeypatch.setenv("AIRFLOW__REMOTE_EXECUTION__MAX_PARSING_RESULT_SIZE", "1000000")
    token = _token(f"big-{declared}")
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    with TestClient(create_app()) as c:
        if declared:
            r = c.post("/v1/parsing/results", content=b"{" + b" " * 2_000_000 + b"}", headers=headers)
            assert "of 2000002 bytes" in r.json()["detail"]
        else:
            # Chunked, no Content-Length: reading stops at the limit (the test transport then drains the rest;
            # tests/e2e/test_trust_boundary.py shows a real api-server's memory staying flat).
            r = c.post("/v1/parsing/results", content=Endless(5 * 1024 * 1024), headers=headers)
        assert r.status_code == 413
        assert "limit of 1000000 bytes ([remote_execution] max_parsing_result_size" in r.json()["detail"]
        r = c.post("/v1/agents/heartbeat", content=b"[" + b"1," * 600_000 + b"1]", headers=headers)
        assert r.status_code == 413 and "max_body_size" in r.json()["detail"]


def test_failed_authentication_is_throttled_but_known_tokens_still_work(monkeypatch):
    monkeypatch.setenv("AIRFLOW__REMOTE_EXECUTION__AUTH_FAILURE_LIMIT", "5")
    good = _token("throttled-neighbour")
    bad = {"Authorization": "Bearer rex_0123456789abcdef_" + "A" * 43}
    with TestClient(create_app()) as c:
        assert c.get("/v1/agents/me", headers={"Authorization": f"Bearer {good}"}).status_code == 200
        assert [c.get("/v1/agents/me", headers=bad).status_code for _ in range(5)] == [401] * 5
        r = c.get("/v1/agents/me", headers=bad)
        assert r.status_code == 429 and 0 < int(r.headers["Retry-After"]) <= 61
        assert "Too many failed authentications" in r.json()["detail"]
        assert c.get("/v1/agents/me", headers={"Authorization": f"Bearer {good}"}).status_code == 200
        assert c.get("/v1/agents/me", headers={"Authorization": f"Bearer {_token('new-agent')}"}).status_code == 429
        assert c.get("/openapi.json").status_code == 200  # not an agent route


def test_long_polls_per_token_are_capped(monkeypatch):
    monkeypatch.setenv("AIRFLOW__REMOTE_EXECUTION__MAX_LONG_POLLS_PER_TOKEN", "2")
    token = _token("poller")
    headers = {"Authorization": f"Bearer {token}"}
    with TestClient(create_app()) as c:
        assert c.post("/v1/agents/register", json={"concurrency": 1}, headers=headers).status_code == 200
        answers: list = []

        def poll():
            answers.append(c.post("/v1/leases", json={"slots": 1, "wait": 3}, headers=headers))

        pollers = [threading.Thread(target=poll) for _ in range(2)]
        for p in pollers:
            p.start()
        time.sleep(1.0)
        started = time.monotonic()
        r = c.post("/v1/leases", json={"slots": 1, "wait": 3}, headers=headers)
        assert time.monotonic() - started < 1.0
        assert r.status_code == 200 and r.json() == {"leases": []} and r.headers["Retry-After"] == "3"
        for p in pollers:
            p.join()
        assert [a.status_code for a in answers] == [200, 200] and "retry-after" not in answers[0].headers
