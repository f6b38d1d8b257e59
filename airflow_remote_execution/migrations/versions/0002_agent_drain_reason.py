"""Agents keep why, by whom and when an operator drained them.

Revision ID: 0002_agent_drain_reason
Revises: 0001_initial
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from airflow.utils.sqlalchemy import UtcDateTime

revision = "0002_agent_drain_reason"
down_revision = "0001_initial"
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table("remote_agent") as batch:
        batch.add_column(sa.Column("drain_reason", sa.String(500)))
        batch.add_column(sa.Column("drained_by", sa.String(250)))
        batch.add_column(sa.Column("drained_at", UtcDateTime()))


def downgrade():
    with op.batch_alter_table("remote_agent") as batch:
        batch.drop_column("drained_at")
        batch.drop_column("drained_by")
        batch.drop_column("drain_reason")
