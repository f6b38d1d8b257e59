"""Create the agent, agent token and work item tables.

Revision ID: 0001_initial
Revises:
Create Date: 2026-11-21
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from airflow.utils.sqlalchemy import UtcDateTime

revision = "0001_initial"
down_revision = None
branch_labels = None
depends_on = None


def upgrade():
    op.create_table(
        "remote_agent_token",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("agent_name", sa.String(250), nullable=False),
        sa.Column("queues", sa.JSON(), nullable=False),
        sa.Column("bundles", sa.JSON()),
        sa.Column("secret_hash", sa.String(64), nullable=False),
        sa.Column("description", sa.String(1000)),
        sa.Column("created_at", UtcDateTime(), nullable=False),
        sa.Column("expires_at", UtcDateTime()),
        sa.Column("revoked_at", UtcDateTime()),
        sa.Column("last_used_at", UtcDateTime()),
    )
    op.create_index("ix_remote_agent_token_agent_name", "remote_agent_token", ["agent_name"])
    op.create_table(
        "remote_agent",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(250), nullable=False, unique=True),
        sa.Column("state", sa.String(20), nullable=False),
        sa.Column("drained", sa.Boolean(), nullable=False),
        sa.Column("queues", sa.JSON(), nullable=False),
        sa.Column("concurrency", sa.Integer(), nullable=False),
        sa.Column("free_slots", sa.Integer(), nullable=False),
        sa.Column("hostname", sa.String(250)),
        sa.Column("versions", sa.JSON(), nullable=False),
        sa.Column("token_id", sa.String(32)),
        sa.Column("registered_at", UtcDateTime(), nullable=False),
        sa.Column("last_heartbeat_at", UtcDateTime()),
        sa.Column("last_lease_at", UtcDateTime()),
        sa.Column("sentinel_status", sa.String(20)),
        sa.Column("sentinel_report", sa.JSON()),
        sa.Column("sentinel_at", UtcDateTime()),
    )
    op.create_table(
        "remote_work_item",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("kind", sa.String(20), nullable=False),
        sa.Column("key_digest", sa.String(40), nullable=False),
        sa.Column("key", sa.JSON(), nullable=False),
        sa.Column("dag_id", sa.String(250)),
        sa.Column("run_id", sa.String(250)),
        sa.Column("queue", sa.String(256), nullable=False),
        sa.Column("priority_weight", sa.Integer(), nullable=False),
        sa.Column("workload", sa.Text(), nullable=False),
        sa.Column("state", sa.String(20), nullable=False),
        sa.Column("reported_state", sa.String(20)),
        sa.Column("report_pending", sa.Boolean(), nullable=False),
        sa.Column("fence", sa.Integer(), nullable=False),
        sa.Column("agent_id", sa.Integer(), sa.ForeignKey("remote_agent.id", ondelete="SET NULL")),
        sa.Column("agent_name", sa.String(250)),
        sa.Column("info", sa.Text()),
        sa.Column("queued_at", UtcDateTime(), nullable=False),
        sa.Column("leased_at", UtcDateTime()),
        sa.Column("lease_expires_at", UtcDateTime()),
        sa.Column("started_at", UtcDateTime()),
        sa.Column("finished_at", UtcDateTime()),
    )
    op.create_index(
        "idx_remote_work_item_lease", "remote_work_item", ["state", "queue", "priority_weight", "id"]
    )
    op.create_index("idx_remote_work_item_key", "remote_work_item", ["key_digest"])
    op.create_index("idx_remote_work_item_agent", "remote_work_item", ["agent_id", "state"])
    op.create_index("idx_remote_work_item_report", "remote_work_item", ["report_pending"])
    op.create_index("idx_remote_work_item_run", "remote_work_item", ["dag_id", "run_id"])
    op.create_table(
        "remote_agent_triggerer",
        sa.Column("job_id", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("agent_name", sa.String(250), nullable=False),
        sa.Column("queues", sa.JSON(), nullable=False),
        sa.Column("capacity", sa.Integer(), nullable=False),
        sa.Column("hostname", sa.String(250)),
        sa.Column("registered_at", UtcDateTime(), nullable=False),
    )
    op.create_index("idx_remote_agent_triggerer_agent", "remote_agent_triggerer", ["agent_name"])


def downgrade():
    op.drop_table("remote_agent_triggerer")
    op.drop_table("remote_work_item")
    op.drop_table("remote_agent")
    op.drop_table("remote_agent_token")
