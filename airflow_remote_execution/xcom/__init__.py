"""
Object-storage XCom backend (``airflow_remote_execution.xcom.ObjectStorageXComBackend``), its
``xcom gc`` and its doctor check (``xcom``). See docs/xcom.md.
"""

from __future__ import annotations

from airflow_remote_execution.xcom import check as _check  # noqa: F401 - registers the doctor check
from airflow_remote_execution.xcom.backend import ObjectStorageXComBackend
from airflow_remote_execution.xcom.store import XComStorageError

__all__ = ["ObjectStorageXComBackend", "XComStorageError"]
