"""db migrate-data: SQLite tasks.db (old or new layout) into every backend, idempotent and verified."""

from __future__ import annotations

import hashlib
import os
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import inspect
from sqlalchemy.engine import URL

from db import DatabaseConfig, DatabaseConnection, TaskRepository
from db.schema import schema_state, upgrade_schema
from ops.migrate_data import DataMigrationError, migrate_data
from tests.support.cli import run_here as run
from tests.support.data import all_tasks, task_data
from tools.legacy_db import COUNTER_COLUMNS, DATETIME_COLUMNS, as_instant, read_rows, write_legacy_db


@pytest.fixture
def legacy(tmp_path: Path) -> Path:
    path = tmp_path / "source" / "tasks.db"
    path.parent.mkdir()
    write_legacy_db(path, rows=1000, seed=11)
    return path


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_legacy_rows_arrive_intact_and_a_rerun_copies_nothing(
    blank_connection: DatabaseConnection, legacy: Path
) -> None:
    before = digest(legacy)
    report = migrate_data(str(legacy), blank_connection, batch_size=128)
    assert (report.source_rows, report.copied, report.skipped, report.differences) == (1000, 1000, 0, [])
    assert digest(legacy) == before
    stored = all_tasks(blank_connection)
    assert len(stored) == 1000
    for key, old in read_rows(legacy).items():
        new = stored[key].to_dict()
        for column, value in old.items():
            if column in DATETIME_COLUMNS:
                assert as_instant(new[column]) == as_instant(value), (key, column)
            elif column in COUNTER_COLUMNS:
                assert new[column] == (value or 0), (key, column)
            else:
                assert new[column] == value, (key, column)
    again = migrate_data(str(legacy), blank_connection)
    assert (again.copied, again.skipped, again.differences) == (0, 1000, [])
    replaced = migrate_data(str(legacy), blank_connection, overwrite=True)
    assert (replaced.copied, replaced.overwritten, replaced.differences) == (0, 1000, [])
    assert len(all_tasks(blank_connection)) == 1000


def test_dry_run_writes_nothing(blank_connection: DatabaseConnection, legacy: Path) -> None:
    report = migrate_data(str(legacy), blank_connection, dry_run=True)
    assert (report.dry_run, report.source_rows, report.copied) == (True, 1000, 1000)
    assert not inspect(blank_connection.engine).has_table("tasks")
    upgrade_schema(blank_connection)
    TaskRepository(blank_connection).create(task_data(uuid=next(iter(read_rows(legacy)))))
    report = migrate_data(str(legacy), blank_connection, dry_run=True)
    assert (report.copied, report.skipped) == (999, 1)
    assert len(all_tasks(blank_connection)) == 1


def test_a_conflicting_task_fails_verification_and_nothing_is_written(
    blank_connection: DatabaseConnection, legacy: Path
) -> None:
    upgrade_schema(blank_connection)
    key = next(iter(read_rows(legacy)))
    TaskRepository(blank_connection).create(task_data(uuid=key, owner="someone-else", total_tokens=1))
    report = migrate_data(str(legacy), blank_connection)
    assert report.differences and any(key in line and "owner" in line for line in report.differences)
    assert len(all_tasks(blank_connection)) == 1
    # The target's row is newer than the source's: --overwrite keeps it, and says so.
    kept = migrate_data(str(legacy), blank_connection, overwrite=True)
    assert (kept.copied, kept.overwritten, kept.kept_newer, kept.differences) == (999, 0, 1, [])
    assert all_tasks(blank_connection)[key].owner == "someone-else"
    fixed = migrate_data(str(legacy), blank_connection, overwrite=True, overwrite_newer=True)
    assert (fixed.copied, fixed.overwritten, fixed.kept_newer, fixed.differences) == (0, 1000, 0, [])
    assert all_tasks(blank_connection)[key].owner != "someone-else"


def test_current_layout_source_round_trips(blank_connection: DatabaseConnection, tmp_path: Path) -> None:
    source = tmp_path / "new.db"
    DatabaseConnection.reset()
    own = DatabaseConnection.initialize(DatabaseConfig(sqlite_path=str(source)))
    upgrade_schema(own)
    repo = TaskRepository(own)
    for index in range(25):
        task = repo.create(task_data(user=f"user{index % 3}", total_tokens=index * 1000, error_message="a\tb\\n\n"))
        repo.complete(task.uuid)
    expected = {key: task.to_dict() for key, task in all_tasks(own).items()}
    DatabaseConnection.reset()
    target = DatabaseConnection.initialize(blank_connection.config)
    report = migrate_data(str(source), target)
    assert report.differences == [] and report.copied == 25
    assert {key: task.to_dict() for key, task in all_tasks(target).items()} == expected


def test_unusable_sources_are_refused(blank_connection: DatabaseConnection, tmp_path: Path) -> None:
    with pytest.raises(DataMigrationError, match="no such file"):
        migrate_data(str(tmp_path / "missing.db"), blank_connection)
    text_file = tmp_path / "notes.txt"
    text_file.write_text("hello " * 100, encoding="utf-8")
    with pytest.raises(DataMigrationError, match="not a SQLite database"):
        migrate_data(str(text_file), blank_connection)
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as raw:
        raw.execute("CREATE TABLE tasks (id INTEGER PRIMARY KEY, title TEXT)")
    raw.close()
    with pytest.raises(DataMigrationError, match="not a task database"):
        migrate_data(f"sqlite:///{other}", blank_connection)
    with pytest.raises(DataMigrationError, match="only SQLite files"):
        migrate_data("postgresql://u@h/d", blank_connection)


def test_the_configured_database_itself_is_refused(legacy: Path) -> None:
    connection = DatabaseConnection.initialize(DatabaseConfig(sqlite_path=str(legacy)))
    with pytest.raises(DataMigrationError, match="is the configured database itself"):
        migrate_data(str(legacy), connection)


def test_unreadable_values_stop_the_copy_before_anything_is_written(
    blank_connection: DatabaseConnection, legacy: Path
) -> None:
    with sqlite3.connect(legacy) as raw:
        raw.execute("UPDATE tasks SET completed_at = 'soon' WHERE rowid = 500")
    raw.close()
    with pytest.raises(DataMigrationError, match="completed_at 'soon': write it as an ISO-8601 date-time"):
        migrate_data(str(legacy), blank_connection, batch_size=100)
    assert schema_state(blank_connection).current is None  # checked before anything, the schema included


@pytest.mark.parametrize(
    ("column", "value", "message"),
    [("status", "paused", "status 'paused': set one of"), ("owner", "o" * 300, "owner of 300 characters: shorten")],
)
def test_values_the_schema_would_refuse_are_named(
    blank_connection: DatabaseConnection, legacy: Path, column: str, value: Any, message: str
) -> None:
    with sqlite3.connect(legacy) as raw:
        raw.execute(f"UPDATE tasks SET {column} = ? WHERE rowid = 7", (value,))
    raw.close()
    with pytest.raises(DataMigrationError, match=message):
        migrate_data(str(legacy), blank_connection)


def test_cli_migrate_data_into_postgresql(tmp_path: Path, legacy: Path, postgres_url: URL) -> None:
    blank = DatabaseConnection.initialize(DatabaseConfig(url=postgres_url.render_as_string(hide_password=False)))
    with blank.engine.begin() as raw:
        raw.exec_driver_sql("DROP TABLE IF EXISTS tasks")
        raw.exec_driver_sql("DROP TABLE IF EXISTS task_operations")
        raw.exec_driver_sql("DROP TABLE IF EXISTS task_heartbeats")
        raw.exec_driver_sql("DROP TABLE IF EXISTS token_usage_buckets")
        raw.exec_driver_sql("DROP TABLE IF EXISTS alembic_version")
    DatabaseConnection.reset()
    env = {"DATABASE_URL": postgres_url.render_as_string(hide_password=False)}
    dry = run(tmp_path, "db", "migrate-data", "--from", str(legacy), "--dry-run", **env)
    assert dry.returncode == 0 and "would copy:  1000" in dry.stdout
    first = run(tmp_path, "db", "migrate-data", "--from", str(legacy), **env)
    assert first.returncode == 0, first.stderr
    assert "copied:      1000" in first.stdout and "verified:" in first.stdout and "rows/s" in first.stdout
    second = run(tmp_path, "db", "migrate-data", "--from", str(legacy), **env)
    assert "copied:      0" in second.stdout and "skipped:     1000" in second.stdout
    same = run(tmp_path, "db", "migrate-data", "--from", str(legacy), DATABASE_SQLITE_PATH=str(legacy))
    assert same.returncode == 1 and "configured database itself" in same.stderr
    assert str(postgres_url.password) not in first.stdout + first.stderr
    assert os.path.exists(legacy)
