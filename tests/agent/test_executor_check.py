"""The agent warns about the plane's [core] executor only when a DAG could really fail to load here: when an
executor name (alias, class name, module path) the plane accepts in ``executor=`` does not resolve on the agent."""

from __future__ import annotations

import logging

import pytest

from airflow_remote_execution.agent.worker import AgentWorker

REMOTE = "airflow_remote_execution.executors.RemoteExecutor"


@pytest.fixture
def agent_executor(monkeypatch):
    from collections import defaultdict

    from airflow.executors import executor_loader

    def configure(value: str) -> None:
        """This process's [core] executor, with the loader's caches of the last one dropped."""
        monkeypatch.setenv("AIRFLOW__CORE__EXECUTOR", value)
        for cache in ("_alias_to_executors_per_team", "_module_to_executors_per_team", "_classname_to_executors_per_team"):
            monkeypatch.setattr(executor_loader, cache, defaultdict(dict))
        monkeypatch.setattr(executor_loader, "_team_name_to_executors", defaultdict(list))
        monkeypatch.setattr(executor_loader, "_executor_names", [])

    return configure


@pytest.mark.parametrize(
    ("agent", "plane"),
    [
        (REMOTE, REMOTE),
        (f" {REMOTE} ", REMOTE),  # spacing
        (f"LocalExecutor,RemoteExecutor:{REMOTE}", f"RemoteExecutor:{REMOTE},LocalExecutor"),  # order
        (f"LocalExecutor,RemoteExecutor:{REMOTE}", "LocalExecutor"),  # more executors here
    ],
)
def test_no_warning_when_every_name_resolves_here(agent_executor, caplog, agent, plane):
    agent_executor(agent)
    with caplog.at_level(logging.WARNING, "airflow_remote_execution.agent"):
        assert AgentWorker._check_executor_config(plane) == []
    assert not [r for r in caplog.records if "executor" in r.getMessage()]


def test_warns_naming_what_would_fail(agent_executor, caplog):
    agent_executor("LocalExecutor")
    with caplog.at_level(logging.WARNING, "airflow_remote_execution.agent"):
        missing = AgentWorker._check_executor_config(f"LocalExecutor,RemoteExecutor:{REMOTE}")
    assert missing == ["RemoteExecutor", REMOTE]
    (record,) = [r for r in caplog.records if "executor" in r.getMessage()]
    assert "executor='RemoteExecutor'" in record.getMessage() and "name no executor are not affected" in record.getMessage()
