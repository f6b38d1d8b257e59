"""
The plane serves HTTPS with a private CA; the agent trusts it through ``ca_bundle`` alone and
reaches it only through an HTTPS proxy (``HTTPS_PROXY``), for its own calls and for the Task SDK's.
The plane runs ``LocalExecutor`` as default and ``RemoteExecutor`` under an alias.
"""

from __future__ import annotations

import select
import shutil
import socket
import socketserver
import threading
from pathlib import Path

import pytest

from localplane import Agent, Plane, self_signed_cert

pytestmark = pytest.mark.e2e
ALIAS_CONFIG = "LocalExecutor,RemoteExecutor:airflow_remote_execution.executors.RemoteExecutor"


class ConnectProxy(socketserver.ThreadingTCPServer):
    """A minimal HTTP CONNECT proxy that records where clients tunnel to."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self):
        self.tunnels: list[str] = []
        super().__init__(("127.0.0.1", 0), _ProxyHandler)


class _ProxyHandler(socketserver.BaseRequestHandler):
    def handle(self):
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.request.recv(4096)
            if not chunk:
                return
            head += chunk
        method, target, _ = head.split(b"\r\n", 1)[0].decode().split(" ", 2)
        if method != "CONNECT":
            self.request.sendall(b"HTTP/1.1 405 Method Not Allowed\r\n\r\n")
            return
        self.server.tunnels.append(target)
        host, port = target.rsplit(":", 1)
        upstream = socket.create_connection((host, int(port)))
        self.request.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        sockets = [self.request, upstream]
        try:
            self._pipe(sockets, upstream)
        except OSError:
            pass  # a side hung up
        finally:
            upstream.close()

    def _pipe(self, sockets, upstream):
        while True:
            readable, _, _ = select.select(sockets, [], [], 60)
            if not readable:
                return
            for s in readable:
                data = s.recv(65536)
                if not data:
                    return
                (upstream if s is self.request else self.request).sendall(data)


def test_agent_over_tls_through_proxy_beside_local_executor(tmp_path):
    dags = tmp_path / "dags"
    dags.mkdir()
    shutil.copy(Path(__file__).parent / "dags" / "remote_mixed_executors.py", dags)
    cert, key = self_signed_cert(tmp_path / "tls")
    plane = Plane(
        tmp_path / "plane",
        executor=ALIAS_CONFIG,
        dags_folder=dags,
        tls=(cert, key),
        extra_env={"AIRFLOW__CORE__PARALLELISM": "4"},
    )
    proxy = ConnectProxy()
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    agent = None
    try:
        plane.start()
        token = plane.create_agent_token("tls-agent", "default")
        agent = Agent(
            "tls-agent",
            tmp_path / "agent",
            plane.url,
            token,
            dags_folder=dags,
            extra_env={
                "AIRFLOW__REMOTE_EXECUTION__CA_BUNDLE": str(cert),
                # DAGs that name ``executor=`` only parse where that executor is configured.
                "AIRFLOW__CORE__EXECUTOR": ALIAS_CONFIG,
                "HTTPS_PROXY": f"http://127.0.0.1:{proxy.server_address[1]}",
                "NO_PROXY": "",
                "no_proxy": "",
            },
        ).start()
        agent.wait_registered()
        run_id = plane.trigger("remote_mixed_executors")
        assert plane.wait_run("remote_mixed_executors", run_id) == "success"

        items = plane.work_items(dag_id="remote_mixed_executors", run_id=run_id)
        assert [(w["key"][2], w["agent_name"], w["state"]) for w in items] == [("on_agent", "tls-agent", "success")]
        xcom = plane.api(
            "GET",
            f"/api/v2/dags/remote_mixed_executors/dagRuns/{run_id}/taskInstances/on_agent/xcomEntries/return_value",
        )
        assert xcom.json()["value"] == 21
        # Both the agent's client and the task's Task SDK client tunnelled through the proxy.
        assert set(proxy.tunnels) == {f"127.0.0.1:{plane.port}"}
        task_log = next((agent.home / "logs").rglob("task_id=on_agent/*.log")).read_text()
        assert "Done. Returned value was: 21" in task_log
        assert len(proxy.tunnels) >= 3  # register + lease/start/finish + the task's execution API calls
    finally:
        if agent:
            agent.stop()
        plane.stop()
        proxy.shutdown()
        for proc in [*plane.procs.values(), *([agent.proc] if agent else [])]:
            print(f"--- {proc.name}\n{proc.tail(30)}")
