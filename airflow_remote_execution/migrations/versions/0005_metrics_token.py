"""Read-only tokens for the fleet metrics and autoscaling routes (KEDA, Prometheus).

Revision ID: 0005_metrics_token
Revises: 0004_task_log_chunk
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from airflow.utils.sqlalchemy import UtcDateTime

revision = "0005_metrics_token"
down_revision = "0004_task_log_chunk"
branch_labels = None
depends_on = None


def upgrade():
    op.create_table(
        "remote_metrics_token",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("name", sa.String(250), nullable=False),
        sa.Column("secret_hash", sa.String(64), nullable=False),
        sa.Column("description", sa.String(1000)),
        sa.Column("created_at", UtcDateTime, nullable=False),
        sa.Column("expires_at", UtcDateTime),
        sa.Column("revoked_at", UtcDateTime),
        sa.Column("last_used_at", UtcDateTime),
    )


def downgrade():
    op.drop_table("remote_metrics_token")
