"""
Schemathesis against the Remote Execution API's own OpenAPI document: generated (valid and
invalid) bodies, paths and tokens never produce a 5xx. Bounded: a fixed number of examples per
operation, no shrinking past the first failure.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from airflow.models.taskinstancekey import TaskInstanceKey
from airflow.utils.session import create_session

from airflow_remote_execution.plane import leases, tokens
from airflow_remote_execution.plane.api.app import create_app

pytestmark = pytest.mark.usefixtures("airflow_db")

# The agent-facing routes (admin routes need an Airflow JWT and are covered elsewhere).
schema = schemathesis.openapi.from_asgi("/openapi.json", create_app()).include(path_regex=r"^/v1/(agents|leases|work)")


@pytest.fixture(scope="module")
def valid_token() -> str:
    with create_session() as s:
        token, _ = tokens.create(s, agent_name="fuzz-agent", queues=["default"])
    with create_session() as s:
        for i in range(3):
            key = TaskInstanceKey(dag_id="fuzz", task_id=f"t{i}", run_id="r", try_number=1, map_index=-1)
            leases.enqueue(s, key=key, kind="task", queue="default", priority_weight=1, workload='{"type": "ExecuteTask"}')
    return token


@pytest.mark.parametrize("which", ["valid", "invalid"])
@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_no_5xx(case, which, valid_token):
    if which == "valid":
        headers = {"Authorization": f"Bearer {valid_token}"}
    else:
        headers = {"Authorization": "Bearer rex_0123456789abcdef_" + "A" * 43}
    if case.path == "/v1/leases" and isinstance(case.body, dict):
        case.body["wait"] = 0  # keep long-polls short
    response = case.call(headers=headers)
    assert response.status_code < 500, f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text}"
