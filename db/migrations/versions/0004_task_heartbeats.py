"""When each running task's agent last showed a sign of life, so that tasks whose agent died can be found.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from db.models.types import UTCDateTime, UUIDString

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "task_heartbeats",
        sa.Column("task_uuid", UUIDString(), nullable=False),
        sa.Column("beat_at", UTCDateTime(), nullable=False),
        sa.Column("hostname", sa.String(255), nullable=False),
        sa.Column("process_id", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("task_uuid", name="pk_task_heartbeats"),
    )


def downgrade() -> None:
    op.drop_table("task_heartbeats")
