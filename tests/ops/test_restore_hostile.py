"""`db restore` of crafted backups: rows cross, schema never does; a refused backup changes nothing; the
integrity check and the row-count checks each refuse what they are there for."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import text

from db import DatabaseConfig, DatabaseConnection, DatabaseError, TaskRepository
from db.schema import upgrade_schema
from ops.backup import backup_database, restore_database
from tests.support.data import task_data


def database_with_tasks(path: Path, count: int) -> set[str]:
    connection = DatabaseConnection(DatabaseConfig(sqlite_path=str(path)))
    try:
        upgrade_schema(connection)
        repository = TaskRepository(connection)
        return {repository.create(task_data(user=f"user{index}")).uuid for index in range(count)}
    finally:
        connection.dispose()


def uuids(path: Path) -> set[str]:
    with sqlite3.connect(path) as raw:
        return {row[0] for row in raw.execute("SELECT uuid FROM tasks")}


def schema_of(path: Path) -> set[tuple[str, str]]:
    with sqlite3.connect(path) as raw:
        return {
            (row[0], row[1])
            for row in raw.execute("SELECT type, name FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'")
        }


@pytest.fixture
def target(tmp_path: Path) -> tuple[Path, set[str]]:
    path = tmp_path / "contexts" / "tasks.db"
    return path, database_with_tasks(path, 20)


def restore(path: Path, backup: Path) -> None:
    connection = DatabaseConnection(DatabaseConfig(sqlite_path=str(path)))
    try:
        restore_database(connection, backup)
    finally:
        connection.dispose()


def test_a_backup_brings_rows_and_never_its_triggers_views_tables_or_indexes(
    target: tuple[Path, set[str]], tmp_path: Path
) -> None:
    path, _ = target
    backup = tmp_path / "crafted.db"
    brought = database_with_tasks(backup, 21)
    with sqlite3.connect(backup) as raw:
        raw.execute("CREATE TRIGGER wipe AFTER INSERT ON tasks BEGIN DELETE FROM tasks WHERE uuid != NEW.uuid; END")
        raw.execute("CREATE VIEW every_task AS SELECT * FROM tasks")
        raw.execute("CREATE TABLE stowaway (x)")
        raw.execute("CREATE INDEX ix_backup_only ON tasks (hostname)")
    own_schema = schema_of(path)

    restore(path, backup)

    assert schema_of(path) == own_schema
    assert uuids(path) == brought
    connection = DatabaseConnection(DatabaseConfig(sqlite_path=str(path)))
    try:
        TaskRepository(connection).create(task_data())
    finally:
        connection.dispose()
    assert len(uuids(path)) == 22  # no trigger came across to wipe them


@pytest.mark.parametrize(
    ("change", "refusal"),
    [
        ("UPDATE tasks SET status = 'paused' WHERE rowid = 1", "status"),
        ("UPDATE tasks SET created_at = 'yesterday' WHERE rowid = 2", "created_at"),
        ("UPDATE tasks SET total_tokens = 'abc' WHERE rowid = 3", "total_tokens"),
        (
            "INSERT INTO tasks (uuid, task_source, owner, repo, task_type, task_id, status, created_at, updated_at) "
            "SELECT uuid, task_source, 'other', repo, task_type, task_id, status, created_at, updated_at FROM tasks "
            "WHERE rowid = 4",
            "uuid",
        ),
    ],
)
def test_a_backup_with_values_the_tasks_table_cannot_hold_is_refused_and_changes_nothing(
    target: tuple[Path, set[str]], tmp_path: Path, change: str, refusal: str
) -> None:
    path, kept = target
    backup = tmp_path / "loose.db"
    good = tmp_path / "good.db"
    database_with_tasks(good, 5)
    with sqlite3.connect(good) as raw:
        columns = ", ".join(f'"{row[1]}"' for row in raw.execute("PRAGMA table_info(tasks)"))
    with sqlite3.connect(backup) as raw:
        # The right names, no types or keys: any value fits.
        raw.execute(f"CREATE TABLE tasks ({columns})")
        raw.execute("CREATE TABLE alembic_version (version_num)")
        raw.execute("ATTACH DATABASE ? AS good", (str(good),))
        raw.execute("INSERT INTO tasks SELECT * FROM good.tasks")
        raw.execute("INSERT INTO alembic_version SELECT * FROM good.alembic_version")
        raw.commit()
        raw.execute("DETACH DATABASE good")
        raw.execute(change)
    before = path.read_bytes()
    with pytest.raises(DatabaseError) as refused:
        restore(path, backup)
    assert refusal in str(refused.value) and "cannot be restored" in str(refused.value)
    assert path.read_bytes() == before and uuids(path) == kept
    assert not list(path.parent.glob("*before-restore*"))


def test_a_backup_whose_index_disagrees_with_its_table_is_refused_as_damaged(
    target: tuple[Path, set[str]], tmp_path: Path
) -> None:
    path, kept = target
    backup = tmp_path / "inconsistent.db"
    database_with_tasks(backup, 30)
    with sqlite3.connect(backup) as raw:
        raw.execute("CREATE INDEX ix_owner ON tasks (owner)")
        raw.execute("PRAGMA writable_schema = ON")
        raw.execute("UPDATE sqlite_master SET sql = 'CREATE INDEX ix_owner ON tasks (user)' WHERE name = 'ix_owner'")
    with pytest.raises(DatabaseError, match="is damaged"):
        restore(path, backup)
    assert uuids(path) == kept


def test_a_target_that_drops_rows_as_they_come_fails_the_count_and_keeps_its_rows(
    target: tuple[Path, set[str]], tmp_path: Path
) -> None:
    path, kept = target
    backup = tmp_path / "backup.db"
    database_with_tasks(backup, 10)
    with sqlite3.connect(path) as raw:
        raw.execute(
            "CREATE TRIGGER drop_some BEFORE INSERT ON tasks WHEN NEW.user = 'user3' BEGIN SELECT RAISE(IGNORE); END"
        )
    with pytest.raises(DatabaseError, match="stored 9 of its 10 tasks"):
        restore(path, backup)
    assert uuids(path) == kept


@pytest.mark.parametrize("backend", ["postgresql"])
def test_postgresql_restore_fails_the_count_when_rows_go_missing(
    blank_connection: DatabaseConnection, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    upgrade_schema(blank_connection)
    repository = TaskRepository(blank_connection)
    for index in range(5):
        repository.create(task_data(user=f"user{index}"))
    monkeypatch.chdir(tmp_path)
    backup = backup_database(blank_connection, tmp_path / f"{uuid.uuid4().hex}.dump")
    kept = {repository.create(task_data(user="later")).uuid for _ in range(2)}
    with blank_connection.engine.begin() as conn:
        conn.execute(text("""DELETE FROM tasks WHERE "user" <> 'later'"""))
        conn.execute(
            text(
                "CREATE FUNCTION drop_some() RETURNS trigger LANGUAGE plpgsql AS "
                "$$ BEGIN IF NEW.\"user\" = 'user3' THEN RETURN NULL; END IF; RETURN NEW; END $$"
            )
        )
        conn.execute(text("CREATE TRIGGER drop_some BEFORE INSERT ON tasks FOR EACH ROW EXECUTE FUNCTION drop_some()"))
    try:
        with pytest.raises(DatabaseError, match="nothing was changed"):
            restore_database(blank_connection, backup)
        with blank_connection.engine.connect() as conn:
            assert {str(row[0]) for row in conn.execute(text("SELECT uuid FROM tasks"))} == kept
    finally:
        with blank_connection.engine.begin() as conn:
            conn.execute(text("DROP TRIGGER drop_some ON tasks"))
            conn.execute(text("DROP FUNCTION drop_some()"))


COLUMN_NAMES = [
    "uuid", "task_source", "owner", "repo", "task_type", "task_id", "status", "created_at", "updated_at",
    "started_at", "completed_at", "process_id", "hostname", "llm_provider", "model", "context_length",
    "llm_call_count", "tool_call_count", "total_tokens", "compression_count", "error_message", "user",
]  # fmt: skip
VALUES = st.one_of(
    st.none(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(),
    st.text(max_size=300),
    st.binary(max_size=20),
    st.sampled_from(["completed", "RUNNING", "2026-11-30T12:00:00+00:00", "2026-11-30 12:00:00", "0", "-1"]),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(changes=st.lists(st.tuples(st.integers(1, 6), st.sampled_from(COLUMN_NAMES), VALUES), max_size=3))
def test_whatever_values_a_backup_holds_the_restore_is_whole_or_refused_and_changes_nothing(
    tmp_path_factory: pytest.TempPathFactory, changes: list[tuple[int, str, object]]
) -> None:
    directory = tmp_path_factory.mktemp("restore")
    path = directory / "contexts" / "tasks.db"
    kept = database_with_tasks(path, 3)
    backup = directory / "backup.db"
    database_with_tasks(backup, 6)
    with sqlite3.connect(backup) as raw:
        # A loose copy of the table (no types, no keys), as a crafted backup would have it.
        columns = ", ".join(f'"{row[1]}"' for row in raw.execute("PRAGMA table_info(tasks)"))
        raw.execute(f"CREATE TABLE loose ({columns})")
        raw.execute("INSERT INTO loose SELECT * FROM tasks")
        raw.execute("DROP TABLE tasks")
        raw.execute("ALTER TABLE loose RENAME TO tasks")
        for row, column, value in changes:
            raw.execute(f'UPDATE tasks SET "{column}" = ? WHERE rowid = ?', (value, row))
    before = path.read_bytes()
    try:
        restore(path, backup)
    except DatabaseError as exc:
        assert "nothing was changed" in str(exc) or "cannot be restored" in str(exc)
        assert path.read_bytes() == before and uuids(path) == kept
        return
    connection = DatabaseConnection(DatabaseConfig(sqlite_path=str(path)))
    try:
        listed = TaskRepository(connection).list_tasks(limit=100)
    finally:
        connection.dispose()
    assert {task.uuid for task in listed} == uuids(path) and len(listed) >= 1


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.binary(max_size=4096))
def test_a_backup_of_any_bytes_is_refused_without_a_trace(
    tmp_path_factory: pytest.TempPathFactory, content: bytes
) -> None:
    directory = tmp_path_factory.mktemp("bytes")
    path = directory / "contexts" / "tasks.db"
    kept = database_with_tasks(path, 2)
    backup = directory / "backup.db"
    backup.write_bytes(content)
    with pytest.raises(DatabaseError):
        restore(path, backup)
    assert uuids(path) == kept


@pytest.mark.parametrize("how", ["the same path", "a link", "a hard link"])
def test_the_database_itself_is_no_backup(target: tuple[Path, set[str]], tmp_path: Path, how: str) -> None:
    path, kept = target
    backup = path if how == "the same path" else tmp_path / "alias.db"
    if how == "a link":
        backup.symlink_to(path)
    elif how == "a hard link":
        backup.hardlink_to(path)
    with pytest.raises(DatabaseError, match="is the database itself; nothing was changed"):
        restore(path, backup)
    assert uuids(path) == kept and not list(path.parent.glob("*before-restore*"))


def test_a_backup_with_several_schema_revisions_is_refused(target: tuple[Path, set[str]], tmp_path: Path) -> None:
    path, kept = target
    backup = tmp_path / "backup.db"
    database_with_tasks(backup, 3)
    with sqlite3.connect(backup) as raw:
        raw.execute("INSERT INTO alembic_version VALUES ('0001')")
    with pytest.raises(DatabaseError, match="records 2 schema revisions where there is one"):
        restore(path, backup)
    assert uuids(path) == kept


HOLDER = """
import sqlite3, sys
connection = sqlite3.connect(sys.argv[1], isolation_level=None)
connection.execute("PRAGMA journal_mode = DELETE")
connection.execute("BEGIN EXCLUSIVE")
print("holding", flush=True)
sys.stdin.readline()
"""


def test_a_backup_another_process_is_writing_is_said_to_be_busy(target: tuple[Path, set[str]], tmp_path: Path) -> None:
    path, kept = target
    backup = tmp_path / "backup.db"
    database_with_tasks(backup, 3)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(backup)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "holding\n"
        with pytest.raises(DatabaseError, match="is busy: another process is writing it"):
            restore(path, backup)
    finally:
        holder.communicate("done\n", timeout=30)
    assert uuids(path) == kept
