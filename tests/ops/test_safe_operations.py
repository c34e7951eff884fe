"""Operations that never lose data, never open the wrong file and never show a secret."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import DBAPIError

from db import DatabaseConfig, DatabaseConnection, DatabaseError, TaskRepository
from db.schema import upgrade_schema
from db.sqlite_backup import copy_sqlite
from db.unit_of_work import is_transient_error, run_in_transaction
from ops.backup import backup_database, restore_database
from ops.migrate_data import migrate_data
from ops.stats import database_stats
from tests.support.cli import MAIN, assert_one_line_error
from tests.support.cli import run_here as run
from tests.support.data import all_tasks, child_environment, task_data
from tools.legacy_db import read_rows, write_legacy_db

SECRET = "Hunter2-query-secret"


def _files(directory: Path) -> dict[str, str]:
    """Every file under `directory` with a hash of its bytes."""
    return {
        str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def _sqlite_with_tasks(path: Path, count: int, **fields: object) -> list[str]:
    """A SQLite task database at head, holding `count` tasks; their uuids."""
    connection = DatabaseConnection.initialize(DatabaseConfig(sqlite_path=str(path)))
    upgrade_schema(connection)
    repo = TaskRepository(connection)
    uuids = [repo.create(task_data(**fields)).uuid for _ in range(count)]
    DatabaseConnection.reset()
    return uuids


def _task_count(path: Path) -> int:
    with sqlite3.connect(path) as conn:
        return int(conn.execute("SELECT count(*) FROM tasks").fetchone()[0])


# 1. Paths open exactly the file named


def test_restore_opens_exactly_the_file_named_even_with_uri_characters(tmp_path: Path) -> None:
    database = tmp_path / "contexts" / "tasks.db"
    _sqlite_with_tasks(database, 5)
    _sqlite_with_tasks(tmp_path / "my%41.db", 2)
    _sqlite_with_tasks(tmp_path / "myA.db", 3)
    result = run(tmp_path, "db", "restore", str(tmp_path / "my%41.db"), "--yes")
    assert result.returncode == 0, result.stderr
    assert _task_count(database) == 2


@pytest.mark.parametrize("name", ["a#1.db", "b?x=1.db", "c%41.db"])
def test_migrate_data_reads_exactly_the_file_named_and_creates_nothing(tmp_path: Path, name: str) -> None:
    source_dir = tmp_path / "data"
    source_dir.mkdir()
    write_legacy_db(source_dir / name, 7)
    before = _files(source_dir)
    result = run(tmp_path, "db", "migrate-data", "--from", str(source_dir / name), "--quiet")
    assert result.returncode == 0, result.stderr
    assert "copied:      7" in result.stdout
    assert _files(source_dir) == before


def test_the_configured_sqlite_file_is_exactly_the_path_given(tmp_path: Path) -> None:
    path = tmp_path / "odd #?%41 dir" / "t%41#?.db"
    result = run(tmp_path, DATABASE_SQLITE_PATH=str(path))
    assert result.returncode == 0, result.stderr
    assert path.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["odd #?%41 dir"]


def test_restore_without_yes_or_of_a_missing_file_creates_nothing(tmp_path: Path) -> None:
    _sqlite_with_tasks(tmp_path / "backup.db", 1)
    refused = run(tmp_path, "db", "restore", str(tmp_path / "backup.db"))
    assert refused.returncode == 2 and "--yes" in refused.stderr
    missing = run(tmp_path, "db", "restore", str(tmp_path / "bakcup.db"), "--yes")
    assert_one_line_error(missing, "no such backup file")
    assert not (tmp_path / "contexts").exists()


# 2. A restore verifies the backup first and keeps what it replaces


def test_a_damaged_backup_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    database = tmp_path / "contexts" / "tasks.db"
    _sqlite_with_tasks(database, 50)
    damaged = tmp_path / "damaged.db"
    _sqlite_with_tasks(damaged, 3000, error_message="x" * 200)
    with damaged.open("r+b") as handle:
        for page in (5, 40):
            handle.seek(page * 4096 + 100)
            handle.write(os.urandom(2000))
    before = _files(database.parent)
    result = run(tmp_path, "db", "restore", str(damaged), "--yes")
    assert_one_line_error(result, "damaged")
    assert _files(database.parent) == before


@pytest.mark.parametrize(
    "statements",
    [
        ["CREATE TABLE tasks(a)"],
        [
            "CREATE TABLE tasks(a)",
            "CREATE TABLE alembic_version(version_num)",
            "INSERT INTO alembic_version VALUES ('0002')",
        ],
    ],
)
def test_a_file_without_this_codes_tasks_table_is_refused(tmp_path: Path, statements: list[str]) -> None:
    database = tmp_path / "contexts" / "tasks.db"
    _sqlite_with_tasks(database, 5)
    impostor = tmp_path / "impostor.db"
    with sqlite3.connect(impostor) as conn:
        for statement in statements:
            conn.execute(statement)
    before = _files(database.parent)
    result = run(tmp_path, "db", "restore", str(impostor), "--yes")
    assert_one_line_error(result, "nothing was changed")
    assert _files(database.parent) == before and _task_count(database) == 5


def test_a_backup_of_an_unknown_revision_is_refused(tmp_path: Path) -> None:
    database = tmp_path / "contexts" / "tasks.db"
    _sqlite_with_tasks(database, 5)
    future = tmp_path / "future.db"
    _sqlite_with_tasks(future, 1)
    with sqlite3.connect(future) as conn:
        conn.execute("UPDATE alembic_version SET version_num = '9999'")
    result = run(tmp_path, "db", "restore", str(future), "--yes")
    assert_one_line_error(result, "'9999'", "does not know")
    assert _task_count(database) == 5


def test_a_restore_keeps_a_copy_of_what_it_replaces(tmp_path: Path) -> None:
    database = tmp_path / "contexts" / "tasks.db"
    replaced = set(_sqlite_with_tasks(database, 5))
    _sqlite_with_tasks(tmp_path / "backup.db", 2)
    result = run(tmp_path, "db", "restore", str(tmp_path / "backup.db"), "--yes")
    assert result.returncode == 0, result.stderr
    copies = list(database.parent.glob("tasks.before-restore-*.db"))
    assert len(copies) == 1 and copies[0].name in result.stdout
    assert set(read_rows(copies[0])) == replaced
    assert _task_count(database) == 2


@pytest.mark.parametrize("backend", ["postgresql"])
def test_postgresql_restore_verifies_the_dump_and_keeps_what_it_replaces(
    blank_connection: DatabaseConnection, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    upgrade_schema(blank_connection)
    repo = TaskRepository(blank_connection)
    kept = {repo.create(task_data()).uuid for _ in range(3)}
    monkeypatch.chdir(tmp_path)
    command_lines: list[str] = []
    real_run, real_popen = subprocess.run, subprocess.Popen

    def recording_run(args: list[str], **kwargs: object) -> object:
        command_lines.append(" ".join(args))
        return real_run(args, **kwargs)  # type: ignore[call-overload]

    def recording_popen(args: list[str], **kwargs: object) -> object:
        command_lines.append(" ".join(args))
        return real_popen(args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(subprocess, "run", recording_run)
    monkeypatch.setattr(subprocess, "Popen", recording_popen)
    # A name pg_restore would read as an option without `--` before it.
    backup = backup_database(blank_connection, Path("-d.dump"))
    brought = {repo.create(task_data()).uuid for _ in range(4)}
    assert stat.S_IMODE(backup.stat().st_mode) == 0o600

    truncated = tmp_path / "truncated.dump"
    truncated.write_bytes(backup.read_bytes()[: backup.stat().st_size // 2])
    with pytest.raises(DatabaseError):
        restore_database(blank_connection, truncated)
    assert set(all_tasks(blank_connection)) == kept | brought

    result = restore_database(blank_connection, backup)
    assert result.rows == 3 and set(all_tasks(blank_connection)) == kept
    assert result.replaced_copy is not None and result.replaced_copy.is_file()
    restore_database(blank_connection, result.replaced_copy)
    assert set(all_tasks(blank_connection)) == kept | brought
    # The password reaches pg_dump and pg_restore through their environment, never their command line.
    password = blank_connection.config.sqlalchemy_url.password
    assert password and any("pg_restore" in line for line in command_lines)
    assert all(str(password) not in line for line in command_lines)


# 3. --overwrite asks first and keeps newer rows


def test_overwrite_keeps_a_newer_target_row_unless_told_otherwise(
    blank_connection: DatabaseConnection, tmp_path: Path
) -> None:
    legacy = tmp_path / "legacy.db"
    rows = write_legacy_db(legacy, 20)
    upgrade_schema(blank_connection)
    migrate_data(str(legacy), blank_connection)
    key = rows[0]["uuid"]
    repo = TaskRepository(blank_connection)
    repo.fail(key, "failed later")
    repo.update_statistics(key, tokens=999)
    dry = migrate_data(str(legacy), blank_connection, overwrite=True, dry_run=True)
    assert (dry.overwritten, dry.kept_newer) == (19, 1)
    done = migrate_data(str(legacy), blank_connection, overwrite=True)
    assert (done.overwritten, done.kept_newer, done.differences) == (19, 1, [])
    task = all_tasks(blank_connection)[key]
    assert (task.status, task.error_message) == ("failed", "failed later")
    forced = migrate_data(str(legacy), blank_connection, overwrite=True, overwrite_newer=True)
    assert (forced.overwritten, forced.kept_newer, forced.differences) == (20, 0, [])
    assert all_tasks(blank_connection)[key].error_message != "failed later"


def test_cli_overwrite_needs_yes_and_dry_run_counts(tmp_path: Path) -> None:
    legacy = tmp_path / "legacy.db"
    write_legacy_db(legacy, 10)
    assert run(tmp_path, "db", "migrate-data", "--from", str(legacy), "--quiet").returncode == 0
    refused = run(tmp_path, "db", "migrate-data", "--from", str(legacy), "--overwrite", "--quiet")
    assert refused.returncode == 2 and "--yes" in refused.stderr
    dry = run(tmp_path, "db", "migrate-data", "--from", str(legacy), "--overwrite", "--dry-run", "--quiet")
    assert dry.returncode == 0, dry.stderr
    assert "would overwrite: 10" in dry.stdout and "kept newer:  0" in dry.stdout


# 4. Safety copies of upgrades


def _legacy_with_bad_datetime(path: Path) -> None:
    write_legacy_db(path, 5)
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE tasks SET started_at = 'yesterday' WHERE rowid = 1")


def test_failed_upgrades_leave_no_copies(tmp_path: Path) -> None:
    database = tmp_path / "contexts" / "tasks.db"
    database.parent.mkdir()
    _legacy_with_bad_datetime(database)
    for _ in range(3):
        assert run(tmp_path).returncode != 0
    assert sorted(path.name for path in database.parent.iterdir() if "before" in path.name) == []


def test_old_upgrade_copies_are_pruned(tmp_path: Path) -> None:
    database = tmp_path / "contexts" / "tasks.db"
    database.parent.mkdir()
    write_legacy_db(database, 5)
    old = [database.with_name(f"tasks.before-0001-2020010{day}T000000000000Z.db") for day in range(1, 6)]
    for path in old:
        path.write_bytes(b"an older copy")
    result = run(tmp_path, DATABASE_SQLITE_BACKUPS_KEPT="3")
    assert result.returncode == 0, result.stderr
    left = sorted(path.name for path in database.parent.glob("tasks.before-*"))
    assert len(left) == 3 and left[:2] == [old[3].name, old[4].name]


def test_a_copy_cut_short_never_takes_the_backups_name(tmp_path: Path) -> None:
    source = sqlite3.connect(":memory:")
    source.execute("CREATE TABLE t(x)")
    source.close()
    target = tmp_path / "copy.db"
    with pytest.raises(sqlite3.ProgrammingError):
        copy_sqlite(source, target)
    assert list(tmp_path.iterdir()) == []


# 5. Secrets


def test_a_password_in_the_url_query_is_never_shown(tmp_path: Path) -> None:
    url = f"postgresql://agent@127.0.0.1:1/coding_agent?password={SECRET}&sslmode=disable"
    config = DatabaseConfig(url=url)
    assert SECRET not in repr(config) and SECRET not in config.safe_url
    shown = run(tmp_path, "config", "show", DATABASE_URL=url)
    assert shown.returncode == 0 and "password=***" in shown.stdout
    started = run(tmp_path, "-v", DATABASE_URL=url, DATABASE_STARTUP_TIMEOUT="1", DATABASE_CONNECT_TIMEOUT="1")
    assert started.returncode != 0 and "retrying" in started.stderr
    for output in (shown, started):
        assert SECRET not in output.stdout + output.stderr


def test_a_yaml_error_never_prints_the_offending_line(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text(f"database:\n  postgresql:\n    password: {SECRET}: x\n", encoding="utf-8")
    result = run(tmp_path, "config", "show")
    assert_one_line_error(result, "not valid YAML", "line 3")
    assert SECRET not in result.stdout + result.stderr


def test_db_stats_never_shows_a_password_from_the_statement_statistics(scratch_database: Any) -> None:
    connection = DatabaseConnection.initialize(
        DatabaseConfig(url=scratch_database.render_as_string(hide_password=False))
    )
    upgrade_schema(connection)
    with connection.engine.begin() as conn:
        conn.exec_driver_sql("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        conn.exec_driver_sql("SELECT pg_stat_statements_reset()")
    with connection.engine.begin() as conn:
        conn.exec_driver_sql("DROP ROLE IF EXISTS stats_probe")
        conn.exec_driver_sql(f"CREATE ROLE stats_probe PASSWORD '{SECRET}'")
        conn.exec_driver_sql("DROP ROLE stats_probe")
    queries = [row["query"] for row in database_stats(connection)["statements"]["top_by_total_time"]]
    assert any("CREATE ROLE stats_probe PASSWORD '***'" in query for query in queries), queries
    assert all(SECRET not in query for query in queries)


# 6. Files are private


def test_database_backups_and_directories_are_private_whatever_the_umask(tmp_path: Path) -> None:
    command = f'umask 000; exec {sys.executable} {MAIN} "$@"'
    env = child_environment()

    def run_umask(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", "-c", command, "main", *args], cwd=tmp_path, env=env, capture_output=True, text=True, check=False
        )

    assert run_umask().returncode == 0
    assert run_umask("db", "backup", "--output", "backups/b.db").returncode == 0
    contexts = tmp_path / "contexts"
    assert stat.S_IMODE(contexts.stat().st_mode) == 0o700
    assert stat.S_IMODE((contexts / "tasks.db").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "backups").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "backups" / "b.db").stat().st_mode) == 0o600
    previous = os.umask(0)
    try:
        connection = DatabaseConnection.initialize(DatabaseConfig(sqlite_path=str(contexts / "tasks.db")))
        TaskRepository(connection).create(task_data())
        wal = contexts / "tasks.db-wal"
        assert wal.exists() and stat.S_IMODE(wal.stat().st_mode) == 0o600
    finally:
        os.umask(previous)


# 8. Only what can succeed later is retried


def test_an_error_that_cannot_pass_is_raised_at_once(
    connection: DatabaseConnection, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(DatabaseError, match=r"(?i)no such column|does not exist"):
        run_in_transaction(
            connection,
            lambda session: session.execute(text("SELECT no_such_column FROM tasks")),
            "probe",
            redo_safe=True,
        )
    assert not [record for record in caplog.records if "retrying" in record.getMessage()]


def test_a_locked_sqlite_file_is_worth_another_try(tmp_path: Path) -> None:
    path = tmp_path / "locked.db"
    sqlite3.connect(path).close()
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    engine = create_engine(f"sqlite:///{path}", connect_args={"timeout": 0})
    try:
        with pytest.raises(DBAPIError) as locked, engine.connect() as conn:
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        with pytest.raises(DBAPIError) as missing, engine.connect() as conn:
            conn.exec_driver_sql("SELECT no_such_column FROM sqlite_master")
    finally:
        holder.close()
        engine.dispose()
    assert is_transient_error(locked.value)
    assert not is_transient_error(missing.value)


# 10. Odd inputs end cleanly


@pytest.mark.parametrize(
    ("args", "env", "fragment"),
    [
        (["db", "migrate-data", "--from", "x.db", "--batch-size", "99999999999999999999"], {}, "--batch-size"),
        ([], {"DATABASE_STARTUP_TIMEOUT": "nan"}, "DATABASE_STARTUP_TIMEOUT"),
        ([], {"DATABASE_STARTUP_TIMEOUT": "inf"}, "DATABASE_STARTUP_TIMEOUT"),
        ([], {"DATABASE_RETRY_TIMEOUT": "-inf"}, "DATABASE_RETRY_TIMEOUT"),
        (["tasks", "history", "o/r#²"], {}, "cannot read"),
    ],
)
def test_odd_inputs_end_with_one_line(tmp_path: Path, args: list[str], env: dict[str, str], fragment: str) -> None:
    assert run(tmp_path).returncode == 0
    result = run(tmp_path, *args, **env)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert fragment in result.stderr


def test_a_closed_pipe_ends_a_listing_quietly(tmp_path: Path) -> None:
    database = tmp_path / "contexts" / "tasks.db"
    _sqlite_with_tasks(database, 1000)
    env = child_environment()
    process = subprocess.Popen(
        [sys.executable, str(MAIN), "tasks", "list", "--limit", "1000"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout is not None and process.stderr is not None
    assert process.stdout.readline().startswith(b"uuid")
    process.stdout.close()
    errors = process.stderr.read().decode()
    assert process.wait(timeout=60) == 141
    assert errors == ""


def test_terminal_escapes_in_task_fields_are_shown_escaped(tmp_path: Path) -> None:
    database = tmp_path / "contexts" / "tasks.db"
    [key] = _sqlite_with_tasks(database, 1, user="\x1b[2J\x1b]0;owned\x07eve\u202e", error_message="a\x1b[31mb")
    for args in (["tasks", "list"], ["tasks", "show", key]):
        result = run(tmp_path, *args)
        assert result.returncode == 0, result.stderr
        assert "\x1b" not in result.stdout and "\x07" not in result.stdout and "\u202e" not in result.stdout
        assert "\\x1b[2J" in result.stdout


# 12. Readers change nothing


def test_readers_on_a_legacy_file_change_nothing_and_name_the_upgrade(tmp_path: Path) -> None:
    database = tmp_path / "contexts" / "tasks.db"
    database.parent.mkdir()
    write_legacy_db(database, 5)
    before = _files(tmp_path)
    for args in (["tasks", "list"], ["tasks", "show", next(iter(read_rows(database)))], ["tasks", "usage"]):
        assert_one_line_error(run(tmp_path, *args), "python main.py db upgrade")
    for args in (["db", "current"], ["db", "check"]):
        assert "legacy" in run(tmp_path, *args).stdout
    assert _files(tmp_path) == before


def test_readers_on_a_missing_database_create_nothing(tmp_path: Path) -> None:
    for args in (["tasks", "list"], ["tasks", "history", "o/r#1"], ["db", "current"], ["db", "stats"]):
        assert_one_line_error(run(tmp_path, *args), "no database at")
    assert list(tmp_path.iterdir()) == []


def test_readers_on_a_database_at_head_leave_its_files_as_they_were(tmp_path: Path) -> None:
    database = tmp_path / "contexts" / "tasks.db"
    [key] = _sqlite_with_tasks(database, 1)
    before = _files(tmp_path)
    for args in (["tasks", "list"], ["tasks", "show", key], ["db", "current"], ["db", "check"], ["db", "stats"]):
        assert run(tmp_path, *args).returncode == 0
    assert _files(tmp_path) == before


@pytest.fixture
def sqlite_file(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "tasks.db"


def test_a_read_only_connection_never_creates_the_file(sqlite_file: Path) -> None:
    config = DatabaseConfig(sqlite_path=str(sqlite_file))
    with pytest.raises(DatabaseError, match="no database at"):
        DatabaseConnection.initialize(config, read_only=True)
    assert not sqlite_file.exists()
    DatabaseConnection.initialize(replace(config)).create_tables()
    DatabaseConnection.reset()
    reader = DatabaseConnection.initialize(config, read_only=True)
    assert TaskRepository(reader).count_by_status()["running"] == 0
