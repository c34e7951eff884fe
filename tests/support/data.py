"""Task rows, connections and environments for tests."""

from __future__ import annotations

import os
import uuid
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.engine import URL

from db import Base, DatabaseConfig, DatabaseConnection, Task, TaskRepository


def child_environment() -> dict[str, str]:
    """The environment for a program a test starts: no DATABASE_* or APP_ENV of the shell. Under mutation
    testing's coverage pass (MUTANT_UNDER_TEST=stats), which only works inside its own directory, the child
    runs the code unmutated."""
    return {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("DATABASE_", "APP_ENV")) and not (key == "MUTANT_UNDER_TEST" and value == "stats")
    }


def url_config(url: URL, **overrides: Any) -> DatabaseConfig:
    return DatabaseConfig(url=url.render_as_string(hide_password=False), **overrides)


def empty_tasks_table(config: DatabaseConfig) -> DatabaseConnection:
    """The connection initialised with `config`, on an empty schema (the autouse fixture resets it)."""
    conn = DatabaseConnection.initialize(config)
    Base.metadata.drop_all(conn.engine)
    conn.create_tables()
    return conn


def task_data(**overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "uuid": str(uuid.uuid4()),
        "task_source": "github",
        "owner": "notfolder",
        "repo": "coding_agent",
        "task_type": "issue",
        "task_id": "42",
    }
    data.update(overrides)
    return data


def count_rows(connection: DatabaseConnection) -> int:
    with connection.session_scope() as session:
        return int(session.scalar(select(func.count()).select_from(Task)) or 0)


def all_tasks(connection: DatabaseConnection) -> dict[str, Task]:
    repo = TaskRepository(connection)
    tasks: dict[str, Task] = {}
    offset = 0
    while page := repo.list_tasks(limit=1000, offset=offset):
        tasks.update((task.uuid, task) for task in page)
        offset += len(page)
    return tasks


EXPECTED_INDEXES = {
    "ix_tasks_status": ["status"],
    "ix_tasks_created_at": ["created_at"],
    "ix_tasks_user": ["user"],
    "ix_tasks_task_source_owner_repo": ["task_source", "owner", "repo"],
    "ix_tasks_status_created_at": ["status", "created_at"],
    "ix_tasks_user_created_at": ["user", "created_at"],
}
