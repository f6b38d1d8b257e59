"""Executors. ``RemoteExecutor`` is importable from here (``[core] executor = ...executors.RemoteExecutor``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from airflow_remote_execution.executors.remote_executor import RemoteExecutor

__all__ = ["RemoteExecutor"]


def __getattr__(name: str):
    if name == "RemoteExecutor":
        from airflow_remote_execution.executors.remote_executor import RemoteExecutor

        return RemoteExecutor
    raise AttributeError(name)
