"""Task logs agents ship to the plane when no remote logging is configured (read by the UI).

Revision ID: 0004_task_log_chunk
Revises: 0003_work_item_bundle
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from airflow.utils.sqlalchemy import UtcDateTime

revision = "0004_task_log_chunk"
down_revision = "0003_work_item_bundle"
branch_labels = None
depends_on = None


def upgrade():
    op.create_table(
        "remote_task_log_chunk",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("dag_id", sa.String(250), nullable=False),
        sa.Column("run_id", sa.String(250), nullable=False),
        sa.Column("task_id", sa.String(250), nullable=False),
        sa.Column("map_index", sa.Integer, nullable=False),
        sa.Column("try_number", sa.Integer, nullable=False),
        sa.Column("source", sa.String(10), nullable=False),
        sa.Column("work_id", sa.Integer, nullable=False),
        sa.Column("fence", sa.Integer, nullable=False),
        sa.Column("start", sa.Integer, nullable=False),
        sa.Column("size", sa.Integer, nullable=False),
        sa.Column("text", sa.Text, nullable=False),
        sa.Column("agent_name", sa.String(250), nullable=False),
        sa.Column("created_at", UtcDateTime, nullable=False),
    )
    op.create_index(
        "idx_remote_task_log_chunk_piece",
        "remote_task_log_chunk",
        ["dag_id", "run_id", "task_id", "map_index", "try_number", "source", "work_id", "fence", "start"],
        unique=True,
    )
    op.create_index("idx_remote_task_log_chunk_created", "remote_task_log_chunk", ["created_at"])


def downgrade():
    op.drop_table("remote_task_log_chunk")
