"""Alembic migrations: a fresh schema equals the model, and legacy tasks.db files are adopted without loss."""

from __future__ import annotations

import multiprocessing
import sqlite3
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, select
from sqlalchemy.engine import URL

from db import Base, DatabaseConfig, DatabaseConnection, DatabaseError, Task, TaskRepository
from db.schema import LEGACY, SchemaNotCurrentError, schema_state, upgrade_schema
from db.startup import prepare_schema
from tests.support.data import task_data, url_config
from tools.legacy_db import COUNTER_COLUMNS, DATETIME_COLUMNS, as_instant, read_rows, write_legacy_db

DESIGN_INDEXES = {"ix_tasks_status", "ix_tasks_created_at", "ix_tasks_user", "ix_tasks_task_source_owner_repo"}
LISTING_INDEXES = {"ix_tasks_status_created_at", "ix_tasks_user_created_at"}


def model_diff(connection: DatabaseConnection) -> list[object]:
    with connection.engine.connect() as conn:
        return list(compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata))


def test_upgrade_creates_the_model_schema(blank_connection: DatabaseConnection) -> None:
    before = schema_state(blank_connection)
    assert before.current is None
    result = upgrade_schema(blank_connection)
    assert result.changed and result.backup is None
    assert schema_state(blank_connection).at_head
    assert model_diff(blank_connection) == []
    indexes = {index["name"] for index in inspect(blank_connection.engine).get_indexes("tasks")}
    assert indexes == DESIGN_INDEXES | LISTING_INDEXES
    again = upgrade_schema(blank_connection)
    assert not again.changed


def test_production_refuses_a_schema_that_is_not_at_head(blank_connection: DatabaseConnection) -> None:
    with pytest.raises(SchemaNotCurrentError, match=r"python main\.py db upgrade"):
        prepare_schema(blank_connection, "production")
    assert not inspect(blank_connection.engine).has_table("tasks")
    prepare_schema(blank_connection, "development")
    assert prepare_schema(blank_connection, "production").at_head


@pytest.fixture
def legacy_file(tmp_path: Path) -> tuple[Path, list[dict[str, object]]]:
    path = tmp_path / "tasks.db"
    return path, write_legacy_db(path, rows=1000, seed=7)


def _adopt(path: Path) -> tuple[DatabaseConnection, Path | None]:
    connection = DatabaseConnection.initialize(DatabaseConfig(sqlite_path=str(path)))
    assert schema_state(connection).current == LEGACY
    return connection, upgrade_schema(connection).backup


def test_legacy_file_is_adopted_without_losing_or_altering_a_value(
    legacy_file: tuple[Path, list[dict[str, object]]],
) -> None:
    path, written = legacy_file
    before = read_rows(path)
    connection, backup = _adopt(path)
    assert backup is not None and backup.parent == path.parent
    assert read_rows(backup) == before
    after = read_rows(path)
    assert len(after) == len(before) == len(written) == 1000
    for key, old in before.items():
        new = after[key]
        for column, value in old.items():
            if column in DATETIME_COLUMNS:
                assert as_instant(new[column]) == as_instant(value), (key, column)  # type: ignore[arg-type]
            elif column in COUNTER_COLUMNS:
                assert new[column] == (0 if value is None else value), (key, column)
            else:
                assert new[column] == value, (key, column)
        assert new["updated_at"] is not None
    assert sum(1 for row in before.values() if row["llm_call_count"] is None) > 0
    indexes = {index["name"] for index in inspect(connection.engine).get_indexes("tasks")}
    assert indexes == DESIGN_INDEXES | LISTING_INDEXES
    assert model_diff(connection) == []


def test_legacy_rows_read_through_the_repository(legacy_file: tuple[Path, list[dict[str, object]]]) -> None:
    path, written = legacy_file
    connection, _ = _adopt(path)
    repo = TaskRepository(connection)
    for row in written[:50]:
        task = repo.get_by_uuid(str(row["uuid"]))
        assert task is not None
        assert task.created_at == as_instant(str(row["created_at"]))
        assert task.created_at.tzinfo is UTC
    counts = repo.count_by_status()
    assert sum(counts.values()) == 1000


def test_legacy_and_new_rows_sort_and_filter_by_real_time(legacy_file: tuple[Path, list[dict[str, object]]]) -> None:
    path, written = legacy_file
    connection, _ = _adopt(path)
    repo = TaskRepository(connection)
    # The row stored as '...+09:00' or without microseconds must still fall in the right place.
    legacy = [row for row in written if row["status"] == "running"]
    anchor = min(legacy, key=lambda row: as_instant(str(row["created_at"])))  # type: ignore[arg-type, return-value]
    anchor_time = as_instant(str(anchor["created_at"]))
    assert anchor_time is not None
    earlier = repo.create(task_data(created_at=anchor_time - timedelta(seconds=1)))
    later = repo.create(task_data(created_at=anchor_time + timedelta(seconds=1)))
    running = []
    offset = 0
    while page := repo.list_by_status("running", limit=1000, offset=offset):
        running.extend(page)
        offset += len(page)
    times = [task.created_at for task in running]
    assert times == sorted(times, reverse=True)
    uuids = [task.uuid for task in running]
    assert uuids[-3:] == [later.uuid, anchor["uuid"], earlier.uuid]
    with connection.session_scope() as session:
        window = session.scalars(
            select(Task.uuid)
            .where(Task.created_at > anchor_time - timedelta(milliseconds=500))
            .where(Task.created_at < anchor_time + timedelta(milliseconds=500))
        ).all()
    assert window == [anchor["uuid"]]


def test_unreadable_legacy_datetime_leaves_the_file_untouched(tmp_path: Path) -> None:
    path = tmp_path / "tasks.db"
    write_legacy_db(path, rows=20, seed=1)
    with sqlite3.connect(path) as raw:
        raw.execute("UPDATE tasks SET started_at = 'yesterday-ish' WHERE rowid = 3")
    raw.close()
    before = read_rows(path)
    connection = DatabaseConnection.initialize(DatabaseConfig(sqlite_path=str(path)))
    refused = r"cannot be carried over(.|\n)*started_at .yesterday-ish.: write it as an ISO-8601"
    with pytest.raises(DatabaseError, match=refused):
        upgrade_schema(connection)
    assert read_rows(path) == before
    assert schema_state(connection).current == LEGACY


def test_foreign_tasks_table_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "tasks.db"
    with sqlite3.connect(path) as raw:
        raw.execute("CREATE TABLE tasks (id INTEGER PRIMARY KEY, title TEXT)")
    raw.close()
    connection = DatabaseConnection.initialize(DatabaseConfig(sqlite_path=str(path)))
    with pytest.raises(DatabaseError, match="not the pre-SQLAlchemy layout"):
        upgrade_schema(connection)


def _upgrade_in_child(url: str) -> None:
    DatabaseConnection.initialize(DatabaseConfig(url=url))
    upgrade_schema(DatabaseConnection.get_instance())
    assert schema_state(DatabaseConnection.get_instance()).at_head


def _race(url: str, processes: int = 4) -> None:
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_upgrade_in_child, args=(url,)) for _ in range(processes)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=180)
    assert [worker.exitcode for worker in workers] == [0] * processes


def test_agents_starting_together_on_a_legacy_file_migrate_it_once(tmp_path: Path) -> None:
    path = tmp_path / "tasks.db"
    write_legacy_db(path, rows=300, seed=3)
    before = read_rows(path)
    _race(f"sqlite:///{path}")
    backups = list(tmp_path.glob("tasks.before-*.db"))
    assert len(backups) == 1
    after = read_rows(path)
    assert after.keys() == before.keys()


def test_agents_starting_together_on_postgresql_migrate_it_once(postgres_url: URL) -> None:
    connection = DatabaseConnection.initialize(url_config(postgres_url))
    with connection.engine.begin() as raw:
        raw.exec_driver_sql("DROP TABLE IF EXISTS alembic_version")
    Base.metadata.drop_all(connection.engine)
    DatabaseConnection.reset()
    _race(postgres_url.render_as_string(hide_password=False))
    connection = DatabaseConnection.initialize(url_config(postgres_url))
    assert schema_state(connection).at_head
    assert model_diff(connection) == []
    TaskRepository(connection).create(task_data(uuid=str(uuid.uuid4()), created_at=datetime.now(UTC)))
