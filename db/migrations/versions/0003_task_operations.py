"""The ids of counter increments that took effect, so that an increment sent again counts once.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from db.models.types import UTCDateTime, UUIDString

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "task_operations",
        sa.Column("operation_id", UUIDString(), nullable=False),
        sa.Column("recorded_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("operation_id", name="pk_task_operations"),
    )
    op.create_index("ix_task_operations_recorded_at", "task_operations", ["recorded_at"])


def downgrade() -> None:
    op.drop_index("ix_task_operations_recorded_at", table_name="task_operations")
    op.drop_table("task_operations")
