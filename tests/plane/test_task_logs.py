"""The plane's task handler: never asks an agent's log server; other executors' workers and the stock
triggerer are still asked (a real TCP listener stands in for their log servers and counts attempts)."""

from __future__ import annotations

import socket
import threading
from datetime import datetime, timezone
from types import SimpleNamespace

import pytest

from airflow_remote_execution.plane.task_logs import LOGGING_CONFIG, NOT_SERVED, RemoteExecutionTaskHandler

REL = "dag_id=d/run_id=r/task_id=t/attempt=1.log"


@pytest.fixture
def log_server(monkeypatch):
    """Counts connections on the worker and trigger log-server ports."""
    sock = socket.create_server(("127.0.0.1", 0))
    sock.settimeout(0.2)
    port = sock.getsockname()[1]
    monkeypatch.setenv("AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT", str(port))
    monkeypatch.setenv("AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT", str(port))
    seen = []
    stop = threading.Event()

    def accept():
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except TimeoutError:
                continue
            seen.append(conn.recv(1000))
            conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
            conn.close()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield seen
    stop.set()
    thread.join(5)
    sock.close()


def ti(executor: str | None, triggerer_job=None):
    return SimpleNamespace(
        executor=executor, hostname="127.0.0.1", triggerer_job=triggerer_job, task=None, dag_id="d", task_id="t",
        run_id="r", try_number=1, start_date=datetime.now(timezone.utc),
    )


@pytest.fixture
def handler(tmp_path):
    return RemoteExecutionTaskHandler(base_log_folder=str(tmp_path))


@pytest.mark.parametrize("executor", [None, "airflow_remote_execution.executors.RemoteExecutor", "RemoteExecutor"])
def test_remote_executor_tasks_are_not_fetched_from_workers(handler, log_server, executor):
    sources, streams = handler._read_from_logs_server(ti(executor), REL)
    assert (sources, streams) == ([NOT_SERVED], [])
    assert log_server == []


def test_other_executors_workers_are_still_asked(handler, log_server):
    handler._read_from_logs_server(ti("LocalExecutor"), REL)
    assert len(log_server) == 1 and log_server[0].startswith(b"GET /log/" + REL.encode())


def test_agent_triggerers_are_not_asked_but_the_stock_one_is(handler, log_server, airflow_db):
    agent_job = SimpleNamespace(id=7, hostname="agent-a@host.internal")
    assert handler._read_from_logs_server(ti(None, agent_job), REL) == ([NOT_SERVED], [])
    assert log_server == []
    stock_job = SimpleNamespace(id=8, hostname="127.0.0.1")
    handler._read_from_logs_server(ti(None, stock_job), REL)
    assert len(log_server) == 1 and b".trigger.8.log" in log_server[0]


def test_logging_config_swaps_only_the_task_handler():
    from airflow.config_templates.airflow_local_settings import DEFAULT_LOGGING_CONFIG

    assert LOGGING_CONFIG["handlers"]["task"]["class"] == "airflow_remote_execution.plane.task_logs.RemoteExecutionTaskHandler"
    assert DEFAULT_LOGGING_CONFIG["handlers"]["task"]["class"] == "airflow.utils.log.file_task_handler.FileTaskHandler"
    rest = {k: v for k, v in LOGGING_CONFIG["handlers"].items() if k != "task"}
    assert rest == {k: v for k, v in DEFAULT_LOGGING_CONFIG["handlers"].items() if k != "task"}
