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


def test_bundle_code_on_sys_path_is_not_installed_code(tmp_path, monkeypatch):
    """A bundle's folder on sys.path (a dag processor, a DagBag) does not make its modules 'installed';
    a bundle module shadowing an installed one is still refused."""
    from airflow_remote_execution.wire import import_paths

    (tmp_path / "team_callbacks").mkdir()
    (tmp_path / "team_callbacks" / "__init__.py").write_text("")
    (tmp_path / "flat_callbacks.py").write_text("")
    (tmp_path / "json.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    import_paths.installed_here.cache_clear()
    try:
        assert code_policy.refusal("callback", _callback("team_callbacks.notify")) is None
        assert code_policy.refusal("callback", _callback("flat_callbacks.notify")) is None
        assert "names installed code" in code_policy.refusal("callback", _callback("json.loads"))
        assert import_paths.installed_here("airflow") and import_paths.installed_here("requests")
    finally:
        import_paths.installed_here.cache_clear()
