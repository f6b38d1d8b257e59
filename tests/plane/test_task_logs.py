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


# ---------------------------------------------------------------- the plane log store (no remote logging)


@pytest.fixture
def api(airflow_db):
    """The Remote Execution API in-process on the test's SQLite DB, with an empty log store."""
    from sqlalchemy import delete
    from starlette.testclient import TestClient

    from airflow_remote_execution.models.tables import TaskLogChunkModel
    from airflow_remote_execution.plane.api.app import create_app

    def wipe():
        with airflow_db.begin() as conn:
            conn.execute(delete(TaskLogChunkModel))

    wipe()
    with TestClient(create_app()) as client:
        yield client
    wipe()


def _token(name: str) -> str:
    from airflow.utils.session import create_session

    from airflow_remote_execution.plane import tokens

    with create_session() as s:
        return tokens.create(s, agent_name=name, queues=["default"])[0]


def _post(api, path: str, token: str, body: dict):
    return api.post(f"/v1{path}", json=body, headers={"Authorization": f"Bearer {token}"})


def _running_task(api, name: str = "agent-a", task: str = "t", start: bool = True) -> tuple[str, int, int]:
    """An agent (its token) holding a task's lease, confirmed started unless ``start`` is False."""
    from airflow.models.taskinstancekey import TaskInstanceKey
    from airflow.utils.session import create_session

    from airflow_remote_execution.plane import leases

    token = _token(name)
    assert _post(api, "/agents/register", token, {"concurrency": 1}).status_code == 200
    key = TaskInstanceKey(dag_id="d", task_id=task, run_id="r", try_number=1, map_index=-1)
    with create_session() as s:
        leases.enqueue(s, key=key, kind="task", queue="default", priority_weight=1, workload='{"type": "ExecuteTask"}')
    (lease,) = _post(api, "/leases", token, {"slots": 1, "wait": 0}).json()["leases"]
    if start:
        assert _post(api, f"/work/{lease['work_id']}/start", token, {"fence": lease["fence"]}).status_code == 200
    return token, lease["work_id"], lease["fence"]


def _line(i: int) -> str:
    return f'{{"event": "line {i}", "level": "info"}}\n'


def _piece(fence: int, start: int, text: str) -> dict:
    return {"fence": fence, "start": start, "end": start + len(text.encode()), "text": text}


def _stored(task: str = "t") -> str:
    """What the UI's handler reads for the task (no remote logging is configured in the unit tests)."""
    sources, logs = RemoteExecutionTaskHandler(base_log_folder="/nonexistent")._read_remote_logs(
        SimpleNamespace(executor=None, dag_id="d", run_id="r", task_id=task, map_index=-1), 1
    )
    assert len(logs) <= 1
    return logs[0] if logs else ""


def test_pieces_are_kept_once_in_order_and_read_by_the_handler(api):
    token, work_id, fence = _running_task(api)
    first, second = _line(1) + _line(2), _line(3)
    r = _post(api, f"/work/{work_id}/log", token, _piece(fence, 0, first))
    assert r.status_code == 200 and r.json() == {"stored_until": len(first), "truncated": False}
    # A retry whose answer was lost, then one that overlaps the next piece: each byte is kept once.
    assert _post(api, f"/work/{work_id}/log", token, _piece(fence, 0, first)).json()["stored_until"] == len(first)
    r = _post(api, f"/work/{work_id}/log", token, _piece(fence, len(_line(1)), _line(2) + second))
    assert r.json()["stored_until"] == len(first + second)
    assert _stored() == first + second

    # The source details name the store and the agent.
    sources, _ = RemoteExecutionTaskHandler(base_log_folder="/x")._read_remote_logs(
        SimpleNamespace(executor=None, dag_id="d", run_id="r", task_id="t", map_index=-1), 1
    )
    assert "log store" in sources[0] and "agent-a" in sources[0]


def test_a_gap_is_refused_naming_where_to_resume(api):
    token, work_id, fence = _running_task(api)
    # A lease's first piece may start further on in the agent's file (an earlier lease sent the start).
    assert _post(api, f"/work/{work_id}/log", token, _piece(fence, 100, _line(1))).status_code == 200
    r = _post(api, f"/work/{work_id}/log", token, _piece(fence, 100 + len(_line(1)) + 1, _line(2)))
    assert r.status_code == 409 and f"up to byte {100 + len(_line(1))}" in r.json()["detail"]
    assert _stored() == _line(1)


def test_a_task_resumed_after_deferral_shows_both_parts_in_order(api):
    """Each lease of the try sends its own part; the agent's file holds both when one agent ran both."""
    from airflow.utils.session import create_session

    from airflow_remote_execution.models import WorkItemModel
    from airflow_remote_execution.plane import leases

    token, first_id, first_fence = _running_task(api)
    assert _post(api, f"/work/{first_id}/log", token, _piece(first_fence, 0, _line(1))).status_code == 200
    assert _post(api, f"/work/{first_id}/finish", token, {"fence": first_fence, "outcome": "success"}).status_code == 200
    with create_session() as s:
        key = leases.key_from_json(s.get(WorkItemModel, first_id).key)  # finished: the resumed try is a new work item
    with create_session() as s:
        leases.enqueue(s, key=key, kind="task", queue="default", priority_weight=1, workload='{"type": "ExecuteTask"}')
    (lease,) = _post(api, "/leases", token, {"slots": 1, "wait": 0}).json()["leases"]
    assert _post(api, f"/work/{lease['work_id']}/start", token, {"fence": lease["fence"]}).status_code == 200
    r = _post(api, f"/work/{lease['work_id']}/log", token, _piece(lease["fence"], len(_line(1)), _line(2)))
    assert r.status_code == 200, r.text
    assert _stored() == _line(1) + _line(2)


def test_only_the_agent_holding_the_started_lease_may_write(api):
    token, work_id, fence = _running_task(api, "agent-a", "t")
    other, _, _ = _running_task(api, "agent-b", "u")
    r = _post(api, f"/work/{work_id}/log", other, _piece(fence, 0, _line(1)))
    assert r.status_code == 409 and "not leased to agent 'agent-b'" in r.json()["detail"]
    r = _post(api, f"/work/{work_id}/log", token, _piece(fence + 1, 0, _line(1)))
    assert r.status_code == 409 and "Stale fencing token" in r.json()["detail"]
    unstarted_token, unstarted, unstarted_fence = _running_task(api, "agent-c", "v", start=False)
    r = _post(api, f"/work/{unstarted}/log", unstarted_token, _piece(unstarted_fence, 0, _line(1)))
    assert r.status_code == 409 and "has not started" in r.json()["detail"]
    assert _post(api, "/work/999999/log", token, _piece(1, 0, _line(1))).status_code == 404
    r = api.post(f"/v1/work/{work_id}/log", json=_piece(fence, 0, _line(1)), headers={"Authorization": "Bearer rex_x_y"})
    assert r.status_code == 401
    assert _stored("t") == "" and _stored("u") == "" and _stored("v") == ""


def test_malformed_pieces_are_422(api):
    token, work_id, fence = _running_task(api)
    for body in (
        {"fence": fence, "start": 5, "end": 5, "text": ""},  # empty span
        {"fence": fence, "start": 0, "end": 10, "text": "x", "extra": 1},
        {"fence": fence, "start": -1, "end": 10, "text": "x"},
        {"fence": fence, "start": 0, "end": 200_000, "text": "x"},  # over MAX_PIECE
    ):
        r = _post(api, f"/work/{work_id}/log", token, body)
        assert r.status_code == 422, (body, r.text)


def test_a_log_is_capped_and_says_so(api, monkeypatch):
    monkeypatch.setenv("AIRFLOW__REMOTE_EXECUTION__TASK_LOG_MAX_SIZE", str(3 * len(_line(1)) + 5))
    token, work_id, fence = _running_task(api)
    text = "".join(_line(i) for i in range(1, 6))
    r = _post(api, f"/work/{work_id}/log", token, _piece(fence, 0, text))
    assert r.json() == {"stored_until": len(text), "truncated": True}
    stored = _stored()
    assert stored.startswith(_line(1) + _line(2) + _line(3)) and "line 4" not in stored
    assert "task_log_max_size" in stored.splitlines()[-1]
    # The agent moves on; nothing more is kept.
    r = _post(api, f"/work/{work_id}/log", token, _piece(fence, len(text), _line(6)))
    assert r.json() == {"stored_until": len(text + _line(6)), "truncated": True}
    assert _stored() == stored


def test_the_plane_may_refuse_logs(api, monkeypatch):
    monkeypatch.setenv("AIRFLOW__REMOTE_EXECUTION__PLANE_TASK_LOGS", "False")
    token, work_id, fence = _running_task(api)
    r = _post(api, f"/work/{work_id}/log", token, _piece(fence, 0, _line(1)))
    assert r.status_code == 403 and "plane_task_logs = False" in r.json()["detail"]


def test_logs_end_some_time_after_the_task_and_old_ones_are_purged(api):
    from datetime import timedelta

    from sqlalchemy import update

    from airflow.sdk import timezone
    from airflow.utils.session import create_session

    from airflow_remote_execution.models import WorkItemModel
    from airflow_remote_execution.models.tables import TaskLogChunkModel
    from airflow_remote_execution.plane import task_logs

    token, work_id, fence = _running_task(api)
    assert _post(api, f"/work/{work_id}/finish", token, {"fence": fence, "outcome": "success"}).status_code == 200
    # Finished: its last lines still arrive (the agent sends them once the supervisor is done).
    assert _post(api, f"/work/{work_id}/log", token, _piece(fence, 0, _line(1))).status_code == 200
    with create_session() as s:
        s.execute(update(WorkItemModel).where(WorkItemModel.id == work_id)
                  .values(finished_at=timezone.utcnow() - task_logs.LATE - timedelta(seconds=1)))
    r = _post(api, f"/work/{work_id}/log", token, _piece(fence, len(_line(1)), _line(2)))
    assert r.status_code == 409 and "log is closed" in r.json()["detail"]
    assert _stored() == _line(1)

    with create_session() as s:
        s.execute(update(TaskLogChunkModel).values(created_at=timezone.utcnow() - timedelta(days=31)))
    with create_session() as s:
        assert task_logs.purge_pieces(s, timedelta(days=30)) == 1
    assert _stored() == ""


def test_a_callback_has_no_task_log(api):
    from airflow.utils.session import create_session

    from airflow_remote_execution.models import WorkItemModel

    token, work_id, fence = _running_task(api)
    with create_session() as s:
        s.get(WorkItemModel, work_id).kind = "callback"
    r = _post(api, f"/work/{work_id}/log", token, _piece(fence, 0, _line(1)))
    assert r.status_code == 422 and "not a task" in r.json()["detail"]


def test_install_makes_the_task_log_reader_ours(monkeypatch):
    import logging

    from airflow.utils.log.file_task_handler import FileTaskHandler

    from airflow_remote_execution.plane.task_logs import install

    task_logger = logging.getLogger("airflow.task")
    monkeypatch.setattr(task_logger, "handlers", [])
    assert install()  # no reader: one of ours is added (Airflow would otherwise make a plain FileTaskHandler)
    assert [type(h) for h in task_logger.handlers] == [RemoteExecutionTaskHandler]
    stock = FileTaskHandler("/tmp")
    stock.name = "task"
    monkeypatch.setattr(task_logger, "handlers", [stock])
    assert install() and type(stock) is RemoteExecutionTaskHandler

    class Elsewhere(FileTaskHandler):
        pass

    other = Elsewhere("/tmp")
    other.name = "task"
    monkeypatch.setattr(task_logger, "handlers", [other])
    assert not install() and type(other) is Elsewhere


# ---------------------------------------------------------------- triggers' logs (agent triggerers)

from plane.test_triggers import DAG as TRIGGER_DAG, adb, deferred, sync, triggerer  # noqa: E402,F401 - fixture too


def test_a_triggers_log_is_kept_for_the_agent_triggerer_running_it_also_after_it_fired(adb):  # noqa: F811
    from sqlalchemy import delete, update

    from airflow.models.taskinstance import TaskInstance
    from airflow.models.trigger import Trigger

    from airflow_remote_execution.models.tables import TaskLogChunkModel
    from airflow_remote_execution.plane.leases import LeaseConflict
    from airflow_remote_execution.plane.task_logs import read_pieces, store_trigger_piece
    from airflow_remote_execution.wire.task_logs import LogPiece

    def piece(job: int, start: int, text: str) -> LogPiece:
        return LogPiece(**_piece(job, start, text))

    def store(agent: str, trigger_id: int, p: LogPiece):
        with adb.session() as s:
            return store_trigger_piece(s, agent, trigger_id, p)

    with adb.session() as s:
        s.execute(delete(TaskLogChunkModel))
    trigger_id = deferred(adb, "waits")
    unsent = deferred(adb, "waits_too")
    job = triggerer(adb, "agent-t", ["default"])
    other = triggerer(adb, "agent-u", ["default"])
    sync(adb, job)  # claims both triggers
    assert store("agent-t", trigger_id, piece(job, 0, _line(1))).stored_until == len(_line(1))
    with pytest.raises(LeaseConflict, match="not run by triggerer"):
        store("agent-u", trigger_id, piece(other, 0, _line(9)))  # another agent's triggerer
    with pytest.raises(LeaseConflict, match="not a live triggerer of agent 'agent-u'"):
        store("agent-u", trigger_id, piece(job, 0, _line(9)))  # a triggerer that is not its own

    with adb.session() as s:  # both fire: Airflow unlinks their task instances, then deletes them
        s.execute(update(TaskInstance).values(trigger_id=None, state="scheduled"))
        s.execute(delete(Trigger))
    assert store("agent-t", trigger_id, piece(job, len(_line(1)), _line(2))).stored_until == len(_line(1) + _line(2))
    with pytest.raises(LeaseConflict):  # never checked while it ran: not taken
        store("agent-t", unsent, piece(job, 0, _line(3)))
    with pytest.raises(LeaseConflict):
        store("agent-u", trigger_id, piece(other, len(_line(1) + _line(2)), _line(9)))

    with adb.session() as s:
        sources, logs = read_pieces(s, TRIGGER_DAG, "r1", "waits", -1, 1)
        assert logs == [_line(1) + _line(2)] and "1 trigger" in sources[0]
        assert read_pieces(s, TRIGGER_DAG, "r1", "waits_too", -1, 1) == ([], [])
        s.execute(delete(TaskLogChunkModel))
