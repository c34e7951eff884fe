"""Old tasks.db files as users have them, not only as the last old version wrote them: adoption in place and
`db migrate-data` check every value, carry over what has a way through, keep what hangs on the table, and
refuse the rest naming it, leaving the file byte for byte as it was."""

from __future__ import annotations

import hashlib
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from db import DatabaseConfig, DatabaseConnection, TaskRepository
from db.legacy_rows import LEGACY_NAMESPACE
from db.schema import upgrade_schema
from ops.migrate_data import DataMigrationError, migrate_data
from tests.support.cli import assert_one_line_error, run_here
from tests.support.data import all_tasks
from tools.legacy_db import COLUMNS, write_legacy_db


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def legacy_file(
    path: Path, rows: int = 5, *, change: Callable[[sqlite3.Connection, list[str]], None] | None = None
) -> list[str]:
    """A legacy tasks.db with `rows` rows, then `change(connection, uuids)` applied; the uuids written."""
    written = write_legacy_db(path, rows)
    uuids = [str(row["uuid"]) for row in written]
    if change is not None:
        connection = sqlite3.connect(path)
        try:
            change(connection, uuids)
            connection.commit()
        finally:
            connection.close()
    return uuids


def adopt(path: Path) -> DatabaseConnection:
    connection = DatabaseConnection.initialize(DatabaseConfig(sqlite_path=str(path)))
    upgrade_schema(connection)
    return connection


# 1. An older file without optional columns


def _without(*dropped: str) -> Callable[[sqlite3.Connection, list[str]], None]:
    def change(connection: sqlite3.Connection, _uuids: list[str]) -> None:
        for name in dropped:
            connection.execute("DROP INDEX IF EXISTS idx_tasks_user")
            connection.execute(f'ALTER TABLE tasks DROP COLUMN "{name}"')

    return change


def test_an_older_file_without_optional_columns_is_copied_and_verified(
    blank_connection: DatabaseConnection, tmp_path: Path
) -> None:
    source = tmp_path / "old.db"
    uuids = legacy_file(source, 5, change=_without("user", "error_message", "started_at"))
    dry = migrate_data(str(source), blank_connection, dry_run=True)
    assert (dry.copied, dry.differences) == (5, [])
    report = migrate_data(str(source), blank_connection)
    assert (report.copied, report.differences) == (5, [])
    tasks = all_tasks(blank_connection)
    assert set(tasks) == set(uuids) and all(task.user is None and task.started_at is None for task in tasks.values())


# 2. What references or hangs on the table is kept


def _user_objects(connection: sqlite3.Connection, uuids: list[str]) -> None:
    connection.execute("PRAGMA foreign_keys = ON")
    connection.execute(
        "CREATE TABLE task_notes (id INTEGER PRIMARY KEY, note TEXT, "
        "task TEXT REFERENCES tasks(uuid) ON DELETE CASCADE)"
    )
    connection.execute(
        "CREATE TABLE task_links (id INTEGER PRIMARY KEY, task TEXT REFERENCES tasks(uuid) ON DELETE SET NULL)"
    )
    connection.executemany("INSERT INTO task_notes (task, note) VALUES (?, ?)", [(key, f"note {key}") for key in uuids])
    connection.executemany("INSERT INTO task_links (task) VALUES (?)", [(key,) for key in uuids])
    connection.execute("CREATE TABLE audit (task TEXT, status TEXT)")
    connection.execute(
        "CREATE TRIGGER tasks_audit AFTER UPDATE OF status ON tasks BEGIN "
        "INSERT INTO audit VALUES (new.uuid, new.status); END"
    )
    connection.execute("CREATE INDEX my_tasks_model ON tasks(model)")
    connection.execute("CREATE VIEW v_running AS SELECT uuid FROM tasks WHERE status = 'running'")


def test_adoption_keeps_foreign_keys_triggers_indexes_and_views(tmp_path: Path) -> None:
    path = tmp_path / "tasks.db"
    uuids = legacy_file(path, 6, change=_user_objects)
    connection = adopt(path)
    raw = sqlite3.connect(path)
    try:
        assert raw.execute("SELECT count(*) FROM task_notes").fetchone()[0] == 6
        assert raw.execute("SELECT count(*) FROM task_links WHERE task IS NOT NULL").fetchone()[0] == 6
        names = {row[0] for row in raw.execute("SELECT name FROM sqlite_master WHERE tbl_name = 'tasks'")}
        assert {"tasks_audit", "my_tasks_model", "ix_tasks_status"} <= names
        raw.execute("SELECT * FROM v_running").fetchall()
        assert raw.execute("PRAGMA foreign_key_check").fetchall() == []
    finally:
        raw.close()
    assert TaskRepository(connection).update_status(uuids[0], "stopped")
    raw = sqlite3.connect(path)
    try:
        assert raw.execute("SELECT status FROM audit").fetchall() == [("stopped",)]
    finally:
        raw.close()


# 3. Every value checked: ways through, and refusals that name task, column and value


def _set(sql: str, *parameters: Any) -> Callable[[sqlite3.Connection, list[str]], None]:
    def change(connection: sqlite3.Connection, _uuids: list[str]) -> None:
        connection.execute(sql, parameters)

    return change


def _loosened(then: Callable[[sqlite3.Connection, list[str]], None]) -> Callable[[sqlite3.Connection, list[str]], None]:
    """created_at is NOT NULL in the old schema: a file where it is NULL was made with a looser table."""

    def change(connection: sqlite3.Connection, uuids: list[str]) -> None:
        connection.execute("CREATE TABLE t2 AS SELECT * FROM tasks")
        connection.execute("DROP TABLE tasks")
        connection.execute("ALTER TABLE t2 RENAME TO tasks")
        then(connection, uuids)

    return change


@pytest.mark.parametrize(
    ("change", "column", "fragment"),
    [
        (_set("UPDATE tasks SET hostname = CAST(X'6869FF' AS TEXT) WHERE rowid = 2"), "hostname", "not UTF-8"),
        (_set("UPDATE tasks SET status = 'paused' WHERE rowid = 2"), "status", "'paused'"),
        (_set("UPDATE tasks SET status = '' WHERE rowid = 2"), "status", "''"),
        (_set("UPDATE tasks SET total_tokens = 3000000000 WHERE rowid = 2"), "total_tokens", "3000000000"),
        (_set("UPDATE tasks SET llm_call_count = 12.5 WHERE rowid = 2"), "llm_call_count", "12.5"),
        (_set("UPDATE tasks SET tool_call_count = 'many' WHERE rowid = 2"), "tool_call_count", "'many'"),
        (_set("UPDATE tasks SET model = ? WHERE rowid = 2", "m" * 101), "model", "of 101 characters"),
        (_set("UPDATE tasks SET started_at = '0001-01-01T00:00:00+05:00' WHERE rowid = 2"), "started_at", "0001"),
        (_set("UPDATE tasks SET created_at = NULL WHERE rowid = 2"), "created_at", "None"),
    ],
)
def test_a_value_that_cannot_be_carried_is_named_and_changes_nothing(
    blank_connection: DatabaseConnection, tmp_path: Path, change: Callable[..., None], column: str, fragment: str
) -> None:
    if column == "created_at":
        change = _loosened(change)
    source = tmp_path / "odd.db"
    uuids = legacy_file(source, 4, change=change)
    before = digest(source)
    for dry_run in (True, False):
        with pytest.raises(DataMigrationError, match=rf"task {uuids[1]}: {column} .*{fragment}") as refused:
            migrate_data(str(source), blank_connection, dry_run=dry_run)
        assert "nothing was written" in str(refused.value)
    assert digest(source) == before
    adopted = tmp_path / "contexts" / "tasks.db"
    adopted.parent.mkdir()
    adopted.write_bytes(source.read_bytes())
    DatabaseConnection.reset()  # the command starts the one database of its process: this test's is done
    result = run_here(tmp_path)
    assert_one_line_error(result, "cannot be carried over")
    assert f"task {uuids[1]}: {column}" in result.stderr
    assert digest(adopted) == before
    assert sorted(path.name for path in adopted.parent.iterdir()) == ["tasks.db", "tasks.db.migrate.lock"]


def test_every_problem_is_reported_at_once(blank_connection: DatabaseConnection, tmp_path: Path) -> None:
    def many(connection: sqlite3.Connection, uuids: list[str]) -> None:
        connection.execute("UPDATE tasks SET status = 'paused' WHERE rowid IN (1, 2, 3)")
        connection.execute("UPDATE tasks SET total_tokens = -1 WHERE rowid = 4")

    source = tmp_path / "odd.db"
    legacy_file(source, 6, change=many)
    with pytest.raises(DataMigrationError, match=r"^4 values") as refused:
        migrate_data(str(source), blank_connection, dry_run=True)
    assert str(refused.value).count("\ntask ") == 4


def _reshaped(connection: sqlite3.Connection, uuids: list[str]) -> None:
    connection.execute("UPDATE tasks SET uuid = upper(uuid), status = upper(status) WHERE rowid = 1")
    connection.execute("UPDATE tasks SET uuid = 'test-uuid-123' WHERE rowid = 2")
    connection.execute("UPDATE tasks SET error_message = 'out' || char(0) || 'put', task_id = 42 WHERE rowid = 3")
    connection.execute("UPDATE tasks SET llm_call_count = '12', tool_call_count = 7.0 WHERE rowid = 3")
    # An identical duplicate in another case: merged.
    columns = ", ".join(f'"{name}"' for name in COLUMNS if name != "uuid")
    connection.execute(f"INSERT INTO tasks SELECT lower(uuid), {columns} FROM tasks WHERE rowid = 1")


def test_ids_case_and_duplicates_have_a_way_through(blank_connection: DatabaseConnection, tmp_path: Path) -> None:
    source = tmp_path / "odd.db"
    uuids = legacy_file(source, 4, change=_reshaped)
    report = migrate_data(str(source), blank_connection)
    assert (report.copied, report.merged, report.differences) == (4, 1, [])
    mapped = str(uuid.uuid5(LEGACY_NAMESPACE, "test-uuid-123"))
    assert report.renamed == {uuids[0].upper(): uuids[0], "test-uuid-123": mapped}
    tasks = all_tasks(blank_connection)
    assert set(tasks) == {uuids[0], mapped, uuids[2], uuids[3]}
    assert tasks[uuids[0]].status in ("running", "completed", "failed", "stopped")
    third = tasks[uuids[2]]
    assert (third.error_message, third.task_id, third.llm_call_count, third.tool_call_count) == ("out␀put", "42", 12, 7)
    again = migrate_data(str(source), blank_connection)
    assert (again.copied, again.skipped, again.differences) == (0, 4, [])


def test_adoption_takes_the_same_ways_through_and_writes_the_mapping(tmp_path: Path) -> None:
    path = tmp_path / "contexts" / "tasks.db"
    path.parent.mkdir()
    uuids = legacy_file(path, 4, change=_reshaped)
    result = run_here(tmp_path)
    assert result.returncode == 0, result.stderr
    [mapping] = list(path.parent.glob("tasks.uuid-map-*.csv"))
    assert mapping.read_text(encoding="utf-8").splitlines()[1:] == sorted(
        [f"{uuids[0].upper()},{uuids[0]}", f"test-uuid-123,{uuid.uuid5(LEGACY_NAMESPACE, 'test-uuid-123')}"]
    )
    shown = run_here(tmp_path, "tasks", "show", uuids[0].upper())
    assert shown.returncode == 0 and uuids[0] in shown.stdout
    listed = run_here(tmp_path, "tasks", "list", "--json")
    assert listed.stdout.count('"uuid"') == 4


def test_differing_duplicates_are_refused(blank_connection: DatabaseConnection, tmp_path: Path) -> None:
    def twins(connection: sqlite3.Connection, uuids: list[str]) -> None:
        columns = ", ".join(f'"{name}"' for name in COLUMNS if name not in ("uuid", "owner"))
        connection.execute(
            f"INSERT INTO tasks (uuid, owner, {columns}) "
            f"SELECT upper(uuid), 'other', {columns} FROM tasks WHERE rowid = 1"
        )

    source = tmp_path / "odd.db"
    uuids = legacy_file(source, 3, change=twins)
    with pytest.raises(DataMigrationError, match=f"the same task as '{uuids[0]}'"):
        migrate_data(str(source), blank_connection)


# 4. A refused or failed attempt leaves the file byte for byte


def test_refused_and_reading_commands_leave_an_old_file_byte_for_byte(tmp_path: Path) -> None:
    path = tmp_path / "contexts" / "tasks.db"
    path.parent.mkdir()
    legacy_file(path, 5)
    before = digest(path)
    assert_one_line_error(run_here(tmp_path, APP_ENV="production"), "python main.py db upgrade")
    assert run_here(tmp_path, "db", "current").returncode == 0
    assert run_here(tmp_path, "db", "check").returncode == 1
    assert digest(path) == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["tasks.db"]


# 5. A column the user added is never dropped silently


def test_a_users_own_column_is_refused_unless_left_behind(blank_connection: DatabaseConnection, tmp_path: Path) -> None:
    source = tmp_path / "odd.db"
    legacy_file(source, 3, change=_set("ALTER TABLE tasks ADD COLUMN notes TEXT DEFAULT 'kept'"))
    with pytest.raises(DataMigrationError, match=r"notes.*--leave-behind notes"):
        migrate_data(str(source), blank_connection, dry_run=True)
    report = migrate_data(str(source), blank_connection, leave_behind=["notes"])
    assert (report.copied, report.differences) == (3, [])
    adopted = tmp_path / "contexts" / "tasks.db"
    adopted.parent.mkdir()
    adopted.write_bytes(source.read_bytes())
    DatabaseConnection.reset()  # the command starts the one database of its process: this test's is done
    assert_one_line_error(run_here(tmp_path), "columns this code does not keep: notes")


# 6. Clear errors: a hot journal on a source


def test_a_source_with_an_unfinished_write_is_refused_clearly(
    blank_connection: DatabaseConnection, tmp_path: Path
) -> None:
    source = tmp_path / "odd.db"
    legacy_file(source, 2)
    source.with_name("odd.db-journal").write_bytes(b"\xd9\xd5\x05\xf9\x20\xa1\x63\xd7" + bytes(504))
    with pytest.raises(DataMigrationError, match="unfinished write"):
        migrate_data(str(source), blank_connection)


WRITER = """
import sqlite3, sys
connection = sqlite3.connect(sys.argv[1], isolation_level=None)
connection.execute("PRAGMA cache_size = 5")  # a small cache: the write spills into the file before COMMIT
connection.execute("BEGIN IMMEDIATE")
connection.execute("UPDATE tasks SET error_message = hex(randomblob(2000))")
print("writing", flush=True)
sys.stdin.readline()
connection.execute("ROLLBACK")
"""


@pytest.mark.parametrize("backend", ["sqlite-file"], indirect=True)
def test_a_source_an_old_agent_is_writing_is_read_with_its_locks_and_said_to_be_busy(
    blank_connection: DatabaseConnection, tmp_path: Path
) -> None:
    source = tmp_path / "legacy.db"
    legacy_file(source, 300)
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(source)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert writer.stdout is not None and writer.stdout.readline() == "writing\n"
        assert source.with_name("legacy.db-journal").stat().st_size > 0
        with pytest.raises(DataMigrationError, match="is busy: another process is writing it"):
            migrate_data(str(source), blank_connection)
    finally:
        writer.communicate("done\n", timeout=30)
    assert migrate_data(str(source), blank_connection).copied == 300


def test_rows_without_any_timestamp_are_named(blank_connection: DatabaseConnection, tmp_path: Path) -> None:
    source = tmp_path / "odd.db"
    nulls = _set("UPDATE tasks SET created_at = NULL, started_at = NULL, completed_at = NULL WHERE rowid = 1")
    uuids = legacy_file(source, 2, change=_loosened(nulls))
    with pytest.raises(DataMigrationError, match=f"task {uuids[0]}: created_at None: set the time"):
        migrate_data(str(source), blank_connection)
