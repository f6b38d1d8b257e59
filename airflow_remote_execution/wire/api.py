"""Wire schemas of the Remote Execution API, shared by the plane (FastAPI) and the agent (requests)."""

from __future__ import annotations

from datetime import datetime, timezone
from enum import Enum
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field, StringConstraints


class Strict(BaseModel):
    """A request body: unknown fields are a 422, and no float may be NaN or infinite."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


# ---------------------------------------------------------------------------------------------- bounds
# Every request field is bounded, so a malformed request is a 422 saying what is wrong, never a database
# error (a 500). Ids and fences are 32-bit INTEGER columns on the plane: at most 2**31 - 1.

INT32_MAX = 2**31 - 1
MAX_CONCURRENCY = 10_000  # an agent's concurrency cap, so also its free slots and running work items
DbId = Annotated[int, Field(ge=1, le=INT32_MAX)]
EARLIEST = datetime(1970, 1, 1, tzinfo=timezone.utc)
LATEST = datetime(2200, 1, 1, tzinfo=timezone.utc)


def _sane_time(value: datetime) -> datetime:
    if not EARLIEST <= value <= LATEST:
        raise ValueError(
            f"{value.isoformat()} is out of range: send a time between {EARLIEST:%Y-%m-%d} and {LATEST:%Y-%m-%d} "
            "(UTC), with its time zone (e.g. 2026-11-21T10:00:00+00:00); check the agent's clock"
        )
    return value.astimezone(timezone.utc)


# A point in time an agent sends: with its time zone (a naive time is a 422), between 1970 and 2200.
Timestamp = Annotated[AwareDatetime, AfterValidator(_sane_time)]
Name = Annotated[str, StringConstraints(min_length=1, max_length=250)]  # agent, bundle, host, DAG id
QueueName = Annotated[str, StringConstraints(min_length=1, max_length=256)]  # Airflow's task_instance.queue

# Agent names (tokens, the admin API, the CLI: plane/tokens.check_agent_name applies the same rule).
AGENT_NAME_PATTERN = r"^[\w.\-@]+$"
AGENT_NAME_MAX_LENGTH = 250


class WorkState(str, Enum):
    """States of a work item; transitions live in :mod:`airflow_remote_execution.plane.leases`."""

    QUEUED = "queued"  # waiting for an agent
    LEASED = "leased"  # handed to an agent, start not yet confirmed
    RUNNING = "running"  # agent confirmed the start
    SUCCESS = "success"
    FAILED = "failed"
    REVOKED = "revoked"  # taken back by the executor; the agent must not run (or must kill) it

    @property
    def finished(self) -> bool:
        return self in (WorkState.SUCCESS, WorkState.FAILED, WorkState.REVOKED)


class AgentState(str, Enum):
    """Liveness of an agent. Whether an operator drained it is a separate flag (``drained``)."""

    ACTIVE = "active"
    STOPPING = "stopping"  # shutting down (SIGTERM): finishing its work, leasing nothing
    OFFLINE = "offline"  # stopped cleanly
    LOST = "lost"  # missed lost_agent_threshold heartbeats


class RegisterRequest(Strict):
    name: str | None = Field(
        default=None, max_length=250, description="Must match the token's agent name if given."
    )
    queues: list[QueueName] | None = Field(
        default=None,
        max_length=1000,
        description="Queues to serve (at most 1000); a subset of the token's queues. Default: all of them.",
    )
    concurrency: int = Field(ge=1, le=MAX_CONCURRENCY)
    hostname: str = Field(default="", max_length=250)
    versions: dict[Annotated[str, StringConstraints(max_length=100)], Annotated[str, StringConstraints(max_length=250)]] = (
        Field(default_factory=dict, max_length=100, description="Package versions: at most 100, names ≤ 100 and "
              "versions ≤ 250 characters.")
    )
    running: list[DbId] = Field(
        default_factory=list,
        max_length=MAX_CONCURRENCY,
        description="Work this agent process still runs (when it registers again; at most the concurrency cap, "
        "10,000). Everything else the agent held is taken back: a restarted agent holds nothing.",
    )


class RegisterResponse(BaseModel):
    agent_id: int
    name: str
    queues: list[str]
    heartbeat_interval: float
    long_poll_wait: float
    core_executor: str = Field(default="", description="The plane's [core] executor setting.")
    warnings: list[str] = Field(default_factory=list, description="What the agent should log at start.")


class HeartbeatRequest(Strict):
    running: list[DbId] = Field(
        default_factory=list,
        max_length=MAX_CONCURRENCY,
        description="Work item ids the agent runs now (at most the concurrency cap, 10,000).",
    )
    free_slots: int = Field(ge=0, le=MAX_CONCURRENCY, description="Free slots (at most the concurrency cap, 10,000).")
    draining: bool = Field(default=False, description="The agent is shutting down: lease it nothing.")
    offline: bool = Field(default=False, description="The agent is stopping now (clean shutdown).")


class HeartbeatResponse(BaseModel):
    heartbeat_interval: float
    kill: list[int] = Field(description="Work item ids that are no longer this agent's: stop them.")
    drain: bool = Field(default=False, description="An operator drained this agent: lease nothing until resumed.")


class LeaseRequest(Strict):
    slots: int = Field(ge=1, le=1000, description="How many workloads the agent can take now.")
    wait: float = Field(default=20.0, ge=0, le=120, description="Seconds to wait for work if none is queued.")


class Lease(BaseModel):
    work_id: int
    fence: int
    kind: str
    queue: str
    workload: dict[str, Any]


class LeaseResponse(BaseModel):
    leases: list[Lease]


class FencedRequest(Strict):
    fence: int = Field(ge=1, le=INT32_MAX, description="The fencing token the work was leased with.")


class FinishRequest(FencedRequest):
    outcome: WorkState = Field(description="success or failed")
    info: str | None = Field(default=None, max_length=10_000)


class WorkStateResponse(BaseModel):
    work_id: int
    state: WorkState
    fence: int


class TaskProcess(Strict):
    """A task's process, forked and waiting for its start: what the execution API's start report needs."""

    pid: int = Field(ge=1, le=INT32_MAX)
    hostname: str = Field(max_length=1000)
    unixname: str = Field(max_length=1000)
    api_version: str = Field(max_length=100, description="The Task SDK's execution API version.")
    start_date: Timestamp | None = Field(
        default=None,
        description="The agent's clock when it asked to start the task (its process forked): the task's "
        "start_date, as a supervisor stamps its task's start before it asks. The plane keeps it between the "
        "lease and its confirmation (a skewed clock cannot move it outside); none: the confirmation's time.",
    )


class StartRequest(FencedRequest):
    task: TaskProcess | None = Field(
        default=None,
        description="For a task: have the plane make the execution API's start report once the lease is "
        "confirmed (one round trip instead of two).",
    )


class ExecutionApiReply(BaseModel):
    """The execution API's answer to the start report, passed through for the task's supervisor."""

    status: int
    headers: dict[str, str]
    body: str


class StartResponse(WorkStateResponse):
    task_run: ExecutionApiReply | None = Field(
        default=None,
        description="The execution API's answer to the start report; absent when the plane did not make it "
        "(no task in the request, or no execution API in this api-server): the supervisor reports itself.",
    )


class Problem(BaseModel):
    detail: str


class AgentInfo(BaseModel):
    id: int
    name: str
    state: str
    drained: bool
    drain_reason: str | None = Field(default=None, description="Why an operator drained it (cleared on resume).")
    drained_by: str | None = Field(default=None, description="Who drained it: the Airflow user, or '<os user> (cli)'.")
    drained_at: datetime | None = Field(default=None, description="When it was drained.")
    queues: list[str]
    concurrency: int
    free_slots: int
    running: int
    hostname: str | None
    versions: dict[str, str]
    registered_at: datetime
    last_heartbeat_at: datetime | None
    last_lease_at: datetime | None = Field(default=None, description="When the agent last leased work (to within 5 s).")
    sentinel_status: str | None = Field(default=None, description="Last sentinel report: ok, degraded or failing.")
    sentinel_at: datetime | None = Field(default=None, description="When the plane received that report.")
    sentinel_age: float | None = Field(default=None, description="Seconds since that report.")
    sentinel_stale: bool = Field(default=False, description="No report for 3 of the sentinel's intervals (+10 s).")
    sentinel_failing: list[str] = Field(default_factory=list, description="'check: detail' of each failing check.")


class DrainRequest(Strict):
    reason: str | None = Field(default=None, max_length=500, description="Why; shown wherever the agent is listed.")


class TokenInfo(BaseModel):
    id: str
    agent_name: str
    queues: list[str]
    bundles: list[str] = Field(default_factory=list, description="DAG bundles the agent may parse and write.")
    description: str | None
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None
    status: str


class TokenCreateRequest(Strict):
    agent_name: str = Field(
        min_length=1,
        max_length=AGENT_NAME_MAX_LENGTH,
        pattern=AGENT_NAME_PATTERN,
        description="Letters, digits, '_', '.', '-' and '@' (the CLI applies the same rule).",
    )
    queues: list[QueueName] = Field(min_length=1, max_length=1000)
    expires_in: str | None = Field(
        default=None, max_length=50, description="Lifetime such as 30d, 12h, 90m; none = never."
    )
    description: str | None = Field(default=None, max_length=1000)
    bundles: list[Name] | None = Field(
        default=None, max_length=1000, description="DAG bundles the agent may parse and write (at most 1000)."
    )


class TokenRotateRequest(Strict):
    expires_in: str | None = Field(default=None, max_length=50, description="Lifetime of the new token; none = never.")
    old_valid_for: str | None = Field(
        default=None, max_length=50, description="Overlap: the old token expires this long from now (e.g. 1h); none = until revoked."
    )


class TokenCreated(BaseModel):
    token: str = Field(description="Shown once; store it in the agent's secret store.")
    info: TokenInfo


class WorkItemInfo(BaseModel):
    id: int
    kind: str
    key: list[Any]
    queue: str
    state: WorkState
    fence: int
    agent_name: str | None
    queued_at: datetime
    leased_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    info: str | None


class WhoAmIResponse(BaseModel):
    """What the plane knows about the calling token: the doctor's token and clock checks."""

    agent_name: str
    token_id: str
    queues: list[str] = Field(description="Queues the token allows.")
    token_expires_at: datetime | None
    registered: bool = Field(description="An agent with this name has registered.")
    server_time: datetime = Field(description="The plane's clock (UTC) when it answered.")


class SentinelCheck(BaseModel):
    name: str = Field(max_length=100)
    ok: bool
    detail: str = Field(default="", max_length=2000)
    hint: str = Field(default="", max_length=2000)
    skipped: bool = False
    warning: bool = Field(default=False, description="Passes, but worth attention.")


class SentinelReport(Strict):
    """The sentinel's aggregate view of its agent; sent every ``interval`` seconds."""

    status: Literal["ok", "degraded", "failing"]
    checks: list[SentinelCheck] = Field(max_length=200)
    interval: float = Field(gt=0, le=86_400, description="Seconds until the next report: later means stale.")
    hostname: str = Field(default="", max_length=250)


class SentinelReportResponse(BaseModel):
    received_at: datetime
