"""Indexes that serve the listings: newest tasks of a status, newest tasks of a user.

`list_by_status` and `list_by_user` filter on one column and sort by created_at; with these the database
reads just the page asked for instead of sorting every matching row.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_tasks_status_created_at", "tasks", ["status", "created_at"])
    op.create_index("ix_tasks_user_created_at", "tasks", ["user", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_tasks_user_created_at", table_name="tasks")
    op.drop_index("ix_tasks_status_created_at", table_name="tasks")
