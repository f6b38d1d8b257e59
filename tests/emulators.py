"""
Real servers for the cloud parts, started by the tests on loopback: moto (S3, Secrets Manager),
and (added beside it) Azurite, fake-gcs-server and OpenBao. Each is a context manager that yields
once the server answers, and stops it afterwards.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
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
