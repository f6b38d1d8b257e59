"""
What the plane refuses in a DAG an agent's dag processor uploads (``plane/dag_policy.py``), through
``parsing.store_result`` with DAGs serialized by Airflow's own parser, as an agent sends them.
"""

from __future__ import annotations

import pytest
from sqlalchemy import select

from airflow.models.dag import DagModel

from airflow_remote_execution.plane import parsing
from airflow_remote_execution.plane.dag_policy import DagRefused
from plane.test_parsing import _parse, _token, _write, adb  # noqa: F401 - adb is a fixture

HEADER = """
from datetime import datetime, timedelta
from airflow.sdk import DAG, Asset, AssetWatcher, task
from airflow.sdk.definitions.callback import AsyncCallback, SyncCallback
from airflow.sdk.definitions.deadline import DeadlineAlert, DeadlineReference
"""
DEADLINE_DAG = HEADER + """
with DAG("d", schedule="@daily", start_date=datetime(2024, 1, 1), is_paused_upon_creation=False,
         deadline=DeadlineAlert(reference=DeadlineReference.DAGRUN_QUEUED_AT, interval=timedelta(minutes=1),
                                callback={callback})):
    @task
    def t():
        pass
    t()
"""


def _store(adb, tmp_path, source: str, monkeypatch=None, allow: str = ""):  # noqa: F811
    if monkeypatch is not None:
        monkeypatch.setenv("AIRFLOW__REMOTE_EXECUTION__PARSED_DAG_IMPORT_ALLOWLIST", allow)
    token = _token(adb)
    _write(tmp_path, "d.py", source)
    result = _parse(tmp_path, "d.py")
    assert result.serialized_dags, result.import_errors
    with adb.session() as s:
        return parsing.store_result(s, token, result)


def _dags(adb) -> list[str]:  # noqa: F811
    with adb.session() as s:
        return list(s.scalars(select(DagModel.dag_id)))


@pytest.mark.parametrize(
    "callback, message",
    [
        ('SyncCallback("os.system", kwargs={"command": "id > /tmp/pwned"})', "'os.system' names installed code"),
        ('SyncCallback("subprocess.run", kwargs={"args": "id"})', "'subprocess.run' names installed code"),
        ('AsyncCallback("asyncio.create_subprocess_shell")', "would run in a triggerer"),
        ('SyncCallback("dags.cb.notify", executor="LocalExecutor")', "executor 'LocalExecutor'"),
    ],
)
def test_deadline_callbacks_naming_installed_code_are_refused(adb, tmp_path, monkeypatch, callback, message):  # noqa: F811
    with pytest.raises(DagRefused, match=message) as e:
        _store(adb, tmp_path, DEADLINE_DAG.format(callback=callback), monkeypatch)
    assert "DAG d: deadline[0].callback" in str(e.value)
    assert _dags(adb) == []


def test_bundle_callback_is_accepted_and_the_plane_decides_paused(adb, tmp_path, monkeypatch):  # noqa: F811
    """A callback in the bundle's own code is left to the agents that hold the bundle; the DAG's
    is_paused_upon_creation=False does not override the plane's dags_are_paused_at_creation."""
    monkeypatch.setenv("AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION", "True")
    assert _store(adb, tmp_path, DEADLINE_DAG.format(callback='SyncCallback("dags.cb.notify")'), monkeypatch) == ["d"]
    with adb.session() as s:
        assert s.get(DagModel, "d").is_paused


def test_allowlist_admits_installed_code(adb, tmp_path, monkeypatch):  # noqa: F811
    source = DEADLINE_DAG.format(callback='AsyncCallback("airflow.providers.standard.triggers.temporal.x")')
    assert _store(adb, tmp_path, source, monkeypatch, allow="airflow.providers.standard.*") == ["d"]


def test_task_executor_must_be_remote(adb, tmp_path, monkeypatch):  # noqa: F811
    """An agent's parser would refuse an executor the agent lacks; the JSON it sends is edited instead."""
    token = _token(adb)
    _write(tmp_path, "d.py", DEADLINE_DAG.format(callback='SyncCallback("dags.cb.notify")'))
    result = _parse(tmp_path, "d.py")
    result.serialized_dags[0].data["dag"]["tasks"][0]["__var"]["executor"] = "LocalExecutor"
    with adb.session() as s, pytest.raises(DagRefused, match="task t uses executor 'LocalExecutor'"):
        parsing.store_result(s, token, result)


def test_asset_watcher_trigger_needs_the_allowlist(adb, tmp_path, monkeypatch):  # noqa: F811
    source = HEADER + """
from airflow.providers.standard.triggers.file import FileDeleteTrigger
watched = Asset("x", watchers=[AssetWatcher(name="w", trigger=FileDeleteTrigger(filepath="/tmp/x"))])
with DAG("d", schedule=[watched], start_date=datetime(2024, 1, 1)):
    @task
    def t():
        pass
    t()
"""
    with pytest.raises(DagRefused, match="asset watcher 'w' trigger 'airflow.providers.standard.triggers.file"):
        _store(adb, tmp_path, source, monkeypatch)


def test_tampered_json_is_refused_with_what_is_wrong(adb, tmp_path, monkeypatch):  # noqa: F811
    token = _token(adb)
    _write(tmp_path, "d.py", DEADLINE_DAG.format(callback='SyncCallback("dags.cb.notify")'))
    result = _parse(tmp_path, "d.py")
    data = result.serialized_dags[0].data
    data["dag"]["deadline"][0]["callback"]["__data__"]["path"] = "os.system"  # edited after parsing
    with adb.session() as s, pytest.raises(DagRefused, match="'os.system' names installed code"):
        parsing.store_result(s, token, result)
    data["dag"]["deadline"][0]["callback"]["__data__"]["path"] = "dags.cb.notify"
    data["dag"]["timetable"] = {"__type": "evil.Timetable", "__var": {}}
    with adb.session() as s, pytest.raises(DagRefused, match="not a valid serialized DAG"):
        parsing.store_result(s, token, result)
    assert _dags(adb) == []
