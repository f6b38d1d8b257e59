"""PlaneClient against real HTTP(S) servers and proxies on loopback (stdlib http.server in threads)."""

from __future__ import annotations

import datetime
import ipaddress
import json
import logging
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from airflow_remote_execution.agent.client import LeaseLost, PlaneClient, PlaneError
from airflow_remote_execution.wire.api import HeartbeatRequest, RegisterRequest, TaskProcess, WorkState
from forward_proxy import RecordingProxy

TOKEN = "rex_0123456789abcdef_" + "S3cr3t-" * 6 + "x"
SECRET = TOKEN.split("_", 2)[2]
PREFIX = "/remote_execution/v1"
ENV_VARS = (
    "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "all_proxy", "no_proxy",
    "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE",
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)


# ------------------------------------------------------------------ a tiny plane


@dataclass
class Seen:
    method: str
    path: str
    headers: dict
    body: bytes
    peer_cert: dict | None = None


@dataclass
class Reply:
    status: int = 200
    body: object = field(default_factory=dict)  # dict/list -> JSON, str -> text/html
    delay: float = 0.0


class Plane:
    """Answers scripted replies per path (a list is consumed in order; the last one repeats) and records requests."""

    def __init__(self, tls: ssl.SSLContext | None = None):
        self.seen: list[Seen] = []
        self.replies: dict[str, list[Reply]] = {}
        plane = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                peer = self.connection.getpeercert() if isinstance(self.connection, ssl.SSLSocket) else None
                plane.seen.append(Seen("POST", self.path, dict(self.headers), body, peer))
                queue = plane.replies.get(self.path.removeprefix(PREFIX)) or [Reply(404, {"detail": "Not Found"})]
                reply = queue.pop(0) if len(queue) > 1 else queue[0]
                time.sleep(reply.delay)
                data = (json.dumps(reply.body) if not isinstance(reply.body, str) else reply.body).encode()
                self.send_response(reply.status)
                self.send_header("Content-Type", "text/html" if isinstance(reply.body, str) else "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True, do_handshake_on_connect=False)
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def reply(self, path: str, *replies: Reply) -> None:
        self.replies[path] = list(replies)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def plane():
    p = Plane()
    yield p
    p.stop()


def client_for(plane: Plane, **kw) -> PlaneClient:
    return PlaneClient(plane.url, TOKEN, **{"timeout": 5.0, **kw})


REGISTERED = {"agent_id": 1, "name": "agent-1", "queues": ["default"], "heartbeat_interval": 5, "long_poll_wait": 20}


def assert_no_secret(*texts: str) -> None:
    for text_ in texts:
        assert SECRET not in text_ and TOKEN not in text_


# ------------------------------------------------------------------ requests on the wire


def test_calls_send_the_bearer_token_and_json(plane, caplog):
    caplog.set_level(logging.DEBUG)
    plane.reply("/agents/register", Reply(body=REGISTERED))
    plane.reply("/agents/heartbeat", Reply(body={"heartbeat_interval": 3, "kill": [4], "drain": True}))
    plane.reply("/leases", Reply(body={"leases": [{"work_id": 4, "fence": 2, "kind": "task", "queue": "default", "workload": {"a": 1}}]}))
    for path in ("/work/4/start", "/work/4/finish", "/work/4/release"):
        plane.reply(path, Reply(body={"work_id": 4, "state": "running", "fence": 2}))
    client = client_for(plane)

    reply = client.register(RegisterRequest(concurrency=2, queues=["default"], hostname="h"))
    assert reply.name == "agent-1" and reply.queues == ["default"]
    hb = client.heartbeat(HeartbeatRequest(running=[4], free_slots=1))
    assert hb.kill == [4] and hb.drain is True and hb.heartbeat_interval == 3
    (lease,) = client.lease(3, wait=0.5)
    assert (lease.work_id, lease.fence, lease.workload) == (4, 2, {"a": 1})
    task = TaskProcess(pid=7, hostname="h", unixname="u", api_version="2026-04-01")
    assert client.start(4, 2, task).task_run is None  # a plane that did not report the start
    client.finish(4, 2, WorkState.FAILED, "exit code 1")
    client.release(4, 2)

    assert [s.path for s in plane.seen] == [
        f"{PREFIX}/agents/register", f"{PREFIX}/agents/heartbeat", f"{PREFIX}/leases",
        f"{PREFIX}/work/4/start", f"{PREFIX}/work/4/finish", f"{PREFIX}/work/4/release",
    ]
    for seen in plane.seen:
        assert seen.headers["Authorization"] == f"Bearer {TOKEN}"
        assert seen.headers["Content-Type"] == "application/json"
        assert seen.headers["User-Agent"] == "airflow-remote-execution-agent"
    bodies = [json.loads(s.body) for s in plane.seen]
    assert bodies[0]["concurrency"] == 2 and bodies[0]["queues"] == ["default"] and bodies[0]["hostname"] == "h"
    assert bodies[1] == {"running": [4], "free_slots": 1, "draining": False, "offline": False}
    assert bodies[2] == {"slots": 3, "wait": 0.5}
    assert bodies[3] == {"fence": 2, "task": task.model_dump()} and bodies[5] == {"fence": 2}
    assert bodies[4] == {"fence": 2, "outcome": "failed", "info": "exit code 1"}
    assert_no_secret(caplog.text)  # not even urllib3's debug log carries it


def test_base_url_and_repr_hide_the_token(plane):
    client = PlaneClient(plane.url + "/", TOKEN)
    assert client.base == plane.url + PREFIX
    assert repr(client) == f"PlaneClient({plane.url + PREFIX!r})"
    assert_no_secret(repr(client), str(client))


# ------------------------------------------------------------------ errors


def test_409_is_lease_lost(plane):
    plane.reply("/work/7/start", Reply(409, {"detail": "Stale fencing token 1 for work item 7: the current lease is 2"}))
    with pytest.raises(LeaseLost) as exc:
        client_for(plane).start(7, 1)
    e = exc.value
    assert isinstance(e, PlaneError) and e.status == 409 and not e.retryable
    assert e.detail == "Stale fencing token 1 for work item 7: the current lease is 2"
    assert str(e) == "409: Stale fencing token 1 for work item 7: the current lease is 2"
    assert_no_secret(str(e), repr(e))


@pytest.mark.parametrize(
    ("reply", "status", "detail", "retryable"),
    [
        (Reply(401, {"detail": "Invalid agent token: no such token (wrong value or deleted)"}), 401, "Invalid agent token: no such token (wrong value or deleted)", False),
        (Reply(403, {"detail": "Queue(s) x are outside"}), 403, "Queue(s) x are outside", False),
        (Reply(422, {"detail": [{"loc": ["body", "slots"], "msg": "bad"}]}), 422, "[{'loc': ['body', 'slots'], 'msg': 'bad'}]", False),
        (Reply(500, "<html>Internal Server Error</html>"), 500, "<html>Internal Server Error</html>", True),
        (Reply(429, {"detail": "slow down"}), 429, "slow down", True),
    ],
)
def test_error_statuses(plane, reply, status, detail, retryable):
    plane.reply("/agents/heartbeat", reply)
    with pytest.raises(PlaneError) as exc:
        client_for(plane).heartbeat(HeartbeatRequest(free_slots=1))
    e = exc.value
    assert type(e) is PlaneError and e.status == status and e.detail == detail and e.retryable is retryable
    assert str(e) == f"{status}: {detail}"
    assert_no_secret(str(e), repr(e))
    assert len(plane.seen) == 1  # not retried


def test_long_error_pages_are_truncated(plane):
    plane.reply("/agents/heartbeat", Reply(500, "x" * 5000))
    with pytest.raises(PlaneError) as exc:
        client_for(plane).heartbeat(HeartbeatRequest(free_slots=1))
    assert exc.value.detail == "x" * 500


def test_gateway_errors_are_retried(plane):
    plane.reply("/agents/heartbeat", Reply(502, "bad gateway"), Reply(503, "unavailable"), Reply(body={"heartbeat_interval": 5, "kill": []}))
    assert client_for(plane).heartbeat(HeartbeatRequest(free_slots=1)).kill == []
    assert len(plane.seen) == 3


def test_gateway_errors_give_up_after_three_retries(plane):
    plane.reply("/agents/heartbeat", Reply(504, "gateway timeout"))
    with pytest.raises(PlaneError) as exc:
        client_for(plane).heartbeat(HeartbeatRequest(free_slots=1))
    assert exc.value.status == 504 and exc.value.retryable and exc.value.detail == "gateway timeout"
    assert len(plane.seen) == 4


def test_connection_refused_is_status_0_and_retryable():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    client = PlaneClient(f"http://127.0.0.1:{port}", TOKEN, timeout=2)
    with pytest.raises(PlaneError) as exc:
        client.start(1, 1)
    e = exc.value
    assert e.status == 0 and e.retryable and not isinstance(e, LeaseLost)
    assert str(e) == f"Plane not reachable at http://127.0.0.1:{port}{PREFIX}: ConnectionError"
    assert e.__cause__ is None and e.__suppress_context__  # the requests exception (with headers) is not chained
    assert_no_secret(str(e), repr(e))


def test_read_timeout_and_long_poll_timeout(plane):
    plane.reply("/work/1/start", Reply(body={"work_id": 1, "state": "running", "fence": 1}, delay=0.8))
    plane.reply("/leases", Reply(body={"leases": []}, delay=0.8))
    client = client_for(plane, timeout=0.4)
    with pytest.raises(PlaneError) as exc:
        client.start(1, 1)
    assert exc.value.status == 0 and exc.value.retryable and exc.value.detail.startswith("Plane not reachable at")
    assert len(plane.seen) == 1  # a request the plane may have acted on is not sent again
    # A long-poll may take its wait on top of the ordinary timeout.
    assert client.lease(1, wait=0.6) == []


def test_non_json_success_is_a_plane_error(plane):
    plane.reply("/leases", Reply(200, "<html>Welcome to the corporate proxy</html>"))
    with pytest.raises(PlaneError):
        client_for(plane).lease(1, wait=0)


# ------------------------------------------------------------------ proxies


@pytest.fixture
def proxy():
    p = RecordingProxy()
    yield p
    p.stop()


def test_http_proxy_from_the_environment(plane, proxy, monkeypatch):
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    plane.reply("/agents/register", Reply(body=REGISTERED))
    assert client_for(plane).register(RegisterRequest(concurrency=1)).name == "agent-1"
    assert [(m, p) for m, p, _ in proxy.seen] == [("POST", f"{plane.url}{PREFIX}/agents/register")]
    assert len(plane.seen) == 1

    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    client_for(plane).register(RegisterRequest(concurrency=1))
    assert len(proxy.seen) == 1 and len(plane.seen) == 2  # NO_PROXY bypasses it


def test_unreachable_proxy_is_a_retryable_plane_error(plane, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{dead}")
    with pytest.raises(PlaneError) as exc:
        client_for(plane).start(1, 1)
    assert exc.value.status == 0 and exc.value.retryable and "ProxyError" in exc.value.detail
    assert plane.seen == []


# ------------------------------------------------------------------ TLS: CA bundle, client certificate, HTTPS proxy


@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    client_combined: Path
    other_ca: Path


def _make_pki(directory: Path) -> Pki:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def pem_key(key):
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())

    def ca(cn):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder().subject_name(name(cn)).issuer_name(name(cn)).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        return key, cert

    def leaf(ca_key, ca_cert, cn, usage, san=None):
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder().subject_name(name(cn)).issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        )
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return key, builder.sign(ca_key, hashes.SHA256())

    ca_key, ca_cert = ca("Test Plane CA")
    _, other_cert = ca("Some Other CA")
    s_key, s_cert = leaf(ca_key, ca_cert, "127.0.0.1", ExtendedKeyUsageOID.SERVER_AUTH, [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    c_key, c_cert = leaf(ca_key, ca_cert, "agent-1", ExtendedKeyUsageOID.CLIENT_AUTH)
    pem = lambda c: c.public_bytes(serialization.Encoding.PEM)  # noqa: E731
    files = {
        "ca": pem(ca_cert), "server_cert": pem(s_cert), "server_key": pem_key(s_key), "client_cert": pem(c_cert),
        "client_key": pem_key(c_key), "client_combined": pem(c_cert) + pem_key(c_key), "other_ca": pem(other_cert),
    }
    paths = {}
    for attr, data in files.items():
        paths[attr] = directory / f"{attr}.pem"
        paths[attr].write_bytes(data)
    return Pki(**paths)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return _make_pki(tmp_path_factory.mktemp("pki"))


def _tls_context(pki: Pki, require_client_cert: bool) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki.server_cert, pki.server_key)
    if require_client_cert:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(pki.ca)
    return ctx


@pytest.fixture
def tls_plane(pki):
    p = Plane(tls=_tls_context(pki, require_client_cert=False))
    p.reply("/agents/register", Reply(body=REGISTERED))
    yield p
    p.stop()


@pytest.fixture
def mtls_plane(pki):
    p = Plane(tls=_tls_context(pki, require_client_cert=True))
    p.reply("/agents/register", Reply(body=REGISTERED))
    yield p
    p.stop()


def test_ca_bundle_verifies_the_plane(tls_plane, pki):
    assert client_for(tls_plane, ca_bundle=str(pki.ca)).register(RegisterRequest(concurrency=1)).name == "agent-1"
    for bundle in (str(pki.other_ca),):  # a CA that did not sign the plane's certificate
        with pytest.raises(PlaneError) as exc:
            client_for(tls_plane, ca_bundle=bundle).register(RegisterRequest(concurrency=1))
        assert exc.value.status == 0 and str(tls_plane.url.rsplit(":", 1)[1]) in exc.value.detail
        assert_no_secret(str(exc.value))
    assert len(tls_plane.seen) == 1


def test_client_certificate_for_mutual_tls(mtls_plane, pki):
    reg = RegisterRequest(concurrency=1)
    assert client_for(mtls_plane, ca_bundle=str(pki.ca), client_cert=str(pki.client_cert), client_key=str(pki.client_key)).register(reg)
    assert client_for(mtls_plane, ca_bundle=str(pki.ca), client_cert=str(pki.client_combined)).register(reg)
    assert [dict(x[0] for x in s.peer_cert["subject"])["commonName"] for s in mtls_plane.seen] == ["agent-1", "agent-1"]
    with pytest.raises(PlaneError) as exc:
        client_for(mtls_plane, ca_bundle=str(pki.ca)).register(reg)  # no client certificate
    assert exc.value.status == 0 and not isinstance(exc.value, LeaseLost)
    assert_no_secret(str(exc.value))
    assert len(mtls_plane.seen) == 2


def test_https_proxy_tunnels_and_never_sees_the_token(tls_plane, proxy, pki, monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", proxy.url)
    client = client_for(tls_plane, ca_bundle=str(pki.ca))
    assert client.http.merge_environment_settings(client.base, {}, None, None, None)["proxies"]["https"] == proxy.url
    assert client.register(RegisterRequest(concurrency=1)).name == "agent-1"
    port = tls_plane.url.rsplit(":", 1)[1]
    assert [(m, p) for m, p, _ in proxy.seen] == [("CONNECT", f"127.0.0.1:{port}")]
    assert_no_secret(json.dumps(proxy.seen))  # TLS end to end: the proxy only saw CONNECT
    assert tls_plane.seen[0].headers["Authorization"] == f"Bearer {TOKEN}"


def test_ca_bundle_wins_over_requests_ca_bundle_env(tls_plane, pki, monkeypatch):
    """requests lets REQUESTS_CA_BUNDLE override a session-level ``verify``; the configured ca_bundle must still win."""
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(pki.other_ca))
    assert client_for(tls_plane, ca_bundle=str(pki.ca)).register(RegisterRequest(concurrency=1)).name == "agent-1"
    # Without ca_bundle the environment's bundle applies (and does not trust this plane).
    with pytest.raises(PlaneError):
        client_for(tls_plane).register(RegisterRequest(concurrency=1))
