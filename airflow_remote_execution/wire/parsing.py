"""Wire schemas of the parsing routes (``/v1/parsing/*``): what an agent's dag processor sends the plane.

The payloads carry exactly what Airflow's own ``DagFileProcessorManager`` hands its persistence
functions, so the plane can call those functions unchanged.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from airflow_remote_execution.wire.api import Strict

class BundleSyncRequest(Strict):
    bundles: list[str] = Field(min_length=1, description="Bundles the agent parses; each must be in its token.")


class BundleState(BaseModel):
    name: str
    last_refreshed: datetime | None = None
    version: str | None = None


class BundleSyncResponse(BaseModel):
    bundles: list[BundleState]


class BundleStateUpdate(Strict):
    last_refreshed: datetime
    version: str | None = Field(default=None, max_length=200, description="None: leave the stored version.")


class BundleFiles(Strict):
    observed_filelocs: list[str] = Field(
        description="Relative paths of the DAG files in the bundle now: DAGs and import errors of others go."
    )


class BundleFilesResponse(BaseModel):
    dags_deactivated: bool
    import_errors_cleared: int


class SerializedDagPayload(Strict):
    data: dict[str, Any] = Field(description="DagSerialization.to_dict() of the DAG, as the parser produced it.")
    last_loaded: datetime | None = None


class ParsingResult(Strict):
    """One parsed file: ``DagFileParsingResult`` plus the bundle version it was parsed at."""

    bundle_name: str = Field(min_length=1, max_length=250)
    bundle_version: str | None = Field(default=None, max_length=200)
    bundle_path: str | None = Field(default=None, max_length=2000, description="Where the bundle is on the agent.")
    version_data: dict[str, Any] | None = None
    relative_fileloc: str | None = Field(default=None, max_length=2000)
    run_duration: float = Field(ge=0)
    serialized_dags: list[SerializedDagPayload] = Field(default_factory=list)
    import_errors: dict[str, str] | None = None
    warnings: list[dict[str, Any]] | None = None
    source: str | None = Field(
        default=None, max_length=10_000_000, description="The file's source, only if the agent sends sources."
    )


class ParsingResultResponse(BaseModel):
    dag_ids: list[str]
    import_errors: int


class ClaimRequest(Strict):
    bundles: list[str] = Field(min_length=1)
    max_callbacks: int = Field(default=20, ge=0, le=1000)


class PriorityFile(BaseModel):
    bundle_name: str
    relative_fileloc: str


class ClaimResponse(BaseModel):
    """Work the plane queued for the agent's bundles; claimed (deleted on the plane) by this answer."""

    priority_files: list[PriorityFile] = Field(description="Re-parse requests (UI/API 'reparse').")
    callbacks: list[dict[str, Any]] = Field(
        description="Callback requests (DagCallbackRequest, TaskCallbackRequest, EmailRequest) as JSON."
    )


class ParsedFile(Strict):
    bundle_name: str = Field(min_length=1, max_length=250)
    relative_fileloc: str
    last_finish_time: datetime


class StaleCheckRequest(Strict):
    last_parsed: list[ParsedFile] = Field(default_factory=list)
    stale_dag_threshold: float = Field(ge=0, description="The agent's [dag_processor] stale_dag_threshold.")


class StaleCheckResponse(BaseModel):
    deactivated: list[str]
