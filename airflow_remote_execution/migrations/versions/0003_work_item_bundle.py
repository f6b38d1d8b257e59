"""Work items carry their DAG bundle (a bundle agents parse is served only by tokens that allow it); the
lease index matches the lease order (priority DESC), and finished items are found by finished_at.

Revision ID: 0003_work_item_bundle
Revises: 0002_agent_drain_reason
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_work_item_bundle"
down_revision = "0002_agent_drain_reason"
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table("remote_work_item") as batch:
        batch.add_column(sa.Column("bundle", sa.String(250)))
        batch.drop_index("idx_remote_work_item_lease")
        batch.create_index(
            "idx_remote_work_item_lease", ["state", "queue", sa.desc("priority_weight"), "id"]
        )
        batch.create_index("idx_remote_work_item_finished", ["finished_at"])


def downgrade():
    with op.batch_alter_table("remote_work_item") as batch:
        batch.drop_index("idx_remote_work_item_finished")
        batch.drop_index("idx_remote_work_item_lease")
        batch.create_index("idx_remote_work_item_lease", ["state", "queue", "priority_weight", "id"])
        batch.drop_column("bundle")
