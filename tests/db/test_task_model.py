"""Task model: schema, types and validation, the same on every backend."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy import inspect, text

from db import DatabaseConnection, Task, TaskRepository, TaskStatus
from db.models.task import INT_MAX
from tests.support.data import EXPECTED_INDEXES, task_data

DESIGN_COLUMNS = [
    "uuid",
    "task_source",
    "owner",
    "repo",
    "task_type",
    "task_id",
    "status",
    "created_at",
    "started_at",
    "completed_at",
    "process_id",
    "hostname",
    "llm_provider",
    "model",
    "context_length",
    "llm_call_count",
    "tool_call_count",
    "total_tokens",
    "compression_count",
    "error_message",
    "user",
    "updated_at",
]
TOKYO = timezone(timedelta(hours=9))


def test_schema_has_the_design_columns_and_index_names(connection: DatabaseConnection) -> None:
    inspector = inspect(connection.engine)
    assert {column["name"] for column in inspector.get_columns("tasks")} == set(DESIGN_COLUMNS)
    indexes = {index["name"]: index["column_names"] for index in inspector.get_indexes("tasks")}
    assert indexes == EXPECTED_INDEXES
    assert inspector.get_pk_constraint("tasks")["constrained_columns"] == ["uuid"]


def test_postgresql_uses_native_uuid_and_timestamptz(connection: DatabaseConnection, backend: str) -> None:
    types = {column["name"]: str(column["type"]) for column in inspect(connection.engine).get_columns("tasks")}
    if backend == "postgresql":
        assert types["uuid"] == "UUID"
        assert types["created_at"] == "TIMESTAMP" and types["completed_at"] == "TIMESTAMP"
        with connection.engine.connect() as conn:
            kind = conn.execute(
                text(
                    "SELECT data_type FROM information_schema.columns "
                    "WHERE table_name = 'tasks' AND column_name = 'created_at'"
                )
            ).scalar()
        assert kind == "timestamp with time zone"
    else:
        assert types["uuid"] == "VARCHAR(36)"
    assert types["task_source"] == "VARCHAR(50)" and types["model"] == "VARCHAR(100)"


def test_defaults(make_task: Callable[..., Task]) -> None:
    task = make_task()
    assert task.status == TaskStatus.RUNNING.value
    assert [task.llm_call_count, task.tool_call_count, task.total_tokens, task.compression_count] == [0, 0, 0, 0]
    assert task.created_at.tzinfo is UTC and task.updated_at >= task.created_at
    assert task.completed_at is None


def test_uuid_is_canonical_lower_case(repo: TaskRepository) -> None:
    raw = uuid.uuid4()
    task = repo.create(task_data(uuid=str(raw).upper()))
    assert task.uuid == str(raw)
    fetched = repo.get_by_uuid(raw.hex.upper())
    assert fetched is not None and fetched.uuid == str(raw)


def test_datetimes_come_back_aware_utc_as_the_same_instant(repo: TaskRepository) -> None:
    started = datetime(2025, 11, 30, 21, 34, 56, 123456, tzinfo=TOKYO)
    task = repo.create(task_data(started_at=started))
    fetched = repo.get_by_uuid(task.uuid)
    assert fetched is not None and fetched.started_at is not None
    assert fetched.started_at == started
    assert fetched.started_at.utcoffset() == timedelta(0)
    assert fetched.started_at.isoformat() == "2025-11-30T12:34:56.123456+00:00"


def test_stored_form_is_utc(connection: DatabaseConnection, backend: str, repo: TaskRepository) -> None:
    task = repo.create(task_data(started_at=datetime(2025, 1, 2, 3, 4, 5, tzinfo=TOKYO)))
    if backend == "postgresql":
        query = "SELECT to_char(started_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS') FROM tasks WHERE uuid = :u"
        expected = "2025-01-01 18:04:05"
    else:
        # Fixed-width text, so that SQLite's text order is time order.
        query = "SELECT started_at FROM tasks WHERE uuid = :u"
        expected = "2025-01-01T18:04:05.000000+00:00"
    with connection.engine.connect() as conn:
        assert conn.execute(text(query), {"u": task.uuid}).scalar() == expected


@pytest.mark.parametrize("backend", ["sqlite-memory", "sqlite-file"])
def test_legacy_text_rows_read_back(connection: DatabaseConnection, repo: TaskRepository) -> None:
    key = str(uuid.uuid4())
    with connection.engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO tasks (uuid, task_source, owner, repo, task_type, task_id, status, created_at, "
                "updated_at, started_at) VALUES (:u, 'github', 'o', 'r', 'issue', '1', 'running', "
                "'2025-11-30T12:34:56+00:00', '2025-11-30T12:34:56.5', '2025-11-30T21:34:56.250000+09:00')"
            ),
            {"u": key},
        )
    task = repo.get_by_uuid(key)
    assert task is not None
    assert task.created_at == datetime(2025, 11, 30, 12, 34, 56, tzinfo=UTC)
    assert task.updated_at == datetime(2025, 11, 30, 12, 34, 56, 500000, tzinfo=UTC)
    assert task.started_at == datetime(2025, 11, 30, 12, 34, 56, 250000, tzinfo=UTC)


@pytest.mark.parametrize("column", ["task_source", "task_type", "task_id", "llm_provider"])
def test_string_lengths_are_enforced_at_the_limit(
    repo: TaskRepository, connection: DatabaseConnection, column: str
) -> None:
    limit = 50
    task = repo.create(task_data(**{column: "x" * limit}))
    assert getattr(task, column) == "x" * limit
    with pytest.raises(ValueError, match=f"{column} is 51 characters long; at most 50"):
        repo.create(task_data(**{column: "é" * (limit + 1)}))


def test_naive_datetime_is_refused(repo: TaskRepository) -> None:
    with pytest.raises(ValueError, match="started_at must be timezone-aware"):
        repo.create(task_data(started_at=datetime(2025, 1, 1, 12, 0)))  # noqa: DTZ001
    with pytest.raises(ValueError, match="must be timezone-aware"):
        Task(**task_data(completed_at=datetime.now()))  # noqa: DTZ005


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("uuid", "not-a-uuid", "not a valid UUID"),
        ("uuid", 12, "uuid must be a string"),
        ("status", "paused", "unknown task status 'paused'"),
        ("status", "RUNNING", "unknown task status"),
        ("llm_call_count", INT_MAX + 1, r"llm_call_count must be in 0\.\.2147483647"),
        ("llm_call_count", -1, "llm_call_count must be in"),
        ("total_tokens", "10", "total_tokens must be an integer"),
        ("process_id", True, "process_id must be an integer"),
        ("owner", None, "owner must not be None"),
        ("hostname", 3, "hostname must be a string"),
        ("started_at", "2025-01-01T00:00:00+00:00", "started_at must be a datetime"),
    ],
)
def test_bad_values_are_refused_before_any_sql(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Task(**task_data(**{field: value}))


def test_status_values_and_string_form() -> None:
    assert [status.value for status in TaskStatus] == ["running", "completed", "failed", "stopped"]
    assert str(TaskStatus.RUNNING) == "running"
    assert TaskStatus.parse("stopped") is TaskStatus.STOPPED


def test_to_dict_is_json_serialisable(repo: TaskRepository) -> None:
    task = repo.create(task_data(user="田中", started_at=datetime(2025, 5, 1, tzinfo=UTC), process_id=7))
    data = json.loads(json.dumps(task.to_dict()))
    assert data["user"] == "田中"
    assert data["started_at"] == "2025-05-01T00:00:00+00:00"
    assert data["process_id"] == 7
    assert set(data) == set(DESIGN_COLUMNS)


def test_updated_at_moves_on_update(repo: TaskRepository) -> None:
    task = repo.create(task_data())
    updated = repo.update(task.uuid, {"hostname": "worker-2"})
    assert updated is not None and updated.updated_at > task.updated_at
    assert updated.created_at == task.created_at
    repo.update_statistics(task.uuid, llm_calls=1)
    after_stats = repo.get_by_uuid(task.uuid)
    assert after_stats is not None and after_stats.updated_at > updated.updated_at
