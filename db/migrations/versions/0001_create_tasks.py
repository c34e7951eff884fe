"""Create the tasks table, or adopt the one the pre-SQLAlchemy code wrote.

A legacy SQLite `tasks` table (text date-times from isoformat(), idx_tasks_* indexes, NULL counters, no
updated_at) is copied into the new layout in the same transaction: date-times rewritten as fixed-width UTC
text (the same instants), NULL counters as 0, updated_at from the latest known time, the design's indexes.

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

from db.errors import DatabaseError
from db.models.types import UTCDateTime, UUIDString, format_sqlite_datetime, parse_stored_datetime

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
DATETIMES = ("created_at", "started_at", "completed_at", "updated_at")
NORMALISE = "agent_utc_text"


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
    present = {column["name"] for column in sa.inspect(bind).get_columns("tasks")}
    # updated_at appears when the table was made by create_all() rather than by a migration.
    known = set(REQUIRED_LEGACY_COLUMNS) | set(OPTIONAL_LEGACY_COLUMNS) | set(COUNTERS) | {"updated_at"}
    missing = [name for name in REQUIRED_LEGACY_COLUMNS if name not in present]
    unknown = sorted(present - known)
    if missing or unknown:
        raise DatabaseError(
            f"the existing tasks table is not the pre-SQLAlchemy layout (missing: {missing or 'none'}, "
            f"unexpected: {unknown or 'none'}); it was left untouched"
        )
    failures: list[str] = []
    _register_normaliser(bind, failures)

    def source(name: str) -> str:
        if name not in present:
            return "0" if name in COUNTERS else "NULL"
        quoted = f'"{name}"'
        if name in COUNTERS:
            return f"COALESCE({quoted}, 0)"
        if name in DATETIMES:
            return f"{NORMALISE}(uuid, {quoted})"
        return quoted

    op.create_table("tasks_new", *_columns())
    targets = [*REQUIRED_LEGACY_COLUMNS, *OPTIONAL_LEGACY_COLUMNS, *COUNTERS]
    updated = ", ".join(source(name) for name in ("updated_at", "completed_at", "started_at", "created_at"))
    names = ", ".join(f'"{name}"' for name in targets)
    values = ", ".join(source(name) for name in targets)
    op.execute(f"INSERT INTO tasks_new ({names}, updated_at) SELECT {values}, COALESCE({updated}) FROM tasks")  # noqa: S608
    if failures:
        shown = "; ".join(failures[:5])
        raise DatabaseError(f"{len(failures)} stored date-times could not be read ({shown}); nothing was changed")
    op.drop_table("tasks")
    op.rename_table("tasks_new", "tasks")


def _register_normaliser(bind: sa.Connection, failures: list[str]) -> None:
    def normalise(task_uuid: str, value: object) -> object:
        if value is None:
            return None
        try:
            return format_sqlite_datetime(parse_stored_datetime(str(value)))
        except ValueError:
            failures.append(f"task {task_uuid}: {value!r}")
            return value

    driver_connection = bind.connection.driver_connection
    assert driver_connection is not None
    driver_connection.create_function(NORMALISE, 2, normalise, deterministic=True)
