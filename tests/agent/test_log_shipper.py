"""LogShipper against real storage servers (moto S3, fake-gcs-server, Azurite), through the providers'
own remote-log IOs (S3RemoteLogIO, GCSRemoteLogIO, WasbRemoteLogIO) - the ones Airflow's final upload uses."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

import boto3
import pytest

from airflow_remote_execution.agent.log_shipper import LogShipper, TaskLog, remote_log_io
from emulators import AWS_TEST_CREDENTIALS, azurite, azurite_connection_string, fake_gcs, gcs_not_found_text, moto

BUCKET = "customer-logs"
REL = "dag_id=d/run_id=r/task_id=t/attempt=1.log"
IO_CLASS = {"s3": "S3RemoteLogIO", "gcs": "GCSRemoteLogIO", "azure": "WasbRemoteLogIO"}


@pytest.fixture(scope="module")
def s3_server():
    with moto() as server:
        boto3.client("s3", endpoint_url=server.url, **AWS_TEST_CREDENTIALS).create_bucket(Bucket=BUCKET)
        yield server


@pytest.fixture(scope="module")
def gcs_server():
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    # GCSRemoteLogIO.write only creates a log whose read failed with real GCS's 404 text ("No such
    # object"); the shim gives fake-gcs-server that text (bare, it refuses every first upload).
    with fake_gcs() as upstream, gcs_not_found_text(upstream) as server, pytest.MonkeyPatch.context() as mp:
        mp.setenv("STORAGE_EMULATOR_HOST", server.url)
        storage.Client(project="test", credentials=AnonymousCredentials()).create_bucket(BUCKET)
        yield server


@pytest.fixture(scope="module")
def azure_server():
    from azure.storage.blob import BlobServiceClient

    with azurite() as server:
        BlobServiceClient.from_connection_string(azurite_connection_string(server)).create_container(BUCKET)
        yield server


def _s3(server, prefix: str) -> tuple[str, dict, Callable[[str], str | None]]:
    conn = {
        "conn_type": "aws",
        "login": AWS_TEST_CREDENTIALS["aws_access_key_id"],
        "password": AWS_TEST_CREDENTIALS["aws_secret_access_key"],
        "extra": {"endpoint_url": server.url, "region_name": AWS_TEST_CREDENTIALS["region_name"]},
    }
    client = boto3.client("s3", endpoint_url=server.url, **AWS_TEST_CREDENTIALS)

    def read(key: str) -> str | None:
        try:
            return client.get_object(Bucket=BUCKET, Key=key)["Body"].read().decode()
        except client.exceptions.NoSuchKey:
            return None

    return f"s3://{BUCKET}/{prefix}", conn, read


def _gcs(server, prefix: str) -> tuple[str, dict, Callable[[str], str | None]]:
    from google.api_core.exceptions import NotFound
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    conn = {"conn_type": "google_cloud_platform", "extra": {"is_anonymous": True, "project": "test"}}
    bucket = storage.Client(project="test", credentials=AnonymousCredentials()).bucket(BUCKET)

    def read(key: str) -> str | None:
        try:
            return bucket.blob(key).download_as_text()
        except NotFound:
            return None

    return f"gs://{BUCKET}/{prefix}", conn, read


def _azure(server, prefix: str) -> tuple[str, dict, Callable[[str], str | None]]:
    from azure.core.exceptions import ResourceNotFoundError
    from azure.storage.blob import BlobServiceClient

    conn = {"conn_type": "wasb", "extra": {"connection_string": azurite_connection_string(server)}}
    container = BlobServiceClient.from_connection_string(azurite_connection_string(server)).get_container_client(BUCKET)

    def read(key: str) -> str | None:
        try:
            return container.download_blob(key).readall().decode()
        except ResourceNotFoundError:
            return None

    # WasbRemoteLogIO: ``wasb://<path>`` in [logging], the container from [azure_remote_logging].
    return f"wasb://{prefix}", conn, read


@pytest.fixture(params=["s3", "gcs", "azure"])
def store(request, tmp_path, monkeypatch):
    """Remote logging configured as on an agent: [logging] options and the connection from the environment.

    Yields (local log file, read the remote object) for one task log."""
    kind = request.param
    server = request.getfixturevalue(f"{kind}_server")
    prefix = re.sub(r"\W", "_", request.node.name)
    base, conn, read = {"s3": _s3, "gcs": _gcs, "azure": _azure}[kind](server, prefix)
    if kind == "gcs":
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", server.url)
    monkeypatch.setenv("AIRFLOW__AZURE_REMOTE_LOGGING__REMOTE_WASB_LOG_CONTAINER", BUCKET)
    monkeypatch.setenv("AIRFLOW_CONN_REX_TEST_LOGS", json.dumps(conn))
    monkeypatch.setenv("AIRFLOW__LOGGING__REMOTE_LOGGING", "True")
    monkeypatch.setenv("AIRFLOW__LOGGING__REMOTE_BASE_LOG_FOLDER", base)
    monkeypatch.setenv("AIRFLOW__LOGGING__REMOTE_LOG_CONN_ID", "rex_test_logs")
    monkeypatch.setenv("AIRFLOW__LOGGING__BASE_LOG_FOLDER", str(tmp_path))
    local = tmp_path / REL
    local.parent.mkdir(parents=True)
    assert type(remote_log_io()).__name__ == IO_CLASS[kind]
    return local, lambda: read(f"{prefix}/{REL}")


S3_ONLY = pytest.mark.parametrize("store", ["s3"], indirect=True)


def line(n: int) -> str:
    """A log line as the supervisor writes it (JSON)."""
    return json.dumps({"event": f"line {n}", "level": "info"}) + "\n"


def append(path: Path, text: str) -> None:
    with open(path, "a") as f:
        f.write(text)


def make_shipper(active: dict[str, bool]) -> LogShipper:
    io = remote_log_io()
    return LogShipper(io, lambda: [TaskLog(relative_path=REL, active=active["t"])], 3600, threading.Event())


def test_partial_uploads_then_final_upload_gives_whole_log_once(store):
    local, remote = store
    active = {"t": True}
    shipper = make_shipper(active)
    assert shipper.ship_once() == 0 and remote() is None  # no file yet: nothing to do

    append(local, line(1) + line(2))
    shipper.ship_once()
    assert remote() == (line(1) + line(2)).rstrip("\n")
    # What the plane's task handler reads (the IO's read), while the task still runs.
    sources, logs = remote_log_io().read(REL, None)
    assert sources and "".join(logs) == (line(1) + line(2)).rstrip("\n")
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


@S3_ONLY
def test_lines_written_during_an_upload_are_kept(store, monkeypatch):
    """The supervisor keeps appending while a partial upload is in flight: nothing is lost or doubled."""
    local, remote = store
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


@S3_ONLY
def test_failed_upload_is_retried_next_round(store, monkeypatch):
    local, remote = store
    shipper = make_shipper({"t": True})
    append(local, line(1))
    real_write = shipper.io.write
    monkeypatch.setattr(shipper.io, "write", lambda *_: False)
    assert shipper.ship_once() == 0 and local.read_text() == line(1)
    monkeypatch.setattr(shipper.io, "write", real_write)
    assert shipper.ship_once() == len(line(1))
    assert remote() == line(1).rstrip("\n")


@S3_ONLY
def test_thread_uploads_every_interval(store):
    local, remote = store
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


@S3_ONLY
def test_no_remote_logging_means_no_shipper(store, monkeypatch):
    monkeypatch.setenv("AIRFLOW__LOGGING__REMOTE_LOGGING", "False")
    assert remote_log_io() is None
    with pytest.raises(ValueError, match="must be > 0"):
        LogShipper(object(), list, 0, threading.Event())


# ---------------------------------------------------------------- no remote logging: the plane log store


@pytest.fixture(scope="module")
def plane_url():
    """The real Remote Execution API served by uvicorn on loopback (in-process SQLite DB)."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.routing import Mount

    from airflow_remote_execution.plane.api.app import create_app
    from localplane import free_port, wait_for

    port = free_port()
    app = Starlette(routes=[Mount("/remote_execution", app=create_app())])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, 30, "uvicorn")
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


@pytest.fixture
def leased(plane_url, airflow_db, tmp_path):
    """A PlaneClient whose agent holds a started task lease; yields (client, TaskLog, local log file, read the
    plane's copy as the UI's handler does)."""
    from sqlalchemy import delete

    from airflow.models.taskinstancekey import TaskInstanceKey
    from airflow.utils.session import create_session

    from airflow_remote_execution.agent.client import PlaneClient
    from airflow_remote_execution.models.tables import TaskLogChunkModel
    from airflow_remote_execution.plane import leases, tokens
    from airflow_remote_execution.plane.task_logs import read_pieces
    from airflow_remote_execution.wire.api import RegisterRequest

    with create_session() as s:
        s.execute(delete(TaskLogChunkModel))
        token = tokens.create(s, agent_name="shipper", queues=["default"])[0]
    client = PlaneClient(plane_url, token)
    client.register(RegisterRequest(concurrency=1))
    key = TaskInstanceKey(dag_id="d", task_id="t", run_id="r", try_number=1, map_index=-1)
    with create_session() as s:
        leases.enqueue(s, key=key, kind="task", queue="default", priority_weight=1, workload='{"type": "ExecuteTask"}')
    (lease,) = client.lease(1, 0)
    client.start(lease.work_id, lease.fence)
    local = tmp_path / REL
    local.parent.mkdir(parents=True)

    def stored() -> str:
        with create_session() as s:
            _, logs = read_pieces(s, "d", "r", "t", -1, 1)
        return logs[0] if logs else ""

    yield client, TaskLog(REL, True, lease.work_id, lease.fence), local, stored
    with create_session() as s:
        s.execute(delete(TaskLogChunkModel))


def sender(client, tasks: list[TaskLog], folder: Path):
    from airflow_remote_execution.agent.log_shipper import PlaneLogSender

    return PlaneLogSender(client, lambda: list(tasks), folder, 3600, threading.Event())


def test_plane_sender_sends_whole_lines_while_running_and_the_rest_at_the_end(leased, tmp_path):
    client, task, local, stored = leased
    tasks = [task]
    s = sender(client, tasks, tmp_path)
    append(local, line(1) + line(2) + '{"event": "line 3 is still bei')
    assert s.send_once() == len(line(1) + line(2))
    assert stored() == line(1) + line(2)
    assert s.send_once() == 0  # nothing new complete
    append(local, 'ng written"}\n' + line(4))
    s.send_once()
    tasks.clear()  # the task and its supervisor are done: the worker forgets it
    append(local, '{"event": "last words, no newline"}')
    s.send_once()
    whole = local.read_text()
    assert stored().rstrip("\n") == whole  # the plane holds the whole log, once, in order
    assert whole.startswith(line(1)), "the agent's own file is left as it is"
    assert s.sent == {}


def test_plane_sender_resends_after_a_lost_answer_and_the_plane_keeps_each_line_once(leased, tmp_path):
    client, task, local, stored = leased
    append(local, line(1) + line(2))
    sender(client, [task], tmp_path).send_once()
    append(local, line(3))
    sender(client, [task], tmp_path).send_once()  # a fresh sender starts again at byte 0
    assert stored() == line(1) + line(2) + line(3)


def test_plane_sender_splits_a_long_log_into_pieces(leased, tmp_path):
    from airflow_remote_execution.wire.task_logs import MAX_PIECE

    client, task, local, stored = leased
    text = "".join(line(i) for i in range(2 * MAX_PIECE // len(line(99999)) + 10))
    append(local, text)
    assert sender(client, [task], tmp_path).send_once() == len(text)
    assert stored() == text


def test_plane_sender_stops_when_the_plane_refuses_logs(leased, tmp_path, monkeypatch):
    client, task, local, stored = leased
    monkeypatch.setenv("AIRFLOW__REMOTE_EXECUTION__PLANE_TASK_LOGS", "False")  # the plane (same process here)
    s = sender(client, [task], tmp_path)
    append(local, line(1))
    s.send_once()
    assert s.refused and stored() == ""


def test_start_log_shipper_picks_the_plane_only_without_remote_logging(leased, tmp_path, monkeypatch):
    from airflow_remote_execution.agent.log_shipper import PlaneLogSender, start_log_shipper

    client, task, local, stored = leased
    monkeypatch.setenv("AIRFLOW__LOGGING__REMOTE_LOGGING", "False")
    monkeypatch.setenv("AIRFLOW__LOGGING__BASE_LOG_FOLDER", str(tmp_path))
    monkeypatch.setenv("AIRFLOW__REMOTE_EXECUTION__LOG_UPLOAD_INTERVAL", "0.2")
    stop = threading.Event()
    tasks = [task]
    shipper = start_log_shipper(lambda: list(tasks), stop, client)
    try:
        assert isinstance(shipper, PlaneLogSender)
        append(local, line(1))
        deadline = time.monotonic() + 30
        while stored() != line(1) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert stored() == line(1)  # a partial round of the thread
    finally:
        stop.set()
        shipper.join(10)
    monkeypatch.setenv("AIRFLOW__REMOTE_EXECUTION__PLANE_TASK_LOGS", "False")
    assert start_log_shipper(list, threading.Event(), client) is None


def test_plane_sender_sends_a_resumed_tasks_new_lines_only(leased, tmp_path):
    """After a deferral the same try runs under a new lease and appends to the same file: the new lease
    sends only what follows the first lease's part."""
    from airflow.utils.session import create_session

    from airflow_remote_execution.models import WorkItemModel
    from airflow_remote_execution.plane import leases
    from airflow_remote_execution.wire.api import WorkState

    client, task, local, stored = leased
    tasks = [task]
    s = sender(client, tasks, tmp_path)
    append(local, line(1))
    s.send_once()
    tasks.clear()
    s.send_once()  # the first lease ended
    client.finish(task.work_id, task.fence, WorkState.SUCCESS)
    with create_session() as session:
        key = leases.key_from_json(session.get(WorkItemModel, task.work_id).key)  # finished: the resumed try is a new work item
    with create_session() as session:
        leases.enqueue(session, key=key, kind="task", queue="default", priority_weight=1, workload='{"type": "ExecuteTask"}')
    (lease,) = client.lease(1, 0)
    client.start(lease.work_id, lease.fence)
    append(local, line(2))
    tasks.append(TaskLog(REL, True, lease.work_id, lease.fence))
    s.send_once()
    assert stored() == line(1) + line(2)


def test_a_tasks_whole_log_is_on_the_plane_before_its_end_is_reported(leased, tmp_path, monkeypatch):
    """However short the task (shorter than the sender's look every 0.5 s), and with no round due yet."""
    from airflow.utils.session import create_session

    from airflow_remote_execution.agent.log_shipper import start_log_shipper
    from airflow_remote_execution.models import WorkItemModel
    from airflow_remote_execution.wire.api import WorkState

    client, task, local, stored = leased
    monkeypatch.setenv("AIRFLOW__LOGGING__REMOTE_LOGGING", "False")
    monkeypatch.setenv("AIRFLOW__LOGGING__BASE_LOG_FOLDER", str(tmp_path))
    monkeypatch.setenv("AIRFLOW__REMOTE_EXECUTION__LOG_UPLOAD_INTERVAL", "3600")
    stop = threading.Event()
    shipper = start_log_shipper(lambda: [task], stop, client)
    try:
        append(local, line(1) + '{"event": "the last line, no newline yet"}')
        shipper.task_ended(task.work_id, task.fence)  # as the worker's reaper does before it reports the end
        client.finish(task.work_id, task.fence, WorkState.SUCCESS)
        assert stored().rstrip("\n") == local.read_text()
        with create_session() as s:
            assert s.get(WorkItemModel, task.work_id).state == "success"
    finally:
        stop.set()
        shipper.join(10)


def test_plane_sender_pieces_fit_the_apis_body_limit_even_when_json_escapes_them(leased, tmp_path):
    from airflow_remote_execution.wire.task_logs import MAX_PIECE

    client, task, local, stored = leased
    text = "\x01" * (2 * MAX_PIECE) + "\n"  # six bytes each in JSON (\u0001)
    append(local, text)
    assert sender(client, [task], tmp_path).send_once() == len(text)
    assert stored() == text
