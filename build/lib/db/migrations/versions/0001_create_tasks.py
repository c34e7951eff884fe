"""Create the tasks table, or adopt the one the pre-SQLAlchemy code wrote.

A legacy SQLite `tasks` table (text date-times from isoformat(), idx_tasks_* indexes, NULL counters, no
updated_at) is copied into the new layout in the same transaction, after every value of every row was checked
(db/legacy_rows.py): date-times rewritten as fixed-width UTC text (the same instants), NULL counters as 0,
updated_at from the latest known time, the design's indexes; the user's own triggers and indexes on the table
are made again. Any value that cannot be carried over stops it before anything changed, naming them all.

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlite3
from typing import Any

import sqlalchemy as sa
from alembic import context, op

from db.connection import describe_driver_error
from db.errors import DatabaseError
from db.legacy_rows import carried_rows, check_all
from db.models.types import UTCDateTime, UUIDString

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

REQUIRED_LEGACY_COLUMNS = ("uuid", "task_source", "owner", "repo", "task_type", "task_id", "status", "created_at")
OPTIONAL_LEGACY_COLUMNS = (
    "started_at",
    "completed_at",
    "process_id",
    "hostname",
    "llm_provider",
    "model",
    "context_length",
    "error_message",
    "user",
)
COUNTERS = ("llm_call_count", "tool_call_count", "total_tokens", "compression_count")


def _columns() -> list[Any]:
    return [
        sa.Column("uuid", UUIDString(), nullable=False),
        sa.Column("task_source", sa.String(50), nullable=False),
        sa.Column("owner", sa.String(255), nullable=False),
        sa.Column("repo", sa.String(255), nullable=False),
        sa.Column("task_type", sa.String(50), nullable=False),
        sa.Column("task_id", sa.String(50), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("started_at", UTCDateTime(), nullable=True),
        sa.Column("completed_at", UTCDateTime(), nullable=True),
        sa.Column("process_id", sa.Integer(), nullable=True),
        sa.Column("hostname", sa.String(255), nullable=True),
        sa.Column("llm_provider", sa.String(50), nullable=True),
        sa.Column("model", sa.String(100), nullable=True),
        sa.Column("context_length", sa.Integer(), nullable=True),
        *(sa.Column(name, sa.Integer(), server_default=sa.text("0"), nullable=False) for name in COUNTERS),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("user", sa.String(255), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("uuid", name="pk_tasks"),
    ]


def upgrade() -> None:
    bind = op.get_bind()
    if sa.inspect(bind).has_table("tasks"):
        _adopt_legacy_table(bind)
    else:
        op.create_table("tasks", *_columns())
    op.create_index("ix_tasks_status", "tasks", ["status"])
    op.create_index("ix_tasks_created_at", "tasks", ["created_at"])
    op.create_index("ix_tasks_user", "tasks", ["user"])
    op.create_index("ix_tasks_task_source_owner_repo", "tasks", ["task_source", "owner", "repo"])


def downgrade() -> None:
    op.drop_table("tasks")


def _adopt_legacy_table(bind: sa.Connection) -> None:
    if bind.dialect.name != "sqlite":
        raise DatabaseError(
            "a tasks table without migration history exists on this database; only SQLite files written by the "
            "pre-SQLAlchemy code can be adopted in place (copy other data with `python main.py db migrate-data`)"
        )
    present = [column["name"] for column in sa.inspect(bind).get_columns("tasks")]
    # updated_at appears when the table was made by create_all() rather than by a migration.
    known = set(REQUIRED_LEGACY_COLUMNS) | set(OPTIONAL_LEGACY_COLUMNS) | set(COUNTERS) | {"updated_at"}
    missing = [name for name in REQUIRED_LEGACY_COLUMNS if name not in present]
    unknown = sorted(set(present) - known)
    if missing:
        raise DatabaseError(
            f"the existing tasks table is not the pre-SQLAlchemy layout (missing: {', '.join(missing)}); "
            "nothing was changed"
        )
    if unknown:
        raise DatabaseError(
            f"the old tasks table has columns this code does not keep: {', '.join(unknown)}; nothing was changed. "
            "Move their data elsewhere and drop them (ALTER TABLE tasks DROP COLUMN ...), then start again"
        )
    raw = bind.connection.driver_connection
    assert isinstance(raw, sqlite3.Connection)
    checked = check_all(raw, present)
    if not checked.ok:
        raise DatabaseError(
            f"{len(checked.problems)} values of the old tasks table cannot be carried over; nothing was changed:\n"
            + checked.summary()
        )
    # What hangs on the table (the user's triggers and indexes) is dropped with it: kept here, made again below.
    # Other tables' foreign keys and views refer to `tasks` by name: the new table takes the name, and the
    # caller runs this with foreign keys off and legacy_alter_table on, so nothing cascades and no view is
    # checked against a table that is being replaced.
    dependents = [
        str(sql)
        for (sql,) in bind.exec_driver_sql(
            "SELECT sql FROM sqlite_master WHERE tbl_name = 'tasks' AND sql IS NOT NULL "
            "AND (type = 'trigger' OR (type = 'index' AND name NOT LIKE 'idx_tasks_%' AND name NOT LIKE 'ix_tasks_%'))"
        )
    ]
    op.create_table("tasks_new", *_columns())
    table = sa.table("tasks_new", *(sa.column(column.name, column.type) for column in _columns()[:-1]))
    for rows in carried_rows(raw, present):
        bind.execute(table.insert(), rows)
    op.drop_table("tasks")
    op.rename_table("tasks_new", "tasks")
    for sql in dependents:
        try:
            bind.exec_driver_sql(sql)
        except sa.exc.DBAPIError as exc:
            raise DatabaseError(
                f"the old tasks table's {sql.split('(')[0].strip()!r} cannot be made again on the new table "
                f"({describe_driver_error(exc)}); nothing was changed"
            ) from None
    context.config.attributes["renamed_tasks"] = dict(checked.renamed)
    context.config.attributes["merged_tasks"] = checked.merged
