"""What an agent refuses to run whatever the plane hands it (``agent/code_policy.py``)."""

from __future__ import annotations

import pytest

from airflow_remote_execution.agent import code_policy


def _callback(path: str, bundle: str = "dags-folder") -> dict:
    return {"bundle_info": {"name": bundle}, "callback": {"data": {"path": path, "kwargs": {}}}}


@pytest.mark.parametrize("path", ["os.system", "subprocess.run", "builtins.exec", "airflow.utils.x", "os"])
def test_callbacks_naming_installed_code_are_refused(path):
    assert "Refusing callback" in code_policy.refusal("callback", _callback(path))


def test_bundle_callback_runs_and_allowlist_admits(monkeypatch):
    assert code_policy.refusal("callback", _callback("dags.callbacks.notify")) is None
    assert code_policy.refusal("callback", _callback("airflow.providers.slack.notifications.x.f")) is not None
    monkeypatch.setenv("AIRFLOW__REMOTE_EXECUTION__PARSED_DAG_IMPORT_ALLOWLIST", "airflow.providers.slack.*")
    assert code_policy.refusal("callback", _callback("airflow.providers.slack.notifications.x.f")) is None


@pytest.mark.parametrize("kind", ["task", "callback"])
def test_work_of_a_bundle_this_agent_lacks_is_refused(kind):
    why = code_policy.refusal(kind, _callback("dags.cb.f", bundle="evil"))
    assert why.startswith("DAG bundle 'evil' is not configured on this agent")
    assert code_policy.refusal("connection_test", {"connection_id": "x"}) is None
