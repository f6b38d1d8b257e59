"""Whether an XCom row still references an object: asked by ``xcom gc`` on the plane and by the plane's
``/xcom/live`` route for agents' ``xcom gc``. Needs the metadata DB."""

from __future__ import annotations

import json

from airflow_remote_execution.xcom.backend import is_reference
from airflow_remote_execution.xcom.store import Coordinates


def references(session, c: Coordinates, url: str) -> bool:
    """An XCom row at ``c`` holds a reference to ``url`` (same coordinates and same ``ref``)."""
    from sqlalchemy import select

    from airflow.models.xcom import XComModel

    values = session.scalars(
        select(XComModel.value).where(
            XComModel.dag_id == c.dag_id,
            XComModel.run_id == c.run_id,
            XComModel.task_id == c.task_id,
            XComModel.map_index == c.map_index,
            XComModel.key == c.key,
        )
    ).all()
    for value in values:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                continue
        if is_reference(value) and value.get("ref") == url:
            return True
    return False
