"""The agent's Task SDK settings, checked in a fresh interpreter (they change module state for good)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

PROBE = """
import json
from airflow_remote_execution.agent.task_sdk import tolerate_plane_outages
changed = tolerate_plane_outages()
from airflow.sdk.api import client
from airflow.sdk.execution_time import supervisor
retrying = client.Client.request.retry
print(json.dumps({
    "changed": changed,
    "attempts": retrying.stop.max_attempt_number,
    "wait_min": retrying.wait.min,
    "max_failed_heartbeats": supervisor.MAX_FAILED_HEARTBEATS,
    "timeout": client.API_TIMEOUT,
}))
"""


def _probe(tmp_path, **env) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW__")}
    out = subprocess.run(
        [sys.executable, "-c", PROBE],
        env={**clean, "AIRFLOW_HOME": str(tmp_path), **env},
        capture_output=True, text=True, timeout=120, check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_agent_rides_out_a_plane_outage_by_default(tmp_path):
    got = _probe(tmp_path)
    # The Task SDK is imported with airflow itself; its retry decorator and constants must still change.
    assert (got["attempts"], got["wait_min"], got["max_failed_heartbeats"], got["timeout"]) == (20, 4.0, 20, 60.0)


def test_user_settings_win(tmp_path):
    got = _probe(tmp_path, AIRFLOW__WORKERS__EXECUTION_API_RETRIES="7", AIRFLOW__WORKERS__MAX_FAILED_HEARTBEATS="4")
    assert (got["attempts"], got["max_failed_heartbeats"]) == (7, 4)
    assert got["changed"] == {"workers.execution_api_retry_wait_min": "4.0", "workers.execution_api_timeout": "60.0"}
