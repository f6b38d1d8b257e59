"""SQLAlchemy tables. Their own metadata, migrated by :mod:`.db` through Airflow's DB manager hook."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, BigInteger, Boolean, ForeignKey, Index, Integer, MetaData, String, Text, desc
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from airflow.models.base import _get_schema, naming_convention
from airflow.utils.sqlalchemy import UtcDateTime

metadata = MetaData(schema=_get_schema(), naming_convention=naming_convention)


class Base(DeclarativeBase):
    metadata = metadata


class AgentTokenModel(Base):
    """An agent token. Only a SHA-256 of the secret part is stored; the token names one agent."""

    __tablename__ = "remote_agent_token"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)  # public part of the token
    agent_name: Mapped[str] = mapped_column(String(250), nullable=False)
    queues: Mapped[list] = mapped_column(JSON, nullable=False)
    bundles: Mapped[list | None] = mapped_column(JSON)  # DAG bundles its dag processor may write; null: none
    secret_hash: Mapped[str] = mapped_column(String(64), nullable=False)
    description: Mapped[str | None] = mapped_column(String(1000))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, nullable=False)
    expires_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    last_used_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    # The token's agent once registered (none before): loaded with the token in one SELECT, as every
    # agent request needs both.
    agent: Mapped[AgentModel | None] = relationship(
        "AgentModel", primaryjoin="foreign(AgentTokenModel.agent_name) == AgentModel.name", viewonly=True,
        lazy="joined", uselist=False,
    )

    __table_args__ = (Index("ix_remote_agent_token_agent_name", "agent_name"),)


class AgentModel(Base):
    """An agent as last registered and heard from."""

    __tablename__ = "remote_agent"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(250), nullable=False, unique=True)
    state: Mapped[str] = mapped_column(String(20), nullable=False)
    drained: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)  # by an operator
    # Why, by whom and when it was drained (shown in the UI, `agents list` and the admin API); cleared on resume.
    drain_reason: Mapped[str | None] = mapped_column(String(500))
    drained_by: Mapped[str | None] = mapped_column(String(250))
    drained_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    queues: Mapped[list] = mapped_column(JSON, nullable=False)
    concurrency: Mapped[int] = mapped_column(Integer, nullable=False)
    free_slots: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    hostname: Mapped[str | None] = mapped_column(String(250))
    versions: Mapped[dict] = mapped_column(JSON, nullable=False, default=dict)
    token_id: Mapped[str | None] = mapped_column(String(32))
    registered_at: Mapped[datetime] = mapped_column(UtcDateTime, nullable=False)
    last_heartbeat_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    last_lease_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    # The sentinel beside the agent reports on its own schedule (also while the agent is down).
    sentinel_status: Mapped[str | None] = mapped_column(String(20))
    sentinel_report: Mapped[dict | None] = mapped_column(JSON)
    sentinel_at: Mapped[datetime | None] = mapped_column(UtcDateTime)


class WorkItemModel(Base):
    """
    One workload handed to agents: a task try, a callback or a connection test.

    State changes only through :mod:`airflow_remote_execution.plane.leases`. ``fence`` grows on every
    lease; a report must carry the fence it was leased with.
    """

    __tablename__ = "remote_work_item"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(20), nullable=False)
    key_digest: Mapped[str] = mapped_column(String(40), nullable=False)
    key: Mapped[list] = mapped_column(JSON, nullable=False)
    dag_id: Mapped[str | None] = mapped_column(String(250))  # tasks only: for filtering
    run_id: Mapped[str | None] = mapped_column(String(250))
    queue: Mapped[str] = mapped_column(String(256), nullable=False)
    # The DAG bundle of a task or callback: work of a bundle that agents parse goes only to agent tokens
    # that allow that bundle (see leases.lease).
    bundle: Mapped[str | None] = mapped_column(String(250))
    priority_weight: Mapped[int] = mapped_column(Integer, nullable=False, default=1)
    workload: Mapped[str] = mapped_column(Text, nullable=False)
    state: Mapped[str] = mapped_column(String(20), nullable=False)
    reported_state: Mapped[str | None] = mapped_column(String(20))
    # Set by every transition the executor must report; indexed so each scheduler loop reads
    # only what changed, not every finished item kept for ``finished_retention``.
    report_pending: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    fence: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    agent_id: Mapped[int | None] = mapped_column(ForeignKey("remote_agent.id", ondelete="SET NULL"))
    agent_name: Mapped[str | None] = mapped_column(String(250))
    info: Mapped[str | None] = mapped_column(Text)
    queued_at: Mapped[datetime] = mapped_column(UtcDateTime, nullable=False)
    leased_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    lease_expires_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    started_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UtcDateTime)

    __table_args__ = (
        # The lease order (priority_weight DESC, id): the top of a queue is read without a sort.
        Index("idx_remote_work_item_lease", "state", "queue", desc("priority_weight"), "id"),
        Index("idx_remote_work_item_finished", "finished_at"),
        Index("idx_remote_work_item_key", "key_digest"),
        Index("idx_remote_work_item_agent", "agent_id", "state"),
        Index("idx_remote_work_item_report", "report_pending"),
        Index("idx_remote_work_item_run", "dag_id", "run_id"),
    )


class AgentTriggererModel(Base):
    """A live agent triggerer. Its id is the Airflow ``Job`` id that ``trigger.triggerer_id`` points at
    (so the stock triggerer sees its triggers as taken); the row says which agent owns that Job."""

    __tablename__ = "remote_agent_triggerer"

    job_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    agent_name: Mapped[str] = mapped_column(String(250), nullable=False)
    queues: Mapped[list] = mapped_column(JSON, nullable=False)
    capacity: Mapped[int] = mapped_column(Integer, nullable=False)
    hostname: Mapped[str | None] = mapped_column(String(250))
    registered_at: Mapped[datetime] = mapped_column(UtcDateTime, nullable=False)

    __table_args__ = (Index("idx_remote_agent_triggerer_agent", "agent_name"),)


class TaskLogChunkModel(Base):
    """A piece of a task log an agent shipped to the plane (no remote logging configured): the bytes
    ``start`` to ``start + size`` of the log of one lease (``work_id``, ``fence``) of one task try, or of
    one of its triggers run by an agent triggerer.

    Unique per task try, lease and offset, so a retried upload (its answer lost) or two api-servers can
    never store a piece twice. Kept ``task_log_retention`` seconds; what the UI reads for agents' tasks."""

    __tablename__ = "remote_task_log_chunk"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    dag_id: Mapped[str] = mapped_column(String(250), nullable=False)
    run_id: Mapped[str] = mapped_column(String(250), nullable=False)
    task_id: Mapped[str] = mapped_column(String(250), nullable=False)
    map_index: Mapped[int] = mapped_column(Integer, nullable=False)
    try_number: Mapped[int] = mapped_column(Integer, nullable=False)
    # "task": work_id and fence name the lease; "trigger": the trigger id and the agent triggerer's job id.
    source: Mapped[str] = mapped_column(String(10), nullable=False)
    work_id: Mapped[int] = mapped_column(Integer, nullable=False)  # no foreign key: logs outlive work items
    fence: Mapped[int] = mapped_column(Integer, nullable=False)
    start: Mapped[int] = mapped_column(Integer, nullable=False)
    size: Mapped[int] = mapped_column(Integer, nullable=False)  # bytes of the agent's file this piece covers
    text: Mapped[str] = mapped_column(Text, nullable=False)
    agent_name: Mapped[str] = mapped_column(String(250), nullable=False)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, nullable=False)

    __table_args__ = (
        # The try first (the UI reads by it), the lease and offset last: work ids can repeat on SQLite
        # (a purged highest id is given again), so a lease alone does not name a log.
        Index(
            "idx_remote_task_log_chunk_piece", "dag_id", "run_id", "task_id", "map_index", "try_number", "source",
            "work_id", "fence", "start", unique=True,
        ),
        Index("idx_remote_task_log_chunk_created", "created_at"),
    )


class MetricsTokenModel(Base):
    """A read-only token for the fleet metrics and autoscaling routes (``rexm_<id>_<secret>``): it can read
    figures and nothing else, and no agent token can read them. Only a SHA-256 of the secret is stored."""

    __tablename__ = "remote_metrics_token"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)  # public part of the token
    name: Mapped[str] = mapped_column(String(250), nullable=False)  # who reads (e.g. keda, prometheus)
    secret_hash: Mapped[str] = mapped_column(String(64), nullable=False)
    description: Mapped[str | None] = mapped_column(String(1000))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, nullable=False)
    expires_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    last_used_at: Mapped[datetime | None] = mapped_column(UtcDateTime)


class EventCountModel(Base):
    """Plane events counted cluster-wide (requeues by queue and reason, lost agents, fencing conflicts),
    upserted in the transaction of the event, so every api-server's Prometheus text shows the same totals.
    ``queue`` and ``reason`` are ``""`` where the event has none."""

    __tablename__ = "remote_event_count"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    queue: Mapped[str] = mapped_column(String(256), primary_key=True, default="")
    reason: Mapped[str] = mapped_column(String(64), primary_key=True, default="")
    value: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
