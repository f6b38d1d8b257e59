"""Wire schemas of ``POST /remote_execution/v1/xcom/live``, asked by an agent's ``xcom gc``."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

# Airflow's xcom table: dag_id, run_id, task_id ≤ 250 characters (ID_LEN), key ≤ 512, map_index a 32-bit integer.


class XComObjectRef(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dag_id: str = Field(max_length=250)
    run_id: str = Field(max_length=250)
    task_id: str = Field(max_length=250)
    map_index: int = Field(ge=-1, le=2**31 - 1, description="-1 for an unmapped task")
    key: str = Field(max_length=512)
    ref: str = Field(max_length=4096, description="The object URL as written in the XCom reference")


class LiveRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    objects: list[XComObjectRef] = Field(max_length=1000, description="At most 1000 objects a request.")


class LiveResponse(BaseModel):
    live: list[bool] = Field(description="Per object, in order: an XCom row still references it")
