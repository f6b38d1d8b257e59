"""
The plane serves HTTPS with a private CA; the agent trusts it through ``ca_bundle`` alone and
reaches it only through an HTTPS proxy (``HTTPS_PROXY``), for its own calls and for the Task SDK's.
The plane runs ``LocalExecutor`` as default and ``RemoteExecutor`` under an alias.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from forward_proxy import RecordingProxy
from localplane import Agent, Plane, self_signed_cert, shutdown

pytestmark = pytest.mark.e2e
ALIAS_CONFIG = "LocalExecutor,RemoteExecutor:airflow_remote_execution.executors.RemoteExecutor"


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
    proxy = RecordingProxy()
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
                "HTTPS_PROXY": proxy.url,
                "NO_PROXY": "",
                "no_proxy": "",
            },
        ).start()
        agent.wait_registered()
        run_id = plane.trigger("remote_mixed_executors")
        assert plane.wait_run("remote_mixed_executors", run_id) == "success"

        items = plane.settled_work_items(dag_id="remote_mixed_executors", run_id=run_id)
        assert [(w["key"][2], w["agent_name"], w["state"]) for w in items] == [("on_agent", "tls-agent", "success")]
        xcom = plane.api(
            "GET",
            f"/api/v2/dags/remote_mixed_executors/dagRuns/{run_id}/taskInstances/on_agent/xcomEntries/return_value",
        )
        assert xcom.json()["value"] == 21
        # Both the agent's client and the task's Task SDK client tunnelled through the proxy.
        tunnels = [target for method, target, _ in proxy.seen if method == "CONNECT"]
        assert {method for method, _, _ in proxy.seen} == {"CONNECT"} and set(tunnels) == {f"127.0.0.1:{plane.port}"}
        task_log = next((agent.home / "logs").rglob("task_id=on_agent/*.log")).read_text()
        assert "Done. Returned value was: 21" in task_log
        assert len(tunnels) >= 3  # register + lease/start/finish + the task's execution API calls
    finally:
        shutdown(plane, [agent])
        proxy.stop()
