"""Cluster-wide counters of plane events (requeues, lost agents, fencing conflicts) for Prometheus.

Revision ID: 0006_event_count
Revises: 0005_metrics_token
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006_event_count"
down_revision = "0005_metrics_token"
branch_labels = None
depends_on = None


def upgrade():
    op.create_table(
        "remote_event_count",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("queue", sa.String(256), primary_key=True),
        sa.Column("reason", sa.String(64), primary_key=True),
        sa.Column("value", sa.BigInteger, nullable=False),
    )


def downgrade():
    op.drop_table("remote_event_count")
