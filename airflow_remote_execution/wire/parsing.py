"""Wire schemas of the parsing routes (``/v1/parsing/*``): what an agent's dag processor sends the plane.

The payloads carry exactly what Airflow's own ``DagFileProcessorManager`` hands its persistence
functions, so the plane can call those functions unchanged.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, Field, StringConstraints, field_validator

from airflow_remote_execution.wire.api import Name, Strict, Timestamp

# Caps (each says what a real agent never exceeds; beyond it the request is a 422 naming the field).
MAX_BUNDLES = 1000  # bundles in one request
MAX_FILES = 100_000  # DAG files in one bundle / files in one stale check
MAX_DAGS_PER_FILE = 10_000  # dynamic DAG generators make thousands from one file
MAX_STALE_THRESHOLD = 10 * 365 * 86_400  # seconds: ten years
MAX_RUN_DURATION = 30 * 86_400  # seconds a parse took: thirty days
FilePath = Annotated[str, StringConstraints(max_length=2000)]  # a file path relative to its bundle, or the bundle's
# What Airflow's serialized-DAG schema allows at the top level (DagSerialization.validate_schema).
_DAG_TOP_LEVEL = {"__version", "dag", "client_defaults"}


class BundleSyncRequest(Strict):
    bundles: list[Name] = Field(
        min_length=1, max_length=MAX_BUNDLES, description="Bundles the agent parses (1-1000); each must be in its token."
    )


class BundleState(BaseModel):
    name: str
    last_refreshed: datetime | None = None
    version: str | None = None


class BundleSyncResponse(BaseModel):
    bundles: list[BundleState]


class BundleStateUpdate(Strict):
    last_refreshed: Timestamp = Field(description="When the agent refreshed the bundle; with its time zone.")
    version: str | None = Field(default=None, max_length=200, description="None: leave the stored version.")


class BundleFiles(Strict):
    observed_filelocs: list[FilePath] = Field(
        max_length=MAX_FILES,
        description="Relative paths (each ≤ 2000 characters, at most 100,000) of the DAG files in the bundle now: "
        "DAGs and import errors of others go.",
    )


class BundleFilesResponse(BaseModel):
    dags_deactivated: bool
    import_errors_cleared: int


class SerializedDagPayload(Strict):
    data: dict[str, Any] = Field(
        max_length=len(_DAG_TOP_LEVEL),
        description="DagSerialization.to_dict() of the DAG, as the parser produced it: {'__version': <int>, "
        "'dag': {'dag_id': <1-250 characters>, 'fileloc': <str>, 'tasks': [...], ...}, 'client_defaults'?: {...}}."
    )
    last_loaded: Timestamp | None = None

    @field_validator("data")
    @classmethod
    def _has_what_airflow_needs(cls, data: dict[str, Any]) -> dict[str, Any]:
        """The keys Airflow reads before its own schema validation (which the plane runs next)."""
        extra = sorted(set(data) - _DAG_TOP_LEVEL)
        if extra:
            raise ValueError(f"unexpected key(s) {extra}: a serialized DAG has only {sorted(_DAG_TOP_LEVEL)}")
        version = data.get("__version")
        if type(version) is not int or not 1 <= version <= 1000:
            raise ValueError("'__version' must be the serialization format version, an integer 1-1000")
        dag = data.get("dag")
        if not isinstance(dag, dict):
            raise ValueError("'dag' must be an object: DagSerialization.to_dict()['dag']")
        dag_id = dag.get("dag_id")
        if not isinstance(dag_id, str) or not 1 <= len(dag_id) <= 250:
            raise ValueError("'dag.dag_id' must be a string of 1-250 characters")
        if not isinstance(dag.get("fileloc"), str):
            raise ValueError("'dag.fileloc' must be a string: the DAG file's path")
        if not isinstance(dag.get("tasks"), list):
            raise ValueError("'dag.tasks' must be a list of serialized tasks")
        if "client_defaults" in data and not isinstance(data["client_defaults"], dict):
            raise ValueError("'client_defaults' must be an object")
        return data


class ParsingResult(Strict):
    """One parsed file: ``DagFileParsingResult`` plus the bundle version it was parsed at."""

    bundle_name: Name
    bundle_version: str | None = Field(default=None, max_length=200)
    bundle_path: str | None = Field(default=None, max_length=2000, description="Where the bundle is on the agent.")
    version_data: dict[str, Any] | None = Field(default=None, max_length=100, description="At most 100 keys.")
    relative_fileloc: str | None = Field(default=None, max_length=2000)
    run_duration: float = Field(ge=0, le=MAX_RUN_DURATION, description="Seconds the parse took (≤ 30 days).")
    serialized_dags: list[SerializedDagPayload] = Field(
        default_factory=list, max_length=MAX_DAGS_PER_FILE, description="At most 10,000 DAGs from one file."
    )
    import_errors: dict[FilePath, Annotated[str, StringConstraints(max_length=100_000)]] | None = Field(
        default=None, max_length=1000, description="File -> error text: at most 1000, each ≤ 100,000 characters."
    )
    warnings: list[Annotated[dict[str, Any], Field(max_length=20)]] | None = Field(
        default=None, max_length=1000, description="DagWarning rows: at most 1000 of ≤ 20 keys."
    )
    source: str | None = Field(
        default=None, max_length=10_000_000, description="The file's source, only if the agent sends sources."
    )


class ParsingResultResponse(BaseModel):
    dag_ids: list[str]
    import_errors: int


class ClaimRequest(Strict):
    bundles: list[Name] = Field(min_length=1, max_length=MAX_BUNDLES)
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
    bundle_name: Name
    relative_fileloc: FilePath
    last_finish_time: Timestamp = Field(description="When its last parse finished; with its time zone.")


class StaleCheckRequest(Strict):
    last_parsed: list[ParsedFile] = Field(default_factory=list, max_length=MAX_FILES, description="At most 100,000.")
    stale_dag_threshold: float = Field(
        ge=0,
        le=MAX_STALE_THRESHOLD,
        description="The agent's [dag_processor] stale_dag_threshold: seconds, finite, at most ten years.",
    )


class StaleCheckResponse(BaseModel):
    deactivated: list[str]
