"""
The doctor's plane checks (api, token, clock) against the real Remote Execution API served over TLS
by uvicorn on loopback (in-process SQLite DB), and against small stdlib servers for what a healthy
plane never does (skewed clock, a foreign service at api_url). Plus disk thresholds, the check
registry and the CLI's output and exit code.
"""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time
from argparse import Namespace
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.routing import Mount

from airflow.utils.session import create_session

from airflow_remote_execution.agent import checks

from airflow_remote_execution.plane import tokens
from airflow_remote_execution.plane.api.app import create_app
from airflow_remote_execution.agent.checks import CheckResult, clock_result, disk_result, run_checks
from localplane import free_port, self_signed_cert, wait_for

pytestmark = pytest.mark.usefixtures("airflow_db")


@pytest.fixture(scope="module")
def tls_plane(tmp_path_factory):
    """The Remote Execution API and Airflow's execution API, mounted as in the api-server, over HTTPS."""
    cert, key = self_signed_cert(tmp_path_factory.mktemp("plane-tls"))
    port = free_port()
    from fastapi import FastAPI

    from airflow.api_fastapi.execution_api.routes import health

    execution = FastAPI()  # Airflow's execution API health routes (the whole app needs the api-server's lifespan)
    execution.include_router(health.router)
    app = Starlette(routes=[Mount("/remote_execution", app=create_app()), Mount("/execution", app=execution)])
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host="127.0.0.1",
            port=port,
            ssl_certfile=str(cert),
            ssl_keyfile=str(key),
            log_level="warning",
            lifespan="off",
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, 30, "uvicorn")
    yield f"https://127.0.0.1:{port}", cert
    server.should_exit = True
    thread.join(10)


def new_token(name: str = "agent-doc", queues=("default", "gpu"), expires_in: str | None = None) -> str:
    with create_session() as s:
        return tokens.create(s, agent_name=name, queues=list(queues), expires_in=expires_in)[0]


@pytest.fixture
def agent_env(monkeypatch):
    """Configure this process as an agent; returns a setter for the options under test."""

    def configure(api_url: str, token: str | None = None, ca_bundle: Path | str | None = None, queues: str = ""):
        monkeypatch.setenv("AIRFLOW__REMOTE_EXECUTION__API_URL", api_url)
        monkeypatch.setenv("AIRFLOW__REMOTE_EXECUTION__REQUEST_TIMEOUT", "10")
        monkeypatch.setenv("AIRFLOW__REMOTE_EXECUTION__QUEUES", queues)
        monkeypatch.setenv("AIRFLOW__REMOTE_EXECUTION__CA_BUNDLE", str(ca_bundle or ""))
        if token is None:
            monkeypatch.delenv("AIRFLOW__REMOTE_EXECUTION__TOKEN", raising=False)
        else:
            monkeypatch.setenv("AIRFLOW__REMOTE_EXECUTION__TOKEN", token)

    for name in ("HTTPS_PROXY", "https_proxy", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("AIRFLOW__REMOTE_EXECUTION__TOKEN_FILE", raising=False)
    return configure


def results(*names: str) -> dict[str, CheckResult]:
    return {r.name: r for r in run_checks(list(names))}


# ------------------------------------------------------------------ healthy


def test_healthy_agent_passes_api_token_clock(tls_plane, agent_env):
    url, ca = tls_plane
    agent_env(url, new_token(expires_in="30d"), ca, queues="gpu")
    got = results("api", "token", "clock")
    assert [r.status for r in got.values()] == ["PASS", "PASS", "PASS"], got
    assert got["api"].detail.startswith(f"{url} reachable in ") and f"TLS verified with {ca}" in got["api"].detail
    assert got["api"].detail.endswith(", execution API healthy")
    assert got["token"].detail.startswith("agent agent-doc, token ")
    assert "queues default,gpu, expires " in got["token"].detail and "(in 29 d)" in got["token"].detail
    assert "agent clock 0.0 s" in got["clock"].detail


def test_token_near_expiry_warns(tls_plane, agent_env):
    url, ca = tls_plane
    agent_env(url, new_token(expires_in="2d"), ca)
    token = results("token")["token"]
    assert token.status == "WARN" and "tokens rotate" in token.hint


# ------------------------------------------------------------------ failures with hints


def test_wrong_ca_is_a_tls_failure(tls_plane, agent_env, tmp_path):
    url, _ = tls_plane
    other_ca, _ = self_signed_cert(tmp_path / "other")
    agent_env(url, new_token(), other_ca)
    got = results("api", "token", "clock")
    assert got["api"].status == "FAIL" and "TLS verification failed" in got["api"].detail
    assert "ca_bundle" in got["api"].hint
    assert got["token"].status == got["clock"].status == "SKIP"


def test_system_store_does_not_trust_a_private_ca(tls_plane, agent_env):
    url, _ = tls_plane
    agent_env(url, new_token())
    assert "self-signed certificate" in results("api")["api"].detail


def test_unknown_host_is_a_dns_failure(agent_env):
    agent_env("https://plane.does-not-exist.invalid", new_token())
    api = results("api")["api"]
    assert (api.status, api.detail) == (
        "FAIL",
        "https://plane.does-not-exist.invalid: DNS lookup of plane.does-not-exist.invalid failed",
    )
    assert "host name" in api.hint


def test_closed_port_is_refused(agent_env):
    port = free_port()
    agent_env(f"https://127.0.0.1:{port}", new_token())
    api = results("api")["api"]
    assert api.status == "FAIL" and f"connection to 127.0.0.1:{port} refused" in api.detail


def test_https_to_a_plain_http_port(agent_env):
    with plain_server(lambda h: h.reply(404, "not here")) as url:
        agent_env(url.replace("http://", "https://"), new_token())
        api = results("api")["api"]
    assert api.status == "FAIL" and "does not speak TLS" in api.detail


def test_a_foreign_service_at_api_url(agent_env):
    with plain_server(lambda h: h.reply(404, "<html>nginx</html>")) as url:
        agent_env(url, new_token())
        api = results("api")["api"]
    assert api.status == "FAIL" and "has no Remote Execution API (404" in api.detail


def test_execution_api_not_passed_by_the_proxy(tls_plane, agent_env, monkeypatch):
    url, ca = tls_plane
    agent_env(url, new_token(), ca)
    monkeypatch.setenv("AIRFLOW__REMOTE_EXECUTION__EXECUTION_API_URL", url + "/not-execution/")
    api = results("api")["api"]
    assert (
        api.status == "FAIL" and f"but the execution API at {url}/not-execution/health answered HTTP 404" in api.detail
    )
    assert "execution_api_url" in api.hint


def test_revoked_token_fails_with_a_hint(tls_plane, agent_env):
    url, ca = tls_plane
    token = new_token()
    with create_session() as s:
        tokens.revoke(s, token.split("_")[1])
    agent_env(url, token, ca)
    got = results("token", "clock")
    assert got["token"].status == "FAIL" and "token rejected: Agent token" in got["token"].detail
    assert "was revoked" in got["token"].detail and "tokens create" in got["token"].hint
    assert got["clock"].status == "FAIL"


def test_configured_queue_outside_the_token(tls_plane, agent_env):
    url, ca = tls_plane
    agent_env(url, new_token(queues=("default",)), ca, queues="default,gpu")
    token = results("token")["token"]
    assert token.status == "FAIL" and "queues gpu not allowed by the token" in token.detail


def test_no_token_configured(tls_plane, agent_env):
    url, ca = tls_plane
    agent_env(url, None, ca)
    got = results("token", "clock")
    assert got["token"].status == "FAIL" and "No agent token" in got["token"].detail
    assert got["clock"].status == "SKIP"


@pytest.mark.parametrize(("skew", "status"), [(-3, "PASS"), (12, "WARN"), (-90, "FAIL")])
def test_clock_skew_against_a_plane_clock(agent_env, skew, status):
    """A stand-in plane whose clock is off by ``skew`` seconds; the real check measures it over HTTP."""

    def whoami(h):
        now = datetime.now(timezone.utc) + timedelta(seconds=skew)
        h.reply(
            200,
            json.dumps(
                {
                    "agent_name": "a",
                    "token_id": "0" * 16,
                    "queues": ["default"],
                    "token_expires_at": None,
                    "registered": True,
                    "server_time": now.isoformat(),
                }
            ),
        )

    with plain_server(whoami) as url:
        agent_env(url, new_token())
        clock = results("clock")["clock"]
    assert clock.status == status, clock
    assert f"{abs(skew)}." in clock.detail and ("behind" if skew > 0 else "ahead of") in clock.detail
    if status != "PASS":
        assert "NTP" in clock.hint


def test_clock_thresholds():
    assert clock_result(4.9, 0.01).status == "PASS"
    assert clock_result(5.2, 0.01).status == "WARN"
    assert clock_result(5.2, 1.0).status == "PASS"  # within the measurement's error
    assert clock_result(-31, 0.01).status == "FAIL"


# ------------------------------------------------------------------ disk, registry, CLI


def test_disk_thresholds(tmp_path):
    gib = 1 << 30
    assert disk_result({"AIRFLOW_HOME": (tmp_path, 20 * gib)}).status == "PASS"
    low = disk_result({"AIRFLOW_HOME": (tmp_path, 20 * gib), "base_log_folder": (tmp_path / "logs", 3 * gib)})
    assert low.status == "WARN" and "base_log_folder" in low.detail
    assert disk_result({"AIRFLOW_HOME": (tmp_path, gib // 2)}).status == "FAIL"
    real = results("disk")["disk"]
    assert real.status in ("PASS", "WARN") and "AIRFLOW_HOME" in real.detail


def test_registry_reports_broken_checks_and_unknown_names(monkeypatch):
    monkeypatch.setitem(checks.CHECKS, "explodes", lambda: 1 / 0)
    (broken,) = run_checks(["explodes"])
    assert (broken.status, broken.detail) == ("FAIL", "ZeroDivisionError: division by zero")
    with pytest.raises(ValueError, match="Unknown check.s. nope; available: api, token"):
        run_checks(["nope"])
    monkeypatch.setattr(checks, "CHECK_MODULES", ("airflow_remote_execution.not_built_yet", "json.not_a_module_x"))
    assert checks.load_checks() == []  # a module not there yet is left out


def test_cli_lines_and_exit_code(tls_plane, agent_env, capsys):
    from airflow_remote_execution.cli.check_command import check

    url, ca = tls_plane
    agent_env(url, new_token(), ca)
    args = Namespace(only="api,token,clock", probe_conn=None, probe_var=None, output="table")
    check(args)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in lines] == [["PASS", "api"], ["PASS", "token"], ["PASS", "clock"]]

    agent_env(f"https://127.0.0.1:{free_port()}", new_token(), ca)
    with pytest.raises(SystemExit) as failed:
        check(Namespace(only="api,disk", probe_conn=None, probe_var=None, output="json"))
    assert failed.value.code == 1
    report = json.loads(capsys.readouterr().out)
    assert [(r["name"], r["status"]) for r in report] == [("api", "FAIL"), ("disk", "PASS")]
    assert "hint" in report[0] and report[0]["hint"]
    with pytest.raises(SystemExit, match="Unknown check"):
        check(Namespace(only="bogus", probe_conn=None, probe_var=None, output="table"))


# ------------------------------------------------------------------ a stdlib stand-in server


class plain_server:
    """A plain-HTTP server answering every GET with ``respond(handler)``."""

    def __init__(self, respond):
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                outer.respond(self)

            def reply(self, status: int, body: str):
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json" if body.startswith("{") else "text/html")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *_):
                pass

        self.respond = respond
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)

    def __enter__(self) -> str:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __exit__(self, *_):
        self.server.shutdown()
        self.server.server_close()


def test_plain_server_helper_is_reachable():
    with plain_server(lambda h: h.reply(200, "{}")) as url:
        host, port = url.rsplit(":", 1)
        with socket.create_connection(("127.0.0.1", int(port)), timeout=5):
            pass
    assert ssl and time  # imported for the fixtures above
