"""Wire schemas of ``POST /remote_execution/v1/xcom/live``, asked by an agent's ``xcom gc``."""

from __future__ import annotations

from pydantic import BaseModel, Field


class XComObjectRef(BaseModel):
    dag_id: str
    run_id: str
    task_id: str
    map_index: int
    key: str
    ref: str = Field(description="The object URL as written in the XCom reference")


class LiveRequest(BaseModel):
    objects: list[XComObjectRef] = Field(max_length=1000)


class LiveResponse(BaseModel):
    live: list[bool] = Field(description="Per object, in order: an XCom row still references it")
