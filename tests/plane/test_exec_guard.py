"""Decisions of the execution-API guard for bound tokens (``plane/exec_guard.py``); the whole path through a
real api-server is in tests/e2e/test_trust_boundary.py."""

from __future__ import annotations

import pytest

from airflow_remote_execution.plane import exec_guard
from airflow_remote_execution.plane.exec_guard import Grant

TI = "0197a0b1-1111-7000-8000-000000000001"
GRANT = Grant(dead=None, ti_id=TI, dag_id="mine", run_id="r1", task_id="t", map_index=-1)


@pytest.mark.parametrize(
    "method, path, query, status",
    [
        ("GET", "connections/db", "", 404),
        ("GET", "variables/v", "", 404),
        ("PUT", "variables/v", "", 404),
        ("POST", "xcoms/mine/r1/t/k", "", None),
        ("POST", "xcoms/mine/r1/t/k", "map_index=-1", None),
        ("POST", "xcoms/mine/r1/t/k", "map_index=3", 403),
        ("POST", "xcoms/mine/r1/other_task/k", "", 403),
        ("DELETE", "xcoms/theirs/r1/t/k", "", 403),
        ("GET", "xcoms/mine/r0/upstream/return_value", "", None),
        ("GET", f"task-instances/{TI}/previous-successful-dagrun", "", None),
        ("PATCH", "task-instances/0197a0b1-2222-7000-8000-000000000002/state", "", 403),
        ("GET", "store/ti/0197a0b1-2222-7000-8000-000000000002/k", "", 403),
        ("GET", "dag-runs/mine/r1", "", None),
        ("GET", "dag-runs/count", "dag_id=mine", None),
        ("GET", "health", "", None),
    ],
)
def test_decisions_for_a_live_grant(method, path, query, status):
    answer = exec_guard.refusal(GRANT, method, path, query)
    assert (answer and answer[0]) == status, answer


def test_other_dags_need_their_bundle_in_the_agent_token(monkeypatch):
    monkeypatch.setattr(exec_guard, "_dag_bundle", lambda dag_id, session=None: {"shared": "team-a", "theirs": "team-b"}[dag_id])
    assert exec_guard.refusal(GRANT, "GET", "xcoms/theirs/r/t/k", "")[0] == 403
    assert exec_guard.refusal(GRANT, "GET", "dag-runs/count", "dag_id=theirs")[0] == 403
    allowed = Grant(dead=None, ti_id=TI, dag_id="mine", bundles=frozenset({"team-a"}))  # own or token's bundle
    assert exec_guard.refusal(allowed, "GET", "xcoms/shared/r/t/k", "") is None
    assert exec_guard.refusal(allowed, "POST", "dag-runs/theirs/new_run", "")[0] == 403


def test_dead_lease_refuses_everything():
    dead = Grant(dead="the lease this token was issued for has ended (work item 3: success)")
    assert exec_guard.refusal(dead, "GET", "health", "") == (403, f"Execution API token refused: {dead.dead}")


@pytest.mark.parametrize(
    "value, queue, bundle, allowed",
    [("False", "q", "b", False), ("", "q", "b", False), ("True", "q", None, True), ("*", "q", None, True),
     ("queue:q", "q", None, True), ("queue:other,bundle:b", "q", "b", True), ("bundle:b", "q", None, False)],
)
def test_serve_plane_secrets_to_agents(monkeypatch, value, queue, bundle, allowed):
    monkeypatch.setenv("AIRFLOW__REMOTE_EXECUTION__SERVE_PLANE_SECRETS_TO_AGENTS", value)
    assert exec_guard.secrets_allowed(queue, bundle) is allowed
    grant = Grant(dead=None, secrets=allowed)
    assert (exec_guard.refusal(grant, "GET", "connections/x", "") is None) is allowed


def test_bound_claims_survive_rebinding():
    exec_guard._generator.cache_clear()
    plain = exec_guard._generator().generate({"sub": TI, "scope": "execution"})
    assert exec_guard.bound_claims(plain) is None
    bound = exec_guard.bind(plain, 7, 2, "tok")
    claims = exec_guard.bound_claims(bound)
    assert (claims["sub"], claims["rex_work"], claims["rex_fence"], claims["rex_token"]) == (TI, 7, 2, "tok")
    swapped = exec_guard._generator().generate({"sub": TI, "scope": "execution"})
    assert exec_guard.bound_claims(exec_guard.rebind(swapped, claims))["rex_work"] == 7


def test_the_guard_names_the_task_instance_an_unbound_state_report_is_for():
    """A deferral served for an unbound token inserts its trigger before linking it (a Core UPDATE): the guard
    tells the parking hook whose it is, for PATCH .../state only, and forgets it after the request."""
    import asyncio

    seen = []

    async def airflow(scope, receive, send):
        seen.append(exec_guard._SERVING_TI.get())

    guard = exec_guard.ExecutionApiGuard(airflow)
    for method, path in [("PATCH", f"/execution/task-instances/{TI}/state"), ("GET", f"/execution/task-instances/{TI}/state"),
                         ("PATCH", f"/execution/task-instances/{TI}/rtif"), ("PATCH", f"/api/v2/task-instances/{TI}/state")]:
        asyncio.run(guard({"type": "http", "method": method, "path": path, "headers": []}, None, None))
    assert seen == [TI, None, None, None]
    assert exec_guard._SERVING_TI.get() is None


@pytest.mark.parametrize("config, plane", [
    ('[{"name": "mine", "classpath": "airflow.dag_processing.bundles.local.LocalDagBundle", "kwargs": {}}]', {"mine"}),
    ("[]", set()),
    ("{not json", set()),  # unreadable: the plane parses nothing we could trust, every trigger is parked
])
def test_the_planes_bundles_are_what_airflows_bundle_manager_reads(monkeypatch, config, plane):
    from airflow_remote_execution.plane import tokens

    monkeypatch.setenv("AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST", config)
    monkeypatch.setattr(tokens, "_parsed_by_agents", (float("inf"), frozenset()))  # no agent token names any
    exec_guard.plane_bundles.cache_clear()
    try:
        assert exec_guard.plane_bundles() == plane
        assert exec_guard.parks("mine", None) is ("mine" not in plane)
        assert exec_guard.parks(None, None) and exec_guard.parks("elsewhere", None)
    finally:
        exec_guard.plane_bundles.cache_clear()
