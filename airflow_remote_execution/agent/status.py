"""
The agent's published status: a small JSON record the sentinel (a separate process beside the
agent) reads to judge whether the agent is alive and doing its job.

The worker keeps timestamps in memory as lease calls and heartbeats succeed and writes the record
from its heartbeat loop (and at start and stop). Writes are atomic (temp file + rename), so a
reader never sees half a record. Timestamps are wall-clock UTC: two processes compare them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from datetime import datetime, timezone
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, Field

from airflow_remote_execution.agent import metrics

log = logging.getLogger(__name__)
DEFAULT_FILE_NAME = "remote-execution-agent.json"


def _now() -> datetime:
    return datetime.now(timezone.utc)


class AgentStatus(BaseModel):
    """What the agent says about itself; ``updated_at`` is when it last wrote this record."""

    pid: int
    pid_started: float = Field(description="The process's create time (psutil): a reused pid is not the agent.")
    name: str | None = Field(default=None, description="The agent's name once registered with the plane.")
    started_at: datetime
    updated_at: datetime
    last_poll_at: datetime | None = Field(default=None, description="Last lease request the plane answered.")
    wants_work_since: datetime | None = Field(
        default=None, description="Since when the agent has had free slots (and was not paused) without a break."
    )
    last_heartbeat_at: datetime | None = Field(default=None, description="Last heartbeat the plane answered.")
    running: int = 0
    concurrency: int = 0
    free_slots: int = 0
    paused: bool = False
    stopping: bool = False
    heartbeat_interval: float = 5.0
    long_poll_wait: float = 20.0
    request_timeout: float = 30.0
    last_error: str | None = None
    last_error_at: datetime | None = None

    def age(self, now: datetime | None = None) -> float:
        return ((now or _now()) - self.updated_at).total_seconds()


def status_path() -> Path:
    """``[remote_execution] status_file``, or ``$AIRFLOW_HOME/remote-execution-agent.json``."""
    from airflow.configuration import AIRFLOW_HOME

    from airflow_remote_execution import config

    configured = config.get("status_file").strip()
    return Path(configured).expanduser() if configured else Path(AIRFLOW_HOME) / DEFAULT_FILE_NAME


def write_status(path: Path, status: AgentStatus) -> None:
    """Write atomically: a temp file in the same directory, then rename over the old record."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(status.model_dump_json())
        os.chmod(tmp, 0o644)  # the sentinel may run as another user
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_status(path: Path) -> AgentStatus | None:
    """The last record, or None if the agent never wrote one; a damaged file is a ValueError."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    return AgentStatus.model_validate_json(text)


@dataclass(frozen=True)
class WorkerFigures:
    """What the worker knows of itself at one moment, handed to :meth:`StatusPublisher.publish`."""

    name: str | None
    running: int
    concurrency: int
    free_slots: int
    paused: bool
    stopping: bool
    heartbeat_interval: float
    long_poll_wait: float
    request_timeout: float


class StatusPublisher:
    """Held by the worker: ``poll_ok``/``heartbeat_ok``/``error`` are cheap in-memory updates;
    ``publish`` writes the record. Publishing never raises into the worker: a full disk must not
    stop heartbeats."""

    def __init__(self, path: Path | None = None) -> None:
        import psutil

        self.path = path or status_path()
        self.pid = os.getpid()
        self.pid_started = psutil.Process(self.pid).create_time()
        self.started_at = _now()
        self.last_poll_at: datetime | None = None
        self.last_heartbeat_at: datetime | None = None
        self.wants_work_since: datetime | None = None
        self.last_error: str | None = None
        self.last_error_at: datetime | None = None
        self._write_failed = False

    def poll_ok(self) -> None:
        self.last_poll_at = _now()

    def heartbeat_ok(self) -> None:
        self.last_heartbeat_at = _now()

    def error(self, what: str, detail: str) -> None:
        metrics.plane_error(what)
        self.last_error, self.last_error_at = f"{what}: {detail}"[:1000], _now()

    def snapshot(self, worker: WorkerFigures) -> AgentStatus:
        if worker.free_slots > 0 and not worker.paused and not worker.stopping:
            self.wants_work_since = self.wants_work_since or _now()
        else:
            self.wants_work_since = None
        return AgentStatus(
            pid=self.pid,
            pid_started=self.pid_started,
            name=worker.name,
            started_at=self.started_at,
            updated_at=_now(),
            last_poll_at=self.last_poll_at,
            wants_work_since=self.wants_work_since,
            last_heartbeat_at=self.last_heartbeat_at,
            running=worker.running,
            concurrency=worker.concurrency,
            free_slots=worker.free_slots,
            paused=worker.paused,
            stopping=worker.stopping,
            heartbeat_interval=worker.heartbeat_interval,
            long_poll_wait=worker.long_poll_wait,
            request_timeout=worker.request_timeout,
            last_error=self.last_error,
            last_error_at=self.last_error_at,
        )

    def publish(self, worker: WorkerFigures) -> None:
        metrics.figures(worker)
        try:
            write_status(self.path, self.snapshot(worker))
        except Exception as e:  # noqa: BLE001 - see class docstring
            if not self._write_failed:
                log.warning("Cannot write the agent status file %s (the sentinel reads it): %s", self.path, e)
            self._write_failed = True
            return
        if self._write_failed:
            log.info("Agent status file %s written again", self.path)
        self._write_failed = False
