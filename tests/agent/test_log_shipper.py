"""LogShipper against a real moto S3 server, through the amazon provider's own S3RemoteLogIO."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import boto3
import pytest

from airflow_remote_execution.agent.log_shipper import LogShipper, TaskLog, remote_log_io
from emulators import AWS_TEST_CREDENTIALS, moto

BUCKET = "customer-logs"
REL = "dag_id=d/run_id=r/task_id=t/attempt=1.log"


@pytest.fixture(scope="module")
def s3_server():
    with moto() as server:
        boto3.client("s3", endpoint_url=server.url, **AWS_TEST_CREDENTIALS).create_bucket(Bucket=BUCKET)
        yield server


@pytest.fixture
def s3(s3_server, tmp_path, monkeypatch, request):
    """Remote logging configured as on an agent: [logging] options and the connection from the environment."""
    prefix = f"s3://{BUCKET}/{request.node.name}"
    conn = {
        "conn_type": "aws",
        "login": AWS_TEST_CREDENTIALS["aws_access_key_id"],
        "password": AWS_TEST_CREDENTIALS["aws_secret_access_key"],
        "extra": {"endpoint_url": s3_server.url, "region_name": AWS_TEST_CREDENTIALS["region_name"]},
    }
    monkeypatch.setenv("AIRFLOW_CONN_REX_TEST_LOGS", json.dumps(conn))
    monkeypatch.setenv("AIRFLOW__LOGGING__REMOTE_LOGGING", "True")
    monkeypatch.setenv("AIRFLOW__LOGGING__REMOTE_BASE_LOG_FOLDER", prefix)
    monkeypatch.setenv("AIRFLOW__LOGGING__REMOTE_LOG_CONN_ID", "rex_test_logs")
    monkeypatch.setenv("AIRFLOW__LOGGING__BASE_LOG_FOLDER", str(tmp_path))
    client = boto3.client("s3", endpoint_url=s3_server.url, **AWS_TEST_CREDENTIALS)
    key = f"{request.node.name}/{REL}"

    def remote() -> str | None:
        try:
            return client.get_object(Bucket=BUCKET, Key=key)["Body"].read().decode()
        except client.exceptions.NoSuchKey:
            return None

    local = tmp_path / REL
    local.parent.mkdir(parents=True)
    return local, remote


def line(n: int) -> str:
    """A log line as the supervisor writes it (JSON)."""
    return json.dumps({"event": f"line {n}", "level": "info"}) + "\n"


def append(path: Path, text: str) -> None:
    with open(path, "a") as f:
        f.write(text)


def make_shipper(active: dict[str, bool]) -> LogShipper:
    io = remote_log_io()
    assert type(io).__name__ == "S3RemoteLogIO"
    return LogShipper(io, lambda: [TaskLog(relative_path=REL, active=active["t"])], 3600, threading.Event())


def test_partial_uploads_then_final_upload_gives_whole_log_once(s3):
    local, remote = s3
    active = {"t": True}
    shipper = make_shipper(active)
    assert shipper.ship_once() == 0 and remote() is None  # no file yet: nothing to do

    append(local, line(1) + line(2))
    shipper.ship_once()
    assert remote() == (line(1) + line(2)).rstrip("\n")
    assert local.read_text() == ""  # shipped lines leave the local file, as with Airflow's upload

    append(local, line(3) + '{"event": "half a li')  # an unfinished line stays local
    shipper.ship_once()
    assert remote() == (line(1) + line(2) + line(3)).rstrip("\n")
    assert local.read_text() == '{"event": "half a li'

    append(local, 'ne"}\n' + line(4))
    active["t"] = False  # task process ended: Airflow's final upload takes over
    assert shipper.ship_once() == 0
    # Airflow's own final upload (the supervisor's, with its own IO instance).
    remote_log_io().upload(REL)
    assert [json.loads(x)["event"] for x in remote().splitlines()] == [
        "line 1", "line 2", "line 3", "half a line", "line 4"
    ]
    assert remote() == line(1) + line(2) + line(3) + '{"event": "half a line"}\n' + line(4)


def test_lines_written_during_an_upload_are_kept(s3, monkeypatch):
    """The supervisor keeps appending while a partial upload is in flight: nothing is lost or doubled."""
    local, remote = s3
    shipper = make_shipper({"t": True})
    real_write = shipper.io.write

    def write_while_task_logs(text: str, location: str) -> bool:
        append(local, line(99))  # lands between our read and dropping the shipped part
        return real_write(text, location)

    append(local, line(1))
    monkeypatch.setattr(shipper.io, "write", write_while_task_logs)
    shipper.ship_once()
    assert remote() == line(1).rstrip("\n")
    assert local.read_text() == line(99)  # only what is not remote yet
    monkeypatch.setattr(shipper.io, "write", real_write)
    remote_log_io().upload(REL)  # the final upload
    assert remote() == line(1) + line(99)


def test_failed_upload_is_retried_next_round(s3, monkeypatch):
    local, remote = s3
    shipper = make_shipper({"t": True})
    append(local, line(1))
    real_write = shipper.io.write
    monkeypatch.setattr(shipper.io, "write", lambda *_: False)
    assert shipper.ship_once() == 0 and local.read_text() == line(1)
    monkeypatch.setattr(shipper.io, "write", real_write)
    assert shipper.ship_once() == len(line(1))
    assert remote() == line(1).rstrip("\n")


def test_thread_uploads_every_interval(s3):
    local, remote = s3
    stop = threading.Event()
    shipper = LogShipper(remote_log_io(), lambda: [TaskLog(REL, True)], 0.2, stop).start()
    try:
        append(local, line(1))
        deadline = time.monotonic() + 30
        while remote() is None and time.monotonic() < deadline:
            stop.wait(0.1)
        assert remote() == line(1).rstrip("\n")
    finally:
        stop.set()
        shipper.join(5)


def test_no_remote_logging_means_no_shipper(s3, monkeypatch):
    monkeypatch.setenv("AIRFLOW__LOGGING__REMOTE_LOGGING", "False")
    assert remote_log_io() is None
    with pytest.raises(ValueError, match="must be > 0"):
        LogShipper(object(), list, 0, threading.Event())
