"""
Issue 13, finding 6: each malformed request found answering 500 (or answering in the wrong order, or
leaking an internal key) is a 4xx saying what is wrong. In-process app on SQLite, as an agent calls it.
"""

from __future__ import annotations

import json

import pytest
from starlette.testclient import TestClient

from airflow.models.taskinstancekey import TaskInstanceKey
from airflow.utils.session import create_session

from airflow_remote_execution.plane import leases, tokens, triggers
from airflow_remote_execution.plane.api.app import create_app
from airflow_remote_execution.models import WorkItemModel

pytestmark = pytest.mark.usefixtures("airflow_db")

BUNDLE = "team-a"
BEYOND_64_BITS = 2**64


@pytest.fixture(scope="module")
def client():
    with TestClient(create_app(), raise_server_exceptions=False) as c:  # a 500 is an answer here, not a raise
        yield c


@pytest.fixture
def agent(client) -> dict:
    """A registered agent holding a lease on work item ``work_id`` with fence ``fence``; its auth headers."""
    with create_session() as s:
        token = tokens.create(s, agent_name="agent-1", queues=["default"], bundles=[BUNDLE])[0]
    key = TaskInstanceKey(dag_id="d", task_id="t", run_id="r", try_number=1, map_index=-1)
    with create_session() as s:
        leases.enqueue(s, key=key, kind="task", queue="default", priority_weight=1, workload='{"type": "ExecuteTask"}')
    headers = {"Authorization": f"Bearer {token}"}
    assert client.post("/v1/agents/register", json={"concurrency": 2}, headers=headers).status_code == 200
    lease = client.post("/v1/leases", json={"slots": 1, "wait": 0}, headers=headers).json()["leases"][0]
    return {"headers": headers, "work_id": lease["work_id"], "fence": lease["fence"]}


def send(client, method: str, path: str, agent: dict, body) -> object:
    """``body`` as JSON as Python writes it (NaN and Infinity included: the plane's parser accepts them)."""
    return client.request(method, f"/v1{path}", content=json.dumps(body, allow_nan=True),
                          headers={**agent["headers"], "Content-Type": "application/json"})


def refused(response, status: int = 422, *words: str) -> str:
    assert response.status_code == status, f"{response.status_code}: {response.text[:1000]}"
    detail = json.dumps(response.json()["detail"])
    for word in words:
        assert word in detail, f"{word!r} not in {detail[:1000]}"
    return detail


# ------------------------------------------------------------------ integers beyond 64 bits


@pytest.mark.parametrize("route", ["start", "finish", "release"])
def test_work_id_beyond_64_bits_in_the_path(client, agent, route):
    """Bounded in agent_routes.py (the lead's part); the DB's overflow is a 422 here either way."""
    body = {"fence": agent["fence"], **({"outcome": "success"} if route == "finish" else {})}
    for work_id in (BEYOND_64_BITS, 2**63, -(2**63) - 1):
        refused(send(client, "POST", f"/work/{work_id}/{route}", agent, body), 422)


@pytest.mark.parametrize("route", ["start", "finish", "release"])
def test_fence_beyond_64_bits(client, agent, route):
    body = {"fence": BEYOND_64_BITS, **({"outcome": "success"} if route == "finish" else {})}
    refused(send(client, "POST", f"/work/{agent['work_id']}/{route}", agent, body), 422, "fence", "less than or equal")


def test_pid_beyond_64_bits(client, agent):
    task = {"pid": BEYOND_64_BITS, "hostname": "h", "unixname": "u", "api_version": "2025-01-01"}
    body = {"fence": agent["fence"], "task": task}
    refused(send(client, "POST", f"/work/{agent['work_id']}/start", agent, body), 422, "pid")


def test_free_slots_and_running_beyond_64_bits(client, agent):
    refused(send(client, "POST", "/agents/heartbeat", agent, {"free_slots": BEYOND_64_BITS}), 422, "free_slots")
    refused(send(client, "POST", "/agents/heartbeat", agent, {"free_slots": 1, "running": [BEYOND_64_BITS]}),
            422, "running")
    refused(send(client, "POST", "/agents/register", agent, {"concurrency": 1, "running": [-(2**63) - 1]}),
            422, "running")


def test_map_index_beyond_64_bits(client, agent, airflow_tables):
    obj = {"dag_id": "d", "run_id": "r", "task_id": "t", "map_index": BEYOND_64_BITS, "key": "k", "ref": "s3://b/x"}
    refused(send(client, "POST", "/xcom/live", agent, {"objects": [obj]}), 422, "map_index")
    ok = send(client, "POST", "/xcom/live", agent, {"objects": [{**obj, "map_index": -1}]})
    assert ok.status_code == 200 and ok.json() == {"live": [False]}


def test_300k_running_work_ids(client, agent):
    body = {"free_slots": 1, "running": list(range(1, 300_001))}
    answer = send(client, "POST", "/agents/heartbeat", agent, body)
    assert answer.status_code in (413, 422), answer.text[:1000]  # over the body size limit, or the schema's
    assert len(answer.content) < 10_000  # the list is not echoed back
    body = {"free_slots": 1, "running": list(range(1, 10_002))}  # within the body limit: the schema's cap
    refused(send(client, "POST", "/agents/heartbeat", agent, body), 422, "running", "at most 10000 items")
    ok = send(client, "POST", "/agents/heartbeat", agent, {"free_slots": 1, "running": [agent["work_id"]]})
    assert ok.status_code == 200, ok.text


# ------------------------------------------------------------------ datetimes and floats in the parsing routes


@pytest.mark.parametrize(
    ("when", "words"),
    [
        ("2026-11-21T10:00:00", ["timezone"]),  # naive
        ("9999-12-31T23:59:59+00:00", ["out of range", "1970", "2200"]),
        ("0001-01-01T00:00:00+14:00", ["out of range"]),  # converting it to UTC overflowed
        ("1969-12-31T23:59:59Z", ["out of range"]),
    ],
)
def test_naive_or_out_of_range_datetimes(client, agent, airflow_tables, when, words):
    refused(send(client, "PUT", f"/parsing/bundles/{BUNDLE}/state", agent, {"last_refreshed": when}),
            422, "last_refreshed", *words)
    body = {"stale_dag_threshold": 50, "last_parsed": [
        {"bundle_name": BUNDLE, "relative_fileloc": "a.py", "last_finish_time": when}]}
    refused(send(client, "POST", "/parsing/stale", agent, body), 422, "last_finish_time", *words)


@pytest.mark.parametrize("threshold", [float("inf"), float("-inf"), float("nan"), 1e308])
def test_stale_dag_threshold_must_be_finite_and_bounded(client, agent, airflow_tables, threshold):
    refused(send(client, "POST", "/parsing/stale", agent, {"stale_dag_threshold": threshold}),
            422, "stale_dag_threshold")
    raw = client.post("/v1/parsing/stale", content=b'{"stale_dag_threshold": Infinity}',
                      headers={**agent["headers"], "Content-Type": "application/json"})
    refused(raw, 422, "stale_dag_threshold", "finite")


def test_valid_parsing_times_still_work(client, agent, airflow_tables):
    assert send(client, "POST", "/parsing/bundles/sync", agent, {"bundles": [BUNDLE]}).status_code == 200
    r = send(client, "PUT", f"/parsing/bundles/{BUNDLE}/state", agent, {"last_refreshed": "2026-11-21T10:00:00+01:00"})
    assert r.status_code == 200 and r.json()["last_refreshed"].startswith("2026-11-21T09:00:00"), r.text
    body = {"stale_dag_threshold": 50.5, "last_parsed": [
        {"bundle_name": BUNDLE, "relative_fileloc": "a.py", "last_finish_time": "2026-11-21T10:00:00Z"}]}
    assert send(client, "POST", "/parsing/stale", agent, body).json() == {"deactivated": []}


@pytest.mark.parametrize(
    ("data", "words"),
    [
        ({}, ["__version"]),
        ({"__version": 3}, ["'dag'"]),
        ({"__version": 3, "dag": {}}, ["dag.dag_id"]),
        ({"__version": 3, "dag": {"dag_id": "d", "fileloc": "f.py"}}, ["dag.tasks"]),
        ({"__version": 3, "dag": {"dag_id": "d", "fileloc": "f.py", "tasks": []}, "x": 1}, ["unexpected key"]),
    ],
)
def test_serialized_dag_without_the_keys_airflow_needs(client, agent, airflow_tables, data, words):
    body = {"bundle_name": BUNDLE, "run_duration": 0.1, "serialized_dags": [{"data": data}]}
    refused(send(client, "POST", "/parsing/results", agent, body), 422, "data", *words)


# ------------------------------------------------------------------ trigger events: ownership before decoding


@pytest.fixture
def fernet(monkeypatch):
    from cryptography.fernet import Fernet

    from airflow.models.crypto import get_fernet

    monkeypatch.setenv("AIRFLOW__CORE__FERNET_KEY", Fernet.generate_key().decode())
    get_fernet.cache_clear()
    yield
    get_fernet.cache_clear()


def test_trigger_event_for_a_trigger_that_is_not_the_agents_is_409_before_decoding(
    client, airflow_tables, fernet, monkeypatch
):
    from airflow.models.trigger import Trigger

    with create_session() as s:
        token_a = tokens.create(s, agent_name="agent-a", queues=["default"])[0]
        token_b = tokens.create(s, agent_name="agent-b", queues=["default"])[0]
    a = {"headers": {"Authorization": f"Bearer {token_a}"}}
    b = {"headers": {"Authorization": f"Bearer {token_b}"}}
    job_a = send(client, "POST", "/triggerers/register", a, {"capacity": 1}).json()["triggerer_id"]
    job_b = send(client, "POST", "/triggerers/register", b, {"capacity": 1}).json()["triggerer_id"]
    with create_session() as s:
        trigger = Trigger(classpath="airflow.providers.standard.triggers.temporal.DateTimeTrigger", kwargs={})
        trigger.triggerer_id = job_a
        s.add(trigger)
        s.flush()
        trigger_id = trigger.id
    decoded = []
    real = triggers.decode_event
    monkeypatch.setattr(triggers, "decode_event", lambda data: decoded.append(data) or real(data))
    evil = {"payload": {"__classname__": "os.system", "__version__": 1, "__data__": "true"}}

    answer = send(client, "POST", f"/triggers/{trigger_id}/event", b, {"triggerer_id": job_b, "event": evil})
    refused(answer, 409, f"Trigger {trigger_id} is not triggerer {job_b}'s")
    answer = send(client, "POST", f"/triggers/{trigger_id + 1000}/event", b, {"triggerer_id": job_b, "event": evil})
    refused(answer, 409, "is not triggerer")
    assert decoded == []  # not even looked at: decoding imports the modules the payload names

    answer = send(client, "POST", f"/triggers/{trigger_id}/event", a, {"triggerer_id": job_a, "event": evil})
    refused(answer, 422, "cannot be decoded")  # its owner's malformed event: decoded, and refused
    assert decoded == [evil]


# ------------------------------------------------------------------ 404 without internal keys, DB range errors


def test_missing_row_is_a_404_saying_what_is_missing(client, agent):
    detail = refused(send(client, "POST", "/work/999999/finish", agent, {"fence": 1, "outcome": "success"}),
                     404, "No work item 999999")
    assert "remote_work_item" not in detail


def test_a_lookup_error_from_deeper_down_is_a_404_without_its_key(client, agent, monkeypatch):
    """A ``KeyError`` raised below the plane's own code (a dict lookup, a missing row in Airflow's code)
    used to come back as ``{"detail": "'remote_work_item.secret_key'"}``."""

    def missing(*_a, **_k):
        raise KeyError("remote_work_item.secret_key")

    monkeypatch.setattr(leases, "finish", missing)
    detail = refused(send(client, "POST", f"/work/{agent['work_id']}/finish", agent,
                          {"fence": agent["fence"], "outcome": "success"}), 404, "Not found", "/finish")
    assert "secret_key" not in detail and "remote_work_item" not in detail


def test_database_range_errors_are_422_not_500(client, agent, monkeypatch):
    from sqlalchemy.exc import DataError

    def out_of_range(*_a, **_k):
        raise DataError("UPDATE remote_work_item SET fence=%(fence)s", {"fence": 2**40},
                        Exception("integer out of range"))

    monkeypatch.setattr(leases, "finish", out_of_range)
    detail = refused(send(client, "POST", f"/work/{agent['work_id']}/finish", agent,
                          {"fence": agent["fence"], "outcome": "success"}), 422, "out of range", "DataError")
    assert "UPDATE" not in detail  # the statement is not echoed
    with create_session() as s:
        assert s.get(WorkItemModel, agent["work_id"]).state == "leased"
